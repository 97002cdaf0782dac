"""Models that draw random numbers in training: the recorder reseeds each training forward with a recorded seed
drawn from the loop's own generator, so dropout replays bit for bit (against the loop's trained model and a hand
replay that reads the seeds with plain SQL); what cannot be replayed is refused in one line, before replaying."""

from __future__ import annotations

import io
import json
from pathlib import Path

import duckdb
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fgtrac_core.pipeline import Pipeline
from fgtrac_core.stages._records import load_training
from fgtrac_core.stages.analysis import analyze
from fgtrac_core.stages.errors import ReplayMismatchError, StageAnalysisError
from fgtrac_core.stages.replay import deterministic, replay_full
from fgtrac_core.store import RunStore
from tests.conftest import run_cli
from tests.stages._loops import (
    MLP,
    N_TRAIN,
    DropoutMLP,
    create_run,
    dataset,
    inputs,
    same_state,
    validation_loss,
)


class Jitter(nn.Module):
    """Random augmentation as a module: in training, a random sign flip and noise per sample (torch's generator)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        flip = torch.where(torch.rand(len(x), 1) < 0.5, -1.0, 1.0)
        return x * flip + 0.1 * torch.randn_like(x)


class AugmentedMLP(nn.Sequential):
    """The documented recipe for random augmentation: done by the model's first module, so the recorder's seed
    for the forward draws it too (`seed_forwards=True`), and the pipeline's inputs stay the plain ones."""

    def __init__(self) -> None:
        super().__init__(Jitter(), MLP())


class NoisyMLP(MLP):
    """Draws random numbers without a dropout module: functional dropout on its hidden layer."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.dropout(torch.tanh(self.body(x)), 0.2, self.training))


def _record(
    run_dir: Path,
    model_factory: type[nn.Module] = DropoutMLP,
    *,
    seed_forwards: bool | None = None,
    train_accuracy: bool = False,
    accumulate: bool = False,
) -> nn.Module:
    """A user's loop with an SGD then an Adam stage; `train_accuracy`: an extra forward per step in training mode
    with gradients (a loop that computes its training accuracy that way); `accumulate`: two micro-batches per
    step."""
    torch.manual_seed(0)
    x, y = dataset()
    model = model_factory()
    run = create_run(run_dir, "dropout")
    try:
        for name, opt in (("sgd", torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)),
                          ("adam", torch.optim.Adam(model.parameters(), lr=0.01))):  # fmt: skip
            with run.stage(name, optimizer=opt, model=model, seed_forwards=seed_forwards):
                for epoch in range(2):
                    for ids in torch.randperm(N_TRAIN).split(8):
                        opt.zero_grad()
                        for part in ids.split(4) if accumulate else [ids]:
                            (F.cross_entropy(model(x[part]), y[part]) / (2 if accumulate else 1)).backward()
                            run.log_batch(part, epoch=epoch)
                        opt.step()
                        if train_accuracy:
                            (model(x[ids]).argmax(1) == y[ids]).float().mean()
                    run.checkpoint(model, opt, val_loss=validation_loss(model))
    finally:
        run.close()
    return model


def _training(run_dir: Path, model_factory: type[nn.Module] = DropoutMLP) -> object:
    with RunStore(run_dir) as store:
        return load_training(store, Pipeline(model_factory, inputs, "head", {})).training


def _hand_replay(run_dir: Path) -> dict[str, torch.Tensor]:
    """Replay from the tables alone: per step reseed torch with its recorded seed, forward, backward, step."""
    x, y = dataset()
    con = duckdb.connect(str(run_dir / "snapshot.duckdb"), read_only=True)
    try:
        start = con.execute("SELECT path FROM checkpoints WHERE kind = 'stage_start' ORDER BY checkpoint_id").fetchone()
        rows = con.execute(
            """SELECT o.step, s.name, o.forward_seeds, list(bs.sample_id ORDER BY bs.position)
               FROM optimizer_steps o JOIN stages s USING (stage_id) JOIN batches b USING (step)
                    JOIN batch_samples bs USING (batch_id)
               GROUP BY ALL ORDER BY o.step"""
        ).fetchall()
    finally:
        con.close()
    model = DropoutMLP()
    model.load_state_dict(torch.load(io.BytesIO((run_dir / start[0]).read_bytes()), weights_only=True)["model"])
    opts = {"sgd": torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)}
    for _, stage, seeds, ids in rows:
        if stage not in opts:
            opts[stage] = torch.optim.Adam(model.parameters(), lr=0.01)
        (seed,) = json.loads(seeds)
        opts[stage].zero_grad()
        torch.manual_seed(seed)
        t = torch.tensor(ids)
        F.cross_entropy(model(x[t]), y[t]).backward()
        opts[stage].step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_dropout_replays_bit_for_bit(tmp_path: Path) -> None:
    with deterministic(1):
        trained = _record(tmp_path / "run").state_dict()
        again = _record(tmp_path / "again").state_dict()
        assert same_state(again, trained)  # the seeds come from the loop's generator: as reproducible as before
        assert same_state(_hand_replay(tmp_path / "run"), trained)
        assert same_state(replay_full(_training(tmp_path / "run")).model, trained)
        analysis = analyze(tmp_path / "run", method="replay", pipeline=Pipeline(DropoutMLP, inputs, "head", {}),
                           progress=False)  # fmt: skip
    assert analysis.params["verified"] is True
    info = run_cli("info", str(tmp_path / "run"), "--json", check=True).stdout
    assert [s["forward_seeds"] for s in json.loads(info)["stages"]] == [True, True]
    assert "forward seeds recorded (dropout, randomness in the model)" in run_cli("info", str(tmp_path / "run"), check=True).stdout


@pytest.mark.parametrize(("model", "accumulate"), [(NoisyMLP, False), (NoisyMLP, True), (AugmentedMLP, False)])
def test_random_numbers_in_the_forward_replay_when_seeded(
    tmp_path: Path, model: type[nn.Module], accumulate: bool
) -> None:
    """Functional dropout, and random augmentation done by the model's first module."""
    with deterministic(1):
        trained = _record(tmp_path / "run", model, seed_forwards=True, accumulate=accumulate).state_dict()
        assert same_state(replay_full(_training(tmp_path / "run", model)).model, trained)


