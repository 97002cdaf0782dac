"""Recorder overhead: the sample pipeline's training loop with the real recorder vs. a `NullRun`.

Both arms run the identical loop (same seed, same batches, same evaluation); the only difference is whether the
recorder calls record.  Arms are interleaved so machine noise hits both alike; the median of each is compared.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from fgtrac_core.tracking import NullRun, Run
from fgtrac_core.tracking.optimizer_hooks import StepBuffer, StepFacts, StepHooks, hparams_delta
from sample_runs import digits


class HooksOnlyRun(NullRun):
    """Records nothing but attaches the recorder's optimizer step hooks (hyperparameters, gradient copies and
    comparison, parameter fingerprint, the buffered row) to each stage: the per-step hook cost alone."""

    def __init__(self) -> None:
        self.rows = StepBuffer()
        self._groups: list[dict[str, Any]] | None = None

    def _on_step(self, facts: StepFacts) -> None:
        self.rows.add(len(self.rows), 0, hparams_delta(self._groups, facts.groups), facts)
        self._groups = facts.groups

    @contextmanager
    def stage(self, *args: Any, optimizer: torch.optim.Optimizer, **kwargs: Any) -> Iterator[NullRun]:
        self._groups = None
        hooks = StepHooks(optimizer, self._on_step)
        try:
            yield self
        finally:
            hooks.remove()


def _timed_train(data: digits.DigitsData, run: Run | NullRun) -> float:
    t0 = time.perf_counter()
    digits.train(data, run, seed=0)
    return time.perf_counter() - t0


def measure(repeats: int = 5) -> dict[str, Any]:
    """Median training wall time with and without recording, and the overhead in percent."""
    digits.configure_determinism()
    data = digits.load_data(0)
    plain: list[float] = []
    hooked: list[float] = []
    recorded: list[float] = []
    ingest: list[float] = []
    close: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        _timed_train(data, NullRun())  # warm-up: first-call allocations and kernel selection
        for i in range(repeats):
            plain.append(_timed_train(data, NullRun()))
            hooks = HooksOnlyRun()
            hooked.append(_timed_train(data, hooks))
            hooks.rows.table()  # the fingerprints' host sync happens at flush time in the recorder
            t0 = time.perf_counter()
            run = Run.create(Path(tmp) / f"run{i}", name="bench")
            digits.record_dataset(run, data)
            ingest.append(time.perf_counter() - t0)
            recorded.append(_timed_train(data, run))
            t0 = time.perf_counter()
            run.close()
            close.append(time.perf_counter() - t0)
    p, r, h = statistics.median(plain), statistics.median(recorded), statistics.median(hooked)
    # each repeat runs the arms back to back, so a per-repeat ratio cancels slow drifts of the machine; their
    # spread says how far one median can be trusted on a shared 2-core box
    hooks_paired = sorted(100.0 * (b - a) / a for a, b in zip(plain, hooked, strict=True))
    end_to_end = statistics.median([a + b for a, b in zip(recorded, close, strict=True)])
    return {
        "repeats": repeats,
        "train_plain_s": p,
        "train_recorded_s": r,
        "overhead_pct": 100.0 * (r - p) / p,
        "train_hooks_s": h,
        "hooks_overhead_pct": 100.0 * (h - p) / p,
        "hooks_overhead_paired_pct": hooks_paired,
        "close_s": statistics.median(close),
        "end_to_end_s": end_to_end,
        "end_to_end_overhead_pct": 100.0 * (end_to_end - p) / p,
        "ingest_s": statistics.median(ingest),
        "steps": 330,
    }


def _span(values: list[float]) -> str:
    return f"{values[0]:+.1f}% to {values[-1]:+.1f}%" if values else "n/a"


def report(res: dict[str, Any]) -> str:
    return (
        f"recorder overhead: training loop {res['train_plain_s']:.3f} s plain vs {res['train_recorded_s']:.3f} s "
        f"recorded (median of {res['repeats']}) -> {res['overhead_pct']:+.1f}%; optimizer step hooks alone "
        f"{res['train_hooks_s']:.3f} s -> {res['hooks_overhead_pct']:+.1f}% (per repeat "
        f"{_span(res.get('hooks_overhead_paired_pct', []))}); until everything is durable "
        f"(loop + close, which drains the background writer) {res['end_to_end_s']:.3f} s -> "
        f"{res['end_to_end_overhead_pct']:+.1f}%; ingest of 1,797 samples (hash, thumbnails, insert) "
        f"{res['ingest_s']:.3f} s"
    )


if __name__ == "__main__":
    print(report(measure()))
