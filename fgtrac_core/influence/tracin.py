"""TracInCP with exact last-layer gradients, as a functional API that needs no recorded run.

For a final `nn.Linear` layer with input `a` and loss gradient `δ = ∂ℓ/∂(layer output)` (softmax − onehot for
cross-entropy), the weight gradient is `δ aᵀ` and the bias gradient `δ`, so two samples' gradient dot product is
`(δ·δ')(a·a' + 1)` — two matmuls per checkpoint for a whole block of pairs, no per-sample autograd:

    score(z_test, z_train) = Σ_c lr_c (δ_c(z_test)·δ_c(z_train)) (a_c(z_test)·a_c(z_train) + 1)

Sign convention everywhere: positive = proponent (a gradient step on the training sample lowers the test loss),
negative = opponent.  Units: learning rate × squared loss-gradient norm (summed over checkpoints).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fgtrac_core.errors import FgtracError

Data = Dataset | tuple[torch.Tensor, torch.Tensor] | list[torch.Tensor]
Checkpoint = tuple[str | Path | dict[str, torch.Tensor], float]


@dataclass(frozen=True)
class TopK:
    """Per test example: the k most positive (proponents) and most negative (opponents) training samples.

    Indices are positions in the training data; scores are in the same units as the full score matrix.
    """

    proponent_indices: torch.Tensor
    proponent_scores: torch.Tensor
    opponent_indices: torch.Tensor
    opponent_scores: torch.Tensor


@dataclass
class _Factors:
    """δ (n, out) and a (n, in) of one data set at one checkpoint."""

    delta: torch.Tensor
    act: torch.Tensor


def _device(device: str | torch.device | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _as_tensors(data: Data, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(data, tuple | list) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        x, y = data
    else:
        try:
            n = len(data)  # type: ignore[arg-type]
        except TypeError:
            raise FgtracError(f"{what} must be a Dataset or an (inputs, labels) pair of tensors") from None
        if n == 0:
            raise FgtracError(f"{what} is empty")
        x, y = next(iter(DataLoader(data, batch_size=n, shuffle=False)))  # type: ignore[arg-type]
    if len(x) == 0:
        raise FgtracError(f"{what} is empty")
    if len(x) != len(y):
        raise FgtracError(f"{what}: {len(x)} inputs but {len(y)} labels")
    return x, y


def _linear_layer(model: nn.Module, layer: str) -> nn.Linear:
    modules = dict(model.named_modules())
    if layer not in modules:
        raise FgtracError(
            f"the model has no layer named {layer!r} (layers: {', '.join(n for n in modules if n)})"
        )
    module = modules[layer]
    if not isinstance(module, nn.Linear):
        raise FgtracError(f"last_layer mode needs {layer!r} to be nn.Linear, not {type(module).__name__}")
    return module


def load_state_dict(checkpoint: str | Path | dict[str, Any]) -> dict[str, torch.Tensor]:
    """A model state dict from a path or dict; accepts fgtrac checkpoint files (`{"model": ...}`)."""
    state = (
        torch.load(checkpoint, map_location="cpu", weights_only=True)
        if isinstance(checkpoint, str | Path)
        else checkpoint
    )
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise FgtracError(f"checkpoint {checkpoint!r} holds no state dict")
    return state


def _per_sample_loss(loss_fn: Callable[..., torch.Tensor] | None) -> Callable[..., torch.Tensor]:
    return loss_fn if loss_fn is not None else (lambda out, y: F.cross_entropy(out, y, reduction="none"))


def head_factors(
    model: nn.Module,
    layer: str,
    data: Data,
    *,
    loss_fn: Callable[..., torch.Tensor] | None = None,
    batch_size: int = 1024,
    device: str | torch.device | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(δ, a) of every sample for the model's current parameters: δ = ∂ℓ/∂(layer output), a = the layer's input.

    `loss_fn(outputs, labels)` must return per-sample losses (default: cross-entropy, reduction "none").
    """
    head = _linear_layer(model, layer)
    dev = _device(device)
    x, y = _as_tensors(data, "data")
    fn = _per_sample_loss(loss_fn)
    captured: dict[str, torch.Tensor] = {}

    def hook(_m: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        captured["a"], captured["out"] = inputs[0], output

    handle = head.register_forward_hook(hook)
    deltas, acts = [], []
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(x), batch_size):
            xb, yb = x[start : start + batch_size].to(dev), y[start : start + batch_size].to(dev)
            with torch.enable_grad():
                out = model(xb)
                losses = fn(out, yb)
                if losses.ndim != 1 or len(losses) != len(xb):
                    raise FgtracError("loss_fn must return one loss per sample (use reduction='none')")
                (delta,) = torch.autograd.grad(losses.sum(), captured["out"])
            deltas.append(delta.detach().reshape(len(xb), -1))
            acts.append(captured["a"].detach().reshape(len(xb), -1))
    finally:
        handle.remove()
        model.train(was_training)
    return torch.cat(deltas), torch.cat(acts)


