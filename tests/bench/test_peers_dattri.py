"""The dattri adapter of the faithfulness bench: its TracIn is fgtrac's TracInCP (same checkpoints, same learning
rates, same sign: positive = proponent), and its other methods keep that sign on a model where the answer is known.
Skipped when dattri (`pip install 'fgtrac[bench]'`) is not installed."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("dattri")

from bench import faithfulness, peers_dattri  # noqa: E402
from fgtrac_core.influence import tracin  # noqa: E402


def _tiny_run() -> tuple[torch.nn.Module, tuple, tuple, list]:
    """Logistic regression on 40 digits, 12 SGD steps with a decaying learning rate, a checkpoint every 3 steps
    (float64 state, as the bench saves it), and 15 test digits."""
    train, test = faithfulness._data()
    train, test = (train[0][:40], train[1][:40]), (test[0][:15], test[1][:15])
    torch.manual_seed(0)
    model = faithfulness.LogReg().double()
    checkpoints = []
    for step in range(1, 13):
        lr = 0.5 / step
        model.zero_grad()
        F.cross_entropy(model(train[0]), train[1]).backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= lr * p.grad
        if step % 3 == 0:
            checkpoints.append(({"model": {k: v.clone() for k, v in model.state_dict().items()}}, lr))
    return model, train, test, checkpoints


def test_dattri_tracin_equals_fgtrac_tracincp() -> None:
    model, train, test, checkpoints = _tiny_run()
    ours = tracin(
        copy.deepcopy(model).float(),
        "head",
        (train[0].float(), train[1]),
        (test[0].float(), test[1]),
        [({"model": {k: v.float() for k, v in c["model"].items()}}, lr) for c, lr in checkpoints],
        mode="last_layer",
        device="cpu",
    ).numpy()
    theirs, seconds = peers_dattri.scores(model, train, test, checkpoints)["dattri_tracin"]
    assert theirs.shape == ours.shape == (15, 40) and seconds > 0
    # float32 on both sides: equal to rounding, and in the same orientation and sign
    np.testing.assert_allclose(theirs, ours, rtol=1e-4, atol=1e-5 * np.abs(ours).max())


def test_every_dattri_method_says_a_sample_supports_its_own_copy() -> None:
    """A test example that is a copy of a training sample: under fgtrac's sign convention every method must rank
    that training sample among the strongest proponents of it (a sign flip would put it among the opponents)."""
    model, train, _, checkpoints = _tiny_run()
    test = (train[0][:10], train[1][:10])
    for key, (s, _) in peers_dattri.scores(model, train, test, checkpoints).items():
        own = s[np.arange(10), np.arange(10)]
        assert (own > 0).all(), key
        assert np.median((s > own[:, None]).sum(1)) <= 2, key  # the copy is (about) the top proponent
