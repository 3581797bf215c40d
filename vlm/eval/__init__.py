"""Few-shot evaluation of Flamingo models with OpenFlamingo's protocol: captioning (CIDEr, BLEU-4),
VQA (VQA accuracy) and classification (top-1/top-5 by class-name likelihood), with random or RICES
demonstrations and an image-ablated control; and Frozen's fast-binding test of learning from the prompt
(``evaluate_binding``: made-up class words, open-ended and closed, with 0-shot, ablated and prototype controls). Command line: ``python -m vlm.eval --help``.
"""

from .binding import BindingTask, evaluate_binding, format_binding_table, plot_binding
from .compare import format_differences, paired_difference, paired_differences
from .datasets import (
    CaptionSample,
    ClassificationSample,
    EvalDataset,
    VQASample,
    load_class_tree,
    load_flickr,
    load_image_folder,
    load_karpathy,
    load_vqa,
)
from .demos import RICES, RandomDemos, cached_image_features, eval_indices, image_features
from .inference import class_log_likelihoods, generate
from .metrics import bleu4, caption_scores, cider
from .models import load_model
from .report import format_table, plot_results, write_results
from .runner import evaluate, evaluate_captioning, evaluate_classification, evaluate_vqa
from .tasks import CaptioningTask, ClassificationTask, Prompt, Task, VQATask
from .vqa_metric import normalize_vqa_answer, vqa_accuracy, vqa_question_accuracy

__all__ = [
    "RICES",
    "BindingTask",
    "evaluate_binding",
    "format_binding_table",
    "load_class_tree",
    "plot_binding",
    "CaptionSample",
    "CaptioningTask",
    "ClassificationSample",
    "ClassificationTask",
    "EvalDataset",
    "Prompt",
    "RandomDemos",
    "Task",
    "VQASample",
    "VQATask",
    "bleu4",
    "cached_image_features",
    "caption_scores",
    "cider",
    "class_log_likelihoods",
    "eval_indices",
    "evaluate",
    "evaluate_captioning",
    "evaluate_classification",
    "evaluate_vqa",
    "format_differences",
    "format_table",
    "generate",
    "image_features",
    "load_flickr",
    "load_image_folder",
    "load_karpathy",
    "load_model",
    "load_vqa",
    "normalize_vqa_answer",
    "paired_difference",
    "paired_differences",
    "plot_results",
    "vqa_accuracy",
    "vqa_question_accuracy",
    "write_results",
]
