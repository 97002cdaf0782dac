"""Recorded text made safe for a terminal.

A run's strings (its name, sample sources, stage and transform names, failure details quoting recorded values...)
come from whoever wrote the run database.  Printed raw, an ESC sequence in them could recolour or rewrite the
terminal (clear the screen, move the cursor over an earlier "TAMPERED" line, set the window title), a newline or
carriage return could forge whole output lines, and Unicode bidi overrides could make text read differently from
what it is.  `for_terminal` shows every such character as a visible escape instead: ESC as ``\\x1b``, a newline as
``\\x0a``, U+202E as ``\\u202e``.  JSON output needs none of this: `json.dumps` escapes control characters itself.
"""

from __future__ import annotations

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


def for_terminal(text: object) -> str:
    """`str(text)` with every control character, DEL and bidi control replaced by a visible escape."""
    return _UNSAFE.sub(_escape, str(text))


def echo(*parts: object, file: IO[str] | None = None) -> None:
    """`print` for lines that carry recorded text: each part goes through `for_terminal`."""
    print(*(for_terminal(p) for p in parts), file=file if file is not None else sys.stdout)
