"""`ForwardSeeds`: which forwards are reseeded, that the seeds follow from the loop's own seed, and that reseeding
with a recorded seed redraws the forward's dropout mask (the CUDA form is in test_cuda.py)."""

from __future__ import annotations

import torch
from torch import nn

from fgtrac_core.tracking.forward_seeds import ForwardSeeds, _successor, random_modules, reseed


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 32), nn.Dropout(0.5), nn.Linear(32, 3), nn.Dropout(0.0))


def _seeded_forwards(x: torch.Tensor) -> tuple[list[int], list[torch.Tensor]]:
    torch.manual_seed(0)
    model = _model()
    seeds = ForwardSeeds(model)
    outs = [model(x), model(x)]
    model.eval()
    model(x)  # an evaluation: not reseeded
    model.train()
    with torch.no_grad():
        model(x)  # nor this one
    outs.append(model(x))
    recorded = seeds.take()
    assert seeds.take() == []
    seeds.remove()
    model(x)
    assert seeds.take() == []  # removed: no more seeds
    return recorded, outs


def test_training_forwards_are_reseeded_reproducibly() -> None:
    x = torch.randn(8, 6)
    recorded, outs = _seeded_forwards(x)
    assert len(recorded) == 3 and recorded[1] == _successor(recorded[0]) and recorded[2] == _successor(recorded[1])
    assert _seeded_forwards(x)[0] == recorded  # from the loop's torch.manual_seed(0), as reproducible as before
    torch.manual_seed(0)
    model = _model()
    for seed, out in zip(recorded, outs, strict=True):
        reseed(seed)
        assert torch.equal(model(x), out)  # the same mask, drawn again


def test_random_modules_names_dropout_layers_with_a_rate() -> None:
    assert random_modules(_model()) == ["1 (p=0.5)"]
    assert random_modules(nn.Linear(2, 2)) == []
