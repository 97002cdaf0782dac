"""fgtrac: sample-level traceability, a tamper-evident ledger and influence attribution for PyTorch training.

Public API:
  * `Run` — the recorder a training loop calls (samples, transforms, stages, batches, checkpoints);
  * `RunStore` — read-only queries over a run's published snapshot;
  * `verify_run` — recheck a run against its ledger; `build_usage_proof` — a sample's usage-proof bundle
    (checked offline by `fgtrac_core.ledger.bundle.check_bundle`);
  * `FgtracError` and subclasses — user-facing errors (the CLI reports them in one line, exit 2).

Heavy modules (torch, duckdb) load on first use, so `fgtrac_core.ledger` can verify proofs offline with only
`cryptography` installed.
"""

from __future__ import annotations

from fgtrac_core._lazy import lazy_getattr
from fgtrac_core.errors import (
    CorruptRunError,
    FgtracError,
    RecorderStateError,
    RunExistsError,
    RunLockedError,
    RunNotFoundError,
    SchemaVersionError,
    UnknownSampleError,
)

__version__ = "0.1.0"

_LAZY = {
    "Run": "fgtrac_core.tracking.run",
    "NullRun": "fgtrac_core.tracking.null",
    "CheckpointRecord": "fgtrac_core.tracking.run",
    "RunStore": "fgtrac_core.store.reader",
    "SCHEMA_VERSION": "fgtrac_core.store.schema",
    "verify_run": "fgtrac_core.verify",
    "VerifyReport": "fgtrac_core.verify",
    "build_usage_proof": "fgtrac_core.proofs",
}


__getattr__ = lazy_getattr(__name__, _LAZY)


__all__ = [
    "SCHEMA_VERSION",
    "CheckpointRecord",
    "CorruptRunError",
    "FgtracError",
    "RecorderStateError",
    "NullRun",
    "Run",
    "RunExistsError",
    "RunLockedError",
    "RunNotFoundError",
    "RunStore",
    "SchemaVersionError",
    "UnknownSampleError",
    "VerifyReport",
    "__version__",
    "build_usage_proof",
    "verify_run",
]
