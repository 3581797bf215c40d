"""Few-shot prompting: demonstrations (image, text) + query images -> completions."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

from .factory import END_OF_CHUNK_TOKEN
from .model import Flamingo
from .processor import FlamingoProcessor


def build_few_shot_prompt(demonstrations: Sequence[tuple[Any, str]], query: Any, prompt_prefix: str = "") -> list:
    """``<image>{prefix}{text}<|endofchunk|>`` per demonstration, then ``<image>{prefix}`` for the query."""
    items: list = []
    for image, text in demonstrations:
        items += [image, f"{prompt_prefix}{text}{END_OF_CHUNK_TOKEN}"]
    return items + [query, prompt_prefix]


def few_shot(
    model: Flamingo,
    demonstrations: Sequence[tuple[Any, str]],
    queries: Sequence[Any],
    prompt_prefix: str = "",
    processor: Optional[FlamingoProcessor] = None,
    max_new_tokens: int = 20,
    **generate_kwargs,
) -> list[str]:
    """Complete each query image after the same demonstrations; one string per generated sequence.

    Images may be PIL images or preprocessed tensors. Generation stops at ``<|endofchunk|>``
    (the end of an answer in the prompt format); any Hugging Face generation option can be passed.
    """
    if not queries:
        raise ValueError("few_shot needs at least one query image")
    if processor is None:
        if model.tokenizer is None:
            raise ValueError("the model has no tokenizer attached; pass a FlamingoProcessor")
        processor = FlamingoProcessor(model.tokenizer, model.image_processor)
    batch = [build_few_shot_prompt(demonstrations, q, prompt_prefix) for q in queries]
    inputs = processor(batch, padding_side="left").to(next(model.parameters()).device)
    out = model.generate(
        inputs.vision_x,
        inputs.input_ids,
        attention_mask=inputs.attention_mask,
        media_mask=inputs.media_mask,
        max_new_tokens=max_new_tokens,
        **generate_kwargs,
    )
    stops = {model.eoc_token_id, model.pad_token_id, processor.tokenizer.eos_token_id} - {None}
    completions = []
    for row in out[:, inputs.input_ids.shape[1] :].tolist():
        cut = next((i for i, tok in enumerate(row) if tok in stops), len(row))
        completions.append(processor.tokenizer.decode(row[:cut], skip_special_tokens=True))
    return completions
