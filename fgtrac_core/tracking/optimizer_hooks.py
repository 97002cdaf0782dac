"""What each optimizer step applied, seen from inside ``optimizer.step()`` (attached by `Run.stage`).

For the stage's optimizer the recorder registers
  * a post-accumulate-grad hook per parameter: a copy-on-write clone of the gradient as backward accumulated it
    (no data is copied unless the loop then writes the gradient, as clipping does), that tensor and its version;
  * a step pre-hook: it reads every param group's hyperparameters as the step applies them — whatever order the
    loop calls ``scheduler.step()`` and ``log_batch`` in — and, only when a gradient was replaced or modified in
    place since backward (identity and version counter), compares the gradients the optimizer is about to step on
    with the accumulated ones.  A difference is explained as torch's ``clip_grad_norm_`` (norm type 2 or inf) or
    ``clip_grad_value_`` with a short threshold that reproduces it *exactly* (re-applying torch's own function to
    copies), else the step is marked "gradients altered by the loop";
  * a step post-hook: a cheap fingerprint of the parameters after the step (the sum of the parameter tensors'
    L2 norms; one foreach call, kept as device tensors until flush), then the facts go to the recorder, which
    numbers the step.
All hooks are removed at the stage end.  `param_fingerprint` and `apply_clip` are shared with replay.

Per step the training thread pays one Python call and one clone dispatch per parameter, one dict comparison per
param group (hyperparameters are converted only at the steps that change them), the foreach norm, and a row of
Python lists; JSON encoding and the fingerprints' host sync happen at flush.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from fgtrac_core._json import canonical_json

_SKIP = object()
Groups = list[dict[str, Any]]


# ----------------------------------------------------------------------------------------------- hyperparameters


def _hparam_value(value: Any) -> Any:
    """A JSON-able scalar (or list of scalars) for one param-group value; _SKIP for anything else."""
    if isinstance(value, torch.Tensor):
        return float(value.detach().cpu()) if value.numel() == 1 and value.is_floating_point() else _SKIP
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, list | tuple):
        items = [_hparam_value(v) for v in value]
        return _SKIP if any(v is _SKIP or isinstance(v, list) for v in items) else items
    return _SKIP


_PLAIN = frozenset({float, int, bool, str, type(None)})
_IMMUTABLE = _PLAIN | {tuple, frozenset}  # a shallow copy keeps these values as they are


def applied_hparams(optimizer: torch.optim.Optimizer) -> Groups:
    """Every param group's JSON-able hyperparameters as they are now (lr, momentum, betas, weight_decay...)."""
    out = []
    for group in optimizer.param_groups:
        values = {}
        for k, v in group.items():
            if type(v) in _PLAIN:  # most values, every step: skip the general conversion
                values[k] = v
            elif k != "params" and (value := _hparam_value(v)) is not _SKIP:
                values[k] = value
        out.append(values)
    return out


class _HparamsReader:
    """`applied_hparams`, but the previous step's result (the same object) when no group changed.

    Most steps change nothing (or only lr), and comparing shallow copies of the groups is one C-level dict
    comparison per group, where converting them is a Python loop over every key.  The comparison is sound only for
    values that a shallow copy freezes: a group holding anything else (a tensor lr, a list of betas that could be
    edited in place) is converted at every step."""

    def __init__(self) -> None:
        self._raw: list[dict[str, Any]] | None = None
        self._groups: Groups | None = None

    def read(self, optimizer: torch.optim.Optimizer) -> Groups:
        groups = optimizer.param_groups
        raw = self._raw
        if raw is not None and len(raw) == len(groups) and all(r == g for r, g in zip(raw, groups, strict=True)):
            return self._groups  # type: ignore[return-value]
        self._groups = applied_hparams(optimizer)
        frozen = all(type(v) in _IMMUTABLE for g in groups for k, v in g.items() if k != "params")
        self._raw = [dict(g) for g in groups] if frozen else None
        return self._groups


def hparams_delta(previous: Groups | None, current: Groups) -> Groups:
    """Per group, the keys whose value differs from `previous` (all keys when there is no previous step)."""
    if previous is None or len(previous) != len(current):
        return [dict(g) for g in current]
    if previous is current:  # `_HparamsReader` hands back the same object when nothing changed
        return [{} for _ in current]
    return [
        {k: v for k, v in cur.items() if k not in prev or prev[k] != v or type(prev[k]) is not type(v)}
        for prev, cur in zip(previous, current, strict=True)
    ]


def expand_hparams(deltas: Sequence[str]) -> list[Groups]:
    """The full per-group hyperparameters of every step of one stage from its recorded deltas (in step order)."""
    out: list[Groups] = []
    current: Groups | None = None
    for text in deltas:
        delta = json.loads(text)
        if current is None or len(delta) != len(current):
            current = [dict(g) for g in delta]
        else:
            current = [{**c, **d} for c, d in zip(current, delta, strict=True)]
        out.append(current)
    return out


