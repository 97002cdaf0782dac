"""BENCHMARKS.md as generated blocks between hand-written notes.

`python -m bench` rewrites only the blocks of the benchmarks it ran: a full run takes long enough that sections are
re-measured one at a time (`--only`), and a section's history or explanation is written beside its figures by
hand.  Each block sits between two HTML comments that name its benchmark (invisible once rendered); whatever lies
outside the blocks is kept as it is.  Each block opens with when and on which code its figures were measured.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

_START = "<!-- python -m bench: {key} -->"
_END = "<!-- end python -m bench: {key} -->"


class ReportFileError(ValueError):
    """BENCHMARKS.md's block markers are unbalanced or out of order."""


def stamp(measured: Mapping[str, Any] | None) -> str:
    """The line saying when, on which code and machine a block's figures were measured (`measured`: the result's
    ``measured`` dict, absent from results written before blocks were stamped)."""
    if not measured:
        return "*Measured before sections were dated (see the notes below for when).*"
    quick = "; quick run: fewer repetitions" if measured.get("quick") else ""
    return (
        f"*Measured {measured['at']} on the code of {measured['commit']} ({measured['machine']}; "
        f"{measured['versions']}{quick}).*"
    )


def block(key: str, text: str, measured: Mapping[str, Any] | None) -> str:
    """The marked block of benchmark `key`: `text` (starting with its ``## `` heading) with the stamp under the
    heading."""
    heading, _, body = text.strip("\n").partition("\n")
    return f"{_START.format(key=key)}\n{heading}\n\n{stamp(measured)}\n{body.rstrip()}\n{_END.format(key=key)}\n"


def _span(document: str, key: str) -> tuple[int, int] | None:
    """(start, end) offsets of `key`'s block in `document`, its closing marker's line break included."""
    start, end = _START.format(key=key), _END.format(key=key)
    if document.count(start) > 1 or document.count(end) > 1:
        raise ReportFileError(f"BENCHMARKS.md holds the block of {key!r} more than once")
    i = document.find(start)
    if i < 0:
        if end in document:
            raise ReportFileError(f"BENCHMARKS.md: the block of {key!r} has an end marker but no start marker")
        return None
    j = document.find(end, i)
    if j < 0:
        raise ReportFileError(f"BENCHMARKS.md: the block of {key!r} is not closed by {end!r}")
    j += len(end)
    return i, j + 1 if document[j : j + 1] == "\n" else j


def check(document: str) -> None:
    """Raise `ReportFileError` unless every block of `document` is opened once and closed."""
    opened = re.findall(r"^<!-- python -m bench: (\S+) -->$", document, flags=re.MULTILINE)
    closed = re.findall(r"^<!-- end python -m bench: (\S+) -->$", document, flags=re.MULTILINE)
    for key in dict.fromkeys(opened + closed):
        _span(document, key)


def splice(document: str, key: str, new_block: str, order: Sequence[str]) -> str:
    """`document` with `key`'s block replaced by `new_block`; a block not there yet goes after the block of the
    nearest benchmark before it in `order` (the notes after that block stay with it), else first."""
    span = _span(document, key)
    if span is not None:
        return document[: span[0]] + new_block + document[span[1] :]
    at = 0
    for earlier in reversed(order[: order.index(key)]):
        span = _span(document, earlier)
        if span is not None:
            nxt = document.find("<!-- python -m bench: ", span[1])
            at = len(document) if nxt < 0 else nxt
            break
    else:
        first = document.find("<!-- python -m bench: ")
        at = len(document) if first < 0 else first
    before = document[:at]
    sep = "" if not before or before.endswith("\n\n") else ("\n" if before.endswith("\n") else "\n\n")
    return before + sep + new_block + ("\n" if at < len(document) else "") + document[at:]
