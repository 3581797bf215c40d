"""Flamingo-format text building, tokenisation and OpenFlamingo label masking.

Pairs (OpenFlamingo's LAION format; ``prefix``, e.g. ``"Output:"``, puts the caption in an evaluation prompt's form)::

    "<image>{prefix}{caption}<|endofchunk|>{eos}"

Interleaved documents (OpenFlamingo's MMC4 format): every kept image is placed before the sentence it is matched to,
each image starts a chunk and each chunk ends with ``<|endofchunk|>``::

    "intro text<image>sentence 1 sentence 2<|endofchunk|><image>sentence 3<|endofchunk|>{eos}"

Labels (``-100`` = no loss), as OpenFlamingo's ``train_one_epoch`` masks them:

- both: padding (positions where ``attention_mask`` is 0; so an eos is still a target even if the tokenizer's pad
  token equals its eos token), every ``<image>`` token, and position 0 (the BOS when the tokenizer adds one; it is
  ``<image>`` or pre-image text otherwise, masked anyway);
- documents additionally: every token before the first ``<image>``, and every token after an ``<|endofchunk|>`` up to
  the next ``<image>`` (so the trailing eos of a document is masked, as in OpenFlamingo). ``<|endofchunk|>`` itself
  stays a target.

Sequences are padded on the right. Literal ``<image>`` / ``<|endofchunk|>`` strings inside captions are removed
before tokenisation so the number of ``<image>`` tokens always matches the images.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

MEDIA_TOKEN = "<image>"
END_OF_CHUNK_TOKEN = "<|endofchunk|>"
IGNORE_INDEX = -100

Padding = Literal["longest", "max_length"]


@dataclass(frozen=True)
class FlamingoTokens:
    """Ids of the special tokens the Flamingo format needs."""

    media_token_id: int
    end_of_chunk_token_id: int
    eos_token: str
    pad_token_id: int

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> FlamingoTokens:
        """Check that the tokenizer knows ``<image>``, ``<|endofchunk|>`` (each as ONE token), eos and pad."""
        ids = {}
        for token in (MEDIA_TOKEN, END_OF_CHUNK_TOKEN):
            encoded = tokenizer(token, add_special_tokens=False)["input_ids"]
            token_id = tokenizer.convert_tokens_to_ids(token)
            if len(encoded) != 1 or token_id is None or encoded[0] != token_id or token_id == tokenizer.unk_token_id:
                raise ValueError(
                    f"tokenizer must hold {token!r} as a single special token (encodes to {encoded}); "
                    f"add it with tokenizer.add_special_tokens({{'additional_special_tokens': [{token!r}]}})"
                )
            ids[token] = token_id
        if tokenizer.eos_token is None:
            raise ValueError("tokenizer has no eos_token; the Flamingo format ends every text with it")
        if tokenizer.pad_token_id is None:
            raise ValueError(
                "tokenizer has no pad token; add one, e.g. tokenizer.add_special_tokens({'pad_token': '<PAD>'})"
            )
        return cls(ids[MEDIA_TOKEN], ids[END_OF_CHUNK_TOKEN], tokenizer.eos_token, tokenizer.pad_token_id)


def clean_text(text: str) -> str:
    """Remove literal special-token strings from raw text."""
    return text.replace(MEDIA_TOKEN, "").replace(END_OF_CHUNK_TOKEN, "")


def pair_text(caption: str, eos_token: str, prefix: str = "") -> str:
    """``<image>{prefix}{caption}<|endofchunk|>{eos}``."""
    return f"{MEDIA_TOKEN}{clean_text(prefix)}{clean_text(caption).strip()}{END_OF_CHUNK_TOKEN}{eos_token}"


def document_text(text_list: Sequence[str], image_sentences: Sequence[int], eos_token: str) -> str:
    """Interleave ``<image>`` markers into sentences, OpenFlamingo-style.

    image_sentences: for each image, in image order, the index of the sentence it precedes (non-decreasing).
    """
    sentences = [clean_text(s) for s in text_list]
    for index in image_sentences:
        if not 0 <= index < len(sentences):
            raise ValueError(f"image sentence index {index} out of range for {len(sentences)} sentences")
        sentences[index] = f"{END_OF_CHUNK_TOKEN}{MEDIA_TOKEN}{sentences[index]}"
    text = " ".join(sentences)
    text = text.replace(END_OF_CHUNK_TOKEN, "", 1)  # the first image opens a chunk without closing one
    text = text.replace(f" {END_OF_CHUNK_TOKEN}", END_OF_CHUNK_TOKEN)
    text = text.replace(f"{MEDIA_TOKEN} ", MEDIA_TOKEN).replace(f" {MEDIA_TOKEN}", MEDIA_TOKEN)
    return f"{text.strip()}{END_OF_CHUNK_TOKEN}{eos_token}"


def encode(tokenizer: Any, texts: Sequence[str], max_length: int) -> list[list[int]]:
    """Token ids per text (special tokens such as BOS added as the tokenizer does), truncated to max_length."""
    return tokenizer(list(texts), add_special_tokens=True, truncation=True, max_length=max_length)["input_ids"]


def pad_right(
    sequences: Sequence[Sequence[int]], pad_id: int, padding: Padding, max_length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest sequence (or max_length). Returns input_ids (B, L) long, attention_mask (B, L) long."""
    length = max_length if padding == "max_length" else max((len(s) for s in sequences), default=0)
    input_ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        input_ids[row, : len(sequence)] = torch.as_tensor(sequence, dtype=torch.long)
        attention_mask[row, : len(sequence)] = 1
    return input_ids, attention_mask


