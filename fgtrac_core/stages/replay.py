"""Deterministic replay of recorded training: the whole run (checked bit for bit) and runs with a stage skipped.

Skipping stage k means: the parameters and optimizer state are restored to their values at stage k's start, and
the later stages are replayed with the same batches and the same per-step learning rates.  Each later stage's
optimizer is rebuilt from its recorded class and hyperparameters; a stage recorded with a fresh optimizer starts
fresh in the replay too, and a stage recorded as continuing the previous stage's optimizer continues the
*replayed* state (after a skip: the state restored at stage k's start).  See `training.py` for why no other case
is accepted.

Replays run on the CPU under `torch.use_deterministic_algorithms(True)` with the recorded thread count
(`deterministic`); numerics match the recording only on the same kind of machine, which `replay_full` checks
step by step against the recorded parameter fingerprints.  A stage recorded on another device (a GPU) is refused
before anything runs (`Training.replay_refusal`).
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from fgtrac_core.pipeline import load_into
from fgtrac_core.stages.errors import ReplayMismatchError, StageAnalysisError
from fgtrac_core.stages.replay_match import (
    ROUNDING_LEVEL,
    Difference,
    difference,
    fingerprint_gap,
    fingerprints_differ,
)
from fgtrac_core.stages.training import StateDict, Training
from fgtrac_core.tracking.autocast import autocast_context, describe
from fgtrac_core.tracking.forward_seeds import reseed
from fgtrac_core.tracking.optimizer_hooks import (
    ParamFingerprint,
    apply_clip,
    fingerprint_value,
)


@contextlib.contextmanager
def deterministic(threads: int | None) -> Iterator[None]:
    """Deterministic algorithms and `threads` intra-op threads (None: unchanged), restored on exit."""
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    was_threads = torch.get_num_threads()
    torch.use_deterministic_algorithms(True)
    if threads:
        torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
        torch.set_num_threads(was_threads)


def build_optimizer(
    training: Training, stage_index: int, params: list[torch.nn.Parameter], carried: dict[str, Any] | None
) -> torch.optim.Optimizer:
    """The optimizer of stage `stage_index` over `params`, with its recorded hyperparameters.

    Its state is the recorded start state when the stage started fresh (or when nothing is `carried`, at the
    start of a replay), else `carried` (an optimizer state_dict whose per-parameter state continues).
    """
    stage = training.stages[stage_index]
    cls = getattr(torch.optim, stage.optimizer)
    held = [params[k] for k in training.optimizer_params(stage_index)]
    groups, at = [], 0
    for size in stage.group_sizes():
        groups.append({"params": held[at : at + size]})
        at += size
    optimizer = cls(groups)
    state = copy.deepcopy(stage.start_optimizer)
    if not stage.fresh and carried is not None:
        state["state"] = copy.deepcopy(carried["state"])
    optimizer.load_state_dict(state)
    return optimizer


class Cursor:
    """A live model and optimizer at a position (stage, step within it) of the recorded schedule.

    Created at the start of stage `stage_index` with parameters `model_state`; `carried` is the optimizer state
    a stage that continues its predecessor's optimizer would inherit.  `step()` runs the next recorded step
    exactly as the training loop did: zero grads, the loss of the batch and its backward (with gradient
    accumulation: one forward and backward per micro-batch, in recorded order, each loss scaled as the loop did,
    `Training.micro_loss`), zero gradients where the loop stepped on zeroed ones its backward did not reach,
    the recorded clipping, optimizer step.
    """

    def __init__(
        self,
        training: Training,
        stage_index: int,
        model_state: StateDict,
        carried: dict[str, Any] | None = None,
    ) -> None:
        self.training = training
        self.model = training.model_factory()
        load_into(self.model, model_state, "the recorded state")
        self.params = list(self.model.parameters())
        self.stage_index = stage_index
        self.step_index = 0
        self.optimizer: torch.optim.Optimizer | None = None
        # replay_full compares every step with its recorded parameter fingerprint: the first step that differs
        self.check_fingerprints = False
        self.divergence: Divergence | None = None
        self._fingerprint: ParamFingerprint | None = None  # bound to `_fingerprinted`, the stage's optimizer
        self._fingerprinted: torch.optim.Optimizer | None = None
        self._ends: dict[int, StateDict] = {}  # `stage_end_state` of stages followed by replacements
        self._enter_stage(carried)

    @property
    def done(self) -> bool:
        return self.stage_index >= self.training.n_stages

    @property
    def remaining(self) -> int:
        """Steps left until the end of the run."""
        if self.done:
            return 0
        here = self.training.stages[self.stage_index].n_steps - self.step_index
        return here + self.training.steps_after(self.stage_index)

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets) of the step `step()` runs next (with gradient accumulation: of all its micro-batches,
        concatenated)."""
        return self.training.batch(self.stage_index, self.step_index)

    def parts(self) -> list[int]:
        """The sizes of the micro-batches in `batch()` (one: no gradient accumulation)."""
        return self.training.stages[self.stage_index].parts(self.step_index)

    def _backward(self) -> None:
        stage = self.training.stages[self.stage_index]
        seeds = stage.seeds[self.step_index] if stage.seeds else None
        if not seeds:
            self._backward_passes(None)
            return
        with torch.random.fork_rng(devices=[]):  # the caller's generator continues as if replay drew nothing
            self._backward_passes(seeds)

    def _backward_passes(self, seeds: list[int] | None) -> None:
        x, y = self.batch()
        stage = self.training.stages[self.stage_index]
        if stage.accumulation == 1:
            self._reseed(seeds, 0)
            with autocast_context(stage.autocast):  # the forward and the loss, as torch's mixed-precision recipe
                loss = self.training.loss_fn(self.model(x), y)
            loss.backward()
            return
        sizes = self.parts()
        for m, (xm, ym) in enumerate(zip(x.split(sizes), y.split(sizes), strict=True)):
            self._reseed(seeds, m)
            # a copy, not a view into the concatenated batch: the loop's micro-batch was a tensor of its own
            with autocast_context(stage.autocast):
                loss = self.training.loss_fn(self.model(xm.clone()), ym.clone())
            self.training.micro_loss(loss, self.stage_index, sizes, m).backward()

    @staticmethod
    def _reseed(seeds: list[int] | None, m: int) -> None:
        """Reseed torch's generator as the recorder did before the forward of micro-batch m (dropout masks)."""
        if seeds:
            reseed(seeds[m])

    def step(self, observe: Callable[[torch.optim.Optimizer], None] | None = None) -> None:
        """Run the next recorded optimizer step (then move to the next stage if this one is finished).

        `observe(optimizer)` is called right after the optimizer step, before a finished stage is left.
        """
        stage = self.training.stages[self.stage_index]
        assert self.optimizer is not None
        # every group's hyperparameters as the recorded step applied them (lr, momentum, betas, weight decay...)
        for group, hp in zip(self.optimizer.param_groups, stage.step_groups(self.step_index), strict=True):
            group.update(hp)
        self.optimizer.zero_grad()
        self._backward()
        stepped = [p for g in self.optimizer.param_groups for p in g["params"]]
        for k in self.training.frozen_params(self.stage_index):  # the loop's backward gave them no gradient
            stepped[k].grad = None
        for k in stage.zeros(self.step_index):  # the loop's zero_grad(set_to_none=False) left zeros there
            if stepped[k].grad is None:
                stepped[k].grad = torch.zeros_like(stepped[k])
        # over the optimizer's parameters as the recorder inferred the rule (`infer_clip`), in its order or, when
        # the rule says so, in the model's (torch's total norm sums per-tensor norms in the order given)
        clip = stage.clip(self.step_index)
        if clip and clip.get("order") == "model":
            held = set(map(id, stepped))
            stepped = [p for p in self.params if id(p) in held]
        apply_clip(stepped, clip)
        self.optimizer.step()
        if self.check_fingerprints and self.divergence is None:
            self._compare_fingerprint(stage)
        if observe is not None:
            observe(self.optimizer)
        self.step_index += 1
        self._advance_past_empty_stages()

    def _compare_fingerprint(self, stage: Any) -> None:
        recorded = stage.fingerprints[self.step_index] if stage.fingerprints else None
        if recorded is None:
            return
        if self._fingerprinted is not self.optimizer:  # bound once per stage, not per step
            assert self.optimizer is not None
            self._fingerprint, self._fingerprinted = ParamFingerprint(self.optimizer), self.optimizer
        assert self._fingerprint is not None
        replayed = fingerprint_value(self._fingerprint.snapshot())
        if fingerprints_differ(recorded, replayed, self.training.tolerance):
            self.divergence = Divergence(self.stage_index, self.step_index, recorded, replayed)
        elif self.training.tolerance:
            self.training.deviation = max(self.training.deviation, fingerprint_gap(recorded, replayed))

    def run(self, n_steps: int | None = None, bar: Any = None) -> None:
        """Run `n_steps` recorded steps (None: to the end of the run); `bar` is an optional tqdm to update."""
        n = self.remaining if n_steps is None else min(n_steps, self.remaining)
        for _ in range(n):
            self.step()
            if bar is not None:
                bar.update(1)

    def run_through_stage(self, stage_index: int, bar: Any = None) -> None:
        """Run every remaining step of stages up to `stage_index` (stops at the end of that stage, or right after
        the first step that diverges from its recorded fingerprint, when they are checked)."""
        while not self.done and self.stage_index <= stage_index and self.divergence is None:
            self.step()
            if bar is not None:
                bar.update(1)

    def model_state(self) -> StateDict:
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def stage_end_state(self, stage_index: int) -> StateDict:
        """The model as stage `stage_index` ended (the cursor may have entered the next stage since, which loads
        what the loop replaced there: `Training.replaced`)."""
        return self._ends.get(stage_index) or self.model_state()

    def optimizer_state(self) -> dict[str, Any]:
        assert self.optimizer is not None
        return copy.deepcopy(self.optimizer.state_dict())

    def _enter_stage(self, carried: dict[str, Any] | None) -> None:
        self._load_replaced()
        self.optimizer = build_optimizer(self.training, self.stage_index, self.params, carried)
        self._advance_past_empty_stages()

    def _advance_past_empty_stages(self) -> None:
        while not self.done and self.step_index >= self.training.stages[self.stage_index].n_steps:
            carried = self.optimizer.state_dict() if self.optimizer is not None else None
            if self.stage_index + 1 < self.training.n_stages and self.training.replaced(self.stage_index + 1):
                self._ends[self.stage_index] = self.model_state()  # before the next stage's replacements
            self.stage_index += 1
            self.step_index = 0
            if not self.done:
                self._load_replaced()
                self.optimizer = build_optimizer(self.training, self.stage_index, self.params, carried)

    def _load_replaced(self) -> None:
        """What the loop replaced as the current stage started (`Training.replaced`), at its recorded values."""
        names = self.training.replaced(self.stage_index)
        if names:
            start, state = self.training.stages[self.stage_index].start_model, self.model.state_dict()
            with torch.no_grad():
                for name in names:
                    state[name].copy_(start[name])


