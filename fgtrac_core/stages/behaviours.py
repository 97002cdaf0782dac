"""Behaviours f whose change a stage is held accountable for, and the test-set slices they are aggregated over.

A behaviour maps (model outputs for the test examples, their recorded labels) to one value per example:
  * ``loss``   — the example's cross-entropy (nats); a positive stage effect means the stage *raised* the loss;
  * ``margin`` — logit of the label minus the largest other logit (logit units); positive effect: the stage made
    the model more confidently right.
Outputs are read as class logits (`fgtrac_core.outputs.class_logits`): a binary classifier's one logit z per
example as (0, z), so its loss is the binary cross-entropy and its margin +z for label 1, −z for label 0.
Aggregates over a slice are the slice mean of a behaviour's effect (for ``loss``: the effect on the slice's mean
loss) and ``accuracy``: the effect on the slice's accuracy (fraction in [-1, 1]; +0.1 means the stage raised
accuracy by 10 points), computed from the estimated margin (an example counts as correct while its margin > 0).
Slices: ``all``, ``misclassified`` (by the final model theta_T) and ``class=<c>`` (by recorded label).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jvp

from fgtrac_core._per_example import per_example
from fgtrac_core.derivatives import is_unsupported
from fgtrac_core.outputs import class_logits, logits
from fgtrac_core.stages.errors import StageAnalysisError
from fgtrac_core.stages.training import StateDict

BehaviourFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""(outputs (n, ...), labels (n,)) -> per-example values (n,)."""


def example_loss(outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(class_logits(outputs), labels, reduction="none")


def example_margin(outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    outputs = class_logits(outputs)
    own = outputs.gather(1, labels[:, None]).squeeze(1)
    others = outputs.scatter(1, labels[:, None], float("-inf"))
    return own - others.max(1).values


BEHAVIOURS: dict[str, BehaviourFn] = {"loss": example_loss, "margin": example_margin}


def resolve(names: tuple[str, ...] | list[str]) -> dict[str, BehaviourFn]:
    """The behaviour functions for these names (raises a one-line error for an unknown one)."""
    unknown = [n for n in names if n not in BEHAVIOURS]
    if unknown or not names:
        raise StageAnalysisError(
            f"unknown behaviour {unknown[0] if unknown else '(none)'}; choose from {', '.join(BEHAVIOURS)}"
        )
    return {n: BEHAVIOURS[n] for n in names}


@torch.no_grad()
def evaluate(
    model: nn.Module, state: StateDict, x: torch.Tensor, y: torch.Tensor, fns: Mapping[str, BehaviourFn]
) -> dict[str, np.ndarray]:
    """Every behaviour's per-example values (float64) at parameters `state`."""
    out = functional_call(model, state, (x,))
    return {name: fn(out, y).double().numpy() for name, fn in fns.items()}


def directional(
    model: nn.Module,
    state: StateDict,
    direction: StateDict,
    x: torch.Tensor,
    y: torch.Tensor,
    fns: Mapping[str, BehaviourFn],
) -> dict[str, np.ndarray]:
    """grad f(state) . direction for every example and behaviour, by one forward-mode pass (no finite differences);
    for a model with an operation torch has no forward-mode derivative of (``nn.EmbeddingBag``), by per-example
    reverse-mode gradients instead (the same quantity; one gradient per example and behaviour).

    `direction` covers the parameters; buffers are held fixed.
    """
    names = list(direction)
    fixed = {k: v for k, v in state.items() if k not in direction}

    def outputs(*params: torch.Tensor) -> torch.Tensor:  # the class logits alone: the behaviours read only them
        return logits(functional_call(model, {**fixed, **dict(zip(names, params, strict=True))}, (x,)))

    try:
        out, d_out = jvp(outputs, tuple(state[n] for n in names), tuple(direction[n] for n in names))
        return {
            name: jvp(lambda o, fn=fn: fn(o, y), (out,), (d_out,))[1].detach().double().numpy()
            for name, fn in fns.items()
        }
    except (NotImplementedError, RuntimeError) as exc:
        if not is_unsupported(exc):
            raise
    values = {}
    all_names = [n for n, _ in model.named_parameters()]
    for name, fn in fns.items():
        total = torch.zeros(len(x), dtype=torch.float64)
        for n, g in zip(all_names, gradients(model, state, x, y, fn), strict=True):
            if n in direction:
                total += (g.flatten(1).double() * direction[n].reshape(1, -1).double()).sum(1)
        values[name] = total.numpy()
    return values


def slices(labels: np.ndarray, final_correct: np.ndarray) -> dict[str, np.ndarray]:
    """Boolean masks over the test examples: all, misclassified by theta_T, and one per recorded class."""
    out = {"all": np.ones(len(labels), bool), "misclassified": ~final_correct}
    for c in np.unique(labels):
        out[f"class={int(c)}"] = labels == c
    return out


def gradients(
    model: nn.Module, state: StateDict, x: torch.Tensor, y: torch.Tensor, fn: BehaviourFn
) -> list[torch.Tensor]:
    """Per-example grad f(state) for every parameter: one tensor (n_examples, *param.shape) each."""
    names = [n for n, _ in model.named_parameters()]
    fixed = {k: v for k, v in state.items() if k not in names}

    def value(params: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        return fn(functional_call(model, {**fixed, **params}, (xi[None],)), yi[None])[0]

    grads = per_example(grad(value), {n: state[n] for n in names}, x, y)
    return [grads[n].detach() for n in names]
