"""RFC 9162 / RFC 6962 Merkle tree hashing, inclusion and consistency proofs.

Hashing (RFC 9162 section 2.1.1, SHA-256):

* empty tree:   ``MTH({}) = SHA-256(b"")``
* leaf:         ``MTH({d}) = SHA-256(0x00 || d)``
* interior:     ``MTH(D[n]) = SHA-256(0x01 || MTH(D[0:k]) || MTH(D[k:n]))`` where ``k`` is the largest
  power of two strictly smaller than ``n``.

Functions whose names mention ``leaf_hash(es)`` take leaf hashes that the caller already holds (so nothing
is hashed twice); the entry-taking functions hash the raw entries with :func:`leaf_hash` and delegate to
them.  Bulk roots are computed level by level, pairing neighbours and carrying an odd last node up
unchanged, which yields exactly the RFC tree (the RFC tree is left-balanced) in ``n - 1`` node hashes.

Proof verifiers never raise on bad input data: they return ``False``.

This module uses the standard library only, so a third party can verify proofs with a minimal install.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable, Mapping, Sequence

__all__ = [
    "EMPTY_ROOT",
    "HASH_SIZE",
    "CompactRange",
    "consistency_proof",
    "consistency_proof_from_leaf_hashes",
    "inclusion_proof",
    "inclusion_proof_from_leaf_hashes",
    "leaf_hash",
    "merkle_root",
    "node_hash",
    "root_from_leaf_hashes",
    "verify_consistency",
    "verify_inclusion",
    "verify_inclusion_leaf_hash",
]

_sha256 = hashlib.sha256

#: Size in bytes of every hash in the tree (SHA-256).
HASH_SIZE = 32
#: Root hash of the empty tree: SHA-256 of the empty string.
EMPTY_ROOT = _sha256(b"").digest()

_LEAF_PREFIX = b"\x00"
_HEX_HASH = re.compile(r"[0-9a-fA-F]{64}")
_NODE_PREFIX = b"\x01"


def leaf_hash(entry: bytes) -> bytes:
    """Return the RFC 9162 leaf hash ``SHA-256(0x00 || entry)`` of one raw entry."""
    return _sha256(_LEAF_PREFIX + bytes(entry)).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """Return the RFC 9162 interior node hash ``SHA-256(0x01 || left || right)``."""
    return _sha256(_NODE_PREFIX + left + right).digest()


def _split_point(n: int) -> int:
    """Return the largest power of two strictly smaller than ``n`` (``n >= 2``)."""
    return 1 << ((n - 1).bit_length() - 1)


def _check_hashes(hashes: Sequence[bytes]) -> None:
    """Raise ``ValueError`` unless every element is a 32-byte ``bytes`` value."""
    for i, h in enumerate(hashes):
        if not isinstance(h, bytes | bytearray) or len(h) != HASH_SIZE:
            raise ValueError(f"leaf hash {i} is not {HASH_SIZE} bytes")


def _root(hashes: Sequence[bytes]) -> bytes:
    """Merkle root of already-validated leaf hashes, level by level (``len(hashes) - 1`` node hashes)."""
    n = len(hashes)
    if n == 0:
        return EMPTY_ROOT
    if n == 1:
        return bytes(hashes[0])
    sha = _sha256
    prefix = _NODE_PREFIX
    level = hashes
    while n > 1:
        nxt = [sha(prefix + a + b).digest() for a, b in zip(level[0 : n - 1 : 2], level[1::2], strict=True)]
        if n & 1:
            nxt.append(level[n - 1])
        level = nxt
        n = len(level)
    return bytes(level[0])


def root_from_leaf_hashes(hashes: Sequence[bytes]) -> bytes:
    """Return the Merkle tree hash of a tree whose leaves have the given leaf hashes.

    Runs in ``len(hashes) - 1`` node hashes and O(n) memory; equals the recursive RFC 9162 definition.
    Raises ``ValueError`` if an element is not 32 bytes.
    """
    _check_hashes(hashes)
    return _root(hashes)


def merkle_root(entries: Iterable[bytes]) -> bytes:
    """Return the Merkle tree hash ``MTH(D[n])`` of raw entries (RFC 9162 section 2.1.1)."""
    return _root([leaf_hash(e) for e in entries])


def _path(range_root: Callable[[int, int], bytes], index: int, lo: int, hi: int, out: list[bytes]) -> None:
    """Append RFC 9162 ``PATH(index, D[lo:hi])`` to ``out`` (``index`` relative to ``lo``);
    ``range_root(lo, hi)`` is ``MTH(D[lo:hi])``."""
    # PATH(m, D[n]) = PATH(m, D[0:k]) : MTH(D[k:n])   if m < k
    #               = PATH(m - k, D[k:n]) : MTH(D[0:k]) otherwise; PATH(0, {d}) = {}.
    # Recurse first, then append: the proof lists siblings from the leaf up to the root.
    n = hi - lo
    if n <= 1:
        return
    k = _split_point(n)
    if index < k:
        _path(range_root, index, lo, lo + k, out)
        out.append(range_root(lo + k, hi))
    else:
        _path(range_root, index - k, lo + k, hi, out)
        out.append(range_root(lo, lo + k))


def inclusion_proof_from_leaf_hashes(hashes: Sequence[bytes], index: int) -> list[bytes]:
    """Return the RFC 9162 section 2.1.3.1 inclusion proof (audit path) for leaf ``index``.

    Raises ``ValueError`` if ``index`` is outside ``[0, len(hashes))`` or a hash is not 32 bytes.
    """
    _check_hashes(hashes)
    if not 0 <= index < len(hashes):
        raise ValueError(f"leaf index {index} out of range for tree size {len(hashes)}")
    out: list[bytes] = []
    _path(lambda lo, hi: _root(hashes[lo:hi]), index, 0, len(hashes), out)
    return out


def inclusion_proof(entries: Sequence[bytes], index: int) -> list[bytes]:
    """Return the inclusion proof for ``entries[index]`` in the tree over ``entries``."""
    return inclusion_proof_from_leaf_hashes([leaf_hash(e) for e in entries], index)


def _subproof(
    range_root: Callable[[int, int], bytes], m: int, lo: int, hi: int, b: bool, out: list[bytes]
) -> None:
    """Append RFC 9162 ``SUBPROOF(m, D[lo:hi], b)`` to ``out``; ``range_root(lo, hi)`` is ``MTH(D[lo:hi])``."""
    # SUBPROOF(m, D[m], true) = {};  SUBPROOF(m, D[m], false) = {MTH(D[m])}
    # m <= k: SUBPROOF(m, D[0:k], b) : MTH(D[k:n]);  m > k: SUBPROOF(m - k, D[k:n], false) : MTH(D[0:k])
    n = hi - lo
    if m == n:
        if not b:
            out.append(range_root(lo, hi))
        return
    k = _split_point(n)
    if m <= k:
        _subproof(range_root, m, lo, lo + k, b, out)
        out.append(range_root(lo + k, hi))
    else:
        _subproof(range_root, m - k, lo + k, hi, False, out)
        out.append(range_root(lo, lo + k))


def consistency_proof_from_leaf_hashes(hashes: Sequence[bytes], old_size: int) -> list[bytes]:
    """Return the RFC 9162 section 2.1.4.1 consistency proof ``PROOF(old_size, D[n])``.

    ``n = len(hashes)``.  The proof is empty when ``old_size`` is 0 or ``n`` (nothing to prove).
    Raises ``ValueError`` if ``old_size`` is outside ``[0, n]`` or a hash is not 32 bytes.
    """
    _check_hashes(hashes)
    n = len(hashes)
    if not 0 <= old_size <= n:
        raise ValueError(f"old size {old_size} out of range for tree size {n}")
    out: list[bytes] = []
    if 0 < old_size < n:
        _subproof(lambda lo, hi: _root(hashes[lo:hi]), old_size, 0, n, True, out)
    return out


def consistency_proof(entries: Sequence[bytes], old_size: int) -> list[bytes]:
    """Return the consistency proof between the first ``old_size`` entries and all of ``entries``."""
    return consistency_proof_from_leaf_hashes([leaf_hash(e) for e in entries], old_size)


def _is_hash(h: object) -> bool:
    """True when ``h`` is a 32-byte bytes-like value."""
    return isinstance(h, bytes | bytearray) and len(h) == HASH_SIZE


def _valid_size(x: object) -> bool:
    """True when ``x`` is a non-negative ``int`` (``bool`` excluded)."""
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def verify_inclusion_leaf_hash(
    leaf_hash: bytes, index: int, tree_size: int, proof: Sequence[bytes], root: bytes
) -> bool:
    """Verify an inclusion proof for a leaf hash, per RFC 9162 section 2.1.3.2.

    Returns ``True`` only if ``proof`` proves that the leaf with hash ``leaf_hash`` sits at ``index`` in
    the tree of ``tree_size`` leaves whose root is ``root``.  Never raises on bad data.
    """
    if not (_valid_size(index) and _valid_size(tree_size) and index < tree_size):
        return False
    if not (_is_hash(leaf_hash) and _is_hash(root)) or not all(_is_hash(p) for p in proof):
        return False
    fn, sn = index, tree_size - 1
    r = bytes(leaf_hash)
    for p in proof:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    return sn == 0 and r == root


def verify_inclusion(entry: bytes, index: int, tree_size: int, proof: Sequence[bytes], root: bytes) -> bool:
    """Verify that raw ``entry`` is leaf ``index`` of the tree of ``tree_size`` leaves with ``root``."""
    if not isinstance(entry, bytes | bytearray):
        return False
    return verify_inclusion_leaf_hash(leaf_hash(entry), index, tree_size, proof, root)


def verify_consistency(
    old_size: int, new_size: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]
) -> bool:
    """Verify that the tree of ``old_size`` leaves is a prefix of the tree of ``new_size`` leaves.

    Follows RFC 9162 section 2.1.4.2 for ``0 < old_size < new_size``.  Edge cases:
    ``old_size == new_size`` needs an empty proof and equal roots; ``old_size == 0`` needs an empty proof
    and ``old_root == EMPTY_ROOT`` (the empty tree is a prefix of every tree); ``old_size > new_size``
    is rejected.  Never raises on bad data.
    """
    if not (_valid_size(old_size) and _valid_size(new_size) and old_size <= new_size):
        return False
    if not (_is_hash(old_root) and _is_hash(new_root)) or not all(_is_hash(p) for p in proof):
        return False
    if old_size == new_size:
        return len(proof) == 0 and old_root == new_root
    if old_size == 0:
        return len(proof) == 0 and old_root == EMPTY_ROOT
    # Step 1: an empty path never proves 0 < first < second.
    if len(proof) == 0:
        return False
    path = list(proof)
    # Step 2: if first is an exact power of two, prepend first_hash.
    if old_size & (old_size - 1) == 0:
        path.insert(0, bytes(old_root))
    # Step 3.
    fn, sn = old_size - 1, new_size - 1
    # Step 4.
    while fn & 1:
        fn >>= 1
        sn >>= 1
    # Step 5.
    fr = sr = bytes(path[0])
    # Step 6.
    for c in path[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    # Step 7.
    return fr == old_root and sr == new_root and sn == 0


class CompactRange:
    """Incremental Merkle accumulator over leaves ``[0, size)`` (a compact range starting at 0).

    It keeps the roots of the perfect subtrees given by the binary digits of ``size`` (largest first), so
    memory is O(log n), each append does amortised O(1) node hashes (at most ``log2 n``), and :meth:`root`
    folds the at most ``log2 n`` stored hashes right to left.  The state can be saved with
    :meth:`to_state` and restored with :meth:`from_state`, so a recorder can persist it and resume.
    """

    __slots__ = ("_hashes", "_size")

    def __init__(self) -> None:
        """Start an empty range (size 0)."""
        self._size = 0
        self._hashes: list[bytes] = []

    @property
    def size(self) -> int:
        """Number of leaves appended so far."""
        return self._size

    def append_leaf_hash(self, h: bytes) -> None:
        """Append one leaf given its 32-byte leaf hash."""
        if not _is_hash(h):
            raise ValueError(f"leaf hash is not {HASH_SIZE} bytes")
        h = bytes(h)
        hashes = self._hashes
        sha = _sha256
        s = self._size
        # Each trailing 1 bit of the old size is a perfect subtree equal in size to the one being carried.
        while s & 1:
            h = sha(_NODE_PREFIX + hashes.pop() + h).digest()
            s >>= 1
        hashes.append(h)
        self._size += 1

    def append(self, entry: bytes) -> None:
        """Append one raw entry (it is leaf-hashed first)."""
        self.append_leaf_hash(leaf_hash(entry))

    def extend_leaf_hashes(self, hashes: Iterable[bytes]) -> None:
        """Append many leaves given their leaf hashes, in order (same as repeated :meth:`append_leaf_hash`)."""
        stack = self._hashes
        pop, push = stack.pop, stack.append
        sha = _sha256
        prefix = _NODE_PREFIX
        size = self._size
        try:
            for h in hashes:
                if not _is_hash(h):
                    raise ValueError(f"leaf hash at position {size} is not {HASH_SIZE} bytes")
                h = bytes(h)
                s = size
                while s & 1:
                    h = sha(prefix + pop() + h).digest()
                    s >>= 1
                push(h)
                size += 1
        finally:
            self._size = size  # leaves appended before an error stay appended, consistently

    def extend(self, entries: Iterable[bytes]) -> None:
        """Append many raw entries, in order."""
        for e in entries:
            self.append_leaf_hash(leaf_hash(e))

    def root(self) -> bytes:
        """Return the Merkle tree hash of the leaves appended so far (``EMPTY_ROOT`` when empty)."""
        hashes = self._hashes
        if not hashes:
            return EMPTY_ROOT
        r = hashes[-1]
        for h in reversed(hashes[:-1]):
            r = node_hash(h, r)
        return r

    def copy(self) -> CompactRange:
        """Return an independent copy."""
        other = CompactRange()
        other._size = self._size
        other._hashes = list(self._hashes)
        return other

    def to_state(self) -> dict[str, object]:
        """Return a JSON-serialisable state: ``{"size": int, "hashes": [hex, ...]}`` (largest subtree first)."""
        return {"size": self._size, "hashes": [h.hex() for h in self._hashes]}

    @classmethod
    def from_state(cls, state: Mapping[str, object]) -> CompactRange:
        """Restore a range saved with :meth:`to_state`; raises ``ValueError`` on malformed state."""
        if not isinstance(state, Mapping):
            raise ValueError("compact range state must be a mapping")
        size = state.get("size")
        hexes = state.get("hashes")
        if not _valid_size(size):
            raise ValueError("compact range state: 'size' must be a non-negative integer")
        if not isinstance(hexes, list | tuple):
            raise ValueError("compact range state: 'hashes' must be a list of hex strings")
        assert isinstance(size, int)
        if len(hexes) != size.bit_count():
            raise ValueError(
                f"compact range state: size {size} needs {size.bit_count()} hashes, got {len(hexes)}"
            )
        hashes: list[bytes] = []
        for i, x in enumerate(hexes):
            if not isinstance(x, str) or not _HEX_HASH.fullmatch(x):
                raise ValueError(
                    f"compact range state: hash {i} is not a {2 * HASH_SIZE}-character hex string"
                )
            hashes.append(bytes.fromhex(x))
        rng = cls()
        rng._size = size
        rng._hashes = hashes
        return rng

    def __eq__(self, other: object) -> bool:
        """Two ranges are equal when they hold the same size and subtree hashes."""
        if not isinstance(other, CompactRange):
            return NotImplemented
        return self._size == other._size and self._hashes == other._hashes

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        """Short description with the size and the current root."""
        return f"CompactRange(size={self._size}, root={self.root().hex()})"


def perfect_subtree_levels(hashes: Sequence[bytes]) -> list[list[bytes]]:
    """All perfect-subtree hashes: level 0 is the leaf hashes, level L index i covers leaves [i*2^L, (i+1)*2^L).

    About n node hashes in all; afterwards the root of any prefix is O(log n) (`prefix_root`).
    """
    levels = [list(hashes)]
    sha = hashlib.sha256
    while len(levels[-1]) > 1:
        prev = levels[-1]
        levels.append([sha(b"\x01" + prev[i] + prev[i + 1]).digest() for i in range(0, len(prev) - 1, 2)])
    return levels


def _levels_range_root(levels: Sequence[Sequence[bytes]], lo: int, hi: int) -> bytes:
    """MTH(D[lo:hi]) for a range as RFC 9162's recursion visits it (`lo` aligned to the range's split sizes), from
    its perfect subtrees, largest first, folded right to left: O(log n)."""
    size = hi - lo
    if size == 0:
        return EMPTY_ROOT
    if hi > len(levels[0]):
        raise ValueError(f"range end {hi} exceeds the {len(levels[0])} leaves")
    parts, offset = [], lo
    for level in range(size.bit_length() - 1, -1, -1):
        if size >> level & 1:
            parts.append(levels[level][offset >> level])
            offset += 1 << level
    root = parts[-1]
    for h in reversed(parts[:-1]):
        root = node_hash(h, root)
    return root


def prefix_root(levels: Sequence[Sequence[bytes]], size: int) -> bytes:
    """RFC 9162 root of the first `size` leaves, from `perfect_subtree_levels` (a size must not exceed the leaves)."""
    return _levels_range_root(levels, 0, size)


def consistency_proof_from_levels(
    levels: Sequence[Sequence[bytes]], old_size: int, new_size: int
) -> list[bytes]:
    """RFC 9162 consistency proof between the first `old_size` and `new_size` leaves, in O(log² n) hashes."""
    if not 0 <= old_size <= new_size <= len(levels[0]):
        raise ValueError(f"sizes {old_size} <= {new_size} must not exceed the {len(levels[0])} leaves")
    out: list[bytes] = []
    if 0 < old_size < new_size:
        _subproof(lambda lo, hi: _levels_range_root(levels, lo, hi), old_size, 0, new_size, True, out)
    return out


def inclusion_proof_from_levels(levels: Sequence[Sequence[bytes]], index: int, tree_size: int) -> list[bytes]:
    """RFC 9162 inclusion proof of leaf `index` in the tree of the first `tree_size` leaves, in O(log² n)."""
    if not 0 <= index < tree_size <= len(levels[0]):
        raise ValueError(f"leaf index {index} out of range for tree size {tree_size}")
    out: list[bytes] = []
    _path(lambda lo, hi: _levels_range_root(levels, lo, hi), index, 0, tree_size, out)
    return out
