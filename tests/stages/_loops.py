"""Small real runs recorded with ordinary user loops (the README's "Instrument your own loop"), and an independent
reference replay that reads the run's tables with plain SQL — not fgtrac's replay code.

The pipeline is importable (`tests.stages._loops:MLP`, `tests.stages._loops:inputs`) so that `fgtrac stages
--model ... --inputs ...` can rebuild it.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from torch.utils.data import DataLoader, TensorDataset

from fgtrac_core.pipeline import Pipeline
from fgtrac_core.tracking import Run

N_TRAIN, N_TEST, D_IN, N_CLASSES = 48, 16, 6, 3
MODEL_REF, INPUTS_REF = "tests.stages._loops:MLP", "tests.stages._loops:inputs"
LOSS_REF = "tests.stages._loops:smoothed_loss"


def smoothed_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """A loop's own loss: label-smoothed cross-entropy, mean over the batch (as the loop computes it)."""
    return F.cross_entropy(outputs, targets, label_smoothing=0.2)


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(D_IN, 10)
        self.head = nn.Linear(10, N_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.body(x)))


class BatchNormMLP(MLP):
    """MLP with BatchNorm between its layers (running statistics: buffers the training forward updates)."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.norm(self.body(x))))


class BranchMLP(MLP):
    """MLP with an auxiliary head that only batches whose first sample has x[0] > 0 use (some steps leave it out)."""

    def __init__(self) -> None:
        super().__init__()
        self.aux = nn.Linear(10, N_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.body(x))
        return self.head(h) + self.aux(h) if x[0, 0] > 0 else self.head(h)


class DropoutMLP(MLP):
    def __init__(self) -> None:
        super().__init__()
        self.drop = nn.Dropout(0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(torch.tanh(self.body(x))))


class TupleMLP(MLP):
    """MLP returning (logits, features), trained on its logits: `MLP`'s parameters and function."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        h = torch.tanh(self.body(x))
        return self.head(h), h


class DictMLP(MLP):
    """MLP returning {"features", "logits"} (a Hugging Face-style output), trained on its logits."""

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:  # type: ignore[override]
        h = torch.tanh(self.body(x))
        return {"features": h, "logits": self.head(h)}


