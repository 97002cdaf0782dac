"""The sidebar's line that tells analyses apart: their distinguishing parameters, a loop's own loss among them."""

from __future__ import annotations

from app import data


def test_params_line_names_a_loops_own_loss_only() -> None:
    assert data._params_line({"k": 20, "training_loss": "mean cross-entropy", "seed": 0}) == "k 20"
    line = data._params_line({"k": 20, "training_loss": "mypkg.train:smoothed", "check": {"lds": 0.31, "replays": 8}})
    assert line == "k 20, training_loss mypkg.train:smoothed, LDS 0.31 (8 replays)"
