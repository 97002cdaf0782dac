"""Where things live inside a run directory.

A run is a directory::

    RUN/
      fgtrac.duckdb        live database, opened read-write by the one recorder process only
      snapshot.duckdb      read-only copy published after checkpoints (spaced, see tracking._writer) and at
                           close; readers open this
      checkpoints/*.pt     model + optimizer state, referenced (with SHA-256) from the `checkpoints` table; read
                           only through `fgtrac_core.store.run_files`
      .fgtrac-creating     present only while `Run.create` runs (until the run's first signed commit): a
                           directory holding it and a database is an interrupted creation, not a run
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

LIVE_DB = "fgtrac.duckdb"
SNAPSHOT_DB = "snapshot.duckdb"
CHECKPOINT_DIR = "checkpoints"
CREATING = ".fgtrac-creating"


@dataclass(frozen=True)
class RunLayout:
    """Paths of one run directory."""

    root: Path

    @classmethod
    def of(cls, run_dir: str | Path) -> RunLayout:
        return cls(Path(run_dir).expanduser().resolve())

    @property
    def live_db(self) -> Path:
        return self.root / LIVE_DB

    @property
    def snapshot_db(self) -> Path:
        return self.root / SNAPSHOT_DB

    @property
    def checkpoint_dir(self) -> Path:
        return self.root / CHECKPOINT_DIR

    @property
    def creating_marker(self) -> Path:
        return self.root / CREATING

    def holds_run(self) -> bool:
        return self.live_db.exists() or self.snapshot_db.exists()
