"""Loading a run's checkpoint files as payloads, only through the trusted reader (`fgtrac_core.store.run_files`).

The bytes are read once, checked against the size and SHA-256 the checkpoint's ledger entry committed, and
unpickled from memory with `weights_only=True`: the file is never reopened by path after it was checked.
"""

from __future__ import annotations

import io
from typing import Any

import torch

from fgtrac_core.errors import RunFileError
from fgtrac_core.store.layout import RunLayout
from fgtrac_core.store.run_files import (
    MAX_RUN_FILE_BYTES,
    CommittedCheckpoint,
    committed_checkpoint,
    read_checkpoint_file,
)


def load_checkpoint_payload(
    layout: RunLayout, committed: CommittedCheckpoint, *, max_bytes: int = MAX_RUN_FILE_BYTES
) -> dict[str, Any]:
    """The dict a recorder saved (`{"model": ..., "optimizer": ..., ...}`), from a checked checkpoint file.

    Raises RunFileError (one line) for a refused file (see `read_run_file`) or one that does not unpickle to a dict.
    """
    data = read_checkpoint_file(layout, committed, max_bytes=max_bytes)
    what = f"checkpoint {committed.checkpoint_id} file {committed.path!r}"
    try:
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types (UnpicklingError, RuntimeError, EOFError...)
        lines = str(exc).strip().splitlines()
        raise RunFileError(f"{what} cannot be loaded: {lines[0] if lines else type(exc).__name__}") from None
    if not isinstance(payload, dict):
        raise RunFileError(f"{what} holds no checkpoint dict (a {type(payload).__name__})")
    if isinstance(payload.get("model"), dict):
        payload["model"] = unwrapped_state(payload["model"])
    return payload


# torch.compile's OptimizedModule, and DataParallel / DistributedDataParallel, prefix every key of the wrapped
# model's state dict
_WRAPPER_PREFIXES = ("_orig_mod.", "module.")


def unwrapped_state(state: dict[str, Any]) -> dict[str, Any]:
    """`state` with the prefixes of model wrappers removed from its keys, when every key carries one (a run
    recorded from a wrapped model before the recorder unwrapped models): the plain model's state dict."""
    while state:
        prefix = next((p for p in _WRAPPER_PREFIXES if all(k.startswith(p) for k in state)), None)
        if prefix is None:
            break
        state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def load_run_checkpoint(source: Any, layout: RunLayout, checkpoint_id: int) -> dict[str, Any]:
    """Checkpoint `checkpoint_id` of a run (`source`: its `RunStore` or DuckDB connection), checked against its
    ledger entry."""
    return load_checkpoint_payload(layout, committed_checkpoint(source, checkpoint_id))
