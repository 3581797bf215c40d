"""Batched model calls of an evaluation: prompts -> left-padded batches -> generations or class scores.

A :class:`Prompt` is a text with one ``<image>`` per image and the image files (None = the constant
image of the ablated control). :func:`prompt_loader` loads and preprocesses the images in DataLoader
workers and tokenizes with :class:`vlm.FlamingoProcessor`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Optional

import torch
from torch import Tensor

from ..factory import MEDIA_TOKEN
from ..processor import FlamingoInputs, FlamingoProcessor
from .datasets import open_image
from .tasks import Prompt


def prompt_items(text: str, images: Sequence) -> list:
    """Interleave a text with ``<image>`` markers and the images, as FlamingoProcessor takes them."""
    parts = text.split(MEDIA_TOKEN)
    if len(parts) - 1 != len(images):
        raise ValueError(f"prompt has {len(parts) - 1} {MEDIA_TOKEN} markers but {len(images)} images: {text!r}")
    items: list = [parts[0]] if parts[0] else []
    for image, part in zip(images, parts[1:]):
        items.append(image)
        if part:
            items.append(part)
    return items


class _PromptImages(torch.utils.data.Dataset):
    def __init__(self, prompts: Sequence[Prompt], transform, constant_image: Optional[Tensor]):
        self.prompts, self.transform, self.constant_image = prompts, transform, constant_image

    def __len__(self) -> int:
        return len(self.prompts)

    def _image(self, path: Optional[str]) -> Tensor:
        if path is None:
            if self.constant_image is None:
                raise ValueError("a prompt uses the constant image but none was given")
            return self.constant_image
        return self.transform(open_image(path))

    def __getitem__(self, i: int) -> list:
        p = self.prompts[i]
        return prompt_items(p.text, [self._image(path) for path in p.images])


def _collate(processor: FlamingoProcessor, batch: list) -> FlamingoInputs:
    return processor(batch, padding_side="left")


def prompt_loader(
    prompts: Sequence[Prompt],
    processor: FlamingoProcessor,
    batch_size: int,
    constant_image: Optional[Tensor] = None,
    num_workers: int = 0,
) -> torch.utils.data.DataLoader:
    """Batches of :class:`~vlm.processor.FlamingoInputs`, in prompt order, left padded."""
    return torch.utils.data.DataLoader(
        _PromptImages(prompts, processor.image_processor, constant_image),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=functools.partial(_collate, processor),
    )


def prompt_batches(prompts: Sequence[Prompt], processor: FlamingoProcessor, batch_size: int,
                   constant_image: Optional[Tensor], num_workers: int, progress: bool, label: str):  # fmt: skip
    """``(inputs, start)`` per batch of :func:`prompt_loader` (``start``: the index of its first prompt), with a
    progress bar labelled ``label``."""
    from tqdm import tqdm

    with tqdm(total=len(prompts), desc=label, disable=not progress, leave=False) as bar:
        start = 0
        for inputs in prompt_loader(prompts, processor, batch_size, constant_image, num_workers):
            yield inputs, start
            start += inputs.input_ids.shape[0]
            bar.update(inputs.input_ids.shape[0])


def constant_image(image_processor, value: int = 128) -> Tensor:
    """The ablation image: a uniform grey picture through the model's preprocessing, (C, H, W)."""
    from PIL import Image

    return image_processor(Image.new("RGB", (224, 224), (value, value, value)))


def _device_dtype(model) -> tuple[torch.device, torch.dtype]:
    p = next(model.vision_encoder.parameters())
    return p.device, p.dtype


