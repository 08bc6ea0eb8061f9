"""Image decoding (issue 7): bad files fail with one line; odd but valid images work."""

from __future__ import annotations

import io

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from kanoclip.errors import ImageError
from kanoclip.images import MAX_PIXELS, load_image, preprocess


def _png_bytes(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _one_line(exc: pytest.ExceptionInfo, *needles: str) -> None:
    message = str(exc.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message


def test_truncated_file(tmp_path):
    path = tmp_path / "cut.png"
    path.write_bytes(_png_bytes(Image.new("RGB", (64, 64), "red"))[:80])
    with pytest.raises(ImageError) as info:
        load_image(path)
    _one_line(info, str(path), "corrupt or truncated")


def test_text_file_with_an_image_extension(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("this is not an image\n")
    with pytest.raises(ImageError) as info:
        load_image(str(path))
    _one_line(info, str(path), "not an image")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    with pytest.raises(ImageError) as info:
        load_image(path)
    _one_line(info, str(path), "empty")


def test_missing_file(tmp_path):
    with pytest.raises(ImageError, match="no such file"):
        load_image(tmp_path / "nope.png")


def test_decompression_bomb_is_refused_from_the_header(tmp_path):
    """A 12000x12000 PNG of zeros is ~150 KB on disk but 144 megapixels."""
    import tracemalloc
    import zlib

    width = height = 12_000
    raw_row = b"\x00" + b"\x00" * width  # filter byte + greyscale pixels
    compressor = zlib.compressobj(9)
    data = b"".join(compressor.compress(raw_row) for _ in range(height)) + compressor.flush()

    def chunk(kind: bytes, body: bytes) -> bytes:
        return len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")

    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")
    path = tmp_path / "bomb.png"
    path.write_bytes(png)
    assert width * height > MAX_PIXELS
    tracemalloc.start()
    with pytest.raises(ImageError) as info:
        load_image(path)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    _one_line(info, str(path), "megapixel")
    assert peak < 50_000_000  # refused before decoding 144 MB of pixels


def test_too_small_is_refused_clearly():
    with pytest.raises(ImageError, match="at least 16"):
        load_image(np.zeros((8, 300, 3), np.uint8))


def test_extreme_aspect_ratio_works(tiny_model):
    det = tiny_model.detect(np.full((16, 2000, 3), 200, np.uint8), "cable")
    assert det.anomaly_map.shape == (16, 2000)


def test_sixteen_bit_png_is_rescaled():
    array = (np.linspace(0, 65535, 64 * 64).reshape(64, 64)).astype(np.uint16)
    image = load_image(_png_bytes(Image.fromarray(array)))
    rgb = np.asarray(image)
    assert image.mode == "RGB" and rgb[0, 0, 0] == 0 and rgb[-1, -1, 0] == 255


def test_greyscale_palette_and_cmyk():
    grey = load_image(_png_bytes(Image.new("L", (40, 30), 77)))
    assert grey.mode == "RGB" and grey.getpixel((0, 0)) == (77, 77, 77)
    palette = Image.new("P", (40, 30))
    palette.putpalette([10, 20, 30] * 256)
    assert load_image(_png_bytes(palette)).getpixel((5, 5)) == (10, 20, 30)
    cmyk = load_image(_png_bytes(Image.new("CMYK", (40, 30), (0, 255, 255, 0)), fmt="JPEG"))
    r, g, b = cmyk.getpixel((5, 5))
    assert cmyk.mode == "RGB" and r > 200 and g < 60 and b < 60  # pure red in CMYK


def test_rgba_is_composited_on_neutral_grey():
    rgba = Image.new("RGBA", (32, 32), (255, 0, 0, 0))  # fully transparent red
    rgba.putpixel((0, 0), (255, 0, 0, 255))
    image = load_image(_png_bytes(rgba))
    assert image.getpixel((5, 5)) == (128, 128, 128)
    assert image.getpixel((0, 0)) == (255, 0, 0)


def test_exif_rotation_is_applied(tiny_model):
    """A 60x30 photo stored landscape with EXIF orientation 6 is displayed 30 wide, 60 high."""
    stored = Image.new("RGB", (60, 30), "white")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    data = _png_bytes(stored, fmt="JPEG", exif=exif.tobytes())
    assert load_image(data).size == (30, 60)
    assert tiny_model.detect(data, "wood").anomaly_map.shape == (60, 30)


@settings(max_examples=60, deadline=None)
@given(
    hnp.arrays(
        dtype=st.sampled_from([np.uint8, np.uint16, np.float32, np.float64, np.bool_, np.int32, np.int8, np.complex64]),
        shape=st.one_of(
            hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=40),
            st.tuples(st.integers(1, 40), st.integers(1, 40), st.sampled_from([1, 2, 3, 4, 5])),
            hnp.array_shapes(min_dims=1, max_dims=4, min_side=1, max_side=6),
        ),
    )
)
def test_any_array_gives_an_image_or_a_clear_error(array):
    try:
        image = load_image(array)
    except ImageError as exc:
        assert "\n" not in str(exc) and str(exc).startswith("array(")
        return
    assert image.mode == "RGB"
    assert image.size == (array.shape[1], array.shape[0])
    batch = preprocess([image], 28, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    assert batch.shape == (1, 3, 28, 28) and bool(batch.isfinite().all())