def _factors_per_checkpoint(
    model: nn.Module,
    layer: str,
    datasets: Sequence[Data],
    checkpoints: Sequence[Checkpoint],
    loss_fn: Callable[..., torch.Tensor] | None,
    device: torch.device,
) -> list[tuple[float, list[_Factors]]]:
    if not checkpoints:
        raise FgtracError("no checkpoints given")
    model = model.to(device)
    original = {k: v.detach().clone() for k, v in model.state_dict().items()}
    out = []
    try:
        for ckpt, lr in checkpoints:
            model.load_state_dict(load_state_dict(ckpt))
            facs = [
                _Factors(*head_factors(model, layer, d, loss_fn=loss_fn, device=device)) for d in datasets
            ]
            out.append((float(lr), facs))
    finally:
        model.load_state_dict(original)
    return out


def _chunks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def _squared_norms(factors: list[tuple[float, _Factors]], bias: float) -> torch.Tensor:
    """Σ_c lr_c ‖δ‖²(‖a‖² + bias): the self-influence of every sample."""
    total = None
    for lr, f in factors:
        term = lr * f.delta.pow(2).sum(1) * (f.act.pow(2).sum(1) + bias)
        total = term if total is None else total + term
    assert total is not None
    return total


def tracin(
    model: nn.Module,
    layer: str,
    train: Data,
    test: Data,
    checkpoints: Sequence[Checkpoint],
    *,
    loss_fn: Callable[..., torch.Tensor] | None = None,
    mode: str = "last_layer",
    k: int | None = None,
    include_bias: bool = True,
    normalize: bool = False,
    chunk_size: int = 8192,
    device: str | torch.device | None = None,
) -> torch.Tensor | TopK:
    """TracInCP scores of every test example against every training sample.

    `layer` names the model's final `nn.Linear`; `checkpoints` is a list of (path or state dict, learning rate)
    — the rate in effect around that checkpoint.  Returns the (n_test, n_train) score matrix, or with `k` the
    top-k proponents and opponents per test example, streamed over training chunks of `chunk_size` so the full
    matrix is never held.  `normalize` gives the cosine view: scores divided by both samples' gradient norms
    (the square roots of their self-influence), in [-1, 1].  `include_bias=False` leaves out the bias gradient
    (Captum's TracInCPFast convention).
    """
    if mode != "last_layer":
        raise FgtracError(f"mode {mode!r} is not available yet; use 'last_layer'")
    dev = _device(device)
    factors = _factors_per_checkpoint(model, layer, [test, train], checkpoints, loss_fn, dev)
    return _scores(
        factors, k=k, bias=1.0 if include_bias else 0.0, normalize=normalize, chunk_size=chunk_size
    )


