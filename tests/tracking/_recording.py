"""A small, deterministic recording for the crash and concurrency tests: `python -m tests.tracking._recording RUN`.

A tiny MLP on synthetic data, recorded through the public recorder API only (Run.create, register_samples,
stage, log_batch, checkpoint, close): samples registered in chunks, two stages (SGD, then AdamW), a checkpoint
every `--every` steps, then close.  The process prints one marker line per phase, flushed, so that a parent can
kill it at a chosen moment and know what it was doing:

    ready                         imports done; with --wait-go, waits for a line on stdin before starting
    <phase> <seconds> <n_logged>  phase in create, register, stage, checkpoint, resume, stage_end, close, closed
    loop <seconds>                wall time of the two stages' loops (first stage entry to last stage exit)
    loop_cpu <seconds>            CPU time of the training thread over the same span

<seconds> counts from the start of Run.create; <n_logged> is the number of log_batch calls made so far.
Which samples each batch holds is a function of the seed alone (`batch_plan`), so a parent can check that
the recorded batches are a prefix of what the script logs.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

N_TRAIN = 512
N_FEATURES = 16
N_CLASSES = 4
BATCH = 16
REGISTER_CHUNKS = 4
STAGES = ("pretrain", "finetune")
PHASES = ("create", "register", "stage", "checkpoint", "resume", "stage_end", "close", "closed")


def batch_plan(seed: int, steps_per_stage: int) -> list[tuple[int, int, np.ndarray]]:
    """(stage index, epoch, sample ids) of every batch the script logs, in order."""
    rng = np.random.default_rng(seed + 1)
    plan: list[tuple[int, int, np.ndarray]] = []
    per_epoch = N_TRAIN // BATCH
    for s in range(len(STAGES)):
        order = rng.permutation(N_TRAIN)
        for k in range(steps_per_stage):
            if k % per_epoch == 0 and k:
                order = rng.permutation(N_TRAIN)
            j = k % per_epoch
            plan.append((s, k // per_epoch, order[j * BATCH : (j + 1) * BATCH].astype(np.int64)))
    return plan


def data(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic features (float32) and labels of the N_TRAIN samples."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(N_TRAIN, N_FEATURES)).astype(np.float32)
    w = rng.normal(size=(N_FEATURES, N_CLASSES))
    return x, (x @ w).argmax(1).astype(np.int64)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.tracking._recording")
    p.add_argument("run_dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=150, help="optimizer steps per stage")
    p.add_argument("--every", type=int, default=50, help="a checkpoint every this many steps")
    p.add_argument("--wait-go", action="store_true", help="after imports, wait for a line on stdin")
    args = p.parse_args(argv)

    import torch
    from torch import nn

    from fgtrac_core import Run

    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    x_np, y_np = data(args.seed)
    plan = batch_plan(args.seed, args.steps)
    x, y = torch.from_numpy(x_np), torch.from_numpy(y_np)
    model = nn.Sequential(nn.Linear(N_FEATURES, 32), nn.ReLU(), nn.Linear(32, N_CLASSES))
    # built before "ready": the first optimizer imports torch._dynamo, seconds on a loaded machine
    optimizers = (
        torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
        torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01),
    )
    print("ready", flush=True)
    if args.wait_go:
        sys.stdin.readline()

    t0 = time.perf_counter()
    logged = 0

    def mark(phase: str) -> None:
        print(f"{phase} {time.perf_counter() - t0:.4f} {logged}", flush=True)

    mark("create")
    run = Run.create(args.run_dir, name="campaign", config={"seed": args.seed, "steps": args.steps})
    mark("register")
    ids = np.arange(N_TRAIN, dtype=np.int64)
    thumbs = ((x_np[:, :16].reshape(-1, 4, 4) + 4) * 32).clip(0, 255).astype(np.uint8)
    for chunk in np.array_split(ids, REGISTER_CHUNKS):
        run.register_samples(
            chunk, split="train", labels=y_np[chunk], raw=x_np[chunk], thumbnails=thumbs[chunk]
        )
    loop_start, loop_cpu = time.perf_counter(), time.thread_time()
    i = 0
    for s, name in enumerate(STAGES):
        opt = optimizers[s]
        with run.stage(name, optimizer=opt, model=model):
            mark("stage")
            for k in range(args.steps):
                stage_idx, epoch, batch_ids = plan[i]
                assert stage_idx == s
                t = torch.from_numpy(batch_ids)
                opt.zero_grad()
                loss = nn.functional.cross_entropy(model(x[t]), y[t])
                loss.backward()
                opt.step()
                run.log_batch(batch_ids, epoch=epoch, loss=loss, targets=y_np[batch_ids])
                logged += 1
                i += 1
                if (k + 1) % args.every == 0 and k + 1 < args.steps:
                    mark("checkpoint")
                    run.checkpoint(model, opt, val_loss=float(loss.detach()))
                    mark("resume")
            mark("stage_end")
    loop, loop_cpu = time.perf_counter() - loop_start, time.thread_time() - loop_cpu
    mark("close")
    run.close()
    mark("closed")
    print(f"loop {loop:.4f}", flush=True)
    print(f"loop_cpu {loop_cpu:.4f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
