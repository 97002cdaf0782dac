"""TracInCP with exact last-layer gradients, as a functional API that needs no recorded run.

For a final `nn.Linear` layer with input `a` and loss gradient `δ = ∂ℓ/∂(layer output)` (softmax − onehot for
cross-entropy), the weight gradient is `δ aᵀ` and the bias gradient `δ`, so two samples' gradient dot product is
`(δ·δ')(a·a' + 1)` — two matmuls per checkpoint for a whole block of pairs, no per-sample autograd:

    score(z_test, z_train) = Σ_c lr_c (δ_c(z_test)·δ_c(z_train)) (a_c(z_test)·a_c(z_train) + 1)

Sign convention everywhere: positive = proponent (a gradient step on the training sample lowers the test loss),
negative = opponent.  Units: learning rate × squared loss-gradient norm (summed over checkpoints).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fgtrac_core.checkpoint_files import unwrapped_state
from fgtrac_core.errors import FgtracError
from fgtrac_core.influence.adamw import adam_state
from fgtrac_core.influence.gradients import (
    Data,
    Features,
    LossFn,
    Projection,
    as_tensors,
    at_checkpoint,
    head_factors,
    head_gradients,
    linear_layer,
    per_sample_gradients,
)
from fgtrac_core.influence.group_rates import rate_ratios
from fgtrac_core.pipeline import load_into

Checkpoint = tuple[str | Path | Mapping[str, Any], float]
MODES = ("last_layer", "full", "adamw")


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
class _Checkpointed:
    """Gradient features of each data set at one checkpoint, and the checkpoint's weight (η, or η κ in adamw mode).

    With usage weighting `train_weight` holds one weight per training sample (its Σ η_t/|B_t| over its uses in
    the interval this checkpoint stands for, times κ) and replaces `weight` for training samples."""

    weight: float
    features: list[Features]
    kappa: float = 1.0
    train_weight: torch.Tensor | None = None


def _device(device: str | torch.device | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _load_checkpoint(
    checkpoint: str | Path | Mapping[str, Any],
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(model state dict, optimizer state dict or None) from a path or dict (fgtrac files: {"model", "optimizer"});
    the optimizer state dict gains the payload's ``optimizer_params`` (per param group, the model parameter names
    the optimizer held) and ``frozen`` (those that did not require grad) under those keys when the file has them."""
    if isinstance(checkpoint, str | Path):
        try:
            state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise FgtracError(f"checkpoint file {checkpoint} does not exist") from None
        except Exception as e:  # torch raises several types for a damaged or foreign file
            raise FgtracError(f"cannot load checkpoint {checkpoint}: {str(e).splitlines()[0]}") from None
    else:
        state = checkpoint
    if isinstance(state, Mapping) and isinstance(state.get("model"), Mapping):
        optimizer = state.get("optimizer")
        if isinstance(optimizer, Mapping) and state.get("optimizer_params") is not None:
            optimizer = {**optimizer, "optimizer_params": state["optimizer_params"], "frozen": state.get("frozen")}
        return unwrapped_state(dict(state["model"])), optimizer
    if not isinstance(state, Mapping):
        raise FgtracError(f"checkpoint {checkpoint!r} holds no state dict")
    return unwrapped_state(dict(state)), None


