"""`fgtrac_core.batched`: structures of tensors indexed and split along their shared batch dimension."""

from __future__ import annotations

import torch

from fgtrac_core.batched import split, take


def test_take_and_split_index_every_tensor_along_the_batch() -> None:
    z, h = torch.randn(5, 3), torch.randn(5, 2)
    outputs = {"logits": z, "features": h, "note": "kept"}
    assert torch.equal(take(outputs, 2)["features"], h[2]) and take(outputs, 2)["note"] == "kept"
    assert take((z, h), None)[0].shape == (1, 5, 3)
    parts = split((z, h), [2, 3])
    assert [tuple(p[1].shape) for p in parts] == [(2, 2), (3, 2)] and torch.equal(parts[1][0], z[2:])
