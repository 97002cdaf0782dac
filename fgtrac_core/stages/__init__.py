"""Stage accountability: which training stage is responsible for a behaviour (arXiv 2506.00175).

Public API:
  * `analyze(run_dir, method=..., compare=...)` -> `StageAnalysis` (effects, aggregates, faithfulness tables);
  * `CostEstimate` — the predicted seconds of an analysis's replay work (`analyze(on_estimate=...)` receives it);
  * `METHODS`, `DEFAULT_BUDGET_S`, `COMPARE_HORIZONS`, `DEFAULT_HORIZON`;
  * errors: `StageAnalysisError` and its subclasses `MissingBoundaryStateError`, `ReplayMismatchError`, and
    `BudgetExceededError` (`fgtrac_core.budget`, shared with `fgtrac influence --check`); all `FgtracError`s:
    one line, no traceback in the CLI.
Definitions, derivations and measured faithfulness: docs/stage_attribution.md.
"""

from fgtrac_core.budget import BudgetExceededError
from fgtrac_core.stages.analysis import (
    COMPARE_HORIZONS,
    DEFAULT_BUDGET_S,
    DEFAULT_HORIZON,
    METHODS,
    CostEstimate,
    StageAnalysis,
    analyze,
)
from fgtrac_core.stages.errors import (
    MissingBoundaryStateError,
    ReplayMismatchError,
    StageAnalysisError,
)

__all__ = [
    "COMPARE_HORIZONS",
    "DEFAULT_BUDGET_S",
    "DEFAULT_HORIZON",
    "METHODS",
    "BudgetExceededError",
    "CostEstimate",
    "MissingBoundaryStateError",
    "ReplayMismatchError",
    "StageAnalysis",
    "StageAnalysisError",
    "analyze",
]
