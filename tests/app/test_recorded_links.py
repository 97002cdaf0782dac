"""Recorded text never becomes a link: a run whose strings (run name, sample sources, stage names, transform names
and params, annotation keys and values, analysis methods and params, checkpoint paths, slice and behaviour names)
are URLs, `www.` names, e-mail addresses, markdown links and raw HTML shows them as text on every page (AppTest;
the same run in real chromium is in test_browser_links.py)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import duckdb
import pytest
from streamlit.testing.v1 import AppTest

from tests.app._support import open_page, plain

PAYLOADS = [
    "https://evil.example/x",
    "www.evil.example",
    "[click](https://evil.example)",
    "<a href='https://evil.example'>x</a>",
    "a@evil.example",
]


def inject_payloads(run_dir: Path) -> dict[str, int]:
    """Overwrite the recorded strings of a (copied) run's snapshot with link payloads, as a hostile recorder or an
    edit of the snapshot would; returns the ids the pages should be opened on."""
    p = PAYLOADS
    with duckdb.connect(str(run_dir / "snapshot.duckdb")) as con:
        con.execute("UPDATE meta SET value = ? WHERE key = 'name'", [p[0]])
        con.execute("UPDATE samples SET source = (list_value(?, ?, ?, ?, ?))[sample_id % 5 + 1]", p)
        con.execute("UPDATE stages SET name = (list_value(?, ?, ?))[stage_id % 3 + 1]", p[1:4])
        con.execute("UPDATE transforms SET name = ?, params = ?", [p[4], json.dumps({"url": p[0], "md": p[2]})])
        con.execute("UPDATE checkpoints SET path = 'checkpoints/' || ? || '.pt'", [p[1]])
        patch = json.dumps({"checkpoint_rule": p[1], "note": p[3]})
        con.execute("UPDATE analyses SET method = ?, params = json_merge_patch(params, ?)", [p[0], patch])
        con.execute("UPDATE stage_aggregates SET slice = ? WHERE slice = 'class=1'", [p[4]])
        for table in ("stage_effects", "stage_aggregates"):
            con.execute(f"UPDATE {table} SET behaviour = ? WHERE behaviour = 'margin'", [p[0]])
        aid = con.execute("SELECT max(analysis_id) FROM analyses WHERE kind = 'influence'").fetchone()[0]
        test_id = con.execute("SELECT min(sample_id) FROM influence_tests WHERE analysis_id = ?", [aid]).fetchone()[0]
        train_id = con.execute(
            "SELECT train_id FROM influence_topk WHERE analysis_id = ? AND test_id = ? ORDER BY rank LIMIT 1",
            [aid, test_id],
        ).fetchone()[0]
        con.execute("DELETE FROM sample_annotations WHERE sample_id = ? AND key <> 'label_flipped'", [train_id])
        con.executemany(
            "INSERT INTO sample_annotations VALUES (?, ?, ?)",
            [[train_id, p[1], json.dumps(p[0])], [train_id, p[4], p[2]]],  # the second is not even JSON
        )
        # shown without images: the text and feature values a recorder gave as `display=`
        features = json.dumps({"features": {p[0]: 1.5, p[1]: p[2], p[3]: 2.0}})
        con.execute("UPDATE samples SET thumbnail = NULL, display = ? WHERE sample_id IN (?, ?)",
                    [features, test_id, train_id])  # fmt: skip
        second = con.execute(
            "SELECT train_id FROM influence_topk WHERE analysis_id = ? AND test_id = ? AND rank = 2 "
            "AND direction = 'proponent' AND view = 'raw'",
            [aid, test_id],
        ).fetchone()[0]
        con.execute("UPDATE samples SET thumbnail = NULL, display = ? WHERE sample_id = ?",
                    [json.dumps({"text": " ".join(p)}), second])  # fmt: skip
    return {"test": int(test_id), "sample": int(train_id)}


@pytest.fixture(scope="module")
def hostile_run(staged_run: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, int]]:
    dst = tmp_path_factory.mktemp("hostile") / "run"
    shutil.copytree(staged_run, dst)
    return dst, inject_payloads(dst)


# what a GFM renderer turns into a link: markdown links, raw HTML anchors (both spotted in the source, unescaped),
# and autolinks (spotted in the text once backslash escapes are resolved, as remark-gfm does)
_MD_LINK = re.compile(r"(?<!\\)\][ \t]*(?<!\\)\(|(?<!\\)<\s*a[\s>]", re.I)
_AUTOLINK = re.compile(r"(?:https?|ftp)://|www\.|mailto:|[-.\w+]+@[-\w]+(?:\.[-\w]+)+", re.I)


def links(markdown: str) -> list[str]:
    """The link-making pieces of one markdown source (empty when it renders as plain text)."""
    resolved = re.sub(r"\\(.)", r"\1", markdown)
    return _MD_LINK.findall(markdown) + _AUTOLINK.findall(resolved)


def _markdown_sources(at: AppTest) -> list[str]:
    """Every string the page hands to Streamlit's markdown renderer."""
    out: list[str] = []
    for kind in ("markdown", "caption", "title", "header", "subheader", "error", "warning", "info", "success"):
        out += [str(e.value) for e in at.get(kind)]
    for metric in at.metric:
        out += [str(metric.label), str(metric.proto.help or "")]
    for image in at.image:
        out += [str(c) for c in image.captions]
    return out


