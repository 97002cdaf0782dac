"""Offline checking of a usage-proof bundle (`fgtrac prove` writes it, `fgtrac check-proof` checks it).

Pure Python + cryptography: no database, no torch.  A bundle holds one sample's lifecycle entries (registration,
annotations, preprocessing, the batches that used it), each with its RFC 9162 inclusion proof against one
Ed25519-signed tree head; batch and transform entries add the sample id's inclusion in the entry's id set.
A bundle proves that every use it lists happened; it cannot prove that no use was left out (that would need a
committed per-sample index).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from .encoding import decode_entry
from .entries import id_leaf
from .merkle import leaf_hash, verify_inclusion, verify_inclusion_leaf_hash
from .pinned import pinned_head_problem
from .signing import SignedTreeHead, fingerprint, load_public_key, verify_tree_head

BUNDLE_FORMAT = "fgtrac-usage-proof/1"


class BundleError(ValueError):
    """The bundle cannot be checked at all (malformed, another run, wrong key): unusable input."""


@dataclass
class BundleResult:
    """Outcome of checking a bundle: ok, what it proves, and the first problem found."""

    ok: bool
    run_id: str
    sample_id: int
    tree_size: int
    key_fingerprint: str
    key_pinned: bool
    n_entries: int
    uses: list[dict[str, Any]] = field(default_factory=list)
    sample: dict[str, Any] | None = None
    problem: str | None = None


def _hexes(value: Any, what: str) -> list[bytes]:
    if not isinstance(value, list):
        raise BundleError(f"{what} must be a list of hex strings")
    try:
        out = [bytes.fromhex(h) for h in value]
    except (TypeError, ValueError):
        raise BundleError(f"{what} holds something that is not hex") from None
    if any(len(h) != 32 for h in out):
        raise BundleError(f"{what} holds a hash that is not 32 bytes")
    return out


def check_bundle(
    bundle: Mapping[str, Any],
    *,
    public_key: Ed25519PublicKey | None = None,
    run_id: str | None = None,
    since: Sequence[tuple[str, SignedTreeHead]] = (),
) -> BundleResult:
    """Check every signature and inclusion proof in a bundle, and that its head extends every pinned head in
    `since` ((name, head) pairs) through the consistency proofs the bundle carries (RFC 9162).

    Raises BundleError for unusable input (wrong format, a bundle for another run than `run_id`, a head signed by
    another key than the pinned `public_key`); returns a result with ok=False when a proof does not verify.
    """
    if not isinstance(bundle, Mapping) or bundle.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"not an fgtrac usage proof (format must be {BUNDLE_FORMAT!r})")
    try:
        sth = SignedTreeHead.from_json_dict(bundle["tree_head"])
        sample_id = int(bundle["sample_id"])
        entries = bundle["entries"]
        if not isinstance(entries, list):
            raise TypeError("entries must be a list")
    except (KeyError, TypeError, ValueError) as exc:
        raise BundleError(f"malformed proof bundle ({exc})") from None
    if bundle.get("run_id") != sth.run_id:
        raise BundleError(f"bundle says run {bundle.get('run_id')} but its tree head is for run {sth.run_id}")
    if run_id is not None and sth.run_id != run_id:
        raise BundleError(f"this proof is for run {sth.run_id}, not {run_id}")
    pinned = public_key is not None
    if public_key is None:
        try:
            public_key = load_public_key(str(bundle["public_key"]).encode())
        except (KeyError, ValueError) as exc:
            raise BundleError(f"bundle carries no usable public key ({exc}); pass --public-key") from None
    elif fingerprint(public_key) != sth.key_fingerprint:
        raise BundleError(
            f"the tree head is signed by key {sth.key_fingerprint}, not the pinned {fingerprint(public_key)}"
        )
    result = BundleResult(
        True, sth.run_id, sample_id, sth.tree_size, sth.key_fingerprint, pinned, len(entries)
    )

    def bad(msg: str) -> BundleResult:
        result.ok, result.problem = False, msg
        return result

    if not verify_tree_head(sth, public_key):
        return bad("the tree head's signature does not verify")
    proofs = {}
    for item in bundle.get("consistency", []) or []:
        try:
            proofs[int(item["tree_size"])] = _hexes(item["proof"], "consistency proof")
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"malformed consistency proof in bundle ({exc})") from None
    for name, head in since:
        if 0 < head.tree_size <= sth.tree_size and head.tree_size not in proofs:
            raise BundleError(
                f"the bundle carries no consistency proof from {name} (size {head.tree_size}); "
                "make it with `fgtrac prove ... --since` that head"
            )
        problem = pinned_head_problem(
            head, public_key, run_id=sth.run_id, tree_size=sth.tree_size, root=sth.root,
            proof=proofs.get(head.tree_size, []), name=name,
        )  # fmt: skip
        if problem is not None:
            return bad(problem)
    seen: set[int] = set()
    for item in entries:
        try:
            seq = int(item["seq"])
            raw = bytes.fromhex(item["entry"])
            proof = _hexes(item["inclusion"], f"inclusion proof of entry #{seq}")
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"malformed entry in bundle ({exc})") from None
        if seq in seen:
            return bad(f"entry #{seq} is listed twice")
        seen.add(seq)
        if not verify_inclusion(raw, seq, sth.tree_size, proof, sth.root):
            return bad(f"entry #{seq} is not included in the signed tree (inclusion proof fails)")
        try:
            kind, body = decode_entry(raw)
        except ValueError as exc:
            return bad(f"entry #{seq} is not a canonical entry ({exc})")
        if kind in ("sample", "annotation"):
            if body.get("sample_id") != sample_id:
                return bad(f"entry #{seq} is about sample {body.get('sample_id')}, not {sample_id}")
            if kind == "sample":
                result.sample = body
        elif kind in ("batch", "transform"):
            member = item.get("member") or {}
            try:
                index, member_proof = (
                    int(member["index"]),
                    _hexes(member["inclusion"], f"id proof of entry #{seq}"),
                )
                root = bytes.fromhex(body["samples_root"])
            except (KeyError, TypeError, ValueError) as exc:
                raise BundleError(f"malformed id-set proof for entry #{seq} ({exc})") from None
            ok = verify_inclusion_leaf_hash(
                leaf_hash(id_leaf(sample_id)), index, int(body["n_samples"]), member_proof, root
            )
            if not ok:
                return bad(f"sample {sample_id} is not in the id set of entry #{seq} ({kind})")
            if kind == "batch":
                result.uses.append(
                    {"step": body["step"], "epoch": body["epoch"], "stage_id": body["stage_id"], "position": index,
                     "batch_id": body["batch_id"], "lr": body["lr"]}
                )  # fmt: skip
        else:
            return bad(f"entry #{seq} has kind {kind!r}, which says nothing about a sample")
    if result.sample is None:
        return bad("the bundle holds no registration entry for the sample")
    return result
