"""The one image reader (data_pipelines.images.load_image) and every reader that goes through it: EXIF
orientation, 16-bit / palette / alpha images, and errors that name the file."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_pipelines.images import (
    ORIENTATION_TAG,
    ImageLoadError,
    ImageOptions,
    ImageSkip,
    load_image,
    prepare_image,
)
from data_pipelines.samples import SampleSkip, decode_pair

REPO = Path(__file__).resolve().parents[1]


def _gradient(height: int = 24, width: int = 40) -> np.ndarray:
    """An RGB image whose top-left is dark and whose right side is red: orientation is visible."""
    rgb = np.zeros((height, width, 3), np.uint8)
    rgb[..., 0] = np.linspace(0, 255, width, dtype=np.uint8)[None, :]
    rgb[..., 1] = np.linspace(0, 255, height, dtype=np.uint8)[:, None]
    return rgb


def _jpeg(rgb: np.ndarray, orientation: int | None = None) -> bytes:
    image = Image.fromarray(rgb)
    buffer = io.BytesIO()
    if orientation is None:
        image.save(buffer, format="JPEG", quality=95)
    else:
        exif = Image.Exif()
        exif[ORIENTATION_TAG] = orientation
        image.save(buffer, format="JPEG", quality=95, exif=exif.tobytes())
    return buffer.getvalue()


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_exif_orientation_is_applied():
    rgb = _gradient()
    upright = load_image(_jpeg(rgb))
    # orientation 6: the camera was turned; the stored pixels must be rotated 90 degrees clockwise to view
    turned = load_image(_jpeg(rgb, orientation=6))
    assert upright.size == (40, 24)
    assert turned.size == (24, 40)
    expected = np.rot90(np.asarray(upright), k=-1)  # clockwise
    assert np.abs(np.asarray(turned).astype(int) - expected.astype(int)).mean() < 3


def test_writer_stores_rotated_photos_upright():
    data = _jpeg(_gradient(), orientation=6)
    prepared = prepare_image(data, ImageOptions())
    assert prepared.data != data  # re-encoded, not copied with its EXIF tag
    with Image.open(io.BytesIO(prepared.data)) as stored:
        assert stored.size == (24, 40)
        assert stored.getexif().get(ORIENTATION_TAG, 1) == 1
    upright = prepare_image(_jpeg(_gradient()), ImageOptions())
    assert (upright.width, upright.height) == (40, 24)


def test_sixteen_bit_greyscale_is_scaled_not_clipped():
    values = np.linspace(0, 65535, 32 * 32).reshape(32, 32).astype(np.uint16)
    sixteen = Image.fromarray(values)
    assert sixteen.mode.startswith("I;16")
    eight = Image.fromarray((values // 257).astype(np.uint8))
    got = np.asarray(load_image(_png(sixteen))).astype(float)
    want = np.asarray(load_image(_png(eight))).astype(float)
    assert got.shape == (32, 32, 3)
    assert abs(got.mean() - want.mean()) < 1.0  # the old convert("RGB") gave 255 almost everywhere
    assert np.abs(got - want).max() <= 1
    # 32-bit integer greyscale holding 16-bit values, and float images in [0, 1]
    as_int = Image.fromarray(values.astype(np.int32))
    assert as_int.mode == "I"
    assert abs(np.asarray(load_image(_tiff(as_int))).mean() - want.mean()) < 1.0
    as_float = Image.fromarray((values / 65535.0).astype(np.float32))
    assert as_float.mode == "F"
    assert abs(np.asarray(load_image(_tiff(as_float))).mean() - want.mean()) < 1.5


def _tiff(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="TIFF")
    return buffer.getvalue()


def test_palette_and_alpha_images():
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:4, :, 3] = 255  # top half opaque red, bottom half transparent
    got = np.asarray(load_image(_png(Image.fromarray(rgba))))
    assert got[0, 0].tolist() == [200, 0, 0]
    assert got[7, 0].tolist() == [255, 255, 255]  # transparent -> white, not black
    palette = Image.fromarray(_gradient()).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    got = load_image(_png(palette))
    assert got.mode == "RGB" and got.size == (40, 24)
    la = Image.fromarray(rgba[..., [0, 3]], mode=None)
    assert load_image(_png(la)).mode == "RGB"
    cmyk = Image.fromarray(_gradient()).convert("CMYK")
    buffer = io.BytesIO()
    cmyk.save(buffer, format="JPEG")
    assert load_image(buffer.getvalue()).mode == "RGB"


def test_errors_name_the_file(tmp_path):
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(_jpeg(_gradient(200, 200))[:400])
    with pytest.raises(ImageLoadError, match="truncated.jpg") as err:
        load_image(truncated)
    assert err.value.reason == "broken_image"
    with pytest.raises(ImageLoadError, match="absent.jpg: no such file") as err:
        load_image(tmp_path / "absent.jpg")
    assert err.value.reason == "missing_file"
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(ImageLoadError, match="empty.png: empty file"):
        load_image(empty)
    with pytest.raises(ImageLoadError, match="not-an-image.txt"):
        load_image(b"hello", name="not-an-image.txt")


def test_decompression_bomb_is_refused_with_the_file_named(tmp_path, monkeypatch):
    path = tmp_path / "bomb.png"
    path.write_bytes(_png(Image.new("L", (300, 300))))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100 * 100)
    with pytest.raises(ImageLoadError, match="bomb.png: refused as a possible decompression bomb") as err:
        load_image(path)
    assert err.value.reason == "image_too_large"
    with pytest.raises(ImageSkip) as skip:
        prepare_image(path, ImageOptions())
    assert skip.value.reason == "image_too_large" and "bomb.png" in str(skip.value)


def test_loader_side_decoding_uses_the_same_reader():
    raw = {"jpg": _jpeg(_gradient(), orientation=6), "txt": b"a caption"}
    pair = decode_pair(raw)
    assert pair.image.size == (24, 40)
    raw16 = {"png": _png(Image.fromarray(np.full((8, 8), 30000, np.uint16))), "txt": b"grey"}
    assert abs(np.asarray(decode_pair(raw16).image).mean() - 30000 / 257) < 1
    with pytest.raises(SampleSkip, match="member 'jpg'") as skip:
        decode_pair({"jpg": b"\xff\xd8\xffbroken", "txt": b"x"})
    assert skip.value.reason == "corrupt_image"


def test_eval_reader_applies_orientation(tmp_path):
    from vlm.eval.datasets import open_image

    path = tmp_path / "phone.jpg"
    path.write_bytes(_jpeg(_gradient(), orientation=8))
    assert open_image(str(path)).size == (24, 40)


def test_generate_names_a_bad_image_before_loading_a_model(tmp_path):
    bad = tmp_path / "notes.txt"
    bad.write_text("not an image")
    result = subprocess.run(
        [sys.executable, "-m", "vlm.generate", "--model-dir", str(tmp_path / "no-model"), "--query", str(bad)],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert result.returncode != 0
    assert "notes.txt" in result.stderr and "not a readable image" in result.stderr
    assert "Traceback" not in result.stderr