# ----------------------------------------------------------------------------------------------- fingerprint


@torch.no_grad()
def param_norms(params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """||theta_i||_2 of every parameter tensor in its own dtype, as 0-d tensors on their devices (no sync; one
    foreach call — the only work the training thread does for the fingerprint).  The parameters go in as they
    are: under no_grad no graph is built, and a `detach()` each would cost a dispatch per tensor per step.  Not
    accumulated in float64: that converted every tensor first and tripled the cost, and the fingerprint only has to
    be reproducible, which the same kernel on the same parameters is."""
    try:
        return list(torch._foreach_norm(list(params), 2))
    except (AttributeError, RuntimeError, TypeError):
        return [torch.linalg.vector_norm(t) for t in params]


def fingerprint_value(norms: Sequence[torch.Tensor]) -> float:
    """The recorded fingerprint: the per-tensor norms summed in order as Python (double) floats."""
    total = 0.0
    for n in norms:
        total += float(n)
    return total


def param_fingerprint(params: Sequence[torch.Tensor]) -> float:
    """sum_i ||theta_i||_2 (norms in the parameters' dtype, summed in parameter order as doubles): what
    `optimizer_steps` records."""
    return fingerprint_value(param_norms(params))


def fingerprints_differ(recorded: float, replayed: float) -> bool:
    """True when two fingerprints cannot come from the same parameters (float64 summation order aside)."""
    return abs(recorded - replayed) > 1e-12 * max(1.0, abs(recorded))


# ----------------------------------------------------------------------------------------------- clipping


def apply_clip(params: Sequence[torch.Tensor], clip: dict[str, Any] | None) -> None:
    """Apply a recorded clipping rule to the gradients of `params` with torch's own function."""
    if not clip:
        return
    if clip["rule"] == "norm":
        torch.nn.utils.clip_grad_norm_(params, clip["max_norm"], norm_type=float(clip["norm_type"]))
    elif clip["rule"] == "value":
        torch.nn.utils.clip_grad_value_(params, clip["clip_value"])
    else:
        raise ValueError(f"unknown clipping rule {clip['rule']!r}")


def _holders(grads: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Stand-in tensors whose .grad are copies of `grads` (torch's clip functions take parameters)."""
    out = []
    for g in grads:
        t = torch.empty_like(g)
        t.grad = g.clone()
        out.append(t)
    return out


def _reproduces(acc: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], clip: dict[str, Any]) -> bool:
    holders = _holders(acc)
    try:
        apply_clip(holders, clip)
    except (RuntimeError, ValueError):
        return False
    return all(torch.equal(h.grad, g) for h, g in zip(holders, grads, strict=True))


def _short_decimals(raw: float, digits: range, *, exact: bool) -> list[float]:
    """`raw` rounded to 1, 2, ... significant digits (deduplicated, positive), then `raw` itself if `exact`."""
    out = []
    for d in digits:
        cand = float(f"{raw:.{d}g}")
        if cand > 0 and cand not in out:
            out.append(cand)
    if exact and raw > 0 and raw not in out:
        out.append(raw)
    return out


def infer_clip(acc: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]) -> dict[str, Any] | None:
    """The clip_grad_norm_ / clip_grad_value_ call that turns `acc` into `grads` exactly, or None."""
    flat_a = torch.cat([a.detach().reshape(-1) for a in acc]).to(torch.float64)
    flat_g = torch.cat([g.detach().reshape(-1) for g in grads]).to(torch.float64)
    if not (torch.isfinite(flat_a).all() and torch.isfinite(flat_g).all()):
        return None
    i = int(flat_a.abs().argmax())
    if flat_a[i] != 0:
        coef = float(flat_g[i] / flat_a[i])
        if 0 < coef < 1:
            for norm_type in (2.0, math.inf):
                total = float(torch.nn.utils.get_total_norm(list(acc), norm_type))
                # a max_norm of at most 4 significant digits: an arbitrary rescaling (the loop scaling its
                # gradients by hand) must not pass for clipping by some threshold that happens to reproduce it
                for max_norm in _short_decimals(coef * (total + 1e-6), range(1, 5), exact=False):
                    clip = {"rule": "norm", "max_norm": max_norm, "norm_type": norm_type}
                    if _reproduces(acc, grads, clip):
                        return clip
    value = float(flat_g.abs().max())
    if value > 0:
        for clip_value in _short_decimals(value, range(1, 10), exact=True):
            clip = {"rule": "value", "clip_value": clip_value}
            if _reproduces(acc, grads, clip):
                return clip
    return None


# ----------------------------------------------------------------------------------------------- the hooks


def _copy_on_write(t: torch.Tensor) -> torch.Tensor:
    """A clone whose data is copied only when one of the two is written (plain clone where torch lacks that)."""
    return t.clone()


_lazy_clone: Callable[[torch.Tensor], torch.Tensor] = getattr(torch, "_lazy_clone", _copy_on_write)


@dataclass
class StepFacts:
    """What one optimizer step applied: hyperparameters per group, clipping, alteration, fingerprint after it."""

    groups: Groups
    clip: dict[str, Any] | None
    grads_altered: bool
    fingerprint: list[torch.Tensor] | None  # per-tensor norms; summed at flush (`fingerprint_value`)


class StepHooks:
    """The hooks of one stage's optimizer; `on_step(facts)` is called after every optimizer step."""

    def __init__(self, optimizer: torch.optim.Optimizer, on_step: Callable[[StepFacts], None]) -> None:
        self._optimizer = optimizer
        self._on_step = on_step
        self._params = [p for g in optimizer.param_groups for p in g["params"]]
        self._hparams = _HparamsReader()
        # per parameter: a copy-on-write clone of its gradient as backward accumulated it, that gradient tensor
        # itself (a strong reference costs nothing more: the clone shares its storage) and its version counter then
        self._acc: list[torch.Tensor | None] = [None] * len(self._params)
        self._seen: list[torch.Tensor | None] = [None] * len(self._params)
        self._version: list[int] = [0] * len(self._params)
        self._pending: StepFacts | None = None
        self._handles = [
            optimizer.register_step_pre_hook(self._pre),
            optimizer.register_step_post_hook(self._post),
        ]
        for i, p in enumerate(self._params):
            if p.requires_grad:
                self._handles.append(p.register_post_accumulate_grad_hook(self._accumulate_hook(i)))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _accumulate_hook(self, i: int) -> Callable[[torch.Tensor], None]:
        acc, seen, version, clone = self._acc, self._seen, self._version, _lazy_clone  # bound once: runs for
        # every parameter at every backward, so its body is kept to a clone and three stores

        def accumulated(param: torch.Tensor) -> None:
            grad = param.grad
            if grad is not None:
                acc[i] = clone(grad)
                seen[i] = grad
                version[i] = grad._version

        return accumulated

    def _untouched(self) -> bool:
        """True when every gradient is still the tensor backward accumulated, not modified in place since."""
        for p, seen, version in zip(self._params, self._seen, self._version, strict=True):
            grad = p.grad
            if grad is not None and (grad is not seen or grad._version != version):
                return False
        return True

    def _gradient_change(self) -> tuple[dict[str, Any] | None, bool]:
        if self._untouched():
            return None, False
        acc, grads = [], []
        for i, p in enumerate(self._params):
            if p.grad is None:
                continue
            a = self._acc[i]
            if a is None or a.shape != p.grad.shape or a.dtype != p.grad.dtype:
                return None, True
            acc.append(a)
            grads.append(p.grad)
        if all(torch.equal(a, g) for a, g in zip(acc, grads, strict=True)):
            return None, False
        clip = infer_clip(acc, grads)
        return clip, clip is None

    def _pre(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        clip, altered = self._gradient_change()
        self._pending = StepFacts(self._hparams.read(optimizer), clip, altered, None)

    def _post(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        facts, self._pending = self._pending, None
        if facts is None:  # a post-hook without its pre-hook (cannot happen with torch's wrapper)
            facts = StepFacts(applied_hparams(optimizer), None, True, None)
        facts.fingerprint = param_norms(self._params)
        self._on_step(facts)


# ----------------------------------------------------------------------------------------------- buffered rows


@dataclass
class StepBuffer:
    """Pending `optimizer_steps` rows; converted to Arrow once per flush (fingerprints synced there)."""

    step: list[int] = field(default_factory=list)
    stage_id: list[int] = field(default_factory=list)
    hparams: list[Groups] = field(default_factory=list)
    clip: list[dict[str, Any] | None] = field(default_factory=list)
    grads_altered: list[bool] = field(default_factory=list)
    fingerprint: list[list[torch.Tensor] | None] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.step)

    def add(self, step: int, stage_id: int, delta: Groups, facts: StepFacts) -> None:
        self.step.append(step)
        self.stage_id.append(stage_id)
        self.hparams.append(delta)
        self.clip.append(facts.clip)
        self.grads_altered.append(facts.grads_altered)
        self.fingerprint.append(facts.fingerprint)

    def table(self) -> pa.Table:
        fps = [None if f is None else fingerprint_value(f) for f in self.fingerprint]
        return pa.table(
            {
                "step": pa.array(self.step, pa.int64()),
                "stage_id": pa.array(self.stage_id, pa.int32()),
                "hparams": pa.array([canonical_json(h) for h in self.hparams], pa.string()),
                "clip": pa.array([None if c is None else canonical_json(c) for c in self.clip], pa.string()),
                "grads_altered": pa.array(self.grads_altered, pa.bool_()),
                "param_fingerprint": pa.array(fps, pa.float64()),
            }
        )
