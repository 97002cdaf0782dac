"""Tiny trainings for stage-analysis tests: in memory (any loss) or recorded through `fgtrac_core.tracking.Run`.

A stage spec is (name, optimizer factory, lr schedule factory or None, n_steps, carry): with carry=True the
stage continues the previous stage's optimizer (its state and its param groups) instead of building a new one.
`select` picks what the factory gets (default: model.parameters(); e.g. the head's alone, or param groups of
the loop's own order), `frozen` names parameters that do not require grad during the stage and `reset` those
the loop re-draws before it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fgtrac_core.pipeline import Pipeline
from fgtrac_core.stages.training import LossFn, Stage, Training, cross_entropy
from fgtrac_core.tracking import Run
from fgtrac_core.tracking.optimizer_hooks import applied_hparams, optimizer_params

OptFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]
SchedFactory = Callable[[torch.optim.Optimizer, int], Any]


@dataclass
class StageSpec:
    name: str
    optimizer: OptFactory
    n_steps: int
    scheduler: SchedFactory | None = None
    carry: bool = False
    select: Callable[[nn.Module], Any] | None = None
    frozen: tuple[str, ...] = ()
    reset: tuple[str, ...] = ()  # parameters the loop re-draws (N(0, 1)) before the stage, as a new head


class MLP(nn.Module):
    """A small tanh network (smooth, so its Hessians are well defined everywhere)."""

    def __init__(self, d_in: int = 5, hidden: int = 6, d_out: int = 3) -> None:
        super().__init__()
        self.body = nn.Linear(d_in, hidden)
        self.head = nn.Linear(hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.body(x)))


def cosine(opt: torch.optim.Optimizer, n_steps: int) -> Any:
    return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=n_steps)


def data(n: int = 60, d_in: int = 5, n_classes: int = 3, dtype: torch.dtype = torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g, dtype=dtype)
    y = torch.randint(0, n_classes, (n,), generator=g)
    return x, y


def _batches(n_train: int, n_steps: int, batch: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [np.sort(rng.choice(n_train, size=batch, replace=False)) for _ in range(n_steps)]


def train_in_memory(
    make_model: Callable[[], nn.Module],
    specs: list[StageSpec],
    x: torch.Tensor,
    targets: torch.Tensor,
    *,
    n_train: int,
    loss_fn: LossFn = cross_entropy,
    batch: int = 8,
    seed: int = 0,
) -> Training:
    """Train `specs` in order on samples 0..n_train-1 and describe it as a `Training` (test set: the rest)."""
    torch.manual_seed(seed)
    model = make_model()
    stages, opt = [], None
    for j, spec in enumerate(specs):
        for name, p in model.named_parameters():
            p.requires_grad_(name not in spec.frozen)
            if name in spec.reset:
                with torch.no_grad():
                    p.normal_()
        if not spec.carry or opt is None:
            opt = spec.optimizer(spec.select(model) if spec.select else list(model.parameters()))
        sched = spec.scheduler(opt, spec.n_steps) if spec.scheduler else None
        start_model, start_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
        ids = _batches(n_train, spec.n_steps, batch, seed + j)
        lrs, hparams = [], []
        for b in ids:
            lrs.append(float(opt.param_groups[0]["lr"]))
            hparams.append(applied_hparams(opt))  # every group's values as the step applies them
            opt.zero_grad()
            loss_fn(model(x[b]), targets[b]).backward()
            opt.step()
            if sched is not None:
                sched.step()
        stages.append(
            Stage(
                stage_id=j,
                name=spec.name,
                optimizer=type(opt).__name__,
                start_model=start_model,
                start_optimizer=start_opt,
                end_model=copy.deepcopy(model.state_dict()),
                end_optimizer=copy.deepcopy(opt.state_dict()),
                steps=list(range(sum(s.n_steps for s in specs[:j]), sum(s.n_steps for s in specs[: j + 1]))),
                lrs=lrs,
                batches=ids,
                hparams=hparams,
                params=optimizer_params(opt, model),
                frozen=list(spec.frozen),
                frozen_end=list(spec.frozen),
            )
        )
    return Training(
        stages=stages,
        model_factory=make_model,
        load_batch=lambda ids: (x[ids], targets[ids]),
        test_ids=np.arange(n_train, len(x)),
        loss_fn=loss_fn,
    )


def record_run(
    run_dir: Path,
    make_model: Callable[[], nn.Module],
    specs: list[StageSpec],
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    n_train: int,
    batch: int = 8,
    seed: int = 0,
    fail_stage: str | None = None,
) -> Pipeline:
    """Record the same kind of training through the recorder (cross-entropy); returns the run's pipeline.

    `fail_stage` raises inside that stage after its first step (the recorder then writes no stage_end).
    """
    torch.manual_seed(seed)
    model = make_model()
    n = len(x)
    run = Run.create(run_dir, name="toy", config={"torch_threads": torch.get_num_threads()})
    run.register_samples(
        np.arange(n_train), split="train", labels=y[:n_train].numpy(), raw=x[:n_train].numpy()
    )
    run.register_samples(
        np.arange(n_train, n), split="test", labels=y[n_train:].numpy(), raw=x[n_train:].numpy()
    )
    step, opt = 0, None
    for j, spec in enumerate(specs):
        if not spec.carry or opt is None:
            opt = spec.optimizer(list(model.parameters()))
        sched = spec.scheduler(opt, spec.n_steps) if spec.scheduler else None
        try:
            with run.stage(spec.name, optimizer=opt, model=model):
                for b in _batches(n_train, spec.n_steps, batch, seed + j):
                    lr = opt.param_groups[0]["lr"]
                    opt.zero_grad()
                    loss = cross_entropy(model(x[b]), y[b])
                    loss.backward()
                    opt.step()
                    if sched is not None:
                        sched.step()
                    run.log_batch(b, step=step, lr=lr, loss=loss)
                    step += 1
                    if spec.name == fail_stage:
                        raise RuntimeError("stage failed on purpose")
        except RuntimeError:
            break
    run.close()
    return Pipeline(model_factory=make_model, load_inputs=lambda cfg, ids: x[ids], head_layer=None, config={})