@torch.no_grad()
def generate(model, inputs: FlamingoInputs, tokenizer, **generate_kwargs) -> list[str]:
    """Completions of a left-padded batch, decoded up to the first ``<|endofchunk|>`` / pad / eos token."""
    device, dtype = _device_dtype(model)
    vision_x = None if inputs.vision_x is None else inputs.vision_x.to(device, dtype)
    media_mask = None if inputs.media_mask is None else inputs.media_mask.to(device)
    ids, mask = inputs.input_ids.to(device), inputs.attention_mask.to(device)
    out = model.generate(vision_x, ids, attention_mask=mask, media_mask=media_mask, **generate_kwargs)
    stops = {model.eoc_token_id, model.pad_token_id, tokenizer.eos_token_id} - {None}
    texts = []
    for row in out[:, ids.shape[1] :].tolist():
        cut = next((i for i, tok in enumerate(row) if tok in stops), len(row))
        texts.append(tokenizer.decode(row[:cut], skip_special_tokens=True))
    return texts


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@torch.no_grad()
def class_log_likelihoods(
    model,
    inputs: FlamingoInputs,
    prompts: Sequence[str],
    class_names: Sequence[str] | Sequence[Sequence[str]],
    tokenizer,
    normalize_length: bool = True,
    rows_per_call: int = 64,
) -> Tensor:
    """(B, C) log-likelihood of each class name continuing each prompt (text with ``<image>`` markers).

    ``class_names``: one list for every prompt, or one list per prompt (each of the same length C; binding
    episodes score each episode's own words).

    Each prompt + class name is tokenized as one string and the tokens after the longest common prefix
    with the prompt's own tokens are scored, so the class is scored as it is tokenized in context
    (OpenFlamingo tokenizes the class name alone, which for SentencePiece/BPE vocabularies gives
    tokens the model never sees after ``Output:``). The images are encoded once per batch; the
    language model reads (prompt, class) rows right padded, ``rows_per_call`` rows per call.
    """
    device, dtype = _device_dtype(model)
    b = len(prompts)
    per_prompt = (
        [list(class_names)] * b if all(isinstance(n, str) for n in class_names) else [list(n) for n in class_names]
    )
    if len(per_prompt) != b or len({len(n) for n in per_prompt}) != 1 or not per_prompt[0]:
        raise ValueError(
            f"class_names must be one list of names or one list per prompt ({b}), all of one length; got "
            f"{[len(n) for n in per_prompt]} names"
        )
    c = len(per_prompt[0])
    vision_x = inputs.vision_x.to(device, dtype)
    latents, media_mask = model.encode_media(vision_x, inputs.media_mask.to(device))  # (B, T_img, n, D)
    context = tokenizer(list(prompts))["input_ids"]
    full = tokenizer([p + name for p, names in zip(prompts, per_prompt) for name in names])["input_ids"]  # (B*C)
    classes_per_call = max(1, rows_per_call // b)
    scores = torch.empty(b, c)
    pad = model.pad_token_id
    for c0 in range(0, c, classes_per_call):
        cs = range(c0, min(c, c0 + classes_per_call))
        rows = [full[q * c + j] for q in range(b) for j in cs]  # query-major: row r shows media r // len(cs)
        starts = [_common_prefix(context[q], full[q * c + j]) for q in range(b) for j in cs]
        for r, (row, s) in enumerate(zip(rows, starts)):
            if s == 0 or s >= len(row):
                name = per_prompt[r // len(cs)][cs[r % len(cs)]]
                raise ValueError(f"class {name!r} adds no token after the prompt")
        length = max(map(len, rows))
        limit = getattr(model, "max_positions", None)
        if limit is not None and length > limit:
            raise ValueError(f"prompt + class name is {length} tokens, more than the LM's {limit} positions")
        ids = torch.full((len(rows), length), pad, dtype=torch.long)
        target = torch.zeros(len(rows), length, dtype=torch.bool)  # True at the scored (class) tokens
        for r, (row, s) in enumerate(zip(rows, starts)):
            ids[r, : len(row)] = torch.tensor(row)
            target[r, s : len(row)] = True
        mask = (torch.arange(length)[None] < torch.tensor([len(r) for r in rows])[:, None]).long()
        ids, mask, target = ids.to(device), mask.to(device), target.to(device)
        with model.conditioning.activate(model.lang_encoder, latents, media_mask):
            logits = model.lang_encoder(input_ids=ids, attention_mask=mask, use_cache=False).logits
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # (R, L-1, V): predicts tokens 1..L-1
        token_logp = logp.gather(2, ids[:, 1:, None]).squeeze(-1) * target[:, 1:]  # (R, L-1)
        total = token_logp.sum(dim=1)
        if normalize_length:
            total = total / target[:, 1:].sum(dim=1)
        scores[:, c0 : c0 + len(cs)] = total.reshape(b, len(cs)).cpu()
    return scores
