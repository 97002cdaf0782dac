"""TracInCP review sharded over the training set on Ray (the optional extra `fgtrac[ray]`).

`sharded_review` takes the inputs of `tracin.review` and returns what it returns (top-k proponents and opponents
by raw score and by cosine, self-influence, per-pair detail of the kept pairs).  The training set is cut into
shards and each shard is one Ray task: it computes its training samples' per-checkpoint gradient features, its
partial top-k against every test example (streamed over chunks exactly as the single-process pass), its samples'
self-influence, and the per-checkpoint detail of its candidate pairs.  The test side is computed once, by the
driver, and shared through the object store (`ray.put` of numpy arrays, which workers on a node map rather than
copy).  The driver merges the partial lists as shards finish (`_merge_candidates`: the top-k of the union of the
shards' top-k lists is the global top-k, equal scores ranked by training index whatever the arrival order).

Why the results equal the single-process path: a score is a sum over checkpoints for one (test, train) pair, and
both cosine denominators are per pair (each side's own √self-influence, or under usage weighting Cauchy–Schwarz
with the training sample's own weights), so a shard needs nothing global but the test side.  The one global
quantity, the test examples' self-influence under usage weighting (the mean training weight per checkpoint), is
computed by the driver from the full weight matrix.  Usage weights travel sliced with their shard's rows.  The
full-gradient modes' random projection is built once by the driver and shipped, so both sides use one map.
Shards start at multiples of `chunk_size` (8192, a multiple of the feature batch sizes), so a shard's forward
batches and score blocks have the shapes of the single-process pass's.

Fault tolerance: a task whose worker dies is re-run by Ray (`max_retries`); a task is a pure function of its
inputs, so a re-run returns the same shard result.  Workers never open the run: they get tensors, checkpoint
state dicts and the model (pickled by reference to its class, which must be importable on the workers) and
return arrays; the caller alone writes the results.
"""

from __future__ import annotations

import copy
import math
import resource
import socket
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils import _pytree as pytree

from fgtrac_core.errors import FgtracError
from fgtrac_core.influence.gradients import Data, Features, LossFn, Projection, as_tensors
from fgtrac_core.influence.tracin import (
    MODES,
    Checkpoint,
    Review,
    TopK,
    _Checkpointed,
    _device,
    _features,
    _gradient_names,
    _merge_candidates,
    _Options,
    _projection,
    _squared_norms,
    _streamed_topk,
    _test_self_influence,
    _use_sample_weights,
)
from fgtrac_core.inputs import Inputs

NEEDS_EXTRA = "--ray needs the optional extra: pip install 'fgtrac[ray]'"
SHARD_BYTES = 512 << 20  # a default shard's training features stay under this on its worker
_LISTS = (("raw", True), ("raw", False), ("cosine", True), ("cosine", False))


def import_ray() -> Any:
    """The `ray` module, or the one-line error naming the extra."""
    try:
        import ray
    except ImportError:
        raise FgtracError(NEEDS_EXTRA) from None
    return ray


@contextmanager
def connected(address: str | None = None, num_cpus: int | None = None) -> Iterator[Any]:
    """`ray`, connected: to the cluster at `address`, or to a local one started here (`num_cpus`, default all)
    and shut down afterwards.  A connection this process already holds is used as it is and left open."""
    ray = import_ray()
    if ray.is_initialized():
        yield ray
        return
    if address is not None:
        require_reachable(address)
    try:
        if address is None:
            ray.init(num_cpus=num_cpus, include_dashboard=False)
        else:
            ray.init(address=address)
    except Exception as e:  # ConnectionError, ValueError, RuntimeError... all one line to the user
        where = f"the Ray cluster at {address}" if address else "a local Ray cluster"
        raise FgtracError(f"cannot connect to {where}: {_first_line(e)}") from None
    try:
        yield ray
    finally:
        ray.shutdown()


def require_reachable(address: str, timeout: float = 5.0) -> None:
    """One line, in seconds, for a HOST:PORT (or ray://HOST:PORT) that nothing answers at: Ray itself keeps
    retrying such an address without end."""
    rest = address.split("://", 1)[-1]
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit():
        return  # `auto` and other forms Ray resolves itself
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        raise FgtracError(f"cannot reach the Ray cluster at {address}: {e.strerror or e}") from None


