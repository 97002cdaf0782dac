"""The recorder's writer in a process of its own (`Run.create(..., writer="process")`).

A writer thread shares the training process's GIL: while it encodes ledger entries, hashes and binds inserts, the
training thread waits for the interpreter even with a CPU core free (a GPU loop's case).  Here a child process
holds the database, the ledger state and the signing key and applies the transactions
(`fgtrac_core.tracking._commits`) with the same writer as the thread (`Writer`: shared transactions for a backlog,
spaced snapshots, a failure committing exactly the jobs before it).  The training process keeps one thread that
prepares each transaction (what needs torch: Arrow tables of the buffers, checkpoint files) and sends it down a
pipe; a second thread reads the child's acknowledgements (errors, CPU time, the jobs someone waits for).

Crash semantics are the thread's: the child reads the pipe as fast as it arrives, and when it ends without a
`stop` (the training process died) exits at once without committing what was still queued; what was committed
before is intact (DuckDB's WAL), and `Run.open` recovers the rest as after any crash.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import os
import pickle
import queue
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, BinaryIO

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from fgtrac_core import errors
from fgtrac_core.store.db import connect, first_line
from fgtrac_core.store.layout import RunLayout
from fgtrac_core.tracking import _switch_interval
from fgtrac_core.tracking._commits import Committer, Prepare, Transaction
from fgtrac_core.tracking._writer import MIN_PUBLISH_GAP_S, RecordingFailedError, lower_own_priority

_LENGTH = struct.Struct("!Q")


def _send(stream: BinaryIO, message: Any) -> None:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_LENGTH.pack(len(data)) + data)
    stream.flush()


def _receive(stream: BinaryIO) -> Any:
    """The next message, or None when the other end has closed the pipe."""
    head = stream.read(_LENGTH.size)
    if len(head) < _LENGTH.size:
        return None
    n = _LENGTH.unpack(head)[0]
    data = stream.read(n)
    return None if len(data) < n else pickle.loads(data)


class ProcessWriter:
    """The training process's end: the same calls as `LocalWriter` (submit, drain, stop, raise_if_failed,
    cpu_s)."""

    def __init__(
        self,
        layout: RunLayout,
        run_id: str,
        key: Ed25519PrivateKey,
        *,
        min_publish_gap_s: float = MIN_PUBLISH_GAP_S,
    ) -> None:
        self._tokens = itertools.count()
        self._waiters: dict[int, threading.Event] = {}
        self._lock = threading.Lock()
        self._error: str | None = None
        self._child_cpu_s = 0.0
        self._front_cpu_s = 0.0
        self._stopped = False
        self._queue: queue.Queue[tuple[Prepare, bool, bool, int] | None] = queue.Queue()
        started: list[BaseException | None] = []
        ready = threading.Event()

        def front() -> None:
            # the process is started from this thread, which lives as long as it: the kernel ends it with the
            # thread that started it (`_die_with_parent`)
            try:
                self._start(layout, run_id, key, min_publish_gap_s)
                started.append(None)
            except errors.FgtracError as exc:
                started.append(exc)
            except BaseException as exc:  # e.g. no pipes to pass on this platform
                started.append(RecordingFailedError(f"could not start the writer process: {first_line(exc)}"))
            finally:
                ready.set()
            if started[0] is None:
                lower_own_priority()  # its work competes with training as the writer thread's would
                _switch_interval.shorten()  # this thread holds the GIL while it prepares (as the writer thread)
                try:
                    self._send_loop()
                finally:
                    _switch_interval.restore()

        self._front = threading.Thread(target=front, name="fgtrac-writer-front", daemon=True)
        self._front.start()
        ready.wait()
        if started[0] is not None:
            self._front.join()
            raise started[0]
        self._reader = threading.Thread(target=self._receive_loop, name="fgtrac-writer-acks", daemon=True)
        self._reader.start()

    def _start(
        self, layout: RunLayout, run_id: str, key: Ed25519PrivateKey, min_publish_gap_s: float
    ) -> None:
        """Start the writer process and wait until it holds the database (or raise its one-line error)."""
        to_child, from_parent = os.pipe()
        from_child, to_parent = os.pipe()
        package_root = str(Path(__file__).resolve().parents[2])
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])),
        }
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-c", "from fgtrac_core.tracking._writer_process import main; main()",
                 str(to_child), str(to_parent), str(os.getpid())],
                pass_fds=(to_child, to_parent),
                env=env,
                stdin=subprocess.DEVNULL,  # the loop's own streams stay its own (stderr: a crash's traceback)
                stdout=subprocess.DEVNULL,
            )  # fmt: skip
        finally:
            os.close(to_child)
            os.close(to_parent)
        self._out = os.fdopen(from_parent, "wb")
        self._in = os.fdopen(from_child, "rb")
        raw = key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
        _send(
            self._out,
            {"live": str(layout.live_db), "snapshot": str(layout.snapshot_db), "run_id": run_id, "key": raw,
             "min_publish_gap_s": min_publish_gap_s},
        )  # fmt: skip
        reply = _receive(self._in)
        if reply is not None and reply[0] == "ready":
            return
        self._proc.wait()
        self._out.close()
        self._in.close()
        if reply is None:
            raise RecordingFailedError(
                f"the writer process did not start (exit status {self._proc.returncode})"
            )
        error = getattr(errors, reply[1], None)
        raise (
            error if isinstance(error, type) and issubclass(error, errors.FgtracError) else errors.FgtracError
        )(reply[2])

    def submit(self, prepare: Prepare, *, publish: bool = False, wait: bool = False) -> None:
        self.raise_if_failed()
        token = next(self._tokens)
        done = threading.Event() if wait else None
        if done is not None:
            with self._lock:
                self._waiters[token] = done
        self._queue.put((prepare, publish, wait, token))
        if done is not None:
            done.wait()
            self.raise_if_failed()

    def drain(self) -> None:
        self.submit(lambda: Transaction([], []), wait=True)

    def stop(self) -> None:
        """Finish queued work, end the writer process (it closes the database) and both threads."""
        if not self._out.closed:
            self._queue.put(None)  # (a sending thread that ended with the process does not read it)
            self._front.join()
            self._reader.join()
            self._proc.wait()
            with contextlib.suppress(OSError):  # what a writer process that died could not read
                self._out.close()
            self._in.close()
        self.raise_if_failed()

    def raise_if_failed(self) -> None:
        if self._error is not None:
            raise RecordingFailedError(self._error)

    @property
    def cpu_s(self) -> float:
        """CPU seconds of the writer process (its start-up included) and of the thread preparing its work."""
        return self._child_cpu_s + self._front_cpu_s

    def _fail(self, message: str) -> None:
        with self._lock:
            if self._error is None:
                self._error = message
            waiters, self._waiters = list(self._waiters.values()), {}
        for done in waiters:
            done.set()

    def _acknowledged(self, token: int) -> None:
        with self._lock:
            done = self._waiters.pop(token, None)
        if done is not None:
            done.set()

    def _send_loop(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    _send(self._out, ("stop",))
                    self._proc.wait()  # this thread outlives the process (the kernel ends it with the thread)
                    return
                prepare, publish, wait, token = item
                # nothing is sent after a failure: later jobs would record out of order
                if self._error is not None:
                    self._acknowledged(token)
                    continue
                try:
                    transaction = prepare()
                except BaseException as exc:
                    self._fail(f"recording failed in the background: {first_line(exc)}")
                    continue
                _send(self._out, ("job", transaction, publish, wait, token))
            except OSError:  # the writer process is gone; the reader reports it
                return
            finally:
                self._front_cpu_s = time.thread_time()

    def _receive_loop(self) -> None:
        while True:
            message = _receive(self._in)
            if message is None:
                if not self._stopped:
                    self._proc.wait()
                    self._fail(f"recording failed: the writer process ended unexpectedly (exit status "
                               f"{self._proc.returncode}); what it committed is intact")  # fmt: skip
                return
            kind, token, self._child_cpu_s, error = message
            if error is not None:
                self._fail(error)
            if kind == "stopped":
                self._stopped = True
            else:
                self._acknowledged(token)


_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int) -> None:
    """Have the kernel kill this process when the thread that started it ends (Linux; elsewhere the closed pipe
    alone ends it): a killed training process then takes its writer with it at once, rather than when the
    writer next reads the pipe, so the database's lock is free for `Run.open` as it would be with a thread."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # it ended before that took effect
        os._exit(1)


