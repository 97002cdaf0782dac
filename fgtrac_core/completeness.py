"""Whether a run finished training: analyses of a run with a failed, interrupted or unfinished stage are refused
unless asked for explicitly (`--allow-incomplete`), since they would describe a partly trained model; a stage that
trained at learning rate 0 throughout is named before an analysis runs."""

from __future__ import annotations

import sys
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


def warn_idle_stages(run_dir: str | Path) -> None:
    """One stderr line per stage that applied learning rate 0 at every step (`RunStore.idle_stages`): an analysis
    still runs, but that stage cannot have changed the model."""
    from fgtrac_core._text import echo
    from fgtrac_core.store.reader import IDLE_STAGE_HINT

    with RunStore(run_dir) as store:
        idle = store.idle_stages()
    for name, steps in idle:
        echo(
            f"fgtrac: warning: stage {name!r} applied lr 0 at all {steps} of its steps, so it did not change the "
            f"model ({IDLE_STAGE_HINT})",
            file=sys.stderr,
        )
