"""Open-ended few-shot classification with fast binding: Frozen's test of learning from the prompt.

Tsimpoukelli et al., "Multimodal Few-Shot Learning with Frozen Language Models" (NeurIPS 2021), section 4.3: an
episode draws ``N`` classes of a labelled image set and gives each a made-up word ("dax", "blicket") that exists only
inside this prompt; ``K`` images of each class are shown in a shuffled order, each as ``<image>This is a dax.
<|endofchunk|>`` (the support set, shown ``repeats`` times), and a query image of one of the classes follows as
``<image>This is a``. The answer can come from nowhere but the demonstrations.

Scorers: *open-ended* (Frozen's): the greedy completion is correct when its first word is the query class's word;
*closed*: the ``N`` words ranked by the likelihood of ``" {word}."`` after the query (chance is ``1/N``).

Controls in every run: 0 shots (``zero_shot``: no demonstration can bind a word, so near 0 open-ended); the same
prompts with every image replaced by one constant image (``ablated``: the words are still in the prompt, so the
best a model can do is guess among them, 1/N); and ``prototype``, a reference that needs no language model: the
nearest class prototype (mean of the support images' L2-normalised pooled features of the model's own vision tower,
cosine similarity to the query's) over the same episodes -- what binding by visual similarity reaches with this tower.

Episodes are nested across shot counts: episode ``i`` of a trial (seed) and a number of ways has the same classes,
words, query and support order at every ``K`` (``K`` shots are the first ``K`` support images of each class), so the
shot counts are compared episode by episode (:mod:`vlm.eval.compare`).
"""

from __future__ import annotations

import hashlib
import math
import re
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch

from data_pipelines.binding import (
    DEFAULT_INDUCTION,
    DEFAULT_TEMPLATE,
    build_word_pool,
    check_template,
    chunk,
    induction_text,
    query_prefix,
)

from ..factory import MEDIA_TOKEN
from ..processor import FlamingoProcessor
from .compare import paired_differences
from .datasets import EvalDataset
from .demos import image_features
from .inference import class_log_likelihoods, constant_image, generate, prompt_batches
from .runner import TrialStore, aggregate_trials, model_identity, state_digest
from .tasks import Prompt

BINDING_STREAM = 0x62696E64
DEFAULT_WAYS = (2, 5)
DEFAULT_BINDING_SHOTS = (0, 1, 3, 5)


@dataclass
class BindingTask:
    """The prompt and generation settings of a binding evaluation (also what keys its resumable trials)."""

    template: str = DEFAULT_TEMPLATE
    induction: str = DEFAULT_INDUCTION
    task_induction: bool = False
    repeats: int = 1
    names: str = "made-up"
    max_new_tokens: int = 6
    closed_form: bool = True
    name: str = field(init=False, default="binding")
    metric: str = field(init=False, default="accuracy")
    stop_words: tuple[str, ...] = field(init=False, default=())

    def __post_init__(self) -> None:
        check_template(self.template)
        if "{words}" not in self.induction:
            raise ValueError(f"induction sentence must contain '{{words}}', got {self.induction!r}")
        if isinstance(self.repeats, bool) or not isinstance(self.repeats, int) or self.repeats < 1:
            raise ValueError(f"repeats must be an int >= 1, got {self.repeats!r}")
        if self.names not in ("made-up", "real"):
            raise ValueError(f"names must be 'made-up' or 'real', got {self.names!r}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")

    def generation_kwargs(self) -> dict:
        return {"max_new_tokens": self.max_new_tokens, "num_beams": 1, "do_sample": False,
                "closed_form": self.closed_form}  # fmt: skip

    def continuation(self, word: str) -> str:
        """What follows the query prompt when the answer is ``word`` (``" dax."``), the closed form's candidate."""
        prefix = query_prefix(self.template)
        return self.template.replace("{word}", word)[len(prefix) :]


