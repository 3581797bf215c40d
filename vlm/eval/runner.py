"""The few-shot evaluation loop (OpenFlamingo's protocol): modes x shots x trial seeds.

For every trial: choose the evaluated samples (all, or ``num_samples`` drawn by the seed), each
query's demonstrations (random from the seed's query set, or RICES), build the prompts, run them in
batches, post-process and score. ``ablate_images`` adds, for every mode, the same prompts with every
image replaced by one constant image (the text-only control). The results end with the paired comparisons
of :mod:`vlm.eval.compare`: every pair of shot counts and every setting against its ablated control, with a
bootstrap interval over the shared samples.

``trials_dir`` makes an evaluation resumable: each finished trial's raw outputs are written there as JSON (atomically)
under a key that names everything its outputs depend on -- the model's identity (config, weights digest, device,
dtype), the generation settings, the batch size, and every prompt's text and images. A rerun of the same evaluation
reads a trial back instead of running it again, so a killed evaluation loses at most the trial it was in; a trial
whose key differs in anything is run again and its file replaced.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch

from ..processor import FlamingoProcessor
from .compare import paired_differences
from .datasets import EvalDataset, default_cache_dir
from .demos import RICES, RandomDemos, cached_image_features, eval_indices, vision_fingerprint
from .inference import class_log_likelihoods, constant_image, generate, prompt_batches
from .tasks import ZERO_SHOT_DEMOS, CaptioningTask, ClassificationTask, Task, VQATask

MODES = ("random", "rices")
DEFAULT_SHOTS = (0, 4, 8, 16, 32)
DEFAULT_SEEDS = (42, 43, 44)


def _modes(mode: Union[str, Sequence[str]]) -> list[str]:
    modes = [mode] if isinstance(mode, str) else list(mode)
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise ValueError(f"mode must be one or more of {MODES}, got {mode!r}")
    return list(dict.fromkeys(modes))


def aggregate_trials(metrics: Sequence[dict[str, float]]) -> tuple[dict[str, float], dict[str, float]]:
    """Mean and population standard deviation (ddof 0, OpenFlamingo's ``np.nanstd``) of each metric over trials."""
    names = list(metrics[0])
    mean = {n: float(np.mean([m[n] for m in metrics])) for n in names}
    std = {n: float(np.std([m[n] for m in metrics])) for n in names}
    return mean, std


def model_identity(model) -> dict:
    """What names a model in the results: its Flamingo config (bases, sizes) and token ids."""
    cfg = getattr(model, "config", None)
    return {"config": cfg.to_dict() if hasattr(cfg, "to_dict") else None, "class": type(model).__name__}


def evaluate(
    task: Task,
    model,
    test: EvalDataset,
    train: EvalDataset,
    shots: Sequence[int] = DEFAULT_SHOTS,
    seeds: Optional[Sequence[int]] = None,
    trials: Optional[int] = None,
    mode: Union[str, Sequence[str]] = "random",
    ablate_images: bool = False,
    num_samples: Optional[int] = None,
    query_set_size: int = 2048,
    batch_size: int = 8,
    num_workers: int = 0,
    cache_dir: Optional[str] = None,
    rows_per_call: int = 64,
    model_info: Optional[dict] = None,
    progress: bool = True,
    trials_dir: Optional[Union[str, os.PathLike]] = None,
    reuse_trials: bool = True,
) -> dict[str, Any]:
    """Run the protocol; returns the results dictionary (see :func:`vlm.eval.report.write_results`).

    ``seeds`` (default 42, 43, 44, or the first ``trials`` of 42, 43, ...) seed the evaluated subset and
    the demonstrations of each trial. ``cache_dir`` holds RICES features (default ``~/.cache/vlm_eval``;
    ``False`` disables the cache). ``trials_dir``: where finished trials are kept so that a rerun resumes (module
    docstring); ``None`` keeps nothing; ``reuse_trials=False`` runs every trial again (and replaces the files).
    """
    modes = _modes(mode)
    if seeds is None:
        seeds = [42 + i for i in range(trials)] if trials is not None else list(DEFAULT_SEEDS)
    elif trials is not None and trials != len(seeds):
        raise ValueError(f"trials={trials} but {len(seeds)} seeds were given")
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("at least one trial seed is needed")
    shots = [int(k) for k in shots]
    if any(k < 0 for k in shots) or not shots:
        raise ValueError(f"shots must be non-negative integers, got {shots}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if isinstance(task, ClassificationTask):
        if test.class_names is None or train.class_names != test.class_names:
            raise ValueError("classification needs the same class folders in the training and evaluated splits")
        task.class_names = test.class_names
    if model.tokenizer is None or model.image_processor is None:
        raise ValueError("the model needs its tokenizer and image_processor attached (vlm.create_model_and_transforms)")
    model.eval()
    processor = FlamingoProcessor(model.tokenizer, model.image_processor)
    cache = None if cache_dir is False else (cache_dir or default_cache_dir())

    rices = None
    if "rices" in modes:
        fp = vision_fingerprint(model) if cache is not None else None
        feats = {
            name: cached_image_features(
                model,
                ds,
                cache,
                batch_size=max(batch_size, 32),
                num_workers=num_workers,
                fingerprint=fp,
                progress=progress,
            )
            for name, ds in (("train", train), ("test", test))
        }
        rices = (RICES(train, feats["train"]), feats["test"])

    resume = None
    if trials_dir is not None:
        identity = dict(model_info or model_identity(model))
        if not any(k in identity for k in ("weights_digest", "checkpoint_digest")):
            identity["weights_digest"] = state_digest(model)  # a model built in Python: its weights name it
        resume = TrialStore(Path(trials_dir), identity, task, batch_size, reuse=reuse_trials)
    kinds = [(m, False) for m in modes] + ([(m, True) for m in modes] if ablate_images else [])
    grey = constant_image(model.image_processor) if ablate_images else None
    runs = []
    for mode_name, ablated in kinds:
        for k in shots:
            trials_out = [
                _infer_trial(task, model, processor, test, train, k, seed, mode_name, ablated, rices, grey,
                             num_samples, query_set_size, batch_size, num_workers, rows_per_call, progress, resume)
                for seed in seeds
            ]  # fmt: skip
            runs.append({"mode": mode_name, "ablate_images": ablated, "shots": k, "seeds": seeds, "trials": trials_out})
    # Score every trial at the end (captioning: one tokenizer call for the whole evaluation).
    trials = [t for r in runs for t in r["trials"]]
    scored = task.score_many([(t.pop("queries"), t.pop("outputs")) for t in trials])
    for t, (metrics, records) in zip(trials, scored):
        t["metrics"] = metrics
        t["predictions"] = [{**p, **rec} for p, rec in zip(t["predictions"], records)]
    for r in runs:
        r["num_samples"] = r["trials"][0]["num_samples"]
        r["mean"], r["std"] = aggregate_trials([t["metrics"] for t in r["trials"]])
    differences = paired_differences(runs, task.sample_score, task.metric)
    speeds = [t["images_per_s"] for r in runs for t in r["trials"]]
    resumed = [t["label"] for r in runs for t in r["trials"] if t.pop("resumed", False)]
    for t in trials:
        t.pop("label", None)
    return {
        "task": task.name,
        "metric": task.metric,
        "model": model_info or model_identity(model),
        "data": {"test": test.identity(), "train": train.identity()},
        "protocol": {
            "shots": shots,
            "trial_seeds": seeds,
            "modes": modes,
            "ablate_images": ablate_images,
            "num_samples": num_samples,
            "query_set_size": query_set_size,
            "zero_shot_text_demos": ZERO_SHOT_DEMOS,
            "template": task.template,
            "demo_separator": task.demo_separator,
            "stop_words": list(task.stop_words),
            "batch_size": batch_size,
            **({} if isinstance(task, ClassificationTask) else task.generation_kwargs()),
            **({"normalize_length": task.normalize_length} if isinstance(task, ClassificationTask) else {}),
        },
        "runs": runs,
        "paired_differences": differences,
        "images_per_s": float(np.mean(speeds)) if speeds else None,
        **({"resumed_trials": resumed} if resume is not None else {}),
    }


def state_digest(model: torch.nn.Module) -> str:
    """sha256 of a module's parameters and buffers (names, dtypes, shapes, bytes)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class TrialStore:
    """Finished trials of one evaluation on disk (``<dir>/<trial label>.json``), keyed by what their outputs
    depend on; see the module docstring. Files are plain JSON: reading one back runs no code."""

    VERSION = 1

    def __init__(self, directory: Path, model_identity: dict, task: Task, batch_size: int, reuse: bool = True):
        self.directory = Path(directory)
        self.reuse = reuse
        self.fixed = {
            "version": self.VERSION,
            "model": model_identity,
            "task": task.name,
            "generation": task.generation_kwargs() if not isinstance(task, ClassificationTask) else None,
            "normalize_length": getattr(task, "normalize_length", None),
            "stop_words": list(task.stop_words),
            "batch_size": batch_size,
        }

    def key(self, prompts: Sequence, ids: Sequence, ablated: bool) -> str:
        """A digest of the fixed settings plus each prompt's text and image identities."""
        h = hashlib.sha256(json.dumps(self.fixed, sort_keys=True, default=str).encode())
        h.update(json.dumps({"ablated": ablated, "ids": list(ids)}, default=str).encode())
        for p in prompts:
            h.update(json.dumps([p.text, [None if im is None else str(im) for im in p.images]]).encode())
        return h.hexdigest()

    def path(self, label: str) -> Path:
        return self.directory / (label.replace(" ", "_") + ".json")

    def load(self, label: str, key: str) -> Optional[dict]:
        """The stored trial (``outputs``, ``seconds``) when its key matches, else None (missing, stale, unreadable)."""
        if not self.reuse:
            return None
        path = self.path(label)
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(record, dict) or record.get("key") != key or not isinstance(record.get("outputs"), list):
            return None
        return record

    def check(self, record: dict, num_prompts: int) -> Optional[dict]:
        """``record`` when it holds one output per prompt, else None."""
        return record if len(record["outputs"]) == num_prompts else None

    def save(self, label: str, key: str, outputs: list, seconds: float) -> None:
        """Write atomically (a temporary file renamed over the old one): a kill leaves the old file or the new."""
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.path(label)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"key": key, "label": label, "seconds": seconds, "outputs": outputs}))
        os.replace(tmp, path)


