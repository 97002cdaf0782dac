"""DuckDB storage of a run: schema, writes, snapshots and the read-only queries used by the CLI and app."""

from fgtrac_core.store.layout import RunLayout
from fgtrac_core.store.reader import RunStore
from fgtrac_core.store.schema import SCHEMA_VERSION

__all__ = ["SCHEMA_VERSION", "RunLayout", "RunStore"]
