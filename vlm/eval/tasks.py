"""The three task kinds: prompts, output post-processing and scoring.

Prompts follow OpenFlamingo: a demonstration is ``<image>Output:{caption}<|endofchunk|>`` (captioning,
classification: ``{class_name}``) or ``<image>Question:{question} Short answer:{answer}<|endofchunk|>``
(VQA); the query is the same template cut before the answer field. Zero-shot prompts keep two
demonstrations' text with their ``<image>`` removed. Scores are reported in percent (CIDEr x 100 as
OpenFlamingo reports it).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Optional

from ..factory import END_OF_CHUNK_TOKEN, MEDIA_TOKEN
from .datasets import CaptionSample, ClassificationSample, VQASample
from .metrics import caption_scores_many
from .vqa_metric import vqa_question_accuracy

ZERO_SHOT_DEMOS = 2  # text-only demonstrations of a zero-shot prompt (OpenFlamingo's effective shots)


@dataclass
class Prompt:
    """A prompt's text, with one ``<image>`` per image, and its image files (None = the constant image)."""

    text: str
    images: list[Optional[str]]


def _query_prefix(template: str, field_name: str) -> str:
    marker = "{" + field_name + "}"
    if marker not in template:
        raise ValueError(f"prompt template {template!r} has no {marker} field")
    return template[: template.index(marker)]


def cut_at_stop_words(text: str, stop_words: Sequence[str]) -> str:
    """The text before the first occurrence of any stop word (the model starting a new prompt)."""
    if stop_words:
        text = re.split("|".join(re.escape(w) for w in stop_words), text, maxsplit=1)[0]
    return text


@dataclass
class Task:
    """What differs between tasks; see the subclasses."""

    template: str
    answer_field: str
    stop_words: tuple[str, ...] = ()
    max_new_tokens: int = 20
    num_beams: int = 3
    length_penalty: float = 0.0
    # Appended after each demonstration; OpenFlamingo's released evaluate.py appends "\n" for captioning and VQA.
    demo_separator: str = ""
    name: str = field(init=False, default="")
    metric: str = field(init=False, default="")

    def __post_init__(self):
        _query_prefix(self.template, self.answer_field)  # validates the template
        if self.template.count(MEDIA_TOKEN) != 1:
            raise ValueError(f"prompt template {self.template!r} must contain exactly one {MEDIA_TOKEN}")
        if self.max_new_tokens < 1 or self.num_beams < 1:
            raise ValueError(f"max_new_tokens and num_beams must be >= 1, got {self.max_new_tokens}, {self.num_beams}")

    def fields(self, sample) -> dict:
        raise NotImplementedError

    def demo_text(self, sample) -> str:
        return self.template.format(**self.fields(sample)) + self.demo_separator

    def query_text(self, sample) -> str:
        f = {k: v for k, v in self.fields(sample).items() if k != self.answer_field}
        return _query_prefix(self.template, self.answer_field).format(**f)

    def prompt(self, demos: Sequence, query, zero_shot: bool) -> str:
        """The prompt text with one ``<image>`` per image; a zero-shot prompt keeps only the demonstrations' text."""
        context = "".join(self.demo_text(d) for d in demos)
        if zero_shot:
            context = context.replace(MEDIA_TOKEN, "")
        return context + self.query_text(query)

    def build_prompt(self, demos: Sequence, query, shots: int, ablate_images: bool = False) -> Prompt:
        """The query's prompt after its demonstrations (``shots == 0``: their text only, no images);
        ``ablate_images`` keeps the text and replaces every image by the constant image (None)."""
        zero_shot = shots == 0
        if not zero_shot and len(demos) != shots:
            raise ValueError(f"{shots}-shot prompt given {len(demos)} demonstrations")
        images = ([] if zero_shot else [d.image for d in demos]) + [query.image]
        return Prompt(self.prompt(demos, query, zero_shot), [None] * len(images) if ablate_images else images)

    def generation_kwargs(self) -> dict:
        kw = {"max_new_tokens": self.max_new_tokens, "num_beams": self.num_beams, "do_sample": False}
        if self.num_beams > 1:
            kw["length_penalty"] = self.length_penalty
        return kw

    def postprocess(self, text: str) -> str:
        return cut_at_stop_words(text, self.stop_words).strip()

    def score(self, samples: Sequence, outputs: Sequence) -> tuple[dict, list[dict]]:
        """(metrics in percent, one record per sample) of one trial's post-processed outputs."""
        raise NotImplementedError

    def score_many(self, trials: Sequence[tuple[Sequence, Sequence]]) -> list[tuple[dict, list[dict]]]:
        """:meth:`score` of several trials, each (samples, outputs)."""
        return [self.score(samples, outputs) for samples, outputs in trials]

    def sample_score(self, record: dict) -> float:
        """One scored prediction record's share of the primary metric, in percent: the metric of a trial is the
        mean of its records' sample scores (what :mod:`vlm.eval.compare` pairs and resamples)."""
        raise NotImplementedError


