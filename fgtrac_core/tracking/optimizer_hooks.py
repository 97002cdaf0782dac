"""What each optimizer step applied, seen from inside ``optimizer.step()`` (attached by `Run.stage`).

For the stage's optimizer the recorder registers
  * a post-accumulate-grad hook per parameter: the gradient tensor backward accumulated and its version counter,
    and — while the loop is known to modify gradients (from the stage's first step, and from any step that
    modified them) — a copy-on-write clone of it (no data is copied unless the loop then writes the gradient, as
    clipping does);
  * a step post-hook: it reads every param group's hyperparameters as the step applied them — whatever order the
    loop calls ``scheduler.step()`` and ``log_batch`` in — and, only when a gradient was replaced or modified in
    place since backward (identity and version counter), compares the gradients the optimizer stepped on with the
    accumulated copies.  A difference is explained as torch's ``clip_grad_norm_`` (norm type 2 or inf) or
    ``clip_grad_value_`` with a short threshold that reproduces it *exactly* (re-applying torch's own function to
    copies), else the step is marked "gradients altered by the loop".  A gradient no backward of the step
    accumulated but all zeros (``zero_grad(set_to_none=False)`` on a parameter the step did not use) is listed
    (``"zeros"``: replay steps on zeros there too); one that is not all zeros (left from the previous step) is
    marked altered, rule ``unknown`` with its parameters listed (``"stale"``).  A loop that
    first modifies gradients after steps that left them alone has no copies at that step: it is marked altered
    with the rule ``unknown``.  Then it takes a cheap fingerprint of the parameters (`ParamFingerprint`: per param
    group, a copy of the leading values of its smallest trainable tensor, reduced to a float at flush), and the
    facts go to the recorder, which numbers the step.
All hooks are removed at the stage end.  `param_fingerprint` and `apply_clip` are shared with replay.

On CUDA a host sync per step would stall the loop until the device caught up, so once a rule has been inferred
the following steps assume it and check it on the device (`_DeviceFlag`, read without waiting once the device is
done, at the flush at the latest): a step it does not reproduce is recorded as ``unknown`` and altered, and the
steps after that check was read are inferred again.  (Exact replay refuses stages trained on a GPU anyway.)

Per step the training thread pays one Python call per parameter (plus a clone dispatch each while copies are
kept) and one for the step, an identity and version check per gradient, one dict comparison per param group
(the groups are copied only at the steps that change them, a scheduler's every step in many loops), a byte copy
per param group, and one tuple appended; the hyperparameters' conversion and deltas, JSON encoding and the
fingerprint's reduction happen at flush.
The gradients and copies a step saw are let go after it, so zero_grad() frees them as it would without hooks.  A
torch dispatch costs ~10-25 us inside a training loop (far more than in a microbenchmark), so the per-step path
keeps none where it can: copies are dropped after the first step that leaves every gradient as backward made it
(a loop that clips does so from its first step in all but rare cases, which are refused by name), and the
fingerprint is read through a memory view.
"""

from __future__ import annotations

import collections
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from fgtrac_core._json import canonical_json

_SKIP = object()
_DATA_PTR = torch.Tensor.data_ptr
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


def _group_values(group: Mapping[str, Any]) -> dict[str, Any]:
    """One param group's JSON-able hyperparameters (its parameters left out)."""
    values = {}
    for k, v in group.items():
        if type(v) in _PLAIN:  # most values: skip the general conversion
            values[k] = v
        elif k != "params" and (value := _hparam_value(v)) is not _SKIP:
            values[k] = value
    return values


def applied_hparams(optimizer: torch.optim.Optimizer) -> Groups:
    """Every param group's JSON-able hyperparameters as they are now (lr, momentum, betas, weight_decay...)."""
    return [_group_values(group) for group in optimizer.param_groups]


def json_groups(groups: Groups) -> Groups:
    """`groups` as `applied_hparams` gives them: a step's groups the hooks held as shallow copies (`_HparamsReader`)
    are converted (they still hold their "params"); converted ones are returned as they are."""
    return [_group_values(g) if "params" in g else g for g in groups]


