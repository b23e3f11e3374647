"""replan.images: every input mode becomes 8-bit RGB; unreadable files and bad sizes are ValueErrors."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from replan.images import MAX_PIXELS, MIN_SIDE, check_image_size, load_image, to_rgb

WHITE = (255, 255, 255)


def px(image: Image.Image, x: int, y: int = 0):
    return image.getpixel((x, y))


def assert_rgb(out: Image.Image, size) -> None:
    assert isinstance(out, Image.Image)
    assert out.mode == "RGB"
    assert out.size == size


# ==================================================================================================== to_rgb
def test_rgb_is_returned_as_is():
    image = Image.new("RGB", (3, 2), (1, 2, 3))
    assert to_rgb(image) is image


def test_rgba_transparent_becomes_white_opaque_keeps_colour():
    image = Image.new("RGBA", (4, 1))
    image.putpixel((0, 0), (10, 20, 30, 0))  # transparent, with an arbitrary colour underneath
    image.putpixel((1, 0), (200, 100, 50, 255))  # opaque
    image.putpixel((2, 0), (0, 0, 0, 128))  # half-transparent black over white
    image.putpixel((3, 0), (0, 0, 0, 0))
    out = to_rgb(image)
    assert_rgb(out, (4, 1))
    assert px(out, 0) == WHITE
    assert px(out, 1) == (200, 100, 50)
    assert all(abs(v - 127) <= 1 for v in px(out, 2))
    assert px(out, 3) == WHITE


def test_la_transparent_becomes_white_opaque_keeps_grey():
    image = Image.new("LA", (3, 1))
    image.putpixel((0, 0), (50, 0))
    image.putpixel((1, 0), (50, 255))
    image.putpixel((2, 0), (200, 255))
    out = to_rgb(image)
    assert_rgb(out, (3, 1))
    assert [px(out, x) for x in range(3)] == [WHITE, (50, 50, 50), (200, 200, 200)]


def test_premultiplied_la_is_converted():
    image = Image.new("LA", (2, 1))
    image.putpixel((0, 0), (50, 0))
    image.putpixel((1, 0), (90, 255))
    out = to_rgb(image.convert("La"))
    assert_rgb(out, (2, 1))
    assert px(out, 0) == WHITE and px(out, 1) == (90, 90, 90)


def test_rgba_premultiplied_is_composited():
    image = Image.new("RGBA", (2, 1))
    image.putpixel((0, 0), (10, 20, 30, 0))
    image.putpixel((1, 0), (200, 100, 50, 255))
    out = to_rgb(image.convert("RGBa"))
    assert px(out, 0) == WHITE and px(out, 1) == (200, 100, 50)


def test_l_and_1_are_replicated():
    image = Image.new("L", (2, 1))
    image.putpixel((0, 0), 77)
    image.putpixel((1, 0), 0)
    out = to_rgb(image)
    assert_rgb(out, (2, 1))
    assert [px(out, 0), px(out, 1)] == [(77, 77, 77), (0, 0, 0)]
    bw = to_rgb(image.point(lambda v: 255 if v else 0).convert("1"))
    assert [px(bw, 0), px(bw, 1)] == [WHITE, (0, 0, 0)]


def _palette_image() -> Image.Image:
    image = Image.new("P", (3, 1))
    image.putpalette([10, 20, 30, 200, 100, 50, 0, 255, 0] + [0] * (256 * 3 - 9))
    for x, index in enumerate([0, 1, 2]):
        image.putpixel((x, 0), index)
    return image


def test_palette_without_transparency():
    out = to_rgb(_palette_image())
    assert_rgb(out, (3, 1))
    assert [px(out, x) for x in range(3)] == [(10, 20, 30), (200, 100, 50), (0, 255, 0)]


def test_palette_with_transparent_index():
    image = _palette_image()
    image.info["transparency"] = 0
    out = to_rgb(image)
    assert [px(out, x) for x in range(3)] == [WHITE, (200, 100, 50), (0, 255, 0)]


def test_palette_with_transparency_from_a_png_file(tmp_path):
    image = _palette_image()
    path = tmp_path / "p.png"
    image.save(path, transparency=bytes([0, 255, 255]))  # tRNS: index 0 fully transparent
    for out in (to_rgb(Image.open(path)), load_image(path)):
        assert_rgb(out, (3, 1))
        assert [px(out, x) for x in range(3)] == [WHITE, (200, 100, 50), (0, 255, 0)]


def i16(values: list[int]) -> Image.Image:
    return Image.frombytes("I;16", (len(values), 1), np.array(values, dtype="<u2").tobytes())


def test_i16_scaled_to_8_bit():
    image = i16([0, 65535, 32768, 257, 255])
    assert image.mode == "I;16"
    out = to_rgb(image)
    assert_rgb(out, (5, 1))
    assert [px(out, x)[0] for x in range(5)] == [0, 255, 128, 1, 1]
    assert all(len(set(px(out, x))) == 1 for x in range(5))


def test_i16_all_dark_is_not_stretched():
    out = to_rgb(i16([0, 255]))
    assert [px(out, x)[0] for x in range(2)] == [0, 1]  # 255/65535 of full scale


def test_i32_within_8_bit_range_is_kept():
    values = np.arange(256, dtype=np.int32).reshape(1, 256)
    image = Image.fromarray(values)
    assert image.mode == "I"
    out = to_rgb(image)
    assert_rgb(out, (256, 1))
    assert np.array_equal(np.asarray(out)[..., 0], values.astype(np.uint8))
    assert np.array_equal(np.asarray(out)[..., 1], np.asarray(out)[..., 2])


def test_i32_with_16_bit_values_scaled_by_65535():
    out = to_rgb(Image.fromarray(np.array([[0, 1000, 65535]], dtype=np.int32)))
    assert [px(out, x)[0] for x in range(3)] == [0, 4, 255]


def test_i32_above_16_bit_scaled_by_maximum_and_negatives_clipped():
    out = to_rgb(Image.fromarray(np.array([[-5, 50000, 100000]], dtype=np.int32)))
    assert [px(out, x)[0] for x in range(3)] == [0, 128, 255]


def test_float_in_unit_range():
    out = to_rgb(Image.fromarray(np.array([[0.0, 1.0, 0.5, 0.25]], dtype=np.float32)))
    assert_rgb(out, (4, 1))
    assert [px(out, x) for x in range(4)] == [(0, 0, 0), WHITE, (128, 128, 128), (64, 64, 64)]


def test_float_in_8_bit_range_and_clipped():
    out = to_rgb(Image.fromarray(np.array([[0.0, 200.0, 300.0, -4.0]], dtype=np.float32)))
    assert [px(out, x)[0] for x in range(4)] == [0, 200, 255, 0]


def test_cmyk():
    image = Image.new("CMYK", (3, 1))
    image.putpixel((0, 0), (0, 0, 0, 0))  # no ink: white
    image.putpixel((1, 0), (255, 0, 0, 0))  # cyan
    image.putpixel((2, 0), (0, 0, 0, 255))  # black
    out = to_rgb(image)
    assert_rgb(out, (3, 1))
    assert [px(out, x) for x in range(3)] == [WHITE, (0, 255, 255), (0, 0, 0)]


@pytest.mark.parametrize("mode", ["YCbCr", "LAB", "HSV", "RGBX", "PA", "I;16B"])
def test_other_modes_become_rgb(mode):
    out = to_rgb(Image.new(mode, (5, 4)))
    assert_rgb(out, (5, 4))


def test_to_rgb_rejects_non_images():
    with pytest.raises(ValueError, match="expected a PIL image, got ndarray"):
        to_rgb(np.zeros((4, 4, 3), dtype=np.uint8))


# ==================================================================================================== load_image
def test_load_image_reads_and_converts(tmp_path):
    path = tmp_path / "a.png"
    image = Image.new("RGBA", (70, 80), (0, 0, 0, 0))
    image.putpixel((1, 1), (9, 8, 7, 255))
    image.save(path)
    out = load_image(path)
    assert_rgb(out, (70, 80))
    assert px(out, 0) == WHITE and px(out, 1, 1) == (9, 8, 7)
    assert load_image(str(path)).tobytes() == out.tobytes()


def test_load_image_accepts_a_pil_image():
    out = load_image(Image.new("L", (3, 3), 40))
    assert_rgb(out, (3, 3))
    assert px(out, 0) == (40, 40, 40)


def test_load_image_missing_path(tmp_path):
    path = tmp_path / "missing.png"
    with pytest.raises(ValueError, match="does not exist") as info:
        load_image(path)
    assert str(path) in str(info.value)
    with pytest.raises(ValueError, match="does not exist"):
        load_image(tmp_path)  # a directory


@pytest.mark.parametrize(
    "content",
    [b"this is not an image\n", b"", b"\x89PNG\r\n\x1a\n" + b"\x00" * 10],
    ids=["text", "empty", "png-signature-only"],
)
def test_load_image_non_image_file(tmp_path, content):
    path = tmp_path / "plan.png"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="cannot read image") as info:
        load_image(path)
    assert str(path) in str(info.value)


def test_load_image_truncated_file(tmp_path):
    path = tmp_path / "t.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cannot read image") as info:
        load_image(path)
    assert str(path) in str(info.value)


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def test_load_image_decompression_bomb(tmp_path):
    # a header claiming 30000 x 30000 pixels: PIL refuses to open it (DecompressionBombError)
    header = struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)
    path = tmp_path / "bomb.png"
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", zlib.compress(b"")) + _png_chunk(
            b"IEND", b""
        )
    )
    with pytest.raises(ValueError, match="cannot read image") as info:
        load_image(path)
    assert str(path) in str(info.value)


# ==================================================================================================== sizes
@pytest.mark.parametrize("size", [(MIN_SIDE, MIN_SIDE), (1024, 768), (4096, 4096), (MAX_PIXELS // 64, 64)])
def test_check_image_size_accepts(size):
    check_image_size(size)


@pytest.mark.parametrize("size", [(63, 100), (100, 63), (1, 1), (0, 500), (10_000, 10)])
def test_check_image_size_too_small(size):
    with pytest.raises(ValueError, match=f"image is {size[0]}x{size[1]}; both sides must be at least 64 px"):
        check_image_size(size)


@pytest.mark.parametrize("size", [(4097, 4096), (4096, 4097), (8000, 6000), (MAX_PIXELS // 64 + 1, 64)])
def test_check_image_size_too_large(size):
    with pytest.raises(ValueError, match=r"MP; the limit is 16\.8 MP \(4096x4096\): downscale it first") as info:
        check_image_size(size)
    assert f"image is {size[0]}x{size[1]}" in str(info.value)


def test_check_image_size_custom_limits():
    check_image_size((32, 32), min_side=32)
    with pytest.raises(ValueError, match="at least 128 px"):
        check_image_size((100, 200), min_side=128)
    with pytest.raises(ValueError, match="limit is 9999 pixels: downscale"):
        check_image_size((100, 100), max_pixels=9_999)