@dataclass
class BindingEpisode:
    """One evaluation episode: N classes (dataset labels), their words, the query, and each class's support images
    (as many as the largest shot count) in the order they are shown."""

    id: int
    ways: int
    classes: list[int]
    words: list[str]
    query: int  # index into classes
    query_image: str
    support: list[list[str]]  # per class, max_shots images
    order: list[tuple[int, int]]  # (class index, shot index) of every support image, in showing order

    def shown(self, shots: int) -> list[tuple[int, str]]:
        """(class index, image) of the support images at ``shots`` shots, in showing order."""
        return [(c, self.support[c][j]) for c, j in self.order if j < shots]


def word_matches(output: str, word: str) -> bool:
    """Whether the completion starts with the word (case and punctuation ignored; multi-word names word by word)."""
    said = re.findall(r"[a-z0-9]+", output.lower())
    target = re.findall(r"[a-z0-9]+", word.lower())
    return bool(target) and said[: len(target)] == target


def build_episodes(
    dataset: EvalDataset,
    classes: Sequence[int],
    ways: int,
    max_shots: int,
    num_episodes: int,
    seed: int,
    words: Sequence[str],
    names: str = "made-up",
) -> list[BindingEpisode]:
    """``num_episodes`` episodes of ``ways`` of ``classes``; a pure function of the arguments (see the module)."""
    by_class: dict[int, list[int]] = {c: [] for c in classes}
    for i, sample in enumerate(dataset.samples):
        if sample.label in by_class:
            by_class[sample.label].append(i)
    need = max_shots + 1
    small = [dataset.class_names[c] for c, ids in by_class.items() if len(ids) < need]
    if small:
        raise ValueError(f"classes {small} have fewer than {need} images ({max_shots} shots + the query)")
    if ways > len(classes) or ways < 2:
        raise ValueError(f"{ways}-way episodes need 2 <= ways <= the {len(classes)} classes evaluated")
    if names == "made-up" and len(words) < ways:
        raise ValueError(f"{ways}-way episodes need at least {ways} words, the pool has {len(words)}")
    episodes = []
    for e in range(num_episodes):
        rng = np.random.default_rng([seed, BINDING_STREAM, ways, e])
        chosen = [int(classes[i]) for i in rng.choice(len(classes), ways, replace=False)]
        if names == "real":
            episode_words = [dataset.class_names[c] for c in chosen]
        else:
            episode_words = [words[i] for i in rng.choice(len(words), ways, replace=False)]
        query = int(rng.integers(ways))
        support = []
        query_image = ""
        for j, c in enumerate(chosen):
            ids = by_class[c]
            picks = rng.choice(len(ids), max_shots + (1 if j == query else 0), replace=False)
            images = [dataset.samples[ids[p]].image for p in picks]
            if j == query:
                query_image, images = images[-1], images[:-1]
            support.append(images)
        order = [(j, s) for j in range(ways) for s in range(max_shots)]
        order = [order[i] for i in rng.permutation(len(order))]
        episodes.append(BindingEpisode(e, ways, chosen, episode_words, query, query_image, support, order))
    return episodes


def episode_prompt(episode: BindingEpisode, shots: int, task: BindingTask, ablated: bool = False) -> Prompt:
    """The prompt of an episode at ``shots`` shots: [induction] support x repeats, then ``<image>This is a``."""
    shown = episode.shown(shots) * task.repeats
    text = induction_text(episode.words, task.induction) if task.task_induction else ""
    text += "".join(chunk(task.template, episode.words[c]) for c, _ in shown)
    text += MEDIA_TOKEN + query_prefix(task.template)
    images: list[Optional[str]] = [image for _, image in shown] + [episode.query_image]
    return Prompt(text, [None] * len(images) if ablated else images)