@dataclass
class Divergence:
    """The first replayed step whose parameters differ from the recorded fingerprint."""

    stage_index: int
    step_index: int
    recorded: float
    replayed: float


@dataclass
class ReplayResult:
    """Final parameters of one replay and what it cost (seconds of wall time, optimizer steps run)."""

    model: StateDict
    seconds: float
    steps: int


def replay_full(training: Training, bar: Any = None) -> ReplayResult:
    """Replay the whole run from the first stage's start and check every stage end bit for bit.

    Raises ReplayMismatchError naming the first stage whose replayed parameters (or optimizer state) differ from
    the recorded ones, with the largest absolute difference.  Never returns numbers from a diverged replay.
    """
    require_replayable(training)
    t0 = time.perf_counter()
    first = training.stages[0]
    cursor = Cursor(training, 0, first.start_model, None)
    cursor.check_fingerprints = True
    for k, stage in enumerate(training.stages):
        cursor.run_through_stage(k, bar)
        raise_if_diverged(cursor, "no stage effects are reported")  # stop now, not after the stage's last step
        replayed = cursor.stage_end_state(k)
        diff = difference(replayed, stage.end_model)
        if not _accepted(training, diff):
            buffers = {name for name, _ in cursor.model.named_buffers()}
            differ = [n for n in stage.end_model if n not in replayed or not torch.equal(replayed[n], stage.end_model[n])]
            why = (
                _buffers_only(stage.name, differ)
                if differ and set(differ) <= buffers
                else _diagnosis(training, cursor.divergence, k)
            )
            raise ReplayMismatchError(
                f"replaying the recorded batches does not reproduce the parameters at the end of stage "
                f"{stage.name!r} ({diff.text(training.tolerance)}); stage effects would be wrong, so none are "
                f"reported — {why}"
            )
        if k + 1 < training.n_stages and not training.stages[k + 1].fresh:
            _check_optimizer_state(cursor, stage.end_optimizer, stage.name)
    return ReplayResult(
        cursor.model_state(), time.perf_counter() - t0, sum(s.n_steps for s in training.stages)
    )


