"""The recorder a training loop calls: samples, transforms, stages, batches and checkpoints, into DuckDB.

Usage (see README for a complete loop)::

    run = Run.create("runs/exp1", name="exp1")
    run.register_samples(ids, split="train", labels=y, raw=x_raw, thumbnails=images)
    with run.stage("pretrain", optimizer=opt, model=model):
        for step, (ids, x, y) in enumerate(loader):
            ...
            run.log_batch(ids, step=step, epoch=epoch, loss=loss)
        run.checkpoint(model, opt, val_loss=val)
    run.close()

Conventions:
  * The recorder numbers optimizer steps itself (0-based, globally across stages and epochs) from hooks on the
    stage's optimizer (`fgtrac_core.tracking.optimizer_hooks`), which also record every param group's
    hyperparameters as applied, gradient clipping and a parameter fingerprint per step (`optimizer_steps`).
    ``step`` of a batch is the optimizer step it was used for: a ``log_batch`` right after a step that has no
    batch yet belongs to that step (log after ``optimizer.step()``), otherwise to the next step (log before it;
    gradient accumulation: several batches share a step).  With accumulation, a step whose batches were each
    logged after their backward, and whose last backward has no batch yet, takes the batch logged right after it
    (before any further backward): a loop whose log_batch ends its body.  A ``step=`` given by the loop is only
    checked never to go backwards.
  * ``step`` of a checkpoint is the number of optimizer steps completed when it was taken, so checkpoint step s
    holds the parameters *before* the update of batch step s.
  * Batches are buffered in memory and committed in one Arrow insert at every checkpoint, stage boundary, at
    ``flush()``, ``close()``, and whenever ``flush_every`` sample rows are pending.  What is committed survives a
    crash (DuckDB's WAL).  A tree head is signed at every checkpoint, stage end and close; a snapshot for readers
    is published after them, spaced (at most every ``MIN_PUBLISH_GAP_S``, see `fgtrac_core.tracking._writer`),
    and at once at ``flush()``, ``publish()`` and ``close()``.
  * The slow part (serialising checkpoints, fsync, inserts, ledger entries, signing, snapshots) runs on a
    background writer, in order; the training thread only validates, copies checkpoint tensors and enqueues.  The
    writer is a thread of this process, or with ``writer="process"`` a child process that holds the database
    (`fgtrac_core.tracking._writer_process`; a thread here still serialises checkpoints).  ``flush()`` and
    ``publish()`` wait for the writer, ``close()`` drains it.  A background failure is raised at the next call.
"""

from __future__ import annotations

import atexit
import hashlib
import io
import itertools
import operator
import os
import uuid
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import torch

from fgtrac_core import sample_display
from fgtrac_core._json import canonical_json, to_jsonable
from fgtrac_core.errors import (
    FgtracError,
    RecorderStateError,
    RunExistsError,
    RunNotFoundError,
    SigningKeyError,
    TamperedRunError,
    UnknownSampleError,
)
from fgtrac_core.ledger import (
    KeyFileError,
    MissingKeyError,
    default_key_dir,
    fingerprint,
    load_or_create_signing_key,
    load_public_key,
    load_signing_key,
    public_key_pem,
)
from fgtrac_core.ledger.kinds import RESULT_TABLES
from fgtrac_core.store.db import connect, discard_unfinished_create, insert_arrow
from fgtrac_core.store.layout import RunLayout
from fgtrac_core.store.ledger_log import Rows, Touched
from fgtrac_core.store.run_files import remove_stale_temporaries, write_file_atomic
from fgtrac_core.store.schema import create_schema
from fgtrac_core.tracking._commits import (
    Committer,
    Execute,
    Insert,
    LocalWriter,
    LookupIndexes,
    Operation,
    Transaction,
    UsageIndexRow,
)
from fgtrac_core.tracking._device import fetch_to_host
from fgtrac_core.tracking._writer_process import ProcessWriter
from fgtrac_core.tracking.autocast import AutocastProbe
from fgtrac_core.tracking.forward_seeds import ForwardSeeds, random_modules
from fgtrac_core.tracking.optimizer_hooks import (
    StepBuffer,
    StepFacts,
    StepHooks,
    optimizer_params,
    trained_on,
)
from fgtrac_core.tracking.thumbnails import as_png_list
from fgtrac_core.verify import check_before_write

CHECKPOINT_FORMAT = "fgtrac-checkpoint/1"
CHECKPOINT_KINDS = ("periodic", "stage_start", "stage_end")
WRITERS = ("thread", "process")
_LOCK_WAIT_S = 2.0


def _now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def _as_ids(values: Any, what: str = "sample ids") -> np.ndarray:
    """`values` as a new int64 array the recorder owns: rows are written later by the writer thread, and a loop
    may reuse what it passed (a permutation shuffled in place every epoch, of which each batch is a view)."""
    if isinstance(values, torch.Tensor):  # (a CPU tensor outside autograd is read as it is: one call per batch)
        plain = values.device.type == "cpu" and not values.requires_grad
        values = values.numpy() if plain else values.detach().cpu().numpy()
    ids = np.asarray(values)
    if ids.ndim != 1 or not (ids.dtype.kind in "iu" or ids.size == 0):
        raise FgtracError(f"{what} must be a 1-D sequence of integers")
    return ids.astype(np.int64)


# integer dtypes whose values `tolist()` gives as Python ints that fit int64 (uint64 may not)
_INT_TENSOR_DTYPES = frozenset({torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8})


def _as_id_list(values: Any, what: str = "sample ids") -> list[int]:
    """`values` as a new list of Python ints (what `_as_ids` checks and converts), for `log_batch`.

    Called once or twice per training step: a 1-D CPU integer tensor or array (what loaders yield) is read with
    one C call, where the array route costs four to five NumPy calls — a few microseconds each when warm, but
    5-10x that between a backward and a step, with the caches full of the model's tensors.  Anything else goes
    through `_as_ids`."""
    kind = type(values)
    if kind is torch.Tensor and values.is_cpu and values.dtype in _INT_TENSOR_DTYPES and values.dim() == 1:
        return values.tolist()  # type: ignore[no-any-return]
    if kind is np.ndarray and values.ndim == 1 and values.dtype.kind == "i":
        return values.tolist()  # type: ignore[no-any-return]
    return _as_ids(values, what).tolist()  # type: ignore[no-any-return]


def _as_targets(targets: Any) -> list[int] | torch.Tensor:
    """One integer target per sample, owned by the recorder.  A tensor on an accelerator stays there (a clone,
    fetched at flush with the others of its device in one transfer), so logging never waits for the device."""
    if not isinstance(targets, torch.Tensor) or targets.is_cpu:
        return _as_id_list(targets, "targets")
    if targets.ndim != 1 or targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise FgtracError("targets must be a 1-D sequence of integers")
    return targets.detach().clone()


