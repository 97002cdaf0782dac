"""The `fgtrac` command.

Exit codes: 0 success, 1 a check failed, 2 unusable input (one line on stderr, no traceback).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fgtrac_core._cli_args import OneLineParser, check_port_free, device, float_in, host, int_in, port
from fgtrac_core._cli_proofs import add_parsers as add_proof_parsers
from fgtrac_core._text import abbreviate, echo, for_terminal, lr_text, or_dash
from fgtrac_core.errors import FgtracError, RunExistsError, RunNotFoundError

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
DEFAULT_DEMO_DIR = "runs/demo"
# `fgtrac demo --pipeline NAME`: the bundled sample run `sample_runs.NAME` -> its default --out
DEMO_PIPELINES = {"digits": DEFAULT_DEMO_DIR, "tabular": "runs/tabular"}


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


def _cmd_demo(args: argparse.Namespace) -> int:
    import importlib

    from fgtrac_core.store.layout import RunLayout

    pipeline = importlib.import_module(f"sample_runs.{args.pipeline}")  # a DEMO_PIPELINES key (argparse choices)
    out = Path(args.out if args.out is not None else DEMO_PIPELINES[args.pipeline])
    if RunLayout.of(out).holds_run():
        raise RunExistsError(
            f"{out} already holds an fgtrac run; refusing to overwrite it (open it: fgtrac app {out})"
        )
    if not args.no_app:
        check_port_free(args.host, args.port)  # now, not after minutes of building
    t0 = time.perf_counter()
    print(f"building the {args.pipeline} sample run into {out} ...", file=sys.stderr)
    pipeline.build(out, seed=args.seed, progress=sys.stderr.isatty())
    print(
        f"trained and recorded in {time.perf_counter() - t0:.1f} s; computing influence ...", file=sys.stderr
    )
    from fgtrac_core.influence.run_influence import run_influence

    run_influence(out, k=20, progress=sys.stderr.isatty())
    print(
        f"influence stored after {time.perf_counter() - t0:.1f} s; replaying without each stage ...",
        file=sys.stderr,
    )
    _store_stages(out, method="replay")
    print(f"{args.pipeline} sample run built in {time.perf_counter() - t0:.1f} s: {out}", file=sys.stderr)
    if args.no_app:
        return EXIT_OK
    return _serve(out, args.port, args.host)


def _cmd_app(args: argparse.Namespace) -> int:
    return _serve(Path(args.run), args.port, args.host)


def _serve(run_dir: Path, port: int, host: str) -> int:
    from fgtrac_core.store import RunStore

    RunStore(run_dir).close()  # fail fast, in one line, on a missing or unreadable run
    check_port_free(host, port)  # before anything claims to be serving
    script = Path(__file__).resolve().parent.parent / "app" / "main.py"
    if not script.is_file():
        raise RunNotFoundError(f"the dashboard script is missing ({script})")
    env = {**os.environ, "FGTRAC_RUN": str(run_dir.resolve())}
    cmd = [
        sys.executable, "-m", "streamlit", "run", str(script),
        "--server.address", host, "--server.port", str(port), "--server.headless", "true",
        "--browser.gatherUsageStats", "false", "--client.toolbarMode", "viewer",
    ]  # fmt: skip
    print(f"fgtrac dashboard for {run_dir} at http://{host}:{port}", file=sys.stderr)
    sys.stderr.flush()
    sys.stdout.flush()
    # become the Streamlit server (no child process): stopping `fgtrac app` stops the server
    os.execve(sys.executable, cmd, env)


def _cmd_info(args: argparse.Namespace) -> int:
    from fgtrac_core.store import RunStore
    from fgtrac_core.store.reader import IDLE_STAGE_HINT

    with RunStore(args.run) as store:
        summary = store.summary()
    if args.json:
        _print_json(summary)
        return EXIT_OK
    s = summary
    echo(f"run        {s['name']} ({s['run_id']})  schema v{s['schema_version']}")
    echo(f"directory  {s['run_dir']}")
    echo(f"created    {s['created_at']}   closed {s['closed_at'] or '- (not closed)'}")
    if s["snapshot_stale"]:
        echo(
            "warning    the live database is newer than this snapshot (recording, or interrupted: Run.open recovers)"
        )
    echo("samples    " + ", ".join(f"{k} {v}" for k, v in s["samples"].items()))
    echo(f"training   {s['n_steps']} steps, {s['n_batches']} batches, {s['n_sample_uses']} sample uses")
    echo("stages")
    width = max([12, *(len(st["name"]) for st in s["stages"])])  # the columns line up under long stage names
    for st in s["stages"]:
        lr = st["lr_applied"]
        echo(
            f"  {st['name']:<{width}} {st['optimizer']:<8} steps {st['start_step']}..{st['end_step']}"
            f"  ({st['n_steps']} steps, "
            + (f"{st['n_batches']} batches: gradient accumulation, " if st["n_batches"] > st["n_steps"] else "")
            + f"{st['n_sample_uses']} uses)  {st['status']}"
            + (f"  lr {lr[0]:.3g}..{lr[1]:.3g}" if lr else "")
            + ("  forward seeds recorded (dropout, randomness in the model)" if st["forward_seeds"] else "")
            + (f"  on {st['device']}" if st["device"] not in (None, "cpu") else "")
            + (f"  {st['precision']}" if st["autocast"] else "")
        )
    for st in s["stages"]:
        if st["idle"]:
            echo(f"warning    stage {st['name']!r} applied lr 0 at every step: it did not change the parameters ({IDLE_STAGE_HINT})")
    echo("checkpoints")
    width = max([10, *(len(c["stage"] or "-") for c in s["checkpoints"])])
    for c in s["checkpoints"]:
        val = "-" if c["val_loss"] is None else f"{c['val_loss']:.4f}"
        echo(
            f"  #{c['checkpoint_id']:<3} step {c['step']:<6} {c['stage'] or '-':<{width}} {c['kind']:<11} val_loss {val:<8} {c['sha256'][:16]}"
        )
    if s["transforms"]:
        echo("transforms")
        for t in s["transforms"]:
            echo(f"  {t['name']:<12} {abbreviate(t['params'])}  on {t['n_samples']} samples")
    return EXIT_OK


def _cmd_sample(args: argparse.Namespace) -> int:
    from fgtrac_core.store import RunStore

    with RunStore(args.run) as store:
        info = store.sample(args.id)
        usage = store.sample_usage(args.id)
        transforms = store.sample_transforms(args.id)
        relabels = store.sample_relabels(args.id)
    if args.json:
        info["transforms"] = json.loads(transforms.to_json(orient="records", date_format="iso"))
        info["usage"] = json.loads(usage.to_json(orient="records"))
        info["relabelled"] = relabels
        _print_json(info)
        return EXIT_OK
    echo(f"sample {info['sample_id']}  split {info['split']}  label {info['label']}")
    echo(f"content sha256  {info['content_sha256']}")
    echo(f"registered      {info['registered_at']}  from {info['source'] or '-'}")
    shown = info["display"]
    if isinstance(shown, dict):
        echo("features        " + abbreviate(", ".join(f"{k}={v}" for k, v in shown.items())))
    elif shown is not None:
        echo(f"text            {abbreviate(shown)}")
    for key, value in info["annotations"].items():
        echo(f"annotation      {key} = {json.dumps(value)}")
    for t in transforms.itertuples():
        echo(f"transform       {t.name} {abbreviate(json.loads(t.params))}")
    for r in relabels:
        echo(f"relabelled: {r['from']} → {r['to']} from step {r['step']} (stage {r['stage']})")
    if usage.empty:
        echo("never used in training")
    else:
        per_stage = usage.groupby("stage", sort=False).size()
        echo(f"used {len(usage)} times: " + ", ".join(f"{k} x{v}" for k, v in per_stage.items()))
        width = max([10, *(len(str(k)) for k in per_stage.index)])
        for u in usage.itertuples():
            echo(
                f"  step {u.step:<6} epoch {or_dash(u.epoch, '.0f'):<3} {u.stage:<{width}} lr {lr_text(u.lr, u.group_lrs)}  "
                f"batch loss {or_dash(u.loss, '.4f')}"
            )
    return EXIT_OK


def _cmd_verify(args: argparse.Namespace) -> int:
    from fgtrac_core.verify import verify_run

    bar = _progress_bar("verifying")
    try:
        report = verify_run(
            args.run, public_key=args.public_key, since=args.since or (), progress=bar.update if bar else None
        )
    finally:
        if bar:
            bar.close()
    if args.json:
        _print_json(report.to_json())
        return EXIT_OK if report.ok else EXIT_FAILED
    echo(f"run {report.run_id}: {report.n_entries} ledger entries")
    for c in report.checks:
        mark = {True: "ok  ", False: "FAIL", None: "skip"}[c.ok]
        echo(f"  {mark} {c.name:<17} {c.count:>8}  {c.seconds * 1000:8.1f} ms  {c.detail}")
    if report.key_pinned:
        echo(f"public key {report.key_fingerprint} (pinned)")
    else:
        echo(
            f"public key {report.key_fingerprint} (NOT pinned: the run's own key was used; pass --public-key to pin)"
        )
    if report.ok:
        echo("Ledger intact")
        return EXIT_OK
    echo(f"TAMPERED: {report.first_failure}")
    return EXIT_FAILED


class _Bar:
    def __init__(self, desc: str) -> None:
        from tqdm.auto import tqdm

        self._bar = tqdm(
            total=100, desc=desc, file=sys.stderr, leave=False, bar_format="{desc} {bar} {percentage:3.0f}%"
        )

    def update(self, fraction: float, label: str) -> None:
        self._bar.set_description_str(label)
        self._bar.n = round(100 * fraction)
        self._bar.refresh()

    def close(self) -> None:
        self._bar.close()


def _progress_bar(desc: str) -> _Bar | None:
    return _Bar(desc) if sys.stderr.isatty() else None


def _ids(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise FgtracError(f"expected comma-separated integer ids, not {text!r}") from None


def _cmd_influence(args: argparse.Namespace) -> int:
    from fgtrac_core.completeness import require_complete, warn_idle_stages
    from fgtrac_core.influence.run_influence import run_influence
    from fgtrac_core.stages.replay_match import deviation_text

    if not args.allow_incomplete:
        require_complete(args.run, "fgtrac influence")
    warn_idle_stages(args.run)
    rule = args.checkpoints if args.checkpoints in ("auto", "all") else _ids(args.checkpoints)
    summary = run_influence(
        args.run, mode=args.mode, k=args.k, checkpoints=rule, tau=args.tau, test_ids=_ids(args.test_ids),
        include_bias=not args.no_bias, projection_dim=args.projection_dim, seed=args.seed, model=args.model,
        inputs=args.inputs, layer=args.head_layer, loss=args.loss, device=args.device, progress=sys.stderr.isatty(),
        weighting=args.weighting, check=args.check, ray_address=args.ray, budget_s=args.budget, force=args.force,
        on_estimate=lambda cost: print(f"--check {args.check}: {cost.line()}", file=sys.stderr),
        gradients=args.gradients, damping=args.damping, tolerance=args.tolerance,
    )  # fmt: skip
    if args.json:
        _print_json(summary.to_json())
        return EXIT_OK
    s = summary
    echo(
        f"analysis #{s.analysis_id}  {s.method}  top-{s.k} of {s.n_train} training samples for {s.n_test} test examples  ({s.seconds:.1f} s)"
    )
    echo(f"final model: accuracy {s.accuracy:.3f}, {s.n_misclassified} misclassified test examples")
    echo(f"checkpoints ({s.weighting} weighting)" if s.weighting else "checkpoint (influence function: one term)")
    for c in s.checkpoints:
        iv = c.get("interval")
        uses = (
            f"steps {iv['first_step']}-{iv['last_step']} ({iv['n_uses']} uses) " if iv and iv["n_steps"] else
            "no steps " if iv else ""
        )  # fmt: skip
        echo(
            f"  #{c['checkpoint_id']:<3} step {c['step']:<6} {c['stage'] or '-':<10} lr {c['lr']:<10.4g} weight {c['weight']:<10.4g} {uses}{c['reason']}"
        )
    if s.replay_deviation is not None:
        echo(deviation_text(s.replay_tolerance, s.replay_deviation))
    if s.check:
        c = s.check
        echo(
            f"measured on this run: LDS {c['lds']:.3f} ({c['replays']} replays without a random half, "
            f"{c['seconds']:.1f} s; estimated {c['estimated_seconds']:.1f} s)"
        )
    echo("highest self-influence (suspected label errors)")
    for r in s.top_self_influence:
        echo(f"  sample {r['sample_id']:<6} label {r['label']}  {r['self_influence']:.4g}")
    echo(f"stored and committed to the ledger; open it with: fgtrac app {args.run}")
    return EXIT_OK


_INT_COLUMNS = ("test_id", "stage_id", "horizon", "n")


def _arrow(df: Any) -> Any:
    """A result DataFrame as Arrow, integer columns kept integer where pandas made them float for missing values."""
    import pyarrow as pa

    df = df.copy()
    for col in _INT_COLUMNS:
        if col in df:
            df[col] = df[col].astype("Int64")
    return pa.Table.from_pandas(df, preserve_index=False)


def _store_stages(run_dir: str | Path, **options: Any) -> tuple[int, Any]:
    """Run a stage analysis and commit it to the run; (analysis id, StageAnalysis)."""
    from fgtrac_core.stages import analyze
    from fgtrac_core.tracking.run import Run

    result = analyze(run_dir, **options)
    tables = {
        "stage_effects": _arrow(result.effects),
        "stage_aggregates": _arrow(result.aggregates),
        "stage_faithfulness": _arrow(result.faithfulness),
    }
    method = "compare" if options.get("compare") else options.get("method", "replay")
    run = Run.open(run_dir)
    try:
        checkpoints = result.params.get("checkpoints", [])
        aid = run.record_analysis(
            "stages", method, result.params, checkpoints, tables, seconds=result.seconds
        )
    finally:
        run.close()
    return aid, result


def _cmd_stages(args: argparse.Namespace) -> int:
    from fgtrac_core.completeness import require_complete, warn_idle_stages
    from fgtrac_core.pipeline import load_pipeline
    from fgtrac_core.stages.replay_match import deviation_text
    from fgtrac_core.store import RunStore

    if not args.allow_incomplete:
        require_complete(args.run, "fgtrac stages")
    warn_idle_stages(args.run)
    pipeline = None
    if args.model or args.inputs or args.head_layer or args.loss:
        with RunStore(args.run) as store:
            config = store.meta().get("config", "{}")
        pipeline = load_pipeline(
            config, model=args.model, inputs=args.inputs, head_layer=args.head_layer, loss=args.loss
        )
    aid, result = _store_stages(
        args.run, method=args.method, horizon=args.horizon, compare=args.compare,
        behaviours=tuple(b.strip() for b in args.behaviour.split(",") if b.strip()), budget_s=args.budget,
        force=args.force, pipeline=pipeline, tolerance=args.tolerance,
    )  # fmt: skip
    method = "compare" if args.compare else args.method
    with RunStore(args.run) as store:
        names = dict(zip(store.stages().stage_id, store.stages().name, strict=True))
    agg = result.aggregates
    faith = result.faithfulness
    if args.json:
        _print_json(
            {
                "analysis_id": aid,
                "method": method,
                "seconds": round(result.seconds, 3),
                "verified": result.params["verified"],
                "verified_reason": result.params["verified_reason"],
                "replay_tolerance": result.params["replay_tolerance"],
                "replay_deviation": result.params["replay_deviation"],
                "replaced": result.params["replaced"],
                "not_run": result.params["not_run"],
                "aggregates": json.loads(agg.to_json(orient="records")),
                "faithfulness": json.loads(faith.to_json(orient="records")),
            }
        )
        return EXIT_OK
    echo(f"analysis #{aid}  stages/{method}  ({result.seconds:.1f} s)  stored and committed to the ledger")
    if not result.params["verified"]:
        echo(f"UNVERIFIED: {result.params['verified_reason']}")
    if result.params["replay_verified"]:
        echo(deviation_text(result.params["replay_tolerance"], result.params["replay_deviation"]))
    for stage, replaced in result.params["replaced"].items():
        echo(
            f"stage {stage!r} starts from {', '.join(replaced)} as the loop replaced them (a new head?): every "
            f"counterfactual keeps those values, so a stage's effect is what it trained, not what was replaced"
        )
    overall = agg[(agg.slice == "all")]
    echo(
        "effect of each stage on the test set (f(final) - f(without the stage); loss: positive = the stage hurt)"
    )
    for (m, b), rows in overall.groupby(["method", "behaviour"], sort=False):
        bars = "  ".join(
            f"{names.get(int(r.stage_id), r.stage_id)} {r.value:+.4f}" for r in rows.itertuples()
        )
        echo(f"  {m:<22} {b:<9} {bars}")
    if args.compare and not faith.empty:
        echo("faithfulness against replay (pooled over stages; per-stage rows in --json)")
        echo(
            f"  {'method':<22} {'pearson':>8} {'spearman':>9} {'sign':>6} {'top-1':>6} {'agg err':>9} {'seconds':>8}"
        )
        for r in faith[faith.stage_id.isna()].itertuples():
            echo(
                f"  {r.method:<22} {r.pearson:>8.3f} {r.spearman:>9.3f} {r.sign_agreement:>6.2f} "
                f"{r.top1_agreement:>6.2f} {r.aggregate_error:>9.4f} {r.seconds:>8.2f}"
            )
        ref = faith.reference_seconds.dropna()
        if len(ref):
            echo(f"  replay (reference) took {ref.iloc[0]:.2f} s")
    for m, why in result.params["not_run"].items():
        echo(f"  {m}: not run: {why}")
    return EXIT_OK


def _cmd_key_export(args: argparse.Namespace) -> int:
    from fgtrac_core.errors import SigningKeyError
    from fgtrac_core.ledger import KeyFileError, fingerprint, load_or_create_signing_key, public_key_pem

    try:
        key = load_or_create_signing_key(args.key_dir).public_key()
    except KeyFileError as exc:
        raise SigningKeyError(str(exc)) from None
    if args.json:
        _print_json({"fingerprint": fingerprint(key), "public_key_pem": public_key_pem(key).decode()})
    else:
        sys.stdout.write(public_key_pem(key).decode())
        print(f"fingerprint {fingerprint(key)}", file=sys.stderr)
    return EXIT_OK


def _parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="fgtrac", description="Trace, audit and attribute PyTorch training runs.")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser(
        "demo", help="build a bundled sample run (digits CNN or tabular MLP), then open the dashboard"
    )
    d.add_argument(
        "--pipeline",
        choices=list(DEMO_PIPELINES),
        default="digits",
        help="which sample run: digits (images, CNN, three stages) or tabular (breast-cancer table, MLP, two "
        "stages); default digits",
    )
    d.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help="run directory to create (default "
        + ", ".join(f"{d} for {k}" for k, d in DEMO_PIPELINES.items())
        + ")",
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

    v = sub.add_parser(
        "verify", help="recheck the whole ledger: entries, chain, Merkle root, signatures, files"
    )
    v.add_argument("run", help="run directory")
    v.add_argument("--public-key", help="reviewer's pinned Ed25519 public key file (PEM)")
    _since_arg(v)
    v.add_argument("--json", action="store_true", help="machine-readable output")
    v.set_defaults(func=_cmd_verify)

    inf = sub.add_parser(
        "influence",
        help="TracInCP proponents/opponents of every test example and self-influence; stored, committed",
    )
    inf.add_argument("run")
    inf.add_argument(
        "--mode", choices=["last_layer", "full", "adamw", "exact", "adamw_influence", "influence_function"],
        default="last_layer",
        help="last_layer | full | adamw: TracInCP at the chosen checkpoints; exact: every step's own parameters "
        "(replayed); adamw_influence: each use's effect through the optimizer's recorded dynamics to the final "
        "model; influence_function: the head's influence function with its exact Hessian at the final "
        "checkpoint, the most faithful form on the sample run (docs/influence.md)",
    )  # fmt: skip
    inf.add_argument(
        "--damping", type=float_in(0, 1e6, lo_open=True), default=1e-3,
        help="influence_function: added to the Hessian's diagonal (default 1e-3)",
    )  # fmt: skip
    inf.add_argument(
        "--gradients", choices=["last_layer", "full"], default="last_layer",
        help="exact mode: the head's gradients (last_layer, default) or every parameter's through the seeded "
        "random projection of --mode full (--projection-dim, --seed)",
    )  # fmt: skip
    inf.add_argument(
        "--weighting", choices=["usage", "checkpoint"],
        help="checkpoint (default; Captum's convention): one lr per checkpoint; usage: each sample's uses "
        "(Σ lr/|batch|) in the steps a checkpoint stands for (the default and only choice of exact and "
        "adamw_influence). Measured on the sample run, checkpoint weighting was the more faithful (BENCHMARKS.md)",
    )  # fmt: skip
    inf.add_argument(
        "--check", type=int_in(2, 100_000), metavar="K",
        help="also replay the run K times without a random half of the training data and store the LDS; the "
        "replays' cost is estimated first and refused above --budget",
    )  # fmt: skip
    _budget_args(inf, "--check: refuse replays estimated above this many seconds (default 600)")
    _tolerance_arg(inf)
    inf.add_argument("--k", type=int_in(1, 1_000_000), default=50, help="proponents and opponents kept per test example")
    inf.add_argument("--checkpoints", default="auto", help="auto (FG-Trac), all, or comma-separated ids")
    inf.add_argument("--tau", type=float_in(0, 1, hi_open=True), default=0.05, help="auto: relative validation-loss improvement")
    inf.add_argument("--test-ids", help="comma-separated test sample ids (default: every test example)")
    inf.add_argument("--no-bias", action="store_true", help="last_layer: leave out the bias gradient")
    inf.add_argument("--projection-dim", type=int_in(1, 1 << 24), help="full/adamw, exact --gradients full: dimension of the random gradient projection")
    inf.add_argument("--seed", type=int, default=0, help="seed of the random projection")
    _pipeline_args(inf)
    inf.add_argument(
        "--device", type=device,
        help="cpu, cuda or cuda:N (default: cuda when available); exact and adamw_influence replay on the cpu",
    )  # fmt: skip
    inf.add_argument(
        "--ray", nargs="?", const=True, metavar="ADDRESS",
        help="shard over the training set on Ray (same results; needs fgtrac[ray]): the cluster at ADDRESS, or a "
        "local one started for this run; put it after RUN",
    )  # fmt: skip
    inf.add_argument("--json", action="store_true")
    inf.add_argument("--allow-incomplete", action="store_true", help="analyse a run with a failed or unfinished stage")
    inf.set_defaults(func=_cmd_influence)
    st = sub.add_parser(
        "stages", help="per-stage accountability: effect of each training stage on every test example"
    )
    st.add_argument("run")
    st.add_argument("--method", choices=["replay", "fast", "propagated", "partial-replay"], default="replay")
    st.add_argument("--horizon", type=int_in(1, 1 << 40), help="partial-replay: steps replayed exactly after the stage")
    st.add_argument("--compare", action="store_true", help="replay and every estimator, with faithfulness")
    st.add_argument("--behaviour", default="loss", help="comma-separated: loss, margin")
    _budget_args(st, "refuse replay work estimated above this many seconds (default 600)")
    _tolerance_arg(st)
    _pipeline_args(st)
    st.add_argument("--json", action="store_true")
    st.add_argument("--allow-incomplete", action="store_true", help="analyse a run with a failed or unfinished stage")
    st.set_defaults(func=_cmd_stages)
    add_proof_parsers(sub, _since_arg)

    k = sub.add_parser("key", help="signing key management")
    ksub = k.add_subparsers(dest="key_command", required=True)
    ke = ksub.add_parser("export", help="print the public key reviewers should pin")
    ke.add_argument("--key-dir", help="key directory (default $FGTRAC_KEY_DIR or ~/.config/fgtrac)")
    ke.add_argument("--json", action="store_true", help="machine-readable output")
    ke.set_defaults(func=_cmd_key_export)
    return p


def _since_arg(p: argparse.ArgumentParser, help: str | None = None) -> None:
    p.add_argument(
        "--since", action="append", metavar="HEAD", default=[],
        help=help or "a signed tree head kept earlier (`fgtrac head`): fail if the run was truncated or "
        "rewritten since (repeatable)",
    )  # fmt: skip


def _budget_args(p: argparse.ArgumentParser, help: str) -> None:
    """`--budget S` and `--force`: the one cost guard of every command that replays the run (fgtrac_core.budget)."""
    from fgtrac_core.budget import DEFAULT_BUDGET_S

    p.add_argument("--budget", type=float_in(0, math.inf, lo_open=True, hi_open=True), default=DEFAULT_BUDGET_S, help=help)
    p.add_argument("--force", action="store_true", help="run even above the budget")


def _tolerance_arg(p: argparse.ArgumentParser) -> None:
    """`--tolerance RTOL`: how closely every command that replays the run must reproduce it (`replay_match`)."""
    p.add_argument(
        "--tolerance", type=float_in(0, 1, hi_open=True), default=0.0, metavar="RTOL",
        help="accept a replay whose parameters stay within this relative difference of the recorded ones "
        "(default 0: bit for bit; for a pipeline whose kernels round differently from run to run)",
    )  # fmt: skip


def _pipeline_args(p: argparse.ArgumentParser) -> None:
    """The one option set of every command that rebuilds the run's model (see fgtrac_core.pipeline)."""
    g = p.add_argument_group("pipeline (your own run: name the code that rebuilds its model; it is trusted)")
    g.add_argument("--model", metavar="MODULE:NAME", help="class or function building the model with no arguments")
    g.add_argument("--inputs", metavar="MODULE:NAME", help="function(config, sample_ids) -> input tensor")
    g.add_argument("--head-layer", "--layer", dest="head_layer", metavar="NAME", help="the final nn.Linear")
    g.add_argument(
        "--loss", metavar="MODULE:NAME",
        help="function(outputs, targets) -> the loop's batch loss, as the loop computes it (default: mean cross-entropy)",
    )  # fmt: skip


def _serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--port", type=port, default=8501, help="port to serve on (1-65535, default 8501)")
    p.add_argument("--host", type=host, default="127.0.0.1", help="address to bind (default 127.0.0.1, local only)")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except FgtracError as exc:  # messages may quote recorded text: escaped for the terminal
        print(f"fgtrac: error: {for_terminal(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:  # `fgtrac info RUN | head`
        return EXIT_OK
    except OSError as exc:  # unreadable/unwritable paths: still one line, never a traceback
        print(f"fgtrac: error: {for_terminal(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("fgtrac: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
