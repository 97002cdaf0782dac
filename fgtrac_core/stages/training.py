"""The in-memory description of a recorded training run that stage analysis replays and linearises.

A `Training` is what the recorder captured, in the shape the maths needs: for every stage its optimizer class,
the parameters and optimizer state at its boundaries (from the `stage_start` / `stage_end` checkpoints), and for
every optimizer step its learning rate and the ids of the samples in its batch; plus how to build the model, how
to turn sample ids into (inputs, targets), the training loss, and the test set.  It is built from a run directory
by `fgtrac_core.stages._records.load_training`, or directly (tests build toy trainings with other losses).

Optimizer-state convention at stage starts: a stage whose recorded start state is empty, or has taken no step
(Adagrad fills its state when it is built), starts from a fresh optimizer (what the sample pipeline does: one
optimizer per stage); a stage whose recorded start state has taken steps must start from exactly the state the
previous stage ended with (one optimizer carried across stages), and then a replay carries its own replayed state
into it.  `validate` refuses anything else, since neither rule would
reproduce it.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from fgtrac_core.batched import split
from fgtrac_core.outputs import cross_entropy
from fgtrac_core.stages import linearize as lin
from fgtrac_core.stages.errors import MissingBoundaryStateError, StageAnalysisError
from fgtrac_core.tracking.forward_seeds import random_modules
from fgtrac_core.tracking.optimizer_hooks import clipping, is_unknown, zeroed

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""(model outputs for a batch, targets) -> the scalar training loss of the batch."""

LINEARISED_OPTIMIZERS = ("SGD", "Adam", "AdamW")
"""The optimizers whose steps the estimators linearise; exact replay steps any of `torch.optim`'s that `validate`
does not refuse (`_unreplayable_optimizer`)."""

# torch.optim's optimizers that a replay of recorded batches (one backward, then one step) cannot step
_UNREPLAYABLE = {
    "LBFGS": "steps through a closure that evaluates the loss several times per step",
    "SparseAdam": "steps sparse gradients only",
}

ACCUMULATION = ("mean", "sum", "share", "share_ratio")
"""The ways a loop may scale each micro-batch's loss when it accumulates gradients (`Training.accumulation_rule`)."""

StateDict = dict[str, torch.Tensor]