def trained_on(optimizer: torch.optim.Optimizer) -> str:
    """The devices holding the optimizer's parameters, e.g. ``cpu`` or ``cuda:0 (NVIDIA H200)``: exact replay
    runs on the CPU, so a stage trained elsewhere is refused by name rather than replayed into a mismatch."""
    names = []
    for device in sorted({p.device for g in optimizer.param_groups for p in g["params"]}, key=str):
        name = str(device)
        if device.type == "cuda":
            name += f" ({torch.cuda.get_device_name(device)})"
        names.append(name)
    return ", ".join(names)


def model_order(params: Sequence[torch.Tensor], model: torch.nn.Module | None) -> list[int] | None:
    """Per parameter of `params` its position among `model.parameters()`, or None when they already come in that
    order (or some are not the model's, or there is no model)."""
    if model is None:
        return None
    position = {id(p): k for k, p in enumerate(model.parameters())}
    rank = [position.get(id(p)) for p in params]
    if None in rank or rank == sorted(rank):  # type: ignore[type-var]
        return None
    return rank  # type: ignore[return-value]


def optimizer_params(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> list[list[str | None]]:
    """Per param group, the name in `model.named_parameters()` of each parameter the optimizer holds (None for
    one that is not the model's): replay builds the stage's optimizer over the same parameters in the same order,
    whether the loop optimizes all of them in model order, in groups of its own order, or a subset (a head-only
    finetune)."""
    names = {id(p): name for name, p in model.named_parameters()}
    return [[names.get(id(p)) for p in group["params"]] for group in optimizer.param_groups]


class _HparamsReader:
    """The param groups as the step applied them: the previous step's result (the same object) when no group
    changed, else shallow copies of the groups, turned into JSON-able values at flush (`json_groups`).

    Most steps change nothing (or only lr), and comparing shallow copies of the groups is one C-level dict
    comparison per group, where converting them is a Python loop over every key.  A shallow copy is sound only for
    values it freezes: a group holding anything else (a tensor lr, a list of betas that could be edited in place)
    is converted at every step."""

    def __init__(self) -> None:
        self._raw: list[dict[str, Any]] | None = None
        self._groups: Groups | None = None

    def read(self, optimizer: torch.optim.Optimizer) -> Groups:
        groups = optimizer.param_groups
        try:
            same = self._raw == groups  # one C-level comparison (a group's 'params' list compares by identity)
        except RuntimeError:  # a 'params' list replaced by one holding other tensors: Tensor.__eq__ has no bool
            same = False
        if same:
            return self._groups  # type: ignore[return-value]
        if all(type(v) in _IMMUTABLE for g in groups for k, v in g.items() if k != "params"):
            # a scheduler changed a value (at every step, in many loops): copied now, converted at flush
            self._raw = self._groups = [dict(g) for g in groups]
        else:
            self._raw, self._groups = None, applied_hparams(optimizer)
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


_FINGERPRINT_ELEMENTS = 4096  # at most this many leading elements of each group's tensor are read


def fingerprint_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The tensors the parameter fingerprint reads: per param group, its smallest parameter that requires grad
    (ties: the last; groups with none are skipped), of which the leading `_FINGERPRINT_ELEMENTS` values.

    One small tensor per group, not all of them, because a norm per tensor per step was the hooks' largest cost
    (and read every parameter, O(model) per step).  It loses no step in the cases replay diagnoses: a recorded
    hyperparameter, clipping rule, batch or target that differs from what the loop did changes the update of every
    tensor the group trains, this one included, at that very step; a divergence that starts in another tensor
    alone (a nondeterministic kernel, a parameter edited outside the step) reaches it through the forward pass and
    shows one step later."""
    out = []
    for group in optimizer.param_groups:
        trained = [p for p in group["params"] if p.requires_grad]
        if trained:
            smallest = min(p.numel() for p in trained)
            out.append([p for p in trained if p.numel() == smallest][-1])
    return out


def _leading(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1)[:_FINGERPRINT_ELEMENTS]


def _host_bytes(t: torch.Tensor) -> memoryview | None:
    """A byte view of `_leading(t)` sharing the parameter's memory (CPU, contiguous), else None."""
    if t.device.type != "cpu" or not t.is_contiguous():
        return None
    try:
        return memoryview(_leading(t).view(torch.uint8).numpy())
    except (RuntimeError, TypeError, ValueError):
        return None


Snapshot = tuple[list[torch.dtype], list[bytes | torch.Tensor]]


class ParamFingerprint:
    """Snapshots of the fingerprinted values (`fingerprint_tensors`) after a step; `fingerprint_value` turns one
    into the recorded float at flush.

    On CPU a snapshot is a byte copy through a memory view bound once (no torch dispatch: a norm per step measured
    ~20-25 us inside the training loop, a byte copy ~1-2 us); elsewhere a device clone of the leading values (no
    host sync).  A parameter whose storage the loop replaced (`p.data = ...`) is bound again."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self._tensors = fingerprint_tensors(optimizer)
        self._bind()

    def _bind(self) -> None:
        self._ptrs = [t.data_ptr() for t in self._tensors]
        self._dtypes = [t.dtype for t in self._tensors]
        self._views = [_host_bytes(t) for t in self._tensors]
        self._on_host = None not in self._views

    def snapshot(self) -> Snapshot:
        if list(map(_DATA_PTR, self._tensors)) != self._ptrs:
            self._bind()
        if self._on_host:  # every step on the CPU: one C-level pass
            return self._dtypes, list(map(memoryview.tobytes, self._views))
        pairs = zip(self._tensors, self._views, strict=True)
        return self._dtypes, [_leading(t).clone() if v is None else v.tobytes() for t, v in pairs]


# dtypes numpy reads itself, without torch's dispatch: `fingerprint_value` took ~9 us a step instead of ~28 in the
# writer (sample loop, thread time); the float64 values, and so the sum, are the same bits either way
_NUMPY_DTYPES = {torch.float16: np.float16, torch.float32: np.float32, torch.float64: np.float64}


def _as_float64(part: bytes | torch.Tensor, dtype: torch.dtype) -> np.ndarray:
    if isinstance(part, bytes):
        if dtype in _NUMPY_DTYPES:
            return np.frombuffer(part, _NUMPY_DTYPES[dtype]).astype(np.float64)
        part = torch.from_numpy(np.frombuffer(part, dtype=np.uint8).copy()).view(dtype)
    return part.detach().to("cpu", torch.float64).numpy()


def fingerprint_value(snapshot: Snapshot) -> float:
    """The recorded fingerprint: sum over groups of the L2 norm of the snapshot's values, in float64 (numpy's
    summation, the same on every machine for the same values)."""
    total = 0.0
    for dtype, part in zip(*snapshot, strict=True):
        values = _as_float64(part, dtype)
        total += float(np.sqrt(np.sum(values * values)))
    return total


def param_fingerprint(optimizer: torch.optim.Optimizer) -> float:
    """The fingerprint of the optimizer's parameters as they are now: what `optimizer_steps` records after each
    step (replay compares its own with it)."""
    return fingerprint_value(ParamFingerprint(optimizer).snapshot())


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


def _differ(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> torch.Tensor:
    """A 0-dim bool tensor on the pairs' device: whether any pair (same shapes) differs (NaN differs, as in
    `torch.equal`).  Reading it is the only host sync."""
    return torch.stack([torch.ne(x, y).any() for x, y in zip(a, b, strict=True)]).any()


def _all_equal(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> bool:
    """`torch.equal` of every pair (same shapes); on an accelerator with one host sync for all of them, not one
    per tensor."""
    if not a or a[0].device.type == "cpu":
        return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    return not bool(_differ(a, b))


def _clipped(acc: Sequence[torch.Tensor], clip: dict[str, Any]) -> list[torch.Tensor] | None:
    """Copies of `acc` with the rule applied by torch's own function (None when it cannot be applied)."""
    holders = _holders(acc)
    try:
        apply_clip(holders, clip)
    except (RuntimeError, ValueError):
        return None
    return [h.grad for h in holders]


