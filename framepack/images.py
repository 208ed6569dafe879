"""Input images: load any reasonable picture as RGB uint8, then the official bucket resize and centre crop.

Contract:
  * `load_image(source)` turns a path, encoded bytes, a numpy array or a PIL image into a fresh
    (H, W, 3) uint8 RGB array: EXIF orientation applied, transparency composited onto white, 16-bit
    and float data scaled (never clipped), animated images reduced to their first frame.
  * `buckets`, `nearest_bucket` and `resize_and_center_crop` reproduce the official demo
    (`find_nearest_bucket`, `resize_and_center_crop`) exactly at base 640; other bases are ours.
  * `prepare_image(source, base)` chains them: what the pipeline feeds to the VAE and SigLIP.
  * Every user mistake raises `ImageError` (a ValueError) saying what was wrong and what is accepted;
    no raw PIL traceback reaches the caller. File size limits are checked from the header, before
    any pixel is decoded.

Where this differs from the official demo (which receives an RGB array from Gradio):
  * Gradio's `convert("RGB")` drops alpha, showing whatever colour transparent pixels happen to store
    (often black or stale pixels). We composite onto white, which is how viewers, browsers and the
    user's file manager show a transparent PNG, so the first video frame looks like the picture the
    user chose.
  * Official `resize_and_center_crop(image, target_width, target_height)` takes width first; ours
    takes (image, height, width) like every other (height, width) pair in this module.
  * For an odd target side the official PIL crop box can come out one pixel too wide; ours always
    returns exactly (height, width). For even targets (every bucket) the results are identical.
"""

from __future__ import annotations

import io
import math
import operator
import os
import re
import stat
import struct
import warnings
from functools import cache

import numpy as np
from PIL import Image, UnidentifiedImageError

from framepack.config import RESOLUTION_STEP, resolution_problem

__all__ = [
    "BUCKETS_640",
    "MAX_PIXELS",
    "MIN_SIDE",
    "ImageError",
    "buckets",
    "load_image",
    "nearest_bucket",
    "prepare_image",
    "resize_and_center_crop",
]


class ImageError(ValueError):
    """An image that cannot be used; the message says what was wrong and what is accepted."""


# Official (height, width) buckets for base 640, in the official order (spec §2 step 3): from the
# widest landscape to the tallest portrait, all multiples of 32 and about 0.38-0.40 MP.
BUCKETS_640: tuple[tuple[int, int], ...] = (
    (416, 960),
    (448, 864),
    (480, 832),
    (512, 768),
    (544, 704),
    (576, 672),
    (608, 640),
    (640, 608),
    (672, 576),
    (704, 544),
    (768, 512),
    (832, 480),
    (864, 448),
    (960, 416),
)

MIN_SIDE: int = 32  # one VAE latent row is 8 px and the DiT patch is 2 latents: below this nothing is left
MAX_PIXELS: int = 64_000_000  # far above any bucket (< 2 MP at base 1280), far below a decompression bomb

_BASE_STEP = RESOLUTION_STEP

# Formats we let PIL parse. Image.open would otherwise try every plugin it has, including EPS (which
# runs Ghostscript) and rarely used parsers: a needless attack surface for files coming over HTTP.
# Every format kept has a magic number (TGA has none, so random bytes could pass for one).
_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF", "AVIF", "PPM", "QOI")

# EXIF orientation tag (0x0112) value -> the transpose that makes the stored pixels display upright.
_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_EXIF_ORIENTATION_TAG = 0x0112

# What PIL raises from a damaged file while parsing headers or decoding pixels.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error)


# ------------------------------------------------------------------------------------------ buckets
def buckets(base: int = 640) -> tuple[tuple[int, int], ...]:
    """The (height, width) buckets for a base resolution, in the official order.

    Base 640 returns `BUCKETS_640` itself. Any other base scales each official (h, w) by base/640 and
    rounds each side to the nearest multiple of 32, halves rounding up (so 208 -> 224); the order is
    kept and a bucket equal to an earlier one is dropped. The official list is symmetric under
    (h, w) -> (w, h), and so is every derived list. Accepted bases: multiples of 32 from 64 to 1280
    (64 and 128 serve the tiny test models; 240/320 and up to ~960 were asked for by users).
    """
    base = _check_base(base)
    return BUCKETS_640 if base == 640 else _scaled_buckets(base)


