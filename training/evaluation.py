"""Held-out loss, few-shot generations on held-out images, and caption scoring for the synthetic scenes.

Every rank takes part (under ZeRO-3 each forward pass gathers parameters collectively): the held-out loss is
computed on the same number of batches per rank and summed over ranks; generations use the same inputs on every
rank, so all ranks decode the same number of steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from .config import ConfigError
from .distributed import all_reduce_sum


@dataclass
class FewShotSample:
    true: str
    generated: str

    @property
    def exact(self) -> bool:
        return self.generated.strip() == self.true.strip()


def move_batch(batch: dict[str, Any], device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    out = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device)
            if key == "vision_x":
                value = value.to(dtype)
        out[key] = value
    return out


def target_tokens(labels: torch.Tensor) -> int:
    """Tokens that carry a loss (labels are shifted inside the model)."""
    return int((labels[:, 1:] != -100).sum())


@torch.no_grad()
def held_out_loss(
    model: torch.nn.Module,
    loader: Any,
    num_batches: int,
    device: torch.device,
    dtype: torch.dtype,
    ablate_images: bool = False,
    shuffle_images: bool = False,
) -> Optional[float]:
    """Token-weighted mean loss over ``num_batches`` batches per rank, from the loader's start, summed over ranks.

    ``ablate_images``: every image replaced by the constant one (zeros after normalisation, as the few-shot
    control), so the difference to the real loss is what the images are worth to the model, in nats per token.
    That gap can overstate it for a model that relies on its images: a constant image is also out of distribution.
    ``shuffle_images``: each sample gets the images of another sample in its batch (the batch rolled by one), real
    images that belong to another text -- the gap to the real loss is then only the information the images carry
    about their own text. A batch of one sample takes an image of the batch before it (ValueError for the first)."""
    if ablate_images and shuffle_images:
        raise ValueError("held_out_loss: ablate_images and shuffle_images are two different controls; pick one")
    if loader is None or num_batches == 0:
        return None
    loader.load_state_dict({**loader.state_dict(), "position": 0})
    totals = torch.zeros(2, dtype=torch.float64)
    previous: Optional[torch.Tensor] = None
    it = iter(loader)
    for _ in range(num_batches):
        batch = move_batch(next(it), device, dtype)
        vision_x = batch["vision_x"]
        if ablate_images:
            vision_x = torch.zeros_like(vision_x)
        elif shuffle_images:
            real = vision_x
            if vision_x.shape[0] > 1:
                vision_x = vision_x.roll(1, dims=0)
            elif previous is not None and previous.shape[1:] == vision_x.shape[1:]:
                vision_x = previous[:1]  # a last batch of one sample: an image of the batch before
            else:
                raise ValueError(
                    f"held_out_loss(shuffle_images=True) needs batches of at least 2 samples to give each one "
                    f"another sample's images, got a batch of {vision_x.shape[0]} (raise the batch size)"
                )
            previous = real
        out = model(
            vision_x,
            batch["input_ids"],
            attention_mask=batch["attention_mask"],
            labels=batch["labels"],
            loss_only=True,
            media_mask=batch["media_mask"],
        )
        n = target_tokens(batch["labels"])
        totals += torch.tensor([float(out.loss) * n, n], dtype=torch.float64)
    totals = all_reduce_sum(totals)
    return float(totals[0] / totals[1]) if totals[1] > 0 else None


def _caption(meta: dict, input_ids: torch.Tensor, tokenizer: Any) -> str:
    info = meta.get("json") or {}
    caption = info.get("caption") or (info.get("captions") or [None])[0]
    if isinstance(caption, str) and caption.strip():
        return caption.strip()
    return tokenizer.decode(input_ids, skip_special_tokens=True).strip()  # the text the loader built


def demo_examples(loader: Any, tokenizer: Any, num_shots: int, num_queries: int) -> tuple[list, list]:
    """(demonstrations [(image, caption)], queries [(image, caption)]) from the start of a held-out loader."""
    loader.load_state_dict({**loader.state_dict(), "position": 0})
    items: list[tuple[torch.Tensor, str]] = []
    it = iter(loader)
    while len(items) < num_shots + num_queries:
        batch = next(it)
        for image, meta, ids in zip(batch["vision_x"][:, 0, 0], batch["metadata"], batch["input_ids"]):
            items.append((image, _caption(meta, ids, tokenizer)))
    return items[:num_shots], items[num_shots : num_shots + num_queries]


def lm_positions(lang_encoder: torch.nn.Module) -> Optional[int]:
    """The positions a Hugging Face causal LM has (None where its config does not say)."""
    config = getattr(lang_encoder, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_seq_len", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_few_shot_prompts(config: Any, model: torch.nn.Module, demo_loader: Any) -> None:
    """ConfigError unless the few-shot prompts of the evaluation work: ``eval.num_shots`` demonstrations leave
    held-out samples to query (more would repeat them), and the prompt with ``eval.max_new_tokens`` fits the
    LM's positions. Reads the demonstrations only (a batch or two), before any training step."""
    cfg = config.eval
    if demo_loader is None or not cfg.uses_demonstrations():
        return
    held_out = sum(demo_loader.num_samples.values())
    if cfg.num_shots >= held_out:
        raise ConfigError(
            f"eval.num_shots: expected < the {held_out} samples of data.val.shards={config.data.val.shards!r} (the "
            f"demonstrations and the queries are drawn from them; more would repeat them), got {cfg.num_shots}"
        )
    positions = lm_positions(model.lang_encoder)
    if positions is None:
        return
    import vlm

    demos, queries = demo_examples(demo_loader, model.tokenizer, cfg.num_shots, 1)
    prompt = vlm.build_few_shot_prompt(demos, queries[0][0], config.data.val.caption_prefix)
    length = int(vlm.FlamingoProcessor(model.tokenizer, model.image_processor)([prompt]).input_ids.shape[1])
    if length + cfg.max_new_tokens > positions:
        raise ConfigError(
            f"eval.num_shots: {cfg.num_shots} demonstrations make a {length}-token prompt, which with "
            f"eval.max_new_tokens={cfg.max_new_tokens} needs {length + cfg.max_new_tokens} positions; the language "
            f"model has {positions}. Expected fewer demonstrations (or new tokens), got eval.num_shots={cfg.num_shots}"
        )