def _reproduces(acc: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], clip: dict[str, Any]) -> bool:
    clipped = _clipped(acc, clip)
    return clipped is not None and _all_equal(clipped, grads)


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


@dataclass(slots=True)
class StepFacts:
    """What one optimizer step applied: hyperparameters per group, clipping, alteration, fingerprint after it."""

    groups: Groups
    clip: dict[str, Any] | None
    grads_altered: bool
    fingerprint: Snapshot | None  # turned into the recorded float at flush (`fingerprint_value`)
    # on CUDA, `clip` is the rule of an earlier step, checked without a host sync: true when it did not reproduce
    # the gradients, read at flush at the latest (the step is then recorded as UNKNOWN_CLIP)
    unconfirmed: _DeviceFlag | None = None


class _DeviceFlag:
    """A CUDA bool computed by queued kernels, copied into pinned host memory behind them: `ready()` asks without
    waiting, `value()` waits for it (never for kernels queued after it)."""

    def __init__(self, flag: torch.Tensor) -> None:
        self._host = torch.empty((), dtype=torch.bool, pin_memory=True)
        self._host.copy_(flag, non_blocking=True)
        self._event = torch.cuda.Event()
        self._event.record(torch.cuda.current_stream(flag.device))

    def ready(self) -> bool:
        return self._event.query()

    def value(self) -> bool:
        self._event.synchronize()
        return bool(self._host)


