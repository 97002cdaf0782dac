"""Package attributes loaded on first use (PEP 562), so that importing a package does not import its heavy
modules: `fgtrac_core.ledger` verifies proofs with only `cryptography`, and the writer process
(`fgtrac_core.tracking._writer_process`) runs without torch or pandas."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_getattr(package: str, where: Mapping[str, str]) -> Callable[[str], Any]:
    """A module `__getattr__` for `package` that imports `where[name]` (a module path) when `name` is first read."""

    def __getattr__(name: str) -> Any:
        if name in where:
            return getattr(importlib.import_module(where[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
