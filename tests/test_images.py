"""Input images: bucket tables from the spec, crop offsets and pixel values computed by hand, every bad input named.

Expected values here are written out by hand (comments show the arithmetic), never produced by
`framepack.images` itself. Files are built with PIL or, where PIL cannot write them (16-bit RGB, a
header lying about its size), byte by byte from the PNG specification.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from framepack.images import (
    BUCKETS_640,
    MAX_PIXELS,
    MIN_SIDE,
    ImageError,
    buckets,
    load_image,
    nearest_bucket,
    prepare_image,
    resize_and_center_crop,
)

# spec §2 step 3, copied by hand
SPEC_BUCKETS_640 = [
    (416, 960), (448, 864), (480, 832), (512, 768), (544, 704), (576, 672), (608, 640),
    (640, 608), (672, 576), (704, 544), (768, 512), (832, 480), (864, 448), (960, 416),
]  # fmt: skip


def _png(width: int, height: int, bit_depth: int, colour_type: int, raw_rows: bytes) -> bytes:
    """A PNG file: signature, IHDR, one IDAT (zlib of the filtered rows), IEND, each chunk with its CRC."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw_rows)) + chunk(b"IEND", b"")


def _png16(pixels: np.ndarray) -> bytes:
    """16-bit greyscale (H, W) or RGB (H, W, 3) PNG; each row is filter byte 0 + big-endian samples."""
    colour_type = 0 if pixels.ndim == 2 else 2
    h, w = pixels.shape[:2]
    rows = b"".join(b"\x00" + pixels[y].astype(">u2").tobytes() for y in range(h))
    return _png(w, h, 16, colour_type, rows)


