"""The record-kind registry: every kind of recorded fact that becomes a ledger entry, in one place.

Each kind names the table its entries are recomputed from, the columns that identify a row (an entry's
``ref_id`` / ``ref_key``), the body fields of its entry, and whether its rows are results of an analysis.
Everything else that depends on the set of kinds — the recorder's entry appends, the SQL that reads rows back as
entries, the verifier's row names, the result tables an analysis may write — is derived from this registry, so
adding a recorded table means adding a `RecordKind` here and its columns to the schema DDL.

Pure data (no database or tensor library): the offline proof checker imports the ledger package.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RecordKind:
    """One kind of ledger entry and the table rows it commits.

    `fields` are the entry's body fields in declaration order; ``"name=column"`` where the entry renames a column
    (``kind`` is reserved for the entry kind).  `computed` names the body fields that are not columns but Merkle
    roots the store computes (`id_set` below, or an analysis' result rows); the first is the root of the id set.
    `id_set` is ``(link table, order column)``: the sample ids linked to a row, whose RFC 9162 root over the
    members in that order (`fgtrac_core.ledger.entries.members_root`) is the first computed field.  `pair_column`
    names a nullable column of the link table whose value each member leaf carries beside its id (a batch's
    targets as used).  `present_when` names a column that must be non-NULL for a row to carry an entry of this
    kind (a session's close, a stage's end).
    """

    kind: str
    table: str
    fields: tuple[str, ...]
    id_column: str | None
    key_column: str | None = None
    result: bool = False
    computed: tuple[str, ...] = ()
    id_set: tuple[str, str] | None = None
    pair_column: str | None = None
    present_when: str | None = None

    @property
    def field_columns(self) -> tuple[tuple[str, str], ...]:
        """(entry field name, table column) per body field; the computed field maps to itself."""
        return tuple((f.split("=")[0], f.split("=")[-1]) for f in self.fields)

    @property
    def columns(self) -> tuple[str, ...]:
        """The table columns an entry of this kind reads (the computed fields excluded)."""
        return tuple(col for _, col in self.field_columns if col not in self.computed)


def _result(kind: str, table: str, *fields: str) -> RecordKind:
    return RecordKind(kind, table, ("row_id", "analysis_id", *fields), "row_id", result=True)


KINDS: tuple[RecordKind, ...] = (
    RecordKind("meta", "meta", ("key", "value"), None, "key"),
    RecordKind("session_open", "run_sessions", ("session_id", "opened_at"), "session_id"),
    RecordKind(
        "session_close", "run_sessions", ("session_id", "closed_at"), "session_id", present_when="closed_at"
    ),
    RecordKind(
        "sample",
        "samples",
        ("sample_id", "split", "label", "content_sha256", "thumbnail_sha256", "display", "source", "registered_at"),
        "sample_id",
    ),
    RecordKind("annotation", "sample_annotations", ("sample_id", "key", "value"), "sample_id", "key"),
    RecordKind(
        "transform",
        "transforms",
        ("transform_id", "name", "params", "n_samples", "stage_id", "logged_at", "samples_root"),
        "transform_id",
        computed=("samples_root",),
        id_set=("transform_samples", "sample_id"),
    ),
    RecordKind(
        "stage_start",
        "stages",
        ("stage_id", "name", "optimizer", "hparams", "lr_schedule", "start_step", "started_at"),
        "stage_id",
    ),
    RecordKind(
        "stage_end", "stages", ("stage_id", "end_step", "status", "ended_at", "autocast"), "stage_id",
        present_when="ended_at"
    ),
    RecordKind(
        "batch",
        "batches",
        ("batch_id", "step", "stage_id", "epoch", "lr", "group_lrs", "loss", "n_samples", "samples_root"),
        "batch_id",
        computed=("samples_root",),
        id_set=("batch_samples", "position"),
        pair_column="target",
    ),
    # one per optimizer step, as the recorder's step hooks saw it: the hyperparameters applied (canonical JSON, per
    # param group only the keys changed since the stage's previous step; all keys at a stage's first step), the
    # gradient clipping inferred, whether the loop altered gradients otherwise, a parameter fingerprint, and the
    # seeds of the model's training forwards that fed it (JSON list; NULL when the stage does not reseed them)
    RecordKind(
        "optimizer_step",
        "optimizer_steps",
        ("step", "stage_id", "hparams", "clip", "grads_altered", "param_fingerprint", "forward_seeds"),
        "step",
    ),
    RecordKind(
        "checkpoint",
        "checkpoints",
        ("checkpoint_id", "step", "stage_id", "epoch", "checkpoint_kind=kind", "lr", "val_loss", "metrics",
         "optimizer", "path", "sha256", "size_bytes", "created_at"),
        "checkpoint_id",
    ),  # fmt: skip
    # analyses (influence, stage accountability): one entry per result row, then one per analysis holding its
    # method, parameters, the checkpoints it read (with their file hashes) and `rows_root`, the RFC 9162 root over
    # the leaf hashes of its result entries (result kinds in registry order, then row_id order)
    _result("influence_test", "influence_tests", "sample_id", "label", "prediction", "confidence", "loss"),
    _result(
        "influence_topk", "influence_topk",
        "test_id", "view", "direction", "rank", "train_id", "score", "cosine", "contributions",
    ),  # fmt: skip
    _result("self_influence", "self_influence", "sample_id", "value", "rank"),
    _result("stage_effect", "stage_effects", "method", "behaviour", "test_id", "stage_id", "value"),
    _result("stage_aggregate", "stage_aggregates", "method", "behaviour", "slice", "stage_id", "value", "n"),
    _result(
        "stage_faithfulness", "stage_faithfulness",
        "method", "horizon", "stage_id", "pearson", "spearman", "sign_agreement", "top1_agreement",
        "aggregate_error", "seconds", "reference_seconds", "confidence",
    ),  # fmt: skip
    RecordKind(
        "analysis",
        "analyses",
        ("analysis_id", "analysis_kind=kind", "method", "params", "checkpoints", "n_rows", "seconds",
         "created_at", "rows_root"),
        "analysis_id",
        computed=("rows_root",),
    ),  # fmt: skip
    # the usage index over the first `ledger_size` entries (appended when a recording session closes): counts and
    # RFC 9162 roots of the sorted per-sample usage and content-hash trees (`usage_index.py`), all recomputed
    RecordKind(
        "usage_index",
        "usage_indexes",
        ("index_id", "ledger_size", "created_at", "n_samples", "n_uses", "usage_root", "content_root"),
        "index_id",
        computed=("n_samples", "n_uses", "usage_root", "content_root"),
    ),
)

BY_KIND: dict[str, RecordKind] = {k.kind: k for k in KINDS}
#: the kinds whose rows belong to an analysis, in the order their entries enter the analysis' `rows_root`
RESULT_KINDS: tuple[str, ...] = tuple(k.kind for k in KINDS if k.result)
#: result table -> its entry kind (the tables `Run.record_analysis` accepts)
RESULT_TABLES: dict[str, str] = {k.table: k.kind for k in KINDS if k.result}
#: table -> (column behind ref_id, column behind ref_key), for naming a row
ROW_KEYS: dict[str, tuple[str | None, str | None]] = {k.table: (k.id_column, k.key_column) for k in KINDS}
#: link tables -> (the table whose entries commit their id sets, the shared key column)
LINK_TABLES: dict[str, tuple[str, str]] = {
    k.id_set[0]: (k.table, k.id_column) for k in KINDS if k.id_set is not None and k.id_column is not None
}
