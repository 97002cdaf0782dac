"""A tiny recorded run for influence tests: two stages on overlapping subsets (SGD with a decaying rate, then
AdamW), uneven batches, periodic checkpoints; optionally gradient accumulation (two logged batches per step).

The pipeline is importable (`tests.influence._tiny:MLP`, `tests.influence._tiny:inputs`) so `run_influence` and
the replay can rebuild it.  Independent references (hand counts of uses, autograd gradients) live here too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fgtrac_core.pipeline import Pipeline
from fgtrac_core.tracking import Run

N_TRAIN, N_TEST, D_IN, N_CLASSES = 24, 6, 5, 3
ONLY_A = list(range(0, 10))  # used only in stage "a"
ONLY_B = list(range(10, 18))  # used only in stage "b"
BOTH = list(range(18, 24))
MODEL, INPUTS = "tests.influence._tiny:MLP", "tests.influence._tiny:inputs"


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(D_IN, 7)
        self.head = nn.Linear(7, N_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.body(x)))


def dataset() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(N_TRAIN + N_TEST, D_IN, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return x, y


def inputs(config: dict[str, Any], ids: np.ndarray) -> torch.Tensor:
    return dataset()[0][torch.as_tensor(np.asarray(ids, dtype=np.int64))]


def pipeline() -> Pipeline:
    return Pipeline(model_factory=MLP, load_inputs=inputs, head_layer="head", config={})


def record(
    run_dir: Path,
    *,
    accumulate: bool = False,
    steps_a: int | None = None,
    stages: tuple[str, ...] = ("a", "b"),
    relabel: tuple[int, ...] = (),
) -> None:
    """Stage "a": SGD (lr 0.3 decaying ×0.8 per step) on ONLY_A + BOTH in batches of 5 (the last one smaller);
    stage "b": AdamW (lr 0.02) on ONLY_B + BOTH in batches of 4; a periodic checkpoint with a validation loss
    every 2 steps.  With `accumulate`, stage "a" logs two micro-batches per optimizer step (sizes 5 and 3).
    `steps_a` stops stage "a" early and `stages` leaves stages out (a short toy).  The samples in `relabel` are
    trained in stage "b" on target (label + 1) mod 3, logged with `targets=` (every batch of "b" logs its
    targets, the others unchanged)."""
    torch.manual_seed(0)
    x, y = dataset()
    model = MLP()
    run = Run.create(run_dir, name="tiny", config={"torch_threads": torch.get_num_threads()})
    run.register_samples(np.arange(N_TRAIN), split="train", labels=y[:N_TRAIN].numpy(), raw=x[:N_TRAIN].numpy())
    test = np.arange(N_TRAIN, N_TRAIN + N_TEST)
    run.register_samples(test, split="test", labels=y[N_TRAIN:].numpy(), raw=x[N_TRAIN:].numpy())
    x_val, y_val = x[N_TRAIN:], y[N_TRAIN:]
    rng = np.random.default_rng(0)
    try:
        plans = [
            ("a", torch.optim.SGD(model.parameters(), lr=0.3), np.array(ONLY_A + BOTH), 5, 2),
            ("b", None, np.array(ONLY_B + BOTH), 4, 2),
        ]
        for name, opt, subset, size, epochs in (p for p in plans if p[0] in stages):
            if opt is None:
                opt = torch.optim.AdamW(model.parameters(), lr=0.02, weight_decay=0.01)
            sched = torch.optim.lr_scheduler.ExponentialLR(opt, 0.8) if name == "a" else None
            n_steps = 0
            with run.stage(name, optimizer=opt, scheduler=sched, model=model):
                for epoch in range(epochs):
                    order = rng.permutation(subset)
                    chunks = (
                        [order[i : i + 8] for i in range(0, len(order), 8)]
                        if accumulate and name == "a"
                        else [order[i : i + size] for i in range(0, len(order), size)]
                    )
                    for ids in chunks:
                        if name == "a" and steps_a is not None and n_steps >= steps_a:
                            break
                        opt.zero_grad()
                        parts = [ids[:5], ids[5:]] if accumulate and name == "a" and len(ids) > 5 else [ids]
                        for part in parts:
                            t = torch.as_tensor(part)
                            target = y[t]
                            if name == "b" and relabel:
                                moved = torch.as_tensor(np.isin(part, relabel))
                                target = torch.where(moved, (target + 1) % N_CLASSES, target)
                            loss = F.cross_entropy(model(x[t]), target) * len(part) / len(ids)
                            loss.backward()
                            run.log_batch(part, epoch=epoch, targets=target if relabel and name == "b" else None)
                        opt.step()
                        if sched is not None:
                            sched.step()
                        n_steps += 1
                        if n_steps % 2 == 0:
                            with torch.no_grad():
                                val = float(F.cross_entropy(model(x_val), y_val))
                            run.checkpoint(model, opt, val_loss=val, epoch=epoch)
    finally:
        run.close()


def hand_usage(run_dir: Path, checkpoint_ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """(W, uses) for training rows 0..N_TRAIN-1 by a plain loop over the recorded rows, with the documented
    interval rule written out step by step: a step t of stage s goes to the first chosen checkpoint of s whose
    step is > t, else to s's last chosen checkpoint; weight per use lr_t / (samples of all batches of step t)."""
    con = duckdb.connect(str(run_dir / "snapshot.duckdb"), read_only=True)
    try:
        ck = {
            cid: (step, stage)
            for cid, step, stage in con.execute("SELECT checkpoint_id, step, stage_id FROM checkpoints").fetchall()
        }
        batches = con.execute("SELECT batch_id, step, stage_id, lr, n_samples FROM batches").fetchall()
        members = con.execute("SELECT batch_id, sample_id FROM batch_samples").fetchall()
    finally:
        con.close()
    size: dict[int, int] = {}
    for _, step, _, lr, n in batches:
        if lr is not None:
            size[step] = size.get(step, 0) + n
    info = {b: (step, stage, lr) for b, step, stage, lr, _ in batches}
    w = np.zeros((N_TRAIN, len(checkpoint_ids)))
    uses = np.zeros((N_TRAIN, len(checkpoint_ids)), np.int64)
    for b, sample in members:
        step, stage, lr = info[b]
        if lr is None:
            continue
        mine = [(i, ck[c][0]) for i, c in enumerate(checkpoint_ids) if ck[c][1] == stage]
        if not mine:
            continue
        later = [i for i, s in mine if s > step]
        col = later[0] if later else mine[-1][0]
        w[sample, col] += lr / size[step]
        uses[sample, col] += 1
    return w, uses


