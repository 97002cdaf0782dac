"""Malformed arguments: every one is refused at parse time with one line on stderr and exit 2, before anything
runs (the run directory is left byte for byte as it was)."""

from __future__ import annotations

import hashlib
import socket
from pathlib import Path

import pytest

from tests.conftest import run_cli


def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


_BAD = [
    ("app", "RUN", "--port", "-1"),
    ("app", "RUN", "--port", "99999"),
    ("app", "RUN", "--port", "eighty"),
    ("app", "RUN", "--host", "bad host"),
    ("influence", "RUN", "--tau", "nan"),
    ("influence", "RUN", "--tau", "1.5"),
    ("influence", "RUN", "--k", "0"),
    ("influence", "RUN", "--k", "99999999999999999999"),
    ("influence", "RUN", "--device", "bogus"),
    ("influence", "RUN", "--device", "cuda:99"),
    ("influence", "RUN", "--projection-dim", "-3"),
    ("influence", "RUN", "--mode", "nope"),
    ("influence", "RUN", "--check", "3", "--budget", "0"),
    ("stages", "RUN", "--horizon", "0"),
    ("stages", "RUN", "--budget", "nan"),
    ("stages", "RUN", "--budget", "-1"),
    ("stages", "RUN", "--method", "guess"),
    ("sample", "RUN", "notanumber"),
    ("nosuchcommand",),
    ("verify",),
]


@pytest.mark.parametrize("args", _BAD, ids=[" ".join(a) for a in _BAD])
def test_malformed_argument_is_one_line(digits_copy: Path, args: tuple[str, ...]) -> None:
    before = _tree(digits_copy)
    proc = run_cli(*[str(digits_copy) if a == "RUN" else a for a in args])
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fgtrac: error:"), proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert _tree(digits_copy) == before


def test_busy_port_is_reported_before_serving(digits_run: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        busy = s.getsockname()[1]
        proc = run_cli("app", str(digits_run), "--port", str(busy))
    assert proc.returncode == 2, proc.stderr
    assert "dashboard" not in proc.stderr and "http://" not in proc.stderr, proc.stderr
    assert f"127.0.0.1:{busy}" in proc.stderr and "--port" in proc.stderr
