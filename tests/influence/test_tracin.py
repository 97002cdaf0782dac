"""TracInCP last-layer scores against brute-force autograd and Captum's TracInCPFast."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from fgtrac_core.errors import FgtracError
from fgtrac_core.influence import self_influence, tracin
from tests.influence._nets import HeadNet


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    torch.manual_seed(0)
    model = HeadNet(6, 8, 4)
    x_tr, y_tr = torch.randn(40, 6), torch.randint(0, 4, (40,))
    x_te, y_te = torch.randn(7, 6), torch.randint(0, 4, (7,))
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    tmp = tmp_path_factory.mktemp("ckpts")
    checkpoints = []
    for c, lr in enumerate((0.3, 0.2, 0.1)):
        for g in opt.param_groups:
            g["lr"] = lr
        for _ in range(5):
            opt.zero_grad()
            F.cross_entropy(model(x_tr), y_tr).backward()
            opt.step()
        path = tmp / f"c{c}.pt"
        torch.save({"format": "fgtrac-checkpoint/1", "model": model.state_dict()}, path)
        checkpoints.append((str(path), lr))
    return {"model": model, "train": (x_tr, y_tr), "test": (x_te, y_te), "checkpoints": checkpoints}


def _brute_force(setup: dict, include_bias: bool = True) -> torch.Tensor:
    """Σ_c lr_c ∇θ_head ℓ(test)·∇θ_head ℓ(train), one autograd call per sample, in float64."""
    model = HeadNet(6, 8, 4).double()
    (x_tr, y_tr), (x_te, y_te) = setup["train"], setup["test"]
    total = torch.zeros(len(x_te), len(x_tr), dtype=torch.float64)
    for path, lr in setup["checkpoints"]:
        model.load_state_dict(torch.load(path, weights_only=True)["model"])
        params = [model.head.weight] + ([model.head.bias] if include_bias else [])

        def grads(x: torch.Tensor, y: torch.Tensor, params: list = params) -> torch.Tensor:
            rows = []
            for i in range(len(x)):
                loss = F.cross_entropy(model(x[i : i + 1].double()), y[i : i + 1])
                rows.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)]))
            return torch.stack(rows)

        total += lr * grads(x_te, y_te) @ grads(x_tr, y_tr).T
    return total


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


@pytest.mark.parametrize("include_bias", [True, False])
def test_last_layer_equals_brute_force_autograd(setup: dict, include_bias: bool) -> None:
    scores = tracin(
        setup["model"], "head", setup["train"], setup["test"], setup["checkpoints"], include_bias=include_bias
    )
    assert scores.shape == (7, 40)
    assert _rel_err(scores, _brute_force(setup, include_bias)) <= 1e-5


def test_equals_captum_tracincpfast_without_bias(setup: dict) -> None:
    captum = pytest.importorskip("captum.influence")
    model = setup["model"]
    lrs = dict(setup["checkpoints"])

    def load(m: nn.Module, path: str) -> float:
        m.load_state_dict(torch.load(path, weights_only=True)["model"])
        return lrs[path]

    tracer = captum.TracInCPFast(
        model, model.head, TensorDataset(*setup["train"]), [p for p, _ in setup["checkpoints"]],
        checkpoints_load_func=load, loss_fn=nn.CrossEntropyLoss(reduction="sum"), batch_size=64,
    )  # fmt: skip
    reference = tracer.influence(setup["test"], k=None)
    ours = tracin(model, "head", setup["train"], setup["test"], setup["checkpoints"], include_bias=False)
    assert _rel_err(ours, reference) <= 1e-5


def test_streamed_topk_equals_topk_of_full_matrix(setup: dict) -> None:
    args = (setup["model"], "head", setup["train"], setup["test"], setup["checkpoints"])
    full = tracin(*args)
    top = tracin(*args, k=5, chunk_size=7)  # chunks smaller than k: the running merge is exercised
    ref_scores, ref_idx = full.topk(5, dim=1)
    assert torch.allclose(top.proponent_scores, ref_scores) and torch.equal(top.proponent_indices, ref_idx)
    low_scores, low_idx = full.topk(5, dim=1, largest=False)
    assert torch.allclose(top.opponent_scores, low_scores) and torch.equal(top.opponent_indices, low_idx)
    assert (top.proponent_scores[:, 0] > 0).all() and (top.opponent_scores[:, 0] < 0).all()


def test_normalized_scores_are_cosines(setup: dict) -> None:
    args = (setup["model"], "head", setup["train"], setup["test"], setup["checkpoints"])
    cos = tracin(*args, normalize=True)
    assert cos.abs().max() <= 1 + 1e-5
    raw = tracin(*args)
    s_tr = self_influence(setup["model"], "head", setup["train"], setup["checkpoints"])
    s_te = self_influence(setup["model"], "head", setup["test"], setup["checkpoints"])
    assert torch.allclose(cos, raw / (s_te.sqrt()[:, None] * s_tr.sqrt()[None, :]), rtol=1e-5)


def test_self_influence_equals_brute_force_diagonal(setup: dict) -> None:
    s = self_influence(setup["model"], "head", setup["train"], setup["checkpoints"])
    both = {**setup, "test": setup["train"]}
    assert _rel_err(s, torch.diagonal(_brute_force(both))) <= 1e-5


def test_bad_input(setup: dict, tmp_path: Path) -> None:
    args = (setup["train"], setup["test"], setup["checkpoints"])
    with pytest.raises(FgtracError, match="no layer named 'nope'"):
        tracin(setup["model"], "nope", *args)
    with pytest.raises(FgtracError, match="nn.Linear"):
        tracin(setup["model"], "body", *args)
    with pytest.raises(FgtracError, match="empty"):
        tracin(setup["model"], "head", (torch.empty(0, 6), torch.empty(0, dtype=torch.long)), *args[1:])
    with pytest.raises(FgtracError, match="one loss per sample"):
        tracin(setup["model"], "head", *args, loss_fn=nn.CrossEntropyLoss())


def test_review_equals_tracin_topk_and_self_influence(setup: dict) -> None:
    from fgtrac_core.influence import review

    args = (setup["model"], "head", setup["train"], setup["test"], setup["checkpoints"])
    rev = review(*args, k=3, cosine=True)
    ref = tracin(*args, k=3)
    assert torch.equal(rev.top.proponent_indices, ref.proponent_indices)
    assert torch.equal(rev.top.opponent_indices, ref.opponent_indices)
    cos = tracin(*args, k=3, normalize=True)
    assert torch.equal(rev.top_cosine.proponent_indices, cos.proponent_indices)
    assert torch.allclose(
        rev.self_influence, self_influence(setup["model"], "head", setup["train"], setup["checkpoints"])
    )
    # per-pair detail: contributions sum to the raw score, and raw/cosine agree with the full matrices
    full, full_cos = tracin(*args), tracin(*args, normalize=True)
    i = torch.arange(len(full))[:, None].expand(-1, 3)
    raw, cosine, parts = rev.pair_detail(i, rev.top.proponent_indices)
    assert parts.shape == (*i.shape, len(setup["checkpoints"]))
    assert torch.allclose(parts.sum(-1), raw)
    assert torch.allclose(raw, full.gather(1, rev.top.proponent_indices), rtol=1e-5)
    assert torch.allclose(cosine, full_cos.gather(1, rev.top.proponent_indices), rtol=1e-4, atol=1e-6)
