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
        assert fig["plain_step_us"] > 0 and math.isfinite(fig["overhead_pct"]) and math.isfinite(fig["aa_pct"])


def test_goal_verdict_follows_the_figures() -> None:
    def paired(*pcts: float) -> dict:
        figures = {"overhead_pct": 9.0, "median_diff_us": 1.0, "plain_step_us": 2000.0, "steps": 10, "aa_pct": 0.0}
        return {f"opt{i}": {**figures, "mean_diff_us": p * 25.0, "loop_pct": p} for i, p in enumerate(pcts)}

    goal = recorder_overhead.HOOKS_GOAL_PCT
    assert recorder_overhead.goal_met(paired(1.0, goal))
    assert not recorder_overhead.goal_met(paired(1.0, goal + 0.01))
    assert not recorder_overhead.goal_met({})
    text = recorder_overhead._paired_text(
        {"hooks_paired": paired(3.0), "hooks_goal_pct": goal, "hooks_goal_met": False}
    )
    assert text.startswith("opt0 +75 us a step = +3.00% of the sample loop's time") and text.endswith("not met")
    # the share of the loop is the paired mean difference over the loop's time per step
    assert recorder_overhead.with_loop_share(paired(1.0), 2500.0)["opt0"]["loop_pct"] == 1.0


def test_loop_and_end_to_end_goals_are_reported() -> None:
    res = {"loop_goal_pct": 3.0, "loop_goal_met": True, "end_to_end_goal_pct": 10.0, "end_to_end_goal_met": False}
    assert recorder_overhead._goal(res, "loop") == "goal <= 3%: met"
    assert recorder_overhead._goal(res, "end_to_end") == "goal <= 10%: not met"
