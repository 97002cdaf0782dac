"""The in-memory description of a recorded training run that stage analysis replays and linearises.

A `Training` is what the recorder captured, in the shape the maths needs: for every stage its optimizer class,
the parameters and optimizer state at its boundaries (from the `stage_start` / `stage_end` checkpoints), and for
every optimizer step its learning rate and the ids of the samples in its batch; plus how to build the model, how
to turn sample ids into (inputs, targets), the training loss, and the test set.  It is built from a run directory
by `fgtrac_core.stages._records.load_training`, or directly (tests build toy trainings with other losses).

Optimizer-state convention at stage starts: a stage whose recorded start state is empty starts from a fresh
optimizer (what the sample pipeline does: one optimizer per stage); a stage whose recorded start state is not
empty must start from exactly the state the previous stage ended with (one optimizer carried across stages), and
then a replay carries its own replayed state into it.  `validate` refuses anything else, since neither rule would
reproduce it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fgtrac_core.stages.errors import MissingBoundaryStateError, StageAnalysisError
from fgtrac_core.tracking.optimizer_hooks import clipping, is_unknown, zeroed

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""(model outputs for a batch, targets) -> the scalar training loss of the batch."""

SUPPORTED_OPTIMIZERS = ("SGD", "Adam", "AdamW")

StateDict = dict[str, torch.Tensor]


def cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the batch: the training loss of the recorded pipelines."""
    return F.cross_entropy(outputs, targets)


@dataclass
class Stage:
    """One recorded stage: its optimizer, boundary states and per-step schedule.

    `lrs[i]` is the learning rate of the first param group applied at step `steps[i]`; `batches[i]` the sample
    ids of that step in batch order.  From a recorded run also, per step: `hparams[i]` every param group's
    hyperparameters as applied, `clips[i]` the gradient clipping rule (or None), `altered[i]` whether the loop
    changed the gradients otherwise, `fingerprints[i]` the parameter fingerprint after the step.  Without
    `hparams` (in-memory trainings) the other groups keep their recorded ratio to the first group's lr.
    """

    stage_id: int
    name: str
    optimizer: str
    start_model: StateDict
    start_optimizer: dict[str, Any]
    end_model: StateDict
    end_optimizer: dict[str, Any]
    steps: list[int]
    lrs: list[float]
    batches: list[np.ndarray]
    hparams: list[list[dict[str, Any]]] | None = None
    clips: list[dict[str, Any] | None] | None = None
    altered: list[bool] | None = None
    fingerprints: list[float | None] | None = None
    targets: list[list[int | None] | None] | None = None  # per step: the recorded target of each sample, if any
    device: str | None = None  # where the stage trained (`trained_on`); None in runs recorded before it was

    @property
    def n_steps(self) -> int:
        return len(self.steps)

    @property
    def fresh(self) -> bool:
        """True when the stage started from a fresh optimizer (empty recorded start state)."""
        return not self.start_optimizer.get("state")

    def group_hparams(self) -> list[dict[str, Any]]:
        """The recorded hyperparameters of each param group at the stage start (without the parameters)."""
        return [{k: v for k, v in g.items() if k != "params"} for g in self.start_optimizer["param_groups"]]

    def group_sizes(self) -> list[int]:
        return [len(g["params"]) for g in self.start_optimizer["param_groups"]]

    def step_groups(self, i: int) -> list[dict[str, Any]]:
        """Every param group's hyperparameters as applied at step index `i` (lists as tuples, e.g. betas)."""
        if self.hparams is not None:
            return [{k: tuple(v) if isinstance(v, list) else v for k, v in g.items()} for g in self.hparams[i]]
        base = self.group_hparams()
        lr = self.lrs[i]
        return [{**hp, "lr": lr if hp["lr"] == base[0]["lr"] else lr * hp["lr"] / base[0]["lr"]} for hp in base]

    def clip(self, i: int) -> dict[str, Any] | None:
        """The gradient clipping applied at step index `i` (None: the gradients as accumulated, or a modification
        the recorder could not identify, which `altered[i]` marks)."""
        return clipping(None if self.clips is None else self.clips[i])

    def zeros(self, i: int) -> list[int]:
        """Indices (into the optimizer's parameters) that step index `i` stepped on a zero gradient for, though its
        backward did not reach them (a loop's zero_grad(set_to_none=False))."""
        return zeroed(None if self.clips is None else self.clips[i])


