"""Training-data attribution: TracInCP (exact last-layer, projected full-model and AdamW-aware gradients),
AdamW-influence along the replayed trajectory, the last layer's influence function, and self-influence, with FG-Trac checkpoint selection.  Scores: positive = proponent (lowered the test loss)."""

from fgtrac_core.influence.adamw import momentum_factor
from fgtrac_core.influence.adamw_influence import adamw_influence, unrolled_influence
from fgtrac_core.influence.checkpoints import SelectedCheckpoint, select_checkpoints
from fgtrac_core.influence.gradients import head_factors
from fgtrac_core.influence.influence_function import influence_function, influence_function_review
from fgtrac_core.influence.tracin import (
    MODES,
    Review,
    TopK,
    load_state_dict,
    review,
    self_influence,
    tracin,
)
from fgtrac_core.influence.weighting import WEIGHTINGS, usage_weights

__all__ = [
    "MODES",
    "Review",
    "SelectedCheckpoint",
    "TopK",
    "WEIGHTINGS",
    "adamw_influence",
    "head_factors",
    "influence_function",
    "influence_function_review",
    "load_state_dict",
    "momentum_factor",
    "review",
    "select_checkpoints",
    "self_influence",
    "tracin",
    "unrolled_influence",
    "usage_weights",
]
