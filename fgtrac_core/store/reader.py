"""Read-only queries over a run's published snapshot, shared by the CLI and the app.

Readers never open the live database: DuckDB lets one process write or many read, and a reader on the live file
would block the recorder.  Each query runs on its own cursor, so one `RunStore` can serve several threads.

The dashboard's per-example queries must not scan the million-row tables (samples, sample_annotations,
self_influence, batch_samples) on every rerun.  Samples are looked up by a literal id list (`_ids_in`), which
DuckDB answers from the primary key's index; annotations have no single-column index, so the ids marked by an
annotation are read once per snapshot (`marked_ids`) and the lists join against that set.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pandas as pd

from fgtrac_core import sample_display
from fgtrac_core.errors import CorruptRunError, RunNotFoundError, UnknownSampleError
from fgtrac_core.ledger import SignedTreeHead
from fgtrac_core.store.db import connect, first_line
from fgtrac_core.store.layout import RunLayout
from fgtrac_core.store.usage_index import UsageIndex, read_usage_index

# the boolean annotation that marks a sample as suspect unless a reader picks another
DEFAULT_MARK = "label_flipped"
# the usual cause of a stage that trained at lr 0 throughout (`RunStore.idle_stages`), for messages
IDLE_STAGE_HINT = (
    "was a new scheduler built on an optimizer whose rate an earlier stage annealed to 0? torch's schedulers "
    "start from the optimizer's current lr"
)


def recorded_precision(autocast: str | None) -> tuple[dict[str, str] | None, str | None]:
    """A stage's ``stages.autocast`` (JSON) read back, as (the ``torch.autocast`` its training forwards ran under,
    ``{"device_type", "dtype"}`` or None; the same in words: ``"full"``, ``"autocast bfloat16 (cpu)"``, or None where
    the stage did not end normally and nothing was recorded).  CorruptRunError for anything else (an altered
    snapshot: `fgtrac verify` names the row)."""
    if autocast is None or pd.isna(autocast):
        return None, None
    try:
        seen = json.loads(autocast)
        if seen is None:
            return None, "full"
        seen = {"device_type": str(seen["device_type"]), "dtype": str(seen["dtype"])}
    except (ValueError, TypeError, KeyError):
        raise CorruptRunError(f"stages.autocast holds {autocast!r}, not a recorded precision (run fgtrac verify)") from None
    return seen, f"autocast {seen['dtype']} ({seen['device_type']})"


class RunStore:
    """A read-only view of one run (its latest published snapshot)."""

    def __init__(self, run_dir: str | Path) -> None:
        self.layout = RunLayout.of(run_dir)
        if not self.layout.root.is_dir():
            raise RunNotFoundError(f"no run directory at {self.layout.root}")
        if not self.layout.snapshot_db.exists() and not self.layout.live_db.exists():
            raise RunNotFoundError(f"{self.layout.root} holds no fgtrac run")
        self._con = connect(self.layout.snapshot_db, read_only=True)
        self.snapshot_mtime = self.layout.snapshot_db.stat().st_mtime
        # annotation key -> ids annotated true: the snapshot never changes under an open store, so one scan each
        self._marked: dict[str, frozenset[int]] = {}

    def close(self) -> None:
        self._con.close()

    def __enter__(self) -> RunStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ plumbing
    @contextmanager
    def _cursor(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A cursor of its own for one read (so that threads may share the store); DuckDB errors become
        CorruptRunError."""
        try:
            with self._con.cursor() as cur:
                yield cur
        except duckdb.Error as exc:
            raise CorruptRunError(f"{self.layout.snapshot_db} is damaged ({first_line(exc)})") from None

    def df(self, sql: str, params: list[Any] | None = None) -> pd.DataFrame:
        """Run a read-only query and return a DataFrame (errors become CorruptRunError)."""
        with self._cursor() as cur:
            return cur.execute(sql, params or []).df()

    def _rows(self, sql: str, params: list[Any] | None = None) -> list[tuple]:
        with self._cursor() as cur:
            return cur.execute(sql, params or []).fetchall()

    def _numpy(self, sql: str, params: list[Any] | None = None) -> dict[str, np.ndarray]:
        """Column name -> NumPy array of a read-only query's result (for large results: no per-row objects)."""
        with self._cursor() as cur:
            return {k: np.asarray(v) for k, v in cur.execute(sql, params or []).fetchnumpy().items()}

    def is_stale(self) -> bool:
        """True when the live database changed after this snapshot (recording in progress or interrupted)."""
        live = self.layout.live_db
        wal = live.with_name(live.name + ".wal")
        newest = max((p.stat().st_mtime for p in (live, wal) if p.exists()), default=0.0)
        return newest > self.snapshot_mtime + 1.0

    # ------------------------------------------------------------------ run level
    def meta(self) -> dict[str, str]:
        return dict(self._rows("SELECT key, value FROM meta"))

    def _closed_at(self) -> str | None:
        """When the last recording session closed; None while recording or after a crash."""
        row = self._rows("SELECT closed_at FROM run_sessions ORDER BY session_id DESC LIMIT 1")
        return row[0][0].isoformat() if row and row[0][0] is not None else None

    def stages(self) -> pd.DataFrame:
        """One row per stage: optimizer, hyperparameters (JSON), step range, #steps, #batches, #sample uses, and
        `precision`: what its training forwards ran under, in words (`recorded_precision`)."""
        df = self.df(
            """SELECT s.stage_id, s.name, s.optimizer, s.start_step, s.end_step, s.status,
                      count(b.batch_id) AS n_batches, count(DISTINCT b.step) AS n_steps,
                      coalesce(sum(b.n_samples), 0) AS n_sample_uses,
                      min(b.lr) AS lr_min, max(b.lr) AS lr_max, s.hparams, s.lr_schedule,
                      s.started_at, s.ended_at, s.autocast
               FROM stages s LEFT JOIN batches b USING (stage_id)
               GROUP BY ALL ORDER BY s.stage_id"""
        )
        df["precision"] = [recorded_precision(a)[1] for a in df["autocast"].tolist()]
        return df

    def checkpoints(self) -> pd.DataFrame:
        return self.df(
            """SELECT c.checkpoint_id, c.step, s.name AS stage, c.epoch, c.kind, c.lr, c.val_loss, c.metrics,
                      c.optimizer, c.path, c.sha256, c.size_bytes, c.created_at
               FROM checkpoints c LEFT JOIN stages s USING (stage_id) ORDER BY c.checkpoint_id"""
        )

    def batches(self) -> pd.DataFrame:
        """Per-batch records (step, stage, epoch, lr, loss, size), in recording order."""
        return self.df(
            """SELECT b.batch_id, b.step, s.name AS stage, b.epoch, b.lr, b.loss, b.n_samples
               FROM batches b JOIN stages s USING (stage_id) ORDER BY b.batch_id"""
        )

    def transforms(self) -> pd.DataFrame:
        return self.df(
            """SELECT t.transform_id, t.name, t.params, t.n_samples, s.name AS stage, t.logged_at
               FROM transforms t LEFT JOIN stages s USING (stage_id) ORDER BY t.transform_id"""
        )

    def split_counts(self) -> dict[str, int]:
        return dict(self._rows("SELECT split, count(*) FROM samples GROUP BY split ORDER BY split"))

    def summary(self) -> dict[str, Any]:
        """Everything `fgtrac info` reports, as plain JSON-able data."""
        meta = self.meta()
        totals = self._rows(
            "SELECT count(*), count(DISTINCT step), coalesce(sum(n_samples), 0) FROM batches"
        )[0]
        stages = self.stages()
        ckpts = self.checkpoints()
        lr_ranges = self.applied_lr_ranges()
        seeded = {int(sid) for (sid,) in self._rows(
            "SELECT DISTINCT stage_id FROM optimizer_steps WHERE forward_seeds IS NOT NULL"
        )}  # fmt: skip
        return {
            "run_dir": str(self.layout.root),
            "run_id": meta.get("run_id"),
            "name": meta.get("name"),
            "schema_version": int(meta["schema_version"]),
            "created_at": meta.get("created_at"),
            "closed_at": self._closed_at(),
            "config": json.loads(meta.get("config", "{}")),
            "snapshot_stale": self.is_stale(),
            "samples": self.split_counts(),
            "n_batches": int(totals[0]),
            "n_steps": int(totals[1]),
            "n_sample_uses": int(totals[2]),
            "stages": [
                {
                    "name": r.name,
                    "optimizer": r.optimizer,
                    "status": r.status,
                    "start_step": int(r.start_step),
                    "end_step": None if pd.isna(r.end_step) else int(r.end_step),
                    "n_steps": int(r.n_steps),
                    "n_batches": int(r.n_batches),  # more than n_steps: gradient accumulation
                    "n_sample_uses": int(r.n_sample_uses),
                    # the recorder reseeded the model's training forwards (dropout), so replay redraws them
                    "forward_seeds": int(r.stage_id) in seeded,
                    # over every step and param group, as applied; None without recorded optimizer steps
                    "lr_applied": list(lr_ranges[int(r.stage_id)]) if int(r.stage_id) in lr_ranges else None,
                    "idle": lr_ranges.get(int(r.stage_id), (None, None))[1] == 0.0,  # as `idle_stages`
                    "device": json.loads(r.hparams).get("device"),  # where it trained; None: not recorded
                    # the torch.autocast its training forwards ran under ({"device_type", "dtype"}; None: full
                    # precision, or not recorded: `precision` says which)
                    "autocast": autocast,
                    "precision": precision,
                }
                for r, (autocast, precision) in zip(
                    stages.itertuples(), map(recorded_precision, stages["autocast"].tolist()), strict=True
                )
            ],
            "checkpoints": [
                {
                    "checkpoint_id": int(r.checkpoint_id),
                    "step": int(r.step),
                    "stage": r.stage,
                    "kind": r.kind,
                    "lr": None if pd.isna(r.lr) else float(r.lr),
                    "val_loss": None if pd.isna(r.val_loss) else float(r.val_loss),
                    "path": r.path,
                    "sha256": r.sha256,
                }
                for r in ckpts.itertuples()
            ],
            "transforms": [
                {"name": r.name, "params": json.loads(r.params), "n_samples": int(r.n_samples)}
                for r in self.transforms().itertuples()
            ],
        }

    # ------------------------------------------------------------------ sample level
    def sample(self, sample_id: int) -> dict[str, Any]:
        """A sample's registration record (with `display`: its text or feature mapping, or None) and its
        annotations (JSON values, read back with their types); raises UnknownSampleError."""
        keys = ("sample_id", "split", "label", "content_sha256", "thumbnail_sha256", "display", "source",
                "registered_at")  # fmt: skip
        rows = self._rows(f"SELECT {', '.join(keys)} FROM samples WHERE sample_id = ?", [int(sample_id)])
        if not rows:
            raise UnknownSampleError(f"sample id {sample_id} is not in this run")
        out = dict(zip(keys, rows[0], strict=True))
        out["registered_at"] = out["registered_at"].isoformat()
        out["display"] = sample_display.decode(out["display"])
        out["annotations"] = {
            key: _annotation(value)
            for key, value in self._rows(
                "SELECT key, value FROM sample_annotations WHERE sample_id = ? ORDER BY key", [int(sample_id)]
            )
        }
        return out

    def sample_usage(self, sample_id: int) -> pd.DataFrame:
        """When was the sample used: one row per use (step, epoch, stage, lr, every param group's lr where they
        differed, batch loss, position in batch, and the target it was trained on when the loop logged targets,
        else NULL: the registered label)."""
        self.sample(sample_id)
        return self.df(
            """SELECT b.step, b.epoch, s.name AS stage, b.lr, b.group_lrs, b.loss, bs.position, b.batch_id, bs.target
               FROM batch_samples bs JOIN batches b USING (batch_id) JOIN stages s USING (stage_id)
               WHERE bs.sample_id = ? ORDER BY b.batch_id""",
            [int(sample_id)],
        )

    def sample_relabels(self, sample_id: int) -> list[dict[str, Any]]:
        """Lifecycle events where the target a sample was trained on changed: from the registered label, or from
        the target of its previous use (``{"step", "stage", "from", "to"}``, in step order)."""
        label = self.sample(sample_id)["label"]
        usage = self.sample_usage(sample_id)
        events, current = [], label
        for u in usage.itertuples():
            used = label if pd.isna(u.target) else int(u.target)
            if used != current:
                events.append({"step": int(u.step), "stage": u.stage, "from": current, "to": used})
                current = used
        return events

    def sample_transforms(self, sample_id: int) -> pd.DataFrame:
        """The preprocessing applied to a sample, in recording order."""
        return self.df(
            """SELECT t.transform_id, t.name, t.params, t.logged_at
               FROM transform_samples ts JOIN transforms t USING (transform_id)
               WHERE ts.sample_id = ? ORDER BY t.transform_id""",
            [int(sample_id)],
        )

    def thumbnail(self, sample_id: int) -> bytes | None:
        rows = self._rows("SELECT thumbnail FROM samples WHERE sample_id = ?", [int(sample_id)])
        if not rows:
            raise UnknownSampleError(f"sample id {sample_id} is not in this run")
        return rows[0][0]

    def samples(self, split: str | None = None) -> pd.DataFrame:
        """Sample registrations without thumbnails, optionally for one split."""
        where, params = ("WHERE split = ?", [split]) if split else ("", [])
        return self.df(
            f"""SELECT sample_id, split, label, content_sha256, source FROM samples {where}
                ORDER BY sample_id""",
            params,
        )

    # ------------------------------------------------------------------ analyses (influence, stages)
    def analyses(self, kind: str | None = None) -> pd.DataFrame:
        """Stored analyses, newest last: id, kind ('influence' | 'stages'), method, params and checkpoints
        (JSON), result row count, compute time."""
        where, params = ("WHERE kind = ?", [kind]) if kind else ("", [])
        return self.df(
            f"""SELECT analysis_id, kind, method, params, checkpoints, n_rows, seconds, created_at
                FROM analyses {where} ORDER BY analysis_id""",
            params,
        )

    def latest_analysis(self, kind: str) -> dict[str, Any] | None:
        """The newest analysis of `kind` with params and checkpoints decoded, or None."""
        df = self.analyses(kind)
        return None if df.empty else _decoded(df.iloc[-1])

    def analysis(self, analysis_id: int, kind: str) -> dict[str, Any] | None:
        """Analysis `analysis_id` if it is of `kind`, params and checkpoints decoded; else None."""
        df = self.analyses(kind)
        df = df[df["analysis_id"] == int(analysis_id)]
        return None if df.empty else _decoded(df.iloc[0])

    def influence_tests(self, analysis_id: int) -> pd.DataFrame:
        """Per test example of an influence analysis: recorded label, prediction, confidence, loss."""
        return self.df(
            """SELECT sample_id, label, prediction, confidence, loss, prediction <> label AS misclassified
               FROM influence_tests WHERE analysis_id = ? ORDER BY sample_id""",
            [int(analysis_id)],
        )

    def influence_topk(
        self, analysis_id: int, test_id: int, view: str = "raw", mark: str = DEFAULT_MARK
    ) -> pd.DataFrame:
        """Ranked proponents and opponents of one test example (`view` 'raw' or 'cosine' is the ranking), with
        each training sample's recorded label and `flagged`: its boolean annotation `mark` is true;
        `contributions` maps checkpoint id -> its part of the raw score."""
        ranked = self.df(
            """SELECT direction, rank, train_id, score, cosine, contributions FROM influence_topk
               WHERE analysis_id = ? AND test_id = ? AND view = ? ORDER BY direction DESC, rank""",
            [int(analysis_id), int(test_id), view],
        )
        return self._with_labels_and_marks(ranked, "train_id", mark)

    def self_influence(self, analysis_id: int, mark: str = DEFAULT_MARK, limit: int | None = None) -> pd.DataFrame:
        """Training samples' self-influence, highest first (the `limit` highest, or all), with label and `flagged`
        (see `influence_topk`)."""
        where, params = ("AND rank <= ?", [int(limit)]) if limit is not None else ("", [])
        ranked = self.df(
            f"""SELECT rank, sample_id, value FROM self_influence WHERE analysis_id = ? {where} ORDER BY rank""",
            [int(analysis_id), *params],
        )
        return self._with_labels_and_marks(ranked, "sample_id", mark)

    def self_influence_count(self, analysis_id: int) -> int:
        """How many training samples an influence analysis ranked by self-influence."""
        return int(self._rows("SELECT count(*) FROM self_influence WHERE analysis_id = ?", [int(analysis_id)])[0][0])

    def marked_ids(self, mark: str = DEFAULT_MARK) -> frozenset[int]:
        """Ids of the samples whose annotation `mark` is true: one scan of the annotations per open snapshot."""
        if mark not in self._marked:
            rows = self._rows("SELECT sample_id FROM sample_annotations WHERE key = ? AND value = 'true'", [mark])
            self._marked[mark] = frozenset(int(i) for (i,) in rows)
        return self._marked[mark]

    def _with_labels_and_marks(self, frame: pd.DataFrame, id_column: str, mark: str) -> pd.DataFrame:
        """`frame` with `label` (recorded label of the sample in `id_column`), `flagged` and `trained_as` (the
        targets it was trained on other than its label, see `trained_targets`) columns added."""
        ids = sorted({int(i) for i in frame[id_column]})
        known = self.labels_and_marks(ids, mark).set_index("sample_id")
        trained = self.trained_targets(ids)
        known["trained_as"] = [trained.get(int(i), []) for i in known.index]
        out = frame.join(known, on=id_column, how="inner")
        return out.reset_index(drop=True)

    def trained_targets(self, sample_ids: list[int]) -> dict[int, list[int]]:
        """Per sample (of these), the targets the loop trained it on that differ from its registered label
        (`log_batch(targets=...)`), in the order of their first use; samples never relabelled are left out."""
        where, params = _ids_in("bs.sample_id", sample_ids)
        rows = self._rows(
            f"""SELECT bs.sample_id, bs.target FROM batch_samples bs JOIN samples s USING (sample_id)
                WHERE {where} AND bs.target IS NOT NULL AND bs.target IS DISTINCT FROM s.label
                GROUP BY bs.sample_id, bs.target ORDER BY bs.sample_id, min(bs.batch_id)""",
            params,
        )
        out: dict[int, list[int]] = {}
        for sample_id, target in rows:
            out.setdefault(int(sample_id), []).append(int(target))
        return out

    def marks(self) -> list[str]:
        """Annotation keys whose values are all booleans: what the dashboard can mark samples as suspect by."""
        return [
            key
            for (key,) in self._rows(
                """SELECT key FROM sample_annotations GROUP BY key
                   HAVING bool_and(value IN ('true', 'false')) ORDER BY key <> ?, key""",
                [DEFAULT_MARK],
            )
        ]

    def most_influenced(self, analysis_id: int, train_id: int, limit: int = 10) -> pd.DataFrame:
        """The test examples whose stored top-k lists hold this training sample (raw view), by |score|."""
        return self.df(
            """SELECT test_id, direction, rank, score FROM influence_topk
               WHERE analysis_id = ? AND train_id = ? AND view = 'raw'
               ORDER BY abs(score) DESC LIMIT ?""",
            [int(analysis_id), int(train_id), int(limit)],
        )

    def stage_effects(self, analysis_id: int, test_id: int | None = None) -> pd.DataFrame:
        """Per (test example, stage, behaviour, method) effects of a stage analysis, with stage names."""
        where, params = ("AND e.test_id = ?", [int(test_id)]) if test_id is not None else ("", [])
        return self.df(
            f"""SELECT e.method, e.behaviour, e.test_id, e.stage_id, s.name AS stage, e.value
                FROM stage_effects e JOIN stages s USING (stage_id)
                WHERE e.analysis_id = ? {where} ORDER BY e.method, e.behaviour, e.test_id, e.stage_id""",
            [int(analysis_id), *params],
        )

    def stage_aggregates(self, analysis_id: int) -> pd.DataFrame:
        return self.df(
            """SELECT g.method, g.behaviour, g.slice, g.stage_id, s.name AS stage, g.value, g.n
               FROM stage_aggregates g JOIN stages s USING (stage_id)
               WHERE g.analysis_id = ? ORDER BY g.method, g.behaviour, g.slice, g.stage_id""",
            [int(analysis_id)],
        )

    def stage_faithfulness(self, analysis_id: int) -> pd.DataFrame:
        return self.df(
            """SELECT f.* EXCLUDE (row_id, analysis_id), s.name AS stage
               FROM stage_faithfulness f LEFT JOIN stages s USING (stage_id)
               WHERE f.analysis_id = ? ORDER BY f.method, f.horizon NULLS FIRST, f.stage_id NULLS FIRST""",
            [int(analysis_id)],
        )

    # ------------------------------------------------------------------ dashboard helpers
    def thumbnails(self, sample_ids: list[int]) -> dict[int, bytes]:
        """PNG thumbnails of several samples in one query (ids without a thumbnail are left out)."""
        if not sample_ids:
            return {}
        where, params = _ids_in("sample_id", sample_ids)
        rows = self._rows(f"SELECT sample_id, thumbnail FROM samples WHERE {where} AND thumbnail IS NOT NULL", params)
        return {int(i): bytes(t) for i, t in rows}

    def _applied_lr(self) -> list[tuple[int, str, int, float, float]]:
        """(stage id, name, optimizer steps, min lr, max lr) of every stage with recorded optimizer steps, the
        rates over every step and param group, from the recorded hyperparameters (which hold each group's lr at
        a stage's first step and whenever it changed)."""
        rows = self._rows(
            r"""WITH steps AS (SELECT stage_id, count(*) AS n FROM optimizer_steps GROUP BY stage_id),
                    rates AS (SELECT stage_id,
                                     unnest(regexp_extract_all(hparams, '"lr":([-0-9.eE+]+)', 1))::DOUBLE AS v
                              FROM optimizer_steps)
               SELECT s.stage_id, s.name, steps.n, min(rates.v), max(rates.v)
               FROM stages s JOIN steps USING (stage_id) JOIN rates USING (stage_id)
               GROUP BY ALL ORDER BY s.stage_id"""
        )
        return [(int(sid), name, int(n), float(lo), float(hi)) for sid, name, n, lo, hi in rows]

    def applied_lr_ranges(self) -> dict[int, tuple[float, float]]:
        """Per stage id with recorded optimizer steps: (min, max) of the learning rate its steps applied, over
        every step and param group."""
        return {sid: (lo, hi) for sid, _, _, lo, hi in self._applied_lr()}

    def idle_stages(self) -> list[tuple[str, int]]:
        """(name, steps) of every stage whose optimizer steps all applied learning rate 0 in every param group:
        it did not move the parameters (a fresh scheduler on an optimizer whose rate an earlier stage annealed
        to 0 does this silently: torch's CosineAnnealingLR starts from the optimizer's current lr)."""
        return [(name, n) for _, name, n, _, hi in self._applied_lr() if hi == 0.0]

    def incomplete_stages(self) -> list[tuple[str, str]]:
        """(name, status) of every stage whose status is not ``done`` (failed, interrupted, running), in order."""
        return [tuple(r) for r in self._rows("SELECT name, status FROM stages WHERE status <> 'done' ORDER BY stage_id")]

    def uses_in_steps(self, sample_id: int, spans: list[tuple[int | None, int | None]]) -> list[int]:
        """How many times a sample was used in each inclusive step span (first, last); 0 for an empty span
        (None bounds): e.g. the steps each influence checkpoint stands for."""
        lo = [-1 if a is None else int(a) for a, _ in spans]
        hi = [-2 if b is None else int(b) for _, b in spans]
        rows = dict(
            self._rows(
                """WITH spans AS (SELECT unnest(range(?)) AS i, unnest(?::BIGINT[]) AS lo, unnest(?::BIGINT[]) AS hi)
                   SELECT spans.i, count(b.step) FROM spans
                   LEFT JOIN (SELECT b.step FROM batch_samples bs JOIN batches b USING (batch_id)
                              WHERE bs.sample_id = ?) b ON b.step BETWEEN spans.lo AND spans.hi
                   GROUP BY spans.i""",
                [len(spans), lo, hi, int(sample_id)],
            )
        )
        return [int(rows.get(i, 0)) for i in range(len(spans))]

    def labels_and_marks(self, sample_ids: list[int], mark: str = DEFAULT_MARK) -> pd.DataFrame:
        """sample_id, recorded label and `flagged` (boolean annotation `mark` is true) of these samples."""
        where, params = _ids_in("sample_id", sample_ids)
        known = self.df(f"SELECT sample_id, label FROM samples WHERE {where} ORDER BY sample_id", params)
        known["flagged"] = known["sample_id"].isin(self.marked_ids(mark)).astype(bool)
        return known

    def feature_spread(self, split: str = "train") -> dict[str, float]:
        """Each numeric display feature's standard deviation (population) over a split's samples: the scale the
        dashboard measures "differs from the test example" in.  Empty when no sample records features."""
        return {
            key: float(std)
            for key, std in self._rows(
                """SELECT j.key, stddev_pop(TRY_CAST(j.value AS DOUBLE)) FROM samples s,
                          json_each(s.display, '$.features') j
                   WHERE s.split = ? AND s.display IS NOT NULL AND json_valid(s.display)
                   GROUP BY j.key HAVING count(TRY_CAST(j.value AS DOUBLE)) > 0""",
                [split],
            )
            if std is not None
        }

    def displays(self, sample_ids: list[int]) -> dict[int, sample_display.Display]:
        """What `register_samples(display=...)` recorded for these samples (text or feature mapping), in one
        query; ids without one are left out."""
        if not sample_ids:
            return {}
        where, params = _ids_in("sample_id", sample_ids)
        rows = self._rows(f"SELECT sample_id, display FROM samples WHERE {where} AND display IS NOT NULL", params)
        return {int(i): sample_display.decode(d) for i, d in rows}

    def usage_index(self, ledger_size: int) -> UsageIndex:
        """The usage index over the first `ledger_size` ledger entries (`fgtrac_core.store.usage_index`)."""
        with self._cursor() as cur:
            return read_usage_index(cur, ledger_size)

    def latest_tree_head(self) -> SignedTreeHead:
        """The latest signed tree head (largest, then newest); CorruptRunError when there is none or it is
        malformed (its signature is not checked here: `verify` and whoever keeps it do that)."""
        rows = self._rows(
            "SELECT run_id, tree_size, root, chain_head, timestamp, key_fingerprint, signature FROM tree_heads "
            "ORDER BY tree_size DESC, sth_id DESC LIMIT 1"
        )
        if not rows:
            raise CorruptRunError(f"{self.layout.root} has no signed tree head")
        keys = ("run_id", "tree_size", "root", "chain_head", "timestamp", "key_fingerprint", "signature")
        try:
            return SignedTreeHead.from_json_dict(dict(zip(keys, rows[0], strict=True)))
        except ValueError as exc:
            raise CorruptRunError(f"{self.layout.snapshot_db}: {first_line(exc)}") from None

    def signing(self) -> dict[str, Any]:
        """The ledger at a glance: entry count, the latest signed tree head and the recorded signer key."""
        meta = self.meta()
        n_entries = self._rows("SELECT count(*) FROM ledger")[0][0]
        head = self._rows(
            "SELECT tree_size, timestamp, key_fingerprint FROM tree_heads ORDER BY tree_size DESC, sth_id DESC"
            " LIMIT 1"
        )
        return {
            "n_entries": int(n_entries),
            "tree_size": int(head[0][0]) if head else None,
            "signed_at": head[0][1] if head else None,
            "head_fingerprint": head[0][2] if head else None,
            "signer_fingerprint": meta.get("signer_fingerprint"),
        }

    def influence_accuracy(self, analysis_id: int) -> dict[str, Any]:
        """The analysed model's test accuracy as stored with an influence analysis."""
        n, wrong = self._rows(
            "SELECT count(*), count(*) FILTER (WHERE prediction <> label) FROM influence_tests WHERE analysis_id = ?",
            [int(analysis_id)],
        )[0]
        return {"n_test": int(n), "n_misclassified": int(wrong), "accuracy": (n - wrong) / n if n else None}

    def self_influence_of(self, analysis_id: int, sample_id: int) -> dict[str, Any] | None:
        """One training sample's self-influence and its rank among the analysis' training samples, or None."""
        rows = self._rows(
            """SELECT value, rank, (SELECT count(*) FROM self_influence WHERE analysis_id = ?)
               FROM self_influence WHERE analysis_id = ? AND sample_id = ?""",
            [int(analysis_id), int(analysis_id), int(sample_id)],
        )
        if not rows:
            return None
        value, rank, n = rows[0]
        return {"value": float(value), "rank": int(rank), "n_train": int(n)}

    def mislabel_detection(
        self,
        analysis_id: int,
        fractions: tuple[float, ...] = (0.05, 0.10, 0.20),
        mark: str = DEFAULT_MARK,
    ) -> pd.DataFrame | None:
        """Precision and recall of "inspect the top fraction by self-influence" against the samples whose
        boolean annotation `mark` is true (unannotated samples count as clean); None when none is recorded.

        The ranking is read as two columns and matched against `marked_ids` (read once per snapshot) rather than
        joined with the annotations: at a million samples the join took 0.07-0.2 s."""
        annotated = self._rows("SELECT count(*) FROM (SELECT 1 FROM sample_annotations WHERE key = ? LIMIT 1)", [mark])
        if not annotated[0][0]:
            return None
        ranking = self._numpy("SELECT sample_id, rank FROM self_influence WHERE analysis_id = ?", [int(analysis_id)])
        if not len(ranking["rank"]):
            return None
        # stored highest first, so this stable sort finds the order already in place
        ids = ranking["sample_id"][np.argsort(ranking["rank"], kind="stable")]
        marked = np.fromiter(self.marked_ids(mark), np.int64)
        found = np.cumsum(np.isin(ids, marked))
        n_flipped = int(found[-1])
        rows = []
        for fraction in fractions:
            inspected = max(1, round(fraction * len(ids)))
            hits = int(found[inspected - 1])
            rows.append(
                {
                    "inspected_fraction": fraction,
                    "inspected": inspected,
                    "flipped_found": hits,
                    "flipped_total": n_flipped,
                    "precision": hits / inspected,
                    "recall": hits / n_flipped if n_flipped else None,
                }
            )
        return pd.DataFrame(rows)


def _ids_in(column: str, ids: list[int]) -> tuple[str, list[int]]:
    """`column IN (?, ?, ...)` over these ids, and its parameters.  A literal list is planned as a scan filter that
    DuckDB answers from the primary key's index (up to its `index_scan_max_count`, 2,048 ids), visibly in EXPLAIN;
    a list passed as one array parameter or a subquery reached the index too in DuckDB 2.0.1, but only through the
    semi join's runtime filter, which the plan does not promise.  No ids: a condition that holds for no row."""
    unique = sorted({int(i) for i in ids})
    if not unique:
        return "false", []
    return f"{column} IN ({', '.join('?' * len(unique))})", unique


def _decoded(row: pd.Series) -> dict[str, Any]:
    out = row.to_dict()
    out["params"], out["checkpoints"] = json.loads(out["params"]), json.loads(out["checkpoints"])
    out["analysis_id"] = int(out["analysis_id"])
    return out


def _annotation(stored: str | None) -> Any:
    """An annotation's value with its JSON type; stored text that is not JSON (an edited run) reads as text."""
    try:
        return None if stored is None else json.loads(stored)
    except json.JSONDecodeError:
        return stored
