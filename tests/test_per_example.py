"""Per-example gradients of models vmap cannot batch (a forward that branches on its input, a GRU): equal to one
autograd backward per example, through both callers (influence's dense gradients, stage behaviours)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fgtrac_core._per_example import per_example, per_example_losses
from fgtrac_core.influence.gradients import per_sample_gradients
from fgtrac_core.stages import behaviours


class _Branching(nn.Module):
    """A head only examples with x[0] > 0 reach."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 6)
        self.aux = nn.Linear(6, 3)
        self.out = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.body(x))
        return self.out(h) + self.aux(h) if x[0, 0] > 0 else self.out(h)


def _data() -> tuple[_Branching, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    x = torch.randn(9, 4)
    x[:, 0] = torch.tensor([1.0, -1.0] * 4 + [0.5])  # both branches
    return _Branching(), x, torch.randint(0, 3, (9,))


def _autograd_rows(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    rows = []
    for xi, yi in zip(x, y, strict=True):
        model.zero_grad(set_to_none=False)
        F.cross_entropy(model(xi[None]), yi[None]).backward()
        rows.append(torch.cat([p.grad.reshape(-1).clone() for p in model.parameters()]))
    return torch.stack(rows)


def test_influence_gradients_of_a_branching_model_equal_autograd_per_example() -> None:
    model, x, y = _data()
    names = [n for n, _ in model.named_parameters()]
    got = per_sample_gradients(model, names, (x, y), batch_size=4, device=torch.device("cpu"))
    assert torch.allclose(got, _autograd_rows(model, x, y), atol=1e-6)
    aux = slice(4 * 6 + 6, 4 * 6 + 6 + 6 * 3 + 3)  # body.weight, body.bias, then aux.weight, aux.bias
    assert not got[1, aux].any() and got[0, aux].any()  # x[1, 0] < 0 leaves the head out


def test_stage_behaviour_gradients_of_a_branching_model_equal_autograd_per_example() -> None:
    model, x, y = _data()

    def loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out, target, reduction="none")

    got = behaviours.gradients(model, dict(model.state_dict()), x, y, loss)
    assert torch.allclose(torch.cat([g.reshape(len(x), -1) for g in got], 1), _autograd_rows(model, x, y), atol=1e-6)


class _Gru(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 4)
        self.gru = nn.GRU(4, 5, batch_first=True)
        self.out = nn.Linear(5, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.out(self.gru(self.emb(tokens))[1][-1])


def test_influence_gradients_of_a_gru_equal_autograd_per_example() -> None:
    torch.manual_seed(0)
    model, x, y = _Gru(), torch.randint(0, 7, (6, 5)), torch.randint(0, 3, (6,))
    names = [n for n, _ in model.named_parameters()]
    got = per_sample_gradients(model, names, (x, y), batch_size=4, device=torch.device("cpu"))
    assert torch.allclose(got, _autograd_rows(model, x, y), atol=1e-6)


def test_errors_of_the_function_itself_still_raise() -> None:
    def broken(params: dict, xi: torch.Tensor, yi: torch.Tensor) -> dict:
        raise RuntimeError("something else went wrong")

    with pytest.raises(RuntimeError, match="something else"):
        per_example(broken, {}, torch.zeros(2, 1), torch.zeros(2))


def test_per_example_losses_of_a_branching_loss_equal_each_example_alone() -> None:
    def weighted(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:  # weights class 0 by branching on it
        return F.cross_entropy(out, target) * (2.0 if target[0] == 0 else 1.0)

    out, y = torch.randn(6, 3), torch.tensor([0, 1, 2, 0, 1, 0])
    expected = torch.stack([weighted(out[i : i + 1], y[i : i + 1]) for i in range(6)])
    assert torch.equal(per_example_losses(weighted, out, y), expected)
    smoothed = per_example_losses(lambda o, t: F.cross_entropy(o, t, label_smoothing=0.1), out, y)  # vmapped
    assert torch.allclose(smoothed, F.cross_entropy(out, y, label_smoothing=0.1, reduction="none"), atol=1e-6)
