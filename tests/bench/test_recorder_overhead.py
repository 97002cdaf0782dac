"""The recorder-overhead bench: the paired per-step hook measurement and its goal verdict."""

from __future__ import annotations

import math

from bench import recorder_overhead
from sample_runs import digits


def test_paired_step_overhead_times_every_step_of_both_arms() -> None:
    data = digits.load_data(0)
    res = recorder_overhead.paired_step_overhead(data, epochs=1)
    n_batches = math.ceil(len(data.subsets["pretrain"]) / digits.BATCH_SIZE)
    for name in ("sgd", "adamw"):
        fig = res[name]
        assert fig["steps"] == n_batches  # the warm-up epoch is not counted
        assert fig["plain_step_us"] > 0 and math.isfinite(fig["overhead_pct"])


def test_goal_verdict_follows_the_figures() -> None:
    def paired(*pcts: float) -> dict:
        return {f"opt{i}": {"overhead_pct": p, "median_diff_us": 1.0, "plain_step_us": 2000.0, "steps": 10}
                for i, p in enumerate(pcts)}  # fmt: skip

    goal = recorder_overhead.HOOKS_GOAL_PCT
    assert recorder_overhead.goal_met(paired(1.0, goal))
    assert not recorder_overhead.goal_met(paired(1.0, goal + 0.01))
    assert not recorder_overhead.goal_met({})
    text = recorder_overhead._paired_text(
        {"hooks_paired": paired(3.0), "hooks_goal_pct": goal, "hooks_goal_met": False}
    )
    assert text.startswith("opt0 +3.00%") and text.endswith("not met")
