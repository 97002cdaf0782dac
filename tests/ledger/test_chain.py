"""Tests for the hash chain c_i = SHA-256(c_{i-1} || leaf_hash_i)."""

from __future__ import annotations

import hashlib

import pytest

from fgtrac_core.ledger.chain import GENESIS, chain_hashes, chain_head, chain_step, first_chain_mismatch


def _hashes(n: int) -> list[bytes]:
    return [hashlib.sha256(b"\x00" + str(i).encode()).digest() for i in range(n)]


def test_genesis_is_32_zero_bytes() -> None:
    assert GENESIS == b"\x00" * 32
    assert chain_head([]) == GENESIS


def test_chain_step_definition() -> None:
    h = _hashes(1)[0]
    assert chain_step(GENESIS, h) == hashlib.sha256(GENESIS + h).digest()


def test_chain_head_equals_folded_steps_and_last_of_chain_hashes() -> None:
    hs = _hashes(50)
    c = GENESIS
    expected = []
    for h in hs:
        c = chain_step(c, h)
        expected.append(c)
    assert chain_hashes(hs) == expected
    assert chain_head(hs) == expected[-1]
    assert chain_head(iter(hs)) == expected[-1]


def test_resume_from_stored_value() -> None:
    hs = _hashes(30)
    mid = chain_head(hs[:12])
    assert chain_head(hs[12:], start=mid) == chain_head(hs)
    assert chain_hashes(hs[12:], start=mid) == chain_hashes(hs)[12:]


def test_order_matters() -> None:
    hs = _hashes(3)
    assert chain_head(hs) != chain_head([hs[1], hs[0], hs[2]])


def test_first_chain_mismatch() -> None:
    hs = _hashes(20)
    stored = chain_hashes(hs)
    assert first_chain_mismatch(hs, stored) is None
    assert first_chain_mismatch([], []) is None
    # A tampered leaf shows up at its own position.
    tampered = list(hs)
    tampered[7] = hashlib.sha256(b"evil").digest()
    assert first_chain_mismatch(tampered, stored) == 7
    # A tampered stored chain value shows up at its position.
    bad = list(stored)
    bad[11] = bytes(32)
    assert first_chain_mismatch(hs, bad) == 11
    # Deleting a leaf breaks the chain from that point on.
    assert first_chain_mismatch(hs[:5] + hs[6:], stored[:5] + stored[6:]) == 5
    # Length differences report the first position present in only one list.
    assert first_chain_mismatch(hs, stored[:15]) == 15
    assert first_chain_mismatch(hs[:15], stored) == 15
    assert first_chain_mismatch([], stored) == 0
    # A non-genesis start.
    assert first_chain_mismatch(hs[10:], stored[10:], start=stored[9]) is None
    assert first_chain_mismatch(hs[10:], stored[10:]) == 0


def test_bad_lengths_raise() -> None:
    h = _hashes(1)[0]
    with pytest.raises(ValueError, match="32 bytes"):
        chain_step(b"short", h)
    with pytest.raises(ValueError, match="32 bytes"):
        chain_step(GENESIS, h[:31])
    with pytest.raises(ValueError, match="leaf hash 1"):
        chain_head([h, b"x"])
    with pytest.raises(ValueError, match="leaf hash 1"):
        chain_hashes([h, b"x"])
    with pytest.raises(ValueError, match="chain start"):
        chain_head([h], start=b"")
    with pytest.raises(ValueError, match="leaf hash 0"):
        first_chain_mismatch([b"x"], [GENESIS])