def raise_if_diverged(cursor: Cursor, consequence: str) -> None:
    """Raise ReplayMismatchError once a cursor checking fingerprints (`check_fingerprints`) has replayed a step
    whose parameters differ from the recorded ones: every later step would be computed off the recorded
    trajectory.  `consequence` says what is therefore not reported."""
    div = cursor.divergence
    if div is not None:
        raise ReplayMismatchError(
            f"replaying the recorded batches does not reproduce the parameters recorded in stage "
            f"{cursor.training.stages[div.stage_index].name!r}, so the replay stopped there and {consequence} — "
            f"{_diagnosis(cursor.training, div, div.stage_index)}"
        )


STAGES_REMEDY = (
    "no exact stage effects can be computed (estimators still run, marked unverified: --method fast | propagated | "
    "partial-replay)"
)
INFLUENCE_REMEDY = (
    "the modes that replay the run (exact, adamw_influence) cannot follow it; the checkpoint modes still run "
    "(--mode last_layer | full | adamw | influence_function)"
)


def require_replayable(training: Training, remedy: str = STAGES_REMEDY) -> None:
    """Raise StageAnalysisError when exact replay cannot reproduce this training (`Training.replay_refusal`), the
    reason followed by `remedy` (what the caller can do instead)."""
    refusal = training.replay_refusal()
    if refusal is not None:
        raise StageAnalysisError(f"{refusal}; {remedy}")


