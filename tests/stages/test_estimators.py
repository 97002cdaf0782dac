"""Estimators against exact replay where the first-order theory is exact, and replay's own guarantees."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fgtrac_core.stages import behaviours as beh
from fgtrac_core.stages import estimators as est
from fgtrac_core.stages.errors import ReplayMismatchError
from fgtrac_core.stages.replay import replay_full, replay_without
from tests.stages._toy import MLP, StageSpec, cosine, data, train_in_memory

N_TRAIN = 40


def _linear() -> nn.Module:
    return nn.Linear(5, 2).double()


def _mse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (out - target).pow(2).mean()


def _linear_in_theta(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """A training loss whose gradient does not depend on the parameters (zero curvature)."""
    return (out * target).sum(1).mean()


def _regression_data() -> tuple[torch.Tensor, torch.Tensor]:
    x, _ = data(dtype=torch.float64)
    g = torch.Generator().manual_seed(5)
    return x, torch.randn(len(x), 2, generator=g, dtype=torch.float64)


SGD_STAGES = [
    StageSpec(
        "momentum-decay-cosine",
        lambda p: torch.optim.SGD(p, lr=0.2, momentum=0.9, weight_decay=0.01),
        12,
        cosine,
    ),
    StageSpec("continues-optimizer", lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9), 6, carry=True),
    StageSpec(
        "nesterov-dampening",
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.8, dampening=0.1, nesterov=False, weight_decay=0.02),
        7,
    ),
    StageSpec("nesterov", lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.7, nesterov=True), 5),
]


def _counterfactuals(training) -> list[dict[str, torch.Tensor]]:
    replay_full(training)
    return [replay_without(training, k).model for k in range(training.n_stages)]


def _assert_embeddings_exact(training, vectors, atol: float) -> None:
    final = training.final_model
    for k, (cf, e) in enumerate(zip(_counterfactuals(training), vectors, strict=True)):
        for name in e:
            assert torch.allclose(final[name] - e[name], cf[name], atol=atol, rtol=0), f"stage {k} {name}"


def test_propagated_equals_replay_on_linear_dynamics() -> None:
    """Quadratic loss + SGD: the training map is affine, so the propagated Jacobian is exact (to 1e-6 and far below)."""
    x, t = _regression_data()
    training = train_in_memory(_linear, SGD_STAGES, x, t, n_train=N_TRAIN, loss_fn=_mse)
    emb = est.propagated_embeddings(training)
    _assert_embeddings_exact(training, emb.vectors, atol=1e-10)
    # and the fast, curvature-free map is not exact here (the test can fail)
    fast = est.fast_embeddings(training).vectors[0]
    assert not torch.allclose(
        training.final_model["weight"] - fast["weight"], replay_without(training, 0).model["weight"]
    )


def test_adjoint_sweep_reads_the_same_linearisation() -> None:
    """On the quadratic toy, the backward adjoint of f = test outputs gives f(theta_T) - f(theta~_T) exactly."""
    x, t = _regression_data()
    training = train_in_memory(_linear, SGD_STAGES, x, t, n_train=N_TRAIN, loss_fn=_mse)
    model, (xt, yt) = training.model_factory(), training.test_set()

    def first_output(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return out[:, 0]

    grads = beh.gradients(model, training.final_model, xt, yt, first_output)
    linear, _ = est.propagated_adjoint(training, grads)
    final = beh.evaluate(model, training.final_model, xt, yt, {"f": first_output})["f"]
    for k, cf in enumerate(_counterfactuals(training)[:-1]):
        exact = final - beh.evaluate(model, cf, xt, yt, {"f": first_output})["f"]
        np.testing.assert_allclose(linear[k], exact, atol=1e-9)


MIXED_STAGES = [
    StageSpec(
        "sgd-momentum-decay-cosine",
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.01),
        10,
        cosine,
    ),
    StageSpec("adamw", lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1), 8),
    StageSpec("sgd-nesterov", lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True), 5),
    StageSpec(
        "continues-nesterov",
        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True),
        5,
        carry=True,
    ),
]


def test_fast_is_exact_without_curvature() -> None:
    """With a zero-curvature loss the later runs' gradients are identical, so the curvature-free carry through
    momentum, coupled and decoupled (AdamW) decay, a cosine schedule and a continued momentum buffer is exact."""
    x, t = _regression_data()
    training = train_in_memory(_linear, MIXED_STAGES, x, t, n_train=N_TRAIN, loss_fn=_linear_in_theta)
    _assert_embeddings_exact(training, est.fast_embeddings(training).vectors, atol=1e-10)


def test_partial_replay_converges_to_replay() -> None:
    """Horizon 0 is the fast estimate; a horizon covering every later step is exact replay."""
    x, y = data()
    training = train_in_memory(MLP, MIXED_STAGES, x, y, n_train=N_TRAIN)
    full = est.partial_replay_embeddings(training, horizon=10_000).vectors
    _assert_embeddings_exact(training, full, atol=1e-6)  # theta_T - (theta_T - theta~_T) rounds in float32
    zero, fast = (
        est.partial_replay_embeddings(training, horizon=0).vectors,
        est.fast_embeddings(training).vectors,
    )
    for a, b in zip(zero, fast, strict=True):
        for name in a:
            torch.testing.assert_close(a[name], b[name])


def _assert_tangent_equals_adjoint(training, adam_mode: str) -> None:
    """grad f . (J Delta_k) for every stage but the last, by the forward tangent sweep and by the backward adjoint
    sweep (f: each test example's loss)."""
    model, (xt, yt) = training.model_factory(), training.test_set()
    emb = est.propagated_embeddings(training, adam_mode)
    grads = beh.gradients(model, training.final_model, xt, yt, beh.example_loss)
    linear, _ = est.propagated_adjoint(training, grads, adam_mode)
    for k in range(training.n_stages - 1):
        via_tangent = beh.directional(
            model, training.final_model, emb.vectors[k], xt, yt, {"loss": beh.example_loss}
        )
        np.testing.assert_allclose(linear[k], via_tangent["loss"], rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("adam_mode", ["full", "frozen"])
def test_tangent_and_adjoint_sweeps_agree_with_adam(adam_mode: str) -> None:
    """Through momentum SGD, AdamW and a continued optimizer, grad f . (J Delta_k) is the same both ways."""
    x, y = data(dtype=torch.float64)
    training = train_in_memory(lambda: MLP().double(), MIXED_STAGES, x, y, n_train=N_TRAIN)
    _assert_tangent_equals_adjoint(training, adam_mode)


def test_every_estimator_is_exact_for_the_last_stage() -> None:
    x, y = data()
    training = train_in_memory(MLP, MIXED_STAGES, x, y, n_train=N_TRAIN)
    last = training.stages[-1]
    expected = {n: training.final_model[n] - last.start_model[n] for n in last.start_model}
    for emb in (
        est.fast_embeddings(training),
        est.propagated_embeddings(training),
        est.partial_replay_embeddings(training, 3),
    ):
        for name, value in emb.vectors[-1].items():
            assert torch.equal(value, expected[name])


def test_replay_reports_a_mismatch_instead_of_numbers() -> None:
    x, y = data()
    training = train_in_memory(MLP, MIXED_STAGES, x, y, n_train=N_TRAIN)
    replay_full(training)  # reproduces theta_T bit for bit
    training.stages[1].end_model["head.bias"] = training.stages[1].end_model["head.bias"] + 1e-6
    with pytest.raises(ReplayMismatchError, match="'adamw'.*max abs difference 1e-06"):
        replay_full(training)


# optimizers over some of the parameters, param groups of the loop's own order, frozen parameters: the estimators
# leave a parameter a step did not move where it is (lr 0), keeping its Hessian coupling to the moved ones
SUBSET_SGD_STAGES = [
    StageSpec("all", lambda p: torch.optim.SGD(p, lr=0.2, momentum=0.9, weight_decay=0.01), 10, cosine),
    StageSpec(
        "weight-only",
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.02),
        6,
        select=lambda m: [m.weight],
    ),
    StageSpec(
        "own-order-groups",
        lambda groups: torch.optim.SGD(groups, lr=0.1, momentum=0.8),
        6,
        select=lambda m: [{"params": [m.bias], "lr": 0.05}, {"params": [m.weight]}],
    ),
    StageSpec(
        "bias-frozen", lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.05), 5, frozen=("bias",)
    ),
    StageSpec("continues-frozen", lambda p: torch.optim.SGD(p, lr=0.1), 4, carry=True, frozen=("bias",)),
    StageSpec(
        "new-bias", lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.01), 5, reset=("bias",)
    ),
]


