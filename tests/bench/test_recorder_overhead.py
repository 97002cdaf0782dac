"""The recorder-overhead bench: the paired per-step hook measurement and its goal verdict, the writer's CPU and the
one-thread pair."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats

from bench import recorder_overhead
from sample_runs import digits


def test_paired_step_overhead_times_every_step_of_both_arms() -> None:
    data = digits.load_data(0)
    res = recorder_overhead.paired_step_overhead(data, epochs=2, attaches_per_step=0.25)
    n_batches = math.ceil(len(data.subsets["pretrain"]) / digits.BATCH_SIZE)
    for name in ("sgd", "adamw"):
        fig = res[name]
        assert fig["steps"] == 2 * n_batches  # the warm-up epoch is not counted
        # the first step after each attach (one per epoch here) counts a quarter of a step's time per step
        assert fig["attach_share_us"] == 0.25 * fig["attach_diff_us"]
        assert math.isclose(fig["trimmed_diff_us"], fig["steady_diff_us"] + fig["attach_share_us"])
        assert fig["plain_step_us"] > 0 and math.isfinite(fig["overhead_pct"]) and math.isfinite(fig["aa_pct"])
        lo, hi = fig["trimmed_ci_us"]
        assert lo <= fig["trimmed_diff_us"] <= hi
        lo, hi = fig["mean_ci_us"]
        assert lo <= fig["mean_diff_us"] <= hi


def test_trimmed_mean_equals_scipy_and_ignores_a_preempted_step() -> None:
    rng = np.random.default_rng(1)
    diffs = rng.normal(25.0, 5.0, 1000)
    assert math.isclose(
        recorder_overhead._trimmed_mean(diffs), scipy.stats.trim_mean(diffs, recorder_overhead.TRIM), rel_tol=1e-12
    )
    preempted = diffs.copy()
    preempted[3] = 5000.0  # one step the scheduler took the core from: milliseconds, in one arm
    assert preempted.mean() - diffs.mean() > 4.0
    assert abs(recorder_overhead._trimmed_mean(preempted) - recorder_overhead._trimmed_mean(diffs)) < 0.1
    lo, hi = recorder_overhead._bootstrap_ci(diffs, recorder_overhead._trimmed_mean)
    assert lo < 25.0 < hi and hi - lo < 2.0  # 1,000 differences of sd 5: an interval of about +-0.35
    assert recorder_overhead._bootstrap_ci(diffs, np.mean) == recorder_overhead._bootstrap_ci(diffs, np.mean)


def test_goal_verdict_follows_the_figures() -> None:
    def paired(*highs: float) -> dict:
        figures = {
            "overhead_pct": 9.0, "median_diff_us": 1.0, "plain_step_us": 2000.0, "steps": 10, "aa_trimmed_us": 0.0,
            "mean_diff_us": 30.0, "mean_ci_us": [10.0, 50.0], "trimmed_diff_us": 25.0,
        }  # fmt: skip
        return {
            f"opt{i}": {**figures, "trimmed_ci_us": [20.0, hi * 25.0], "loop_pct": 1.0, "loop_pct_hi": hi}
            for i, hi in enumerate(highs)
        }

    goal = recorder_overhead.HOOKS_GOAL_PCT
    assert recorder_overhead.goal_met(paired(1.0, goal))
    assert not recorder_overhead.goal_met(paired(1.0, goal + 0.01))  # the interval's upper end decides
    assert not recorder_overhead.goal_met({})
    text = recorder_overhead._paired_text(
        {"hooks_paired": paired(3.0), "hooks_goal_pct": goal, "hooks_goal_met": False}
    )
    assert text.startswith(
        "opt0 +25 us a step (95% interval +20 to +75 us) = +1.00% of the sample loop's time (at most +3.00%"
    )
    assert "plain mean +30 us (+10 to +50 us)" in text and text.endswith("not met")
    # the share of the loop is the paired trimmed difference (and its interval's upper end) over the loop's step
    shares = recorder_overhead.with_loop_share(paired(2.0), 2500.0)["opt0"]
    assert shares["loop_pct"] == 1.0 and shares["loop_pct_hi"] == 2.0


def test_loop_and_end_to_end_goals_are_reported() -> None:
    res = {"loop_goal_pct": 3.0, "loop_goal_met": True, "end_to_end_goal_pct": 10.0, "end_to_end_goal_met": False}
    assert recorder_overhead.goal_text(res, "loop") == "goal <= 3%: met"  # results stored before the interval was
    assert recorder_overhead.goal_text(res, "end_to_end") == "goal <= 10%: not met"
    res["end_to_end_ci_pct"] = [4.0, 12.5]
    assert recorder_overhead.goal_text(res, "end_to_end") == "95% interval +4.0% to +12.5%; goal <= 10%: not met"
    # a pair stored before each pair had its goals
    assert recorder_overhead.goal_text({"overhead_ci_pct": [1.0, 2.0]}, "loop") == "95% interval +1.0% to +2.0%"


def test_a_pair_of_arms_is_judged_by_its_repeats_paired_overheads() -> None:
    """Each repeat's recorded loop against the plain loop run beside it: a machine twice as slow in one repeat
    moves both arms, not the overhead (the medians of each arm apart would say -10% here)."""
    rec = recorder_overhead._Recorded
    one = recorder_overhead._pair_summary(
        [1.0, 2.0, 1.2], [rec(0.1, 1.1, 0.2, 0.3), rec(0.1, 2.2, 0.4, 0.5), rec(0.1, 1.08, 0.12, 0.4)]
    )
    assert one["train_plain_s"] == 1.2 and one["train_recorded_s"] == 1.1
    assert one["overhead_each_pct"] == pytest.approx([-10.0, 10.0, 10.0])
    assert one["overhead_pct"] == pytest.approx(10.0)
    assert one["end_to_end_each_pct"] == pytest.approx([0.0, 30.0, 30.0])
    assert one["end_to_end_overhead_pct"] == pytest.approx(30.0) and one["end_to_end_s"] == pytest.approx(1.3)
    low, high = one["end_to_end_ci_pct"]  # the bootstrap interval of the median lies within the repeats' range
    assert 0.0 <= low <= 30.0 and high == pytest.approx(30.0)
    assert one["writer_cpu_s"] == 0.4 and one["writer_cpu_pct"] == pytest.approx(100 * 0.4 / 1.2)
    # each pair has its goals: the loop's interval reaches +10% > 3%, the end to end one +30% > 10%
    assert not one["loop_goal_met"] and not one["end_to_end_goal_met"]
    fast = recorder_overhead._pair_summary([1.0, 1.0], [rec(0.1, 1.01, 0.02, 0.1), rec(0.1, 1.02, 0.03, 0.1)])
    assert fast["loop_goal_met"] and fast["end_to_end_goal_met"]
    text = recorder_overhead._writer_text(
        {"writer_cpu_s": 0.2, "writer_cpu_pct": 20.0, "one_thread": one, "process": fast}
    )
    assert text.startswith("the writer thread's CPU over loop and close 200 ms (20.0% of the plain loop)")
    assert "; the writer in its own process: plain 1.000 s, loop +1.5% (95% interval" in text
    assert "goal <= 3%: met), end to end +4.0% (" in text
    assert "torch on one thread (a core left to the writer): plain 1.200 s, loop +10.0%" in text
    assert "end to end +30.0% (95% interval" in text and "writer CPU 400 ms" in text
    assert recorder_overhead._writer_text({}) == "writer CPU n/a"  # results measured before the figure existed


def test_each_setting_pairs_the_plain_loop_with_both_writers() -> None:
    cpu_only = recorder_overhead.settings(cuda=False)
    assert [(s.key, s.threads, s.device) for s in cpu_only] == [("", None, "cpu"), ("one_thread", 1, "cpu")]
    with_gpu = recorder_overhead.settings(cuda=True)
    assert with_gpu[:2] == cpu_only and (with_gpu[2].key, with_gpu[2].device) == ("cuda", "cuda")
    keys = [recorder_overhead._pair_key(s, w) for s in with_gpu for w in recorder_overhead.WRITERS]
    # the first setting's writer thread is the section's top-level figures; every other pair is reported by name
    assert keys[0] == "" and keys[1:] == list(recorder_overhead.OTHER_PAIRS)
    assert set(recorder_overhead.GPU_PAIRS) <= set(recorder_overhead.OTHER_PAIRS)
