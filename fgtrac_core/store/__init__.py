"""DuckDB storage of a run: schema, writes, snapshots and the read-only queries used by the CLI and app.

`RunStore` (and with it pandas) loads on first use, so that the writer process imports this package without it."""

from __future__ import annotations

from fgtrac_core._lazy import lazy_getattr

_LAZY = {
    "RunLayout": "fgtrac_core.store.layout",
    "RunStore": "fgtrac_core.store.reader",
    "SCHEMA_VERSION": "fgtrac_core.store.schema",
}


__getattr__ = lazy_getattr(__name__, _LAZY)


__all__ = ["SCHEMA_VERSION", "RunLayout", "RunStore"]
