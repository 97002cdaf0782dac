"""PNG thumbnails for recorded samples."""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from PIL import Image


def png_bytes(image: np.ndarray, *, scale: int = 1) -> bytes:
    """Encode one image (H, W) or (H, W, 3|4), uint8 or float in [0, 1], as PNG, upscaled by `scale` (nearest)."""
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        arr = np.clip(np.rint(arr.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)
    img = Image.fromarray(arr)
    if scale != 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def as_png_list(thumbnails: Sequence[bytes] | np.ndarray, *, scale: int = 1) -> list[bytes]:
    """Accept ready PNG bytes or an image array (N, H, W[, C]) and return one PNG per sample."""
    if isinstance(thumbnails, np.ndarray):
        return [png_bytes(img, scale=scale) for img in thumbnails]
    out = [bytes(t) for t in thumbnails]
    for t in out:
        if not t.startswith(b"\x89PNG\r\n\x1a\n"):
            raise ValueError("thumbnails must be PNG bytes or an image array")
    return out
