"""The `full` (projected per-sample gradients) and `adamw` (optimizer-aware) modes against hand computations."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fgtrac_core.errors import FgtracError
from fgtrac_core.influence import momentum_factor, self_influence, tracin
from tests.influence._nets import HeadNet


def _data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g)


def _train(opt_cls: type, steps: int, **kw: float) -> tuple[HeadNet, list[tuple[dict, float]]]:
    torch.manual_seed(0)
    model = HeadNet()
    opt = opt_cls(model.parameters(), **kw)
    x, y = _data(30, 1)
    checkpoints = []
    for block in range(2):
        for _ in range(steps):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        state = {"model": copy.deepcopy(model.state_dict()), "optimizer": copy.deepcopy(opt.state_dict())}
        checkpoints.append((state, kw["lr"] * (1 - 0.3 * block)))
    return model, checkpoints


def _fgtrac_checkpoint(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> dict:
    """Three full-batch steps, then the checkpoint as the recorder writes it: model and optimizer state, the names
    of the parameters each param group held and of those frozen."""
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    names = {id(p): n for n, p in model.named_parameters()}
    return {
        "model": copy.deepcopy(model.state_dict()),
        "optimizer": copy.deepcopy(opt.state_dict()),
        "optimizer_params": [[names[id(p)] for p in g["params"]] for g in opt.param_groups],
        "frozen": [n for n, p in model.named_parameters() if not p.requires_grad],
    }


def _grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor, names: list[str]) -> torch.Tensor:
    """Per-sample gradients of the named parameters, one autograd call per sample, float64."""
    params = dict(model.named_parameters())
    rows = []
    for i in range(len(x)):
        g = torch.autograd.grad(
            F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]), [params[n] for n in names]
        )
        rows.append(torch.cat([t.reshape(-1) for t in g]))
    return torch.stack(rows)


def test_full_with_projection_at_least_p_equals_exact_product() -> None:
    model, checkpoints = _train(torch.optim.SGD, 4, lr=0.2)
    train, test = _data(12, 2), _data(4, 3)
    ref = model.double()
    names = [n for n, _ in ref.named_parameters()]
    n_params = sum(p.numel() for p in ref.parameters())
    exact = torch.zeros(4, 12, dtype=torch.float64)
    for state, lr in checkpoints:
        ref.load_state_dict(state["model"])
        gt = _grads(ref, test[0].double(), test[1], names)
        gr = _grads(ref, train[0].double(), train[1], names)
        exact += lr * gt @ gr.T
    model = model.float()
    got = tracin(model, "head", train, test, checkpoints, mode="full", projection_dim=n_params + 3, seed=7)
    assert torch.allclose(got.double(), exact, rtol=1e-4, atol=1e-6)
    # a projection below P is an unbiased sketch, not the exact product, and is seeded (reproducible)
    small = tracin(model, "head", train, test, checkpoints, mode="full", projection_dim=16, seed=7)
    again = tracin(model, "head", train, test, checkpoints, mode="full", projection_dim=16, seed=7)
    assert torch.equal(small, again) and not torch.allclose(small.double(), exact, rtol=1e-3)


@pytest.mark.parametrize("setup", ["discriminative", "head_only", "frozen_body"])
def test_full_weighs_each_parameter_by_its_groups_rate(setup: str) -> None:
    """`full` mode with the checkpoint weighed by the first group's rate (the recorded `checkpoints.lr`): each
    parameter's gradients count at its own group's rate, 0 for one the optimizer did not hold or that was frozen,
    against a hand computation per parameter at the rates the optimizer applied."""
    torch.manual_seed(0)
    model = HeadNet()
    body = list(model.body.parameters())
    if setup == "discriminative":
        opt = torch.optim.SGD([{"params": body, "lr": 0.01}, {"params": model.head.parameters(), "lr": 0.1}])
    elif setup == "head_only":
        opt = torch.optim.SGD(model.head.parameters(), lr=0.1)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for p in body:
            p.requires_grad_(False)
    x, y = _data(30, 1)
    train, test = _data(6, 2), _data(3, 3)
    names = [n for n, _ in model.named_parameters()]
    ids = {id(p): n for n, p in model.named_parameters()}
    checkpoints, expected = [], torch.zeros(3, 6, dtype=torch.float64)
    for _ in range(2):
        checkpoints.append((_fgtrac_checkpoint(model, opt, x, y), opt.param_groups[0]["lr"]))
        rate = {
            ids[id(p)]: (g["lr"] if p.requires_grad else 0.0) for g in opt.param_groups for p in g["params"]
        }
        with torch.enable_grad():
            for p in body:
                p.requires_grad_(True)  # the hand computation needs every gradient
            gt, gr = _grads(model, *test, names).double(), _grads(model, *train, names).double()
            if setup == "frozen_body":
                for p in body:
                    p.requires_grad_(False)
        start = 0
        for name, p in model.named_parameters():
            cols = slice(start, start + p.numel())
            start += p.numel()
            expected += rate.get(name, 0.0) * gt[:, cols] @ gr[:, cols].T
    if setup == "frozen_body":
        for p in body:
            p.requires_grad_(True)  # scored as a reviewer loads the model: every parameter trainable
    n_params = sum(p.numel() for p in model.parameters())
    got = tracin(model, "head", train, test, checkpoints, mode="full", projection_dim=n_params)
    assert torch.allclose(got.double(), expected, rtol=1e-4, atol=1e-6 * float(expected.abs().max()))


@pytest.mark.parametrize("mode", ["last_layer", "adamw"])
def test_head_bias_in_another_group_counts_at_its_own_rate(mode: str) -> None:
    """The head's weight and bias in groups of different rates (SGD, so `adamw` mode takes the SGD form): the bias
    term counts at its group's rate, the checkpoint weighed by the weight's, against a hand computation."""
    torch.manual_seed(0)
    model = HeadNet()
    opt = torch.optim.SGD(
        [
            {"params": model.body.parameters(), "lr": 0.01},
            {"params": [model.head.weight], "lr": 0.1},
            {"params": [model.head.bias], "lr": 0.03},
        ]
    )
    x, y = _data(30, 1)
    train, test = _data(6, 2), _data(3, 3)
    names = ["head.weight", "head.bias"]
    checkpoints, expected = [], torch.zeros(3, 6, dtype=torch.float64)
    for _ in range(2):
        checkpoints.append((_fgtrac_checkpoint(model, opt, x, y), 0.1))  # the head weight's rate
        gt, gr = _grads(model, *test, names).double(), _grads(model, *train, names).double()
        expected += 0.1 * gt[:, :18] @ gr[:, :18].T + 0.03 * gt[:, 18:] @ gr[:, 18:].T
    got = tracin(model, "head", train, test, checkpoints, mode=mode).double()
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-6 * float(expected.abs().max()))
    # self-influence is the same quantity's diagonal
    diag = self_influence(model, "head", test, checkpoints, mode=mode).double()
    assert torch.allclose(diag, tracin(model, "head", test, test, checkpoints, mode=mode).double().diagonal(), rtol=1e-5)


def test_full_restricted_to_the_head_equals_last_layer() -> None:
    model, checkpoints = _train(torch.optim.SGD, 4, lr=0.2)
    train, test = _data(12, 2), _data(4, 3)
    head = tracin(model, "head", train, test, checkpoints, mode="full", params="head", projection_dim=100)
    assert torch.allclose(head, tracin(model, "head", train, test, checkpoints), rtol=1e-4, atol=1e-7)


def test_momentum_factor_equals_simulated_adamw_displacement() -> None:
    """κ against a direct simulation of AdamW with a frozen preconditioner: a unit gradient at step t+1, no
    other gradient, measured when 99.9% of the momentum has been delivered."""
    beta1, lr, wd, t = 0.9, 1e-2, 0.5, 3
    m, delta, k = 0.0, 0.0, t  # delta: the perturbation of θ (decay acts on it linearly)
    horizon = 65  # β1^(J+1) <= 1e-3 for β1 = 0.9
    for j in range(horizon + 1):
        k += 1
        g = 1.0 if j == 0 else 0.0
        m = beta1 * m + (1 - beta1) * g
        delta = (1 - lr * wd) * delta - lr * m / (1 - beta1**k)
    assert momentum_factor(beta1, t, lr, wd) == pytest.approx(-delta / lr, rel=1e-12)
    assert momentum_factor(0.0, 10, lr, wd) == pytest.approx(1.0)


def test_adamw_matches_hand_computed_value() -> None:
    model, checkpoints = _train(torch.optim.AdamW, 3, lr=0.05, weight_decay=0.1)
    train, test = _data(6, 2), _data(3, 3)
    names = ["head.weight", "head.bias"]
    expected = torch.zeros(3, 6, dtype=torch.float64)
    for state, lr in checkpoints:
        model.load_state_dict(state["model"])
        opt = state["optimizer"]
        group = opt["param_groups"][0]
        beta1, beta2 = group["betas"]
        idx = {n: i for i, (n, _) in enumerate(model.named_parameters())}
        precond = []
        for n in names:
            s = opt["state"][idx[n]]
            step = int(s["step"])
            v_hat = s["exp_avg_sq"].double() / (1 - beta2**step)
            precond.append((1 / (v_hat.sqrt() + group["eps"])).reshape(-1))
        p = torch.cat(precond)
        kappa = sum(
            (1 - beta1) * beta1**j / (1 - beta1 ** (step + 1 + j)) * (1 - lr * 0.1) ** (65 - j)
            for j in range(66)
        )
        gt = _grads(model, *test, names).double()
        gr = _grads(model, *train, names).double()
        expected += lr * kappa * (gt * p) @ gr.T
    got = tracin(model, "head", train, test, checkpoints, mode="adamw")
    assert torch.allclose(got.double(), expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))
    # the diagonal of the same quantity is the adamw self-influence
    diag = self_influence(model, "head", test, checkpoints, mode="adamw")
    same = tracin(model, "head", test, test, checkpoints, mode="adamw").diagonal()
    assert torch.allclose(diag, same, rtol=1e-5)


def _head_first(model: nn.Module) -> torch.optim.Optimizer:
    """AdamW over groups of the loop's own order: the head first, then the body at a lower rate."""
    body = [p for n, p in model.named_parameters() if not n.startswith("head.")]
    return torch.optim.AdamW([{"params": model.head.parameters()}, {"params": body, "lr": 0.01}], lr=0.05)


