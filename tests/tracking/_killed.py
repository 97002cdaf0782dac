"""A recording script SIGKILLed mid-recording, for the crash tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path


def record_until_killed(
    script: str, run_dir: Path, at_least: int, before_kill: Callable[[int], None] = lambda pid: None
) -> int:
    """Run `script` (`python -c`, `run_dir` its argument), which prints how many steps it has committed after each
    commit, and SIGKILL it once that count reaches `at_least`; returns the last count printed.  `before_kill` gets
    the script's pid just before the kill."""
    child = subprocess.Popen([sys.executable, "-c", script, str(run_dir)], stdout=subprocess.PIPE, text=True)
    try:
        committed = 0
        while committed < at_least:
            line = child.stdout.readline()
            assert line, "the recorder exited early"
            committed = int(line)
        before_kill(child.pid)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
        child.stdout.close()
    return committed
