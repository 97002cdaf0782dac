"""Per-sample loss-gradient features at one checkpoint, in the form TracInCP dots them.

Three kinds, one interface (`Features`):
  * last-layer factors (δ, a) of a final `nn.Linear` — the gradient δ aᵀ (weights) and δ (bias) is never formed;
    two samples' dot product is (δ·δ')(a·a' + bias);
  * dense vectors: per-sample gradients of chosen parameters (torch.func `vmap(grad)`), optionally scaled
    element-wise (Adam preconditioner) and reduced by a seeded random projection;
  * the head's dense gradient (δ ⊗ a, δ), for the optimizer-aware mode on the last layer.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad
from torch.utils.data import DataLoader, Dataset

from fgtrac_core._per_example import per_example
from fgtrac_core.errors import FgtracError
from fgtrac_core.inputs import Inputs
from fgtrac_core.outputs import class_logits

Data = Dataset | tuple[torch.Tensor, torch.Tensor] | list[torch.Tensor]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Features:
    """Gradient features of n samples at one checkpoint: factored (`delta`, `act`) or `dense` (n, d)."""

    delta: torch.Tensor | None = None
    act: torch.Tensor | None = None
    dense: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.dense if self.dense is not None else self.delta)  # type: ignore[arg-type]

    def add_dots(
        self,
        other: Features,
        sl: slice,
        bias: float,
        weight: float | torch.Tensor,
        out: torch.Tensor | None,
    ) -> torch.Tensor:
        """`out` + weight × the (len(self), len(sl)) gradient dot products with `other[sl]` (a new tensor when
        `out` is None).  Fused and in place: at these shapes each extra pass over the block costs about as much
        as a matmul, and a fresh block per operation adds page faults.  `weight` is one number, or one per
        sample of `other[sl]` (a (len(sl),) tensor: usage weights), folded into those rows before the matmul."""
        if isinstance(weight, torch.Tensor):
            w = weight.to(self.dense if self.dense is not None else self.delta)[:, None]  # type: ignore[arg-type]
            if self.dense is not None:
                rows = other.dense[sl] * w  # type: ignore[index]
                return self.dense @ rows.T if out is None else out.addmm_(self.dense, rows.T)
            aa = (self.act @ other.act[sl].T).add_(bias)  # type: ignore[union-attr,index]
            dd = self.delta @ (other.delta[sl] * w).T  # type: ignore[index,operator]
            return aa.mul_(dd) if out is None else out.addcmul_(aa, dd)
        if self.dense is not None:
            if out is None:
                return (self.dense * weight) @ other.dense[sl].T  # type: ignore[index]
            return out.addmm_(self.dense, other.dense[sl].T, alpha=weight)  # type: ignore[index]
        aa = (self.act @ other.act[sl].T).add_(bias)  # type: ignore[union-attr,index]
        dd = (self.delta * weight) @ other.delta[sl].T  # type: ignore[operator,index]
        return aa.mul_(dd) if out is None else out.addcmul_(aa, dd)

    def sq_norms(self, bias: float) -> torch.Tensor:
        if self.dense is not None:
            return self.dense.pow(2).sum(1)
        return self.delta.pow(2).sum(1) * (self.act.pow(2).sum(1) + bias)  # type: ignore[union-attr]

    def pair_dots(self, other: Features, i: torch.Tensor, j: torch.Tensor, bias: float) -> torch.Tensor:
        """Dot products of the pairs (self[i], other[j]) for index tensors of one shape."""
        if i.dim() == 2 and bool((i == i[:, :1]).all()):
            # a top-k list (one row of self against k of other per row): one batched matmul per row instead of
            # gathering self's row k times, half the time of the elementwise form at review sizes
            rows = i[:, 0]

            def dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
                return torch.bmm(b[j], a[rows][:, :, None])[..., 0]
        else:

            def dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
                return (a[i] * b[j]).sum(-1)

        if self.dense is not None:
            return dot(self.dense, other.dense)  # type: ignore[arg-type]
        return dot(self.delta, other.delta) * (dot(self.act, other.act) + bias)  # type: ignore[arg-type]


def as_tensors(data: Data, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, labels) from a Dataset or a tensor pair; one-line errors for empty or mismatched data."""
    if isinstance(data, tuple | list) and len(data) == 2 and all(isinstance(t, torch.Tensor | Inputs) for t in data):
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
    if len(x) != y.shape[-1]:
        raise FgtracError(f"{what}: {len(x)} inputs but {y.shape[-1]} labels")
    return x, y