def test_propagated_equals_replay_with_subsets_and_frozen_parameters() -> None:
    """Quadratic loss + SGD over a subset, groups in another order, a frozen parameter the optimizer holds (and a
    stage continuing that optimizer), a parameter the loop re-draws between stages: the training map is still
    affine, so the propagated Jacobian is exact (and the adjoint sweep reads the same numbers)."""
    x, t = _regression_data()
    training = train_in_memory(_linear, SUBSET_SGD_STAGES, x, t, n_train=N_TRAIN, loss_fn=_mse)
    # per model parameter (weight, bias): its index into the stage's optimizer when the stage stepped it
    assert [training.stepped_index(j) for j in range(training.n_stages)] == [
        [0, 1], [0, None], [1, 0], [0, None], [0, None], [0, 1]
    ]
    assert training.replaced(5) == ["bias"] and not any(training.replaced(j) for j in range(5))
    emb = est.propagated_embeddings(training).vectors
    _assert_embeddings_exact(training, emb, atol=1e-10)
    model, (xt, yt) = training.model_factory(), training.test_set()

    def first_output(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return out[:, 0]

    linear, _ = est.propagated_adjoint(training, beh.gradients(model, training.final_model, xt, yt, first_output))
    for k in range(training.n_stages - 1):
        via_tangent = beh.directional(model, training.final_model, emb[k], xt, yt, {"f": first_output})["f"]
        np.testing.assert_allclose(linear[k], via_tangent, rtol=1e-8, atol=1e-12)


def _head(m: nn.Module) -> list[nn.Parameter]:
    return list(m.head.parameters())


def _own_order(m: nn.Module) -> list[dict]:
    return [{"params": [m.head.bias, m.body.bias], "weight_decay": 0.0}, {"params": [m.head.weight, m.body.weight]}]


SUBSET_MIXED_STAGES = [
    StageSpec("sgd", lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.01), 8, cosine),
    StageSpec("adamw-head", lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1), 6, select=_head),
    StageSpec("adamw-own-order", lambda g: torch.optim.AdamW(g, lr=0.01, weight_decay=0.05), 5, select=_own_order),
    StageSpec("adamw-continues", lambda g: torch.optim.AdamW(g), 4, carry=True),
    StageSpec(
        "sgd-body-frozen",
        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=0.02),
        5,
        frozen=("body.weight", "body.bias"),
    ),
]