def _buffers_only(stage: str, names: list[str]) -> str:
    """Why only the model's buffers (BatchNorm's running statistics...) differ at a stage end."""
    shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
    return (
        f"every parameter of stage {stage!r} replayed bit for bit; only the model's buffers differ ({shown}): "
        f"forward passes in training mode outside the recorded optimizer steps update them (a validation run "
        f"without model.eval(), for instance), and replay runs only the recorded steps — evaluate in eval mode "
        f"and switch back with model.train()"
    )


def _describe_step(training: Training, j: int, i: int) -> str:
    """The recorded facts of step index i of stage j, in words."""
    stage = training.stages[j]
    groups = stage.step_groups(i)
    shown = ("lr", "momentum", "dampening", "nesterov", "betas", "eps", "weight_decay")
    parts = []
    for g, hp in enumerate(groups):
        values = ", ".join(f"{k} {hp[k]!r}" for k in shown if k in hp)
        parts.append(values if len(groups) == 1 else f"group {g}: {values}")
    clip = stage.clip(i)
    if clip is None:
        clipping = "no gradient clipping"
    elif clip["rule"] == "norm":
        clipping = f"clip_grad_norm_(max_norm={clip['max_norm']!r}, norm_type={clip['norm_type']!r})"
    else:
        clipping = f"clip_grad_value_(clip_value={clip['clip_value']!r})"
    if zeros := stage.zeros(i):
        clipping += f", zero gradients stepped on for {', '.join(training.optimizer_param_names(j, zeros))}"
    if stage.accumulation == 1:
        batch = f"a batch of {len(stage.batches[i])} samples"
    else:
        sizes = stage.parts(i)
        batch = (
            f"gradients accumulated over {len(sizes)} logged batch(es) of {', '.join(map(str, sizes))} samples, "
            f"each loss scaled as {_RULE_TEXT[training.accumulation_rule(j)].format(k=stage.accumulation)}"
        )
    precision = f", forwards and loss under {describe(stage.autocast)}" if stage.autocast else ""
    return f"optimizer {stage.optimizer}, {'; '.join(parts)}, {clipping}, {batch}{precision}"


_RULE_TEXT = {
    "mean": "loss / {k} (the stage's most micro-batches per step)",
    "sum": "loss (summed, not scaled)",
    "share": "loss * n / N (micro-batch size over the step's samples)",
    "share_ratio": "loss * (n / N) (micro-batch size over the step's samples)",
}