def grad_vector(model: nn.Module, x: torch.Tensor, y: torch.Tensor, names: list[str] | None = None) -> torch.Tensor:
    """∇ of one sample's cross-entropy w.r.t. the named parameters (all by default), by autograd, flattened."""
    params = [p for n, p in model.named_parameters() if names is None or n in names]
    loss = F.cross_entropy(model(x[None]), y[None])
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]).double()


def hand_exact(run_dir: Path, *, bias: bool = True, full: bool = False) -> torch.Tensor:
    """Step-exact TracIn by hand: replay the recorded steps with plain torch (the optimizers `record` built), and
    at each step add η_t/|B_t| ∇_head ℓ(test, θ_t)·∇_head ℓ(z, θ_t) for every z of the batch (autograd); with
    `full`, the gradients of all parameters instead of the head's."""
    x, y = dataset()
    con = duckdb.connect(str(run_dir / "snapshot.duckdb"), read_only=True)
    try:
        start = con.execute(
            "SELECT path FROM checkpoints WHERE kind = 'stage_start' ORDER BY checkpoint_id LIMIT 1"
        ).fetchone()[0]
        rows = con.execute(
            """SELECT b.step, s.name, b.lr, list(bs.sample_id ORDER BY bs.position)
               FROM batches b JOIN stages s USING (stage_id) JOIN batch_samples bs USING (batch_id)
               GROUP BY ALL ORDER BY b.step"""
        ).fetchall()
    finally:
        con.close()
    model = MLP()
    model.load_state_dict(torch.load(run_dir / start, weights_only=True)["model"])
    names = None if full else ["head.weight", "head.bias"] if bias else ["head.weight"]
    scores = torch.zeros(N_TEST, N_TRAIN, dtype=torch.float64)
    opts: dict[str, torch.optim.Optimizer] = {}
    for _, stage, lr, ids in rows:
        if stage not in opts:
            opts[stage] = (
                torch.optim.SGD(model.parameters(), lr=lr)
                if stage == "a"
                else torch.optim.AdamW(model.parameters(), lr=0.02, weight_decay=0.01)
            )
        opt = opts[stage]
        g_test = torch.stack([grad_vector(model, x[N_TRAIN + i], y[N_TRAIN + i], names) for i in range(N_TEST)])
        for z in ids:
            scores[:, z] += lr / len(ids) * (g_test @ grad_vector(model, x[z], y[z], names))
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad()
        t = torch.as_tensor(ids)
        F.cross_entropy(model(x[t]), y[t]).backward()
        opt.step()
    return scores


def hand_losses_without(run_dir: Path, dropped: set[int]) -> np.ndarray:
    """Final test losses of the run retrained by hand (plain torch, the optimizers `record` built, the recorded
    batch order and rates) with the samples `dropped` left out of every batch; a batch left empty still steps,
    with zero gradients."""
    x, y = dataset()
    con = duckdb.connect(str(run_dir / "snapshot.duckdb"), read_only=True)
    try:
        start = con.execute(
            "SELECT path FROM checkpoints WHERE kind = 'stage_start' ORDER BY checkpoint_id LIMIT 1"
        ).fetchone()[0]
        rows = con.execute(
            """SELECT b.step, s.name, b.lr, list(bs.sample_id ORDER BY bs.position)
               FROM batches b JOIN stages s USING (stage_id) JOIN batch_samples bs USING (batch_id)
               GROUP BY ALL ORDER BY b.step"""
        ).fetchall()
    finally:
        con.close()
    model = MLP()
    model.load_state_dict(torch.load(run_dir / start, weights_only=True)["model"])
    opts: dict[str, torch.optim.Optimizer] = {}
    for _, stage, lr, ids in rows:
        if stage not in opts:
            opts[stage] = (
                torch.optim.SGD(model.parameters(), lr=lr)
                if stage == "a"
                else torch.optim.AdamW(model.parameters(), lr=0.02, weight_decay=0.01)
            )
        opt = opts[stage]
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad()
        kept = [i for i in ids if i not in dropped]
        if kept:
            t = torch.as_tensor(kept)
            F.cross_entropy(model(x[t]), y[t]).backward()
        else:
            for p in model.parameters():
                p.grad = torch.zeros_like(p)
        opt.step()
    with torch.no_grad():
        out = model(x[N_TRAIN:])
    return F.cross_entropy(out, y[N_TRAIN:], reduction="none").double().numpy()