def _encode(image: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def _message(source) -> str:
    with pytest.raises(ImageError) as info:
        load_image(source)
    return str(info.value)


# ------------------------------------------------------------------------------------------ buckets
def test_buckets_640_is_the_spec_list():
    assert list(BUCKETS_640) == SPEC_BUCKETS_640
    assert buckets() is BUCKETS_640 and buckets(640) is BUCKETS_640


@pytest.mark.parametrize(
    "hw, expected",
    [
        # square: (608,640) and (640,608) both give |H*640 - W*608| = 32H; the later one wins
        ((1000, 1000), (640, 608)),
        ((640, 640), (640, 608)),
        # 16:9 landscape, metric / 120 = |9 bw - 16 bh|: 1984, 608, 192 (480x832), 1280, ...
        ((1080, 1920), (480, 832)),
        ((1920, 1080), (832, 480)),  # 9:16, the mirror image
        ((512, 768), (512, 768)),  # exact bucket (metric 0)
        ((1024, 1536), (512, 768)),  # same aspect, twice the size
        ((960, 416), (960, 416)),
        # tie between the first two: 450*960 - 950*416 = 36800 and 450*864 - 950*448 = -36800;
        # (480, 832) gives 81600. The later of the tied pair wins.
        ((450, 950), (448, 864)),
        ((100, 1000), (416, 960)),  # wider than any bucket -> the widest
        ((1000, 100), (960, 416)),
    ],
)
def test_nearest_bucket_table(hw, expected):
    assert nearest_bucket(*hw) == expected


def test_buckets_for_other_bases_by_hand():
    # base 320: each side / 2, rounded to a multiple of 32 with halves up, e.g. 416/2 = 208 -> 224,
    # 864/2 = 432 -> 448, 672/2 = 336 -> 352; repeats ((288,352) twice, (320,320) twice...) dropped.
    assert buckets(320) == (
        (224, 480), (224, 448), (256, 416), (256, 384), (288, 352), (320, 320),
        (352, 288), (384, 256), (416, 256), (448, 224), (480, 224),
    )  # fmt: skip
    # base 128: sides * 0.2, e.g. 416 -> 83.2 -> 96, 864 -> 172.8 -> 160, 576 -> 115.2 -> 128.
    assert buckets(128) == ((96, 192), (96, 160), (96, 128), (128, 128), (128, 96), (160, 96), (192, 96))
    # base 64: sides * 0.1, e.g. 416 -> 41.6 -> 32, 480 -> 48 -> 64 (a half, up), 832 -> 83.2 -> 96.
    assert buckets(64) == ((32, 96), (64, 96), (64, 64), (96, 64), (96, 32))
    # base 1280: every official side doubles exactly.
    assert buckets(1280) == tuple((2 * h, 2 * w) for h, w in SPEC_BUCKETS_640)
    assert nearest_bucket(1000, 1000, 320) == (320, 320)
    assert nearest_bucket(1080, 1920, 128) == (96, 160)  # |1080*160 - 1920*96| = 11520, the smallest


@pytest.mark.parametrize("base", range(64, 1281, 32))
def test_every_base_gives_a_symmetric_list_of_multiples_of_32(base):
    table = buckets(base)
    assert len(set(table)) == len(table)
    assert all(h % 32 == 0 and w % 32 == 0 for h, w in table)
    assert [(w, h) for h, w in reversed(table)] == list(table)  # portrait list mirrors landscape list


@pytest.mark.parametrize("base", [0, 32, 100, 650, 1312, -640, 640.0, "640", True, None])
def test_bad_bases_are_refused(base):
    with pytest.raises(ImageError, match=r"multiple of 32 from 64 to 1280"):
        buckets(base)
    with pytest.raises(ImageError, match=r"multiple of 32 from 64 to 1280"):
        nearest_bucket(100, 100, base)


@pytest.mark.parametrize("hw", [(0, 100), (100, -1), (1.5, 100), ("1", 100)])
def test_nearest_bucket_refuses_non_positive_sizes(hw):
    with pytest.raises(ImageError, match="positive integer"):
        nearest_bucket(*hw)


# ------------------------------------------------------------------------------------ resize + crop
def _columns(h: int, w: int) -> np.ndarray:
    """(h, w, 3) uint8 whose every pixel holds its column index."""
    return np.broadcast_to(np.arange(w, dtype=np.uint8)[None, :, None], (h, w, 3)).copy()


def test_resize_and_crop_unchanged_when_already_sized():
    image = _columns(64, 96)
    assert resize_and_center_crop(image, 64, 96) is image


@pytest.mark.parametrize(
    "width, target_w, first_col",
    [
        (101, 64, 18),  # (101 - 64) / 2 = 18.5, PIL's round() -> 18 (half to even): columns 18..81
        (103, 64, 20),  # 19.5 -> 20: columns 20..83
        (100, 64, 18),  # 18 exactly
        (100, 33, 34),  # odd target: 33.5 -> 34, and still exactly 33 columns wide
    ],
)
def test_crop_offset_columns(width, target_w, first_col):
    # Height already matches, so the scale is max(target_w / width, 40 / 40) = 1: no resampling at all.
    out = resize_and_center_crop(_columns(40, width), 40, target_w)
    assert out.shape == (40, target_w, 3) and out.dtype == np.uint8
    assert (out[..., 0] == np.arange(first_col, first_col + target_w)[None, :]).all()


def test_crop_offset_rows():
    rows = np.broadcast_to(np.arange(77, dtype=np.uint8)[:, None, None], (77, 40, 3)).copy()
    out = resize_and_center_crop(rows, 40, 40)  # scale 1; (77 - 40) / 2 = 18.5 -> 18: rows 18..57
    assert (out[..., 1] == np.arange(18, 58)[:, None]).all()


def test_resize_scale_and_crop_on_a_ramp():
    # 100x200 ramp (value = column) to 64x96: scale = max(96/200, 64/100) = 0.64 -> 128x64 resized,
    # crop left = (128 - 96) / 2 = 16. Output column j samples source x = (j + 16 + 0.5) / 0.64 - 0.5,
    # and LANCZOS keeps a linear ramp linear to within rounding.
    out = resize_and_center_crop(_columns(100, 200), 64, 96)
    assert out.shape == (64, 96, 3)
    expected = (np.arange(96) + 16.5) / 0.64 - 0.5
    assert np.abs(out[..., 0].astype(float) - expected[None, :]).max() <= 1.0
    assert (out == out[:1]).all()  # vertical is constant, so every row is the same


def _lanczos3_resample(row: np.ndarray, out_len: int) -> np.ndarray:
    """Textbook Lanczos-3 in float64 with pixel-centre alignment; the kernel widens by the factor when shrinking."""
    scale = len(row) / out_len
    stretch = max(scale, 1.0)
    out = np.empty(out_len)
    for i in range(out_len):
        centre = (i + 0.5) * scale  # in input pixel units, edges at integers
        xs = np.arange(max(int(centre - 3 * stretch), 0), min(int(centre + 3 * stretch) + 1, len(row)))
        d = (xs + 0.5 - centre) / stretch
        weights = np.where(np.abs(d) < 3, np.sinc(d) * np.sinc(d / 3), 0.0)
        out[i] = (weights * row[xs]).sum() / weights.sum()
    return out


def test_resize_is_lanczos():
    # Sharp steps make LANCZOS (ringing, 3-lobe support) differ from bicubic/bilinear/nearest by tens of levels.
    rng = np.random.default_rng(1)
    profile = np.repeat(rng.choice([30, 220], 50), rng.integers(3, 8, 50))[:150].astype(np.uint8)
    assert len(profile) == 150
    image = np.broadcast_to(profile[None, :, None], (40, 150, 3)).copy()
    # target 32x96: scale = max(96/150, 32/40) = 0.8 -> resized 120x32, crop left (120 - 96) / 2 = 12
    out = resize_and_center_crop(image, 32, 96)
    expected = np.clip(_lanczos3_resample(profile.astype(float), 120), 0, 255)[12:108]
    assert np.abs(out[..., 0].astype(float) - expected[None, :]).max() <= 1.0


def test_resize_upscales_to_cover():
    out = resize_and_center_crop(np.full((40, 50, 3), 200, np.uint8), 640, 608)
    assert out.shape == (640, 608, 3) and (out == 200).all()  # scale 16 -> 640x800, then crop the width


@pytest.mark.parametrize(
    "image", [np.zeros((40, 40), np.uint8), np.zeros((40, 40, 4), np.uint8), np.zeros((40, 40, 3)), [[1, 2, 3]]]
)
def test_resize_refuses_wrong_arrays(image):
    with pytest.raises(ImageError, match=r"\(H, W, 3\) uint8"):
        resize_and_center_crop(image, 32, 32)


# ------------------------------------------------------------------------------------------ loading
def _quadrants() -> np.ndarray:
    """48 tall x 64 wide: top-left red, top-right green, bottom-left blue, bottom-right white."""
    a = np.zeros((48, 64, 3), np.uint8)
    a[:24, :32] = (255, 0, 0)
    a[:24, 32:] = (0, 255, 0)
    a[24:, :32] = (0, 0, 255)
    a[24:, 32:] = (255, 255, 255)
    return a


@pytest.mark.parametrize(
    "orientation, upright",
    [
        (1, lambda a: a),
        (2, lambda a: a[:, ::-1]),  # mirrored horizontally
        (3, lambda a: np.rot90(a, 2)),
        (6, lambda a: np.rot90(a, -1)),  # EXIF 6: turn 90 degrees clockwise to display
        (8, lambda a: np.rot90(a, 1)),  # EXIF 8: 90 degrees counter-clockwise
    ],
)
def test_exif_orientation_png(orientation, upright):
    stored = _quadrants()
    exif = Image.Exif()
    exif[0x0112] = orientation
    out = load_image(_encode(Image.fromarray(stored), "PNG", exif=exif))
    assert np.array_equal(out, upright(stored))


def test_exif_orientation_jpeg(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "phone.jpg"
    Image.fromarray(_quadrants()).save(path, "JPEG", quality=95, exif=exif)
    out = load_image(path)
    assert out.shape == (64, 48, 3)  # stored 64 wide x 48 tall, displayed 48 wide x 64 tall
    # Clockwise turn: stored bottom-left (blue) becomes top-left, top-left (red) becomes top-right, ...
    for (y, x), colour in {(16, 12): (0, 0, 255), (16, 36): (255, 0, 0), (48, 12): (255, 255, 255),
                           (48, 36): (0, 255, 0)}.items():  # fmt: skip
        assert np.abs(out[y, x].astype(int) - colour).max() <= 40, (y, x, out[y, x])


# (r, g, b, alpha) -> over white: rgb * a/255 + 255 * (1 - a/255)
ALPHA_CASES = [
    ((10, 20, 30, 0), (255, 255, 255)),  # fully transparent: whatever colour is stored, white shows
    ((0, 0, 0, 128), (127, 127, 127)),  # 255 * 127/255
    ((200, 0, 100, 51), (244, 204, 224)),  # a = 0.2: 40 + 204, 0 + 204, 20 + 204
    ((1, 2, 3, 255), (1, 2, 3)),  # opaque: unchanged
]


def _rgba_stripes() -> np.ndarray:
    a = np.zeros((32, 32, 4), np.uint8)
    for i, (rgba, _) in enumerate(ALPHA_CASES):
        a[8 * i : 8 * i + 8] = rgba
    return a


@pytest.mark.parametrize("as_file", [False, True])
def test_rgba_composites_onto_white(as_file):
    source = _encode(Image.fromarray(_rgba_stripes(), "RGBA")) if as_file else _rgba_stripes()
    out = load_image(source)
    for i, (_, rgb) in enumerate(ALPHA_CASES):
        assert (out[8 * i : 8 * i + 8] == rgb).all(), (i, out[8 * i, 0])


def test_la_palette_and_colour_key_transparency():
    la = np.zeros((32, 32, 2), np.uint8)
    la[:16] = (100, 255)  # opaque grey 100
    la[16:] = (0, 0)  # transparent black
    out = load_image(_encode(Image.fromarray(la, "LA")))
    assert (out[:16] == 100).all() and (out[16:] == 255).all()

    pal = Image.new("P", (32, 32), 0)
    pal.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)  # index 0 red, index 1 green
    pal.paste(1, (0, 16, 32, 32))
    out = load_image(_encode(pal, transparency=1))  # index 1 transparent
    assert (out[:16] == (255, 0, 0)).all() and (out[16:] == 255).all()
    out = load_image(_encode(pal))  # the same palette without transparency: green stays green
    assert (out[16:] == (0, 255, 0)).all()

    rgb = np.zeros((32, 32, 3), np.uint8)
    rgb[16:] = (9, 8, 7)
    out = load_image(_encode(Image.fromarray(rgb), transparency=(9, 8, 7)))  # tRNS colour key
    assert (out[:16] == 0).all() and (out[16:] == 255).all()


def test_greyscale_and_bilevel():
    out = load_image(Image.new("L", (40, 32), 77))
    assert out.shape == (32, 40, 3) and (out == 77).all()
    out = load_image(_encode(Image.new("1", (32, 32), 1)))
    assert (out == 255).all()


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    # v -> v >> 8: 65535 -> 255, 32768 -> 128, 25700 (100 * 257) -> 100, 255 -> 0
    grey = np.tile(np.array([65535, 32768, 25700, 255], np.uint16), (32, 8))
    path = tmp_path / "deep.png"
    path.write_bytes(_png16(grey))
    out = load_image(path)
    assert (out[0, :4] == np.array([255, 128, 100, 0])[:, None]).all()
    assert (out == out[:1]).all() and (out[:, :, 0] == out[:, :, 1]).all()

    rgb = np.zeros((32, 32, 3), np.uint16)
    rgb[:16] = (65535, 32768, 0)
    rgb[16:] = (12345, 1799, 256)  # 12345 = 48*256 + 57 -> 48; 1799 = 7*256 + 7 -> 7; 256 -> 1
    out = load_image(_png16(rgb))
    assert (out[:16] == (255, 128, 0)).all() and (out[16:] == (48, 7, 1)).all()


def test_16_bit_and_32_bit_pil_modes():
    values = np.tile(np.array([65535, 32768, 0, 514], np.uint16), (32, 8))  # 514 = 2*257 -> 2
    big_endian = Image.frombytes("I;16B", (32, 32), values.astype(">u2").tobytes())
    out = load_image(big_endian)
    assert (out[0, :4, 0] == [255, 128, 0, 2]).all()

    as_int32 = Image.fromarray(values.astype(np.int32))
    assert as_int32.mode == "I"
    assert (load_image(as_int32)[0, :4, 2] == [255, 128, 0, 2]).all()
    too_deep = Image.fromarray(np.full((32, 32), 70000, np.int32))
    assert "0..65535" in _message(too_deep)


def test_float_pil_images():
    unit = Image.fromarray(np.tile(np.array([0.0, 0.2, 0.5, 1.0], np.float32), (32, 8)))
    assert unit.mode == "F"
    assert (load_image(unit)[0, :4, 0] == [0, 51, 128, 255]).all()  # x*255 rounded: 0, 51, 127.5 -> 128, 255
    byte_scale = Image.fromarray(np.tile(np.array([0.0, 100.0, 254.0, 255.0], np.float32), (32, 8)))
    assert (load_image(byte_scale)[0, :4, 1] == [0, 100, 254, 255]).all()
    assert "0..1 or 0..255" in _message(Image.fromarray(np.full((32, 32), 300.0, np.float32)))
    assert "NaN" in _message(Image.fromarray(np.full((32, 32), np.nan, np.float32)))


def test_cmyk():
    out = load_image(Image.new("CMYK", (32, 32), (0, 255, 0, 0)))  # full magenta ink
    assert (out == (255, 0, 255)).all()
    out = load_image(_encode(Image.new("CMYK", (32, 32), (0, 0, 0, 255)), "JPEG", quality=95))  # full black
    assert (out <= 8).all()


def test_animated_gif_takes_first_frame():
    red, blue = Image.new("RGB", (32, 32), (255, 0, 0)), Image.new("RGB", (32, 32), (0, 0, 255))
    data = _encode(red, "GIF", save_all=True, append_images=[blue], duration=100)
    with Image.open(io.BytesIO(data)) as im:
        assert im.n_frames == 2
        im.seek(1)  # a caller's image left on a later frame still gives the first
        assert (load_image(im) == (255, 0, 0)).all()
    assert (load_image(data) == (255, 0, 0)).all()


def test_numpy_variants():
    grey = np.full((32, 40), 9, np.uint8)
    assert (load_image(grey) == 9).all() and load_image(grey).shape == (32, 40, 3)
    assert (load_image(grey[..., None]) == 9).all()

    floats = np.zeros((32, 32, 3))
    floats[0, 0] = (0.5, 0.2, 1.0)  # 127.5 -> 128, 51, 255
    assert (load_image(floats)[0, 0] == (128, 51, 255)).all()
    assert (load_image(floats.astype(np.float16))[0, 0] == (128, 51, 255)).all()

    deep = np.full((32, 32, 3), 32768, np.uint16)
    deep[0, 0] = (65535, 0, 1000)  # 1000 = 3*256 + 232 -> 3
    out = load_image(deep)
    assert (out[0, 0] == (255, 0, 3)).all() and (out[1:] == 128).all()


def test_numpy_input_is_copied_not_aliased():
    rgb = np.zeros((32, 32, 3), np.uint8)
    out = load_image(rgb)
    out[0, 0] = 255
    assert rgb[0, 0, 0] == 0 and out.flags.c_contiguous


def test_other_sources(tmp_path):
    rgb = _quadrants()
    path = tmp_path / "q.png"
    Image.fromarray(rgb).save(path)
    for source in (path, str(path), path.read_bytes(), bytearray(path.read_bytes())):
        assert np.array_equal(load_image(source), rgb), type(source)
    with Image.open(path) as lazy:  # opened but not yet decoded
        assert np.array_equal(load_image(lazy), rgb)


@pytest.mark.parametrize(
    "array, phrase",
    [
        (np.zeros((32, 32), np.int64), "unsupported dtype int64"),
        (np.zeros((32, 32), bool), "unsupported dtype bool"),
        (np.zeros((32, 32, 2), np.uint8), "unsupported shape (32, 32, 2)"),
        (np.zeros((32, 32, 5), np.uint8), "unsupported shape"),
        (np.zeros(1024, np.uint8), "unsupported shape (1024,)"),
        (np.zeros((1, 32, 32, 3), np.uint8), "unsupported shape"),
        (np.full((32, 32, 3), 200.0), "must be in [0, 1]"),
        (np.full((32, 32, 3), np.nan), "NaN"),
        (np.zeros((10, 64, 3), np.uint8), "too small"),
    ],
)
def test_bad_arrays(array, phrase):
    message = _message(array)
    assert phrase in message
    if "unsupported" in phrase:
        assert "uint8" in message and "(H, W, 3)" in message  # says what is accepted


# ------------------------------------------------------------------------------------ bad files
def _noise_file(fmt: str) -> bytes:
    rng = np.random.default_rng(0)
    return _encode(Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)), fmt)