def test_links_checker_sees_what_gfm_links() -> None:
    assert all(links(p) for p in PAYLOADS)
    assert not links("effect on loss; rank 3 of 1257 · schema v4")


@pytest.mark.parametrize(
    ("page", "params"),
    [
        ("views/explore.py", {"tab": "Proponents and opponents"}),
        ("views/explore.py", {"tab": "Stage effects"}),
        ("views/explore.py", {"tab": "Per-checkpoint contributions"}),
        ("views/overview.py", {}),
        ("views/stages.py", {}),
        ("views/stages.py", {"behaviour": PAYLOADS[0], "slice": PAYLOADS[4]}),
        ("views/lifecycle.py", {"sample": "sample"}),
        ("views/lifecycle.py", {"sample": "test"}),
        ("views/quality.py", {}),
        ("views/audit.py", {}),
    ],
)
def test_no_recorded_text_becomes_a_link(
    hostile_run: tuple[Path, dict[str, int]], page: str, params: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    run, ids = hostile_run
    params = {k: str(ids[v]) if k == "sample" else v for k, v in params.items()}
    if page == "views/explore.py":
        params["test"] = str(ids["test"])
    at = open_page(run, page, monkeypatch, **params)
    if page == "views/audit.py":
        at.button(key="verify_ledger").click().run()
        assert not at.exception, at.exception
        assert "Ledger check failed" in at.error[0].value
    sources = _markdown_sources(at)
    assert sources
    assert [(s, links(s)) for s in sources if links(s)] == []
    shown = " ".join(plain(s) for s in sources)
    expect = {
        "views/overview.py": [f"Run {PAYLOADS[0]}", PAYLOADS[1]],  # the name, the checkpoint rule
        "views/stages.py": [f"method {PAYLOADS[0]}"],
        "views/lifecycle.py": ["source: "],
    }.get(page, [])
    for text in expect:
        assert text in shown, (text, shown)


def test_a_markdown_link_in_a_run_name_reads_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fgtrac_core.tracking import Run

    for i, name in enumerate(PAYLOADS):
        Run.create(tmp_path / f"run{i}", name=name).close()
        at = open_page(tmp_path / f"run{i}", "views/overview.py", monkeypatch)
        title = at.title[0].value
        assert plain(title) == f"Run {name}" and not links(title)
        assert at.title[0].proto.hide_anchor  # no heading anchor (a link) built from the name