def default_shard_size(n_train: int, cpus: int, chunk_size: int, bytes_per_sample: int) -> int:
    """About four shards per CPU (load balance; a re-run after a lost worker repeats little), each a multiple of
    `chunk_size`, and no larger than SHARD_BYTES of training features."""
    size = max(1, math.ceil(math.ceil(n_train / (4 * max(cpus, 1))) / chunk_size)) * chunk_size
    cap = max(1, SHARD_BYTES // max(bytes_per_sample * chunk_size, 1)) * chunk_size
    return min(size, cap)


@dataclass
class ShardedReview:
    """`tracin.Review`'s results from a sharded pass, with how it was sharded.  `pair_detail` answers for the
    kept top-k pairs (the driver holds no training features)."""

    top: TopK
    top_cosine: TopK | None
    self_influence: torch.Tensor
    test_self_influence: torch.Tensor
    checkpoint_weights: list[float]
    checkpoint_kappas: list[float]
    n_shards: int
    shard_size: int
    shard_seconds: list[float]  # per shard, on its worker (the last, successful try)
    shard_peak_rss: list[int]  # bytes: the worker process's peak resident memory when its shard ended
    _keys: torch.Tensor  # test row × n_train + training index of every kept pair, sorted
    _detail: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # raw, cosine, contributions, in _keys' order
    _n_train: int

    def pair_detail(
        self, test_idx: torch.Tensor, train_idx: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """As `Review.pair_detail`: (raw score, cosine, per-checkpoint contributions [..., C]) of each pair."""
        query = (test_idx * self._n_train + train_idx).reshape(-1)
        pos = torch.searchsorted(self._keys, query).clamp_max_(len(self._keys) - 1)
        if not bool((self._keys[pos] == query).all()):
            raise FgtracError("a sharded review keeps the detail of its top-k pairs only")
        raw, cosine, parts = (t[pos] for t in self._detail)
        shape = test_idx.shape
        return raw.reshape(shape), cosine.reshape(shape), parts.reshape(*shape, parts.shape[-1])


@dataclass
class _Job:
    """What every shard task shares: one object in the store.  Arrays are numpy so workers map them."""

    model: nn.Module
    layer: str
    checkpoints: list[Checkpoint]
    opts: _Options
    k: int
    views: tuple[str, ...]
    projection: np.ndarray | None
    test: list[dict[str, np.ndarray]]  # per checkpoint: the test features (delta and act, or dense)
    weights: list[float]
    kappas: list[float]
    test_self_influence: np.ndarray


def sharded_review(
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
    address: str | None = None,
    num_cpus: int | None = None,
    shard_size: int | None = None,
    max_retries: int = 3,
) -> ShardedReview:
    """`tracin.review` on Ray, sharded over the training set; arguments and results as there, plus:

    `address` of a running cluster (None: a local cluster of `num_cpus` started for this call and shut down
    after; a connection this process already holds is used as it is); `shard_size` training samples per task
    (default `default_shard_size`); `max_retries`: re-runs of a task whose worker died.  Workers compute on the
    CPU, or with one GPU each when `device` names cuda.  A progress bar over shards goes to stderr with
    `progress`."""
    import_ray()  # the missing extra is reported before any work
    if mode not in MODES:
        raise FgtracError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    if shard_size is not None and shard_size < 1:
        raise FgtracError("shard_size must be at least 1")
    opts = _Options(mode, loss_fn, include_bias, params, projection_dim, seed, chunk_size, device, progress)
    x_tr, y_tr = as_tensors(train, "train")
    x_te, y_te = as_tensors(test, "test")
    n_train, k = len(x_tr), min(int(k), len(x_tr))
    dev = _device(device)
    uses_head, names = _gradient_names(model, layer, mode, include_bias, params)
    projection = None if uses_head else _projection(model, names, projection_dim, seed, dev)
    test_ckpt = _features(
        model, layer, [(x_te, y_te)], checkpoints, mode=mode, loss_fn=loss_fn, include_bias=include_bias,
        params=params, projection_dim=projection_dim, seed=seed, device=dev, projection=projection,
    )  # fmt: skip
    _use_sample_weights(test_ckpt, sample_weights, 0, n_train=n_train)
    test_si = _test_self_influence(test_ckpt, opts.bias)
    usage = None if sample_weights is None else torch.as_tensor(sample_weights, dtype=torch.float64).numpy()
    on_gpu = dev.type == "cuda" and device is not None
    shipped = model if next(model.parameters()).device.type == "cpu" else copy.deepcopy(model).cpu()
    test_np = [_features_to_numpy(c.features[0]) for c in test_ckpt]
    job = _Job(
        shipped, layer, list(checkpoints), replace(opts, progress=False, device="cuda" if on_gpu else "cpu"),
        k, ("raw", "cosine") if cosine else ("raw",),
        None if projection is None else projection.matrix.cpu().numpy(), test_np,
        [c.weight for c in test_ckpt], [c.kappa for c in test_ckpt], test_si.cpu().numpy(),
    )  # fmt: skip
    bytes_per_sample = sum(a.nbytes for f in test_np for a in f.values()) // max(len(x_te), 1)
    with connected(address, num_cpus) as ray:
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        size = shard_size or default_shard_size(n_train, cpus, chunk_size, bytes_per_sample)
        bounds = [(lo, min(lo + size, n_train)) for lo in range(0, n_train, size)]
        task = ray.remote(num_cpus=1, num_gpus=1 if on_gpu else 0, max_retries=max_retries)(_run_shard)
        merged, si, seconds, rss = _gather(
            ray, task, ray.put(job), bounds, x_tr, y_tr, usage, k, window=2 * cpus, progress=progress,
            max_retries=max_retries,
        )  # fmt: skip
    tops = {
        view: TopK(
            merged[view, True][1], merged[view, True][0], merged[view, False][1], merged[view, False][0]
        )
        for view in job.views
    }
    keys, detail = _pair_index(merged, n_train)
    return ShardedReview(
        top=tops["raw"],
        top_cosine=tops.get("cosine"),
        self_influence=si,
        test_self_influence=test_si,
        checkpoint_weights=job.weights,
        checkpoint_kappas=job.kappas,
        n_shards=len(bounds),
        shard_size=size,
        shard_seconds=seconds,
        shard_peak_rss=rss,
        _keys=keys,
        _detail=detail,
        _n_train=n_train,
    )


def _gather(
    ray: Any,
    task: Any,
    job_ref: Any,
    bounds: list[tuple[int, int]],
    x: torch.Tensor,
    y: torch.Tensor,
    usage: np.ndarray | None,
    k: int,
    *,
    window: int,
    progress: bool,
    max_retries: int,
) -> tuple[dict[tuple[str, bool], tuple[torch.Tensor, ...]], torch.Tensor, list[float], list[int]]:
    """Run the shard tasks, at most `window` in flight (so the store holds a few shards' inputs, not the whole
    training set twice), merging each result as it arrives."""
    from tqdm.auto import tqdm

    merged: dict[tuple[str, bool], tuple[torch.Tensor, ...]] = {}
    si: torch.Tensor | None = None
    seconds, rss = [0.0] * len(bounds), [0] * len(bounds)
    pending: dict[Any, int] = {}
    queue = iter(range(len(bounds)))

    def submit() -> None:
        for i in queue:
            lo, hi = bounds[i]
            w = None if usage is None else usage[lo:hi]
            pending[task.remote(job_ref, lo, _portable(x[lo:hi]), _portable(y[..., lo:hi]), w)] = i
            return

    for _ in range(window):
        submit()
    bar = tqdm(
        total=len(bounds), desc="influence shards", unit="shard", disable=not progress, file=sys.stderr
    )
    try:
        while pending:
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            i = pending.pop(ref)
            out = _result(ray, ref, bounds[i], max_retries)
            del ref
            submit()
            part = {key: torch.from_numpy(np.array(v)) for key, v in out.items() if isinstance(v, np.ndarray)}
            if si is None:
                si = torch.empty(len(x), dtype=part["self_influence"].dtype)
            si[bounds[i][0] : bounds[i][1]] = part["self_influence"]
            seconds[i], rss[i] = out["seconds"], out["peak_rss"]
            for view, largest in _LISTS:
                name = f"{view}/{'pro' if largest else 'opp'}"
                if f"{name}/score" not in part:
                    continue
                new = tuple(part[f"{name}/{field}"] for field in ("score", "index", "raw", "cosine", "parts"))
                old = merged.get((view, largest))
                merged[view, largest] = (
                    new if old is None else _merge_candidates([old, new], k, largest=largest)
                )
            bar.update(1)
    except BaseException:
        for ref in pending:
            ray.cancel(ref)
        raise
    finally:
        bar.close()
    assert si is not None
    return merged, si, seconds, rss


def _result(ray: Any, ref: Any, bounds: tuple[int, int], max_retries: int) -> dict[str, Any]:
    """A shard's result; a task's own FgtracError is re-raised as it is, a shard lost on every try is one line."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, FgtracError):
            raise e.cause from None
        raise
    except ray.exceptions.RayError as e:
        raise FgtracError(
            f"training rows {bounds[0]}-{bounds[1] - 1} failed on all {max_retries + 1} tries: {_first_line(e)}"
        ) from None


def _run_shard(job: _Job, lo: int, x: Any, y: Any, weights: np.ndarray | None) -> dict[str, Any]:
    """On a worker: the partial review of training rows lo..lo+len(x) against every test example."""
    t0 = time.perf_counter()
    opts = job.opts
    dev = torch.device(opts.device)  # type: ignore[arg-type]
    with warnings.catch_warnings():  # the shared arrays are read only, and only read
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        test = [_features_from_numpy(f, dev) for f in job.test]
        test_si = torch.from_numpy(job.test_self_influence).to(dev)
        projection = (
            None
            if job.projection is None
            else Projection.from_matrix(torch.from_numpy(job.projection).to(dev))
        )
    shard = _features(
        job.model, job.layer, [(_owned(x), _owned(y))], job.checkpoints, mode=opts.mode, loss_fn=opts.loss_fn,
        include_bias=opts.include_bias, params=opts.params, projection_dim=opts.projection_dim, seed=opts.seed,
        device=dev, projection=projection,
    )  # fmt: skip
    per_ckpt = [
        _Checkpointed(w, [t, s.features[0]], kappa)
        for w, kappa, t, s in zip(job.weights, job.kappas, test, shard, strict=True)
    ]
    _use_sample_weights(per_ckpt, weights, 1)
    tops = _streamed_topk(per_ckpt, opts, job.k, job.views)
    si = _squared_norms(per_ckpt, 1, opts.bias, per_sample=True)
    review = Review(tops["raw"], tops.get("cosine"), si, test_si, job.weights, per_ckpt, opts.bias)
    out: dict[str, Any] = {"self_influence": si}
    for view, largest in _LISTS:
        if view not in tops:
            continue
        top, name = tops[view], f"{view}/{'pro' if largest else 'opp'}"
        idx = top.proponent_indices if largest else top.opponent_indices
        rows = torch.arange(len(idx), device=idx.device)[:, None].expand_as(idx)
        raw, cosine, parts = review.pair_detail(rows, idx)
        out[f"{name}/score"] = top.proponent_scores if largest else top.opponent_scores
        out[f"{name}/index"] = idx + lo
        out[f"{name}/raw"], out[f"{name}/cosine"], out[f"{name}/parts"] = raw, cosine, parts
    out = {key: v.detach().cpu().numpy() for key, v in out.items()}
    out["seconds"] = time.perf_counter() - t0
    out["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    return out


def _pair_index(
    merged: dict[tuple[str, bool], tuple[torch.Tensor, ...]], n_train: int
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The kept pairs' detail, sorted by test row × n_train + training index (a pair in several lists once per
    list: the same shard computed the same values)."""
    keys, raw, cosine, parts = [], [], [], []
    for _, idx, r, c, p in merged.values():
        rows = torch.arange(len(idx))[:, None].expand_as(idx)
        keys.append((rows * n_train + idx).reshape(-1))
        raw.append(r.reshape(-1))
        cosine.append(c.reshape(-1))
        parts.append(p.reshape(-1, p.shape[-1]))
    key = torch.cat(keys)
    order = key.argsort()
    return key[order], (torch.cat(raw)[order], torch.cat(cosine)[order], torch.cat(parts)[order])


def _features_to_numpy(f: Features) -> dict[str, np.ndarray]:
    named = {"delta": f.delta, "act": f.act, "dense": f.dense}
    return {name: t.detach().cpu().contiguous().numpy() for name, t in named.items() if t is not None}


def _features_from_numpy(arrays: dict[str, np.ndarray], device: torch.device) -> Features:
    return Features(**{name: torch.from_numpy(a).to(device) for name, a in arrays.items()})


def _portable(batch: torch.Tensor | Inputs) -> Any:
    """A shard's slice for a task argument, tensor by tensor: a numpy array when it has a numpy dtype (pickled
    alone and mapped by the worker), else a copy (a pickled view would carry the whole storage)."""
    return pytree.tree_map(_portable_tensor, batch)


def _portable_tensor(t: torch.Tensor) -> Any:
    try:
        return t.detach().cpu().numpy()
    except TypeError:
        return t.detach().cpu().clone()


def _owned(batch: Any) -> torch.Tensor | Inputs:
    """Writable tensors of a task argument (the model may write into its inputs)."""
    return pytree.tree_map(lambda a: torch.from_numpy(np.array(a)) if isinstance(a, np.ndarray) else a, batch)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