def test_each_bad_file_has_its_own_message(tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("this is not a picture\n" * 10)
    tiny = tmp_path / "tiny.png"
    Image.new("RGB", (10, 10)).save(tiny)
    truncated_png, truncated_jpg = tmp_path / "cut.png", tmp_path / "cut.jpg"
    truncated_png.write_bytes(_noise_file("PNG")[:6000])
    truncated_jpg.write_bytes(_noise_file("JPEG")[:1500])

    expected = {
        tmp_path / "missing.png": "image file not found",
        tmp_path: "is a directory, not an image file",
        text: "is not an image in a supported format",
        truncated_png: "is corrupt or truncated",
        truncated_jpg: "is corrupt or truncated",
        tiny: "is too small: 10x10",
    }
    for path, phrase in expected.items():
        message = _message(path)
        assert phrase in message and str(path) in message, message
    assert "PNG, JPEG" in _message(text)  # lists what is accepted
    assert f"at least {MIN_SIDE}" in _message(tiny)


def test_unsupported_format_is_refused_with_the_list():
    message = _message(_encode(Image.new("RGB", (32, 32)), "PCX"))  # a real image, in a format we do not parse
    assert "not an image in a supported format" in message and "PNG, JPEG, WEBP" in message


@pytest.mark.parametrize("side", [9000, 20000])  # 81 MP (our limit), 400 MP (PIL's bomb limit too)
def test_huge_header_refused_before_decoding(side, monkeypatch):
    # A few bytes of pixel data behind an IHDR claiming side x side: decoding would fail as truncated,
    # and with load() booby-trapped, any attempt to decode fails the test.
    assert side * side > MAX_PIXELS
    data = _png(side, side, 8, 2, b"\x00" * 16)

    def no_decoding(self):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    message = _message(data)
    assert "too large" in message and f"{MAX_PIXELS:,}" in message and f"{side * side:,} pixels" in message
    assert "178956970" not in message and "DOS" not in message  # our limit only, not PIL's bomb limit too


def test_wrong_source_type():
    assert "pass a file path, encoded image bytes, a numpy array or a PIL image" in _message(12345)


# ------------------------------------------------------------------------------------------ prepare
def test_prepare_image():
    image, bucket = prepare_image(np.full((360, 640, 3), (10, 200, 30), np.uint8))  # 16:9 -> (480, 832)
    assert bucket == (480, 832) and image.shape == (480, 832, 3) and (image == (10, 200, 30)).all()
    image, bucket = prepare_image(Image.new("RGB", (100, 100), (5, 5, 5)), base=128)
    assert bucket == (128, 128) and image.shape == (128, 128, 3)
    with pytest.raises(ImageError, match="multiple of 32"):
        prepare_image(np.zeros((64, 64, 3), np.uint8), base=100)