def _infer_trial(task, model, processor, test, train, k, seed, mode, ablated, rices, grey,
               num_samples, query_set_size, batch_size, num_workers, rows_per_call, progress, resume=None) -> dict:  # fmt: skip
    indices = eval_indices(len(test), num_samples, seed)
    n_demos = k if k > 0 else ZERO_SHOT_DEMOS
    queries = [test[i] for i in indices]
    if mode == "rices":
        finder, test_feats = rices
        demos = finder.select_batch(test_feats[indices], [q.image for q in queries], n_demos)
    else:
        sampler = RandomDemos(train, query_set_size, seed)
        demos = [sampler.select(i, q.image, n_demos) for i, q in zip(indices, queries)]
    prompts = [task.build_prompt([train[j] for j in d], q, k, ablated) for q, d in zip(queries, demos)]

    label = f"{task.name} {mode}{' ablated' if ablated else ''} {k}-shot seed {seed}"
    key = None if resume is None else resume.key(prompts, [(q.id, d) for q, d in zip(queries, demos)], ablated)
    stored = None if resume is None else resume.load(label, key)
    stored = None if stored is None else resume.check(stored, len(prompts))
    if stored is not None:
        if progress:
            print(f"{label}: reusing the finished trial in {resume.path(label)}")
        outputs, seconds = stored["outputs"], float(stored["seconds"])
    else:
        outputs, seconds = _run_prompts(task, model, processor, prompts, batch_size, grey, num_workers,
                                        rows_per_call, progress, label)  # fmt: skip
        if resume is not None:
            resume.save(label, key, outputs, seconds)
    if isinstance(task, ClassificationTask):
        scored = outputs  # class indices, best first
        predictions = [{"prediction": task.class_names[o[0]]} for o in outputs]
    else:
        scored = [task.postprocess(o) for o in outputs]
        predictions = [{"prediction": c, "raw": o} for c, o in zip(scored, outputs)]
    predictions = [
        {"id": q.id, "image": q.image, **p, "demonstrations": [train[j].id for j in d]}
        for q, p, d in zip(queries, predictions, demos)
    ]
    return {
        "seed": seed,
        "num_samples": len(queries),
        "seconds": seconds,
        "images_per_s": len(queries) / seconds if seconds > 0 else float("inf"),
        "predictions": predictions,
        "queries": queries,
        "outputs": scored,
        "label": label,
        "resumed": stored is not None,
    }