def load_state_dict(checkpoint: str | Path | Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """A model state dict from a path or dict; accepts fgtrac checkpoint files (`{"model": ...}`)."""
    return _load_checkpoint(checkpoint)[0]


def _param_names(model: nn.Module, params: str | Sequence[str] | None) -> list[str]:
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if params is None or params == "all":
        return names
    if isinstance(params, str):
        params = [params]
    chosen = [n for n in names if any(n == p or n.startswith(p + ".") for p in params)]
    if not chosen:
        raise FgtracError(f"no parameters match {list(params)} (parameters: {', '.join(names)})")
    return chosen


def _features(
    model: nn.Module,
    layer: str,
    datasets: Sequence[Data],
    checkpoints: Sequence[Checkpoint],
    *,
    mode: str,
    loss_fn: LossFn | None,
    include_bias: bool,
    params: str | Sequence[str] | None,
    projection_dim: int | None,
    seed: int,
    device: torch.device,
    projection: Projection | None = None,
) -> list[_Checkpointed]:
    """Gradient features of every data set at every checkpoint (the model's own parameters are restored).
    `projection`: the map of `_projection` to use (one shared by processes that compute parts of one review)."""
    if mode not in MODES:
        raise FgtracError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    if not checkpoints:
        raise FgtracError("no checkpoints given")
    model = model.to(device)
    uses_head, names = _gradient_names(model, layer, mode, include_bias, params)
    if uses_head:
        projection = None
    elif projection is None:
        projection = _projection(model, names, projection_dim, seed, device)
    original = {k: v.detach().clone() for k, v in model.state_dict().items()}
    shapes = {n: p.shape for n, p in model.named_parameters()}
    out = []
    try:
        for c, (ckpt, lr) in enumerate(checkpoints):
            state, opt_state = _load_checkpoint(ckpt)
            load_into(model, state, str(ckpt) if isinstance(ckpt, str | Path) else "a checkpoint")
            # each parameter at its own group's rate (0 where not trained) relative to `lr`: the first group's in
            # `full` mode, the first named parameter's (the head weight's) otherwise
            ratios = rate_ratios(opt_state, names, None if mode == "full" else names[0])
            weight, kappa = float(lr), 1.0
            scale = None if ratios is None else {n: torch.full(shapes[n], math.sqrt(r)) for n, r in ratios.items()}
            bias_ratio = ratios[names[1]] if mode == "last_layer" and ratios and len(names) == 2 else 1.0
            if mode == "adamw":
                adam = adam_state(model, opt_state, float(lr), names)
                if adam is not None:
                    weight, scale, kappa = float(lr) * adam.kappa, adam.sqrt_precond, adam.kappa
            feats = []
            for d in (at_checkpoint(d, c) for d in datasets):
                if uses_head:
                    delta, act = head_factors(model, layer, d, loss_fn=loss_fn, device=device)
                    if bias_ratio > 0 and bias_ratio != 1.0:
                        # the bias at its own group's rate r: (δ·δ')(a·a' + r) = (√r δ·√r δ')(a/√r·a'/√r + 1);
                        # a bias frozen while the weight trains (r = 0) is left at the weight's rate
                        delta, act = delta * math.sqrt(bias_ratio), act / math.sqrt(bias_ratio)
                    if mode == "last_layer":
                        feats.append(Features(delta=delta, act=act))
                        continue
                    g = head_gradients(delta, act, bias=len(names) == 2)
                    if scale is not None:
                        g = g * torch.cat([scale[n].reshape(-1) for n in names]).to(g)
                    feats.append(Features(dense=g))
                else:
                    g = per_sample_gradients(
                        model, names, d, loss_fn=loss_fn, scale=scale, reduce=projection, device=device
                    )
                    feats.append(Features(dense=g))
            out.append(_Checkpointed(weight, feats, kappa))
    finally:
        model.load_state_dict(original)
    return out


def _gradient_names(
    model: nn.Module, layer: str, mode: str, include_bias: bool, params: str | Sequence[str] | None
) -> tuple[bool, list[str]]:
    """(whether the features are the head's (δ, a), the parameters whose gradients they stand for)."""
    if mode == "last_layer" or (mode == "adamw" and params is None):
        head = linear_layer(model, layer)
        return True, [f"{layer}.weight"] + ([f"{layer}.bias"] if include_bias and head.bias is not None else [])
    return False, _param_names(model, params)


def _projection(
    model: nn.Module, names: list[str], projection_dim: int | None, seed: int, device: torch.device
) -> Projection:
    n_params = sum(dict(model.named_parameters())[n].numel() for n in names)
    return Projection(n_params, projection_dim or min(n_params, 1024), seed, device)


def _chunks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def _squared_norms(
    per_ckpt: list[_Checkpointed], which: int, bias: float, per_sample: bool = False
) -> torch.Tensor:
    """Σ_c w_c ‖∇ℓ(θ_c, z)‖² of every sample of data set `which`: its self-influence.  With `per_sample` (the
    training set under usage weighting) w_c is each sample's own weight."""
    if per_sample and per_ckpt[0].train_weight is not None:
        out = None
        for c in per_ckpt:
            sq = c.features[which].sq_norms(bias)
            part = c.train_weight.to(sq) * sq  # type: ignore[union-attr]
            out = part if out is None else out.add_(part)
        return out  # type: ignore[return-value]
    total = per_ckpt[0].weight * per_ckpt[0].features[which].sq_norms(bias)
    for c in per_ckpt[1:]:
        total += c.weight * c.features[which].sq_norms(bias)
    return total


def _use_sample_weights(
    per_ckpt: list[_Checkpointed], weights: Any, which: int, n_train: int | None = None
) -> None:
    """Attach per-training-sample weights (n_train, n_checkpoints) — usage weighting — to the checkpoints; each
    column is multiplied by its checkpoint's κ (1 for SGD-form checkpoints).  The weights take the dtype and
    device of data set `which`, the training set unless `n_train` is given (a driver holding test features only)."""
    if weights is None:
        return
    w = torch.as_tensor(weights, dtype=torch.float64)
    n_train = len(per_ckpt[0].features[which]) if n_train is None else n_train
    if w.shape != (n_train, len(per_ckpt)):
        raise FgtracError(
            f"sample_weights must be (n_train, n_checkpoints) = ({n_train}, {len(per_ckpt)}), "
            f"not {tuple(w.shape)}"
        )
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
        raise FgtracError("sample_weights must be finite and non-negative")
    f = per_ckpt[0].features[which]
    like = f.dense if f.dense is not None else f.delta
    for i, c in enumerate(per_ckpt):
        c.train_weight = (w[:, i] * c.kappa).to(device=like.device, dtype=like.dtype)  # type: ignore[union-attr]


def _usage_test_sq(per_ckpt: list[_Checkpointed], bias: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Under usage weighting: each test example's ‖∇ℓ(θ_c, test)‖² per checkpoint (n_test, C) and the training
    weights (n_train, C).  Cauchy–Schwarz with the training sample's own weights bounds |score(t, z)| by
    √(Σ_c W_zc ‖g_t,c‖² · Σ_c W_zc ‖g_z,c‖²): the cosine view's denominator, pair by pair."""
    tsq = torch.stack([c.features[0].sq_norms(bias) for c in per_ckpt], 1)
    w = torch.stack([c.train_weight for c in per_ckpt], 1)  # type: ignore[misc]
    return tsq, w.to(tsq)


def _test_self_influence(per_ckpt: list[_Checkpointed], bias: float) -> torch.Tensor:
    """Σ_c w_c ‖∇ℓ(θ_c, test)‖² of every test example (data set 0); under usage weighting w_c is the mean
    training weight of checkpoint c (test examples have no uses)."""
    if per_ckpt[0].train_weight is None:
        return _squared_norms(per_ckpt, 0, bias)
    tsq, w = _usage_test_sq(per_ckpt, bias)
    return tsq @ w.mean(0)


@dataclass
class _Options:
    mode: str = "last_layer"
    loss_fn: LossFn | None = None
    include_bias: bool = True
    params: str | Sequence[str] | None = None
    projection_dim: int | None = None
    seed: int = 0
    chunk_size: int = 8192
    device: str | torch.device | None = None
    progress: bool = False

    @property
    def bias(self) -> float:
        return 1.0 if self.include_bias else 0.0

    def features(
        self,
        model: nn.Module,
        layer: str,
        datasets: list[tuple[Data, str]],
        checkpoints: Sequence[Checkpoint],
    ) -> list[_Checkpointed]:
        tensors = [as_tensors(d, what) for d, what in datasets]
        return _features(
            model, layer, tensors, checkpoints, mode=self.mode, loss_fn=self.loss_fn,
            include_bias=self.include_bias, params=self.params, projection_dim=self.projection_dim,
            seed=self.seed, device=_device(self.device),
        )  # fmt: skip


@dataclass
class Review:
    """What a review needs from one pass over the checkpoints: top-k proponents/opponents of every test example
    (by raw score, and by cosine when asked), every training sample's self-influence, and per-pair detail."""

    top: TopK
    top_cosine: TopK | None
    self_influence: torch.Tensor
    test_self_influence: torch.Tensor
    checkpoint_weights: list[float]
    _per_ckpt: list[_Checkpointed]
    _bias: float
    checkpoint_kappas: list[float] | None = None

    def pair_detail(
        self, test_idx: torch.Tensor, train_idx: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For index tensors of one shape: (raw score, cosine, per-checkpoint contributions [..., C]), where the
        contributions w_c ∇ℓ(θ_c, test)·∇ℓ(θ_c, train) sum to the raw score (w_c: the training sample's own
        weight under usage weighting, exactly 0 from a checkpoint whose interval never used it)."""
        usage = self._per_ckpt[0].train_weight is not None
        parts = torch.stack(
            [
                (c.train_weight[train_idx] if c.train_weight is not None else c.weight)  # type: ignore[operator]
                * c.features[0].pair_dots(c.features[1], test_idx, train_idx, self._bias)
                for c in self._per_ckpt
            ],
            -1,
        )
        raw = parts.sum(-1)
        if usage:
            tsq, w = _usage_test_sq(self._per_ckpt, self._bias)
            test_sq = (tsq[test_idx] * w[train_idx]).sum(-1)
            norm = (test_sq * self.self_influence[train_idx]).sqrt().clamp_min(1e-30)
        else:
            norm = (self.test_self_influence[test_idx] * self.self_influence[train_idx]).sqrt().clamp_min(1e-30)
        return raw, raw / norm, parts


def tracin(
    model: nn.Module,
    layer: str,
    train: Data,
    test: Data,
    checkpoints: Sequence[Checkpoint],
    *,
    loss_fn: LossFn | None = None,
    mode: str = "last_layer",
    k: int | None = None,
    include_bias: bool = True,
    normalize: bool = False,
    params: str | Sequence[str] | None = None,
    projection_dim: int | None = None,
    seed: int = 0,
    chunk_size: int = 8192,
    device: str | torch.device | None = None,
    progress: bool = False,
    sample_weights: Any = None,
) -> torch.Tensor | TopK:
    """TracInCP scores of every test example against every training sample.

    score(test, train) = Σ_c w_c ∇ℓ(θ_c, test)·∇ℓ(θ_c, train); positive = proponent (a step on the training
    sample lowers the test loss), negative = opponent.  `checkpoints` is a list of (path or state dict, lr): the
    learning rate in effect around that checkpoint; an fgtrac checkpoint file or a dict ``{"model": ...,
    "optimizer": ...}`` also carries optimizer state (adamw mode).  Modes:

    * ``last_layer``: exact gradients of the final `nn.Linear` named `layer` (weights, and bias unless
      `include_bias=False`, Captum TracInCPFast's convention), w_c = lr_c;
    * ``full``: per-sample gradients of `params` (default all) via torch.func, projected to `projection_dim`
      (default min(P, 1024)) by a map seeded with `seed` — exact when projection_dim ≥ P; w_c = lr_c;
    * ``adamw``: for checkpoints holding Adam, AdamW, RMSprop or Adagrad state, gradients preconditioned by the
      recorded second moment and w_c = lr_c κ_c (momentum, bias correction, decoupled decay, Adagrad's lr_decay;
      see `fgtrac_core.influence.adamw`); SGD checkpoints keep the SGD form, other optimizers are refused.  Gradients of the `layer` head by default, of `params` (projected) if given.

    Returns the (n_test, n_train) matrix, or with `k` the top-k proponents and opponents per test example,
    streamed over training chunks of `chunk_size` so the full matrix is never held.  `normalize` gives the
    cosine view: each score divided by both samples' gradient norms √(Σ_c w_c ‖∇ℓ‖²), in [-1, 1].

    `sample_weights` (usage weighting, `fgtrac_core.influence.weighting`): an (n_train, n_checkpoints) array that
    replaces lr_c per training sample — W[z, c] = Σ η_t/|B_t| over z's uses in the steps checkpoint c stands for
    (times κ_c in adamw mode), so a sample unused there gets exactly 0 from c.  The cosine view then divides by
    √(Σ_c W[z, c] ‖∇ℓ(θ_c, test)‖² · Σ_c W[z, c] ‖∇ℓ(θ_c, z)‖²) (Cauchy–Schwarz with z's own weights).
    """
    opts = _Options(mode, loss_fn, include_bias, params, projection_dim, seed, chunk_size, device, progress)
    per_ckpt = opts.features(model, layer, [(test, "test"), (train, "train")], checkpoints)
    _use_sample_weights(per_ckpt, sample_weights, 1)
    views = ("cosine",) if normalize else ("raw",)
    if k is None:
        return _full_matrix(per_ckpt, opts, normalize)
    return _streamed_topk(per_ckpt, opts, int(k), views)[views[0]]


def review(
    model: nn.Module,
    layer: str,
    train: Data,
    test: Data,
    checkpoints: Sequence[Checkpoint],
    *,
    k: int,
    cosine: bool = False,
    loss_fn: LossFn | None = None,
    mode: str = "last_layer",
    include_bias: bool = True,
    params: str | Sequence[str] | None = None,
    projection_dim: int | None = None,
    seed: int = 0,
    chunk_size: int = 8192,
    device: str | torch.device | None = None,
    progress: bool = False,
    sample_weights: Any = None,
) -> Review:
    """`tracin(..., k=k)` and `self_influence(train)` in one pass, sharing the per-checkpoint gradient features
    (one forward/backward per sample and checkpoint); with `cosine` also the top-k by cosine.  Arguments as in
    `tracin`.  Under usage weighting (`sample_weights`) the test examples' `test_self_influence` weighs each
    checkpoint by the mean training weight (test examples have no uses); cosines use the pair's own weights."""
    opts = _Options(mode, loss_fn, include_bias, params, projection_dim, seed, chunk_size, device, progress)
    per_ckpt = opts.features(model, layer, [(test, "test"), (train, "train")], checkpoints)
    _use_sample_weights(per_ckpt, sample_weights, 1)
    return review_of(per_ckpt, opts, k, cosine)


def review_of(per_ckpt: list[_Checkpointed], opts: _Options, k: int, cosine: bool) -> Review:
    """The `Review` of gradient features already computed (test set first, then the training set, per term)."""
    tops = _streamed_topk(per_ckpt, opts, int(k), ("raw", "cosine") if cosine else ("raw",))
    return Review(
        top=tops["raw"],
        top_cosine=tops.get("cosine"),
        self_influence=_squared_norms(per_ckpt, 1, opts.bias, per_sample=True),
        test_self_influence=_test_self_influence(per_ckpt, opts.bias),
        checkpoint_weights=[c.weight for c in per_ckpt],
        _per_ckpt=per_ckpt,
        _bias=opts.bias,
        checkpoint_kappas=[c.kappa for c in per_ckpt],
    )


def self_influence(
    model: nn.Module,
    layer: str,
    train: Data,
    checkpoints: Sequence[Checkpoint],
    *,
    loss_fn: LossFn | None = None,
    mode: str = "last_layer",
    include_bias: bool = True,
    params: str | Sequence[str] | None = None,
    projection_dim: int | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
    sample_weights: Any = None,
) -> torch.Tensor:
    """Σ_c w_c ‖∇ℓ(θ_c, z)‖² for every training sample (high = surprising, often mislabelled); modes and
    arguments as in `tracin` (with `sample_weights`, w_c is each sample's own usage weight)."""
    opts = _Options(mode, loss_fn, include_bias, params, projection_dim, seed, device=device)
    per_ckpt = opts.features(model, layer, [(train, "train")], checkpoints)
    _use_sample_weights(per_ckpt, sample_weights, 0)
    return _squared_norms(per_ckpt, 0, opts.bias, per_sample=True)


def _block(per_ckpt: list[_Checkpointed], sl: slice, bias: float) -> torch.Tensor:
    """Raw scores of all test examples against the training chunk `sl`."""
    block = None
    for c in per_ckpt:
        w = c.weight if c.train_weight is None else c.train_weight[sl]
        block = c.features[0].add_dots(c.features[1], sl, bias, w, block)
    assert block is not None
    return block


def _train_chunks(n_train: int, opts: _Options) -> Iterator[slice]:
    """Training chunks of `opts.chunk_size`, with a progress bar when `opts.progress`."""
    if not opts.progress:
        yield from _chunks(n_train, opts.chunk_size)
        return
    from tqdm.auto import tqdm

    with tqdm(total=n_train, desc="influence", unit="train", leave=False) as bar:
        for sl in _chunks(n_train, opts.chunk_size):
            yield sl
            bar.update(sl.stop - sl.start)


def _full_matrix(per_ckpt: list[_Checkpointed], opts: _Options, normalize: bool) -> torch.Tensor:
    n_test, n_train = len(per_ckpt[0].features[0]), len(per_ckpt[0].features[1])
    out = None
    denominator = _cosine_denominator(per_ckpt, opts.bias) if normalize else None
    for sl in _train_chunks(n_train, opts):
        block = _block(per_ckpt, sl, opts.bias)
        if denominator is not None:
            block /= denominator(sl)
        if sl.stop - sl.start == n_train:  # one chunk: the block is the matrix
            out = block
            break
        if out is None:
            out = torch.empty(n_test, n_train, dtype=block.dtype, device=block.device)
        out[:, sl] = block
    assert out is not None
    return out


def _norms(per_ckpt: list[_Checkpointed], bias: float) -> tuple[torch.Tensor, torch.Tensor]:
    return tuple(_squared_norms(per_ckpt, i, bias).sqrt().clamp_min(1e-30) for i in (0, 1))  # type: ignore


def _cosine_denominator(per_ckpt: list[_Checkpointed], bias: float) -> Any:
    """sl ↦ the (n_test, len(sl)) cosine denominators of the training chunk `sl`: the product of both samples'
    √self-influence, or under usage weighting the pair's own (Cauchy–Schwarz with the training sample's weights:
    Σ_c W_zc ‖g_t,c‖² is one (n_test × C)(C × chunk) matmul)."""
    if per_ckpt[0].train_weight is None:
        norms = _norms(per_ckpt, bias)
        return lambda sl: norms[0][:, None] * norms[1][None, sl]
    train_n = _squared_norms(per_ckpt, 1, bias, per_sample=True).sqrt()
    tsq, w = _usage_test_sq(per_ckpt, bias)
    return lambda sl: ((tsq @ w[sl].T).sqrt_() * train_n[None, sl]).clamp_min_(1e-30)


def _streamed_topk(
    per_ckpt: list[_Checkpointed], opts: _Options, k: int, views: Sequence[str]
) -> dict[str, TopK]:
    """Top-k both ways for each view ('raw', 'cosine'), merging chunk by chunk (never the full matrix)."""
    test0 = per_ckpt[0].features[0]
    n_test, n_train = len(test0), len(per_ckpt[0].features[1])
    k = min(k, n_train)
    dev = (test0.dense if test0.dense is not None else test0.delta).device  # type: ignore[union-attr]
    denominator = _cosine_denominator(per_ckpt, opts.bias) if "cosine" in views else None
    empty = (torch.empty(n_test, 0, device=dev), torch.empty(n_test, 0, dtype=torch.long, device=dev))
    state = {(v, largest): empty for v in views for largest in (True, False)}
    for sl in _train_chunks(n_train, opts):
        block = _block(per_ckpt, sl, opts.bias)
        for v in views:
            scores = block if v == "raw" else block / denominator(sl)  # type: ignore[misc]
            for largest in (True, False):
                state[v, largest] = _merge_topk(state[v, largest], scores, sl.start, k, largest=largest)
    return {
        v: TopK(state[v, True][1], state[v, True][0], state[v, False][1], state[v, False][0]) for v in views
    }


def _merge_topk(
    current: tuple[torch.Tensor, torch.Tensor],
    block: torch.Tensor,
    offset: int,
    k: int,
    *,
    largest: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge the running top-k with a chunk's: top-k of the chunk first, so only (n, 2k) candidates are
    concatenated (never the chunk's full index matrix)."""
    top, pos = block.topk(min(k, block.shape[1]), dim=1, largest=largest, sorted=False)
    parts = [(current[0].to(block.dtype), current[1]), (top, pos.add_(offset))]
    return _merge_candidates(parts, k, largest=largest)  # type: ignore[return-value]


def _merge_candidates(
    parts: Sequence[tuple[torch.Tensor, ...]], k: int, *, largest: bool
) -> tuple[torch.Tensor, ...]:
    """The k best candidates per row of the concatenated `parts`, sorted best first.  Each part is (scores
    (n, m), training indices (n, m), payload...) with payloads (n, m) or (n, m, d) carried along.  Equal scores
    rank by training index (lowest first), so the result does not depend on the order of the parts: the same
    for a chunked pass and for shards merged as they finish."""
    cat = [torch.cat(ts, 1) for ts in zip(*parts, strict=True)]
    scores, indices = cat[0], cat[1]
    by_index = indices.argsort(dim=1)
    best = scores.gather(1, by_index).sort(dim=1, descending=largest, stable=True).indices[:, :k]
    pos = by_index.gather(1, best)
    return tuple(t.gather(1, pos) if t.ndim == 2 else torch.take_along_dim(t, pos[..., None], 1) for t in cat)