# recorded when the loop modified gradients at a step the hooks held no copies of; with "stale": [indices into the
# optimizer's parameters] when the step stepped on gradients no backward of it produced that were not all zero
UNKNOWN_CLIP = {"rule": "unknown"}
# recorded, with "zeros": [indices into the optimizer's parameters], for a step that did not clip but stepped on
# zeroed gradients of parameters its backward did not reach (zero_grad(set_to_none=False)); a clipping rule
# carries "zeros" the same way
NO_CLIP = {"rule": "none"}


def is_unknown(clip: dict[str, Any] | None) -> bool:
    """Whether a recorded clipping rule says what the loop did to the gradients is unknown (`UNKNOWN_CLIP`)."""
    return clip is not None and clip.get("rule") == UNKNOWN_CLIP["rule"]


def clipping(clip: dict[str, Any] | None) -> dict[str, Any] | None:
    """The clipping rule of a recorded `clip` value that `apply_clip` applies (None: no clipping, or unknown)."""
    return None if clip is None or clip.get("rule") in (UNKNOWN_CLIP["rule"], NO_CLIP["rule"]) else clip


def zeroed(clip: dict[str, Any] | None) -> list[int]:
    """Indices (into the optimizer's parameters) whose gradient the step took as zeros though its backward did not
    reach them (`NO_CLIP`)."""
    return [] if clip is None else list(clip.get("zeros", ()))


