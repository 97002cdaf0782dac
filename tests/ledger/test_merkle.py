"""Tests for the RFC 9162 Merkle tree: published vectors, proofs, tampering, and a recursive reference."""

from __future__ import annotations

import hashlib
import json
import random

import pytest

from fgtrac_core.ledger.merkle import (
    EMPTY_ROOT,
    CompactRange,
    consistency_proof,
    consistency_proof_from_leaf_hashes,
    inclusion_proof,
    inclusion_proof_from_leaf_hashes,
    leaf_hash,
    merkle_root,
    node_hash,
    root_from_leaf_hashes,
    verify_consistency,
    verify_inclusion,
    verify_inclusion_leaf_hash,
)

# --- Published RFC 6962 test vectors, verbatim from transparency-dev/merkle testonly/constants.go ---------

LEAF_INPUTS = [
    bytes.fromhex(h)
    for h in [
        "",
        "00",
        "10",
        "2021",
        "3031",
        "40414243",
        "5051525354555657",
        "606162636465666768696a6b6c6d6e6f",
    ]
]

# RootHashes(): index = tree size.
ROOT_HASHES = [
    bytes.fromhex(h)
    for h in [
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
        "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
        "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
        "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
        "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
        "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
    ]
]

# NodeHashes(): [level][index] for every complete subtree of the 8-leaf tree.
NODE_HASHES = [
    [
        bytes.fromhex(h)
        for h in [
            "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
            "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "0298d122906dcfc10892cb53a73992fc5b9f493ea4c9badb27b791b4127a7fe7",
            "07506a85fd9dd2f120eb694f86011e5bb4662e5c415a62917033d4a9624487e7",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
            "4271a26be0d8a84f0bd54c8c302e7cb3a3b5d1fa6780a40bcce2873477dab658",
            "b08693ec2e721597130641e8211e7eedccb4c26413963eee6c1e2ed16ffb1a5f",
            "46f6ffadd3d06a09ff3c5860d2755c8b9819db7df44251788c7d8e3180de8eb1",
        ]
    ],
    [
        bytes.fromhex(h)
        for h in [
            "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
        ]
    ],
    [
        bytes.fromhex(h)
        for h in [
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
        ]
    ],
    [bytes.fromhex("5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328")],
]

# CompactTrees(): the compact-range hashes (largest subtree first) for every size 0..8, as [level, index].
COMPACT_TREES = [
    [],
    [(0, 0)],
    [(1, 0)],
    [(1, 0), (0, 2)],
    [(2, 0)],
    [(2, 0), (0, 4)],
    [(2, 0), (1, 2)],
    [(2, 0), (1, 2), (0, 6)],
    [(3, 0)],
]

# transparency-dev/merkle proof/verify_test.go: inclusionProofs as (1-based leaf, size, proof).
INCLUSION_VECTORS = [
    (1, 1, []),
    (
        1,
        8,
        [
            "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
        ],
    ),
    (
        6,
        8,
        [
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        ],
    ),
    (3, 3, ["fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125"]),
    (
        2,
        5,
        [
            "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
        ],
    ),
]