@dataclass
class Stage:
    """One recorded stage: its optimizer, boundary states and per-step schedule.

    `lrs[i]` is the learning rate of the first param group applied at step `steps[i]`; `batches[i]` the sample
    ids of that step in batch order.  From a recorded run also, per step: `hparams[i]` every param group's
    hyperparameters as applied, `clips[i]` the gradient clipping rule (or None), `altered[i]` whether the loop
    changed the gradients otherwise, `fingerprints[i]` the parameter fingerprint after the step.  Without
    `hparams` (in-memory trainings) the other groups keep their recorded ratio to the first group's lr.
    `micro[i]`: the sizes of the batches logged for step i, in log order, when the loop accumulated gradients
    over several (several `log_batch` calls before one `optimizer.step()`); `batches[i]` is then their
    concatenation.
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
    micro: list[list[int]] | None = None
    seeds: list[list[int] | None] | None = None  # per step: the seeds of its training forwards (`forward_seeds`)
    # per param group, the model parameter name of each parameter the optimizer held (the checkpoints'
    # `optimizer_params`); None in runs recorded before they were: the optimizer held model.parameters() in order
    params: list[list[str | None]] | None = None
    # the model parameters that did not require grad at the stage's start and end (the checkpoints' `frozen`;
    # None in runs recorded before they were)
    frozen: list[str] | None = None
    frozen_end: list[str] | None = None
    # the torch.autocast its training forwards ran under (`fgtrac_core.tracking.autocast`; None: full precision)
    autocast: dict[str, str] | None = None

    @property
    def n_steps(self) -> int:
        return len(self.steps)

    def parts(self, i: int) -> list[int]:
        """The sizes of the micro-batches whose gradients step index `i` accumulated (one: no accumulation)."""
        return [len(self.batches[i])] if self.micro is None else self.micro[i]

    @functools.cached_property
    def accumulation(self) -> int:
        """The most micro-batches any step of the stage accumulated (1: one batch per step).  Cached: replay asks
        at every step, and it is a pass over all of them."""
        return max((len(p) for p in self.micro or ()), default=1)

    @property
    def fresh(self) -> bool:
        """True when the stage started from a fresh optimizer: an empty recorded start state, or one whose every
        parameter has taken no step (Adagrad builds its accumulators with the optimizer)."""
        return all(_before_first_step(s) for s in self.start_optimizer.get("state", {}).values())

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
    # how closely replay must follow the recording: 0 bit for bit, else a relative difference of the parameters
    # (`fgtrac_core.stages.replay_match`); `deviation` is the largest one a replay was accepted with (of a step's
    # parameter fingerprint, or of a tensor at a stage end)
    tolerance: float = 0.0
    deviation: float = 0.0
    _accumulation: dict[int, str] = field(default_factory=dict, repr=False)
    _frozen: dict[int, list[int]] = field(default_factory=dict, repr=False)  # `frozen_params`, asked per step
    _stepped: dict[int, list[int | None]] = field(default_factory=dict, repr=False)  # `stepped_index`, per step
    _replaced: dict[int, list[str]] = field(default_factory=dict, repr=False)  # `replaced`, per stage entered
    _batch_cache: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = field(
        default_factory=dict, repr=False
    )

    @functools.cached_property
    def param_names(self) -> list[str]:
        """The model's parameter names in model.parameters() order (the optimizer's order)."""
        return [name for name, _ in self.model_factory().named_parameters()]

    def optimizer_params(self, stage_index: int) -> list[int]:
        """Index into `param_names` of each parameter stage `stage_index`'s optimizer held, in the optimizer's order
        (its param groups one after the other); `validate` refuses names the model does not have."""
        stage = self.stages[stage_index]
        if stage.params is None:
            return list(range(sum(stage.group_sizes())))
        at = {name: k for k, name in enumerate(self.param_names)}
        return [at[name] for group in stage.params for name in group]  # type: ignore[index]

    def optimizer_param_names(self, stage_index: int, indices: Sequence[int]) -> list[str]:
        """The model's names of the parameters at `indices` into stage `stage_index`'s optimizer (as the recorder
        lists zeroed or stale gradients)."""
        held = self.optimizer_params(stage_index)
        return [self.param_names[held[k]] for k in indices if k < len(held)]

    def frozen_params(self, stage_index: int) -> list[int]:
        """Indices into stage `stage_index`'s optimizer of the parameters it held that did not require grad
        throughout the stage (`validate` refuses one frozen or unfrozen within it): it never stepped them, their
        gradients being None, and replay drops the gradients its own backward gives them."""
        if stage_index not in self._frozen:
            frozen = set(self.stages[stage_index].frozen or ())
            held = self.optimizer_params(stage_index)
            self._frozen[stage_index] = [i for i, k in enumerate(held) if self.param_names[k] in frozen]
        return self._frozen[stage_index]

    def replaced(self, stage_index: int) -> list[str]:
        """The model's state entries (parameters, buffers) the loop replaced between the end of stage
        `stage_index - 1` and the start of stage `stage_index` (a head re-initialised for new classes): every
        replay, each counterfactual included, takes them at their recorded start values when it enters that
        stage, so a counterfactual changes what the earlier stages trained, not what the loop put there."""
        if stage_index not in self._replaced:
            out: list[str] = []
            if stage_index > 0:
                end, start = self.stages[stage_index - 1].end_model, self.stages[stage_index].start_model
                out = [n for n, v in start.items() if not torch.equal(v, end[n])]
            self._replaced[stage_index] = out
        return self._replaced[stage_index]

    def stepped_index(self, stage_index: int) -> list[int | None]:
        """Per model parameter (`param_names` order), its index into stage `stage_index`'s optimizer (the key of
        its state in the optimizer's state_dict) when the optimizer stepped it, else None (not held, or frozen)."""
        if stage_index not in self._stepped:
            out: list[int | None] = [None] * len(self.param_names)
            frozen = set(self.frozen_params(stage_index))
            for i, k in enumerate(self.optimizer_params(stage_index)):
                if i not in frozen:
                    out[k] = i
            self._stepped[stage_index] = out
        return self._stepped[stage_index]

    def step_hparams(self, stage_index: int, step_index: int) -> list[dict[str, Any]]:
        """Per model parameter, the hyperparameters recorded step `step_index` of stage `stage_index` applied to
        it; a parameter it did not step gets `still_hparams` (lr 0: the step's Jacobian leaves it alone)."""
        stage = self.stages[stage_index]
        per_held = lin.step_hparams(stage.step_groups(step_index), stage.group_sizes())
        still = lin.still_hparams(stage.optimizer)
        return [still if k is None else per_held[k] for k in self.stepped_index(stage_index)]

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

    def accumulation_rule(self, stage_index: int) -> str:
        """How the loop scaled each micro-batch's loss in a stage that accumulates gradients (`ACCUMULATION`):
        ``mean`` (``loss / K``, K the stage's most micro-batches per step, also at a step with fewer), ``sum``
        (``loss`` as it is), ``share`` (``loss * n / N``: the micro-batch's size over the step's samples, so the
        step's mean) or ``share_ratio`` (``loss * (n / N)``, the same value in other bits); ``none`` for a stage
        with one batch per step.

        The recorder sees the accumulated gradients, not the loss, so the rule is inferred, once per stage: the
        stage is replayed from its recorded start under every rule, step by step, and a rule is dropped at the
        first step whose parameters differ from the recorded fingerprint, or at the stage's end when its model or
        optimizer state differs from the recorded one.  This stops as soon as the rules left give every later
        micro-batch's backward the same gradient in every bit (`_seeds`): after one step for SGD in most runs;
        for Adam, whose update hardly depends on the gradients' scale, ``loss / K`` and ``loss`` are often told
        apart only by the moments at the stage's end, at the cost of replaying the stage once per such rule.
        Without fingerprints to decide: ``mean``.
        """
        stage = self.stages[stage_index]
        if stage.accumulation == 1:
            return "none"
        if stage_index not in self._accumulation:
            self._accumulation[stage_index] = self._infer_accumulation(stage_index)
        return self._accumulation[stage_index]

    def _infer_accumulation(self, stage_index: int) -> str:
        from fgtrac_core.stages.replay import Cursor  # replay builds on this module

        stage = self.stages[stage_index]
        if not stage.fingerprints or any(f is None for f in stage.fingerprints):
            return "mean"
        carried = self.stages[stage_index - 1].end_optimizer if stage_index else None
        alive = {rule: Cursor(self, stage_index, stage.start_model, carried) for rule in ACCUMULATION}
        for cursor in alive.values():
            cursor.check_fingerprints = True
        seeds = [{r: _seeds(r, tuple(stage.parts(i)), stage.accumulation) for r in ACCUMULATION}
                 for i in range(stage.n_steps)]  # fmt: skip

        def last_disagreement() -> int:  # the last step at which the rules still alive differ in any bit
            return max((i for i, w in enumerate(seeds) if len({w[r] for r in alive}) > 1), default=-1)

        decided_after = last_disagreement()
        bar = tqdm(  # on a terminal only: for an Adam stage this can replay the stage once per rule left
            total=stage.n_steps * len(alive), desc=f"loss scaling of stage {stage.name!r}", unit="step",
            file=sys.stderr, disable=None, leave=False,
        )  # fmt: skip
        for i in range(stage.n_steps):
            last = i == stage.n_steps - 1
            for rule, cursor in list(alive.items()):
                self._accumulation[stage_index] = rule
                # at the stage's last step also its recorded end state: Adam's update hardly depends on the scale
                # of the gradients, so the parameters (and the fingerprints) can agree under two rules while the
                # moments differ by that scale
                ended = _EndCheck(stage, cursor.model) if last else None
                cursor.step(ended)
                bar.update(1)
                if cursor.divergence is not None or (ended is not None and not ended.same):
                    del alive[rule]
                    decided_after = last_disagreement()
            if len(alive) <= 1 or i >= decided_after:
                break
        bar.close()
        return next(iter(alive), "mean")

    def micro_loss(self, loss: torch.Tensor, stage_index: int, sizes: list[int], part: int) -> torch.Tensor:
        """`loss` (the training loss of micro-batch `part` of a step of stage `stage_index` whose micro-batches
        have `sizes`) scaled as the loop scaled it before its backward (`accumulation_rule`); `loss` itself in a
        stage with one batch per step."""
        return _scale(self.accumulation_rule(stage_index), loss, sizes, part, self.stages[stage_index].accumulation)

    def step_loss(
        self, outputs: torch.Tensor, targets: torch.Tensor, stage_index: int, step_index: int
    ) -> torch.Tensor:
        """The loss whose gradient recorded step `step_index` applied, from the model's outputs on its whole
        batch: the training loss of the batch, or with gradient accumulation the sum of its micro-batches'
        scaled losses (`micro_loss`; the value of the loop's backward passes, not their bits)."""
        stage = self.stages[stage_index]
        if stage.accumulation == 1:
            return self.loss_fn(outputs, targets)
        sizes = stage.parts(step_index)
        parts = enumerate(zip(split(outputs, sizes), targets.split(sizes), strict=True))
        return sum(self.micro_loss(self.loss_fn(o, t), stage_index, sizes, m) for m, (o, t) in parts)

    def sample_weights(self, stage_index: int, step_index: int) -> np.ndarray:
        """Each sample's weight in the loss of a recorded step, in batch order, for a loss that averages over its
        batch (cross-entropy's default): 1/B for a batch of B; with gradient accumulation, per micro-batch of
        n samples 1/(K n) (rule ``mean``, K the stage's accumulation count), 1/n (``sum``) or 1/N (``share``, N
        the step's samples).  A step moves the parameters along minus lr times the weighted sum of the
        per-sample gradients (plain SGD)."""
        stage = self.stages[stage_index]
        sizes = stage.parts(step_index)
        weights = _part_weights(self.accumulation_rule(stage_index), sizes, stage.accumulation)
        return np.repeat(np.asarray(weights, dtype=np.float64), sizes)

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
            if (why := _unreplayable_optimizer(stage.optimizer)) is not None:
                raise StageAnalysisError(f"stage {stage.name!r} uses {stage.optimizer}, which {why}")
            if stage.params is None and sum(stage.group_sizes()) != n_params:
                raise StageAnalysisError(
                    f"stage {stage.name!r}: its optimizer holds {sum(stage.group_sizes())} parameters, the model "
                    f"has {n_params}, and this run was recorded before fgtrac noted which ones; record it again "
                    f"to replay an optimizer over some of the model's parameters"
                )
            if stage.params is not None:
                known = set(self.param_names)
                # None: a parameter outside the model (a learnable loss temperature, another module's)
                foreign = [n or "one outside the model" for group in stage.params for n in group if n not in known]
                if foreign or [len(g) for g in stage.params] != stage.group_sizes():
                    what = (
                        f"parameters the model has not ({_listed(foreign)})"
                        if foreign
                        else "other param groups than its state"
                    )
                    raise StageAnalysisError(
                        f"stage {stage.name!r}: its optimizer held {what}; the pipeline's model must be the one the "
                        f"run trained, and the optimizer hold only its parameters"
                    )
            self._validate_frozen(stage)
            n_groups = len(stage.group_sizes())
            if (i := next((i for i, g in enumerate(stage.hparams or ()) if len(g) != n_groups), None)) is not None:
                raise StageAnalysisError(
                    f"stage {stage.name!r}: its optimizer stepped {len(stage.hparams[i])} param group(s) at step "
                    f"{stage.steps[i]} but held {n_groups} at the stage's start (optimizer.add_param_group within "
                    f"the stage); replay builds a stage's optimizer from its start checkpoint, so add parameters "
                    f"between stages (a new run.stage), not within one"
                )
            self._validate_unheld(stage)  # after the group count: add_param_group is the more precise reason
            if len(stage.lrs) != stage.n_steps or len(stage.batches) != stage.n_steps:
                raise StageAnalysisError(f"stage {stage.name!r}: steps, learning rates and batches disagree")
            if stage.micro is not None and [sum(p) for p in stage.micro] != [len(b) for b in stage.batches]:
                raise StageAnalysisError(f"stage {stage.name!r}: micro-batch sizes and batches disagree")
            if j == 0:
                continue
            prev = self.stages[j - 1]
            if stage.start_model.keys() != prev.end_model.keys() or any(
                v.shape != prev.end_model[n].shape for n, v in stage.start_model.items()
            ):
                raise StageAnalysisError(
                    f"the model at the start of stage {stage.name!r} has other parameters or shapes than at the end "
                    f"of {prev.name!r}: the architecture changed between stages, which replay cannot reproduce"
                )
            if not stage.fresh and (
                stage.optimizer != prev.optimizer
                or not _same_optimizer_state(stage.start_optimizer, prev.end_optimizer)
            ):
                raise MissingBoundaryStateError(
                    f"stage {stage.name!r} starts from optimizer state that is neither fresh nor the state "
                    f"{prev.name!r} ended with; start each stage with a new optimizer, or carry the same one"
                )

    @staticmethod
    def _validate_frozen(stage: Stage) -> None:
        """Refuse a stage within which a parameter was frozen or unfrozen (requires_grad changed): replay keeps a
        parameter's requires_grad for a whole stage, as its checkpoints record it at the stage's start."""
        if stage.frozen is None:
            return
        unfrozen = [n for n in stage.frozen if not torch.equal(stage.start_model[n], stage.end_model[n])]
        refrozen = [n for n in stage.frozen_end or () if n not in stage.frozen]
        if unfrozen or refrozen:
            shown = _listed(unfrozen or refrozen)
            what = "did not require grad at its start but changed during it (unfrozen within the stage)"
            if not unfrozen:
                what = "required grad at its start but not at its end (frozen within the stage)"
            raise StageAnalysisError(
                f"stage {stage.name!r}: {shown} {what}; replay freezes a parameter for a whole stage or not at all, "
                f"so freeze or unfreeze parameters between stages (a new run.stage), not within one"
            )

    def _validate_unheld(self, stage: Stage) -> None:
        """Refuse a stage in which a model parameter its optimizer did not hold changed: replay steps the stage's
        optimizer alone, so it would leave that parameter as it was."""
        if stage.params is None:
            return
        held = {n for group in stage.params for n in group}
        moved = [
            n
            for n in self.param_names
            if n not in held and n in stage.start_model and not torch.equal(stage.start_model[n], stage.end_model[n])
        ]
        if moved:
            raise StageAnalysisError(
                f"stage {stage.name!r}: {_listed(moved)} changed during the stage, though the stage's optimizer did not "
                f"hold them (a second optimizer, or an update outside optimizer.step()); replay steps the stage's "
                f"optimizer alone: train with one optimizer per stage (param groups for different rates)"
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
        for stage in self.stages:
            if stage.optimizer not in LINEARISED_OPTIMIZERS:
                return (
                    f"stage {stage.name!r} uses {stage.optimizer}, which the estimators do not model (they "
                    f"linearise {', '.join(LINEARISED_OPTIMIZERS[:-1])} and {LINEARISED_OPTIMIZERS[-1]} steps)"
                )
        found = self.enabled_option("amsgrad", "maximize")
        return None if found is None else f"stage {found[0]!r} uses {found[1]}=True, which the estimators do not model"

    def replay_refusal(self) -> str | None:
        """Why exact replay cannot reproduce this training although estimators can still linearise it (the loop
        altered gradients by hand at some step), or None.  Replay refuses with this reason; an estimator's results
        carry it as `verified: false`."""
        dropout = random_modules(self.model_factory())
        for stage in self.stages if dropout else ():
            if stage.seeds is None or any(s is None for s in stage.seeds):
                return (
                    f"the model draws random dropout masks in training ({', '.join(dropout)}), and stage "
                    f"{stage.name!r} was recorded without reseeding its forward passes (run.stage(..., "
                    f"seed_forwards=False), or by an fgtrac before they were), so replay cannot draw them again"
                )
        for stage in self.stages:
            for i, seeds in enumerate(stage.seeds or ()):
                if seeds is not None and len(seeds) != len(stage.parts(i)):
                    return (
                        f"step {stage.steps[i]} (stage {stage.name!r}) ran {len(seeds)} training-mode forward "
                        f"pass(es) of the model with gradients for its {len(stage.parts(i))} logged batch(es); "
                        f"replay draws the model's random numbers (dropout) again per logged batch, so a forward "
                        f"that trains on no logged batch leaves it unable to tell which seed fed which batch "
                        f"(evaluate in model.eval() or under torch.no_grad())"
                    )
        for stage in self.stages:
            if stage.device is not None and stage.device != "cpu":
                return (
                    f"stage {stage.name!r} trained on {stage.device}; exact replay runs on the CPU, whose kernels "
                    f"and summation order differ from that device's, so it cannot reproduce the recorded parameters "
                    f"bit for bit"
                )
        for j, stage in enumerate(self.stages):
            altered = [i for i, a in enumerate(stage.altered or []) if a]
            if not altered:
                continue
            i = altered[0]
            where = f"at step {stage.steps[i]} (stage {stage.name!r})"
            clip = (stage.clips[i] if stage.clips is not None else None) or {}
            if is_unknown(clip) and clip.get("stale"):
                names = self.optimizer_param_names(j, clip["stale"])
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


@functools.cache
def _seeds(rule: str, sizes: tuple[int, ...], count: int) -> tuple[float, ...]:
    """The gradient each micro-batch's loss receives from its scaled backward under an accumulation rule, in
    float32 and float64 (by autograd): two rules with the same seeds at a step replay it in the same bits."""
    out = []
    for dtype in (torch.float32, torch.float64):
        for part in range(len(sizes)):
            loss = torch.ones((), dtype=dtype, requires_grad=True)
            (seed,) = torch.autograd.grad(_scale(rule, loss, sizes, part, count), loss)
            out.append(float(seed))
    return tuple(out)


def _scale(rule: str, loss: torch.Tensor, sizes: Sequence[int], part: int, count: int) -> torch.Tensor:
    n, total = sizes[part], sum(sizes)
    if n == 0:  # a micro-batch emptied by a counterfactual (`influence --check`): its loss is a zero already
        return loss
    if rule == "mean":
        return loss / count
    if rule == "share":
        return loss * n / total
    if rule == "share_ratio":
        return loss * (n / total)
    return loss


class _EndCheck:
    """An `observe` for a replay's last step of `stage`: whether the model and optimizer end as recorded."""

    def __init__(self, stage: Stage, model: nn.Module) -> None:
        self.stage, self.model, self.same = stage, model, False

    def __call__(self, optimizer: torch.optim.Optimizer) -> None:
        self.same = _same_tensors(self.model.state_dict(), self.stage.end_model) and _same_optimizer_state(
            optimizer.state_dict(), self.stage.end_optimizer
        )


def _part_weights(rule: str, sizes: list[int], count: int) -> list[float]:
    """Per micro-batch, its samples' weight in a step's loss under an accumulation rule (`Training.sample_weights`)."""
    total = sum(sizes)
    if rule == "mean":
        return [1.0 / (count * n) for n in sizes]
    if rule == "sum":
        return [1.0 / n for n in sizes]
    return [1.0 / total] * len(sizes)


def _unreplayable_optimizer(name: str) -> str | None:
    """Why exact replay cannot step a stage's optimizer (it rebuilds it from `torch.optim` by its class name and
    steps it on the recorded batches), or None."""
    cls = getattr(torch.optim, name, None)
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        return (
            "is not one of torch.optim's optimizers: replay rebuilds each stage's optimizer from torch.optim by "
            "its class name (fgtrac influence's checkpoint modes still run)"
        )
    if name in _UNREPLAYABLE:
        return f"{_UNREPLAYABLE[name]}: replay runs one backward and one step per recorded batch"
    return None


def _before_first_step(state: dict[str, Any]) -> bool:
    """Whether one parameter's recorded optimizer state is that of an optimizer that has not stepped it (a step
    count of 0; state without a count, as SGD's momentum buffer, exists only after a step)."""
    step = state.get("step")
    return isinstance(step, torch.Tensor | int | float) and float(step) == 0


def _listed(names: Sequence[Any]) -> str:
    """The first three names, comma-separated (", ..." when there are more)."""
    return ", ".join(map(str, names[:3])) + (", ..." if len(names) > 3 else "")


def _same_tensors(a: StateDict, b: StateDict) -> bool:
    """Whether two state dicts hold the same entries, bit for bit."""
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
