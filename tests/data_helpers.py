"""Small offline helpers for the data pipeline tests: a word-level tokenizer, a picklable image transform,
solid-colour images and tiny shard sets."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from data_pipelines.images import ImageOptions
from data_pipelines.shards import ShardWriter, ShardWriterConfig

WORDS = (
    "a an the photo of on in at and two three four left right top bottom center red green blue yellow purple "
    "circle circles square squares triangle triangles cat cats dog dogs airplane sea lion here is picture "
    "caption one sample text before after this that image sentence intro"
).split()


def make_tokenizer(words: tuple[str, ...] = tuple(WORDS), bos: bool = False, pad_is_eos: bool = False):
    """A WordLevel tokenizer wrapped in PreTrainedTokenizerFast, with <image>, <|endofchunk|>, eos and pad.

    Ids: <unk>=0, <pad>=1, </s>=2, <s>=3, then the words in order, '.', ',', then <image>, <|endofchunk|>.
    bos=True prepends <s> to every encoding; pad_is_eos=True uses </s> as the pad token.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<pad>": 1, "</s>": 2, "<s>": 3}
    for word in (*words, ".", ","):
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    if bos:
        backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 3)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        eos_token="</s>",
        bos_token="<s>",
        pad_token="</s>" if pad_is_eos else "<pad>",
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>", "<|endofchunk|>"]})
    return tokenizer


class SmallTransform:
    """PIL.Image -> float tensor (3, size, size) in [0, 1] (picklable, for DataLoader workers)."""

    def __init__(self, size: int = 8) -> None:
        self.size = size

    def __call__(self, image: Image.Image) -> torch.Tensor:
        array = np.asarray(image.convert("RGB").resize((self.size, self.size), Image.Resampling.BILINEAR))
        return torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 255.0


def colour_of(index: int) -> tuple[int, int, int]:
    """A distinct, JPEG-robust solid colour per sample index."""
    return ((index * 67) % 200 + 30, (index * 131) % 200 + 30, (index * 29) % 200 + 30)


def image_bytes(colour: tuple[int, int, int], size: tuple[int, int] = (20, 16), fmt: str = "JPEG") -> bytes:
    buffer = io.BytesIO()
    options = {"quality": 95} if fmt == "JPEG" else {}
    Image.new("RGB", size, colour).save(buffer, format=fmt, **options)
    return buffer.getvalue()


def mean_colour(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).reshape(-1, 3).mean(axis=0)


def write_pair_shards(
    out_dir: Path, count: int, per_shard: int, prefix: str = "pairs", corrupt: tuple[int, ...] = ()
) -> list[dict]:
    """Shards of ``count`` pairs: sample i has colour_of(i) and caption "caption i" (json holds "index": i).
    Samples listed in ``corrupt`` get garbage image bytes. Returns the written records."""
    records = []
    with ShardWriter(
        ShardWriterConfig(out_dir, prefix=prefix, max_samples_per_shard=per_shard, image=ImageOptions())
    ) as writer:
        for i in range(count):
            data = b"\xff\xd8\xff not really a jpeg" if i in corrupt else image_bytes(colour_of(i))
            caption = f"caption {i}"
            key = writer.write(
                {"jpg": data, "txt": caption, "json": {"caption": caption, "captions": [caption], "index": i}}
            )
            records.append({"key": key, "index": i, "caption": caption})
    return records


def write_doc_shards(out_dir: Path, num_docs: int, per_shard: int, prefix: str = "docs") -> list[dict]:
    """Shards of interleaved documents: doc d has (d % 3) + 1 images, image j coloured colour_of(10 * d + j),
    text_list = ["intro d", "sentence j" ...] with image j matched to sentence j + 1."""
    records = []
    with ShardWriter(
        ShardWriterConfig(out_dir, prefix=prefix, max_samples_per_shard=per_shard), kind="documents"
    ) as writer:
        for d in range(num_docs):
            n = d % 3 + 1
            sample: dict = {}
            info = []
            for j in range(n):
                sample[f"{j}.jpg"] = image_bytes(colour_of(10 * d + j))
                info.append({"matched_text_index": j + 1, "member": f"{j}.jpg"})
            sample["json"] = {
                "text_list": ["intro text"] + [f"sentence {j}" for j in range(n)],
                "image_info": info,
                "index": d,
            }
            key = writer.write(sample)
            records.append({"key": key, "index": d, "images": n})
    return records


def read_tar(path: Path) -> dict[str, dict[str, bytes]]:
    """key -> {ext: bytes} of a tar shard (plain tarfile)."""
    import tarfile

    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as archive:
        for member in archive.getmembers():
            key, _, ext = member.name.partition(".")
            samples.setdefault(key, {})[ext] = archive.extractfile(member).read()
    return samples


def json_of(sample: dict[str, bytes]) -> dict:
    return json.loads(sample["json"])
