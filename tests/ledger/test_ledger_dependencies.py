"""The ledger must stay verifiable with a minimal install: standard library and `cryptography` only."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import fgtrac_core.ledger

LEDGER_DIR = Path(fgtrac_core.ledger.__file__).parent
FORBIDDEN = {"torch", "duckdb", "numpy", "pandas", "pyarrow"}


def test_ledger_imports_only_stdlib_and_cryptography() -> None:
    allowed = set(sys.stdlib_module_names) | {"cryptography"}
    for path in sorted(LEDGER_DIR.glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative import: must stay inside the ledger package
                    assert node.level == 1, f"{path.name}: import reaches outside fgtrac_core.ledger"
                    continue
                names = [node.module or ""]
            else:
                continue
            for name in names:
                assert name.split(".")[0] in allowed, f"{path.name} imports {name}"


def test_importing_the_ledger_loads_no_heavy_dependency() -> None:
    code = (
        "import sys, fgtrac_core.ledger\n"
        f"bad = sorted(m for m in {sorted(FORBIDDEN)!r} if m in sys.modules)\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
