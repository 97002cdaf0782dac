"""The recorder on a CUDA device (skipped without one; run on a GPU machine): what a GPU loop logs is recorded as
it was when logged, although losses, targets and checkpoint copies are fetched without waiting for the device."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fgtrac_core import Run, RunStore
from fgtrac_core.pipeline import Pipeline
from fgtrac_core.stages._records import load_training
from tests.conftest import run_cli

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_a_gpu_loop_is_recorded_as_logged(tmp_path: Path) -> None:
    torch.manual_seed(0)
    n = 64
    x, y = torch.randn(n, 6, device="cuda"), torch.randint(0, 3, (n,), device="cuda")
    run = Run.create(tmp_path / "r", name="gpu", config={})
    run.register_samples(np.arange(n), split="train", labels=y.cpu().numpy(), raw=x.cpu().numpy())
    run.register_samples([n], split="test", labels=[0], raw=[b"test"])
    model = _net().cuda()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    logged_targets, logged_losses, states = [], [], []
    with run.stage("s", optimizer=opt, model=model):
        for epoch in range(2):
            perm = torch.randperm(n, device="cuda")
            for start in range(0, n, 16):
                ids = perm[start : start + 16]
                target = (y[ids] + epoch) % 3  # relabelled in the second epoch
                opt.zero_grad()
                loss = F.cross_entropy(model(x[ids]), target)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
                opt.step()
                run.log_batch(ids.cpu(), loss=loss, targets=target)
                logged_targets.append(target.tolist())
                logged_losses.append(loss.item())
            run.checkpoint(model, opt)
            states.append({k: v.cpu().clone() for k, v in model.state_dict().items()})
            with torch.no_grad():  # the loop goes on changing the parameters the checkpoint copied
                for p in model.parameters():
                    p.add_(1.0)
    run.close()
    with RunStore(tmp_path / "r") as store:
        rows = store.df(
            "SELECT list(target ORDER BY position) AS t FROM batch_samples GROUP BY batch_id ORDER BY batch_id"
        )
        assert [list(t) for t in rows["t"]] == logged_targets
        assert store.df("SELECT loss FROM batches ORDER BY batch_id")["loss"].tolist() == pytest.approx(
            logged_losses, rel=1e-6
        )
        clips = store.df("SELECT clip FROM optimizer_steps ORDER BY step")["clip"].tolist()
        assert [c and json.loads(c) for c in clips] == [{"rule": "norm", "max_norm": 0.05, "norm_type": 2.0}] * 8
        (hparams,) = store.df("SELECT hparams FROM stages")["hparams"]
        assert json.loads(hparams)["device"].startswith("cuda:0 (")
        paths = store.df("SELECT path FROM checkpoints WHERE kind = 'periodic' ORDER BY checkpoint_id")["path"]
        for path, state in zip(paths, states, strict=True):
            saved = torch.load(tmp_path / "r" / path, weights_only=True)["model"]
            assert all(torch.equal(saved[k], state[k]) for k in state)
        pipeline = Pipeline(_net, lambda config, ids: torch.zeros(len(ids), 6), None, {})
        assert "trained on cuda:0" in load_training(store, pipeline).training.replay_refusal()
    assert run_cli("verify", str(tmp_path / "r")).returncode == 0


def _net() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))


def test_an_assumed_clipping_rule_is_checked_and_a_change_inferred_again() -> None:
    """On CUDA the previous steps' clipping rule is assumed and checked on the device (read without a sync once
    the device is done, at the flush at the latest): a step it does not reproduce is recorded as unknown, and the
    steps after the check was read are inferred again."""
    from fgtrac_core.tracking.optimizer_hooks import UNKNOWN_CLIP, StepBuffer, StepHooks

    torch.manual_seed(0)
    model = _net().cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    rows = StepBuffer()
    hooks = StepHooks(opt, lambda facts: rows.add(len(rows), 0, None, facts))
    x, y = torch.randn(16, 6, device="cuda"), torch.randint(0, 3, (16,), device="cuda")
    changes = [lambda ps: torch.nn.utils.clip_grad_norm_(ps, 0.05)] * 3
    changes += [lambda ps: torch.nn.utils.clip_grad_norm_(ps, 0.02)] * 2
    changes += [lambda ps: [p.grad.mul_(0.5) for p in ps]]
    for change in changes:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        change(list(model.parameters()))
        opt.step()
        torch.cuda.synchronize()  # each step's check is done before the next step: the order below is exact
    hooks.remove()
    table = rows.table().to_pydict()
    norm = {"rule": "norm", "norm_type": 2.0}
    expected = [{**norm, "max_norm": 0.05}] * 3 + [UNKNOWN_CLIP, {**norm, "max_norm": 0.02}, UNKNOWN_CLIP]
    assert [json.loads(c) for c in table["clip"]] == expected
    assert table["grads_altered"] == [False, False, False, True, False, True]


def test_dropout_seeds_redraw_the_masks_on_the_device() -> None:
    """The recorder reseeds the CUDA generator of a model on the GPU too: reseeding with a recorded seed redraws
    the mask that forward drew."""
    from fgtrac_core.tracking.forward_seeds import ForwardSeeds, reseed

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 32), nn.Dropout(0.5)).cuda()
    seeds = ForwardSeeds(model)
    x = torch.randn(8, 6, device="cuda")
    first, second = model(x), model(x)
    recorded = seeds.take()
    seeds.remove()
    assert len(recorded) == 2 and not torch.equal(first, second)
    for seed, out in zip(recorded, (first, second), strict=True):
        reseed(seed, [x.device])
        assert torch.equal(model(x), out)
