"""BENCHMARKS.md's generated blocks: a re-measured section replaces its own block only; notes between blocks, and
the blocks of sections not re-measured, stay as they were; broken markers are refused."""

from __future__ import annotations

import pytest

from bench import report_file
from bench.report_file import ReportFileError

ORDER = ["a", "b", "c"]
STAMP = {"at": "2026-12-05 22:00 UTC", "commit": "abc1234", "machine": "x86_64", "versions": "torch 2", "quick": True}


def _doc() -> str:
    a = report_file.block("a", "## A\n\nfigure 1", STAMP)
    c = report_file.block("c", "## C\n\nfigure 3", None)
    return f"# title\n\nintro\n\n{a}\nnote on A\n\n{c}\nnote on C\n"


def test_block_puts_the_stamp_under_the_heading() -> None:
    text = report_file.block("a", "## A\n\nfigure 1\n", STAMP)
    lines = text.splitlines()
    assert lines[0] == "<!-- python -m bench: a -->" and lines[1] == "## A" and lines[-1].startswith("<!-- end")
    assert lines[3] == (
        "*Measured 2026-12-05 22:00 UTC on the code of abc1234 (x86_64; torch 2; quick run: fewer repetitions).*"
    )
    assert "before sections were dated" in report_file.block("a", "## A\n\nx", None)


def test_splice_replaces_only_its_block_and_keeps_the_notes() -> None:
    doc = _doc()
    out = report_file.splice(doc, "a", report_file.block("a", "## A\n\nfigure 9", STAMP), ORDER)
    assert "figure 9" in out and "figure 1" not in out
    assert out.replace("figure 9", "figure 1") == doc  # nothing else moved
    report_file.check(out)


def test_a_new_block_goes_after_its_predecessor_and_its_notes() -> None:
    out = report_file.splice(_doc(), "b", report_file.block("b", "## B\n\nfigure 2", None), ORDER)
    assert out.index("note on A") < out.index("## B") < out.index("## C") < out.index("note on C")
    assert out.startswith("# title\n\nintro\n\n<!-- python -m bench: a -->")
    first = report_file.splice("# t\n", "a", report_file.block("a", "## A\n\nx", None), ORDER)
    assert first.startswith("# t\n\n<!-- python -m bench: a -->") and first.endswith("-->\n")
    report_file.check(out)


@pytest.mark.parametrize(
    "broken",
    [
        "<!-- python -m bench: a -->\n## A\n",  # never closed
        "## A\n<!-- end python -m bench: a -->\n",  # closed, never opened
        "<!-- python -m bench: a -->\nx\n<!-- end python -m bench: a -->\n" * 2,  # twice
    ],
)
def test_broken_markers_are_refused(broken: str) -> None:
    with pytest.raises(ReportFileError, match="'a'"):
        report_file.check(broken)
    with pytest.raises(ReportFileError):
        report_file.splice(broken, "a", report_file.block("a", "## A\n\ny", None), ORDER)
