"""Whether a run finished training: analyses of a run with a failed, interrupted or unfinished stage are refused
unless asked for explicitly (`--allow-incomplete`), since they would describe a partly trained model."""

from __future__ import annotations

from pathlib import Path

from fgtrac_core.errors import FgtracError
from fgtrac_core.store.reader import RunStore

_WHY = {
    "failed": "an exception ended it",
    "interrupted": "the recorder died while it ran",
    "running": "it has not ended",
}


class IncompleteRunError(FgtracError):
    """The run has a stage that did not finish."""


def require_complete(run_dir: str | Path, command: str) -> None:
    """Raise IncompleteRunError (one line) naming the first unfinished stage of the run, if any."""
    with RunStore(run_dir) as store:
        stages = store.incomplete_stages()
    if stages:
        name, status = stages[0]
        more = f" (and {len(stages) - 1} more)" if len(stages) > 1 else ""
        raise IncompleteRunError(
            f"stage {name!r} is {status} ({_WHY.get(status, 'not done')}){more}: the run is incomplete, so "
            f"`{command}` would analyse a partly trained model; pass --allow-incomplete to run it anyway"
        )