def _as_float(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return float(value.detach().float().cpu())
    try:
        return float(value)
    except (TypeError, ValueError):
        raise FgtracError(f"expected a number, not {type(value).__name__} {value!r:.40}") from None


def _as_int(value: Any, what: str) -> int | None:
    """An integer argument (None passes), else a one-line error naming it."""
    if value is None:
        return None
    try:
        return operator.index(value)
    except TypeError:
        raise FgtracError(f"{what} must be an integer, not {type(value).__name__} {value!r:.40}") from None


def _span(known: np.ndarray) -> tuple[int, int] | None:
    """(least, greatest) of sorted distinct ids when they are every integer between the two, else None."""
    if not len(known) or int(known[-1]) - int(known[0]) != len(known) - 1:
        return None
    return int(known[0]), int(known[-1])


def _sha256_rows(raw: Sequence[bytes] | np.ndarray) -> list[str]:
    """SHA-256 of each sample's raw bytes (for arrays: the C-order bytes of each row, dtype as given)."""
    if isinstance(raw, np.ndarray):
        return [hashlib.sha256(np.ascontiguousarray(row).tobytes()).hexdigest() for row in raw]
    return [hashlib.sha256(bytes(r)).hexdigest() for r in raw]


def optimizer_hparams(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Hyperparameters of every param group (without the parameters themselves)."""
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    return {"class": type(optimizer).__name__, "param_groups": to_jsonable(groups)}


@dataclass(frozen=True)
class CheckpointRecord:
    """What `Run.checkpoint` is writing: file path relative to the run and where in training.

    The file and its SHA-256 are written by the background writer; both are in the `checkpoints` table once
    committed (after `flush()`, `publish()` or `close()` at the latest).
    """

    checkpoint_id: int
    step: int
    stage: str | None
    kind: str
    path: str
    val_loss: float | None


@dataclass
class _ActiveStage:
    stage_id: int
    name: str
    optimizer: torch.optim.Optimizer
    start_step: int  # every batch of the stage has a step from here on, every earlier batch one before it
    last_lr: float | None = None
    # every param group's rate at the last step, when the groups stepped at different rates (`_group_lrs`)
    last_group_lrs: tuple[float, ...] | None = None
    hooks: StepHooks | None = None
    seeds: ForwardSeeds | None = None  # reseeds the model's training forwards (a model with dropout)
    autocast: AutocastProbe | None = None  # whether the stage's training forwards run under torch.autocast
    groups: list[dict[str, Any]] | None = None  # the hyperparameters applied at the stage's previous step
    last_step_open: bool = False  # the stage's last optimizer step has no batch yet
    # where the hooks' gradient count (`StepHooks.accumulations`) stood at the last step (or the batch logged after
    # it), at the first and at the last batch logged for the next step since: whether a backward ran before a
    # batch's log_batch tells a loop that logs after backward from one that logs before forward
    window_mark: int = 0
    first_log_mark: int | None = None
    last_log_mark: int = 0

    def mark(self) -> int:
        """The hooks' gradient count now (0 before they are attached)."""
        return self.hooks.accumulations[0] if self.hooks is not None else 0


class _BatchBuffer:
    """Column lists for pending `batches` / `batch_samples` rows; converted to Arrow once per flush."""

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self.batch_id: list[int] = []
        self.step: list[int] = []
        self.stage_id: list[int] = []
        self.epoch: list[int | None] = []
        self.lr: list[float | None] = []
        self.group_lrs: list[tuple[float, ...] | None] = []
        self.loss: list[Any] = []
        self.ids: list[list[int]] = []
        self.targets: list[list[int] | torch.Tensor | None] = []
        self.n_sample_rows = 0

    def __len__(self) -> int:
        return len(self.batch_id)

    def split(self, n_tail: int) -> tuple[_BatchBuffer, _BatchBuffer]:
        """(all rows but the last `n_tail`, the last `n_tail` rows) as two buffers."""
        head, tail = _BatchBuffer(), _BatchBuffer()
        cut = len(self) - n_tail
        for name in ("batch_id", "step", "stage_id", "epoch", "lr", "group_lrs", "loss", "ids", "targets"):
            rows = getattr(self, name)
            setattr(head, name, rows[:cut])
            setattr(tail, name, rows[cut:])
        head.n_sample_rows = sum(len(a) for a in head.ids)
        tail.n_sample_rows = sum(len(a) for a in tail.ids)
        return head, tail

    def tables(self) -> tuple[pa.Table, pa.Table]:
        sizes = np.fromiter((len(a) for a in self.ids), dtype=np.int64, count=len(self.ids))
        batches = pa.table(
            {
                "batch_id": pa.array(self.batch_id, pa.int64()),
                "step": pa.array(self.step, pa.int64()),
                "stage_id": pa.array(self.stage_id, pa.int32()),
                "epoch": pa.array(self.epoch, pa.int32()),
                "lr": pa.array(self.lr, pa.float64()),
                "group_lrs": pa.array(
                    [None if g is None else canonical_json(list(g)) for g in self.group_lrs], pa.string()
                ),
                # losses may be tensors (possibly on an accelerator): converted here, not per step
                "loss": pa.array(_host_losses(self.loss), pa.float64()),
                "n_samples": pa.array(sizes, pa.int32()),
            }
        )
        ids = np.fromiter(itertools.chain.from_iterable(self.ids), np.int64, count=int(sizes.sum()))
        starts = np.repeat(np.cumsum(sizes) - sizes, sizes)
        targets, given = np.zeros(len(ids), np.int64), np.zeros(len(ids), bool)  # NULL where none was logged
        on_device = [i for i, t in enumerate(self.targets) if isinstance(t, torch.Tensor)]
        fetched = dict(zip(on_device, fetch_to_host([self.targets[i] for i in on_device], torch.int64), strict=True))
        for i, start in enumerate((np.cumsum(sizes) - sizes).tolist()):
            t = fetched.get(i, self.targets[i])
            if t is not None:
                targets[start : start + len(t)] = t
                given[start : start + len(t)] = True
        samples = pa.table(
            {
                "batch_id": pa.array(np.repeat(np.asarray(self.batch_id, np.int64), sizes)),
                "position": pa.array((np.arange(len(ids)) - starts).astype(np.int32)),
                "sample_id": pa.array(ids),
                "target": pa.array(targets.astype(np.int32), pa.int32(), mask=~given),
            }
        )
        return batches, samples


def _host_losses(losses: Sequence[Any]) -> list[float | None]:
    """Logged losses as floats: tensors (scalars, checked when logged) fetched together, per device."""
    tensors = [i for i, x in enumerate(losses) if isinstance(x, torch.Tensor)]
    out = [None if x is None or isinstance(x, torch.Tensor) else float(x) for x in losses]
    for i, value in zip(tensors, fetch_to_host([losses[i] for i in tensors], torch.float64), strict=True):
        out[i] = float(value[0])
    return out


class Run:
    """Records one training run into a run directory (one recorder process per run).

    Create with `Run.create`, reopen for more recording (e.g. after a crash) with `Run.open`; readers use
    `fgtrac_core.store.RunStore`, which opens only the published snapshot.
    """

    def __init__(self, layout: RunLayout, con: duckdb.DuckDBPyConnection, *, flush_every: int, writer: str) -> None:
        self.layout = layout
        self._con = con
        remove_stale_temporaries(layout)  # left by a crashed recorder; we hold the live database, none is in use
        self._flush_every = flush_every
        self._buffer = _BatchBuffer()
        self._stage: _ActiveStage | None = None
        self._model: torch.nn.Module | None = None
        self._closed = False
        meta = dict(con.execute("SELECT key, value FROM meta").fetchall())
        self.run_id: str = meta["run_id"]
        self.name: str = meta["name"]
        self._known_ids = np.sort(
            con.execute("SELECT sample_id FROM samples").fetchnumpy()["sample_id"].astype(np.int64)
        )
        self._known_span = _span(self._known_ids)
        self._next_batch_id = self._scalar("SELECT coalesce(max(batch_id) + 1, 0) FROM batches")
        self._next_step = self._scalar(
            "SELECT greatest((SELECT coalesce(max(step) + 1, 0) FROM batches), "
            "(SELECT coalesce(max(step) + 1, 0) FROM optimizer_steps))"
        )
        self._last_batch_step = self._scalar("SELECT coalesce(max(step), -1) FROM batches")
        self._last_user_step = -1
        self._steps = StepBuffer()
        self._pending_lrs: list[float | None] = []  # lr= of the batches awaiting their step (the buffer's tail)
        self._deferred: str | None = None  # a refusal found inside an optimizer step, raised at the next call
        self._next_stage_id = self._scalar("SELECT coalesce(max(stage_id) + 1, 0) FROM stages")
        self._next_checkpoint_id = self._scalar("SELECT coalesce(max(checkpoint_id) + 1, 0) FROM checkpoints")
        self._next_transform_id = self._scalar("SELECT coalesce(max(transform_id) + 1, 0) FROM transforms")
        self._next_usage_index = self._scalar("SELECT coalesce(max(index_id) + 1, 0) FROM usage_indexes")
        self._stage_names = {r[0] for r in con.execute("SELECT name FROM stages").fetchall()}
        self._session_id = self._scalar("SELECT coalesce(max(session_id) + 1, 0) FROM run_sessions")
        self._next_analysis_id = self._scalar("SELECT coalesce(max(analysis_id) + 1, 0) FROM analyses")
        self._next_row_id = {t: self._scalar(f"SELECT coalesce(max(row_id) + 1, 0) FROM {t}") for t in RESULT_TABLES}
        try:
            key = _run_signing_key(meta)
        except FgtracError:
            con.close()
            raise
        self._writer: LocalWriter | ProcessWriter
        if writer == "process":
            con.close()  # the writer process opens the database: DuckDB lets one process write it
            self._writer = ProcessWriter(layout, self.run_id, key)
        else:
            self._writer = LocalWriter(Committer(con, layout.live_db, layout.snapshot_db, self.run_id, key))
        # a script that forgets close() still commits what it recorded
        atexit.register(_close_at_exit, weakref.ref(self))
        session = pa.table(
            {
                "session_id": pa.array([self._session_id], pa.int32()),
                "opened_at": pa.array([_now()], pa.timestamp("us")),
                "closed_at": pa.nulls(1, pa.timestamp("us")),
            }
        )
        # entries for run metadata (new run) and stages a crashed recorder left running (reopened run), then this
        # recording session; a signed head and snapshot follow
        self._commit(
            [Insert("run_sessions", session)],
            ["meta", "stage_end", ("session_open", self._session_id, self._session_id)],
            publish=True,
            wait=True,
        )

    # ------------------------------------------------------------------ lifecycle
    @classmethod
    def create(
        cls,
        run_dir: str | Path,
        *,
        name: str | None = None,
        config: Mapping[str, Any] | None = None,
        flush_every: int = 100_000,
        writer: str | None = None,
    ) -> Run:
        """Start a new run in `run_dir` (created if missing); refuses a directory that already holds a run.

        `config` is free-form (seed, data source, code version...) and stored as canonical JSON in `meta`.
        `writer` is where the slow part of recording runs: "thread" (a background thread of this process) or
        "process" (a child process, `fgtrac_core.tracking._writer_process`: it does not compete with the training
        loop for Python's GIL, so prefer it when the loop leaves a CPU core idle, as GPU training does; it costs
        a child interpreter, ~0.5 s to start).  Without `writer`, the environment variable `FGTRAC_WRITER`
        chooses, else "thread".
        """
        writer = _chosen_writer(writer)
        layout = RunLayout.of(run_dir)
        if layout.holds_run():
            if not layout.creating_marker.exists():
                raise RunExistsError(f"{layout.root} already holds an fgtrac run; refusing to overwrite it")
            discard_unfinished_create(layout)
        layout.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        try:
            public = load_or_create_signing_key().public_key()
        except KeyFileError as exc:
            raise SigningKeyError(str(exc)) from None
        # until the first signed commit (the end of __init__) the directory is a creation, not a run: a creation
        # killed before then is started afresh by the next Run.create instead of blocking both create and open
        write_file_atomic(layout.creating_marker, b"Run.create in progress\n")
        con = duckdb.connect(str(layout.live_db))
        create_schema(con)
        meta = {
            "run_id": uuid.uuid4().hex,
            "name": name or layout.root.name,
            "created_at": _now().isoformat(),
            "config": canonical_json(dict(config or {})),
            "torch_version": torch.__version__,
            "duckdb_version": duckdb.__version__,
            "signer_public_key": public_key_pem(public).decode(),
            "signer_fingerprint": fingerprint(public),
        }
        insert_arrow(con, "meta", pa.table({"key": list(meta), "value": list(meta.values())}))
        run = cls(layout, con, flush_every=flush_every, writer=writer)
        layout.creating_marker.unlink()
        return run

    @classmethod
    def open(cls, run_dir: str | Path, *, flush_every: int = 100_000, writer: str | None = None) -> Run:
        """Reopen a run for more recording; a stage left running by a crashed recorder is marked interrupted.

        Refuses (TamperedRunError, nothing written) unless the live database and the published snapshot still
        match their ledger (`fgtrac_core.verify.check_before_write`): whatever is appended next gets signed, and
        must not sign an edit made behind the recorder's back.  `writer` as in `Run.create`.
        """
        writer = _chosen_writer(writer)
        layout = RunLayout.of(run_dir)
        if layout.creating_marker.exists():
            raise RunNotFoundError(
                f"{layout.root} holds no run: its Run.create was interrupted before the first signed commit (nothing "
                "was recorded yet); Run.create starts it afresh"
            )
        # a writer process of a recorder that was just killed may hold the lock a moment longer
        con = connect(layout.live_db, read_only=False, wait_for_lock_s=_LOCK_WAIT_S)
        try:
            # what is appended next gets signed: first make sure the run still is what its ledger says
            meta = dict(con.execute("SELECT key, value FROM meta").fetchall())
            check_before_write(layout, con, load_public_key(meta.get("signer_public_key", "").encode()))
            _run_signing_key(meta)  # before the recovery below changes anything
        except ValueError as exc:
            con.close()
            raise TamperedRunError(f"{layout.live_db}: the recorded signer key is unusable ({exc})") from None
        except BaseException:
            con.close()
            raise
        con.execute(
            """UPDATE stages SET status = 'interrupted', ended_at = ?,
                   end_step = (SELECT max(step) FROM batches b WHERE b.stage_id = stages.stage_id)
               WHERE status = 'running'""",
            [_now()],
        )
        return cls(layout, con, flush_every=flush_every, writer=writer)

    def close(self) -> None:
        """Commit everything pending, publish the final snapshot, release the database."""
        if self._closed:
            return
        try:
            self._commit([], [])  # pending batches first: the index below covers every entry before it
            # then, in the one transaction that also signs the tail: the usage index over everything committed
            # (what proves a sample's uses complete, or its absence: fgtrac_core.ledger.usage_index), the session's
            # close and the per-sample lookup indexes (built once here rather than kept up to date by every insert).
            # A crash before it leaves the session open, so Run.open accepts the unsigned tail and recovers.
            session_id, index_id = self._session_id, self._next_usage_index
            close_session = Execute(
                ("run_sessions",), "UPDATE run_sessions SET closed_at = ? WHERE session_id = ?", (_now(), session_id)
            )
            self._commit(
                [UsageIndexRow(index_id, _now()), close_session, LookupIndexes()],
                [("usage_index", index_id, index_id), ("session_close", session_id, session_id)],
                publish=True,
            )
        finally:  # after a background failure too: the database is released (Run.open then recovers the run)
            self._closed = True
            self._writer.stop()
        if self._deferred is not None:  # found by the last optimizer step: the run is closed, the refusal stands
            message, self._deferred = self._deferred, None
            raise RecorderStateError(message)

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ samples and preprocessing
    def register_samples(
        self,
        sample_ids: Any,
        *,
        split: str,
        labels: Any = None,
        raw: Sequence[bytes] | np.ndarray | None = None,
        content_sha256: Sequence[str] | None = None,
        thumbnails: Sequence[bytes] | np.ndarray | None = None,
        thumbnail_scale: int = 1,
        display: Sequence[str | Mapping[str, Any] | None] | Any = None,
        source: str | None = None,
    ) -> None:
        """Register samples as ingested: ids, split, label and SHA-256 of the raw bytes (give `raw` or the hashes).

        `raw` may be a list of bytes (e.g. file contents) or an array whose rows are hashed as C-order bytes.
        `thumbnails` are PNG bytes or an image array (N, H, W[, C]) encoded to PNG (upscaled by
        `thumbnail_scale`).  `display` is what a reviewer sees of a sample without an image: per sample a short
        text (text data) or a mapping of feature name to value (tabular data), or a DataFrame with one row per
        sample; it is committed with the sample (`fgtrac_core.sample_display`).
        """
        self._check_open()
        ids = _as_ids(sample_ids)
        n = len(ids)
        if (raw is None) == (content_sha256 is None):
            raise FgtracError("register_samples needs exactly one of raw= or content_sha256=")
        hashes = _sha256_rows(raw) if raw is not None else [str(h).lower() for h in content_sha256]
        label_arr = None if labels is None else _as_ids(labels, "labels (class indices)")
        pngs = None if thumbnails is None else as_png_list(thumbnails, scale=thumbnail_scale)
        shown = [None] * n if display is None else sample_display.encode(display, n)
        for what, seq in (("labels", label_arr), ("raw/content_sha256", hashes), ("thumbnails", pngs)):
            if seq is not None and len(seq) != n:
                raise FgtracError(f"register_samples: {what} has {len(seq)} entries for {n} sample ids")
        if len(np.unique(ids)) != n:
            raise FgtracError("register_samples: duplicate sample ids in one call")
        clash = ids[np.isin(ids, self._known_ids)]
        if len(clash):
            raise FgtracError(f"register_samples: sample id {int(clash[0])} is already registered")
        if any(len(h) != 64 for h in hashes):
            raise FgtracError("register_samples: content_sha256 must be 64 hex characters")
        table = pa.table(
            {
                "sample_id": pa.array(ids),
                "split": pa.array([split] * n, pa.string()),
                "label": pa.array(label_arr, pa.int32())
                if label_arr is not None
                else pa.nulls(n, pa.int32()),
                "content_sha256": pa.array(hashes, pa.string()),
                "thumbnail": pa.array(pngs, pa.binary()) if pngs is not None else pa.nulls(n, pa.binary()),
                "thumbnail_sha256": pa.array(
                    [hashlib.sha256(p).hexdigest() for p in pngs] if pngs is not None else [None] * n,
                    pa.string(),
                ),
                "display": pa.array(shown, pa.string()),
                "source": pa.array([source] * n, pa.string()),
                "registered_at": pa.array([_now()] * n, pa.timestamp("us")),
            }
        )
        table = table.sort_by("sample_id")  # entries in key order, as a read-back would give them
        self._commit([Insert("samples", table)], [Rows("sample", table)])
        self._known_ids = np.union1d(self._known_ids, ids)
        self._known_span = _span(self._known_ids)

    def annotate_samples(self, sample_ids: Any, key: str, values: Sequence[Any]) -> None:
        """Attach a named value per sample (e.g. benchmark ground truth), stored as JSON so it reads back with its
        type.  No fgtrac algorithm reads these; the dashboard's data-quality page scores its ranking against a
        boolean one the reviewer picks (default `label_flipped`: true = the recorded label is known wrong)."""
        self._check_open()
        ids = self._require_known(_as_ids(sample_ids))
        if len(values) != len(ids):
            raise FgtracError(f"annotate_samples: {len(values)} values for {len(ids)} sample ids")
        table = pa.table(
            {
                "sample_id": pa.array(ids),
                "key": pa.array([key] * len(ids), pa.string()),
                "value": pa.array([None if v is None else canonical_json(v) for v in values], pa.string()),
            }
        )
        table = table.sort_by("sample_id")
        self._commit([Insert("sample_annotations", table)], [Rows("annotation", table)])

    def log_transform(self, name: str, sample_ids: Any, **params: Any) -> int:
        """Record that preprocessing `name` with `params` was applied to `sample_ids`; returns its id."""
        self._check_open()
        ids = self._require_known(_as_ids(sample_ids))
        tid = self._next_transform_id
        row = pa.table(
            {
                "transform_id": pa.array([tid], pa.int32()),
                "name": pa.array([name], pa.string()),
                "params": pa.array([canonical_json(params)], pa.string()),
                "n_samples": pa.array([len(ids)], pa.int64()),
                "stage_id": pa.array([self._stage.stage_id if self._stage else None], pa.int32()),
                "logged_at": pa.array([_now()], pa.timestamp("us")),
            }
        )
        links = pa.table(
            {"transform_id": pa.array(np.full(len(ids), tid, np.int32)), "sample_id": pa.array(np.sort(ids))}
        )
        self._commit(
            [Insert("transforms", row), Insert("transform_samples", links)], [Rows("transform", row, links)]
        )
        self._next_transform_id += 1
        return tid

    # ------------------------------------------------------------------ stages, batches, checkpoints
    def watch(self, model: torch.nn.Module) -> None:
        """Tell the recorder which model to save at stage boundaries."""
        self._model = model

    @contextmanager
    def stage(
        self,
        name: str,
        *,
        optimizer: torch.optim.Optimizer,
        scheduler: Any = None,
        model: torch.nn.Module | None = None,
        seed_forwards: bool | None = None,
        **hparams: Any,
    ) -> Iterator[Run]:
        """Mark a training stage; parameters and optimizer state are checkpointed at its start and end.

        Records the optimizer class and every param group's hyperparameters, the scheduler's class and state
        (what each optimizer step applied is recorded per step in `optimizer_steps` by hooks on `optimizer`,
        attached until the stage ends), and any extra `hparams` given.  `seed_forwards` (default: when the model
        has dropout layers) reseeds torch's generator before each training forward with a recorded seed that
        follows from it, so that replay draws the same dropout masks (`fgtrac_core.tracking.forward_seeds`); pass
        True for a model that draws random numbers otherwise (functional dropout, noise, augmentation done by
        its first module).
        """
        self._check_open()
        if self._stage is not None:
            raise RecorderStateError(
                f"stage {name!r} started inside stage {self._stage.name!r}; stages do not nest"
            )
        if model is not None:
            self._model = model
        if self._model is None:
            raise RecorderStateError("run.stage needs the model: pass model= or call run.watch(model) first")
        if name in self._stage_names:
            raise RecorderStateError(f"a stage named {name!r} already exists in this run")
        schedule: dict[str, Any] = {}
        if scheduler is not None:
            state = {k: v for k, v in scheduler.state_dict().items() if not callable(v)}
            schedule = {"class": type(scheduler).__name__, "state": to_jsonable(state)}
        stage_id = self._next_stage_id
        row = pa.table(
            {
                "stage_id": pa.array([stage_id], pa.int32()),
                "name": pa.array([name], pa.string()),
                "optimizer": pa.array([type(optimizer).__name__], pa.string()),
                "hparams": pa.array(
                    [canonical_json({**optimizer_hparams(optimizer), "device": trained_on(optimizer), "user": hparams})]
                ),
                "lr_schedule": pa.array([canonical_json(schedule)]),
                "start_step": pa.array([self._next_step], pa.int64()),
                "end_step": pa.nulls(1, pa.int64()),
                "status": pa.array(["running"]),
                "started_at": pa.array([_now()], pa.timestamp("us")),
                "ended_at": pa.nulls(1, pa.timestamp("us")),
                "autocast": pa.nulls(1, pa.string()),
            }
        )
        self._commit([Insert("stages", row)], [Rows("stage_start", row)])
        self._stage_names.add(name)
        self._next_stage_id += 1
        self._stage = _ActiveStage(stage_id, name, optimizer, self._next_step)
        self.checkpoint(self._model, optimizer, kind="stage_start")
        self._stage.hooks = StepHooks(optimizer, self._on_optimizer_step, _unwrapped(self._model))
        if seed_forwards or (seed_forwards is None and random_modules(self._model)):
            self._stage.seeds = ForwardSeeds(self._model)
        self._stage.autocast = AutocastProbe(self._model)
        status = "failed"
        try:
            yield self
            self.checkpoint(self._model, optimizer, kind="stage_end")
            status = "done"
        finally:
            self._end_stage(status)

    def _end_stage(self, status: str) -> None:
        assert self._stage is not None
        stage_id, ended_at = self._stage.stage_id, _now()
        if self._stage.hooks is not None:
            self._stage.hooks.remove()
        if self._stage.seeds is not None:
            self._stage.seeds.remove()
        autocast = None
        if self._stage.autocast is not None:
            self._stage.autocast.remove()
            # what the stage's training forwards ran under, as its checkpoints say: JSON null for full precision
            autocast = canonical_json(self._stage.autocast.seen)
        if self._pending_lrs:  # batches logged for a step that never ran: they keep a step number of their own
            self._resolve_pending(self._next_step, None, None)
            self._next_step += 1

        # steps never go backwards: the last batch logged has the stage's largest step, if it is the stage's
        end_step = self._last_batch_step if self._last_batch_step >= self._stage.start_step else None
        ended = pa.table(
            {
                "stage_id": pa.array([stage_id], pa.int32()),
                "end_step": pa.array([end_step], pa.int64()),
                "status": pa.array([status], pa.string()),
                "ended_at": pa.array([ended_at], pa.timestamp("us")),
                "autocast": pa.array([autocast], pa.string()),
            }
        )

        # touches `stages` only: a backlog's inserts into other tables stay held (one statement each)
        end = Execute(
            ("stages",),
            "UPDATE stages SET status = ?, ended_at = ?, autocast = ?, end_step = ? WHERE stage_id = ?",
            (status, ended_at, autocast, end_step, stage_id),
        )
        self._commit([end], [Rows("stage_end", ended)], publish=True)
        self._stage = None

    def log_batch(
        self,
        sample_ids: Any,
        *,
        step: int | None = None,
        epoch: int | None = None,
        lr: float | None = None,
        loss: Any = None,
        targets: Any = None,
    ) -> None:
        """Record that `sample_ids` (in batch order) were used for an optimizer step.

        The step is the recorder's own count (see the module docstring); `step`, if given, must not go backwards.
        The recorded lr is the one the step applied (first param group); `lr`, if given, must equal it — checked
        now when the step already ran, else when it runs (the refusal is then raised at the next recorder call).
        `loss` may be a tensor; on an accelerator it is fetched at flush time, so logging never forces a sync.
        `targets` (optional, one integer class per sample, in batch order) are the targets the batch was trained
        on; without them the registered labels are assumed.  A target that differs from the registered label is
        a relabelling (`fgtrac sample` shows it); replay trains on the recorded targets.
        """
        stage = self._require_stage()
        ids = self._require_known_list(_as_id_list(sample_ids))
        target_arr = None if targets is None else _as_targets(targets)
        if isinstance(loss, torch.Tensor):
            if loss.numel() != 1:
                raise FgtracError(f"log_batch: loss must be a scalar, not a tensor of shape {tuple(loss.shape)}")
            # read now on the CPU (cheaper than keeping a detached view of a tensor the loop may reuse); on an
            # accelerator a clone, fetched at flush, so logging never waits for the device
            loss_value = loss.item() if loss.is_cpu else loss.detach().clone()
        else:
            loss_value = _as_float(loss)
        if target_arr is not None and len(target_arr) != len(ids):
            raise FgtracError(f"log_batch: targets has {len(target_arr)} entries for {len(ids)} sample ids")
        floor = max(self._last_user_step, self._last_batch_step)
        if step is not None and int(step) < floor:
            raise RecorderStateError(
                f"log_batch step {step} is before the last logged step {floor}; steps never go backwards "
                f"(omit step=: the recorder numbers optimizer steps itself)"
            )
        given_lr, epoch = _as_float(lr), _as_int(epoch, "epoch")
        mark = stage.mark()
        # the batch of the step that just ran, unless a backward (the next step's) came in between
        after_step = stage.last_step_open and not self._pending_lrs and mark == stage.window_mark
        if after_step and given_lr is not None and stage.last_lr is not None and given_lr != stage.last_lr:
            raise RecorderStateError(_lr_refusal(given_lr, self._next_step - 1, stage.last_lr))
        buf = self._buffer
        buf.batch_id.append(self._next_batch_id)
        buf.stage_id.append(stage.stage_id)
        buf.epoch.append(epoch)
        buf.loss.append(loss_value)
        buf.ids.append(ids)
        buf.targets.append(target_arr)
        buf.n_sample_rows += len(ids)
        if after_step:  # logged after optimizer.step(): the batch of the step that just ran
            buf.step.append(self._next_step - 1)
            buf.lr.append(stage.last_lr)
            buf.group_lrs.append(stage.last_group_lrs)
            self._last_batch_step = self._next_step - 1
        else:  # logged before its step: step and lr are filled in when the step runs
            buf.step.append(self._next_step)
            buf.lr.append(None)
            buf.group_lrs.append(None)
            self._pending_lrs.append(given_lr)
            if stage.first_log_mark is None:
                stage.first_log_mark = mark
            stage.last_log_mark = mark
        stage.last_step_open = False
        if step is not None:
            self._last_user_step = int(step)
        self._next_batch_id += 1
        if buf.n_sample_rows >= self._flush_every:
            self._commit([], [])

    def _on_optimizer_step(self, facts: StepFacts) -> None:
        """Step post-hook (training thread): number the step, buffer its row, give it the batches awaiting it."""
        stage = self._stage
        if stage is None or self._closed:
            return
        step = self._next_step
        seeds = stage.seeds.take() if stage.seeds is not None else None
        self._steps.add(step, stage.stage_id, stage.groups, facts, seeds)
        if facts.groups is not stage.groups:  # the same object when no hyperparameter changed (most steps)
            stage.groups = facts.groups
            lr = facts.groups[0].get("lr") if facts.groups else None
            stage.last_lr = float(lr) if isinstance(lr, int | float) else None
            stage.last_group_lrs = _group_lrs(facts.groups)
        self._next_step += 1
        mark = stage.mark()
        # a batch logged next, before any backward, is this step's when no batch was logged for it, or when the
        # loop logs its batches after their backward (a backward came before the first one logged) and the
        # step's last backward has none yet: gradient accumulation with the last micro-batch logged after the step
        stage.last_step_open = not self._pending_lrs or (
            stage.first_log_mark is not None and stage.first_log_mark > stage.window_mark
            and mark > stage.last_log_mark
        )  # fmt: skip
        stage.window_mark, stage.first_log_mark = mark, None
        if self._pending_lrs:
            self._resolve_pending(step, stage.last_lr, stage.last_group_lrs)

    def _resolve_pending(self, step: int, lr: float | None, group_lrs: tuple[float, ...] | None) -> None:
        buf, n = self._buffer, len(self._pending_lrs)
        for j in range(len(buf) - n, len(buf)):
            buf.step[j] = step
            buf.lr[j] = lr
            buf.group_lrs[j] = group_lrs
        for given in self._pending_lrs:
            if given is not None and lr is not None and given != lr and self._deferred is None:
                self._deferred = _lr_refusal(given, step, lr)
        self._last_batch_step = step
        self._pending_lrs = []

    def checkpoint(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        step: int | None = None,
        val_loss: Any = None,
        metrics: Mapping[str, Any] | None = None,
        epoch: int | None = None,
        kind: str = "periodic",
    ) -> CheckpointRecord:
        """Save model (and optimizer) state next to the database and record it; a tree head signed with it covers
        it, and a snapshot follows (spaced: `fgtrac_core.tracking._writer`).

        `step` defaults to the number of optimizer steps completed.  The recorded `lr` is the first group's rate
        applied by the last optimizer step of the current stage (the rate that produced these parameters), else
        the optimizer's current rate.  The file is a `torch.save` dict loadable with `weights_only=True`.
        """
        self._check_open()
        if kind not in CHECKPOINT_KINDS:
            raise FgtracError(f"checkpoint kind must be one of {CHECKPOINT_KINDS}, not {kind!r}")
        self._model = model
        stage = self._stage
        if optimizer is None and stage is not None:
            optimizer = stage.optimizer
        step = self._next_step if step is None else int(step)
        lr = stage.last_lr if stage is not None and stage.last_lr is not None else None
        if lr is None and optimizer is not None:
            lr = float(optimizer.param_groups[0]["lr"])
        cid = self._next_checkpoint_id
        devices: set[torch.device] = set()
        payload = {
            "format": CHECKPOINT_FORMAT,
            "run_id": self.run_id,
            "checkpoint_id": cid,
            "step": step,
            "stage": stage.name if stage else None,
            # copied now: training mutates these tensors in place while the writer serialises them
            "model": _cpu_copy(_unwrapped(model).state_dict(), devices),
            "optimizer": _cpu_copy(optimizer.state_dict(), devices) if optimizer is not None else None,
            "optimizer_params": optimizer_params(optimizer, _unwrapped(model)) if optimizer is not None else None,
            # parameters that do not require grad now: an optimizer skips them (replay too, for a whole stage)
            "frozen": [name for name, p in _unwrapped(model).named_parameters() if not p.requires_grad],
            # the mixed precision the stage's training forwards ran under so far (None: full precision)
            "autocast": stage.autocast.seen if stage is not None and stage.autocast is not None else None,
        }
        copied = _copies_done(devices)
        rel = f"{self.layout.checkpoint_dir.name}/{cid:05d}-step{step:08d}-{kind}.pt"
        record = CheckpointRecord(cid, step, stage.name if stage else None, kind, rel, _as_float(val_loss))
        path = self.layout.root / rel
        # checked and frozen now (the loop may reuse its metrics dict); turned into Arrow by the writer
        stage_id, epoch, metrics_json = (
            stage.stage_id if stage else None, _as_int(epoch, "epoch"), canonical_json(dict(metrics or {}))
        )

        def write() -> tuple[list[Operation], list[Touched]]:  # on the writer thread
            copied()
            row = {
                "checkpoint_id": pa.array([cid], pa.int32()),
                "step": pa.array([step], pa.int64()),
                "stage_id": pa.array([stage_id], pa.int32()),
                "epoch": pa.array([epoch], pa.int32()),
                "kind": pa.array([kind]),
                "lr": pa.array([lr], pa.float64()),
                "val_loss": pa.array([record.val_loss], pa.float64()),
                "metrics": pa.array([metrics_json]),
                "optimizer": pa.array([type(optimizer).__name__ if optimizer is not None else None], pa.string()),
                "path": pa.array([rel]),
            }
            buf = io.BytesIO()
            torch.save(payload, buf)
            data = buf.getvalue()
            _write_atomic(path, data)
            row["sha256"] = pa.array([hashlib.sha256(data).hexdigest()])
            row["size_bytes"] = pa.array([len(data)], pa.int64())
            row["created_at"] = pa.array([_now()], pa.timestamp("us"))
            table = pa.table(row)
            return [Insert("checkpoints", table)], [Rows("checkpoint", table)]

        self._commit([], [], publish=True, then=write)
        self._next_checkpoint_id += 1
        return record

    # ------------------------------------------------------------------ analyses
    def record_analysis(
        self,
        kind: str,
        method: str,
        params: Mapping[str, Any],
        checkpoints: Sequence[Mapping[str, Any]],
        results: Mapping[str, pa.Table],
        *,
        seconds: float | None = None,
    ) -> int:
        """Store one analysis (its result rows per result table, e.g. ``{"influence_topk": table}``) and commit
        it to the ledger: an entry per result row, then the analysis entry holding `method`, `params`, the
        `checkpoints` it read (id, sha256, lr...) and the Merkle root of its row entries.  Waits until committed
        and published; returns the analysis id.  Result tables get `analysis_id` and `row_id` assigned here.
        """
        self._check_open()
        unknown = set(results) - set(RESULT_TABLES)
        if unknown:
            raise FgtracError(f"not result tables: {sorted(unknown)}")
        present = {t: d for t, d in results.items() if d is not None and d.num_rows}
        n_rows = sum(d.num_rows for d in present.values())
        analysis_id = self._next_analysis_id  # this recorder is the run's only writer: its counters are the ids
        ops: list[Operation] = []
        touched: list[Touched] = []
        for table, entry_kind in RESULT_TABLES.items():
            if table not in present:
                continue
            data = present[table]
            first = self._next_row_id[table]
            data = data.append_column(
                "analysis_id", pa.array(np.full(data.num_rows, analysis_id), pa.int32())
            )
            data = data.append_column("row_id", pa.array(np.arange(first, first + data.num_rows), pa.int64()))
            ops.append(Insert(table, data))
            touched.append((entry_kind, first, first + data.num_rows - 1))
        row = {
            "analysis_id": pa.array([analysis_id], pa.int32()),
            "kind": pa.array([kind]),
            "method": pa.array([method]),
            "params": pa.array([canonical_json(to_jsonable(dict(params)))]),
            "checkpoints": pa.array([canonical_json(to_jsonable([dict(c) for c in checkpoints]))]),
            "n_rows": pa.array([n_rows], pa.int64()),
            "seconds": pa.array([seconds], pa.float64()),
            "created_at": pa.array([_now()], pa.timestamp("us")),
        }
        ops.append(Insert("analyses", pa.table(row)))
        # entries for this analysis' rows, then the analysis itself (its rows_root covers them)
        touched.append(("analysis", analysis_id, analysis_id))
        self._commit(ops, touched, publish=True, wait=True)
        self._next_analysis_id += 1
        for table in present:
            self._next_row_id[table] += present[table].num_rows
        return analysis_id

    # ------------------------------------------------------------------ persistence
    @property
    def background_cpu_s(self) -> float:
        """CPU seconds the background writer has spent (serialising checkpoints, hashing, signing, inserting,
        publishing snapshots), as of its last finished job, final once `close()` returns: what recording costs
        beyond the recorder calls in the training thread.  With `writer="process"`: the writer process's (its
        start-up, ~0.5 s, included) and this process's thread that prepares its work."""
        return self._writer.cpu_s

    def flush(self) -> None:
        """Commit pending batch records and wait until everything recorded so far is committed."""
        self._check_open()
        self._commit([], [], wait=True)

    def publish(self) -> None:
        """Publish a read-only snapshot of everything recorded so far and wait for it (readers open snapshots)."""
        self._check_open()
        self._commit([], [], publish=True, wait=True)

    def _commit(
        self,
        ops: Sequence[Operation],
        kinds: Sequence[Touched],
        *,
        publish: bool = False,
        wait: bool = False,
        then: Callable[[], tuple[list[Operation], list[Touched]]] | None = None,
    ) -> None:
        """Queue one transaction: pending batches first (rows reach the database in recording order), then `ops`,
        then those `then` makes on the writer thread (a checkpoint's file), then the ledger entries of the rows
        they wrote (`kinds`, then those of `then`, in order)."""
        n_waiting = len(self._pending_lrs)  # batches still waiting for their optimizer step stay buffered
        pending: _BatchBuffer | None = None
        if len(self._buffer) > n_waiting:
            pending, self._buffer = self._buffer.split(n_waiting)
        steps, self._steps = (self._steps, StepBuffer()) if len(self._steps) else (None, self._steps)

        def transaction() -> Transaction:  # on the writer thread
            first: list[Operation] = []
            written: list[Touched] = []
            if pending is not None:
                batches, samples = pending.tables()
                first += [Insert("batches", batches), Insert("batch_samples", samples)]
                written.append(Rows("batch", batches, samples))
            if steps is not None:
                step_rows = steps.table()
                first.append(Insert("optimizer_steps", step_rows))
                written.append(Rows("optimizer_step", step_rows))
            last, last_kinds = then() if then is not None else ([], [])
            # a signed head at every checkpoint, stage end and close (their snapshots are spaced)
            return Transaction(first + list(ops) + last, written + list(kinds) + last_kinds, sign=publish)

        self._writer.submit(transaction, publish=publish, wait=wait)

    # ------------------------------------------------------------------ checks
    def _scalar(self, sql: str) -> int:  # start-up only, before the writer owns the connection
        return int(self._con.execute(sql).fetchall()[0][0])

    def _check_open(self) -> None:
        if self._closed:
            raise RecorderStateError("this run is closed")
        if self._deferred is not None:
            message, self._deferred = self._deferred, None
            raise RecorderStateError(message)

    def _require_stage(self) -> _ActiveStage:
        self._check_open()
        if self._stage is None:
            raise RecorderStateError("log_batch must be called inside `with run.stage(...)`")
        return self._stage

    def _require_known_list(self, ids: list[int]) -> list[int]:
        """`_require_known` for `log_batch`: ids registered as one range (most runs) are checked by their least
        and greatest (two C calls); otherwise through the array."""
        span = self._known_span
        if span is not None and ids and span[0] <= min(ids) and max(ids) <= span[1]:
            return ids
        self._require_known(np.asarray(ids, np.int64))
        return ids

    def _require_known(self, ids: np.ndarray) -> np.ndarray:
        known = self._known_ids
        # every batch: three array calls (a position past the end is clipped onto the largest id, which differs)
        if len(known) and (known.take(known.searchsorted(ids), mode="clip") == ids).all():
            return ids
        unknown = ids[~np.isin(ids, known)]
        if len(unknown):
            raise UnknownSampleError(f"sample id {int(unknown[0])} was never registered in this run")
        return ids


def _chosen_writer(writer: str | None) -> str:
    """`writer`, else `FGTRAC_WRITER`, else "thread"; checked before anything is written."""
    chosen = writer if writer is not None else os.environ.get("FGTRAC_WRITER") or "thread"
    if chosen not in WRITERS:
        source = "writer" if writer is not None else "FGTRAC_WRITER"
        raise FgtracError(f"{source} must be one of {', '.join(map(repr, WRITERS))}, not {chosen!r}")
    return chosen


def _run_signing_key(meta: Mapping[str, str]) -> Any:
    """The signing key of an existing run, from the key directory; never creates one (a run whose key is gone
    must not be re-keyed: only Run.create makes a new run's key)."""
    try:
        key = load_signing_key()
    except MissingKeyError:
        raise SigningKeyError(
            f"this run is signed by key {meta['signer_fingerprint']}, but {default_key_dir()} holds no signing "
            "key; restore that key (or set FGTRAC_KEY_DIR); fgtrac never re-keys an existing run"
        ) from None
    except KeyFileError as exc:
        raise SigningKeyError(str(exc)) from None
    if meta["signer_fingerprint"] != fingerprint(key.public_key()):
        raise FgtracError(
            f"this run is signed by key {meta['signer_fingerprint']}, but the signing key in {default_key_dir()} "
            f"is {fingerprint(key.public_key())}; point FGTRAC_KEY_DIR at the run's key to record into it"
        )
    return key


def _group_lrs(groups: list[dict[str, Any]] | None) -> tuple[float, ...] | None:
    """Every param group's lr (`batches.group_lrs`, JSON at flush), when there are several and they differ (a slower
    body, a head at its own rate); None otherwise, where `batches.lr` (the first group's) says it all."""
    if groups is None or len(groups) < 2:
        return None
    rates = [g.get("lr") for g in groups]
    if len(set(rates)) < 2 or not all(isinstance(r, int | float) for r in rates):
        return None
    return tuple(float(r) for r in rates)


def _lr_refusal(given: float, step: int, applied: float) -> str:
    return (
        f"log_batch was given lr={given!r}, but optimizer step {step} applied lr={applied!r}; omit lr= "
        f"(the recorder reads the rate each step applies)"
    )


def _unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside torch.compile's and DataParallel's wrappers, whose state dict (keys without the wrapper's
    prefix) is what the pipeline's plain model loads."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        if inner is None and isinstance(model, torch.nn.DataParallel | torch.nn.parallel.DistributedDataParallel):
            inner = model.module
        if not isinstance(inner, torch.nn.Module):
            return model
        model = inner


def _cpu_copy(obj: Any, devices: set[torch.device]) -> Any:
    """A deep copy of a (possibly nested) state dict with every tensor detached and copied to the CPU.

    From a CUDA device the copy is asynchronous (into pinned memory, queued on the current stream before the
    loop's next kernels, which cannot overwrite it first): the training thread does not wait for the device, the
    writer does (`_copies_done`).  The devices copied from are added to `devices`."""
    if isinstance(obj, torch.Tensor):
        if obj.is_cpu and not obj.requires_grad:  # state dicts hold detached tensors: one dispatch, not two
            return obj.clone()
        devices.add(obj.device)
        return obj.detach().to("cpu", copy=True, non_blocking=obj.device.type == "cuda")
    if isinstance(obj, dict):
        return {k: _cpu_copy(v, devices) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_cpu_copy(v, devices) for v in obj)
    return obj


def _copies_done(devices: set[torch.device]) -> Callable[[], None]:
    """A wait for the asynchronous copies `_cpu_copy` queued on these devices so far (call it on any thread)."""
    events = []
    for device in devices:
        if device.type == "cuda":
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(device))
            events.append(event)

    def wait() -> None:
        for event in events:
            event.synchronize()

    return wait


def _close_at_exit(ref: weakref.ref[Run]) -> None:
    run = ref()
    if run is not None and not run._closed:
        run.close()


def _write_atomic(path: Path, data: bytes) -> None:
    # an exclusively created, unpredictable temporary (O_EXCL|O_NOFOLLOW): a planted link is never written through
    write_file_atomic(path, data)