def test_unseeded_dropout_is_refused_before_replaying(tmp_path: Path) -> None:
    pipe = Pipeline(DropoutMLP, inputs, "head", {})
    with deterministic(1):
        _record(tmp_path / "run", seed_forwards=False)
        info = json.loads(run_cli("info", str(tmp_path / "run"), "--json", check=True).stdout)
        assert [s["forward_seeds"] for s in info["stages"]] == [False, False]
        refused = r"random dropout masks in training \(drop \(p=0.3\)\), and stage 'sgd' was recorded without"
        with pytest.raises(StageAnalysisError, match=refused):
            analyze(tmp_path / "run", method="replay", pipeline=pipe, progress=False)
        fast = analyze(tmp_path / "run", method="fast", pipeline=pipe, progress=False)
    assert fast.params["verified"] is False and "dropout" in fast.params["verified_reason"]


def test_a_training_forward_outside_the_batches_is_refused(tmp_path: Path) -> None:
    with deterministic(1):
        _record(tmp_path / "run", train_accuracy=True)
        refused = r"step 1 \(stage 'sgd'\) ran 2 training-mode forward pass\(es\) of the model with gradients for its 1"
        with pytest.raises(StageAnalysisError, match=refused):
            replay_full(_training(tmp_path / "run"))


def test_unseeded_functional_dropout_diverges_with_the_remedy(tmp_path: Path) -> None:
    """A model that draws random numbers without dropout layers is not reseeded by default: replay names the first
    step and the option that records it."""
    with deterministic(1):
        _record(tmp_path / "run", NoisyMLP)
        with pytest.raises(ReplayMismatchError, match=r"first diverges at step 0 .*seed_forwards=True"):
            replay_full(_training(tmp_path / "run", NoisyMLP))
