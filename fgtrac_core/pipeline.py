"""How fgtrac rebuilds a recorded run's model and model inputs for analyses (influence, stage replay).

A run names its pipeline in its config (``Run.create(config=...)``):

    {"model": "package.module:ModelClass",        # called with no arguments
     "inputs": "package.module:function",         # function(config: dict, sample_ids: np.ndarray) -> Tensor
     "head_layer": "head"}                         # the final nn.Linear (influence's last_layer mode)

Labels are never taken from the pipeline: they are the recorded labels (`samples.label`), the ones training saw.
Importing a module runs its code, so fgtrac imports by itself only the bundled pipelines (`sample_runs.*`); any
other run's pipeline must be named explicitly by the user (``--model``/``--inputs``), who thereby trusts it.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from fgtrac_core.errors import FgtracError

_TRUSTED_PREFIXES = ("sample_runs.",)


@dataclass
class Pipeline:
    """A run's model factory and input loader, plus its recorded config."""

    model_factory: Callable[[], nn.Module]
    load_inputs: Callable[[dict[str, Any], np.ndarray], torch.Tensor]
    head_layer: str | None
    config: dict[str, Any]

    def model(self) -> nn.Module:
        return self.model_factory()

    def inputs(self, sample_ids: np.ndarray) -> torch.Tensor:
        """Model inputs of these samples, in the given order."""
        x = self.load_inputs(self.config, np.asarray(sample_ids, dtype=np.int64))
        if len(x) != len(sample_ids):
            raise FgtracError(f"the pipeline returned {len(x)} inputs for {len(sample_ids)} sample ids")
        return x


def _resolve(ref: str, what: str, trusted: bool) -> Any:
    module_name, _, attr = ref.partition(":")
    if not module_name or not attr:
        raise FgtracError(f"{what} must be given as 'package.module:name', not {ref!r}")
    if not trusted and not module_name.startswith(_TRUSTED_PREFIXES):
        raise FgtracError(
            f"this run names its {what} as {ref!r}; fgtrac imports only bundled pipelines by itself — "
            f"pass it explicitly (--{what} {ref}) if you trust that code"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise FgtracError(f"cannot import {module_name!r} for the {what}: {e}") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise FgtracError(f"{module_name!r} has no {attr!r} (the {what})") from None


def load_pipeline(
    config: dict[str, Any] | str,
    *,
    model: str | None = None,
    inputs: str | None = None,
    head_layer: str | None = None,
) -> Pipeline:
    """The pipeline a run's config names; `model`/`inputs`/`head_layer` override it (and are trusted)."""
    cfg = json.loads(config) if isinstance(config, str) else dict(config)
    model_ref = model or cfg.get("model")
    inputs_ref = inputs or cfg.get("inputs")
    if not model_ref or not inputs_ref:
        raise FgtracError(
            "this run's config does not name its model and inputs ('model', 'inputs'); "
            "pass --model package.module:Class --inputs package.module:function"
        )
    return Pipeline(
        model_factory=_resolve(model_ref, "model", trusted=model is not None),
        load_inputs=_resolve(inputs_ref, "inputs", trusted=inputs is not None),
        head_layer=head_layer or cfg.get("head_layer"),
        config=cfg,
    )