def _run_prompts(task, model, processor, prompts, batch_size, grey, num_workers, rows_per_call, progress, label):
    """Raw outputs of one trial's prompts (generated texts, or class indices best first) and the seconds taken."""
    outputs: list = []
    start = time.perf_counter()
    for inputs, offset in prompt_batches(prompts, processor, batch_size, grey, num_workers, progress, label):
        n = inputs.input_ids.shape[0]
        if isinstance(task, ClassificationTask):
            scores = class_log_likelihoods(
                model, inputs, [p.text for p in prompts[offset : offset + n]], task.class_names,
                model.tokenizer, task.normalize_length, rows_per_call,
            )  # fmt: skip
            outputs += torch.argsort(scores, dim=1, descending=True, stable=True).tolist()
        else:
            outputs += generate(model, inputs, model.tokenizer, **task.generation_kwargs())
    return outputs, time.perf_counter() - start


def _task_kwargs(cls, kwargs: dict) -> dict:
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    return {k: kwargs.pop(k) for k in list(kwargs) if k in names}


def evaluate_captioning(model, dataset: EvalDataset, train: EvalDataset, **kwargs) -> dict:
    """Few-shot captioning (CIDEr, BLEU-4); ``kwargs``: :func:`evaluate` options and :class:`CaptioningTask` fields."""
    task = CaptioningTask(**_task_kwargs(CaptioningTask, kwargs))
    return evaluate(task, model, dataset, train, **kwargs)


def evaluate_vqa(model, dataset: EvalDataset, train: EvalDataset, **kwargs) -> dict:
    """Few-shot VQA (VQA accuracy); ``kwargs``: :func:`evaluate` options and :class:`VQATask` fields."""
    task = VQATask(**_task_kwargs(VQATask, kwargs))
    return evaluate(task, model, dataset, train, **kwargs)


def evaluate_classification(model, dataset: EvalDataset, train: EvalDataset, **kwargs) -> dict:
    """Few-shot classification by class-name likelihood (top-1, top-5); see :class:`ClassificationTask`."""
    task = ClassificationTask(**_task_kwargs(ClassificationTask, kwargs))
    return evaluate(task, model, dataset, train, **kwargs)