@torch.no_grad()
def few_shot_captions(
    model: torch.nn.Module,
    demonstrations: list,
    queries: list,
    max_new_tokens: int,
    dtype: torch.dtype,
    synced: bool = False,
    prompt_prefix: str = "",
) -> list[FewShotSample]:
    """Greedy captions for the query images after the demonstrations (``<image>{prompt_prefix}{caption}`` each),
    next to the true captions."""
    import vlm

    if not queries:
        return []
    demos = [(image.to(dtype), text) for image, text in demonstrations]
    images = [image.to(dtype) for image, _ in queries]
    kwargs = {"synced_gpus": True} if synced else {}
    generated = vlm.few_shot(
        model, demos, images, prompt_prefix=prompt_prefix, max_new_tokens=max_new_tokens, do_sample=False, **kwargs
    )
    return [FewShotSample(true, text.strip()) for (_, true), text in zip(queries, generated)]


def constant_images(demonstrations: list, queries: list) -> tuple[list, list]:
    """The same (image, text) lists with every image replaced by one constant image (zeros after normalisation:
    the dataset's mean colour), for the image-ablated control."""
    blank = [(torch.zeros_like(image), text) for image, text in demonstrations]
    return blank, [(torch.zeros_like(image), text) for image, text in queries]


def format_scene_scores(scores: dict[str, float]) -> str:
    return (
        f"exact: {scores['exact_match']:.0%}  well-formed: {scores['well_formed']:.0%}  "
        f"attributes right: {scores['attribute_accuracy']:.1%} (position {scores['position_accuracy']:.0%}, "
        f"shape {scores['shape_accuracy']:.0%}, colour {scores['colour_accuracy']:.0%}, "
        f"count {scores['count_accuracy']:.0%})"
    )