def _diagnosis(training: Training, div: Divergence | None, k: int) -> str:
    """What the evidence (the per-step parameter fingerprints) says about why replay diverged in stage k."""
    stage = training.stages[k]
    if div is None:
        if not stage.fingerprints or any(f is None for f in stage.fingerprints):
            return "replay on the machine and thread count the run was recorded with"
        return (
            f"every step of stage {stage.name!r} reproduced its recorded parameter fingerprint, so the parameters "
            f"were changed after the stage's last optimizer step, before its stage_end checkpoint"
        )
    j, i = div.stage_index, div.step_index
    where = training.stages[j]
    head = (
        f"replay first diverges at step {where.steps[i]} (stage {where.name!r}): the parameters after it differ "
        f"from the recorded fingerprint ({div.recorded!r} recorded, {div.replayed!r} replayed); recorded at that "
        f"step: {_describe_step(training, j, i)}. "
    )
    # a stage recorded under autocast replays its forwards and losses under it: a loss the loop took outside it
    # is the one way the loop's precision can still differ
    precision = (
        f"; or the loop computed its loss outside {describe(where.autocast)} (replay runs the forward and the loss "
        f"under it, as torch's mixed-precision recipe does)"
        if where.autocast
        else ""
    )
    gap = fingerprint_gap(div.recorded, div.replayed)
    if gap <= ROUNDING_LEVEL:
        elsewhere = " or on another machine or thread count than the recording" if j == 0 and i == 0 else ""
        return head + (
            f"The difference is float rounding (relative {gap:.1g}), not a recorded fact the loop did not follow "
            f"(a wrong lr, batch, target or clipping rule moves the parameters by orders of magnitude more): a "
            f"kernel rounded differently from the recording{elsewhere} — on the CPU some kernels' rounding depends "
            f"on where their operands lie in memory (LayerNorm's does) — so this run cannot be replayed bit for "
            f"bit. --tolerance 1e-4 accepts a replay whose parameters stay within that relative difference of the "
            f"recorded ones (the analysis stores the largest difference it accepted)"
        )
    if j == 0 and i == 0:
        return head + (
            "It is the first step, so the model, inputs or loss the pipeline rebuilds may differ from the ones "
            "trained (a loss other than mean cross-entropy: name the loop's with --loss; "
            + ("" if where.autocast else "mixed precision under torch.autocast that began after the stage's first forward; ")
            + "random augmentation in the inputs: do it in the model's first module instead; random "
            "numbers drawn inside the model, such as functional dropout or that augmentation, in a stage not "
            "recorded with run.stage(..., seed_forwards=True)), a recorded "
            "fact of that step (hyperparameters, clipping, batch, targets) may not be what the loop used, or this "
            "machine / thread count computes differently from the recording one"
        ) + precision
    return head + (
        "Every earlier step matched, so the pipeline and this machine's numerics reproduce the recording: a "
        "recorded fact of that step (hyperparameters, clipping, batch, targets) differs from what the loop did, "
        "the forward pass draws random numbers the recorder did not reseed (functional dropout, noise inside the "
        "model: record the stage with run.stage(..., seed_forwards=True)), or the loop changed parameters or "
        "optimizer state outside optimizer.step() there"
    ) + precision


def check_final(training: Training, model: StateDict) -> None:
    """Raise ReplayMismatchError unless a replay of the recorded run ended at theta_T bit for bit (or within the
    training's tolerance)."""
    diff = difference(model, training.final_model)
    if not _accepted(training, diff):
        raise ReplayMismatchError(
            f"replaying the recorded batches does not reproduce the final parameters "
            f"({diff.text(training.tolerance)}); no stage effects are reported — replay on the machine and thread "
            f"count the run was recorded with"
        )


def _accepted(training: Training, diff: Difference | None) -> bool:
    """Whether a replayed state `diff` away from the recorded one is accepted; the largest accepted relative
    difference is kept in `training.deviation`."""
    if diff is None:
        return True
    if diff.within(training.tolerance):
        training.deviation = max(training.deviation, diff.relative)
        return True
    return False


def replay_without(training: Training, k: int, bar: Any = None) -> ReplayResult:
    """theta~_T: the final parameters when stage `k` is skipped (its start state restored, later stages replayed)."""
    require_replayable(training)
    t0 = time.perf_counter()
    stage = training.stages[k]
    if k + 1 >= training.n_stages:
        return ReplayResult({n: v.clone() for n, v in stage.start_model.items()}, 0.0, 0)
    cursor = skipped_cursor(training, k)
    steps = cursor.remaining
    cursor.run(None, bar)
    return ReplayResult(cursor.model_state(), time.perf_counter() - t0, steps)


def skipped_cursor(training: Training, k: int) -> Cursor:
    """A cursor at the start of stage k+1 in the run that skips stage k (k must not be the last stage)."""
    stage = training.stages[k]
    return Cursor(training, k + 1, stage.start_model, stage.start_optimizer)


def recorded_cursor(training: Training, k: int) -> Cursor:
    """A cursor at the start of stage k+1 of the recorded run (from its recorded start checkpoint)."""
    nxt = training.stages[k + 1]
    return Cursor(training, k + 1, nxt.start_model, training.stages[k].end_optimizer)


def _check_optimizer_state(cursor: Cursor, recorded: dict[str, Any], stage_name: str) -> None:
    """The optimizer state a later stage inherits must replay bit for bit too (or within the tolerance)."""
    state = cursor.optimizer_state()["state"]
    for i, entry in recorded.get("state", {}).items():
        for key, value in entry.items():
            mine = state.get(i, {}).get(key)
            diff = difference({key: mine} if mine is not None else {}, {key: value})
            if not _accepted(cursor.training, diff):
                raise ReplayMismatchError(
                    f"replaying the recorded batches does not reproduce the optimizer state ({key}) at the end of "
                    f"stage {stage_name!r}, which the next stage continues; no stage effects are reported"
                )
