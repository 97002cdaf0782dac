"""Cost estimates and budgets for replay work (`fgtrac stages`, `fgtrac influence --check`).

Both commands time a few of the recorded steps they are about to replay, scale by the number of steps planned,
report the estimate before any replay starts, and refuse (one line, exit 2 in the CLI) when it exceeds the
budget, unless forced.  Seconds are wall-clock seconds on this machine under its current load.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any

# no numpy, torch or duckdb here: the CLI's parser reads DEFAULT_BUDGET_S, and `check-proof` must stay light
from fgtrac_core.errors import FgtracError

DEFAULT_BUDGET_S = 600.0


class BudgetExceededError(FgtracError):
    """The estimated cost of the requested replay exceeds the budget (pass force=True / --force to run anyway)."""


@dataclass
class CostEstimate:
    """Predicted wall time of planned replay work: optimizer steps and Hessian-vector products."""

    steps: int
    hvps: int
    seconds_per_step: float
    seconds_per_hvp: float

    @property
    def seconds(self) -> float:
        return self.steps * self.seconds_per_step + self.hvps * self.seconds_per_hvp

    def line(self) -> str:
        return (
            f"estimated {self.seconds:.1f} s: {self.steps} replayed steps at {1000 * self.seconds_per_step:.1f} ms"
            + (
                f" + {self.hvps} Hessian-vector products at {1000 * self.seconds_per_hvp:.1f} ms"
                if self.hvps
                else ""
            )
        )


def enforce(estimate: CostEstimate, budget_s: float, force: bool, what: str) -> None:
    """Raise BudgetExceededError (naming `what` and the estimate) when the estimate exceeds `budget_s` seconds
    and the work is not forced."""
    if estimate.seconds > budget_s and not force:
        raise BudgetExceededError(
            f"{what} {estimate.line()}, over the budget of {budget_s:g} s; raise the budget or force it"
        )


def seconds_per_step(cursor: Any, warmup: int = 2, timed: int = 3) -> float:
    """Median seconds of `timed` steps of a replay cursor (`stages.replay.Cursor`), after `warmup` untimed ones:
    the first steps of a process are slow (allocation, thread start-up) and not representative.  Fewer warm-up
    steps when that leaves at least one to time; 0 when the cursor has no step left."""
    cursor.run(min(warmup, max(cursor.remaining - 1, 0)))
    times = []
    for _ in range(min(timed, cursor.remaining)):
        t0 = time.perf_counter()
        cursor.step()
        times.append(time.perf_counter() - t0)
    return float(statistics.median(times)) if times else 0.0