def _head_only(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.head.parameters(), lr=0.05)


@pytest.mark.parametrize("make", [_head_first, _head_only])
def test_adamw_pairs_optimizer_state_with_parameters_by_recorded_name(make) -> None:
    """An optimizer over groups in the loop's own order, or over the head alone: the checkpoint's
    `optimizer_params` (as fgtrac checkpoints carry them) pair its state with the right parameters; the hand
    computation reads the optimizer's state by parameter object, not by position."""
    torch.manual_seed(0)
    model = HeadNet()
    opt = make(model)
    x, y = _data(30, 1)
    train, test = _data(6, 2), _data(3, 3)
    names = ["head.weight", "head.bias"]
    params = dict(model.named_parameters())
    checkpoints, expected = [], torch.zeros(3, 6, dtype=torch.float64)
    for lr in (0.05, 0.03):
        checkpoints.append((_fgtrac_checkpoint(model, opt, x, y), lr))
        group = opt.param_groups[0]  # the head's group in both optimizers
        beta1, beta2 = group["betas"]
        precond = []
        for n in names:
            s = opt.state[params[n]]
            step = int(s["step"])
            v_hat = s["exp_avg_sq"].double() / (1 - beta2**step)
            precond.append((1 / (v_hat.sqrt() + group["eps"])).reshape(-1))
        kappa = momentum_factor(beta1, step, lr, group["weight_decay"])
        gt, gr = _grads(model, *test, names).double(), _grads(model, *train, names).double()
        expected += lr * kappa * (gt * torch.cat(precond)) @ gr.T
    got = tracin(model, "head", train, test, checkpoints, mode="adamw")
    assert torch.allclose(got.double(), expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))
    if make is _head_only:  # without the names the state cannot be paired: refused in one line
        bare = [({k: v for k, v in c.items() if k != "optimizer_params"}, lr) for c, lr in checkpoints]
        with pytest.raises(FgtracError, match="covers 2 parameters but the model has 4, and the checkpoint"):
            tracin(model, "head", train, test, bare, mode="adamw")


