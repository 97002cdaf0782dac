"""A short GIL switch interval while a recorder's writer thread lives, so that it never stalls the training thread.

Torch releases the GIL around every operator.  The writer (at nice 19) then takes it, and a Python thread that
holds the GIL keeps it until another asks and the interpreter's switch interval (5 ms by default) has passed, so
the training thread waited up to 5 ms after an operator, and the writer's low priority no longer held it back:
the training thread, blocked on the GIL, left it a core.  Measured on the sample loop (2 cores, both busy with
torch): a nice-19 thread hashing small buffers (GIL held) made the loop +3% to +315% slower (0.64-0.71 s to
0.73-2.7 s); with a 0.2 ms interval +0% to +4%, as little as a thread hashing 1 MB buffers (GIL released).  The
recorded sample loop (`bench.recorder_overhead`, median of 7, four interleaved pairs, 2026-12-05): +6.9% to
+9.2% against +6.9% to +25.5% with the default interval: the typical run gains a point, the bad ones most.  The
interval only matters while two threads want the GIL, so a loop without other Python threads runs as before.

Process-wide (`sys.setswitchinterval`): shortened by the first live writer, restored by the last, unless the
program set its own value meanwhile (then left as the program set it), and never lengthened.
"""

from __future__ import annotations

import sys
import threading

SWITCH_INTERVAL_S = 2e-4

_lock = threading.Lock()
_holders = 0
_saved = 0.0  # the program's own interval, while shortened
_set: float | None = None  # the short value as the interpreter holds it (whole microseconds); None: not shortened


def shorten() -> None:
    """Take the short interval (one call per writer thread, matched by `restore`)."""
    global _holders, _saved, _set
    with _lock:
        if _holders == 0:
            _saved, _set = sys.getswitchinterval(), None
            if _saved > SWITCH_INTERVAL_S:
                sys.setswitchinterval(SWITCH_INTERVAL_S)
                _set = sys.getswitchinterval()
        _holders += 1


def restore() -> None:
    """Give the short interval back; the last holder restores the program's own."""
    global _holders, _set
    with _lock:
        _holders -= 1
        if _holders == 0:
            if _set is not None and sys.getswitchinterval() == _set:
                sys.setswitchinterval(_saved)
            _set = None