def at_checkpoint(data: tuple[torch.Tensor, torch.Tensor], c: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The (inputs, labels) of the `c`-th checkpoint: labels are one row per checkpoint (n_checkpoints, n) when
    training samples were trained on other targets than their registered labels (`trained_targets`)."""
    x, y = data
    return (x, y[c]) if y.ndim == 2 else data


def linear_layer(model: nn.Module, layer: str) -> nn.Linear:
    modules = dict(model.named_modules())
    if layer not in modules:
        raise FgtracError(
            f"the model has no layer named {layer!r} (layers: {', '.join(n for n in modules if n)})"
        )
    module = modules[layer]
    if not isinstance(module, nn.Linear):
        raise FgtracError(
            f"{layer!r} must be an nn.Linear for last-layer gradients, not {type(module).__name__}"
        )
    return module


def per_sample_loss(loss_fn: LossFn | None) -> LossFn:
    """`loss_fn`, or per-sample cross-entropy of the outputs read as class logits (`class_logits`: one logit per
    example is a binary classifier's)."""
    return loss_fn if loss_fn is not None else (lambda out, y: F.cross_entropy(class_logits(out), y, reduction="none"))


def _batches(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def head_factors(
    model: nn.Module,
    layer: str,
    data: Data,
    *,
    loss_fn: LossFn | None = None,
    batch_size: int = 1024,
    device: str | torch.device | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(δ, a) of every sample for the model's current parameters: δ = ∂ℓ/∂(layer output), a = the layer's input.

    `loss_fn(outputs, labels)` must return per-sample losses (default: cross-entropy, reduction "none").
    """
    head = linear_layer(model, layer)
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    x, y = as_tensors(data, "data")
    fn = per_sample_loss(loss_fn)
    captured: dict[str, torch.Tensor] = {}

    def hook(_m: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        captured["a"], captured["out"] = inputs[0], output

    handle = head.register_forward_hook(hook)
    deltas, acts = [], []
    was_training = model.training
    model.eval()
    try:
        for sl in _batches(len(x), batch_size):
            xb, yb = x[sl].to(dev), y[sl].to(dev)
            with torch.enable_grad():
                losses = fn(model(xb), yb)
                if losses.ndim != 1 or len(losses) != len(xb):
                    raise FgtracError("loss_fn must return one loss per sample (use reduction='none')")
                (delta,) = torch.autograd.grad(losses.sum(), captured["out"])
            deltas.append(delta.detach().reshape(len(xb), -1))
            acts.append(captured["a"].detach().reshape(len(xb), -1))
    finally:
        handle.remove()
        model.train(was_training)
    return torch.cat(deltas), torch.cat(acts)


def head_gradients(delta: torch.Tensor, act: torch.Tensor, bias: bool) -> torch.Tensor:
    """The head's per-sample gradient as dense rows: vec(δ aᵀ) then δ (PyTorch's weight, bias layout)."""
    w = (delta[:, :, None] * act[:, None, :]).reshape(len(delta), -1)
    return torch.cat([w, delta], 1) if bias else w


class Projection:
    """A seeded random linear map R (P × d) applied as g ↦ g R; the same map for every sample and checkpoint.

    d ≥ P: R has orthonormal rows (R Rᵀ = I), so projected dot products equal the exact ones.  d < P: Gaussian
    entries of variance 1/d (Johnson–Lindenstrauss; dot products preserved in expectation).
    """

    def __init__(self, n_params: int, dim: int, seed: int, device: torch.device) -> None:
        if dim < 1:
            raise FgtracError("projection_dim must be at least 1")
        if n_params * dim > 500_000_000:
            raise FgtracError(
                f"a {n_params} x {dim} projection needs {4 * n_params * dim / 2**30:.1f} GiB; "
                "lower projection_dim or restrict the parameters"
            )
        gen = torch.Generator().manual_seed(seed)
        if dim >= n_params:
            q, _ = torch.linalg.qr(torch.randn(dim, n_params, generator=gen, dtype=torch.float64))
            self.matrix = q.T.float().to(device)  # (P, d) with orthonormal rows
        else:
            self.matrix = (torch.randn(n_params, dim, generator=gen) / math.sqrt(dim)).to(device)

    @classmethod
    def from_matrix(cls, matrix: torch.Tensor) -> Projection:
        """The map with a given (P × d) matrix: one built elsewhere, shared by processes that must agree on it."""
        projection = cls.__new__(cls)
        projection.matrix = matrix
        return projection

    def __call__(self, g: torch.Tensor) -> torch.Tensor:
        return g @ self.matrix.to(g.dtype)


def per_sample_gradients(
    model: nn.Module,
    names: list[str],
    data: Data,
    *,
    loss_fn: LossFn | None = None,
    scale: dict[str, torch.Tensor] | None = None,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    batch_size: int = 128,
    device: torch.device,
) -> torch.Tensor:
    """(n, P) per-sample gradients of the named parameters (vmap over grad, see `per_example`), each multiplied
    element-wise by `scale[name]` when given, then passed through `reduce` (a projection) batch by batch to bound
    memory."""
    x, y = as_tensors(data, "data")
    fn = per_sample_loss(loss_fn)
    params = {k: v.detach() for k, v in model.named_parameters()}
    fixed = {k: v for k, v in params.items() if k not in names}
    buffers = dict(model.named_buffers())

    def loss_one(p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, ({**fixed, **p}, buffers), (xi.unsqueeze(0),))
        return fn(out, yi.unsqueeze(0)).sum()

    grad_fn = grad(loss_one)
    chosen = {k: params[k] for k in names}
    rows = []
    was_training = model.training
    model.eval()
    try:
        for sl in _batches(len(x), batch_size):
            g = per_example(grad_fn, chosen, x[sl].to(device), y[sl].to(device))
            flat = torch.cat([(g[k] * scale[k] if scale else g[k]).reshape(len(g[k]), -1) for k in names], 1)
            rows.append(reduce(flat) if reduce is not None else flat)
    finally:
        model.train(was_training)
    return torch.cat(rows)