SCENE_ATTRIBUTES = ("shape", "colour", "count")


def score_scene_captions(samples: list[FewShotSample]) -> dict[str, float]:
    """Exact-match rate and, for well-formed captions of the synthetic scenes, attribute accuracy.

    Each group of shapes in a true caption is looked up by its position in the generated one; its shape, colour
    and count are each right or wrong (all wrong where the position is missing). ``attribute_accuracy`` is the
    share of right attributes, the mean of ``shape_accuracy``, ``colour_accuracy`` and ``count_accuracy``;
    ``position_accuracy`` is the share of true groups whose position the generated caption names."""
    from data_pipelines.synthetic import parse_caption

    exact = sum(s.exact for s in samples)
    groups = well_formed = positions = 0
    right = dict.fromkeys(SCENE_ATTRIBUTES, 0)
    for s in samples:
        truth, guess = parse_caption(s.true), parse_caption(s.generated)
        if truth is None:
            continue
        well_formed += guess is not None
        by_position = {g.position: g for g in guess or []}
        for g in truth:
            other = by_position.get(g.position)
            groups += 1
            positions += other is not None
            for attr in SCENE_ATTRIBUTES:
                right[attr] += other is not None and getattr(other, attr) == getattr(g, attr)
    n = max(1, len(samples))
    share = (lambda k: k / groups) if groups else (lambda k: 0.0)
    return {
        "exact_match": exact / n,
        "well_formed": well_formed / n,
        "attribute_accuracy": share(sum(right.values()) / len(SCENE_ATTRIBUTES)),
        "position_accuracy": share(positions),
        **{f"{attr}_accuracy": share(right[attr]) for attr in SCENE_ATTRIBUTES},
    }


def binding_table(results: dict[str, Any], trained_classes: set[str]) -> list[dict[str, Any]]:
    """Rows (ways, shots) of a :func:`vlm.eval.binding.evaluate_binding` result: open-ended accuracy, its
    image-ablated control, the prototype reference and chance, and the accuracy on the episodes whose query class
    was (``trained``) or was not (``held_out``) among the training episodes' classes (None where there are none)."""
    ablated = {(r["ways"], r["shots"]): r["mean"]["accuracy"] for r in results["runs"] if r["ablate_images"]}
    rows = []
    for run in results["runs"]:
        if run["ablate_images"]:
            continue
        w, k = run["ways"], run["shots"]
        records = [rec for trial in run["trials"] for rec in trial["predictions"]]
        split = {}
        for name, keep in (("trained", True), ("held_out", False)):
            chosen = [rec["correct"] for rec in records if (rec["query_class"] in trained_classes) == keep]
            split[name] = 100.0 * sum(chosen) / len(chosen) if chosen else None
            split[f"{name}_episodes"] = len(chosen)
        proto = results.get("prototype", {}).get(f"{w}-way", {}).get(str(k))
        rows.append(
            {
                "ways": w,
                "shots": k,
                "accuracy": run["mean"]["accuracy"],
                "ablated": ablated.get((w, k)),
                "prototype": None if proto is None else proto["mean"],
                "chance": 100.0 / w,
                **split,
            }
        )
    return sorted(rows, key=lambda r: (r["ways"], r["shots"]))


def format_binding_rows(rows: list[dict[str, Any]]) -> str:
    """The binding table as aligned text: one line per (ways, shots)."""

    def pct(value: Optional[float]) -> str:
        return "-" if value is None else f"{value:.1f}"

    lines = [
        f"  {'ways':>4} {'shots':>5} {'model':>7} {'trained':>8} {'held-out':>9} {'ablated':>8} "
        f"{'prototype':>10} {'chance':>7}   (accuracy %; trained / held-out: the query's class in training episodes)"
    ]
    for r in rows:
        lines.append(
            f"  {r['ways']:>4} {r['shots']:>5} {pct(r['accuracy']):>7} {pct(r['trained']):>8} "
            f"{pct(r['held_out']):>9} {pct(r['ablated']):>8} {pct(r['prototype']):>10} {pct(r['chance']):>7}"
        )
    return "\n".join(lines)
