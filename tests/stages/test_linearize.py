"""The step Jacobians against PyTorch's own optimizer steps, and their transposes against the forward maps."""

from __future__ import annotations

import copy

import pytest
import torch

from fgtrac_core.stages import linearize as lin
from fgtrac_core.stages.estimators import live_step
from fgtrac_core.stages.linearize import Perturbation
from fgtrac_core.stages.replay import recorded_cursor
from tests.stages._toy import MLP, StageSpec, data, train_in_memory

OPTIMIZERS = {
    "sgd-momentum-coupled-decay": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.01),
    "sgd-nesterov-dampening": lambda p: torch.optim.SGD(
        p, lr=0.1, momentum=0.8, dampening=0.2, weight_decay=0.02
    ),
    "sgd-nesterov": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.7, nesterov=True, weight_decay=0.01),
    "adam-coupled-decay": lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=0.05),
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1),
}


def _model() -> MLP:
    return MLP().double()


def _training(make_opt):
    x, y = data(dtype=torch.float64)
    specs = [StageSpec("a", make_opt, 4), StageSpec("b", make_opt, 6)]
    return train_in_memory(_model, specs, x, y, n_train=40)


def _state_keys(optimizer: torch.optim.Optimizer) -> tuple[str, ...]:
    return lin.STATE_KEYS[type(optimizer).__name__] if optimizer.state else ()


def _random(cursor, keys, seed: int) -> Perturbation:
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in cursor.params]
    # second moments are perturbed by small relative amounts so that v stays positive
    state = {}
    for key in keys:
        state[key] = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in cursor.params]
        if key == "exp_avg_sq":
            state[key] = [
                s.abs() * cursor.optimizer.state[p][key]
                for s, p in zip(state[key], cursor.params, strict=True)
            ]
    return Perturbation(params, state)


def _step_of(cursor, model_state, opt_state, lr):
    """Run the cursor's next batch from (model_state, opt_state) with PyTorch's optimizer: (theta', state')."""
    model = _model()
    model.load_state_dict(model_state)
    opt = type(cursor.optimizer)(model.parameters())
    opt.load_state_dict(copy.deepcopy(opt_state))
    for group in opt.param_groups:
        group["lr"] = lr
    x, y = cursor.batch()
    opt.zero_grad()
    cursor.training.loss_fn(model(x), y).backward()
    opt.step()
    params = [p.detach().clone() for p in model.parameters()]
    return params, {k: [opt.state[p][k].clone() for p in model.parameters()] for k in _state_keys(opt)}


def _shifted(cursor, d: Perturbation, eps: float):
    names = [n for n, _ in cursor.model.named_parameters()]
    model_state = {n: p.detach() + eps * dp for n, p, dp in zip(names, cursor.params, d.param, strict=True)}
    opt_state = copy.deepcopy(cursor.optimizer.state_dict())
    for key, values in d.state.items():
        for i, v in enumerate(values):
            opt_state["state"][i][key] = opt_state["state"][i][key] + eps * v
    return model_state, opt_state


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_forward_is_the_jacobian_of_the_pytorch_step(name: str) -> None:
    """J d from `linearize` (full mode) equals the central difference of PyTorch's real step (a test-only check)."""
    training = _training(OPTIMIZERS[name])
    cursor = recorded_cursor(training, 0)
    cursor.run(3)  # buffers and moments exist
    keys = _state_keys(cursor.optimizer)
    d = _random(cursor, keys, seed=1)
    lr = training.stages[1].lrs[cursor.step_index]
    eps = 1e-6
    plus, minus = (_step_of(cursor, *_shifted(cursor, d, s * eps), lr) for s in (1, -1))
    point = live_step(cursor, "full")
    jd = lin.forward(point, d)
    for got, p, m in zip(jd.param, plus[0], minus[0], strict=True):
        torch.testing.assert_close(got, (p - m) / (2 * eps), rtol=1e-5, atol=1e-7)
    for key in keys:
        for got, p, m in zip(jd.state[key], plus[1][key], minus[1][key], strict=True):
            torch.testing.assert_close(got, (p - m) / (2 * eps), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("mode", lin.ADAM_MODES)
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_transpose_is_the_adjoint_of_forward(name: str, mode: str) -> None:
    """<a, J d> == <J^T a, d> for random a, d: the adjoint sweep and the tangent sweep agree."""
    training = _training(OPTIMIZERS[name])
    cursor = recorded_cursor(training, 0)
    cursor.run(2)
    keys = _state_keys(cursor.optimizer)
    if mode == "frozen":
        keys = tuple(k for k in keys if k != "exp_avg_sq")
    d, a = _random(cursor, keys, seed=2), _random(cursor, keys, seed=3)
    point = live_step(cursor, mode)
    jd, jta = lin.forward(point, d), lin.transpose(point, a)

    def dot(u: Perturbation, v: Perturbation) -> float:
        total = sum(float((x * y).sum()) for x, y in zip(u.param, v.param, strict=True))
        return total + sum(
            float((x * y).sum()) for k in keys for x, y in zip(u.get(k), v.get(k), strict=True)
        )

    assert dot(a, jd) == pytest.approx(dot(jta, d), rel=1e-10, abs=1e-12)


def test_first_momentum_step_ignores_the_incoming_buffer() -> None:
    """PyTorch starts a momentum buffer as a copy of the gradient: a buffer perturbation then has no effect."""
    training = _training(OPTIMIZERS["sgd-momentum-coupled-decay"])
    cursor = recorded_cursor(training, 0)
    point = live_step(cursor, "full")
    assert point.first
    zero = Perturbation([torch.zeros_like(p) for p in cursor.params])
    buffer_only = Perturbation(zero.param, {"momentum_buffer": [torch.ones_like(p) for p in cursor.params]})
    out = lin.forward(point, buffer_only)
    assert all(float(p.abs().max()) == 0.0 for p in out.param)