def main() -> None:
    """The writer process: open the database, then apply jobs until `stop` (or exit when the pipe closes)."""
    # a Ctrl-C reaches the terminal's whole process group: it interrupts the loop, which can still close the run,
    # and not the writer that must commit it.  (Not a session of its own: the scheduler would then share the CPU
    # between the two sessions, whatever the writer's nice value.)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent(int(sys.argv[3]))
    inp, out = os.fdopen(int(sys.argv[1]), "rb"), os.fdopen(int(sys.argv[2]), "wb")
    lock = threading.Lock()

    def send(message: Any) -> None:
        with lock:
            _send(out, message)

    with contextlib.suppress(AttributeError, OSError):  # the lowest CPU priority, as the writer thread has
        os.setpriority(os.PRIO_PROCESS, 0, 19)
    init = _receive(inp)
    if init is None:
        return
    try:
        con = connect(Path(init["live"]), read_only=False)
        key = Ed25519PrivateKey.from_private_bytes(init["key"])
        committer = Committer(con, Path(init["live"]), Path(init["snapshot"]), init["run_id"], key)
        writer = committer.writer(min_publish_gap_s=init["min_publish_gap_s"])
    except BaseException as exc:
        send(("failed", type(exc).__name__, first_line(exc)))
        return
    send(("ready",))

    def error() -> str | None:
        try:
            writer.raise_if_failed()
        except RecordingFailedError as exc:
            return str(exc)
        return None

    while True:
        message = _receive(inp)
        if message is None:  # the training process is gone: stop now, as its writer thread would have
            os._exit(1)
        if message[0] == "stop":
            try:
                writer.stop()
            except RecordingFailedError:
                pass  # reported below
            finally:
                con.close()
            send(("stopped", None, time.process_time(), error()))
            # everything is committed, published and closed: the interpreter's own teardown (~0.1 s with DuckDB
            # and pyarrow loaded) would only delay the training process's close()
            os._exit(0)
        _, transaction, publish, wait, token = message

        def acknowledge(token: int = token) -> None:
            send(("done", token, time.process_time(), error()))

        try:
            writer.submit(
                lambda c, t=transaction: committer.apply(c, t),
                publish=publish,
                on_done=acknowledge,
                urgent=wait,
            )
        except RecordingFailedError:
            acknowledge()
