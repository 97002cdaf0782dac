"""Thumbnails are valid PNGs that Pillow (the reference decoder) reads back to the recorded pixels."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from fgtrac_core.tracking import thumbnails
from fgtrac_core.tracking.thumbnails import as_png_list, encode_pngs

MODES = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}


def _decoded(png: bytes) -> tuple[str, np.ndarray]:
    img = Image.open(io.BytesIO(png))
    img.load()  # checks every chunk's CRC and the zlib stream
    return img.mode, np.asarray(img)


@pytest.mark.parametrize("channels", [None, 1, 2, 3, 4])
@pytest.mark.parametrize("scale", [1, 3])
def test_pixels_round_trip(channels: int | None, scale: int) -> None:
    rng = np.random.default_rng(0)
    shape = (5, 7, 4) if channels is None else (5, 7, 4, channels)
    images = rng.integers(0, 256, shape, dtype=np.uint8)
    pngs = encode_pngs(images, scale=scale)
    assert len(pngs) == 5
    for img, png in zip(images, pngs, strict=True):
        mode, pixels = _decoded(png)
        want = img.repeat(scale, axis=0).repeat(scale, axis=1)
        if channels in (None, 1):
            want = want.reshape(want.shape[:2])
        assert mode == MODES[channels or 1]
        np.testing.assert_array_equal(pixels, want)


def test_float_images_are_scaled_to_0_255() -> None:
    images = np.array([[[0.0, 0.5], [1.0, 2.0]], [[-1.0, 0.25], [0.999, 0.0]]])
    got = [_decoded(p)[1] for p in encode_pngs(images)]
    np.testing.assert_array_equal(got[0], [[0, 128], [255, 255]])
    np.testing.assert_array_equal(got[1], [[0, 64], [255, 0]])


def test_many_images_in_several_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(thumbnails, "_CHUNK_IMAGES", 3)
    images = np.arange(10 * 4 * 4, dtype=np.uint8).reshape(10, 4, 4)
    got = [_decoded(p)[1] for p in encode_pngs(images, scale=2)]
    np.testing.assert_array_equal(got, images.repeat(2, axis=1).repeat(2, axis=2))


@pytest.mark.parametrize("shape", [(3, 5), (2, 3, 28, 28), (2, 4, 4, 5), (2, 0, 4)])
def test_other_shapes_are_refused(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="thumbnails must be an image array"):
        encode_pngs(np.zeros(shape, np.uint8))


@pytest.mark.parametrize("scale", [0, -1, 1.5, True])
def test_bad_scale_is_refused(scale: object) -> None:
    with pytest.raises(ValueError, match="thumbnail_scale"):
        encode_pngs(np.zeros((1, 2, 2), np.uint8), scale=scale)  # type: ignore[arg-type]


def test_ready_pngs_pass_through_and_other_bytes_are_refused() -> None:
    png = encode_pngs(np.zeros((1, 2, 2), np.uint8))[0]
    assert as_png_list([png]) == [png]
    with pytest.raises(ValueError, match="PNG bytes"):
        as_png_list([b"GIF89a"])