def test_adamw_weighs_each_param_group_by_its_own_rate_and_decay() -> None:
    """The common AdamW recipe, no weight decay on biases (here also another rate for them): each parameter gets
    the η κ of its own group, checked against a hand computation per parameter (it was refused as 'one κ per
    checkpoint')."""
    torch.manual_seed(0)
    model = HeadNet()
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    opt = torch.optim.AdamW(
        [{"params": weights, "weight_decay": 0.1}, {"params": biases, "weight_decay": 0.0, "lr": 0.02}], lr=0.05
    )
    x, y = _data(30, 1)
    train, test = _data(6, 2), _data(3, 3)
    names = ["head.weight", "head.bias"]
    params = dict(model.named_parameters())
    checkpoints = []
    parts = {"weight": torch.zeros(3, 6, dtype=torch.float64), "bias": torch.zeros(3, 6, dtype=torch.float64)}
    bias_at_weight_rate = torch.zeros(3, 6, dtype=torch.float64)  # what one η κ per checkpoint would give
    for _ in range(2):
        checkpoints.append((_fgtrac_checkpoint(model, opt, x, y), 0.05))  # the head weight's rate
        gt, gr = _grads(model, *test, names).double(), _grads(model, *train, names).double()
        factors = []
        for name, group, cols in zip(names, opt.param_groups, (slice(0, 18), slice(18, 21)), strict=True):
            beta1, beta2 = group["betas"]
            s = opt.state[params[name]]
            p = 1 / ((s["exp_avg_sq"].double() / (1 - beta2 ** int(s["step"]))).sqrt() + group["eps"])
            factors.append(group["lr"] * momentum_factor(beta1, int(s["step"]), group["lr"], group["weight_decay"]))
            product = (gt[:, cols] * p.reshape(-1)) @ gr[:, cols].T
            parts[name.split(".")[1]] += factors[-1] * product
        bias_at_weight_rate += factors[0] * product
    got = tracin(model, "head", train, test, checkpoints, mode="adamw").double()
    expected = parts["weight"] + parts["bias"]
    tol = 1e-5 * float(expected.abs().max())
    assert torch.allclose(got, expected, rtol=1e-4, atol=tol)
    weight_only = tracin(model, "head", train, test, checkpoints, mode="adamw", include_bias=False).double()
    assert torch.allclose(weight_only, parts["weight"], rtol=1e-4, atol=tol)
    assert (bias_at_weight_rate - parts["bias"]).abs().max() > 100 * tol  # the case tells the two apart