@dataclass
class CaptioningTask(Task):
    template: str = f"{MEDIA_TOKEN}Output:{{caption}}{END_OF_CHUNK_TOKEN}"
    answer_field: str = "caption"
    stop_words: tuple[str, ...] = ("Output", "Question")
    max_new_tokens: int = 20

    def __post_init__(self):
        super().__post_init__()
        self.name, self.metric = "captioning", "cider"

    def fields(self, sample: CaptionSample) -> dict:
        return {"caption": sample.captions[0].strip()}  # OpenFlamingo's demonstrations use the first caption

    def postprocess(self, text: str) -> str:
        return cut_at_stop_words(text, self.stop_words).replace('"', "").strip()

    def score(self, samples: Sequence[CaptionSample], predictions: Sequence[str]) -> tuple[dict, list[dict]]:
        return self.score_many([(samples, predictions)])[0]

    def sample_score(self, record: dict) -> float:
        return record["cider"]  # the image's CIDEr-D x 100; their mean is the trial's corpus CIDEr

    def score_many(self, trials: Sequence[tuple[Sequence, Sequence]]) -> list[tuple[dict, list[dict]]]:
        sets = [({s.id: p for s, p in zip(ss, ps)}, {s.id: s.captions for s in ss}) for ss, ps in trials]
        scores = caption_scores_many(sets)
        return [
            (
                {"cider": 100 * sc["cider"], "bleu4": 100 * sc["bleu4"]},
                [{"references": s.captions, "cider": 100 * sc["cider_per_image"][s.id]} for s in ss],
            )
            for sc, (ss, _) in zip(scores, trials)
        ]


@dataclass
class VQATask(Task):
    template: str = f"{MEDIA_TOKEN}Question:{{question}} Short answer:{{answer}}{END_OF_CHUNK_TOKEN}"
    answer_field: str = "answer"
    stop_words: tuple[str, ...] = ("Question", "Answer", "Short", "Output")
    max_new_tokens: int = 5

    def __post_init__(self):
        super().__post_init__()
        self.name, self.metric = "vqa", "accuracy"

    def fields(self, sample: VQASample) -> dict:
        # The consensus answer (OpenFlamingo takes the first of the ten, an arbitrary one).
        return {"question": sample.question, "answer": sample.answer}

    def postprocess(self, text: str) -> str:
        # As OpenFlamingo: cut where the model starts a new question, then at the first ", ".
        return cut_at_stop_words(text, self.stop_words).split(", ", 1)[0].strip()

    def score(self, samples: Sequence[VQASample], predictions: Sequence[str]) -> tuple[dict, list[dict]]:
        unannotated = [s.id for s in samples if not s.answers]
        if unannotated:
            raise ValueError(f"{len(unannotated)} evaluated questions have no answers, e.g. {unannotated[:5]}")
        acc = [vqa_question_accuracy(p, s.answers) for s, p in zip(samples, predictions)]
        records = [{"question": s.question, "answers": s.answers, "accuracy": a} for s, a in zip(samples, acc)]
        return {"accuracy": 100 * sum(acc) / len(acc)}, records

    def sample_score(self, record: dict) -> float:
        return 100 * record["accuracy"]


@dataclass
class ClassificationTask(Task):
    """Classes ranked by the log-likelihood of ``Output:{class name}`` after the demonstrations
    (mean over the class name's tokens with ``normalize_length``, as OpenFlamingo's ImageNet evaluation)."""

    template: str = f"{MEDIA_TOKEN}Output:{{class_name}}{END_OF_CHUNK_TOKEN}"
    answer_field: str = "class_name"
    class_names: Optional[list[str]] = None
    normalize_length: bool = True
    topk: tuple[int, ...] = (1, 5)

    def __post_init__(self):
        super().__post_init__()
        self.name, self.metric = "classification", "top1"

    def fields(self, sample: ClassificationSample) -> dict:
        return {"class_name": self.class_names[sample.label]}

    def score(self, samples: Sequence[ClassificationSample], ranked: Sequence[list[int]]) -> tuple[dict, list[dict]]:
        metrics = {
            f"top{k}": 100 * sum(s.label in r[:k] for s, r in zip(samples, ranked)) / len(samples) for k in self.topk
        }
        records = [
            {
                "label": self.class_names[s.label],
                "top5": [self.class_names[c] for c in r[:5]],
                "correct": r[0] == s.label,
            }
            for s, r in zip(samples, ranked)
        ]
        return metrics, records

    def sample_score(self, record: dict) -> float:
        return 100.0 * record["correct"]  # top-1
