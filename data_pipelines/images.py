"""Image validation and (optional) resizing / re-encoding for the shard writers.

Every image that goes into a shard passes through :func:`prepare_image`: it is fully decoded (so a truncated or
corrupt file is caught here, not during training), converted to RGB, optionally resized, and stored as JPEG.
An untouched RGB JPEG is copied byte for byte unless re-encoding is requested.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from PIL import Image

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


def decode_image(data: bytes) -> Image.Image:
    """Fully decode image bytes into an RGB PIL image; raises ImageSkip("broken_image") on any failure."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            image.load()  # forces a full decode: catches truncated data that Image.open alone would not
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageSkip("image_too_large", str(err)) from None
    except Exception as err:  # PIL raises many exception types for bad data
        raise ImageSkip("broken_image", f"{type(err).__name__}: {err}") from None
    return _to_rgb(image)


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
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
    image = decode_image(data)
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
    """True when the JPEG decodes directly to RGB (not CMYK / greyscale), so its bytes can be kept as they are."""
    with Image.open(io.BytesIO(data)) as image:
        return image.mode == "RGB"
