"""The `fgtrac` command.

Exit codes: 0 success, 1 a check failed, 2 unusable input (one line on stderr, no traceback).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fgtrac_core.errors import FgtracError, RunExistsError, RunNotFoundError
from fgtrac_core.store.layout import RunLayout

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
DEFAULT_DEMO_DIR = "runs/demo"


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


def _cmd_demo(args: argparse.Namespace) -> int:
    from sample_runs import digits

    out = Path(args.out)
    if RunLayout.of(out).holds_run():
        raise RunExistsError(
            f"{out} already holds an fgtrac run; refusing to overwrite it (open it: fgtrac app {out})"
        )
    t0 = time.perf_counter()
    print(f"building the digits sample run into {out} ...", file=sys.stderr)
    digits.build(out, seed=args.seed, progress=sys.stderr.isatty())
    print(f"built in {time.perf_counter() - t0:.1f} s: {out}", file=sys.stderr)
    if args.no_app:
        return EXIT_OK
    return _serve(out, args.port, args.host)


def _cmd_app(args: argparse.Namespace) -> int:
    return _serve(Path(args.run), args.port, args.host)


def _serve(run_dir: Path, port: int, host: str) -> int:
    from fgtrac_core.store import RunStore

    RunStore(run_dir).close()  # fail fast, in one line, on a missing or unreadable run
    script = Path(__file__).resolve().parent.parent / "app" / "main.py"
    if not script.is_file():
        raise RunNotFoundError(f"the dashboard script is missing ({script})")
    env = {**os.environ, "FGTRAC_RUN": str(run_dir.resolve())}
    cmd = [
        sys.executable, "-m", "streamlit", "run", str(script),
        "--server.address", host, "--server.port", str(port), "--server.headless", "true",
        "--browser.gatherUsageStats", "false",
    ]  # fmt: skip
    print(f"fgtrac dashboard for {run_dir} at http://{host}:{port}", file=sys.stderr)
    try:
        return subprocess.call(cmd, env=env)
    except KeyboardInterrupt:
        return EXIT_OK


def _cmd_info(args: argparse.Namespace) -> int:
    from fgtrac_core.store import RunStore

    with RunStore(args.run) as store:
        summary = store.summary()
    if args.json:
        _print_json(summary)
        return EXIT_OK
    s = summary
    print(f"run        {s['name']} ({s['run_id']})  schema v{s['schema_version']}")
    print(f"directory  {s['run_dir']}")
    print(f"created    {s['created_at']}   closed {s['closed_at'] or '- (not closed)'}")
    if s["snapshot_stale"]:
        print(
            "warning    the live database is newer than this snapshot (recording, or interrupted: Run.open recovers)"
        )
    print("samples    " + ", ".join(f"{k} {v}" for k, v in s["samples"].items()))
    print(f"training   {s['n_steps']} steps, {s['n_batches']} batches, {s['n_sample_uses']} sample uses")
    print("stages")
    for st in s["stages"]:
        print(
            f"  {st['name']:<12} {st['optimizer']:<8} steps {st['start_step']}..{st['end_step']}"
            f"  ({st['n_steps']} steps, {st['n_sample_uses']} uses)  {st['status']}"
        )
    print("checkpoints")
    for c in s["checkpoints"]:
        val = "-" if c["val_loss"] is None else f"{c['val_loss']:.4f}"
        print(
            f"  #{c['checkpoint_id']:<3} step {c['step']:<6} {c['stage'] or '-':<10} {c['kind']:<11} val_loss {val:<8} {c['sha256'][:16]}"
        )
    if s["transforms"]:
        print("transforms")
        for t in s["transforms"]:
            print(f"  {t['name']:<12} {json.dumps(t['params'])}  on {t['n_samples']} samples")
    return EXIT_OK


def _cmd_sample(args: argparse.Namespace) -> int:
    from fgtrac_core.store import RunStore

    with RunStore(args.run) as store:
        info = store.sample(args.id)
        usage = store.sample_usage(args.id)
        transforms = store.sample_transforms(args.id)
    if args.json:
        info["transforms"] = json.loads(transforms.to_json(orient="records", date_format="iso"))
        info["usage"] = json.loads(usage.to_json(orient="records"))
        _print_json(info)
        return EXIT_OK
    print(f"sample {info['sample_id']}  split {info['split']}  label {info['label']}")
    print(f"content sha256  {info['content_sha256']}")
    print(f"registered      {info['registered_at']}  from {info['source'] or '-'}")
    for t in transforms.itertuples():
        print(f"transform       {t.name} {t.params}")
    if usage.empty:
        print("never used in training")
    else:
        per_stage = usage.groupby("stage", sort=False).size()
        print(f"used {len(usage)} times: " + ", ".join(f"{k} x{v}" for k, v in per_stage.items()))
        for u in usage.itertuples():
            print(
                f"  step {u.step:<6} epoch {u.epoch:<3} {u.stage:<10} lr {u.lr:.3g}  batch loss {u.loss:.4f}"
            )
    return EXIT_OK


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fgtrac", description="Trace, audit and attribute PyTorch training runs."
    )
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="build the bundled digits sample run, then open the dashboard")
    d.add_argument(
        "--out", default=DEFAULT_DEMO_DIR, help=f"run directory to create (default {DEFAULT_DEMO_DIR})"
    )
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--no-app", action="store_true", help="build only; do not start the dashboard")
    _serve_args(d)
    d.set_defaults(func=_cmd_demo)

    a = sub.add_parser("app", help="serve the dashboard for a run")
    a.add_argument("run", help="run directory")
    _serve_args(a)
    a.set_defaults(func=_cmd_app)

    i = sub.add_parser("info", help="summarise a run: samples, stages, steps, checkpoints")
    i.add_argument("run", help="run directory")
    i.add_argument("--json", action="store_true", help="machine-readable output")
    i.set_defaults(func=_cmd_info)

    s = sub.add_parser("sample", help="a sample's lifecycle: hash, preprocessing, every use in training")
    s.add_argument("run", help="run directory")
    s.add_argument("id", type=int, help="sample id")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=_cmd_sample)
    return p


def _serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--port", type=int, default=8501)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, local only)")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except FgtracError as exc:
        print(f"fgtrac: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:  # `fgtrac info RUN | head`
        return EXIT_OK
    except OSError as exc:  # unreadable/unwritable paths: still one line, never a traceback
        print(f"fgtrac: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("fgtrac: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