def pair_labels(input_ids: torch.Tensor, attention_mask: torch.Tensor, tokens: FlamingoTokens) -> torch.Tensor:
    """Labels (B, L) for pairs: -100 at padding, ``<image>`` tokens and position 0."""
    labels = input_ids.clone()
    labels[attention_mask == 0] = IGNORE_INDEX
    labels[input_ids == tokens.media_token_id] = IGNORE_INDEX
    if labels.shape[1]:
        labels[:, 0] = IGNORE_INDEX
    return labels


def document_labels(input_ids: torch.Tensor, attention_mask: torch.Tensor, tokens: FlamingoTokens) -> torch.Tensor:
    """Labels (B, L) for interleaved documents: pair masking plus text outside image chunks.

    A position t keeps its label only if the last ``<image>`` at or before t comes after the last
    ``<|endofchunk|>`` strictly before t (i.e. t is inside a chunk opened by an image).
    """
    labels = pair_labels(input_ids, attention_mask, tokens)
    batch, length = input_ids.shape
    if length == 0:
        return labels
    positions = torch.arange(length).expand(batch, length)
    none = torch.full_like(positions, -1)
    last_image = torch.where(input_ids == tokens.media_token_id, positions, none).cummax(dim=1).values
    eoc_here = torch.where(input_ids == tokens.end_of_chunk_token_id, positions, none)
    last_eoc_before = torch.cat([none[:, :1], eoc_here[:, :-1]], dim=1).cummax(dim=1).values
    labels[last_image <= last_eoc_before] = IGNORE_INDEX
    return labels


def tokenize_pairs(
    tokenizer: Any,
    captions: Sequence[str],
    tokens: FlamingoTokens,
    max_length: int,
    padding: Padding = "longest",
    prefix: str = "",
) -> dict[str, torch.Tensor]:
    """input_ids / attention_mask / labels, each (B, L), for a batch of captions (``prefix``: see :func:`pair_text`)."""
    ids = encode(tokenizer, [pair_text(c, tokens.eos_token, prefix) for c in captions], max_length)
    input_ids, attention_mask = pad_right(ids, tokens.pad_token_id, padding, max_length)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": pair_labels(input_ids, attention_mask, tokens),
    }


def tokenize_documents(
    tokenizer: Any, texts: Sequence[str], tokens: FlamingoTokens, max_length: int
) -> tuple[list[list[int]], list[int]]:
    """Token ids per document text (truncated) and the number of ``<image>`` tokens left in each."""
    ids = encode(tokenizer, texts, max_length)
    return ids, [sum(1 for t in row if t == tokens.media_token_id) for row in ids]


def collate_documents(
    ids: Sequence[Sequence[int]], tokens: FlamingoTokens, max_length: int, padding: Padding = "longest"
) -> dict[str, torch.Tensor]:
    input_ids, attention_mask = pad_right(ids, tokens.pad_token_id, padding, max_length)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": document_labels(input_ids, attention_mask, tokens),
    }
