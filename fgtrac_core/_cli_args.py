"""Argument types for the `fgtrac` command: every value is checked when the command line is parsed, so a
meaningless one gets one line on stderr and exit 2 before anything runs."""

from __future__ import annotations

import argparse
import math
import socket
import sys
from collections.abc import Callable
from typing import NoReturn


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line (`fgtrac: error: ...`, exit 2), like every other error."""

    def error(self, message: str) -> NoReturn:
        command = self.prog.removeprefix("fgtrac").strip()
        where = f"{command}: " if command else ""
        sys.stderr.write(f"fgtrac: error: {where}{message} (see {self.prog} --help)\n")
        sys.exit(2)


def int_in(lo: int, hi: int) -> Callable[[str], int]:
    """An integer in [lo, hi]."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, not {text!r}") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"{value} is not between {lo} and {hi}")
        return value

    return parse


def float_in(lo: float, hi: float, *, hi_open: bool = False, lo_open: bool = False) -> Callable[[str], float]:
    """A finite float in [lo, hi] (either end open if asked)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, not {text!r}") from None
        ok = math.isfinite(value) and (lo < value if lo_open else lo <= value) and (value < hi if hi_open else value <= hi)
        if not ok:
            left, right = "(" if lo_open else "[", ")" if hi_open else "]"
            raise argparse.ArgumentTypeError(f"{text} is not a finite number in {left}{lo:g}, {hi:g}{right}")
        return value

    return parse


port = int_in(1, 65535)


def host(text: str) -> str:
    """An address this machine can bind to (resolved now, not when the server starts)."""
    try:
        socket.getaddrinfo(text, None, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, ValueError) as exc:
        raise argparse.ArgumentTypeError(f"cannot resolve host {text!r} ({exc})") from None
    return text


def device(text: str) -> str:
    """`cpu`, `cuda` or `cuda:N`, and only a CUDA device this machine has."""
    import torch

    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device (use cpu, cuda or cuda:N)") from None
    if dev.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"device {text!r} is not supported (use cpu, cuda or cuda:N)")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text}: this torch build or machine has no CUDA device (use cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text}: only {torch.cuda.device_count()} CUDA device(s) here")
    return text


def check_port_free(hostname: str, number: int) -> None:
    """Raise OSError with a one-line reason unless `hostname:number` can be bound now."""
    family = socket.getaddrinfo(hostname, number, type=socket.SOCK_STREAM)[0][0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((hostname, number))
        except OSError as exc:
            raise OSError(f"cannot serve on {hostname}:{number}: {exc.strerror or exc} (pick another --port)") from None