def prototype_correct(episode: BindingEpisode, shots: int, features: dict[str, torch.Tensor]) -> Optional[bool]:
    """Nearest class prototype (mean of normalised support features, renormalised; cosine) -- None at 0 shots."""
    if shots == 0:
        return None
    protos = []
    for c in range(episode.ways):
        feats = torch.stack([features[image] for image in episode.support[c][:shots]]).mean(dim=0)
        protos.append(torch.nn.functional.normalize(feats, dim=-1))
    similarity = torch.stack(protos) @ features[episode.query_image]
    return int(similarity.argmax()) == episode.query


@contextmanager
def cached_vision_tokens(model):
    """Within the block, the vision tower computes each distinct image once: its outputs are kept by the bytes
    of the preprocessed pixels (episodes show the same images at every shot count and in the closed form)."""
    encoder = model.vision_encoder
    cache: dict[bytes, torch.Tensor] = {}
    original = encoder.forward

    def forward(pixels: torch.Tensor, *args, **kwargs):
        if args or kwargs:
            return original(pixels, *args, **kwargs)
        keys = [
            hashlib.sha1(p.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes()).digest() for p in pixels
        ]
        todo = [i for i, k in enumerate(keys) if k not in cache]
        todo = list({keys[i]: i for i in todo}.values())  # repeated images in one batch: computed once
        if todo:
            out = original(pixels[todo])
            for i, tokens in zip(todo, out):
                cache[keys[i]] = tokens
        return torch.stack([cache[k] for k in keys])

    encoder.forward = forward
    try:
        yield cache
    finally:
        del encoder.forward


def _run_episode_prompts(model, processor, task, prompts, words, batch_size, grey, num_workers, progress, label):
    """(outputs, seconds): per prompt [completion, closed-form scores or None]."""
    outputs: list = []
    start = time.perf_counter()
    for inputs, offset in prompt_batches(prompts, processor, batch_size, grey, num_workers, progress, label):
        n = inputs.input_ids.shape[0]
        texts = generate(
            model, inputs, model.tokenizer, max_new_tokens=task.max_new_tokens, num_beams=1, do_sample=False
        )
        scores: list = [None] * n
        if task.closed_form:
            candidates = [[task.continuation(w) for w in ws] for ws in words[offset : offset + n]]
            scores = class_log_likelihoods(
                model, inputs, [p.text for p in prompts[offset : offset + n]], candidates, model.tokenizer,
                normalize_length=False,
            ).tolist()  # fmt: skip
        outputs += [[t, s] for t, s in zip(texts, scores)]
    return outputs, time.perf_counter() - start


def select_classes(dataset: EvalDataset, classes: Optional[Sequence[str]]) -> list[int]:
    """Labels of the evaluated classes: all (None), or those named (by class name or folder name)."""
    names = list(dataset.class_names or [])
    folders = list(dataset.extra.get("class_folders", names))
    if classes is None:
        return list(range(len(names)))
    out = []
    for c in classes:
        if c in names:
            out.append(names.index(c))
        elif c in folders:
            out.append(folders.index(c))
        elif c.replace("_", " ") in names:
            out.append(names.index(c.replace("_", " ")))
        else:
            raise ValueError(f"class {c!r} is not in the data; its classes are {names}")
    if len(set(out)) != len(out):
        raise ValueError(f"classes named twice: {list(classes)}")
    return out


