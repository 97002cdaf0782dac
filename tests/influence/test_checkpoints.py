"""FG-Trac checkpoint selection."""

from __future__ import annotations

import pytest

from fgtrac_core.influence import select_checkpoints


def test_auto_chooses_substantial_improvements_and_the_final_checkpoint() -> None:
    losses = [None, 1.0, 0.5, 0.49, 0.3, 0.31, None]
    chosen = select_checkpoints(losses, tau=0.05)
    assert [c.index for c in chosen] == [1, 2, 4, 6]
    assert chosen[-1].reason == "final checkpoint"
    # 0.49 is only 2% below the best 0.5: not substantial
    assert 3 not in [c.index for c in select_checkpoints(losses, tau=0.05)]
    assert [c.index for c in select_checkpoints(losses, tau=0.0)] == [1, 2, 3, 4, 6]


def test_all_and_explicit() -> None:
    assert [c.index for c in select_checkpoints([1.0, 2.0], "all")] == [0, 1]
    assert [c.index for c in select_checkpoints([1.0, 2.0, 3.0], [2, 0])] == [0, 2]
    with pytest.raises(ValueError):
        select_checkpoints([1.0], [3])
    with pytest.raises(ValueError):
        select_checkpoints([1.0], "best")


def test_per_stage_restarts_the_best_loss() -> None:
    losses = [1.0, 0.2, 0.5, 0.4, 0.39, 0.1]
    stages = ["a", "a", "b", "b", "b", "c"]
    assert [c.index for c in select_checkpoints(losses)] == [0, 1, 5]  # stage b never beats stage a
    chosen = select_checkpoints(losses, stages=stages)
    assert [c.index for c in chosen] == [0, 1, 2, 3, 5]
    assert chosen[2].reason.startswith("first validation loss of its stage")
