"""Tests for the canonical, versioned entry encoding."""

from __future__ import annotations

import enum
import hashlib
import math
import struct
from collections import OrderedDict

import pytest

from fgtrac_core.ledger.encoding import (
    ENCODING_VERSION,
    decode_entry,
    encode_entry,
    encode_value,
    entry_leaf_hash,
)


def test_exact_bytes_of_a_simple_entry() -> None:
    data = encode_entry("sample", {"id": "s1", "label": 3, "w": 0.5, "ok": True, "note": None})
    assert data == b'{"id":"s1","kind":"sample","label":3,"note":null,"ok":true,"v":1,"w":0.5}'
    assert ENCODING_VERSION == 1


def test_round_trip() -> None:
    body = {
        "a": [1, 2.5, "x", None, False, {"nested": [[], {}]}],
        "big": 2**200,
        "neg": -(10**30),
        "empty": "",
        "deep": {"z": {"y": {"x": [0.1]}}},
    }
    data = encode_entry("batch", body)
    assert decode_entry(data) == ("batch", body)
    assert encode_entry(*decode_entry(data)) == data


def test_key_order_independence() -> None:
    a = {"b": 1, "a": {"y": 2, "x": 3}, "c": [3, 2, 1]}
    b = OrderedDict([("c", [3, 2, 1]), ("a", OrderedDict([("x", 3), ("y", 2)])), ("b", 1)])
    assert encode_entry("k", a) == encode_entry("k", b)
    # List order is significant.
    assert encode_entry("k", {"c": [1, 2, 3]}) != encode_entry("k", {"c": [3, 2, 1]})


def test_keys_sort_by_code_point() -> None:
    data = encode_entry("k", {"é": 1, "z": 2, "Z": 3, "a": 4, "\U0001f600": 5, "\uff21": 6})
    text = data.decode("utf-8")
    positions = [text.index(f'"{k}"') for k in ["Z", "a", "kind", "v", "z", "é", "\uff21", "\U0001f600"]]
    assert positions == sorted(positions)


def test_tuple_is_encoded_as_list() -> None:
    assert encode_entry("k", {"t": (1, 2)}) == encode_entry("k", {"t": [1, 2]})


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (0.1, "0.1"),
        (1e-300, "1e-300"),
        (-0.0, "-0.0"),
        (0.0, "0.0"),
        (1e20, "1e+20"),
        (1e16, "1e+16"),
        (1e15, "1000000000000000.0"),
        (1e-5, "1e-05"),
        (0.0001, "0.0001"),
        (1.0, "1.0"),
        (-2.5, "-2.5"),
        (123456789012345678.0, "1.2345678901234568e+17"),
        (5e-324, "5e-324"),
        (1.7976931348623157e308, "1.7976931348623157e+308"),
        (1 / 3, "0.3333333333333333"),
    ],
)
def test_float_spelling(value: float, text: str) -> None:
    data = encode_entry("f", {"x": value})
    assert data == b'{"kind":"f","v":1,"x":' + text.encode() + b"}"
    kind, body = decode_entry(data)
    decoded = body["x"]
    assert type(decoded) is float
    assert struct.pack(">d", decoded) == struct.pack(">d", value)  # bit-exact, keeps the sign of zero


def test_float_and_int_stay_distinct() -> None:
    assert encode_entry("k", {"x": 1}) != encode_entry("k", {"x": 1.0})
    assert type(decode_entry(encode_entry("k", {"x": 1.0}))[1]["x"]) is float
    assert type(decode_entry(encode_entry("k", {"x": 1}))[1]["x"]) is int


def test_large_ints() -> None:
    for n in (2**63, 2**64 + 1, -(2**128), 10**100, 10**4299):
        data = encode_entry("k", {"n": n})
        assert decode_entry(data)[1]["n"] == n
    assert encode_entry("k", {"n": 2**64}) == b'{"kind":"k","n":18446744073709551616,"v":1}'
    with pytest.raises(ValueError, match="4300"):
        encode_entry("k", {"n": 10**4300})


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nan_and_infinity_are_rejected(bad: float) -> None:
    with pytest.raises(ValueError, match="NaN"):
        encode_entry("k", {"x": bad})
    with pytest.raises(ValueError):
        encode_entry("k", {"x": [1.0, {"y": bad}]})


def test_nan_as_explicit_string_is_fine() -> None:
    for s in ("NaN", "Infinity", "-Infinity"):
        assert decode_entry(encode_entry("k", {"x": s}))[1]["x"] == s


@pytest.mark.parametrize("token", [b"NaN", b"Infinity", b"-Infinity"])
def test_decode_rejects_json_nan_tokens(token: bytes) -> None:
    with pytest.raises(ValueError):
        decode_entry(b'{"kind":"k","v":1,"x":' + token + b"}")