def review(
    model: nn.Module,
    layer: str,
    train: Data,
    test: Data,
    checkpoints: Sequence[Checkpoint],
    *,
    k: int,
    loss_fn: Callable[..., torch.Tensor] | None = None,
    include_bias: bool = True,
    normalize: bool = False,
    chunk_size: int = 8192,
    device: str | torch.device | None = None,
) -> tuple[TopK, torch.Tensor]:
    """What a review needs in one pass over the checkpoints: `tracin(..., k=k)` and `self_influence(train)`,
    sharing the per-checkpoint gradient factors (one forward/backward pass per sample and checkpoint)."""
    factors = _factors_per_checkpoint(model, layer, [test, train], checkpoints, loss_fn, _device(device))
    bias = 1.0 if include_bias else 0.0
    top = _scores(factors, k=k, bias=bias, normalize=normalize, chunk_size=chunk_size)
    assert isinstance(top, TopK)
    return top, _squared_norms([(lr, f[1]) for lr, f in factors], bias)


def _scores(
    factors: list[tuple[float, list[_Factors]]],
    *,
    k: int | None,
    bias: float,
    normalize: bool,
    chunk_size: int,
) -> torch.Tensor | TopK:
    """Scores from (test, train) factors per checkpoint: the full matrix, or streamed top-k both ways."""
    test_f = [(lr, f[0]) for lr, f in factors]
    train_f = [(lr, f[1]) for lr, f in factors]
    dev = test_f[0][1].delta.device
    n_test, n_train = len(test_f[0][1].delta), len(train_f[0][1].delta)
    if normalize:
        test_norm = _squared_norms(test_f, bias).sqrt().clamp_min(1e-30)
        train_norm = _squared_norms(train_f, bias).sqrt().clamp_min(1e-30)
    if k is not None:
        k = min(int(k), n_train)
        best = (torch.empty(n_test, 0, device=dev), torch.empty(n_test, 0, dtype=torch.long, device=dev))
        worst = (torch.empty(n_test, 0, device=dev), torch.empty(n_test, 0, dtype=torch.long, device=dev))
    else:
        full = torch.empty(n_test, n_train, device=dev, dtype=test_f[0][1].delta.dtype)
    for sl in _chunks(n_train, chunk_size):
        block = None
        for (lr, te), (_, tr) in zip(test_f, train_f, strict=True):
            term = (te.delta @ tr.delta[sl].T) * (te.act @ tr.act[sl].T + bias)
            block = lr * term if block is None else block.add_(term, alpha=lr)
        assert block is not None
        if normalize:
            block /= test_norm[:, None] * train_norm[None, sl]
        if k is None:
            full[:, sl] = block
            continue
        idx = torch.arange(sl.start, sl.stop, device=dev).expand(n_test, -1)
        best = _merge_topk(best, block, idx, k, largest=True)
        worst = _merge_topk(worst, block, idx, k, largest=False)
    if k is None:
        return full
    return TopK(best[1], best[0], worst[1], worst[0])


def _merge_topk(
    current: tuple[torch.Tensor, torch.Tensor],
    block: torch.Tensor,
    idx: torch.Tensor,
    k: int,
    *,
    largest: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    scores = torch.cat([current[0], block], 1)
    indices = torch.cat([current[1], idx], 1)
    top, pos = scores.topk(min(k, scores.shape[1]), dim=1, largest=largest, sorted=True)
    return top, indices.gather(1, pos)


def self_influence(
    model: nn.Module,
    layer: str,
    train: Data,
    checkpoints: Sequence[Checkpoint],
    *,
    loss_fn: Callable[..., torch.Tensor] | None = None,
    include_bias: bool = True,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """Σ_c lr_c ‖∇ℓ(θ_c, z)‖² over the final layer for every training sample (high = surprising / mislabelled)."""
    factors = _factors_per_checkpoint(model, layer, [train], checkpoints, loss_fn, _device(device))
    return _squared_norms([(lr, f[0]) for lr, f in factors], 1.0 if include_bias else 0.0)
