"""Offline checking of a usage-proof bundle (`fgtrac prove` writes it, `fgtrac check-proof` checks it).

Pure Python + cryptography: no database, no torch.  A bundle holds one sample's lifecycle entries (registration,
annotations, preprocessing, the batches that used it), each with its RFC 9162 inclusion proof against one
Ed25519-signed tree head; batch and transform entries add the sample's inclusion in the entry's id set (for a
batch, with the target it was trained on).  A bundle proves that every use it lists happened.  With an ``index`` section (runs recorded with a usage index,
`fgtrac_core.ledger.usage_index`) it also proves that the list is complete — the sample's leaf in the committed
index holds exactly these uses — or, for an id the run never registered, that no leaf exists for it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from .encoding import decode_entry
from .entries import member_leaf
from .merkle import leaf_hash, verify_inclusion, verify_inclusion_leaf_hash
from .pinned import pinned_head_problem
from .signing import SignedTreeHead, fingerprint, load_public_key, verify_tree_head
from .usage_index import check_absent, content_key, parse_content_leaf, parse_usage_leaf, usage_key, uses_hash

BUNDLE_FORMAT = "fgtrac-usage-proof/2"
CONTENT_FORMAT = "fgtrac-content-proof/1"


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
    #: with a usage index: True when the listed uses are proven to be all (as of entry `index_covers`); the
    #: sample's registration is proven (True) or its absence from the run is (False); None without an index
    complete: bool | None = None
    registered: bool | None = None
    index_covers: int | None = None


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
        sample_id = int(bundle["sample_id"])
        entries = bundle["entries"]
        if not isinstance(entries, list):
            raise TypeError("entries must be a list")
    except (KeyError, TypeError, ValueError) as exc:
        raise BundleError(f"malformed proof bundle ({exc})") from None
    sth, public_key, pinned = _head_and_key(bundle, public_key, run_id)
    result = BundleResult(
        True, sth.run_id, sample_id, sth.tree_size, sth.key_fingerprint, pinned, len(entries)
    )

    def bad(msg: str) -> BundleResult:
        result.ok, result.problem = False, msg
        return result

    problem = _head_problem(bundle, sth, public_key, since)
    if problem is not None:
        return bad(problem)
    seen: set[int] = set()
    used_at: set[tuple[int, int]] = set()
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
            # a sample may occur more than once in a batch: one membership proof per occurrence
            members = [item.get("member") or {}, *(item.get("more_members") or [])]
            for member in members:
                try:
                    index, member_proof = (
                        int(member["index"]),
                        _hexes(member["inclusion"], f"id proof of entry #{seq}"),
                    )
                    target = member.get("target") if kind == "batch" else None
                    if target is not None and (isinstance(target, bool) or not isinstance(target, int)):
                        raise TypeError(f"target {target!r} is not an integer")
                    root = bytes.fromhex(body["samples_root"])
                except (KeyError, TypeError, ValueError) as exc:
                    raise BundleError(f"malformed id-set proof for entry #{seq} ({exc})") from None
                ok = verify_inclusion_leaf_hash(
                    leaf_hash(member_leaf(sample_id, target)), index, int(body["n_samples"]), member_proof, root
                )
                if not ok:
                    what = "" if target is None else f" with target {target}"
                    return bad(f"sample {sample_id}{what} is not in the id set of entry #{seq} ({kind})")
                if kind == "batch":
                    if (seq, index) in used_at:
                        return bad(f"position {index} of entry #{seq} is listed twice")
                    used_at.add((seq, index))
                    result.uses.append(
                        {"step": body["step"], "epoch": body["epoch"], "stage_id": body["stage_id"], "position": index,
                         "target": target, "batch_id": body["batch_id"], "lr": body["lr"], "seq": seq}
                    )  # fmt: skip
        else:
            return bad(f"entry #{seq} has kind {kind!r}, which says nothing about a sample")
    if "index" in bundle:
        problem = _check_index(bundle["index"], sth, sample_id, used_at, result)
        if problem is not None:
            return bad(problem)
    if result.sample is None and result.registered is not False:
        return bad("the bundle holds no registration entry for the sample")
    return result


def _head_and_key(
    bundle: Mapping[str, Any], public_key: Ed25519PublicKey | None, run_id: str | None
) -> tuple[SignedTreeHead, Ed25519PublicKey, bool]:
    """The bundle's tree head and the key to check it with (pinned, else the bundle's own); BundleError when the
    bundle is for another run or signed by another key than the pinned one."""
    try:
        sth = SignedTreeHead.from_json_dict(bundle["tree_head"])
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
    return sth, public_key, pinned


def _head_problem(
    bundle: Mapping[str, Any],
    sth: SignedTreeHead,
    key: Ed25519PublicKey,
    since: Sequence[tuple[str, SignedTreeHead]],
) -> str | None:
    """The head's signature, and its consistency with every pinned head through the bundle's proofs."""
    if not verify_tree_head(sth, key):
        return "the tree head's signature does not verify"
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
            head, key, run_id=sth.run_id, tree_size=sth.tree_size, root=sth.root,
            proof=proofs.get(head.tree_size, []), name=name,
        )  # fmt: skip
        if problem is not None:
            return problem
    return None


@dataclass
class ContentResult:
    """Outcome of checking a content proof: the samples registered with the content hash, each with its number
    of uses (an empty list: never registered), as of entry `index_covers`."""

    ok: bool
    run_id: str
    content_sha256: str
    tree_size: int
    key_fingerprint: str
    key_pinned: bool
    samples: list[dict[str, int]] = field(default_factory=list)
    index_covers: int | None = None
    problem: str | None = None


def check_content_bundle(
    bundle: Mapping[str, Any],
    *,
    public_key: Ed25519PublicKey | None = None,
    run_id: str | None = None,
    since: Sequence[tuple[str, SignedTreeHead]] = (),
) -> ContentResult:
    """Check a content proof (`fgtrac prove --content-sha256`): the matching leaves of the sorted content tree are
    consecutive and bounded by leaves of other hashes (so none is hidden), and each match's usage leaf."""
    if not isinstance(bundle, Mapping) or bundle.get("format") != CONTENT_FORMAT:
        raise BundleError(f"not an fgtrac content proof (format must be {CONTENT_FORMAT!r})")
    h = str(bundle.get("content_sha256", "")).lower()
    sth, key, pinned = _head_and_key(bundle, public_key, run_id)
    result = ContentResult(True, sth.run_id, h, sth.tree_size, sth.key_fingerprint, pinned)

    def bad(msg: str) -> ContentResult:
        result.ok, result.problem = False, msg
        return result

    problem = _head_problem(bundle, sth, key, since)
    if problem is not None:
        return bad(problem)
    found = _index_entry(bundle.get("index") or {}, sth)
    if isinstance(found, str):
        return bad(found)
    seq, body = found
    try:
        n, content_root, usage_root = (
            int(body["n_samples"]), bytes.fromhex(body["content_root"]), bytes.fromhex(body["usage_root"])
        )
        result.index_covers = int(body["ledger_size"])
        matches = [(_leaf_proof(m, "content leaf proof"), _leaf_proof(m["usage"], "usage leaf proof"))
                   for m in bundle["matches"]]  # fmt: skip
        bounds = [_leaf_proof(b, "bound proof") for b in bundle["bounds"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise BundleError(f"malformed content proof ({exc})") from None
    if not matches:
        problem = check_absent(h, bounds, n, content_root, content_key)
        return bad(f"absence of content {h[:16]}... not proven: {problem}") if problem else result
    for k, ((leaf, i, proof), (uleaf, j, uproof)) in enumerate(matches):
        if i != matches[0][0][1] + k:
            return bad("the matching content leaves are not consecutive")
        if not (0 <= i < n and verify_inclusion(leaf, i, n, proof, content_root)):
            return bad(f"content leaf {i} is not in the index (inclusion proof fails)")
        if not (0 <= j < n and verify_inclusion(uleaf, j, n, uproof, usage_root)):
            return bad(f"usage leaf {j} is not in the index (inclusion proof fails)")
        try:
            (digest, sid), (uid, uses, _) = parse_content_leaf(leaf), parse_usage_leaf(uleaf)
        except ValueError as exc:
            return bad(f"malformed leaf ({exc})")
        if digest != h or uid != sid:
            return bad(f"content leaf {i} does not match the hash or its usage leaf")
        result.samples.append({"sample_id": sid, "n_uses": uses})
    first, last = matches[0][0][1], matches[-1][0][1]
    want = {i for i in (first - 1, last + 1) if 0 <= i < n}
    if {i for _, i, _ in bounds} != want:
        return bad("the bounding leaves do not enclose the matches (another sample with this hash may be hidden)")
    for leaf, i, proof in bounds:
        if not verify_inclusion(leaf, i, n, proof, content_root):
            return bad(f"bounding leaf {i} is not in the index (inclusion proof fails)")
        try:
            if content_key(leaf) == h:
                return bad(f"bounding leaf {i} has the same content hash: a match was left out")
        except ValueError as exc:
            return bad(f"malformed bounding leaf ({exc})")
    return result


def _index_entry(index: Mapping[str, Any], sth: SignedTreeHead) -> tuple[int, dict[str, Any]] | str:
    """(seq, body) of the `usage_index` entry the bundle cites, proven included under the head; or the problem."""
    try:
        seq, raw = int(index["seq"]), bytes.fromhex(index["entry"])
        proof = _hexes(index["inclusion"], "inclusion proof of the usage index")
    except (KeyError, TypeError, ValueError) as exc:
        raise BundleError(f"malformed usage index in bundle ({exc})") from None
    if not verify_inclusion(raw, seq, sth.tree_size, proof, sth.root):
        return f"usage index entry #{seq} is not included in the signed tree (inclusion proof fails)"
    try:
        kind, body = decode_entry(raw)
    except ValueError as exc:
        return f"usage index entry #{seq} is not a canonical entry ({exc})"
    if kind != "usage_index":
        return f"entry #{seq} is a {kind!r} entry, not the usage index"
    return seq, body


def _leaf_proof(item: Mapping[str, Any], what: str) -> tuple[bytes, int, list[bytes]]:
    try:
        return bytes.fromhex(item["leaf"]), int(item["index"]), _hexes(item["inclusion"], what)
    except (KeyError, TypeError, ValueError) as exc:
        raise BundleError(f"malformed {what} in bundle ({exc})") from None


def _check_index(
    index: Mapping[str, Any],
    sth: SignedTreeHead,
    sample_id: int,
    used_at: set[tuple[int, int]],
    result: BundleResult,
) -> str | None:
    """Complete use (the sample's usage leaf, its use list equal to the batch uses proven above) or, for a sample
    id never registered, absence (adjacent leaves of the sorted usage tree)."""
    if not isinstance(index, Mapping):
        raise BundleError("malformed usage index in bundle (not an object)")
    found = _index_entry(index, sth)
    if isinstance(found, str):
        return found
    seq, body = found
    try:
        covered, size = int(body["ledger_size"]), int(body["n_samples"])
        usage_root = bytes.fromhex(body["usage_root"])
    except (KeyError, TypeError, ValueError) as exc:
        return f"usage index entry #{seq} is malformed ({exc})"
    result.index_covers = covered
    if "absent" in index:
        if result.sample is not None:
            return "the bundle claims the sample was never registered but holds its registration entry"
        neighbours = [_leaf_proof(n, "absence proof") for n in index["absent"]]
        problem = check_absent(sample_id, neighbours, size, usage_root, usage_key)
        if problem is not None:
            return f"absence of sample {sample_id} from the usage index not proven: {problem}"
        result.registered = False
        return None
    leaf, i, proof = _leaf_proof(index.get("leaf") or {}, "usage leaf proof")
    if not (0 <= i < size and verify_inclusion(leaf, i, size, proof, usage_root)):
        return "the sample's usage leaf is not in the usage index (inclusion proof fails)"
    try:
        leaf_id, n_uses, root = parse_usage_leaf(leaf)
    except ValueError as exc:
        return f"malformed usage leaf ({exc})"
    if leaf_id != sample_id:
        return f"the usage leaf is about sample {leaf_id}, not {sample_id}"
    try:
        uses = [(int(s), int(p)) for s, p in index["uses"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise BundleError(f"malformed use list in bundle ({exc})") from None
    try:
        listed = uses_hash(uses)
    except OverflowError:  # a seq or position that no 8- or 4-byte record holds
        return "the use list holds a use out of range"
    if len(uses) != n_uses or listed != root:
        return f"the use list does not match the usage index ({len(uses)} listed, {n_uses} committed)"
    proven = {u for u in used_at if u[0] < covered}
    if set(uses) != proven:
        missing = sorted(set(uses) - proven)
        return (
            f"the index commits uses the bundle does not prove (first: entry #{missing[0][0]})"
            if missing
            else "the bundle proves uses the index does not list"
        )
    result.registered = True
    result.complete = True
    return None