class StepHooks:
    """The hooks of one stage's optimizer; `on_step(facts)` is called after every optimizer step."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        on_step: Callable[[StepFacts], None],
        model: torch.nn.Module | None = None,
    ) -> None:
        self._on_step = on_step
        self._params = [p for g in optimizer.param_groups for p in g["params"]]
        # per optimizer parameter, its position among `model`'s parameters, when the optimizer holds them in
        # another order (a clipping rule is then also tried in the model's order; None: same order, or no model)
        self._model_rank = model_order(self._params, model)
        self._fingerprint = ParamFingerprint(optimizer)
        self._hparams = _HparamsReader()
        # per parameter: the gradient tensor backward accumulated, its version counter then, and (while copying)
        # a copy-on-write clone of it
        self._seen: list[torch.Tensor | None] = [None] * len(self._params)
        self._version: list[int] = [0] * len(self._params)
        self._acc: list[torch.Tensor | None] = [None] * len(self._params)
        self._none: list[None] = [None] * len(self._params)
        # copies are taken for the stage's first step and, once the loop has modified gradients, for every step
        self._copying = True
        self._modifies = False
        self._rule: dict[str, Any] | None = None  # the clipping rule last inferred in this stage
        self._on_cuda = bool(self._params) and all(p.device.type == "cuda" for p in self._params)
        # gradients accumulated so far, one per parameter per backward: the recorder reads it to tell a batch
        # logged after its backward from one logged before it (`Run.log_batch`)
        self.accumulations = [0]
        self._checks: collections.deque[_DeviceFlag] = collections.deque()  # unread checks of an assumed rule
        self._handles = [optimizer.register_step_post_hook(self._post)]
        for i, p in enumerate(self._params):
            if p.requires_grad:
                self._handles.append(p.register_post_accumulate_grad_hook(self._accumulate_hook(i)))

    @property
    def copying(self) -> bool:
        """Whether the next backward's gradients are copied (the loop modified gradients, or no step ran yet)."""
        return self._copying

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _accumulate_hook(self, i: int) -> Callable[[torch.Tensor], None]:
        # bound once: this runs for every parameter at every backward.  Copy-on-write only on the CPU: CUDA's
        # fused (foreach) kernels, which clip_grad_norm_ uses there, write through a lazy clone's shared storage
        seen, version, acc, count = self._seen, self._version, self._acc, self.accumulations
        clone = _lazy_clone if self._params[i].device.type == "cpu" else torch.Tensor.clone

        def accumulated(param: torch.Tensor) -> None:
            count[0] += 1
            grad = param.grad
            if grad is not None:
                seen[i] = grad
                version[i] = grad._version
                if self._copying:
                    acc[i] = clone(grad)

        return accumulated

    def _untouched(self) -> bool:
        """True when every gradient is still the tensor backward accumulated, not modified in place since."""
        for p, seen, version in zip(self._params, self._seen, self._version, strict=True):
            grad = p.grad
            if grad is not None and (grad is not seen or grad._version != version):
                return False
        return True

    def _gradient_change(self) -> tuple[dict[str, Any] | None, bool, _DeviceFlag | None]:
        """(clipping rule, altered otherwise, unconfirmed: see `StepFacts`) of the gradients the optimizer stepped
        on."""
        if self._untouched():
            if self._copying and not self._modifies:
                self._copying = False
            return None, False, None
        # a gradient no backward of this step accumulated (seen is cleared after every step): a zeroed one that
        # zero_grad(set_to_none=False) left on a parameter the step did not use (the step used zeros there, which
        # replay can do), or the previous step's (it cannot)
        pairs = enumerate(zip(self._params, self._seen, strict=True))
        zeros = [i for i, (p, seen) in pairs if seen is None and p.grad is not None]
        if zeros and any(bool(self._params[i].grad.any()) for i in zeros):
            self._modifies = self._copying = True
            return {**UNKNOWN_CLIP, "stale": zeros}, True, None
        for i in zeros:  # all zeros, whatever the loop did to them: taken as they are, the others checked as usual
            self._seen[i], self._version[i] = self._params[i].grad, self._params[i].grad._version
        if zeros and self._untouched():
            if not self._modifies:
                self._copying = False
            return {**NO_CLIP, "zeros": zeros}, False, None
        clip, altered, unconfirmed = self._modification(frozenset(zeros))
        return ({**(clip or NO_CLIP), "zeros": zeros} if zeros else clip), altered, unconfirmed

    def _modification(self, zeros: frozenset[int]) -> tuple[dict[str, Any] | None, bool, _DeviceFlag | None]:
        """`_gradient_change` of gradients backward produced (not those in `zeros`) and the loop then changed."""
        self._modifies = self._copying = True
        acc, grads, held = [], [], []
        for i, p in enumerate(self._params):
            if p.grad is None or i in zeros:
                continue
            a = self._acc[i]
            if a is None:  # no copy of what backward made: the first modification after untouched steps
                return dict(UNKNOWN_CLIP), True, None
            if a.shape != p.grad.shape or a.dtype != p.grad.dtype:
                return None, True, None
            acc.append(a)
            grads.append(p.grad)
            held.append(i)
        while self._checks and self._checks[0].ready():  # earlier steps' checks the device has finished
            if self._checks.popleft().value():  # the loop changed what it does: infer again from here on
                self._rule = None
        if self._rule is not None and self._on_cuda:
            # on CUDA the rule found at an earlier step is assumed and checked on the device, read when done: no
            # host sync per step (each one stalled the loop until the device caught up).  A step the rule leaves
            # unchanged replays the same under either record
            ordered = self._rule.get("order") == "model"
            clipped = _clipped(self._in_model_order(acc, held) if ordered else acc, self._rule)
            if clipped is not None:
                flag = _DeviceFlag(_differ(clipped, self._in_model_order(grads, held) if ordered else grads))
                self._checks.append(flag)
                return dict(self._rule), False, flag
        if _all_equal(acc, grads):
            return None, False, None
        # the optimizer's order, and when it holds the parameters in another order than the model's, the model's
        # (a loop clipping model.parameters()): torch sums the per-tensor norms in the order given, so only the
        # loop's order reproduces the bits.  The order that reproduced the previous step is tried first
        orders = [None] if self._model_rank is None else [None, "model"]
        if self._rule is not None and self._rule.get("order") in orders:
            orders.sort(key=lambda order: order != self._rule.get("order"))  # type: ignore[union-attr]
        clip = None
        for order in orders:
            if order is None:
                clip = infer_clip(acc, grads)
            else:
                clip = infer_clip(self._in_model_order(acc, held), self._in_model_order(grads, held))
            if clip is not None:
                if order is not None:
                    clip["order"] = order
                self._rule = clip
                break
        return clip, clip is None, None

    def _in_model_order(self, tensors: list[torch.Tensor], held: list[int]) -> list[torch.Tensor]:
        """`tensors` (one per optimizer parameter index in `held`) in the order of the model's parameters."""
        if self._model_rank is None:
            return tensors
        rank = self._model_rank
        return [t for _, t in sorted(zip((rank[i] for i in held), tensors, strict=True), key=lambda pair: pair[0])]

    def _post(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        # Read after the step, not before: the supported optimizers step on p.grad without writing it and change no
        # group value, so the gradients and hyperparameters are still those the step applied, and one hook per
        # step costs less than two.
        clip, altered, unconfirmed = self._gradient_change()
        # let go of this backward's gradients and copies: held until the next backward, they kept a second set of
        # gradients alive through it after zero_grad() (a step without a backward of its own is then "altered")
        self._seen[:] = self._acc[:] = self._none
        self._on_step(
            StepFacts(self._hparams.read(optimizer), clip, altered, self._fingerprint.snapshot(), unconfirmed)
        )


# ----------------------------------------------------------------------------------------------- buffered rows


class StepBuffer:
    """Pending `optimizer_steps` rows, one tuple each (the per-step cost is one append); turned into Arrow columns
    once per flush, where the hyperparameters' deltas are taken and the fingerprints reduced."""

    def __init__(self) -> None:
        self._rows: list[tuple[int, int, Groups | None, StepFacts, list[int] | None]] = []

    def __len__(self) -> int:
        return len(self._rows)

    def add(
        self, step: int, stage_id: int, previous: Groups | None, facts: StepFacts, seeds: list[int] | None = None
    ) -> None:
        """Buffer one step; `previous` is the hyperparameters of the stage's step before it (None at its first:
        all values are recorded); `seeds` those of the model's training forwards that fed it (`ForwardSeeds`;
        None when the stage does not reseed them)."""
        self._rows.append((step, stage_id, previous, facts, seeds))

    def table(self) -> pa.Table:
        steps, stage_ids, previous, facts, seeds = zip(*self._rows, strict=True) if self._rows else ((),) * 5
        converted: dict[int, Groups] = {}  # by the held object: a step that changed nothing keeps its predecessor's

        def json_of(groups: Groups | None) -> Groups | None:
            if groups is None:
                return None
            if id(groups) not in converted:
                converted[id(groups)] = json_groups(groups)
            return converted[id(groups)]

        deltas = [hparams_delta(json_of(p), json_of(f.groups)) for p, f in zip(previous, facts, strict=True)]
        clips, altered = [f.clip for f in facts], [f.grads_altered for f in facts]
        for i, f in enumerate(facts):
            if f.unconfirmed is not None and f.unconfirmed.value():  # the assumed rule did not reproduce the step
                clips[i], altered[i] = dict(UNKNOWN_CLIP), True
        return pa.table(
            {
                "step": pa.array(steps, pa.int64()),
                "stage_id": pa.array(stage_ids, pa.int32()),
                "hparams": pa.array([canonical_json(d) for d in deltas], pa.string()),
                "clip": pa.array([None if c is None else canonical_json(c) for c in clips], pa.string()),
                "grads_altered": pa.array(altered, pa.bool_()),
                "param_fingerprint": pa.array(
                    [None if f.fingerprint is None else fingerprint_value(f.fingerprint) for f in facts], pa.float64()
                ),
                "forward_seeds": pa.array([None if s is None else canonical_json(s) for s in seeds], pa.string()),
            }
        )
