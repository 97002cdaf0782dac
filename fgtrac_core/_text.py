"""Recorded text made safe for a terminal.

A run's strings (its name, sample sources, stage and transform names, failure details quoting recorded values...)
come from whoever wrote the run database.  Printed raw, an ESC sequence in them could recolour or rewrite the
terminal (clear the screen, move the cursor over an earlier "TAMPERED" line, set the window title), a newline or
carriage return could forge whole output lines, and Unicode bidi overrides could make text read differently from
what it is.  `for_terminal` shows every such character as a visible escape instead: ESC as ``\\x1b``, a newline as
``\\x0a``, U+202E as ``\\u202e``.  JSON output needs none of this: `json.dumps` escapes control characters itself.
"""

from __future__ import annotations

import json
import re
import sys
from typing import IO

# C0 controls (newline and tab included: one recorded value must stay on its line), DEL, C1 controls (0x9b is a
# one-byte CSI on some terminals), the line/paragraph separators and the bidi marks, embeddings, overrides and
# isolates
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def or_dash(value: object, spec: str) -> str:
    """An optional recorded number formatted with `spec`, or "-" when it is missing (None, NaN, pandas' NA): a
    NULL epoch, lr or loss that `log_batch` was not given reads back as one of these."""
    try:
        missing = value is None or bool(value != value)  # NaN is the one value unequal to itself
    except TypeError:  # pandas' NA has no truth value
        missing = True
    return "-" if missing else format(value, spec)


def lr_text(lr: object, group_lrs: object, spec: str = ".3g") -> str:
    """A use's learning rate as recorded: every param group's ("0.0001 / 0.001") when the groups stepped at
    different rates (`batches.group_lrs`), else the one rate (`batches.lr`), "-" when missing."""
    if isinstance(group_lrs, str) and group_lrs:
        try:
            rates = json.loads(group_lrs)
            return " / ".join(format(float(r), spec) for r in rates)
        except (ValueError, TypeError):
            pass  # not what the recorder writes: shown as the one rate (verify names the changed field)
    return or_dash(lr, spec)


def for_terminal(text: object) -> str:
    """`str(text)` with every control character, DEL and bidi control replaced by a visible escape."""
    return _UNSAFE.sub(_escape, str(text))


def echo(*parts: object, file: IO[str] | None = None) -> None:
    """`print` for lines that carry recorded text: each part goes through `for_terminal`."""
    print(*(for_terminal(p) for p in parts), file=file if file is not None else sys.stdout)


def abbreviate(value: object, *, items: int = 4, width: int = 100) -> str:
    """A JSON-like value shortened for one terminal line: lists longer than `items` show their first `items`
    values and a count ("[0.1, 0.2, 0.3, 0.4, … 30 values]"), and the whole is cut at `width` characters with
    "…".  Full values are in `--json`."""
    text = _short(value, items)
    return text if len(text) <= width else text[: width - 1] + "…"


def _short(value: object, items: int) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))}: {_short(v, items)}" for k, v in value.items()) + "}"
    if isinstance(value, list | tuple):
        head = ", ".join(_short(v, items) for v in value[:items])
        return f"[{head}, … {len(value)} values]" if len(value) > items else f"[{head}]"
    if isinstance(value, float):
        return f"{value:.6g}"
    return value if isinstance(value, str) else json.dumps(value)
