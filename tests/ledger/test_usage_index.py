"""The usage index's leaves, roots and absence proofs, against hand-built trees."""

from __future__ import annotations

import hashlib

import pytest

from fgtrac_core.ledger.merkle import (
    EMPTY_ROOT,
    inclusion_proof,
    leaf_hash,
    merkle_root,
    root_from_leaf_hashes,
)
from fgtrac_core.ledger.usage_index import (
    check_absent,
    content_key,
    content_leaf,
    index_roots,
    parse_usage_leaf,
    usage_key,
    usage_leaf,
    uses_hash,
)


def _h(i: int) -> str:
    return hashlib.sha256(str(i).encode()).hexdigest()


SAMPLES = [(5, _h(5)), (-3, _h(-3)), (12, _h(12)), (7, _h(5))]  # two samples share a content hash
USES = {5: [(10, 0), (14, 3), (14, 7)], 12: [(11, 1)]}


def test_leaves_and_roots_by_hand() -> None:
    usage_root, content_root, usage, content = index_roots(SAMPLES, USES)
    assert [parse_usage_leaf(x)[0] for x in usage] == [-3, 5, 7, 12]  # integer order, negatives first
    assert parse_usage_leaf(usage[1]) == (5, 3, uses_hash(USES[5]))
    assert parse_usage_leaf(usage[0]) == (-3, 0, EMPTY_ROOT)
    use = (14).to_bytes(8, "big") + (3).to_bytes(4, "big")
    records = (10).to_bytes(8, "big") + bytes(4) + use + use[:8] + (7).to_bytes(4, "big")
    assert uses_hash(USES[5]) == hashlib.sha256(records).digest()
    assert uses_hash([]) == hashlib.sha256(b"").digest() == EMPTY_ROOT
    assert usage_root == root_from_leaf_hashes([leaf_hash(x) for x in usage]) == merkle_root(usage)
    assert content_root == merkle_root(sorted(content_leaf(h, i) for i, h in SAMPLES))
    assert usage_leaf(1, 0, EMPTY_ROOT)[:8] == (1).to_bytes(8, "big")


def _neighbours(leaves: list[bytes], *idx: int) -> list[tuple[bytes, int, list[bytes]]]:
    return [(leaves[i], i, inclusion_proof(leaves, i)) for i in idx]


def test_absence_proofs() -> None:
    root, _, usage, _ = index_roots(SAMPLES, USES)
    n = len(usage)
    assert check_absent(6, _neighbours(usage, 1, 2), n, root, usage_key) is None  # between 5 and 7
    assert check_absent(-10, _neighbours(usage, 0), n, root, usage_key) is None  # before the first
    assert check_absent(99, _neighbours(usage, 3), n, root, usage_key) is None  # after the last
    # altered proofs are rejected
    assert "not adjacent" in check_absent(6, _neighbours(usage, 0, 2), n, root, usage_key)
    assert "do not enclose" in check_absent(5, _neighbours(usage, 1, 2), n, root, usage_key)  # 5 exists
    assert "single neighbour" in check_absent(6, _neighbours(usage, 1), n, root, usage_key)  # hides leaf 2
    forged = usage_leaf(6, 0, EMPTY_ROOT)
    assert "not in the index" in check_absent(8, [(forged, 2, inclusion_proof(usage, 2))], n, root, usage_key)
    assert check_absent(1, [], 0, EMPTY_ROOT, usage_key) is None


@pytest.mark.parametrize("missing", ["0" * 64, "f" * 64, _h(6)])
def test_content_absence(missing: str) -> None:
    _, root, _, content = index_roots(SAMPLES, USES)
    keys = [content_key(x) for x in content]
    i = sum(k < missing for k in keys)
    idx = [j for j in (i - 1, i) if 0 <= j < len(content)]
    assert check_absent(missing, _neighbours(content, *idx), len(content), root, content_key) is None