# transparency-dev/merkle proof/verify_test.go: consistencyProofs as (size1, size2, proof).
CONSISTENCY_VECTORS = [
    (1, 1, []),
    (
        1,
        8,
        [
            "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
        ],
    ),
    (
        6,
        8,
        [
            "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        ],
    ),
    (
        2,
        5,
        [
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
        ],
    ),
    (
        6,
        7,
        [
            "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
            "b08693ec2e721597130641e8211e7eedccb4c26413963eee6c1e2ed16ffb1a5f",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        ],
    ),
]

SOME_HASH = bytes.fromhex("abacaba000000000000000000000000000000000000000000060061e00123456")


# --- Straightforward recursive reference (RFC 9162 section 2.1 as written) ------------------------------


def ref_split(n: int) -> int:
    k = 1
    while k * 2 < n:
        k *= 2
    return k


def ref_mth(hashes: list[bytes]) -> bytes:
    if not hashes:
        return hashlib.sha256(b"").digest()
    if len(hashes) == 1:
        return hashes[0]
    k = ref_split(len(hashes))
    return hashlib.sha256(b"\x01" + ref_mth(hashes[:k]) + ref_mth(hashes[k:])).digest()


def ref_path(m: int, hashes: list[bytes]) -> list[bytes]:
    n = len(hashes)
    if n == 1:
        return []
    k = ref_split(n)
    if m < k:
        return ref_path(m, hashes[:k]) + [ref_mth(hashes[k:])]
    return ref_path(m - k, hashes[k:]) + [ref_mth(hashes[:k])]


def ref_subproof(m: int, hashes: list[bytes], b: bool) -> list[bytes]:
    n = len(hashes)
    if m == n:
        return [] if b else [ref_mth(hashes)]
    k = ref_split(n)
    if m <= k:
        return ref_subproof(m, hashes[:k], b) + [ref_mth(hashes[k:])]
    return ref_subproof(m - k, hashes[k:], False) + [ref_mth(hashes[:k])]


def ref_consistency(m: int, hashes: list[bytes]) -> list[bytes]:
    if m == 0 or m == len(hashes):
        return []
    return ref_subproof(m, hashes, True)


def make_leaf_hashes(n: int, seed: int = 0) -> list[bytes]:
    return [hashlib.sha256(f"{seed}:{i}".encode()).digest() for i in range(n)]


def flip(h: bytes, bit: int = 3) -> bytes:
    return bytes([h[0] ^ (1 << bit)]) + h[1:]


# --- Vectors -------------------------------------------------------------------------------------------


def test_empty_root_is_sha256_of_empty_string() -> None:
    assert EMPTY_ROOT == hashlib.sha256(b"").digest() == ROOT_HASHES[0]
    assert merkle_root([]) == EMPTY_ROOT
    assert root_from_leaf_hashes([]) == EMPTY_ROOT


def test_leaf_and_node_hash_definitions() -> None:
    assert leaf_hash(b"abc") == hashlib.sha256(b"\x00abc").digest()
    a, b = SOME_HASH, EMPTY_ROOT
    assert node_hash(a, b) == hashlib.sha256(b"\x01" + a + b).digest()


def test_published_leaf_hashes() -> None:
    assert [leaf_hash(x) for x in LEAF_INPUTS] == NODE_HASHES[0]


@pytest.mark.parametrize("size", range(9))
def test_published_roots(size: int) -> None:
    assert merkle_root(LEAF_INPUTS[:size]) == ROOT_HASHES[size]
    assert root_from_leaf_hashes([leaf_hash(x) for x in LEAF_INPUTS[:size]]) == ROOT_HASHES[size]
    rng = CompactRange()
    rng.extend(LEAF_INPUTS[:size])
    assert rng.root() == ROOT_HASHES[size]


def test_root_of_all_eight() -> None:
    assert (
        merkle_root(LEAF_INPUTS).hex() == "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328"
    )


def test_published_node_hashes() -> None:
    for level, row in enumerate(NODE_HASHES):
        width = 1 << level
        for i, expected in enumerate(row):
            assert merkle_root(LEAF_INPUTS[i * width : (i + 1) * width]) == expected


@pytest.mark.parametrize("size", range(9))
def test_published_compact_trees(size: int) -> None:
    rng = CompactRange()
    rng.extend(LEAF_INPUTS[:size])
    expected = [NODE_HASHES[level][i].hex() for level, i in COMPACT_TREES[size]]
    assert rng.to_state() == {"size": size, "hashes": expected}


@pytest.mark.parametrize(("leaf", "size", "proof_hex"), INCLUSION_VECTORS)
def test_published_inclusion_proofs(leaf: int, size: int, proof_hex: list[str]) -> None:
    proof = [bytes.fromhex(h) for h in proof_hex]
    index = leaf - 1
    assert inclusion_proof(LEAF_INPUTS[:size], index) == proof
    assert verify_inclusion(LEAF_INPUTS[index], index, size, proof, ROOT_HASHES[size])
    for probe in _corrupt_inclusion(index, size, proof, ROOT_HASHES[size], leaf_hash(LEAF_INPUTS[index])):
        assert not verify_inclusion_leaf_hash(*probe[1:]), probe[0]


@pytest.mark.parametrize(("m", "n", "proof_hex"), CONSISTENCY_VECTORS)
def test_published_consistency_proofs(m: int, n: int, proof_hex: list[str]) -> None:
    proof = [bytes.fromhex(h) for h in proof_hex]
    assert consistency_proof(LEAF_INPUTS[:n], m) == proof
    assert verify_consistency(m, n, ROOT_HASHES[m], ROOT_HASHES[n], proof)
    if proof:
        for probe in _corrupt_consistency(m, n, ROOT_HASHES[m], ROOT_HASHES[n], proof):
            assert not verify_consistency(*probe[1:]), probe[0]


# --- Corruption probes (mirroring transparency-dev/merkle proof/verify_test.go) ----------------------------


def _corrupt_inclusion(index: int, size: int, proof: list[bytes], root: bytes, lh: bytes) -> list[tuple]:
    # No "size + 1" probe: a root does not commit to its tree size (a path can be valid for two sizes),
    # which is why the signed tree head binds size and root together.
    probes: list[tuple] = [
        ("index - 1", index - 1, size, proof, root),
        ("index + 1", index + 1, size, proof, root),
        ("index ^ 2", index ^ 2, size, proof, root),
        ("size * 2", index, size * 2, proof, root),
        ("size / 2", index, size // 2, proof, root),
        ("empty root", index, size, proof, EMPTY_ROOT),
        ("random root", index, size, proof, SOME_HASH),
        ("flipped root", index, size, proof, flip(root)),
        ("trailing garbage", index, size, [*proof, b""], root),
        ("trailing root", index, size, [*proof, root], root),
        ("trailing hash", index, size, [*proof, SOME_HASH], root),
        ("preceding garbage", index, size, [b"", *proof], root),
        ("preceding root", index, size, [root, *proof], root),
    ]
    probes = [(d, lh, *rest) for d, *rest in probes]
    probes.append(("wrong leaf", flip(lh), index, size, proof, root))
    probes.append(("short leaf", b"WrongLeaf", index, size, proof, root))
    for i in range(len(proof)):
        for bit in (0, 3, 7):
            bad = list(proof)
            bad[i] = flip(bad[i], bit)
            probes.append((f"proof[{i}] bit {bit}", lh, index, size, bad, root))
        bad = list(proof)
        bad[i] = bad[i][:-1] + bytes([bad[i][-1] ^ 1])
        probes.append((f"proof[{i}] last byte", lh, index, size, bad, root))
    if proof:
        probes.append(("dropped last", lh, index, size, proof[:-1], root))
        probes.append(("dropped first", lh, index, size, proof[1:], root))
    if len(proof) > 1:
        probes.append(("inserted", lh, index, size, [proof[0], SOME_HASH, *proof[1:]], root))
        probes.append(("swapped", lh, index, size, [proof[1], proof[0], *proof[2:]], root))
    # Drop probes that happen to describe the same valid statement (e.g. size*2 == size when size == 0).
    return [
        p
        for p in probes
        if not (p[2] == index and p[3] == size and p[4] == proof and p[5] == root and p[1] == lh)
    ]


def _corrupt_consistency(m: int, n: int, r1: bytes, r2: bytes, proof: list[bytes]) -> list[tuple]:
    probes: list[tuple] = [
        ("m - 1", m - 1, n, r1, r2, proof),
        ("m + 1", m + 1, n, r1, r2, proof),
        ("m ^ 2", m ^ 2, n, r1, r2, proof),
        ("n * 2", m, n * 2, r1, r2, proof),
        ("n / 2", m, n // 2, r1, r2, proof),
        ("wrong root1", m, n, flip(r1), r2, proof),
        ("wrong root2", m, n, r1, flip(r2), proof),
        ("short root1", m, n, b"WrongRoot", r2, proof),
        ("swapped roots", m, n, r2, r1, proof),
        ("empty proof", m, n, r1, r2, []),
        ("trailing garbage", m, n, r1, r2, [*proof, b""]),
        ("trailing root1", m, n, r1, r2, [*proof, r1]),
        ("trailing root2", m, n, r1, r2, [*proof, r2]),
        ("preceding garbage", m, n, r1, r2, [b"", *proof]),
        ("preceding root1", m, n, r1, r2, [r1, *proof]),
        ("preceding root2", m, n, r1, r2, [r2, *proof]),
        ("preceding proof[0]", m, n, r1, r2, [proof[0], *proof]),
        ("truncated", m, n, r1, r2, proof[:-1]),
        ("dropped first", m, n, r1, r2, proof[1:]),
    ]
    for i in range(len(proof)):
        for bit in (0, 4, 7):
            bad = list(proof)
            bad[i] = flip(bad[i], bit)
            probes.append((f"proof[{i}] bit {bit}", m, n, r1, r2, bad))
    return [
        p for p in probes if not (p[1] == m and p[2] == n and p[3] == r1 and p[4] == r2 and p[5] == proof)
    ]


# --- Exhaustive small sizes with the published leaves ----------------------------------------------------


def test_all_inclusion_proofs_up_to_8() -> None:
    for size in range(1, 9):
        root = ROOT_HASHES[size]
        for index in range(size):
            proof = inclusion_proof(LEAF_INPUTS[:size], index)
            assert verify_inclusion(LEAF_INPUTS[index], index, size, proof, root)
            for probe in _corrupt_inclusion(index, size, proof, root, leaf_hash(LEAF_INPUTS[index])):
                assert not verify_inclusion_leaf_hash(*probe[1:]), (index, size, probe[0])
            # Another leaf's data does not verify at this index.
            for other in range(size):
                if LEAF_INPUTS[other] != LEAF_INPUTS[index]:
                    assert not verify_inclusion(LEAF_INPUTS[other], index, size, proof, root)


def test_all_consistency_proofs_up_to_8() -> None:
    for n in range(0, 9):
        for m in range(0, n + 1):
            proof = consistency_proof(LEAF_INPUTS[:n], m)
            assert verify_consistency(m, n, ROOT_HASHES[m], ROOT_HASHES[n], proof), (m, n)
            if 0 < m < n:
                assert proof
                for probe in _corrupt_consistency(m, n, ROOT_HASHES[m], ROOT_HASHES[n], proof):
                    assert not verify_consistency(*probe[1:]), (m, n, probe[0])
                # A root of a different old size does not verify.
                for m2 in range(1, n + 1):
                    if m2 != m:
                        assert not verify_consistency(m, n, ROOT_HASHES[m2], ROOT_HASHES[n], proof)
            else:
                assert proof == []


# --- Edge cases ------------------------------------------------------------------------------------------


def test_inclusion_edge_cases() -> None:
    h = leaf_hash(b"data")
    assert verify_inclusion(b"data", 0, 1, [], h)
    assert not verify_inclusion(b"data", 0, 1, [], b"")
    assert not verify_inclusion_leaf_hash(b"", 0, 1, [], h)
    for index, size in [(0, 0), (1, 0), (2, 1), (1, 1), (-1, 1)]:
        assert not verify_inclusion_leaf_hash(SOME_HASH, index, size, [], EMPTY_ROOT)
        assert not verify_inclusion_leaf_hash(SOME_HASH, index, size, [], SOME_HASH)
    assert not verify_inclusion_leaf_hash(h, True, 2, [h], h)  # bool is not an index
    assert not verify_inclusion("data", 0, 1, [], h)  # type: ignore[arg-type]


def test_consistency_edge_cases() -> None:
    r1, r2 = ROOT_HASHES[1], ROOT_HASHES[2]
    assert verify_consistency(0, 0, EMPTY_ROOT, EMPTY_ROOT, [])
    assert verify_consistency(0, 5, EMPTY_ROOT, ROOT_HASHES[5], [])
    assert not verify_consistency(0, 5, SOME_HASH, ROOT_HASHES[5], [])  # old root must be the empty root
    assert not verify_consistency(0, 0, EMPTY_ROOT, EMPTY_ROOT, [EMPTY_ROOT])
    assert not verify_consistency(0, 1, EMPTY_ROOT, r1, [EMPTY_ROOT])
    assert verify_consistency(1, 1, r1, r1, [])
    assert not verify_consistency(1, 1, r1, r2, [])
    assert not verify_consistency(1, 1, r1, r1, [r1])
    assert not verify_consistency(1, 0, r1, EMPTY_ROOT, [])
    assert not verify_consistency(2, 1, r2, r1, [])
    assert not verify_consistency(1, 2, r1, r2, [])  # 0 < m < n needs a proof
    assert not verify_consistency(-1, 2, r1, r2, [])


def test_proof_generation_rejects_bad_arguments() -> None:
    hashes = make_leaf_hashes(5)
    for index in (-1, 5, 6):
        with pytest.raises(ValueError, match="out of range"):
            inclusion_proof_from_leaf_hashes(hashes, index)
    with pytest.raises(ValueError, match="out of range"):
        inclusion_proof_from_leaf_hashes([], 0)
    for m in (-1, 6):
        with pytest.raises(ValueError, match="out of range"):
            consistency_proof_from_leaf_hashes(hashes, m)
    with pytest.raises(ValueError, match="32 bytes"):
        root_from_leaf_hashes([*hashes, b"short"])
    with pytest.raises(ValueError, match="32 bytes"):
        inclusion_proof_from_leaf_hashes([b"x" * 31], 0)


# --- Cross-check against the recursive reference -----------------------------------------------------------


def test_iterative_root_matches_recursive_definition_for_sizes_0_to_70() -> None:
    hashes = make_leaf_hashes(70)
    for n in range(71):
        expected = ref_mth(hashes[:n])
        assert root_from_leaf_hashes(hashes[:n]) == expected, n
        rng = CompactRange()
        rng.extend_leaf_hashes(hashes[:n])
        assert rng.root() == expected, n


def test_exhaustive_proofs_against_reference_up_to_40() -> None:
    hashes = make_leaf_hashes(40, seed=1)
    for n in range(1, 41):
        sub = hashes[:n]
        root = ref_mth(sub)
        for i in range(n):
            proof = inclusion_proof_from_leaf_hashes(sub, i)
            assert proof == ref_path(i, sub), (i, n)
            assert verify_inclusion_leaf_hash(sub[i], i, n, proof, root), (i, n)
        for m in range(0, n + 1):
            proof = consistency_proof_from_leaf_hashes(sub, m)
            assert proof == ref_consistency(m, sub), (m, n)
            assert verify_consistency(m, n, ref_mth(hashes[:m]), root, proof), (m, n)


def test_randomized_against_reference_up_to_200() -> None:
    rnd = random.Random(1234)
    hashes = make_leaf_hashes(200, seed=2)
    roots = [ref_mth(hashes[:n]) for n in range(201)]
    for _ in range(150):
        n = rnd.randint(1, 200)
        sub = hashes[:n]
        assert root_from_leaf_hashes(sub) == roots[n]
        i = rnd.randrange(n)
        proof = inclusion_proof_from_leaf_hashes(sub, i)
        assert proof == ref_path(i, sub)
        assert verify_inclusion_leaf_hash(sub[i], i, n, proof, roots[n])
        j = rnd.randrange(n)
        if j != i:
            assert not verify_inclusion_leaf_hash(sub[j], i, n, proof, roots[n])
        m = rnd.randint(0, n)
        cproof = consistency_proof_from_leaf_hashes(sub, m)
        assert cproof == ref_consistency(m, sub)
        assert verify_consistency(m, n, roots[m], roots[n], cproof)
        if 0 < m < n:
            bad = list(cproof)
            k = rnd.randrange(len(bad))
            bad[k] = flip(bad[k], rnd.randrange(8))
            assert not verify_consistency(m, n, roots[m], roots[n], bad)
            other = rnd.randint(1, n)
            if roots[other] != roots[m]:
                assert not verify_consistency(m, n, roots[other], roots[n], cproof)


def test_entry_functions_match_leaf_hash_functions() -> None:
    entries = [f"entry {i}".encode() for i in range(13)]
    hashes = [leaf_hash(e) for e in entries]
    assert merkle_root(entries) == root_from_leaf_hashes(hashes)
    assert inclusion_proof(entries, 7) == inclusion_proof_from_leaf_hashes(hashes, 7)
    assert consistency_proof(entries, 5) == consistency_proof_from_leaf_hashes(hashes, 5)


# --- CompactRange -------------------------------------------------------------------------------------------


def test_compact_range_matches_merkle_root_at_every_size_to_300() -> None:
    entries = [f"row-{i}".encode() for i in range(300)]
    hashes = [leaf_hash(e) for e in entries]
    rng = CompactRange()
    assert rng.size == 0 and rng.root() == EMPTY_ROOT
    for n in range(1, 301):
        if n % 2:
            rng.append(entries[n - 1])
        else:
            rng.append_leaf_hash(hashes[n - 1])
        assert rng.size == n
        assert rng.root() == root_from_leaf_hashes(hashes[:n]) == ref_mth(hashes[:n]), n
        assert len(rng.to_state()["hashes"]) == n.bit_count()  # type: ignore[arg-type]


def test_compact_range_state_round_trip_and_resume() -> None:
    hashes = make_leaf_hashes(300, seed=3)
    for cut in (0, 1, 2, 7, 8, 63, 64, 65, 150, 299):
        first = CompactRange()
        first.extend_leaf_hashes(hashes[:cut])
        state = json.loads(json.dumps(first.to_state()))
        restored = CompactRange.from_state(state)
        assert restored == first and restored.size == cut and restored.root() == first.root()
        restored.extend_leaf_hashes(hashes[cut:])
        assert restored.root() == root_from_leaf_hashes(hashes)
        assert first.size == cut  # restoring did not alias the original


def test_compact_range_extend_equals_append_and_copy_is_independent() -> None:
    hashes = make_leaf_hashes(37, seed=4)
    a, b = CompactRange(), CompactRange()
    a.extend_leaf_hashes(hashes)
    for h in hashes:
        b.append_leaf_hash(h)
    assert a == b
    c = a.copy()
    c.append_leaf_hash(hashes[0])
    assert c.size == 38 and a.size == 37


def test_compact_range_rejects_bad_input() -> None:
    rng = CompactRange()
    with pytest.raises(ValueError):
        rng.append_leaf_hash(b"short")
    hashes = make_leaf_hashes(5)
    with pytest.raises(ValueError):
        rng.extend_leaf_hashes([*hashes[:3], b"bad", hashes[4]])
    assert rng.size == 3 and rng.root() == root_from_leaf_hashes(hashes[:3])
    good = rng.to_state()
    bad_states = [
        {"size": 3, "hashes": good["hashes"][:1]},  # type: ignore[index]
        {"size": -1, "hashes": []},
        {"size": True, "hashes": ["00" * 32]},
        {"size": 1, "hashes": ["zz" * 32]},
        {"size": 1, "hashes": ["00" * 31]},
        {"size": 1, "hashes": [" " + "00" * 31 + "0"]},
        {"size": 1, "hashes": "00" * 32},
        {"hashes": []},
        [],
    ]
    for state in bad_states:
        with pytest.raises(ValueError):
            CompactRange.from_state(state)  # type: ignore[arg-type]


def test_levels_prefix_roots_and_consistency_proofs_match_the_reference() -> None:
    """The O(log² n) proofs from perfect-subtree levels (used by verification) equal the RFC reference."""
    import os

    from fgtrac_core.ledger.merkle import (
        consistency_proof_from_leaf_hashes,
        consistency_proof_from_levels,
        inclusion_proof_from_leaf_hashes,
        inclusion_proof_from_levels,
        leaf_hash,
        perfect_subtree_levels,
        prefix_root,
        root_from_leaf_hashes,
    )

    leaves = [leaf_hash(os.urandom(4)) for _ in range(70)]
    levels = perfect_subtree_levels(leaves)
    for n in range(71):
        assert prefix_root(levels, n) == root_from_leaf_hashes(leaves[:n])
        for m in range(n + 1):
            assert consistency_proof_from_levels(levels, m, n) == consistency_proof_from_leaf_hashes(
                leaves[:n], m
            )
        for i in range(n):
            assert inclusion_proof_from_levels(levels, i, n) == inclusion_proof_from_leaf_hashes(
                leaves[:n], i
            )
