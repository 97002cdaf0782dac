"""Training-data attribution: TracInCP (exact last-layer gradients) and self-influence, with FG-Trac checkpoint
selection.  Scores: positive = proponent (lowered the test loss), negative = opponent."""

from fgtrac_core.influence.checkpoints import SelectedCheckpoint, select_checkpoints
from fgtrac_core.influence.tracin import TopK, head_factors, load_state_dict, review, self_influence, tracin

__all__ = [
    "SelectedCheckpoint",
    "TopK",
    "head_factors",
    "load_state_dict",
    "review",
    "select_checkpoints",
    "self_influence",
    "tracin",
]
