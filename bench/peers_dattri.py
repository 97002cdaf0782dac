"""dattri's attributors on the faithfulness bench's models, checkpoints and data, in fgtrac's sign convention.

dattri (PyPI `dattri`, the bench-only extra `fgtrac[bench]`) is the reference library for data attribution
benchmarks (LOO correlation and LDS are its metrics).  Its methods run here on exactly what fgtrac's forms get:
the same `nn.Module`, the same saved checkpoints (float32 copies, as fgtrac scores them), the same train and test
tensors, in the same process:

* **TracIn** (`TracInAttributor`): Σ_c lr_c ∇ℓ(θ_c, test)·∇ℓ(θ_c, train) over every saved checkpoint with its
  learning rate, gradients of all parameters, unprojected (`proj_type="identity"`: these models are small enough,
  and a projection would only add noise) — the same quantity as fgtrac's SGD form over all parameters.
* **Grad-Cos** (`TracInAttributor`, `normalized_grad=True`, weight 1): the cosine of the two gradients at the final
  checkpoint (dattri's Grad-Cos is a final-model method).
* **TRAK** (`TRAKAttributor`): the final checkpoint, the margin log p/(1-p) as output function (dattri's and the
  TRAK paper's choice for classification), gradients projected to n_train / 2 dimensions.  TRAK is meant for
  an ensemble of independently trained models; this bench has one training run, so the ensemble is of one.
* **Influence function** (`IFAttributorExplicit`): the exact Hessian of the mean training loss at the final
  checkpoint (these models have at most 2,410 parameters, so the explicit Hessian is cheap and the conjugate
  gradient / LiSSA approximations would only add error), damped by `IF_DAMPING` · I: the cross-entropy Hessian
  of logistic regression is singular (shifting every class's logit by the same amount changes nothing) and the
  MLP's need not be positive definite.

Sign convention (fgtrac's): a positive score = proponent = the training sample lowered the test loss, so leaving it
out should raise the loss.  dattri's outputs already follow it: TracIn/Grad-Cos are (normalised) gradient dot
products like fgtrac's; the influence function returns g_trainᵀ H⁻¹ g_test, which is +n times the first-order
change of the test loss when the sample is removed; TRAK's score is the predicted increase of the test margin
(a higher margin = a lower loss) from including the sample.  They are transposed from dattri's (n_train, n_test)
to fgtrac's (n_test, n_train).  `tests/bench/test_peers_dattri.py` checks TracIn against fgtrac's score, and every method's sign.
"""

from __future__ import annotations

import contextlib
import copy
import io
import time
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

MISSING = "dattri not installed: pip install 'fgtrac[bench]'"
IF_DAMPING = 1e-3  # the value dattri's own tests use for IFAttributorExplicit on cross-entropy models

# key -> label shown in the tables
METHODS = {
    "dattri_tracin": "dattri TracIn, all parameters, every checkpoint",
    "dattri_grad_cos": "dattri Grad-Cos, final checkpoint",
    "dattri_trak": "dattri TRAK, final checkpoint, n_train/2-dim projection",
    "dattri_if": f"dattri influence function, explicit Hessian, damping {IF_DAMPING:g}",
}

Data = tuple[torch.Tensor, torch.Tensor]
Checkpoint = tuple[dict[str, Any], float]


def installed_version() -> str | None:
    """dattri's version, or None when it is not installed (then the bench prints `MISSING` instead of its rows)."""
    try:
        return version("dattri")
    except PackageNotFoundError:
        return None


def _projector(proj_type: str, proj_dim: int) -> dict[str, Any]:
    # Every key given: dattri 0.3.0 updates its module-level default dict in place, so a partial dict would
    # inherit whatever the previous attributor set.
    return {
        "proj_type": proj_type,
        "proj_dim": proj_dim,
        "proj_max_batch_size": 32,
        "proj_seed": 0,
        "device": "cpu",
    }


def _one_batch(data: Data) -> DataLoader:
    """The whole set as one unshuffled batch: dattri's explicit IF sums an inverse-Hessian product per training
    batch, so one batch keeps it the inverse of the full training loss's Hessian."""
    return DataLoader(TensorDataset(*data), batch_size=len(data[0]), shuffle=False)