def tuple_loss(outputs: tuple[torch.Tensor, torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
    """The loop's loss of `TupleMLP`: cross-entropy of its logits, with a term on the features that is zero at
    every parameter value but still part of the graph (a loss that reads more than the logits)."""
    logits, features = outputs
    return F.cross_entropy(logits, targets) + 0.0 * features.sum()


def dict_loss(outputs: dict[str, torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(outputs["logits"], targets)


class ThreeInputMLP(MLP):
    """MLP called as ``model(low, high, sign)``: its input split in two, plus an int64 tensor it requires as such
    (an analysis must not cast it to float, as token ids must not be)."""

    def forward(self, low: torch.Tensor, high: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        if sign.dtype != torch.int64:
            raise TypeError(f"sign must be int64, not {sign.dtype}")
        return super().forward(torch.cat([low, high], 1))


class KeywordMLP(MLP):
    """MLP called with keyword inputs only, ``model(features=x, sign=s)``."""

    def forward(self, *, features: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        if sign.dtype != torch.int64:
            raise TypeError(f"sign must be int64, not {sign.dtype}")
        return super().forward(features)


def three_inputs(config: dict[str, Any], ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`ThreeInputMLP`'s inputs: `inputs` split after its second column, and the sign of the first."""
    x = inputs(config, ids)
    return x[:, :2], x[:, 2:], (x[:, 0] > 0).long()


def keyword_inputs(config: dict[str, Any], ids: np.ndarray) -> dict[str, torch.Tensor]:
    x = inputs(config, ids)
    return {"features": x, "sign": (x[:, 0] > 0).long()}


class BagMLP(MLP):
    """MLP whose first layer is an `nn.EmbeddingBag` summing its rows weighted by the inputs: the function of a
    bias-free linear layer, through an operation torch has a first derivative of but no second (double backward)
    and no forward-mode one."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.EmbeddingBag(D_IN, 10, mode="sum")  # type: ignore[assignment]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = torch.arange(D_IN).expand(len(x), D_IN)
        return self.head(torch.tanh(self.body(rows, per_sample_weights=x)))


class BagTwin(MLP):
    """`BagMLP`'s function and initial values with a bias-free `nn.Linear` in place of the bag (every derivative
    available): the independent reference for what `BagMLP` computes without second derivatives."""

    def __init__(self) -> None:
        super().__init__()
        bag = nn.EmbeddingBag(D_IN, 10, mode="sum")  # drawn as BagMLP draws it
        self.body = nn.Linear(D_IN, 10, bias=False)
        with torch.no_grad():
            self.body.weight.copy_(bag.weight.T)


class _OnceCube(torch.autograd.Function):
    """x³/3 + x with a hand-written backward marked once_differentiable (as some libraries' fused ops are)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return x**3 / 3 + x

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return (x**2 + 1) * grad


class CubeMLP(MLP):
    """MLP with a custom activation whose backward is once_differentiable: torch takes a second derivative through
    it as if it were linear there, without an error."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(_OnceCube.apply(self.body(x)))


class CubeTwin(MLP):
    """`CubeMLP`'s function with plain tensor operations (every derivative exact)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(x)
        return self.head(h**3 / 3 + h)


def dataset() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(N_TRAIN + N_TEST, D_IN, generator=g)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long() + (x[:, 2] > 1).long()
    return x, y


def inputs(config: dict[str, Any], ids: np.ndarray) -> torch.Tensor:
    return dataset()[0][torch.as_tensor(np.asarray(ids, dtype=np.int64))]


def pipeline() -> Pipeline:
    return Pipeline(model_factory=MLP, load_inputs=inputs, head_layer="head", config={})


Hook = Callable[[nn.Module, int], None]


@dataclass
class StageCfg:
    """One stage of a recorded loop."""

    name: str
    optimizer: (
        Callable[[nn.Module], torch.optim.Optimizer] | None
    )  # None: carry the previous stage's optimizer
    scheduler: Callable[[torch.optim.Optimizer, int], Any] | None = None
    epochs: int = 2
    order: str = "step_sched_log"  # step_sched_log | step_log_sched | log_step_sched
    clip: Hook | None = None  # called between backward and optimizer.step() (clipping, or altering grads)
    labels: dict[int, int] = field(default_factory=dict)  # sample id -> the target this stage trains on
    set_to_none: bool = True  # zero_grad(set_to_none=...): False zeroes gradients in place
    reset: Callable[[nn.Module], None] | None = None  # called before the stage starts (e.g. a new head)


def create_run(run_dir: Path, name: str, config: dict[str, Any] | None = None) -> Run:
    """A new run with `dataset()` registered: the first N_TRAIN samples as train, the rest as test; the config
    holds the thread count (replay needs it) and `config`."""
    x, y = dataset()
    run = Run.create(run_dir, name=name, config={"torch_threads": torch.get_num_threads(), **(config or {})})
    run.register_samples(np.arange(N_TRAIN), split="train", labels=y[:N_TRAIN].numpy(), raw=x[:N_TRAIN].numpy())
    test = np.arange(N_TRAIN, N_TRAIN + N_TEST)
    run.register_samples(test, split="test", labels=y[N_TRAIN:].numpy(), raw=x[N_TRAIN:].numpy())
    return run


def validation_loss(
    model: nn.Module, *, train_mode: bool = False, forward: Callable[[nn.Module, torch.Tensor], Any] = nn.Module.__call__
) -> torch.Tensor:
    """The test samples' mean loss, without gradients, in eval mode (or in training mode: a validation written
    without `model.eval()`); the model is left in training mode."""
    x, y = dataset()
    model.train(train_mode)
    with torch.no_grad():
        out = forward(model, x[N_TRAIN:])
        out = out[0] if isinstance(out, tuple) else out["logits"] if isinstance(out, dict) else out  # Tuple/DictMLP
        val = F.cross_entropy(out, y[N_TRAIN:])
    model.train()
    return val


def record(
    run_dir: Path,
    stages: list[StageCfg],
    *,
    batch: int = 8,
    targets: bool = False,
    model_factory: Callable[[], nn.Module] = MLP,
    validate: str | None = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
    config: dict[str, Any] | None = None,
    forward: Callable[[nn.Module, torch.Tensor], Any] = nn.Module.__call__,
) -> nn.Module:
    """Record `stages` with the README loop (no step=, no lr=); returns the trained model.  `forward(model, x)`
    is how the loop calls the model on a batch of `dataset()`'s inputs (``model(x)``).

    With `targets`, every log_batch passes the targets the batch was trained on (`targets=y`).  `validate`
    ("eval" or "train"): a forward pass over the test set after every epoch, in that mode, whose loss is given
    to a checkpoint (a validation written with or without `model.eval()`).
    """
    torch.manual_seed(0)
    x, y = dataset()
    model = model_factory()
    run = create_run(run_dir, "loop", config)
    opt = None
    step = 0
    try:
        for k, cfg in enumerate(stages):
            y_stage = y.clone()
            for sid, label in cfg.labels.items():
                y_stage[sid] = label
            ids = torch.arange(N_TRAIN)
            loader = DataLoader(
                TensorDataset(ids, x[ids], y_stage[ids]),
                batch_size=batch,
                shuffle=True,
                generator=torch.Generator().manual_seed(100 + k),
            )
            if cfg.reset is not None:
                cfg.reset(model)
            if cfg.optimizer is not None:
                opt = cfg.optimizer(model)
            assert opt is not None
            sched = cfg.scheduler(opt, cfg.epochs * len(loader)) if cfg.scheduler else None
            with run.stage(cfg.name, optimizer=opt, scheduler=sched, model=model):
                for epoch in range(cfg.epochs):
                    for b_ids, xb, yb in loader:
                        extra = {"targets": yb} if targets else {}
                        if cfg.order == "log_step_sched":
                            run.log_batch(b_ids, epoch=epoch, **extra)
                        opt.zero_grad(set_to_none=cfg.set_to_none)
                        loss = loss_fn(forward(model, xb), yb)
                        loss.backward()
                        if cfg.clip is not None:
                            cfg.clip(model, step)
                        opt.step()
                        if cfg.order == "step_log_sched":
                            run.log_batch(b_ids, epoch=epoch, loss=loss, **extra)
                        if sched is not None:
                            sched.step()
                        if cfg.order == "step_sched_log":
                            run.log_batch(b_ids, epoch=epoch, loss=loss, **extra)
                        step += 1
                    if validate is not None:
                        run.checkpoint(
                            model, opt, val_loss=validation_loss(model, train_mode=validate == "train", forward=forward)
                        )
    finally:
        run.close()
    return model


# ---------------------------------------------------------------------------------------------- reference replay


def _load_ckpt(run_dir: Path, path: str) -> dict[str, Any]:
    return torch.load(io.BytesIO((run_dir / path).read_bytes()), weights_only=True)


def reference_replay(run_dir: Path) -> dict[str, torch.Tensor]:
    """Replay the recorded run from its tables alone: per step the batch, its targets (recorded, else the
    registered label), every group's applied hyperparameters and the clipping rule, with plain torch."""
    x, _ = dataset()
    con = duckdb.connect(str(run_dir / "snapshot.duckdb"), read_only=True)
    try:
        labels = dict(con.execute("SELECT sample_id, label FROM samples").fetchall())
        stages = con.execute("SELECT stage_id, optimizer FROM stages ORDER BY stage_id").fetchall()
        starts = dict(
            con.execute("SELECT stage_id, path FROM checkpoints WHERE kind = 'stage_start'").fetchall()
        )
        ends = dict(con.execute("SELECT stage_id, path FROM checkpoints WHERE kind = 'stage_end'").fetchall())
        has_target = "target" in {r[0] for r in con.execute("DESCRIBE batch_samples").fetchall()}
        target = "bs.target" if has_target else "NULL"
        rows = con.execute(
            f"""SELECT o.step, o.stage_id, o.hparams, o.clip, list(bs.sample_id ORDER BY bs.position),
                       list({target} ORDER BY bs.position)
                FROM optimizer_steps o JOIN batches b USING (step) JOIN batch_samples bs USING (batch_id)
                GROUP BY ALL ORDER BY o.step"""
        ).fetchall()
    finally:
        con.close()
    model = MLP()
    model.load_state_dict(_load_ckpt(run_dir, starts[stages[0][0]])["model"])
    params = dict(model.named_parameters())
    opt = None
    previous_end: dict[str, torch.Tensor] | None = None
    for stage_id, opt_name in stages:
        payload = _load_ckpt(run_dir, starts[stage_id])
        if previous_end is not None:  # what the loop replaced between the stages (a new head): as recorded
            with torch.no_grad():
                for name, value in payload["model"].items():
                    if not torch.equal(value, previous_end[name]):
                        model.state_dict()[name].copy_(value)
        previous_end = _load_ckpt(run_dir, ends[stage_id])["model"]
        start = payload["optimizer"]
        # a fresh optimizer (no state, or none that has stepped: Adagrad's is built with it), else the same one
        fresh = all("step" in st and float(st["step"]) == 0 for st in start["state"].values())
        if opt is None or fresh:
            # over the parameters the loop's optimizer held, in its groups (all of them in model order, groups
            # of the loop's own order, or a subset)
            held = [{"params": [params[n] for n in group]} for group in payload["optimizer_params"]]
            opt = getattr(torch.optim, opt_name)(held)
            opt.load_state_dict(start)
        frozen = [params[n] for n in payload["frozen"]]  # no gradient in the loop: the optimizer skipped them
        groups: list[dict[str, Any]] = []
        for _, _, hparams, clip, ids, targets in (r for r in rows if r[1] == stage_id):
            delta = json.loads(hparams)
            groups = delta if not groups else [{**g, **d} for g, d in zip(groups, delta, strict=True)]
            for group, hp in zip(opt.param_groups, groups, strict=True):
                group.update({k: tuple(v) if isinstance(v, list) else v for k, v in hp.items()})
            yb = torch.tensor([labels[i] if t is None else t for i, t in zip(ids, targets, strict=True)])
            opt.zero_grad()
            F.cross_entropy(model(x[torch.tensor(ids)]), yb).backward()
            for p in frozen:
                p.grad = None
            rule = json.loads(clip) if clip else None
            if rule and rule["rule"] == "norm":
                torch.nn.utils.clip_grad_norm_(model.parameters(), rule["max_norm"], rule["norm_type"])
            elif rule:
                torch.nn.utils.clip_grad_value_(model.parameters(), rule["clip_value"])
            opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def edit_step_lr(run_dir: Path, step: int, lr: float) -> None:
    """Change the first group's recorded lr of `step` in the snapshot, after the fact (a fact the loop did not
    follow, for replay to find)."""
    with duckdb.connect(str(run_dir / "snapshot.duckdb")) as con:
        (hp,) = con.execute("SELECT hparams FROM optimizer_steps WHERE step = ?", [step]).fetchone()
        groups = json.loads(hp)
        groups[0]["lr"] = lr
        con.execute("UPDATE optimizer_steps SET hparams = ? WHERE step = ?", [json.dumps(groups), step])


def same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# a relabelled run: sample 0 trained on two other targets in turn, sample 5 on one, sample 9 on its own label again
_LABELS = dataset()[1]
RELABEL_B = {0: (int(_LABELS[0]) + 1) % 3, 5: (int(_LABELS[5]) + 1) % 3, 9: int(_LABELS[9])}
RELABEL_C = {0: (int(_LABELS[0]) + 2) % 3}


def record_relabelled(run_dir: Path) -> Path:
    """Three SGD stages, the last two training samples 0, 5 (and 9) on `RELABEL_B` / `RELABEL_C`, targets logged."""
    stages = [
        StageCfg("a", _plain_sgd, None, epochs=1),
        StageCfg("b", _plain_sgd, None, epochs=1, labels=RELABEL_B),
        StageCfg("c", _plain_sgd, None, epochs=1, labels=RELABEL_C),
    ]
    record(run_dir, stages, targets=True)
    return run_dir


def _plain_sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.1)
