"""Tamper-evident ledger core: canonical entry encoding, RFC 9162 Merkle tree, hash chain, Ed25519 tree heads.

Uses only the standard library and ``cryptography`` so that a third party can verify proofs offline with a
minimal install.  The formats are specified in ``docs/ledger.md``.
"""

from __future__ import annotations

from .chain import GENESIS, chain_hashes, chain_head, chain_step, first_chain_mismatch
from .encoding import (
    ENCODING_VERSION,
    RESERVED_KEYS,
    decode_entry,
    encode_entry,
    encode_value,
    entry_leaf_hash,
)
from .merkle import (
    EMPTY_ROOT,
    HASH_SIZE,
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
from .signing import (
    KEY_FILENAME,
    STH_FORMAT,
    KeyFileError,
    MissingKeyError,
    SignedTreeHead,
    default_key_dir,
    fingerprint,
    load_or_create_signing_key,
    load_public_key,
    load_signing_key,
    public_key_pem,
    sign_tree_head,
    tree_head_message,
    utc_timestamp,
    verify_tree_head,
)

__all__ = [
    "EMPTY_ROOT",
    "ENCODING_VERSION",
    "GENESIS",
    "HASH_SIZE",
    "KEY_FILENAME",
    "RESERVED_KEYS",
    "STH_FORMAT",
    "CompactRange",
    "KeyFileError",
    "MissingKeyError",
    "SignedTreeHead",
    "chain_hashes",
    "chain_head",
    "chain_step",
    "consistency_proof",
    "consistency_proof_from_leaf_hashes",
    "decode_entry",
    "default_key_dir",
    "encode_entry",
    "encode_value",
    "entry_leaf_hash",
    "fingerprint",
    "first_chain_mismatch",
    "inclusion_proof",
    "inclusion_proof_from_leaf_hashes",
    "leaf_hash",
    "load_or_create_signing_key",
    "load_public_key",
    "load_signing_key",
    "merkle_root",
    "node_hash",
    "public_key_pem",
    "root_from_leaf_hashes",
    "sign_tree_head",
    "tree_head_message",
    "utc_timestamp",
    "verify_consistency",
    "verify_inclusion",
    "verify_inclusion_leaf_hash",
    "verify_tree_head",
]
