"""Recorder overhead: the sample pipeline's training loop with the real recorder vs. a `NullRun`.

Both arms run the identical loop (same seed, same batches, same evaluation); the only difference is whether the
recorder calls record.  Arms are interleaved so machine noise hits both alike; the median of each is compared.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fgtrac_core.tracking import NullRun, Run
from fgtrac_core.tracking.optimizer_hooks import StepBuffer, StepFacts, StepHooks
from fgtrac_core.tracking.run import WRITERS
from sample_runs import digits

HOOKS_GOAL_PCT = 2.0  # issue 11: the per-step hooks cost at most 2% of the sample loop's time
LOOP_GOAL_PCT = 3.0  # issue 15: the recorded loop itself at most 3% slower
END_TO_END_GOAL_PCT = 10.0  # issue 15: loop + close() (everything committed, signed, published) at most 10% slower


class HooksOnlyRun(NullRun):
    """Records nothing but attaches the recorder's optimizer step hooks (hyperparameters, gradient identity and
    version check, copies while the loop modifies gradients, parameter fingerprint, the buffered row) to each
    stage: the per-step hook cost alone."""

    def __init__(self) -> None:
        self.rows = StepBuffer()
        self._groups: list[dict[str, Any]] | None = None

    def _on_step(self, facts: StepFacts) -> None:
        self.rows.add(len(self.rows), 0, self._groups, facts)
        self._groups = facts.groups

    @contextmanager
    def stage(self, *args: Any, optimizer: torch.optim.Optimizer, **kwargs: Any) -> Iterator[NullRun]:
        self._groups = None
        hooks = StepHooks(optimizer, self._on_step)
        try:
            yield self
        finally:
            hooks.remove()


def _crossover(
    arms: list[tuple[torch.nn.Module, torch.optim.Optimizer, Any]],
    loader: Any,
    epochs: int,
    hooks: bool,
) -> tuple[list[float], list[float], list[float], list[float]]:
    """Per counted step, the time of the arm carrying the hooks and of its twin (`hooks=False`: the same split with
    no hooks attached anywhere, an A/A run): (hooked, plain) of the steps after the first of each epoch, then
    (hooked, plain) of those first steps.  The hooks sit on one model for an epoch and on the other for the next,
    and within an epoch the arms alternate ABBA, so neither a model nor a position in the pair is favoured.  A
    first step after attaching pays the stage's one gradient copy (`StepHooks` copies until a step shows the loop
    leaves gradients alone): the recorder attaches once per stage, not once per epoch, so it is kept apart."""
    hooked, plain, first_hooked, first_plain = [], [], [], []
    for epoch in range(epochs + 1):  # the first epoch warms both arms up and is not counted
        h = epoch % 2
        sink = HooksOnlyRun()
        attached = StepHooks(arms[h][1], sink._on_step) if hooks else None
        try:
            for i, (_, x, y) in enumerate(loader):
                t = [0.0, 0.0]
                for arm in (0, 1) if i % 2 == 0 else (1, 0):
                    model, opt, sched = arms[arm]
                    t0 = time.perf_counter()
                    opt.zero_grad()
                    F.cross_entropy(model(x), y).backward()
                    opt.step()
                    t[arm] = time.perf_counter() - t0
                    if sched is not None:  # the loop's, not the hooks' time; the hooks then read a new lr
                        sched.step()
                if epoch:
                    (first_hooked if i == 0 else hooked).append(t[h])
                    (first_plain if i == 0 else plain).append(t[1 - h])
        finally:
            if attached is not None:
                attached.remove()
        sink.rows.table()  # the fingerprints' reduction, as at a flush (not timed)
    return hooked, plain, first_hooked, first_plain


def paired_step_overhead(data: digits.DigitsData, epochs: int = 30, attaches_per_step: float = 0.0) -> dict[str, Any]:
    """The hooks' cost per optimizer step, paired step by step: two identical models and optimizers (the sample
    loop's pretrain SGD with its per-step cosine schedule, and finetune AdamW) trained on the same batches with their steps alternating, each step
    timed, `StepHooks` on one of them (crossed over every epoch, see `_crossover`).

    A whole-run comparison of a ~0.7 s loop moves by several percent between repeats on a shared 2-core machine;
    pairing every ~2 ms step with its twin cancels everything slower than a step.  What is left is heavy-tailed:
    a step the scheduler preempts costs milliseconds, in either arm at random, so the plain mean of ~1,000
    differences wanders by +-15 us between runs minutes apart (its A/A mean too) while the hooks do the same work
    at every step.  The figure is therefore the `TRIM`-trimmed mean of the differences (both tails cut alike, so
    the A/A run's is ~0), with a bootstrap 95% interval; the plain mean and its interval are given beside it.
    The first step after attaching (once per epoch here, once per stage in the recorder) is measured apart: its
    trimmed mean difference counts `attaches_per_step` times per step (the recorded loop's stages over its steps).
    Figures per optimizer: `trimmed_diff_us` and `trimmed_ci_us` (steady steps plus the amortised first step),
    `steady_diff_us`, `attach_diff_us` and `attach_share_us`, `mean_diff_us` and `mean_ci_us`, `median_diff_us`,
    `overhead_pct` (the trimmed difference over the bare step's median time) and the A/A run's `aa_trimmed_us`
    and `aa_pct` (the measurement's own noise)."""
    loader = digits._loader(data, data.subsets["pretrain"], 0, digits.BATCH_SIZE)
    out: dict[str, Any] = {}
    for name, stage in (("sgd", "pretrain"), ("adamw", "finetune")):
        torch.manual_seed(0)
        models = [digits.DigitsCNN(), digits.DigitsCNN()]
        models[1].load_state_dict(models[0].state_dict())
        # the sample loop's own optimizers and schedules (pretrain's cosine changes the lr at every step, which the
        # step hook then reads and converts; both arms step at the same rates)
        arms = [(m, *digits._make_optimizer(stage, m, len(loader))) for m in models]
        aa = _differences_us(*_crossover(arms, loader, epochs, hooks=False)[:2])
        hooked, plain, first_hooked, first_plain = _crossover(arms, loader, epochs, hooks=True)
        diffs, attach = _differences_us(hooked, plain), _differences_us(first_hooked, first_plain)
        attach_us = float(_trimmed_mean(attach))
        share = attach_us * attaches_per_step
        steady, plain_us = float(_trimmed_mean(diffs)), 1e6 * statistics.median(plain)
        trimmed = steady + share
        out[name] = {
            "steps": len(diffs) + len(attach),
            "plain_step_us": plain_us,
            "trimmed_diff_us": trimmed,
            "trimmed_ci_us": [v + share for v in _bootstrap_ci(diffs, _trimmed_mean)],
            "steady_diff_us": steady,
            "attach_diff_us": attach_us,
            "attach_share_us": share,
            "mean_diff_us": float(diffs.mean()) + share,
            "mean_ci_us": [v + share for v in _bootstrap_ci(diffs, np.mean)],
            "median_diff_us": float(np.median(diffs)),
            "overhead_pct": 100.0 * trimmed / plain_us,
            "aa_trimmed_us": float(_trimmed_mean(aa)),
            "aa_pct": 100.0 * float(_trimmed_mean(aa)) / plain_us,
        }
    return out


TRIM = 0.05  # share of the paired differences cut from each tail before averaging


def _differences_us(hooked: list[float], plain: list[float]) -> np.ndarray:
    return 1e6 * (np.asarray(hooked) - np.asarray(plain))


def _trimmed_mean(values: np.ndarray, axis: int = -1) -> Any:
    """Mean of `values` along `axis` without the `TRIM` share of smallest and of largest ones."""
    ordered = np.sort(values, axis=axis)
    n = ordered.shape[axis]
    cut = int(n * TRIM)
    return np.take(ordered, np.arange(cut, n - cut), axis=axis).mean(axis=axis)


def _bootstrap_ci(values: np.ndarray, stat: Callable[..., Any], resamples: int = 1000) -> list[float]:
    """The 95% percentile-bootstrap interval of `stat(values)` (a fixed seed: the same data give the same
    interval)."""
    rng = np.random.default_rng(0)
    draws = stat(values[rng.integers(0, len(values), (resamples, len(values)))], axis=-1)
    return [float(v) for v in np.percentile(draws, [2.5, 97.5])]


def with_loop_share(paired: dict[str, dict[str, Any]], loop_step_us: float) -> dict[str, dict[str, Any]]:
    """`paired` with each optimizer's hook cost as a share of the whole sample loop's time per step (data loading,
    forward, backward, step, scheduler, evaluation: the goal's definition): `loop_pct` from the trimmed mean,
    `loop_pct_hi` from its interval's upper end."""
    return {
        name: {
            **v,
            "loop_pct": 100.0 * v["trimmed_diff_us"] / loop_step_us,
            "loop_pct_hi": 100.0 * v["trimmed_ci_us"][1] / loop_step_us,
        }
        for name, v in paired.items()
    }


def _timed_train(data: digits.DigitsData, run: Run | NullRun, device: str = "cpu") -> float:
    t0 = time.perf_counter()
    digits.train(data, run, seed=0, device=device)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


@dataclass
class _Recorded:
    """One recorded loop: ingest (until committed), the loop, `close()`, and the writer's CPU over loop and close."""

    ingest_s: float
    loop_s: float
    close_s: float
    writer_cpu_s: float


def _recorded_train(data: digits.DigitsData, run_dir: Path, writer: str, device: str) -> _Recorded:
    t0 = time.perf_counter()
    run = Run.create(run_dir, name="bench", writer=writer)
    digits.record_dataset(run, data)
    run.flush()  # the ingest's own background work (hashing, thumbnails, inserts, ledger) is the ingest's
    ingest = time.perf_counter() - t0
    cpu = run.background_cpu_s
    loop = _timed_train(data, run, device)
    t0 = time.perf_counter()
    run.close()
    return _Recorded(ingest, loop, time.perf_counter() - t0, run.background_cpu_s - cpu)


@contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n or before)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass
class _Setting:
    """Where the pairs' loops run: `key` names the pair of the thread writer in the results (with `_process`
    appended for the writer process; the first setting's thread pair sits at the top level)."""

    key: str
    threads: int | None = None  # torch's intra-op threads (None: as configured)
    device: str = "cpu"


def settings(cuda: bool) -> list[_Setting]:
    """Torch's own threads on the CPU, torch on one thread (a core left to the writer), and on a machine with a
    GPU the same loop on it (the case the writer process is for: a training thread that launches kernels and
    waits for nothing but the GIL)."""
    gpu = [_Setting("cuda", device="cuda")] if cuda else []
    return [_Setting(""), _Setting("one_thread", threads=1), *gpu]


def _pair_key(setting: _Setting, writer: str) -> str:
    """The results' key of a setting's pair with `writer`: "" for the first setting's writer thread (the top-level
    figures), else e.g. "process", "one_thread", "one_thread_process"."""
    return "_".join(k for k in (setting.key, "" if writer == "thread" else writer) if k)


def _repeat(
    data: digits.DigitsData, i: int, tmp: Path, setting: _Setting, between: Callable[[], None] | None = None
) -> tuple[float, dict[str, _Recorded]]:
    """One repeat of a setting: the plain loop and one recorded loop with each writer, back to back.  The arm that
    runs first alternates (and the order of the two writers), so a machine speeding up or slowing down favours
    neither; `between` runs after the first arm."""
    first = i % 2 == 0
    writers = WRITERS if first else WRITERS[::-1]
    with _torch_threads(setting.threads):
        plain = _timed_train(data, NullRun(), setting.device) if first else 0.0
        if between is not None:
            between()
        recorded = {
            w: _recorded_train(data, tmp / f"{setting.key}-{w}{i}", w, setting.device) for w in writers
        }
        if not first:
            plain = _timed_train(data, NullRun(), setting.device)
    return plain, recorded


def measure(repeats: int = 5, cuda: bool | None = None) -> dict[str, Any]:
    """Training wall time with and without recording and the overhead in percent, paired repeat by repeat (see
    `_pair_summary`), with the writer thread and with the writer process, in each of `settings` (the CUDA one when
    `cuda`, by default when a GPU is present); the writer's CPU time; and the optimizer step hooks alone."""
    digits.configure_determinism()
    data = digits.load_data(0)
    chosen = settings(torch.cuda.is_available() if cuda is None else cuda)
    plain: dict[str, list[float]] = {s.key: [] for s in chosen}
    recorded: dict[str, dict[str, list[_Recorded]]] = {s.key: {w: [] for w in WRITERS} for s in chosen}
    hooked: list[float] = []
    steps = 0

    def hooks_only() -> None:
        nonlocal steps
        hooks = HooksOnlyRun()
        hooked.append(_timed_train(data, hooks))
        hooks.rows.table()  # the fingerprints' reduction happens at flush time in the recorder
        steps = len(hooks.rows)

    with tempfile.TemporaryDirectory() as tmp:
        for device in dict.fromkeys(s.device for s in chosen):  # warm-up: first-call allocations, kernel selection
            _timed_train(data, NullRun(), device)
        for i in range(repeats):
            for s in chosen:
                p, rec = _repeat(data, i, Path(tmp), s, hooks_only if s is chosen[0] else None)
                plain[s.key].append(p)
                for w, r in rec.items():
                    recorded[s.key][w].append(r)
    pairs = {_pair_key(s, w): _pair_summary(plain[s.key], recorded[s.key][w]) for s in chosen for w in WRITERS}
    main, base = pairs.pop(""), plain[chosen[0].key]
    p = main["train_plain_s"]
    # each repeat runs the arms back to back, so a per-repeat ratio cancels slow drifts of the machine; their
    # spread says how far one median can be trusted on a shared 2-core box
    hooks_paired = sorted(100.0 * (b - a) / a for a, b in zip(base, hooked, strict=True))
    h = statistics.median(hooked)
    # the recorder attaches the hooks once per stage of the sample loop
    per_step = len(digits.STAGES) / steps
    paired = with_loop_share(
        paired_step_overhead(data, epochs=2 if repeats < 5 else 120, attaches_per_step=per_step), 1e6 * p / steps
    )
    return {
        "hooks_paired": paired,
        "hooks_goal_pct": HOOKS_GOAL_PCT,
        "hooks_goal_met": goal_met(paired),
        "repeats": repeats,
        **main,
        "train_hooks_s": h,
        "hooks_overhead_pct": 100.0 * (h - p) / p,
        "hooks_overhead_paired_pct": hooks_paired,
        "close_s": statistics.median(x.close_s for x in recorded[""]["thread"]),
        "ingest_s": statistics.median(x.ingest_s for x in recorded[""]["thread"]),
        "steps": steps,
        **pairs,
    }


def _pair_summary(plain: list[float], recorded: list[_Recorded]) -> dict[str, Any]:
    """A plain / recorded pair of arms, run back to back in each repeat: the median seconds of each, and the
    overheads (the loop; loop + `close()`) of each repeat against its own plain run, in percent of it, with their
    median and the 95% bootstrap interval of that median (the goals are met when its upper end is within them:
    the whole loop moves by several percent between repeats on this machine, more than the figures measured).
    The writer's CPU time is a median, and in percent of the median plain loop; each goal, met or not."""
    base = np.asarray(plain)
    loop = 100.0 * (np.array([x.loop_s for x in recorded]) / base - 1.0)
    e2e = 100.0 * (np.array([x.loop_s + x.close_s for x in recorded]) / base - 1.0)
    p, cpu = statistics.median(plain), statistics.median(x.writer_cpu_s for x in recorded)
    loop_ci, e2e_ci = _bootstrap_ci(loop, np.median), _bootstrap_ci(e2e, np.median)
    return {
        "train_plain_s": p,
        "train_recorded_s": statistics.median(x.loop_s for x in recorded),
        "overhead_pct": float(np.median(loop)),
        "overhead_ci_pct": loop_ci,
        "overhead_each_pct": sorted(loop.tolist()),
        "end_to_end_s": statistics.median(x.loop_s + x.close_s for x in recorded),
        "end_to_end_overhead_pct": float(np.median(e2e)),
        "end_to_end_ci_pct": e2e_ci,
        "end_to_end_each_pct": sorted(e2e.tolist()),
        "writer_cpu_s": cpu,
        "writer_cpu_pct": 100.0 * cpu / p,
        "close_s": statistics.median(x.close_s for x in recorded),
        "loop_goal_pct": LOOP_GOAL_PCT,
        "loop_goal_met": loop_ci[1] <= LOOP_GOAL_PCT,
        "end_to_end_goal_pct": END_TO_END_GOAL_PCT,
        "end_to_end_goal_met": e2e_ci[1] <= END_TO_END_GOAL_PCT,
    }


def goal_met(paired: dict[str, dict[str, Any]]) -> bool:
    """The hooks' goal holds when, for every optimizer, the upper end of the paired per-step cost's 95% interval is
    at most `HOOKS_GOAL_PCT` of the sample loop's time per step (`loop_pct_hi`)."""
    return bool(paired) and all(v["loop_pct_hi"] <= HOOKS_GOAL_PCT for v in paired.values())


def paired_summary(res: dict[str, Any]) -> str:
    """The paired per-step hook overheads, one phrase per optimizer ("n/a" for results without them)."""
    paired = res.get("hooks_paired")
    if not paired:
        return "n/a"
    return ", ".join(
        f"{name} {v['trimmed_diff_us']:+.0f} us a step (95% interval {_interval(v['trimmed_ci_us'])}) = "
        f"{v['loop_pct']:+.2f}% of the sample loop's time (at most {v['loop_pct_hi']:+.2f}%; "
        f"{v['overhead_pct']:+.2f}% of the bare {v['plain_step_us']:.0f} us step; plain mean "
        f"{v['mean_diff_us']:+.0f} us ({_interval(v['mean_ci_us'])}), median {v['median_diff_us']:+.0f} us; "
        f"{v['steps']} step pairs; A/A run without hooks {v['aa_trimmed_us']:+.0f} us"
        + (
            f"; of it the first step of each stage, {v['attach_diff_us']:+.0f} us, {v['attach_share_us']:+.1f} us a "
            f"step" if "attach_share_us" in v else ""
        )
        + ")"
        for name, v in paired.items()
    )


def _interval(bounds: list[float]) -> str:
    return f"{bounds[0]:+.0f} to {bounds[1]:+.0f} us"


def _paired_text(res: dict[str, Any]) -> str:
    if not res.get("hooks_paired"):
        return "n/a"
    verdict = "met" if res["hooks_goal_met"] else "not met"
    return f"{paired_summary(res)}; goal <= {res['hooks_goal_pct']:.0f}%: {verdict}"


def _span(values: list[float]) -> str:
    """'a% to b%' of sorted percentages."""
    return f"{values[0]:+.1f}% to {values[-1]:+.1f}%" if values else "n/a"


_CI_KEY = {"loop": "overhead_ci_pct", "end_to_end": "end_to_end_ci_pct"}


def goal_text(res: dict[str, Any], name: str) -> str:
    """'95% interval a% to b%; goal <= x%: met' for the `loop` or `end_to_end` goal (the interval of the median
    paired overhead, left out for results measured before it was)."""
    ci = res.get(_CI_KEY[name])
    parts = [f"95% interval {ci[0]:+.1f}% to {ci[1]:+.1f}%"] if ci else []
    if name + "_goal_pct" in res:  # (pairs stored before each had its goals: the interval alone)
        parts.append(f"goal <= {res[name + '_goal_pct']:.0f}%: {'met' if res[name + '_goal_met'] else 'not met'}")
    return "; ".join(parts) or "interval n/a"


def report(res: dict[str, Any]) -> str:
    return (
        f"recorder overhead: training loop {res['train_plain_s']:.3f} s plain vs {res['train_recorded_s']:.3f} s "
        f"recorded (medians of {res['repeats']}) -> {res['overhead_pct']:+.1f}% (the median of the repeats' paired "
        f"overheads, per repeat {_span(res.get('overhead_each_pct', []))}; {goal_text(res, 'loop')}); "
        f"optimizer step hooks alone "
        f"{res['train_hooks_s']:.3f} s -> {res['hooks_overhead_pct']:+.1f}% (per repeat "
        f"{_span(res.get('hooks_overhead_paired_pct', []))}; paired step by step: {_paired_text(res)}); "
        f"until everything is durable "
        f"(loop + close, which drains the background writer) {res['end_to_end_s']:.3f} s -> "
        f"{res['end_to_end_overhead_pct']:+.1f}% (per repeat {_span(res.get('end_to_end_each_pct', []))}; "
        f"{goal_text(res, 'end_to_end')}); "
        f"ingest of 1,797 samples (hash, thumbnails, insert, committed) "
        f"{res['ingest_s']:.3f} s; {_writer_text(res)}"
    )


def _writer_text(res: dict[str, Any]) -> str:
    """The writer's CPU and the other pairs (the writer process; torch on one thread), as a phrase ("n/a" for
    results without them)."""
    if "writer_cpu_s" not in res:
        return "writer CPU n/a"
    text = (
        f"the writer thread's CPU over loop and close {1000 * res['writer_cpu_s']:.0f} ms "
        f"({res['writer_cpu_pct']:.1f}% of the plain loop)"
    )
    for key, what in OTHER_PAIRS.items():
        if key in res:
            text += f"; {what}: {pair_text(res[key])}"
    return text


OTHER_PAIRS = {
    "process": "the writer in its own process",
    "one_thread": "torch on one thread (a core left to the writer)",
    "one_thread_process": "torch on one thread, the writer in its own process",
    "cuda": "the loop on the GPU, the writer thread",
    "cuda_process": "the loop on the GPU, the writer in its own process",
}
# measured only on a machine with a GPU
GPU_PAIRS = tuple(_pair_key(s, w) for s in settings(cuda=True) if s.device == "cuda" for w in WRITERS)


def pair_text(pair: dict[str, Any]) -> str:
    """'loop a% (interval; goal), end to end b% (interval; goal), writer CPU c ms' of one pair."""
    return (
        f"plain {pair['train_plain_s']:.3f} s, loop {pair['overhead_pct']:+.1f}% ({goal_text(pair, 'loop')}), "
        f"end to end {pair['end_to_end_overhead_pct']:+.1f}% ({goal_text(pair, 'end_to_end')}), writer CPU "
        f"{1000 * pair['writer_cpu_s']:.0f} ms"
    )


if __name__ == "__main__":
    print(report(measure()))