def test_adamw_on_sgd_checkpoints_is_the_sgd_form() -> None:
    model, checkpoints = _train(torch.optim.SGD, 3, lr=0.1, momentum=0.9)
    train, test = _data(6, 2), _data(3, 3)
    assert torch.allclose(
        tracin(model, "head", train, test, checkpoints, mode="adamw"),
        tracin(model, "head", train, test, checkpoints),
        rtol=1e-5,
        atol=1e-8,
    )


@pytest.mark.parametrize(
    ("opt_cls", "kw", "needle"),
    [
        (torch.optim.Adadelta, {"lr": 0.5}, "holds acc_delta, square_avg, not the state of an optimizer adamw"),
        (torch.optim.Adamax, {"lr": 0.01}, "holds exp_avg, exp_inf, not the state of an optimizer adamw mode"),
        (torch.optim.RMSprop, {"lr": 0.01, "maximize": True}, r"maximizes its objective \(maximize=True\)"),
        (torch.optim.NAdam, {"lr": 0.01}, "keeps Adam's moments but is not Adam or AdamW"),
        (torch.optim.RAdam, {"lr": 0.01}, "keeps Adam's moments but is not Adam or AdamW"),
    ],
)
def test_adamw_refuses_checkpoints_of_other_optimizers(opt_cls: type, kw: dict, needle: str) -> None:
    """Not scored in SGD's form, nor as if their state were another optimizer's, under the name adamw."""
    model, checkpoints = _train(opt_cls, 3, **kw)
    with pytest.raises(FgtracError, match=needle):
        tracin(model, "head", _data(6, 2), _data(3, 3), checkpoints, mode="adamw")


_RMSPROP_LIKE = {
    "rmsprop": (torch.optim.RMSprop, {"lr": 0.01}),
    "rmsprop_centered": (torch.optim.RMSprop, {"lr": 0.01, "centered": True}),
    "rmsprop_momentum": (torch.optim.RMSprop, {"lr": 0.005, "momentum": 0.5}),
    "adagrad": (torch.optim.Adagrad, {"lr": 0.1, "lr_decay": 0.05, "initial_accumulator_value": 0.1}),
}


def _displacement_per_unit_gradient(
    opt_cls: type, kw: dict, checkpoint: dict, direction: torch.Tensor, names: list[str]
) -> torch.Tensor:
    """−Δθ/ε of the named parameters when torch's own optimizer, restored from `checkpoint`, takes a gradient ε·
    `direction` (the named parameters' flattened gradient) and then, with momentum, steps on zero gradients until
    the momentum has delivered it (`heavy_ball_factor`'s horizon), less the same steps without that gradient: the
    displacement the optimizer gives a training gradient.  In float64; RMSprop's running averages are divided by
    α before each step, so that every step divides by the recorded √v (the frozen preconditioner)."""
    eps, moved = 1e-6, []
    for scale in (eps, 0.0):
        model = HeadNet().double()
        model.load_state_dict(checkpoint["model"])
        opt = opt_cls(model.parameters(), **kw)
        opt.load_state_dict(copy.deepcopy(checkpoint["optimizer"]))  # it would share (and step) the step counts
        params = dict(model.named_parameters())
        before = torch.cat([params[n].detach().reshape(-1).clone() for n in names])
        momentum = kw.get("momentum", 0.0)
        steps = 1 if momentum == 0 else math.ceil(math.log(1e-3) / math.log(momentum))
        for k in range(steps):
            chunks = torch.split(direction * (scale if k == 0 else 0.0), [params[n].numel() for n in names])
            for n, chunk in zip(names, chunks, strict=True):
                params[n].grad = chunk.reshape(params[n].shape).clone()
            for state in opt.state.values():
                for key in ("square_avg", "grad_avg"):
                    if key in state:
                        state[key].div_(opt.param_groups[0]["alpha"])
            opt.step()
        moved.append(torch.cat([params[n].detach().reshape(-1) for n in names]) - before)
    return -(moved[0] - moved[1]) / eps