def evaluate_binding(
    model,
    dataset: EvalDataset,
    *,
    classes: Optional[Sequence[str]] = None,
    ways: Sequence[int] = DEFAULT_WAYS,
    shots: Sequence[int] = DEFAULT_BINDING_SHOTS,
    episodes: int = 500,
    trials: Optional[int] = None,
    seeds: Optional[Sequence[int]] = None,
    task: Optional[BindingTask] = None,
    ablate_images: bool = True,
    prototype: bool = True,
    word_pool_size: int = 4000,
    word_max_tokens: Optional[int] = 3,
    words: Optional[Sequence[str]] = None,
    batch_size: int = 8,
    num_workers: int = 0,
    model_info: Optional[dict] = None,
    progress: bool = True,
    trials_dir: Optional[Union[str, Path]] = None,
    reuse_trials: bool = True,
) -> dict[str, Any]:
    """Frozen's open-ended fast-binding evaluation (module docstring) of a Flamingo model on a class-folder dataset.

    ``words``: the made-up words (default: the evaluation pool of :func:`data_pipelines.binding.build_word_pool` for
    the model's tokenizer, ``word_pool_size`` / ``word_max_tokens``; never the training pool). ``trials``/``seeds``:
    trial seeds (default 42, or 42, 43, ...); each trial draws ``episodes`` episodes per number of ways. Returns the
    results dictionary (``runs`` of every ways x shots x ablation, ``zero_shot``, ``ablated``, ``prototype``,
    ``chance``, ``paired_differences``), as :func:`vlm.eval.report.write_results` writes it.
    """
    task = task or BindingTask()
    if model.tokenizer is None or model.image_processor is None:
        raise ValueError("the model needs its tokenizer and image_processor attached (vlm.create_model_and_transforms)")
    if dataset.class_names is None:
        raise ValueError("binding needs a class-folder dataset (vlm.eval.load_image_folder / load_class_tree)")
    selected = select_classes(dataset, classes)
    ways = sorted({int(w) for w in ways})
    shots = sorted({int(k) for k in shots})
    if not ways or ways[0] < 2 or ways[-1] > len(selected):
        raise ValueError(f"ways must be between 2 and the {len(selected)} classes evaluated, got {ways}")
    if not shots or shots[0] < 0:
        raise ValueError(f"shots must be integers >= 0, got {shots}")
    if isinstance(episodes, bool) or not isinstance(episodes, int) or episodes < 1:
        raise ValueError(f"episodes must be an int >= 1, got {episodes!r}")
    if seeds is None:
        seeds = [42 + i for i in range(trials or 1)]
    elif trials is not None and trials != len(seeds):
        raise ValueError(f"trials={trials} but {len(seeds)} seeds were given")
    seeds = [int(s) for s in seeds]
    if words is None:
        words = build_word_pool(model.tokenizer, word_pool_size, word_max_tokens).eval
    words = list(words)
    max_shots = max(shots)

    model.eval()
    processor = FlamingoProcessor(model.tokenizer, model.image_processor)
    grey = constant_image(model.image_processor) if ablate_images else None
    resume = None
    if trials_dir is not None:
        identity = dict(model_info or model_identity(model))
        if not any(k in identity for k in ("weights_digest", "checkpoint_digest")):
            identity["weights_digest"] = state_digest(model)
        resume = TrialStore(Path(trials_dir), identity, task, batch_size, reuse=reuse_trials)

    plan = {
        (w, s): build_episodes(dataset, selected, w, max_shots, episodes, s, words, task.names)
        for w in ways
        for s in seeds
    }
    features: dict[str, torch.Tensor] = {}
    if prototype and max_shots > 0:
        paths = sorted({im for eps in plan.values() for ep in eps for im in [ep.query_image, *sum(ep.support, [])]})
        feats = image_features(model, paths, batch_size=max(batch_size, 32), num_workers=num_workers,
                               desc="prototype features", progress=progress)  # fmt: skip
        features = {p: f for p, f in zip(paths, feats)}

    runs = []
    resumed = []
    with cached_vision_tokens(model):
        for w in ways:
            for ablated in [False, True] if ablate_images else [False]:
                for k in shots:
                    trial_records = []
                    for seed in seeds:
                        eps = plan[(w, seed)]
                        prompts = [episode_prompt(ep, k, task, ablated) for ep in eps]
                        label = f"binding {w}-way{' ablated' if ablated else ''} {k}-shot seed {seed}"
                        key = None if resume is None else resume.key(prompts, [ep.id for ep in eps], ablated)
                        stored = None if resume is None else resume.load(label, key)
                        stored = None if stored is None else resume.check(stored, len(prompts))
                        if stored is not None:
                            outputs, seconds = stored["outputs"], float(stored["seconds"])
                            resumed.append(label)
                        else:
                            outputs, seconds = _run_episode_prompts(
                                model, processor, task, prompts, [ep.words for ep in eps], batch_size, grey,
                                num_workers, progress, label,
                            )  # fmt: skip
                            if resume is not None:
                                resume.save(label, key, outputs, seconds)
                        trial_records.append(_score_trial(eps, prompts, outputs, seconds, seed, k, task, dataset))
                    metrics = [t["metrics"] for t in trial_records]
                    mean, std = aggregate_trials(metrics)
                    runs.append({"mode": f"{w}-way", "ways": w, "ablate_images": ablated, "shots": k,
                                 "seeds": seeds, "trials": trial_records, "num_samples": episodes,
                                 "mean": mean, "std": std})  # fmt: skip

    proto = {}
    if prototype:
        for w in ways:
            proto[f"{w}-way"] = {}
            for k in shots:
                if k == 0:
                    continue
                accs = [
                    100.0 * float(np.mean([prototype_correct(ep, k, features) for ep in plan[(w, s)]])) for s in seeds
                ]
                proto[f"{w}-way"][str(k)] = {"mean": float(np.mean(accs)), "std": float(np.std(accs)), "trials": accs}

    def summary(ablated: bool, only_zero: bool = False) -> dict:
        out: dict = {}
        for r in runs:
            if r["ablate_images"] != ablated or (only_zero and r["shots"] != 0):
                continue
            out.setdefault(r["mode"], {})[str(r["shots"])] = {m: r["mean"][m] for m in r["mean"]}
        return out

    differences = paired_differences(runs, lambda rec: 100.0 * float(rec["correct"]), "accuracy")
    speeds = [t["images_per_s"] for r in runs for t in r["trials"]]
    return {
        "task": "binding",
        "metric": "accuracy",
        "model": model_info or model_identity(model),
        "data": {"test": dataset.identity(), "classes": [dataset.class_names[c] for c in selected]},
        "protocol": {
            "ways": ways,
            "shots": shots,
            "episodes": episodes,
            "trial_seeds": seeds,
            "repeats": task.repeats,
            "names": task.names,
            "task_induction": task.task_induction,
            "template": task.template,
            "induction": task.induction,
            "query": MEDIA_TOKEN + query_prefix(task.template),
            "open_ended": "greedy completion; correct when its first word is the query class's word",
            "closed_form": "the N words ranked by the log-likelihood of the template's continuation"
            if task.closed_form
            else None,
            "max_new_tokens": task.max_new_tokens,
            "batch_size": batch_size,
            "words": {
                "pool": "eval" if task.names == "made-up" else None,
                "count": len(words),
                "max_tokens": word_max_tokens,
                "pool_size": word_pool_size,
            },
        },  # fmt: skip
        "runs": runs,
        "zero_shot": {mode: v.get("0") for mode, v in summary(False, only_zero=True).items()},
        "ablated": summary(True),
        "prototype": proto,
        "chance": {f"{w}-way": 100.0 / w for w in ways},
        "paired_differences": differences,
        "images_per_s": float(np.mean(speeds)) if speeds else None,
        **({"resumed_trials": resumed} if resume is not None else {}),
    }