def test_unicode() -> None:
    body = {"text": "naïve café – 日本語 \U0001f600", "ctl": 'a\nb\t"c"\\\x00\x1f\x7f\u2028'}
    data = encode_entry("u", body)
    assert "日本語".encode() in data  # not \u-escaped
    assert b"\\u0000" in data and b"\\u001f" in data and b"\\n" in data and b"\\t" in data
    assert "\x7f\u2028".encode() in data  # only characters below U+0020 are escaped
    assert decode_entry(data) == ("u", body)
    with pytest.raises(ValueError, match="surrogate"):
        encode_entry("u", {"x": "\ud800"})


def test_rejected_types() -> None:
    for bad in (b"\x00\x01", bytearray(b"x"), {1, 2}, object(), 1 + 2j):
        with pytest.raises(TypeError):
            encode_entry("k", {"x": bad})
    with pytest.raises(TypeError, match="hex"):
        encode_entry("k", {"x": b"\x00"})
    with pytest.raises(TypeError, match="key"):
        encode_entry("k", {"x": {1: "a"}})
    with pytest.raises(TypeError):
        encode_entry("k", [("x", 1)])  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        encode_entry(3, {})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="non-empty"):
        encode_entry("", {})


def test_scalar_subclasses_become_base_types() -> None:
    class Colour(enum.IntEnum):
        RED = 1

    class Tag(str):
        pass

    assert encode_entry("k", {"c": Colour.RED, "t": Tag("a")}) == encode_entry("k", {"c": 1, "t": "a"})


@pytest.mark.parametrize("key", ["v", "kind"])
def test_reserved_keys(key: str) -> None:
    with pytest.raises(ValueError, match="reserved"):
        encode_entry("k", {key: 1})
    # Nested use is fine: only the top level is the envelope.
    assert decode_entry(encode_entry("k", {"inner": {key: 1}}))[1] == {"inner": {key: 1}}


def test_too_deep_nesting_is_rejected() -> None:
    value: object = 1
    for _ in range(100):
        value = [value]
    with pytest.raises(ValueError, match="deeper"):
        encode_entry("k", {"x": value})


@pytest.mark.parametrize(
    "data",
    [
        b'{"kind":"k","v":1,"x":1} ',  # trailing whitespace
        b' {"kind":"k","v":1,"x":1}',  # leading whitespace
        b'{"kind": "k","v":1,"x":1}',  # space after colon
        b'{"v":1,"kind":"k","x":1}',  # key order
        b'{"kind":"k","v":1,"x":1.0e+20}',  # float spelling
        b'{"kind":"k","v":1,"x":1E+20}',
        b'{"kind":"k","v":1,"x":100000000000000000000.0}',
        b'{"kind":"k","v":1,"x":-0}',  # -0 as int
        b'{"kind":"k","v":1,"x":0.10}',
        b'{"kind":"k","v":1,"x":01}',
        b'{"kind":"k","v":1,"x":"\\u00e9"}',  # needless escape
        b'{"kind":"k","v":1,"x":"\\/"}',
        b'{"kind":"k","v":1,"x":"\\u000A"}',  # uppercase hex escape (\n is the canonical form)
        b'{"kind":"k","v":1,"x":1,"x":1}',  # duplicate key
        b'{"kind":"k","v":true,"x":1}',  # version as bool
        b'{"kind":"k","v":1.0,"x":1}',
        b'{"kind":"k","v":2,"x":1}',  # unknown version
        b'{"kind":"","v":1}',
        b'{"v":1}',
        b'{"kind":"k"}',
        b'["kind","k"]',
        b"\xef\xbb\xbf" + b'{"kind":"k","v":1}',  # BOM
        b'{"kind":"k","v":1,"x":"\xff"}',  # invalid UTF-8
        b"",
        b"{",
    ],
)
def test_decode_rejects_non_canonical(data: bytes) -> None:
    with pytest.raises(ValueError):
        decode_entry(data)


def test_decode_accepts_canonical_and_bytes_like() -> None:
    data = b'{"kind":"k","v":1,"x":"\\n"}'
    assert decode_entry(data) == ("k", {"x": "\n"})
    assert decode_entry(bytearray(data)) == ("k", {"x": "\n"})
    with pytest.raises(TypeError):
        decode_entry(data.decode())  # type: ignore[arg-type]


def test_encode_value_and_entry_leaf_hash() -> None:
    assert encode_value({"b": [1.5, None], "a": "x"}) == b'{"a":"x","b":[1.5,null]}'
    data = encode_entry("k", {"x": 1})
    assert entry_leaf_hash("k", {"x": 1}) == hashlib.sha256(b"\x00" + data).digest()