def test_fast_is_exact_without_curvature_for_subsets() -> None:
    """Zero curvature (a linear model, a loss linear in its outputs): the curvature-free carry through AdamW over
    the weight alone, AdamW groups of another order and SGD with the bias frozen (its momentum continued) is
    exact."""
    x, t = _regression_data()
    stages = [
        StageSpec("sgd", lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.01), 8, cosine),
        StageSpec("adamw-weight", lambda p: torch.optim.AdamW(p, lr=0.01), 6, select=lambda m: [m.weight]),
        StageSpec(
            "adamw-own-order",
            lambda g: torch.optim.AdamW(g, lr=0.01, weight_decay=0.05),
            5,
            select=lambda m: [{"params": [m.bias], "weight_decay": 0.0}, {"params": [m.weight]}],
        ),
        StageSpec("sgd-bias-frozen", lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9), 5, frozen=("bias",)),
        StageSpec("continues-frozen", lambda p: torch.optim.SGD(p), 4, carry=True, frozen=("bias",)),
        StageSpec("new-weight", lambda p: torch.optim.AdamW(p, lr=0.01), 4, reset=("weight",)),
    ]
    training = train_in_memory(_linear, stages, x, t, n_train=N_TRAIN, loss_fn=_linear_in_theta)
    _assert_embeddings_exact(training, est.fast_embeddings(training).vectors, atol=1e-10)


@pytest.mark.parametrize("adam_mode", ["full", "frozen"])
def test_tangent_and_adjoint_sweeps_agree_with_subsets(adam_mode: str) -> None:
    """grad f . (J Delta_k) both ways through a head-only AdamW, Adam groups of another order (continued) and a
    frozen body; and a horizon covering every later step is exact replay."""
    x, y = data(dtype=torch.float64)
    training = train_in_memory(lambda: MLP().double(), SUBSET_MIXED_STAGES, x, y, n_train=N_TRAIN)
    _assert_tangent_equals_adjoint(training, adam_mode)
    _assert_embeddings_exact(training, est.partial_replay_embeddings(training, 10_000).vectors, atol=1e-12)