def _score_trial(eps, prompts, outputs, seconds, seed, shots, task, dataset) -> dict:
    records = []
    for ep, prompt, (text, scores) in zip(eps, prompts, outputs):
        answer = ep.words[ep.query]
        rec = {
            "id": ep.id,
            "classes": [dataset.class_names[c] for c in ep.classes],
            "words": ep.words,
            "query_class": dataset.class_names[ep.classes[ep.query]],
            "answer": answer,
            "prediction": text,
            "correct": word_matches(text, answer),
            "prompt": prompt.text,
            "images": [*[im for im in prompt.images]],
            "query_image": ep.query_image,
        }
        if scores is not None:
            best = int(np.argmax(scores))
            rec.update({"closed_prediction": ep.words[best], "closed_correct": best == ep.query,
                        "closed_scores": [round(float(s), 4) for s in scores]})  # fmt: skip
        records.append(rec)
    metrics = {"accuracy": 100.0 * float(np.mean([r["correct"] for r in records]))}
    if all("closed_correct" in r for r in records):
        metrics["closed_accuracy"] = 100.0 * float(np.mean([r["closed_correct"] for r in records]))
    images = sum(len(p.images) for p in prompts)
    return {"seed": seed, "num_samples": len(records), "seconds": seconds, "metrics": metrics,
            "images_per_s": images / seconds if seconds > 0 else math.inf, "predictions": records}  # fmt: skip