@pytest.mark.parametrize("case", sorted(_RMSPROP_LIKE))
def test_adamw_weighs_rmsprop_and_adagrad_by_their_own_step(case: str) -> None:
    """adamw mode on RMSprop (plain, centered, with momentum) and Adagrad (with lr_decay)
    checkpoints: each score equals the test gradient dotted with the displacement torch's own optimizer, restored
    from the checkpoint, gives the training gradient (its recorded preconditioner held fixed; with momentum, until
    the momentum has delivered it): η κ g_testᵀ P g_train."""
    opt_cls, kw = _RMSPROP_LIKE[case]
    torch.manual_seed(0)
    model = HeadNet()
    opt = opt_cls(model.parameters(), **kw)
    x, y = _data(30, 1)
    train, test = _data(6, 2), _data(3, 3)
    names = ["head.weight", "head.bias"]
    checkpoints, expected = [], torch.zeros(3, 6, dtype=torch.float64)
    for _ in range(2):
        for _ in range(4):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        checkpoint = {"model": copy.deepcopy(model.state_dict()), "optimizer": copy.deepcopy(opt.state_dict())}
        checkpoints.append((checkpoint, kw["lr"]))
        gt, gr = _grads(model, *test, names).double(), _grads(model, *train, names).double()
        moved = torch.stack([_displacement_per_unit_gradient(opt_cls, kw, checkpoint, g, names) for g in gr])
        expected += gt @ moved.T
    got = tracin(model, "head", train, test, checkpoints, mode="adamw").double()
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))
    sgd_form = tracin(model, "head", train, test, checkpoints).double()
    assert (sgd_form - expected).abs().max() > 0.1 * expected.abs().max()  # the preconditioner matters here


def test_adamw_full_parameters_with_exact_projection() -> None:
    """Optimizer-aware scores over all parameters (projection ≥ P) = the head-only formula extended to all."""
    model, checkpoints = _train(torch.optim.Adam, 3, lr=0.05)
    train, test = _data(6, 2), _data(3, 3)
    names = [n for n, _ in model.named_parameters()]
    n_params = sum(p.numel() for p in model.parameters())
    got = tracin(model, "head", train, test, checkpoints, mode="adamw", params="all", projection_dim=n_params)
    expected = torch.zeros(3, 6, dtype=torch.float64)
    for state, lr in checkpoints:
        model.load_state_dict(state["model"])
        opt = state["optimizer"]
        beta1, beta2 = opt["param_groups"][0]["betas"]
        eps = opt["param_groups"][0]["eps"]
        p = []
        for i, _ in enumerate(names):
            s = opt["state"][i]
            step = int(s["step"])
            p.append((1 / ((s["exp_avg_sq"].double() / (1 - beta2**step)).sqrt() + eps)).reshape(-1))
        kappa = momentum_factor(beta1, step, lr, 0.0)  # Adam's coupled decay does not shrink the displacement
        gt, gr = _grads(model, *test, names).double(), _grads(model, *train, names).double()
        expected += lr * kappa * (gt * torch.cat(p)) @ gr.T
    assert torch.allclose(got.double(), expected, rtol=1e-4, atol=1e-8)


def test_bad_modes_and_parameters() -> None:
    model, checkpoints = _train(torch.optim.SGD, 1, lr=0.1)
    train, test = _data(4, 2), _data(2, 3)
    with pytest.raises(FgtracError, match="mode must be one of"):
        tracin(model, "head", train, test, checkpoints, mode="exact")
    with pytest.raises(FgtracError, match="no parameters match"):
        tracin(model, "head", train, test, checkpoints, mode="full", params=["nope"])
    with pytest.raises(FgtracError, match="must be an nn.Linear"):
        tracin(model, "body", train, test, checkpoints, mode="adamw")
