"""`replay_match`: what counts as the same parameters, bit for bit or within a relative tolerance."""

from __future__ import annotations

import math

import pytest
import torch

from fgtrac_core.errors import FgtracError
from fgtrac_core.stages.replay_match import (
    ROUNDING_LEVEL,
    deviation_text,
    difference,
    fingerprint_gap,
    fingerprints_differ,
    require_tolerance,
)


def test_difference_is_none_only_for_bitwise_equal_states() -> None:
    a = {"w": torch.tensor([1.0, -4.0], dtype=torch.float64), "step": torch.tensor(3)}
    assert difference({k: v.clone() for k, v in a.items()}, a) is None
    near = {"w": torch.tensor([1.0, -4.0 + 2e-6], dtype=torch.float64), "step": torch.tensor(3)}
    d = difference(near, a)
    assert d is not None and math.isclose(d.absolute, 2e-6, rel_tol=1e-3)
    assert math.isclose(d.relative, 2e-6 / 4.0, rel_tol=1e-3)  # over the tensor's largest recorded magnitude
    assert d.within(1e-6) and not d.within(1e-7) and not d.within(0.0)  # 0: bit for bit, nothing is within
    assert "relative 5e-07, over the tolerance 1e-07" in d.text(1e-7) and d.text(0.0) == "max abs difference 2e-06"


@pytest.mark.parametrize(
    "replayed",
    [
        {"w": torch.tensor([1.0, -4.0]), "step": torch.tensor(4)},  # an integer that differs is never close
        {"w": torch.tensor([1.0, -4.0, 0.0]), "step": torch.tensor(3)},  # reshaped
        {"step": torch.tensor(3)},  # missing
        {"w": torch.tensor([1.0, -4.0]), "step": torch.tensor(3), "extra": torch.tensor(0.0)},  # one more
    ],
)
def test_a_count_shape_or_name_that_differs_is_infinitely_far(replayed: dict[str, torch.Tensor]) -> None:
    d = difference(replayed, {"w": torch.tensor([1.0, -4.0]), "step": torch.tensor(3)})
    assert d is not None and d.relative == math.inf and not d.within(0.5)


def test_a_zero_tensor_that_moved_is_infinitely_far_relatively() -> None:
    d = difference({"b": torch.tensor([1e-30])}, {"b": torch.tensor([0.0])})
    assert d is not None and d.relative == math.inf


def test_fingerprints_bit_for_bit_and_within_a_tolerance() -> None:
    assert not fingerprints_differ(1.25, 1.25 + 1e-13)  # float64 summation order of the fingerprint itself
    assert fingerprints_differ(1.25, 1.25 * (1 + 1e-10))
    assert not fingerprints_differ(1.25, 1.25 * (1 + 1e-10), 1e-6)
    assert fingerprints_differ(1.25, 1.25 * (1 + 1e-3), 1e-4)
    assert fingerprint_gap(2.0, 2.0 * (1 + ROUNDING_LEVEL / 2)) < ROUNDING_LEVEL


@pytest.mark.parametrize("bad", [-1e-9, 1.0, math.nan, math.inf, "0.1"])
def test_tolerance_outside_zero_to_one_is_refused(bad: object) -> None:
    with pytest.raises(FgtracError, match=r"tolerance must be a relative difference in \[0, 1\)"):
        require_tolerance(bad)  # type: ignore[arg-type]


def test_deviation_text() -> None:
    assert deviation_text(0.0, 0.0) == "replay reproduced the recorded parameters bit for bit"
    assert "within a relative difference of 1.7e-07 (--tolerance 0.0001): not bit for bit" in deviation_text(1e-4, 1.7e-7)
