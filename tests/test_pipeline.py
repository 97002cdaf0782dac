"""Fitting recorded states into the pipeline's model: wrapper prefixes of older runs, one-line errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fgtrac_core.checkpoint_files import unwrapped_state
from fgtrac_core.errors import FgtracError
from fgtrac_core.pipeline import load_into


def test_wrapper_prefixes_are_removed_only_when_every_key_has_one() -> None:
    plain = nn.Sequential(nn.Linear(2, 3)).state_dict()
    compiled_dp = {f"module._orig_mod.{k}": v for k, v in plain.items()}
    assert list(unwrapped_state(compiled_dp)) == list(plain)
    mixed = {"module.a": torch.zeros(1), "b": torch.zeros(1)}
    assert unwrapped_state(mixed) is mixed and unwrapped_state({}) == {}


def test_a_state_that_does_not_fit_is_one_line() -> None:
    with pytest.raises(FgtracError) as err:
        load_into(nn.Linear(2, 3), {"weight": torch.zeros(3, 3), "extra": torch.zeros(1)}, "checkpoint 4")
    assert str(err.value) == (
        "checkpoint 4 does not fit the pipeline's model Linear: missing bias; unexpected extra; shape differs for "
        "weight (is --model the class the run trained, built the same way?)"
    )
