"""Flamingo text format and OpenFlamingo label masking, checked by hand on small examples."""

from __future__ import annotations

import pytest
import torch
from data_helpers import WORDS, make_tokenizer

from data_pipelines.tokenization import (
    FlamingoTokens,
    collate_documents,
    document_labels,
    document_text,
    pair_text,
    tokenize_documents,
    tokenize_pairs,
)

M = -100  # masked


def ids(tokenizer, tokens: list[str]) -> list[int]:
    return tokenizer.convert_tokens_to_ids(tokens)


def test_pair_text_and_labels() -> None:
    tokenizer = make_tokenizer()
    tokens = FlamingoTokens.from_tokenizer(tokenizer)
    assert pair_text(" a red circle. ", "</s>") == "<image>a red circle.<|endofchunk|></s>"
    batch = tokenize_pairs(tokenizer, ["a red circle.", "two cats<image>"], tokens, max_length=16)
    first = ["<image>", "a", "red", "circle", ".", "<|endofchunk|>", "</s>"]
    second = ["<image>", "two", "cats", "<|endofchunk|>", "</s>", "<pad>", "<pad>"]  # literal <image> removed
    assert batch["input_ids"].tolist() == [ids(tokenizer, first), ids(tokenizer, second)]
    assert batch["attention_mask"].tolist() == [[1] * 7, [1] * 5 + [0] * 2]
    a, red, circle, dot, eoc, eos, two, cats = ids(
        tokenizer, ["a", "red", "circle", ".", "<|endofchunk|>", "</s>", "two", "cats"]
    )
    assert batch["labels"].tolist() == [[M, a, red, circle, dot, eoc, eos], [M, two, cats, eoc, eos, M, M]]


def test_pair_caption_prefix_is_part_of_the_target_text() -> None:
    """``prefix`` puts the caption in a prompt's form (``<image>Output:...``, vlm.eval's captioning prompt)."""
    tokenizer = make_tokenizer(words=(*WORDS, "Output", ":"))
    tokens = FlamingoTokens.from_tokenizer(tokenizer)
    assert pair_text(" a cat ", "</s>", prefix="Output:") == "<image>Output:a cat<|endofchunk|></s>"
    assert pair_text("a cat", "</s>", prefix="<image>") == "<image>a cat<|endofchunk|></s>"  # one image token
    batch = tokenize_pairs(tokenizer, ["a cat"], tokens, max_length=16, prefix="Output:")
    out, colon, a, cat, eoc, eos = ids(tokenizer, ["Output", ":", "a", "cat", "<|endofchunk|>", "</s>"])
    assert batch["input_ids"][0].tolist() == [tokens.media_token_id, out, colon, a, cat, eoc, eos]
    assert batch["labels"][0].tolist() == [M, out, colon, a, cat, eoc, eos]


def test_pair_labels_with_bos_and_pad_equal_to_eos() -> None:
    tokenizer = make_tokenizer(bos=True, pad_is_eos=True)
    tokens = FlamingoTokens.from_tokenizer(tokenizer)
    batch = tokenize_pairs(tokenizer, ["a cat", "a"], tokens, max_length=16, padding="max_length")
    assert batch["input_ids"].shape == (2, 16)
    assert batch["input_ids"][0, :6].tolist() == ids(
        tokenizer, ["<s>", "<image>", "a", "cat", "<|endofchunk|>", "</s>"]
    )
    a, cat, eoc, eos = ids(tokenizer, ["a", "cat", "<|endofchunk|>", "</s>"])
    assert batch["labels"][0].tolist() == [M, M, a, cat, eoc, eos] + [M] * 10  # BOS and <image> masked
    assert batch["labels"][1].tolist() == [M, M, a, eoc, eos] + [M] * 11  # eos kept although pad == eos


def test_document_text_follows_openflamingo() -> None:
    text = document_text(["intro text", "a red circle.", "two blue squares.", "this sentence"], [1, 2], "</s>")
    assert text == (
        "intro text<image>a red circle.<|endofchunk|><image>two blue squares. this sentence<|endofchunk|></s>"
    )
    assert document_text(["a cat", "the dog"], [0, 0], "</s>") == (
        "<image><|endofchunk|><image>a cat the dog<|endofchunk|></s>"
    )
    with pytest.raises(ValueError, match="out of range"):
        document_text(["one"], [1], "</s>")


def test_document_labels_hand_checked() -> None:
    tokenizer = make_tokenizer()
    tokens = FlamingoTokens.from_tokenizer(tokenizer)
    text = document_text(["intro text", "a red circle.", "two blue squares.", "this sentence"], [1, 2], "</s>")
    _, counts = tokenize_documents(tokenizer, [text], tokens, max_length=8)
    assert counts == [1]  # with max_length 8 only the first <image> survives
    full, image_counts = tokenize_documents(tokenizer, [text], tokens, max_length=64)
    assert image_counts == [2]
    words = [
        "intro",
        "text",
        "<image>",
        "a",
        "red",
        "circle",
        ".",
        "<|endofchunk|>",
        "<image>",
        "two",
        "blue",
        "squares",
        ".",
        "this",
        "sentence",
        "<|endofchunk|>",
        "</s>",
    ]
    assert full[0] == ids(tokenizer, words)
    batch = collate_documents(full + [full[0][:8]], tokens, max_length=64)
    keep = [False, False, False, True, True, True, True, True, False, True, True, True, True, True, True, True, False]
    expected = [t if k else M for t, k in zip(ids(tokenizer, words), keep)]
    assert batch["labels"][0].tolist() == expected
    # the truncated copy: 8 tokens, one image, then padding
    assert batch["labels"][1].tolist() == expected[:8] + [M] * 9
    assert batch["attention_mask"][1].tolist() == [1] * 8 + [0] * 9


def test_document_labels_mask_text_between_chunks() -> None:
    """Text after an <|endofchunk|> that is not introduced by an <image> gets no loss."""
    tokenizer = make_tokenizer()
    tokens = FlamingoTokens.from_tokenizer(tokenizer)
    sequence = ids(
        tokenizer,
        ["<image>", "a", "<|endofchunk|>", "the", "photo", "<image>", "red", "<|endofchunk|>", "</s>", "<pad>"],
    )
    input_ids = torch.tensor([sequence])
    attention = torch.tensor([[1] * 9 + [0]])
    a, eoc, red = ids(tokenizer, ["a", "<|endofchunk|>", "red"])
    assert document_labels(input_ids, attention, tokens).tolist() == [[M, a, eoc, M, M, M, red, eoc, M, M]]


def test_tokenizer_without_special_tokens_is_rejected() -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(vocab={"<unk>": 0, "<pad>": 1, "</s>": 2, "a": 3}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", eos_token="</s>"
    )
    with pytest.raises(ValueError, match="<image>"):
        FlamingoTokens.from_tokenizer(tokenizer)