class _Functions:
    """The functions dattri differentiates, written for any leading batch shape: dattri calls them on single
    samples (TracIn, TRAK: x (d,), y ()), on (1, d) slices (IF's per-sample gradients) and on the whole set
    (IF's Hessian)."""

    def __init__(self, model: nn.Module, n_features: int) -> None:
        self.model, self.d = model, n_features

    def loss(self, params: dict[str, torch.Tensor], data: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Mean cross-entropy (the training loss)."""
        x, y = data
        return F.cross_entropy(functional_call(self.model, params, x.reshape(-1, self.d)), y.reshape(-1))

    def margin(
        self, params: dict[str, torch.Tensor], data: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        """log p / (1 - p) of the true class, p = exp(-CE): TRAK's output function."""
        log_p = -self.loss(params, data)
        return log_p - torch.log(-torch.expm1(log_p))  # expm1: 1 - p stays accurate as p nears 1

    def correct_probability(
        self, params: dict[str, torch.Tensor], data: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        """p of the true class: TRAK's Q = 1 - p reweighting."""
        return torch.exp(-self.loss(params, data))


def scores(
    model: nn.Module, train: Data, test: Data, checkpoints: list[Checkpoint]
) -> dict[str, tuple[np.ndarray, float]]:
    """Every dattri method's (n_test, n_train) scores (positive = proponent) and its wall-clock seconds.

    `model` gives the architecture; `checkpoints` are the bench's `({"model": state_dict, ...}, lr)` pairs, the
    last one the final model.  Everything runs in float32, as fgtrac's forms are scored."""
    from dattri.algorithm import IFAttributorExplicit, TracInAttributor, TRAKAttributor
    from dattri.task import AttributionTask

    model32 = copy.deepcopy(model).float()
    states = [{k: v.float() for k, v in c["model"].items()} for c, _ in checkpoints]
    lrs = torch.tensor([lr for _, lr in checkpoints])
    train32, test32 = (train[0].float(), train[1]), (test[0].float(), test[1])
    train_loader, test_loader = _one_batch(train32), _one_batch(test32)
    fn = _Functions(model32, train32[0].shape[1])

    def tracin() -> torch.Tensor:
        task = AttributionTask(loss_func=fn.loss, model=model32, checkpoints=states)
        n_params = sum(p.numel() for p in model32.parameters())
        att = TracInAttributor(task, lrs, False, projector_kwargs=_projector("identity", n_params))
        return att.attribute(train_loader, test_loader)

    def grad_cos() -> torch.Tensor:
        task = AttributionTask(loss_func=fn.loss, model=model32, checkpoints=states[-1])
        n_params = sum(p.numel() for p in model32.parameters())
        att = TracInAttributor(task, torch.ones(1), True, projector_kwargs=_projector("identity", n_params))
        return att.attribute(train_loader, test_loader)

    def trak() -> torch.Tensor:
        task = AttributionTask(loss_func=fn.margin, model=model32, checkpoints=states[-1])
        # Fixed before measuring, not tuned: half the training samples, so that the projected kernel ΦᵀΦ
        # (k x k, Φ the n_train x k projected gradients) has full rank without a damping term.
        proj = _projector("normal", len(train32[0]) // 2)
        att = TRAKAttributor(task, fn.correct_probability, projector_kwargs=proj)
        att.cache(train_loader)
        return att.attribute(test_loader)

    def influence() -> torch.Tensor:
        task = AttributionTask(loss_func=fn.loss, model=model32, checkpoints=states[-1])
        att = IFAttributorExplicit(task, regularization=IF_DAMPING)
        att.cache(train_loader)
        return att.attribute(train_loader, test_loader)

    runs: dict[str, Callable[[], torch.Tensor]] = {
        "dattri_tracin": tracin,
        "dattri_grad_cos": grad_cos,
        "dattri_trak": trak,
        "dattri_if": influence,
    }
    out = {}
    for key, run in runs.items():
        t0 = time.perf_counter()
        # dattri draws a tqdm bar per batch and checkpoint (it has no switch for them): they would bury the
        # bench's own output
        with contextlib.redirect_stderr(io.StringIO()):
            s = run()  # (n_train, n_test)
        out[key] = (s.detach().double().T.numpy(), time.perf_counter() - t0)
    return out