@dataclass
class Training:
    """A recorded run as stage analysis sees it (see the module docstring)."""

    stages: list[Stage]
    model_factory: Callable[[], nn.Module]
    load_batch: Callable[[np.ndarray], tuple[torch.Tensor, torch.Tensor]]
    test_ids: np.ndarray
    loss_fn: LossFn = cross_entropy
    _batch_cache: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = field(
        default_factory=dict, repr=False
    )

    @functools.cached_property
    def param_names(self) -> list[str]:
        """The model's parameter names in model.parameters() order (the optimizer's order)."""
        return [name for name, _ in self.model_factory().named_parameters()]

    @property
    def n_stages(self) -> int:
        return len(self.stages)

    @property
    def final_model(self) -> StateDict:
        """theta_T: the parameters at the end of the last stage."""
        return self.stages[-1].end_model

    def batch(self, stage_index: int, step_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets) of one recorded step; cached, since every replay revisits the same steps."""
        key = (stage_index, step_index)
        if key not in self._batch_cache:
            stage = self.stages[stage_index]
            x, y = self.load_batch(stage.batches[step_index])
            used = stage.targets[step_index] if stage.targets is not None else None
            if used is not None:  # the targets the loop logged for this use (targets=), else the labels
                known = [v is not None for v in used]
                y = y.clone()
                y[torch.tensor(known)] = torch.tensor([v for v in used if v is not None], dtype=y.dtype)
            self._batch_cache[key] = (x, y)
        return self._batch_cache[key]

    def test_set(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets) of the test examples, in `test_ids` order."""
        return self.load_batch(self.test_ids)

    def steps_after(self, stage_index: int) -> int:
        """How many optimizer steps the stages after `stage_index` run."""
        return sum(s.n_steps for s in self.stages[stage_index + 1 :])

    def validate(self) -> None:
        """Refuse a training that replay cannot reproduce by construction (the replay check catches the rest)."""
        if not self.stages:
            raise StageAnalysisError("this run has no stages to analyse")
        n_params = len(self.param_names)
        for j, stage in enumerate(self.stages):
            if stage.optimizer not in SUPPORTED_OPTIMIZERS:
                raise StageAnalysisError(
                    f"stage {stage.name!r} uses {stage.optimizer}; stage analysis supports "
                    f"{', '.join(SUPPORTED_OPTIMIZERS)}"
                )
            if sum(stage.group_sizes()) != n_params:
                raise StageAnalysisError(
                    f"stage {stage.name!r}: its optimizer holds {sum(stage.group_sizes())} parameters, the model "
                    f"has {n_params}; the optimizer must be built over model.parameters() in order"
                )
            if len(stage.lrs) != stage.n_steps or len(stage.batches) != stage.n_steps:
                raise StageAnalysisError(f"stage {stage.name!r}: steps, learning rates and batches disagree")
            if j == 0:
                continue
            prev = self.stages[j - 1]
            if not _same_tensors(stage.start_model, prev.end_model):
                raise StageAnalysisError(
                    f"the parameters at the start of stage {stage.name!r} differ from those at the end of "
                    f"{prev.name!r}: the model was changed between stages, which replay cannot reproduce"
                )
            if not stage.fresh and (
                stage.optimizer != prev.optimizer
                or not _same_optimizer_state(stage.start_optimizer, prev.end_optimizer)
            ):
                raise MissingBoundaryStateError(
                    f"stage {stage.name!r} starts from optimizer state that is neither fresh nor the state "
                    f"{prev.name!r} ended with; start each stage with a new optimizer, or carry the same one"
                )


    def enabled_option(self, *flags: str) -> tuple[str, str] | None:
        """(stage name, flag) of the first of these boolean optimizer options (e.g. ``amsgrad``) that any param
        group applied at any step, or None."""
        for stage in self.stages:
            per_step = [g for i in range(stage.n_steps) for g in stage.step_groups(i)] if stage.hparams else []
            for hp in [*stage.group_hparams(), *per_step]:
                for flag in flags:
                    if hp.get(flag):
                        return stage.name, flag
        return None

    def linearisation_refusal(self) -> str | None:
        """Why the estimators (fast, propagated, partial-replay), which linearise SGD and Adam/AdamW steps as
        descent with Adam's plain second moment, cannot model this training, or None.  Exact replay steps torch's
        own optimizer and needs none of this."""
        found = self.enabled_option("amsgrad", "maximize")
        return None if found is None else f"stage {found[0]!r} uses {found[1]}=True, which the estimators do not model"

    def replay_refusal(self) -> str | None:
        """Why exact replay cannot reproduce this training although estimators can still linearise it (the loop
        altered gradients by hand at some step), or None.  Replay refuses with this reason; an estimator's results
        carry it as `verified: false`."""
        dropout = [
            f"{name} (p={m.p})" for name, m in self.model_factory().named_modules()
            if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0
        ]  # fmt: skip
        if dropout:
            return (
                f"the model draws random dropout masks in training ({', '.join(dropout)}), which the recorder "
                f"does not record, so replay cannot reproduce the recorded steps"
            )
        for stage in self.stages:
            if stage.device is not None and stage.device != "cpu":
                return (
                    f"stage {stage.name!r} trained on {stage.device}; exact replay runs on the CPU, whose kernels "
                    f"and summation order differ from that device's, so it cannot reproduce the recorded parameters "
                    f"bit for bit"
                )
        for stage in self.stages:
            altered = [i for i, a in enumerate(stage.altered or []) if a]
            if not altered:
                continue
            i = altered[0]
            where = f"at step {stage.steps[i]} (stage {stage.name!r})"
            clip = (stage.clips[i] if stage.clips is not None else None) or {}
            if is_unknown(clip) and clip.get("stale"):
                names = [self.param_names[k] for k in clip["stale"] if k < len(self.param_names)]
                return (
                    f"the optimizer stepped on gradients that no backward of the step produced {where} "
                    f"({', '.join(names)}), and not zeros: an optimizer.step() without a backward of its own steps "
                    f"on the previous step's gradients; replay computes every step's gradients from its batch, so "
                    f"it cannot reproduce that step (call zero_grad() and backward before every optimizer.step())"
                )
            if is_unknown(clip):
                return (
                    f"the training loop modified the gradients between backward and optimizer.step() {where} "
                    f"after earlier steps of the stage had left them as backward made them; the recorder keeps "
                    f"copies of the gradients only from a stage's first step and from a loop's first modification "
                    f"on, so what the loop did there is unknown and replay cannot reproduce that step (a loop that "
                    f"clips from the stage's first step on replays)"
                )
            return (
                f"the training loop altered the gradients between backward and optimizer.step() {where} other "
                f"than by torch.nn.utils.clip_grad_norm_ / clip_grad_value_, so replay cannot reproduce that step"
            )
        return None


def _same_tensors(a: StateDict, b: StateDict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _same_optimizer_state(a: dict[str, Any], b: dict[str, Any]) -> bool:
    sa, sb = a.get("state", {}), b.get("state", {})
    if sa.keys() != sb.keys():
        return False
    return all(
        sa[i].keys() == sb[i].keys()
        and all(torch.equal(torch.as_tensor(sa[i][k]), torch.as_tensor(sb[i][k])) for k in sa[i])
        for i in sa
    )