def _check_base(base: object) -> int:
    if (problem := resolution_problem(base)) is not None:
        raise ImageError(problem)
    return int(base)


@cache
def _scaled_buckets(base: int) -> tuple[tuple[int, int], ...]:
    out: list[tuple[int, int]] = []
    for h, w in BUCKETS_640:
        bucket = (_round_to_32(h * base), _round_to_32(w * base))
        if bucket not in out:
            out.append(bucket)
    return tuple(out)


def _round_to_32(side_times_base: int) -> int:
    """32 * floor(side * base / 640 / 32 + 1/2), in exact integer arithmetic (no float ties)."""
    return _BASE_STEP * ((2 * side_times_base + 640 * _BASE_STEP) // (2 * 640 * _BASE_STEP))


def nearest_bucket(height: int, width: int, base: int = 640) -> tuple[int, int]:
    """The (height, width) bucket minimising |height * bw - width * bh| (official `find_nearest_bucket`).

    The list is scanned in order with `<=`, so a tie goes to the later bucket: a square input at base
    640 gets (640, 608), 640 tall and 608 wide.
    """
    height, width = _positive_int(height, "height"), _positive_int(width, "width")
    best, best_metric = BUCKETS_640[0], math.inf
    for bh, bw in buckets(base):
        metric = abs(height * bw - width * bh)
        if metric <= best_metric:
            best, best_metric = (bh, bw), metric
    return best


def _positive_int(value: object, what: str) -> int:
    if isinstance(value, bool):
        raise ImageError(f"{what} must be a positive integer; got {value!r}")
    try:
        n = operator.index(value)
    except TypeError:
        raise ImageError(f"{what} must be a positive integer; got {value!r}") from None
    if n < 1:
        raise ImageError(f"{what} must be a positive integer; got {n}")
    return n


# ------------------------------------------------------------------------------------ resize + crop
def resize_and_center_crop(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Scale (H, W, 3) uint8 `image` to cover (height, width) with PIL LANCZOS, then centre-crop it.

    As the official: an image already (height, width) is returned as is (the same object). Otherwise
    the scale is max(width / W, height / H), the scaled size is rounded (Python `round`), and the crop
    starts at round((scaled - target) / 2) on each axis, which is where PIL's rounding puts the official
    crop box. Returns a new (height, width, 3) uint8 array.
    """
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        got = f"{image.dtype} array of shape {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ImageError(f"resize_and_center_crop needs an (H, W, 3) uint8 array (use load_image first); got {got}")
    height, width = _positive_int(height, "height"), _positive_int(width, "width")
    h, w = image.shape[:2]
    if (h, w) == (height, width):
        return image
    scale = max(width / w, height / h)
    rw, rh = round(w * scale), round(h * scale)
    resized = Image.fromarray(image).resize((rw, rh), Image.Resampling.LANCZOS)
    # The official passes the float box ((rw - width) / 2, ..., (rw + width) / 2, ...) and PIL rounds
    # each edge half-to-even; rounding only the left/top edge keeps that offset and the exact size.
    left, top = round((rw - width) / 2), round((rh - height) / 2)
    return np.array(resized.crop((left, top, left + width, top + height)))


# ------------------------------------------------------------------------------------------ loading
def load_image(source: str | os.PathLike | bytes | np.ndarray | Image.Image) -> np.ndarray:
    """Any supported picture -> a fresh (H, W, 3) uint8 RGB array.

    Sources: a file path; encoded file bytes; a PIL image (its first frame; an animated one is seeked
    to frame 0); a numpy array of shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) with dtype uint8,
    uint16 (scaled by >> 8, so 65535 -> 255 and 32768 -> 128) or float in [0, 1] (rounded to x*255).

    Files may be PNG, JPEG, WebP, GIF, BMP, TIFF, AVIF, PPM or QOI. Conversions: EXIF orientation
    is applied; alpha (RGBA, LA, palette or colour-key transparency) is composited onto white; greyscale
    and CMYK become RGB; 16-bit images are scaled like uint16 arrays; float (PIL "F") images are read as
    [0, 1] when all values lie in it, else on PIL's own 0..255 scale.

    Both sides must be at least MIN_SIDE and the area at most MAX_PIXELS, checked from the file header
    before decoding. Anything else raises ImageError.
    """
    if isinstance(source, np.ndarray):
        return _from_array(source, "image array")
    if isinstance(source, Image.Image):
        return _from_pil(source, "PIL image")
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        return _open_file(io.BytesIO(data), f"image data ({len(data)} bytes)")
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        name = os.fsdecode(path)
        _check_regular_file(path, name)
        return _open_file(path, name)
    raise ImageError(
        f"cannot load an image from a {type(source).__name__}; pass a file path, encoded image bytes, "
        "a numpy array or a PIL image"
    )


def load_rgba(source: str | os.PathLike | bytes | np.ndarray | Image.Image) -> np.ndarray:
    """As `load_image`, but a picture with transparency keeps it: (H, W, 4) uint8 RGBA then, else
    (H, W, 3) RGB. For masks and frame-edit references, where the alpha channel means something."""
    if isinstance(source, np.ndarray):
        if source.ndim == 3 and source.shape[2] == 4:
            _check_size(source.shape[1], source.shape[0], "image array")
            return np.array(_to_uint8(source, "image array"), order="C")
        return _from_array(source, "image array")
    if isinstance(source, Image.Image):
        return _from_pil(source, "PIL image", keep_alpha=True)
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        return _open_file(io.BytesIO(data), f"image data ({len(data)} bytes)", keep_alpha=True)
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        name = os.fsdecode(path)
        _check_regular_file(path, name)
        return _open_file(path, name, keep_alpha=True)
    return load_image(source)  # the same error for an unsupported source


def load_mask(source: str | os.PathLike | bytes | np.ndarray | Image.Image) -> np.ndarray:
    """A mask as (H, W) uint8, 255 = keep and 0 = ignore: a greyscale picture, or the luminance of a
    colour one (its alpha, if any, is ignored: a transparent mask is read by its colour). Same sources,
    checks and errors as `load_image`."""
    rgb = load_rgba(source)[..., :3]
    return np.round(rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)).astype(np.uint8)


def image_alpha(source: str | os.PathLike | bytes | np.ndarray | Image.Image) -> np.ndarray | None:
    """The alpha channel (H, W) uint8 of a picture (EXIF orientation applied), or None when it has no
    transparency."""
    pixels = load_rgba(source)
    return pixels[..., 3].copy() if pixels.shape[2] == 4 else None


def prepare_image(
    source: str | os.PathLike | bytes | np.ndarray | Image.Image, base: int = 640
) -> tuple[np.ndarray, tuple[int, int]]:
    """load_image -> nearest_bucket -> resize_and_center_crop: the (height, width, 3) uint8 image and its bucket."""
    _check_base(base)  # refuse a bad base before spending time on decoding
    image = load_image(source)
    height, width = nearest_bucket(image.shape[0], image.shape[1], base)
    return resize_and_center_crop(image, height, width), (height, width)


def _check_regular_file(path: str | bytes, name: str) -> None:
    # Checked up front so that a directory or a FIFO gets its own message (and a FIFO never blocks open).
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        raise ImageError(f"image file not found: {name}") from None
    except OSError as err:
        raise ImageError(f"cannot access image file {name}: {err.strerror or err}") from None
    if stat.S_ISDIR(st.st_mode):
        raise ImageError(f"{name} is a directory, not an image file")
    if not stat.S_ISREG(st.st_mode):
        raise ImageError(f"{name} is not a regular file (a device, pipe or socket?); pass an image file")


def _allowed_formats() -> list[str]:
    Image.init()  # registers the plugins; a format missing from this Pillow build is skipped
    return [f for f in _FORMATS if f in Image.OPEN]


def _open_file(fp: str | bytes | io.BytesIO, name: str, *, keep_alpha: bool = False) -> np.ndarray:
    """Decoded pixels (H, W, 3) uint8, or with `keep_alpha` the undecided array: (H, W, 4) uint8 when the
    image has transparency (for masks and alpha channels)."""
    try:
        with warnings.catch_warnings():
            # PIL warns above its own limit (89 MP); ours is lower and checked from the header just after.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(fp, formats=_allowed_formats())
    except Image.DecompressionBombError as err:
        raise _too_large(name, err) from None
    except UnidentifiedImageError:
        raise ImageError(
            f"{name} is not an image in a supported format, or it is corrupt or truncated "
            f"(accepted formats: {', '.join(_allowed_formats())})"
        ) from None
    except PermissionError as err:
        raise ImageError(f"cannot read image file {name}: {err.strerror or err}") from None
    except _DECODE_ERRORS as err:
        raise ImageError(f"{name} is corrupt or truncated and cannot be read ({err})") from None
    with image:
        return _from_pil(image, name, keep_alpha=keep_alpha)


def _from_pil(image: Image.Image, name: str, *, keep_alpha: bool = False) -> np.ndarray:
    if image.tell() != 0:
        image.seek(0)  # animated: the first frame is the picture the user sees as the thumbnail
    _check_size(*image.size, name)  # header size; nothing decoded yet
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image.load()
    except Image.DecompressionBombError as err:
        raise _too_large(name, err) from None
    except _DECODE_ERRORS as err:
        raise ImageError(f"{name} is corrupt or truncated and cannot be decoded ({err})") from None
    pixels = _pil_pixels(_upright(image), name)
    if keep_alpha and pixels.ndim == 3 and pixels.shape[2] == 4:
        _check_size(pixels.shape[1], pixels.shape[0], name)
        return _to_uint8(pixels, name)
    return _from_array(pixels, name)


def _upright(image: Image.Image) -> Image.Image:
    """Apply the EXIF orientation (phone photos are stored sideways with a tag saying so)."""
    try:
        orientation = image.getexif().get(_EXIF_ORIENTATION_TAG, 1)
    except _DECODE_ERRORS:
        return image  # a damaged EXIF block: show the pixels as stored rather than refuse the photo
    method = _ORIENTATION.get(orientation) if isinstance(orientation, int) else None
    return image if method is None else image.transpose(method)


def _pil_pixels(image: Image.Image, name: str) -> np.ndarray:
    """PIL image -> an array in one of the forms `_from_array` accepts, without clipping deep data."""
    mode = image.mode
    if mode.startswith("I;16"):
        return np.asarray(image).astype(np.uint16)  # native byte order, whatever the file's was
    if mode == "I":
        pixels = np.asarray(image)
        lo, hi = int(pixels.min()), int(pixels.max())
        if lo < 0 or hi > 65535:
            raise ImageError(
                f"{name} is a 32-bit integer image with values {lo}..{hi}; only 0..65535 (16-bit) is supported"
            )
        return pixels.astype(np.uint16)
    if mode == "F":
        pixels = np.asarray(image, dtype=np.float32)
        lo, hi = float(pixels.min()), float(pixels.max())
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise ImageError(f"{name} is a float image containing NaN or infinity")
        if 0.0 <= lo and hi <= 1.0:
            return pixels
        if 0.0 <= lo and hi <= 255.0:
            return pixels / np.float32(255)  # PIL's convention for "F" (what convert("L") assumes)
        raise ImageError(f"{name} is a float image with values {lo:g}..{hi:g}; accepted: 0..1 or 0..255")
    if image.has_transparency_data:
        try:
            return np.asarray(image.convert("RGBA"))
        except ValueError:
            raise ImageError(f"{name} has an unsupported image mode {mode!r}") from None
    if mode == "RGB":
        return np.asarray(image)
    try:
        return np.asarray(image.convert("RGB"))  # L, 1, P, CMYK, YCbCr, LAB, HSV, RGBX
    except ValueError:
        raise ImageError(f"{name} has an unsupported image mode {mode!r}") from None


def _too_large(name: str, err: Exception) -> ImageError:
    """PIL's decompression-bomb refusal, in our words and with our limit only (PIL's is higher)."""
    found = re.search(r"\((\d+) pixels\)", str(err))
    size = f": {int(found.group(1)):,} pixels" if found else ""
    return ImageError(f"{name} is too large{size}; at most {MAX_PIXELS:,} pixels are accepted (the largest bucket "
                      "is under 2 MP, so downscale it first)")  # fmt: skip


def _check_size(width: int, height: int, name: str) -> None:
    if width * height > MAX_PIXELS:
        raise ImageError(
            f"{name} is too large: {width}x{height} (width x height) = {width * height:,} pixels; at most "
            f"{MAX_PIXELS:,} pixels are accepted (the largest bucket is under 2 MP, so downscale it first)"
        )
    if min(width, height) < MIN_SIDE:
        raise ImageError(
            f"{name} is too small: {width}x{height} (width x height) pixels; both sides must be at least "
            f"{MIN_SIDE} pixels"
        )


_ACCEPTED_ARRAYS = (
    "accepted: shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) with dtype uint8 (0..255), uint16 (0..65535) "
    "or float16/32/64 in [0, 1]"
)


def _from_array(pixels: np.ndarray, name: str) -> np.ndarray:
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[..., 0]
    if not (pixels.ndim == 2 or (pixels.ndim == 3 and pixels.shape[2] in (3, 4))):
        raise ImageError(f"{name} has unsupported shape {pixels.shape}; {_ACCEPTED_ARRAYS}")
    _check_size(pixels.shape[1], pixels.shape[0], name)
    pixels = _to_uint8(pixels, name)
    if pixels.ndim == 2:
        return np.repeat(pixels[..., None], 3, axis=2)
    if pixels.shape[2] == 4:
        return _over_white(pixels)
    return np.array(pixels, order="C")  # a copy: the caller's array may be changed later


def _to_uint8(pixels: np.ndarray, name: str) -> np.ndarray:
    kind, size = pixels.dtype.kind, pixels.dtype.itemsize
    if kind == "u" and size == 1:
        return pixels
    if kind == "u" and size == 2:
        # The high byte: 256 equal bins, the same as Pillow's own decoding of 16-bit RGB PNGs, and
        # exact for 8-bit values stored as v * 257.
        return (pixels >> 8).astype(np.uint8)
    if kind == "f":
        lo, hi = float(pixels.min()), float(pixels.max())
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise ImageError(f"{name} contains NaN or infinity; float images must be in [0, 1]")
        # Tolerate half an 8-bit step of overshoot from upstream arithmetic; anything more is a wrong scale.
        if lo < -0.5 / 255 or hi > 1 + 0.5 / 255:
            raise ImageError(
                f"{name} has float values {lo:g}..{hi:g}; float images must be in [0, 1] (pass uint8 for 0..255 data)"
            )
        scaled = np.floor(pixels.astype(np.float32) * np.float32(255) + np.float32(0.5))
        return np.clip(scaled, 0, 255).astype(np.uint8)
    raise ImageError(f"{name} has unsupported dtype {pixels.dtype}; {_ACCEPTED_ARRAYS}")


def _over_white(rgba: np.ndarray) -> np.ndarray:
    """Composite (H, W, 4) uint8 onto white: rgb * a + 255 * (1 - a), rounded to nearest."""
    rgb = rgba[..., :3].astype(np.uint16)
    alpha = rgba[..., 3:].astype(np.uint16)
    # The numerator is at most 255 * 255 + 127, so uint16 suffices; 255 is odd, so there are no .5 ties.
    return ((rgb * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)
