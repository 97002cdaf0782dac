"""The `fgtrac` commands that hand evidence to someone outside the run: `head`, `prove`, `check-proof`.

`check-proof` stays light on purpose (ledger code only: no torch, no duckdb), so a third party can check offline.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fgtrac_core._text import echo
from fgtrac_core.errors import FgtracError

EXIT_OK, EXIT_FAILED = 0, 1


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


def _write(text: str, out: str | None, what: str, then: str = "") -> None:
    if out:
        Path(out).write_text(text)
        print(f"wrote {what} to {out}{then}", file=sys.stderr)
    else:
        sys.stdout.write(text)


def pinned_heads(files: Sequence[str]) -> list[tuple[str, Any]]:
    """(name, head) of every `--since` file; one-line error for a file that is not a signed tree head."""
    from fgtrac_core.ledger.pinned import read_pinned_head

    try:
        return [(f"pinned head {Path(f).name}", read_pinned_head(f)) for f in files]
    except ValueError as exc:
        raise FgtracError(str(exc)) from None


def cmd_head(args: argparse.Namespace) -> int:
    from fgtrac_core.store import RunStore

    with RunStore(args.run) as store:
        head = store.latest_tree_head()
    _write(
        json.dumps(head.to_json_dict(), indent=1) + "\n",
        args.out,
        f"the signed tree head of run {head.run_id} (size {head.tree_size}, {head.timestamp})",
        f"; keep it and check later with: fgtrac verify {args.run} --since {args.out}",
    )
    return EXIT_OK


def cmd_prove(args: argparse.Namespace) -> int:
    from fgtrac_core.proofs import build_content_proof, build_usage_proof

    since = [h for _, h in pinned_heads(args.since)]
    if (args.sample is None) == (args.content_sha256 is None):
        raise FgtracError("prove needs exactly one of --sample ID or --content-sha256 HASH")
    if args.sample is not None:
        bundle = build_usage_proof(args.run, args.sample, since=since)
        what = f"usage proof for sample {args.sample} ({len(bundle['entries'])} entries)"
    else:
        bundle = build_content_proof(args.run, args.content_sha256, since=since)
        what = f"content proof for {bundle['content_sha256'][:16]}... ({len(bundle['matches'])} matching samples)"
    _write(json.dumps(bundle, indent=1) + "\n", args.out, what)
    return EXIT_OK


def cmd_check_proof(args: argparse.Namespace) -> int:
    from fgtrac_core.ledger import load_public_key
    from fgtrac_core.ledger.bundle import CONTENT_FORMAT, BundleError, check_bundle, check_content_bundle

    try:
        bundle = json.loads(Path(args.file).read_text())
        key = load_public_key(args.public_key) if args.public_key else None
        check = check_content_bundle if isinstance(bundle, dict) and bundle.get("format") == CONTENT_FORMAT else check_bundle
        result = check(bundle, public_key=key, run_id=args.run_id, since=pinned_heads(args.since))
    except (BundleError, ValueError, OSError) as exc:
        raise FgtracError(f"{args.file}: {exc}") from None
    if args.json:
        _print_json(result.__dict__)
        return EXIT_OK if result.ok else EXIT_FAILED
    pin = "pinned" if result.key_pinned else "NOT pinned: the key inside the bundle was used; pass --public-key"
    subject = f"sample {result.sample_id}" if hasattr(result, "sample_id") else f"content {result.content_sha256}"
    echo(f"run {result.run_id}, {subject}, tree size {result.tree_size}")
    echo(f"signed by {result.key_fingerprint} ({pin})")
    if not result.ok:
        echo(f"INVALID: {result.problem}")
        return EXIT_FAILED
    covers = f"as of ledger entry {result.index_covers}" if result.index_covers is not None else ""
    if hasattr(result, "samples"):
        if result.samples:
            for s in result.samples:
                echo(f"registered as sample {s['sample_id']}, used {s['n_uses']} times ({covers})")
        else:
            echo(f"no sample with this content hash was ever registered in this run ({covers})")
    elif result.registered is False:
        echo(f"sample {result.sample_id} was never registered in this run ({covers})")
    else:
        sample = result.sample or {}
        echo(
            f"registered: split {sample.get('split')}, label {sample.get('label')}, "
            f"content sha256 {sample.get('content_sha256')}"
        )
        targets = {u["target"] for u in result.uses} - {None}
        per_use = len(targets) > 1  # relabelled somewhere: each use with its own target
        steps = ", ".join(
            f"{u['step']} (target {u['target']})" if per_use else str(u["step"]) for u in result.uses
        ) or "none"
        trained = f", trained with target {targets.pop()}" if len(targets) == 1 else ""
        echo(f"used {len(result.uses)} times, at steps {steps}{trained}")
        if result.complete:
            echo(f"the list of uses is complete ({covers}; proven by the committed usage index)")
        else:
            echo("the list of uses is not proven complete (no usage index covers this sample yet)")
    echo("Proof valid")
    return EXIT_OK


def add_parsers(sub: Any, since_arg: Any) -> None:
    """The `head`, `prove` and `check-proof` subcommands."""
    pr = sub.add_parser("prove", help="write a proof bundle: a sample's uses (complete), or a content hash's samples")
    pr.add_argument("run", help="run directory")
    pr.add_argument("--sample", type=int, help="sample id (a never-registered id gets a proof of absence)")
    pr.add_argument("--content-sha256", metavar="HASH", help="SHA-256 of a file: was it registered, and used?")
    pr.add_argument("--out", help="file to write (default: stdout)")
    since_arg(pr, "add the consistency proof from this pinned head (repeatable)")
    pr.set_defaults(func=cmd_prove)

    c = sub.add_parser("check-proof", help="check a proof bundle offline (no database needed)")
    c.add_argument("file", help="bundle written by `fgtrac prove`")
    c.add_argument("--public-key", help="pinned Ed25519 public key file (PEM)")
    c.add_argument("--run-id", help="expected run id")
    c.add_argument("--json", action="store_true", help="machine-readable output")
    since_arg(c)
    c.set_defaults(func=cmd_check_proof)

    h = sub.add_parser("head", help="export the run's latest signed tree head, for a reviewer to keep")
    h.add_argument("run", help="run directory")
    h.add_argument("--out", help="file to write (default: stdout)")
    h.set_defaults(func=cmd_head)