# ------------------------------------------------------------------------------------------------ report


def format_binding_table(results: dict[str, Any]) -> str:
    """A Markdown table: one row per (ways, shots): open-ended and closed accuracy (mean +- std over trials), the
    image-ablated control, the prototype reference and chance."""
    real = {(r["ways"], r["shots"]): r for r in results["runs"] if not r["ablate_images"]}
    ablated = {(r["ways"], r["shots"]): r for r in results["runs"] if r["ablate_images"]}
    head = [
        "ways",
        "shots",
        "open-ended",
        "closed",
        "ablated open",
        "ablated closed",
        "prototype",
        "chance",
        "episodes",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def cell(run, metric):
        if run is None or metric not in run["mean"]:
            return "-"
        return f"{run['mean'][metric]:.1f} ± {run['std'][metric]:.1f}"

    for (w, k), r in sorted(real.items()):
        p = results.get("prototype", {}).get(f"{w}-way", {}).get(str(k))
        a = ablated.get((w, k))
        cells = [f"{w}", f"{k}", cell(r, "accuracy"), cell(r, "closed_accuracy"), cell(a, "accuracy"),
                 cell(a, "closed_accuracy"), "-" if p is None else f"{p['mean']:.1f}", f"{100 / w:.1f}",
                 f"{r['num_samples']} x {len(r['trials'])}"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_binding(results: dict[str, Any], path: Union[str, Path]) -> None:
    """Open-ended accuracy against shots, a line per number of ways, with the ablated control (dashed), the
    prototype reference (dotted) and chance (thin grey)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    ways = sorted({r["ways"] for r in results["runs"]})
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, w in enumerate(ways):
        colour = colours[i % len(colours)]
        for ablated, style, name in ((False, "-", "model"), (True, "--", "images ablated")):
            rs = sorted((r for r in results["runs"] if r["ways"] == w and r["ablate_images"] == ablated),
                        key=lambda r: r["shots"])  # fmt: skip
            if rs:
                ax.errorbar([r["shots"] for r in rs], [r["mean"]["accuracy"] for r in rs],
                            yerr=[r["std"]["accuracy"] for r in rs], color=colour, linestyle=style, marker="o",
                            capsize=3, label=f"{w}-way {name}")  # fmt: skip
        proto = results.get("prototype", {}).get(f"{w}-way", {})
        if proto:
            ks = sorted(int(k) for k in proto)
            ax.plot(ks, [proto[str(k)]["mean"] for k in ks], color=colour, linestyle=":", marker="s",
                    label=f"{w}-way prototype")  # fmt: skip
        ax.axhline(100 / w, color=colour, linewidth=0.8, alpha=0.5)
    ax.set_xlabel("shots (images per class)")
    ax.set_ylabel("open-ended accuracy (%)")
    ax.set_ylim(-2, 102)
    ax.set_title("binding: accuracy vs shots (thin lines: chance)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
