"""Reading images, for every reader of the project, and preparing them for the shard writers.

:func:`load_image` is the one place an image file or encoded sample becomes pixels: the writers, the loaders,
``vlm.eval`` and ``vlm.generate`` all go through it (EXIF orientation, 16-bit and alpha images, errors that name
the file). Every image that goes into a shard passes through :func:`prepare_image`: it is fully decoded (so a
truncated or corrupt file is caught here, not during training), made upright RGB, optionally resized, and stored
as JPEG. An untouched upright RGB JPEG is copied byte for byte unless re-encoding is requested.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from PIL import Image, ImageOps

#: File extensions recognised as images when listing folders and reading shards.
IMAGE_EXTENSIONS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp", "bmp")

ResizeMode = Literal["longer", "shorter", "center_crop"]


class ImageSkip(Exception):
    """An image that cannot be used; ``reason`` is a short machine-readable tag counted in the writer stats."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class ImageOptions:
    """How images are stored in shards.

    size: target size in pixels, or None to keep the original size.
    resize_mode: "longer" fits the image inside size x size keeping the aspect ratio (never upscales);
        "shorter" makes the shorter side equal to size keeping the aspect ratio (never upscales);
        "center_crop" resizes the shorter side to size (up or down) then crops the centre size x size square.
    reencode: re-encode images even when they are already RGB JPEGs of an acceptable size.
    quality: JPEG quality used when encoding.
    min_size: images whose shorter side is below this are skipped with reason "image_too_small".
    """

    size: int | None = None
    resize_mode: ResizeMode = "longer"
    reencode: bool = False
    quality: int = 90
    min_size: int = 1

    def __post_init__(self) -> None:
        if self.size is not None and (not isinstance(self.size, int) or self.size < 1):
            raise ValueError(f"ImageOptions.size must be a positive int or None, got {self.size!r}")
        if self.resize_mode not in ("longer", "shorter", "center_crop"):
            raise ValueError(
                f"ImageOptions.resize_mode must be 'longer', 'shorter' or 'center_crop', got {self.resize_mode!r}"
            )
        if not isinstance(self.quality, int) or not 1 <= self.quality <= 100:
            raise ValueError(f"ImageOptions.quality must be an int in [1, 100], got {self.quality!r}")
        if not isinstance(self.min_size, int) or self.min_size < 1:
            raise ValueError(f"ImageOptions.min_size must be an int >= 1, got {self.min_size!r}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class PreparedImage:
    """A validated image ready to be written: JPEG bytes plus its sizes."""

    data: bytes
    width: int
    height: int
    original_width: int
    original_height: int


def read_image_source(source: str | Path | bytes) -> bytes:
    """Bytes of an image given as a path or as bytes. Raises ImageSkip("missing_file") for an absent path."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    path = Path(source)
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ImageSkip("missing_file", f"no such file: {path}") from None
    except IsADirectoryError:
        raise ImageSkip("missing_file", f"expected an image file, found a directory: {path}") from None
    except OSError as err:
        raise ImageSkip("unreadable_file", f"{path}: {err}") from None


class ImageLoadError(ValueError):
    """An image that cannot be used, with the file (or sample) named. ``reason`` is a short tag:
    ``missing_file``, ``unreadable_file``, ``broken_image`` or ``image_too_large``."""

    def __init__(self, reason: str, name: str, detail: str) -> None:
        super().__init__(f"{name}: {detail}")
        self.reason = reason
        self.name = name
        self.detail = detail


def load_image(source: str | Path | bytes, *, name: str | None = None) -> Image.Image:
    """The one reader of images: a path or encoded bytes to an upright RGB ``PIL.Image``.

    Fully decoded (a truncated file fails here, not later), EXIF orientation applied (a phone photo comes out the
    way it was held), 16-bit and float greyscale scaled to 8 bits (not clipped to white), palette and alpha images
    composited on white, CMYK and the rest converted to RGB. Images above PIL's pixel limit are refused as
    decompression bombs. Every failure is an :class:`ImageLoadError` naming the file (``name``, else the path,
    else ``<bytes>``).
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        data, name = bytes(source), name or "<bytes>"
    else:
        path = Path(source)
        name = name or str(path)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise ImageLoadError("missing_file", name, "no such file") from None
        except IsADirectoryError:
            raise ImageLoadError("missing_file", name, "expected an image file, found a directory") from None
        except OSError as err:
            raise ImageLoadError("unreadable_file", name, f"cannot read: {err}") from None
    if not data:
        raise ImageLoadError("broken_image", name, "empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            image.load()  # forces a full decode: catches truncated data that Image.open alone would not
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageLoadError(
            "image_too_large",
            name,
            f"refused as a possible decompression bomb ({err}); PIL.Image.MAX_IMAGE_PIXELS sets the limit",
        ) from None
    except Exception as err:  # PIL raises many exception types for bad data
        raise ImageLoadError("broken_image", name, f"not a readable image ({type(err).__name__}: {err})") from None
    try:
        image = ImageOps.exif_transpose(image) or image
    except Exception:  # a malformed EXIF block: keep the pixels as stored
        pass
    return to_rgb(image)


def decode_image(data: bytes) -> Image.Image:
    """:func:`load_image` for the writers: raises ImageSkip with the same reason on any failure."""
    try:
        return load_image(data)
    except ImageLoadError as err:
        raise ImageSkip(err.reason, err.detail) from None


_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB with 8 bits a channel: 16-bit/32-bit integer and float greyscale scaled (not clipped), alpha and
    transparent palettes composited on white, every other mode converted by PIL."""
    if image.mode == "RGB":
        return image
    if image.mode in _SIXTEEN_BIT_MODES or image.mode in ("I", "F"):
        import numpy as np

        values = np.asarray(image).astype(np.float64)
        if image.mode in _SIXTEEN_BIT_MODES or (image.mode == "I" and values.size and values.max() > 255):
            values = values / 257.0  # 0..65535 -> 0..255
        elif image.mode == "F" and values.size and np.nanmax(values) <= 1.0:
            values = values * 255.0  # a float image in [0, 1]
        grey = np.clip(np.nan_to_num(np.rint(values)), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


def resize_image(image: Image.Image, size: int, mode: ResizeMode) -> Image.Image:
    """Resize following :class:`ImageOptions` semantics; returns the input when nothing needs to change."""
    width, height = image.size
    if mode == "center_crop":
        scale = size / min(width, height)
        new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
        if (new_w, new_h) != (width, height):
            image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
        left, top = (new_w - size) // 2, (new_h - size) // 2
        if (new_w, new_h) != (size, size):
            image = image.crop((left, top, left + size, top + size))
        return image
    reference = max(width, height) if mode == "longer" else min(width, height)
    if reference <= size:
        return image
    scale = size / reference
    new_size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return image.resize(new_size, Image.Resampling.BICUBIC)


def encode_jpeg(image: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def prepare_image(source: str | Path | bytes, options: ImageOptions) -> PreparedImage:
    """Read, validate, optionally resize and encode one image. Raises ImageSkip with a reason on failure."""
    data = read_image_source(source)
    if not data:
        raise ImageSkip("broken_image", "empty file" if not isinstance(source, bytes) else "empty bytes")
    is_jpeg = data[:3] == b"\xff\xd8\xff"
    try:
        image = load_image(data, name=None if isinstance(source, (bytes, bytearray, memoryview)) else str(source))
    except ImageLoadError as err:
        raise ImageSkip(err.reason, str(err)) from None
    original_width, original_height = image.size
    if min(image.size) < options.min_size:
        raise ImageSkip("image_too_small", f"{image.size[0]}x{image.size[1]} < min_size {options.min_size}")
    resized = image
    if options.size is not None:
        resized = resize_image(image, options.size, options.resize_mode)
    if resized is image and is_jpeg and not options.reencode and _is_plain_rgb_jpeg(data):
        out = data
    else:
        out = encode_jpeg(resized, options.quality)
    return PreparedImage(out, resized.size[0], resized.size[1], original_width, original_height)


def _is_plain_rgb_jpeg(data: bytes) -> bool:
    """True when the JPEG decodes directly to upright RGB (not CMYK / greyscale, no EXIF rotation), so its bytes
    can be kept as they are."""
    with Image.open(io.BytesIO(data)) as image:
        return image.mode == "RGB" and image.getexif().get(ORIENTATION_TAG, 1) == 1


#: The EXIF tag that says how a photo was held (1: upright).
ORIENTATION_TAG = 0x0112
