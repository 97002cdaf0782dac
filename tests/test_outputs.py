"""A binary classifier with one logit per example (trained with BCEWithLogits) read as the two-class logits (0, z):
the unit identities, and a recorded run through influence (stored predictions, confidences, losses; the LDS check)
and stage analysis (the exact last-stage effect), each against a hand computation with torch's binary functions.
Before, predictions were argmax of one column (always class 0) and stage analysis failed on its cross-entropy."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fgtrac_core import Run
from fgtrac_core.influence.run_influence import run_influence
from fgtrac_core.outputs import class_logits
from fgtrac_core.pipeline import Pipeline
from fgtrac_core.stages import analyze
from fgtrac_core.stages.behaviours import example_loss, example_margin
from fgtrac_core.store import RunStore

N_TRAIN, N_TEST, D_IN = 40, 12, 4
REFS = {"model": "tests.test_outputs:BinaryNet", "inputs": "tests.test_outputs:inputs",
        "head_layer": "out", "loss": "tests.test_outputs:bce"}  # fmt: skip


class BinaryNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(D_IN, 6)
        self.out = nn.Linear(6, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.body(x)))


def bce(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(outputs.squeeze(1), targets.float())


def dataset() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(N_TRAIN + N_TEST, D_IN, generator=g)
    return x, (x[:, 0] - 0.5 * x[:, 1] + 0.3 * torch.randn(len(x), generator=g) > 0).long()


def inputs(config: dict[str, Any], ids: np.ndarray) -> torch.Tensor:
    return dataset()[0][torch.as_tensor(np.asarray(ids, dtype=np.int64))]


def test_one_logit_reads_as_two_class_logits() -> None:
    z, y = torch.tensor([2.0, -0.5, 0.0, 7.0]), torch.tensor([1, 1, 0, 0])
    for outputs in (z, z[:, None]):
        logits = class_logits(outputs)
        assert logits.shape == (4, 2)
        torch.testing.assert_close(logits.softmax(1)[:, 1], torch.sigmoid(z))
        want = F.binary_cross_entropy_with_logits(z, y.float(), reduction="none")
        torch.testing.assert_close(example_loss(outputs, y), want)
        torch.testing.assert_close(example_margin(outputs, y), torch.where(y == 1, z, -z))
    many = torch.randn(4, 3)
    assert class_logits(many) is many  # multi-class outputs as they are


@pytest.fixture(scope="module")
def binary_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, dict[str, torch.Tensor]]]:
    """Two stages (SGD, then Adam) of a one-logit model trained with BCEWithLogits; the model's state at the second
    stage's start and at the end."""
    torch.manual_seed(0)
    x, y = dataset()
    run_dir = tmp_path_factory.mktemp("binary") / "run"
    run = Run.create(run_dir, name="binary", config={"torch_threads": torch.get_num_threads(), **REFS})
    run.register_samples(np.arange(N_TRAIN), split="train", labels=y[:N_TRAIN].numpy(), raw=x[:N_TRAIN].numpy())
    test = np.arange(N_TRAIN, N_TRAIN + N_TEST)
    run.register_samples(test, split="test", labels=y[N_TRAIN:].numpy(), raw=x[N_TRAIN:].numpy())
    model = BinaryNet()
    states = {}
    for k, (name, opt) in enumerate(
        [("sgd", torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)),
         ("adam", torch.optim.Adam(model.parameters(), lr=0.02))]  # fmt: skip
    ):
        if k == 1:
            states["start_last"] = copy.deepcopy(model.state_dict())
        with run.stage(name, optimizer=opt, model=model):
            for epoch in range(3):
                order = torch.randperm(N_TRAIN, generator=torch.Generator().manual_seed(10 * k + epoch))
                for b in order.split(8):
                    opt.zero_grad()
                    loss = bce(model(x[b]), y[b])
                    loss.backward()
                    opt.step()
                    run.log_batch(b, epoch=epoch, loss=loss, targets=y[b])
                with torch.no_grad():
                    run.checkpoint(model, opt, val_loss=float(bce(model(x[N_TRAIN:]), y[N_TRAIN:])))
    run.close()
    states["final"] = copy.deepcopy(model.state_dict())
    return run_dir, states


def _test_outputs(state: dict[str, torch.Tensor]) -> torch.Tensor:
    model = BinaryNet()
    model.load_state_dict(state)
    with torch.no_grad():
        return model(dataset()[0][N_TRAIN:])[:, 0].double()


def test_influence_stores_binary_predictions(binary_run: tuple[Path, dict]) -> None:
    run_dir, states = binary_run
    summary = run_influence(run_dir, k=5, check=2, force=True, **{"model": REFS["model"], "inputs": REFS["inputs"],
                            "layer": REFS["head_layer"], "loss": REFS["loss"]})  # fmt: skip
    z, y = _test_outputs(states["final"]), dataset()[1][N_TRAIN:]
    p = torch.sigmoid(z)
    with RunStore(run_dir) as store:
        rows = store.influence_tests(summary.analysis_id).sort_values("sample_id")
    np.testing.assert_array_equal(rows["prediction"], (z > 0).numpy().astype(np.int32))
    np.testing.assert_allclose(rows["confidence"], torch.maximum(p, 1 - p).numpy(), rtol=1e-5)
    np.testing.assert_allclose(
        rows["loss"], F.binary_cross_entropy_with_logits(z, y.double(), reduction="none").numpy(), rtol=1e-4
    )
    assert summary.accuracy == pytest.approx(float(((z > 0).long() == y).double().mean()))
    assert summary.accuracy > 0.6  # the model learned something: a real check of the predictions above
    assert summary.check is not None and np.isfinite(summary.check["lds"])


def test_stage_analysis_of_a_binary_run(binary_run: tuple[Path, dict]) -> None:
    run_dir, states = binary_run
    pipeline = Pipeline(model_factory=BinaryNet, load_inputs=inputs, head_layer="out", config={}, loss_fn=bce)
    res = analyze(run_dir, method="replay", behaviours=("loss", "margin"), pipeline=pipeline)
    y = dataset()[1][N_TRAIN:].double()
    z_end, z_start = _test_outputs(states["final"]), _test_outputs(states["start_last"])
    want = {
        "loss": F.binary_cross_entropy_with_logits(z_end, y, reduction="none")
        - F.binary_cross_entropy_with_logits(z_start, y, reduction="none"),
        "margin": torch.where(y == 1, z_end - z_start, z_start - z_end),
    }
    last = res.effects[(res.effects.method == "replay") & (res.effects.stage_id == res.effects.stage_id.max())]
    for behaviour, values in want.items():
        got = last[last.behaviour == behaviour].sort_values("test_id").value.to_numpy()
        np.testing.assert_allclose(got, values.numpy(), rtol=1e-4, atol=1e-6)
