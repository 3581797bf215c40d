"""Decoding raw shard samples (member extension -> bytes) into images and text.

Errors are reported as :class:`SampleSkip` with a short reason; the loader counts them and moves on.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from PIL import Image

from .images import IMAGE_EXTENSIONS, ImageLoadError, load_image


class SampleSkip(Exception):
    """A sample (or one image of a document) that cannot be used; ``reason`` is counted in loader stats."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def pair_is_complete(members: dict) -> bool:
    """A pair sample needs an image member and a caption (``txt`` or ``json``)."""
    return any(ext in members for ext in IMAGE_EXTENSIONS) and ("txt" in members or "json" in members)


def document_is_complete(members: dict) -> bool:
    """A document sample needs its ``json`` (images are checked when it is decoded)."""
    return "json" in members


def decode_image(data: bytes, name: str = "<image>") -> Image.Image:
    """Upright RGB pixels of a sample's image member (:func:`data_pipelines.images.load_image`)."""
    try:
        return load_image(data, name=name)
    except ImageLoadError as err:
        raise SampleSkip("corrupt_image", str(err)) from None


def parse_json(raw: dict[str, bytes]) -> dict | None:
    if "json" not in raw:
        return None
    try:
        value = json.loads(raw["json"].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SampleSkip("corrupt_json", str(err)) from None
    if not isinstance(value, dict):
        raise SampleSkip("corrupt_json", f"expected a JSON object, got {type(value).__name__}")
    return value


@dataclass
class Pair:
    image: Image.Image
    caption: str
    meta: dict


def decode_pair(raw: dict[str, bytes], choose: Callable[[int], int] | None = None) -> Pair:
    """Image + caption of a pair sample. ``choose(n)`` picks one of n captions from ``json["captions"]``;
    None takes ``txt`` (or ``json["caption"]``)."""
    meta = parse_json(raw) or {}
    caption = pair_caption(raw, meta, choose)
    ext = next(e for e in IMAGE_EXTENSIONS if e in raw)
    return Pair(decode_image(raw[ext], _member_name(raw, ext)), caption, meta)


def _member_name(raw: dict, member: str) -> str:
    key = raw.get("__key__")
    return f"sample {key!r} member {member!r}" if isinstance(key, str) else f"member {member!r}"


def pair_caption(raw: dict[str, bytes], meta: dict, choose: Callable[[int], int] | None = None) -> str:
    """The caption :func:`decode_pair` takes (``meta``: the sample's parsed json, or {}), without the image."""
    caption = None
    captions = meta.get("captions")
    if choose is not None and isinstance(captions, list) and captions and all(isinstance(c, str) for c in captions):
        caption = captions[choose(len(captions))]
    if caption is None and "txt" in raw:
        try:
            caption = raw["txt"].decode("utf-8")
        except UnicodeDecodeError as err:
            raise SampleSkip("corrupt_caption", str(err)) from None
    if caption is None:
        caption = meta.get("caption")
    if not isinstance(caption, str) or not caption.strip():
        raise SampleSkip("empty_caption")
    return caption.strip()


@dataclass
class Document:
    images: list[Image.Image]
    text_list: list[str]
    image_sentences: list[int]  # for each image, the index of the sentence it precedes
    meta: dict
    dropped: list[str]  # reasons of images that could not be decoded


def decode_document(raw: dict[str, bytes], max_images: int) -> Document:
    """Images and text of an interleaved document; images come from members named in ``image_info[i]["member"]``
    (this package's writer) or from embedded ``image_info[i]["image_base64"]`` (OpenFlamingo-style MMC4 shards).
    Images that fail to decode are dropped (listed in ``dropped``); a document left without images is a SampleSkip."""
    meta, text_list, infos, valid = document_layout(raw)
    images: list[Image.Image] = []
    sentences: list[int] = []
    dropped: list[str] = ["corrupt_json"] * (len(infos) - len(valid))
    for info in valid:
        if len(images) >= max_images:
            break
        try:
            images.append(
                decode_image(_document_image_bytes(raw, info), _member_name(raw, str(info.get("member", "image"))))
            )
            sentences.append(info["matched_text_index"])
        except SampleSkip as skip:
            dropped.append(skip.reason)
    if not images:
        raise SampleSkip("no_images", f"dropped: {dropped}" if dropped else "document has no image")
    return Document(images, text_list, sentences, meta, dropped)


def document_layout(raw: dict[str, bytes]) -> tuple[dict, list[str], list, list[dict]]:
    """(json, text_list, image_info, the usable image_info entries in sentence order) of a document sample; what
    :func:`decode_document` reads before decoding any image. SampleSkip("corrupt_json") when the json is unusable."""
    meta = parse_json(raw)
    if meta is None:
        raise SampleSkip("corrupt_json", "no json member")
    text_list = meta.get("text_list")
    if not isinstance(text_list, list) or not text_list or not all(isinstance(t, str) for t in text_list):
        raise SampleSkip("corrupt_json", "'text_list' must be a non-empty list of strings")
    infos = meta.get("image_info") or []
    if not isinstance(infos, list):
        raise SampleSkip("corrupt_json", "'image_info' must be a list")
    valid = [
        info
        for info in infos
        if isinstance(info, dict)
        and isinstance(info.get("matched_text_index"), int)
        and 0 <= info["matched_text_index"] < len(text_list)
    ]
    valid.sort(key=lambda info: info["matched_text_index"])
    return meta, text_list, infos, valid


def _document_image_bytes(raw: dict[str, bytes], info: dict[str, Any]) -> bytes:
    if info.get("image_base64"):
        try:
            return base64.b64decode(info["image_base64"], validate=True)
        except (binascii.Error, ValueError, TypeError) as err:
            raise SampleSkip("corrupt_image", f"invalid base64: {err}") from None
    member = info.get("member")
    if not isinstance(member, str) or member not in raw:
        raise SampleSkip("missing_member", f"image member {member!r} not in sample")
    return raw[member]
