"""Few-shot evaluation of a Flamingo model with OpenFlamingo's protocol.

    python -m vlm.eval captioning --dataset flickr --data ../shared/data/flickr8k.tar \\
        --model-dir outputs/tiny/export --shots 0 4 8 --trials 3 --modes random rices --ablate-images \\
        --num-samples 500 --out outputs/eval/flickr8k
    python -m vlm.eval binding --data ../shared/data/cifar10.tar.gz --classes cat deer ship truck \\
        --model-dir outputs/flickr8k/train/export --ways 2 4 --shots 0 1 3 5 --episodes 500 --out outputs/eval/binding

Writes OUT/results.json (task, shots, trial seeds, mean, std, samples, modes, model and data identity),
OUT/predictions/*.jsonl (one line per evaluated sample) and OUT/<task>_shots.png (several shot counts),
and prints a table. Tasks: captioning (Flickr CSV layout or Karpathy JSON; CIDEr, BLEU-4), vqa (VQAv2 /
OK-VQA questions + annotations JSON; VQA accuracy), classification (image folders; top-1/top-5), binding
(Frozen's open-ended few-shot classification with made-up words, on a class tree or the generated scenes
(--data synthetic); open-ended and closed accuracy, with the 0-shot, image-ablated and prototype controls;
see vlm/eval/binding.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Optional


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m vlm.eval",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("task", choices=["captioning", "vqa", "classification", "binding"])

    d = p.add_argument_group("data")
    d.add_argument(
        "--dataset",
        choices=["flickr", "karpathy"],
        default="flickr",
        help="captioning layout: flickr = captions.txt + Flickr_8k.*Images.txt lists (directory or .tar); "
        "karpathy = dataset_coco.json / dataset_flickr30k.json (with --images)",
    )
    d.add_argument(
        "--data",
        help="flickr directory or tar | Karpathy JSON | image-folder root (directory or tar) | binding: a class tree "
        "root/<class>/*.jpg or root/<split>/<class>/*.jpg (directory or tar), or 'synthetic' (one-group scenes)",
    )
    d.add_argument("--images", help="karpathy: the image root (filepath/filename below it)")
    d.add_argument("--split", help="evaluated split (default: test; image folders: test, else val)")
    d.add_argument("--train-split", default="train", help="split the demonstrations come from (karpathy: + restval)")
    d.add_argument("--class-names", help="classification: JSON file mapping class folder -> class name")
    d.add_argument("--train-questions", help="vqa: questions JSON of the demonstration split")
    d.add_argument("--train-annotations", help="vqa: annotations JSON of the demonstration split")
    d.add_argument("--train-images", help="vqa: image directory of the demonstration split")
    d.add_argument("--test-questions", help="vqa: questions JSON of the evaluated split")
    d.add_argument("--test-annotations", help="vqa: annotations JSON of the evaluated split")
    d.add_argument("--test-images", help="vqa: image directory of the evaluated split")
    d.add_argument(
        "--image-pattern",
        default=None,
        help="vqa: image file name pattern (default COCO_{data_subtype}_{image_id:012d}.jpg)",
    )

    m = p.add_argument_group("model (an export, or an OpenFlamingo checkpoint + its factory arguments)")
    m.add_argument("--model-dir", help="directory written by Flamingo.save_pretrained")
    m.add_argument("--openflamingo-checkpoint", help="OpenFlamingo checkpoint file (.pt / .safetensors)")
    m.add_argument("--clip-vision-encoder-path", help="open_clip model name (OpenFlamingo route)")
    m.add_argument("--clip-vision-encoder-pretrained", help="open_clip pretrained tag or file (OpenFlamingo route)")
    m.add_argument("--lang-encoder-path", help="LM hub id or directory (OpenFlamingo route)")
    m.add_argument("--tokenizer-path", help="tokenizer hub id or directory (OpenFlamingo route)")
    m.add_argument("--cross-attn-every-n-layers", type=int, default=1)
    m.add_argument(
        "--allow-missing-output-rows",
        action="store_true",
        help="OpenFlamingo checkpoints of untied-head LMs: keep this model's rows for the added tokens",
    )
    m.add_argument(
        "--clip-config",
        action="append",
        default=[],
        metavar="PATH",
        help="extra open_clip model config (JSON file or directory) to register; repeatable",
    )
    m.add_argument("--device", default="cpu")
    m.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])

    r = p.add_argument_group("protocol")
    r.add_argument("--shots", type=int, nargs="+", default=None, help="default 0 4 8 16 32 (binding: 0 1 3 5)")
    r.add_argument("--trials", type=int, default=None, help="number of trials (default: 3, or len(--seeds))")
    r.add_argument("--seeds", type=int, nargs="+", default=None, help="trial seeds (default 42, 43, ...)")
    r.add_argument("--num-samples", type=int, default=None, help="evaluated samples per trial (default: all)")
    r.add_argument("--query-set-size", type=int, default=2048, help="random demonstrations' pool per trial")
    r.add_argument(
        "--modes",
        nargs="+",
        choices=["random", "rices"],
        default=None,
        help="demonstration selection(s) to run (default: random)",
    )
    r.add_argument("--rices", action="store_true", help="shorthand for --modes rices")
    r.add_argument(
        "--ablate-images",
        action="store_true",
        help="also run every mode with every image replaced by one constant image (text-only control)",
    )
    r.add_argument("--all-modes", action="store_true", help="random, RICES and their ablated controls in one run")

    b = p.add_argument_group("binding (Frozen's fast-binding protocol)")
    b.add_argument("--classes", nargs="+", default=None, help="evaluated classes (names or folders; default: all)")
    b.add_argument("--ways", type=int, nargs="+", default=[2, 5], help="classes per episode")
    b.add_argument("--episodes", type=int, default=500, help="episodes per number of ways and trial")
    b.add_argument("--repeats", type=int, default=1, help="times the support set is shown")
    b.add_argument("--names", choices=["made-up", "real"], default="made-up", help="words of the classes")
    b.add_argument("--task-induction", action="store_true", help='start with "Answer with dax or blicket."')
    b.add_argument(
        "--binding-template", default=None, help="each image's text with {word} (default 'This is a {word}.')"
    )
    b.add_argument("--word-pool-size", type=int, default=4000, help="generated words (the evaluation pool is ~20%%)")
    b.add_argument("--word-max-tokens", type=int, default=3, help="most tokens of a word (0: any)")
    b.add_argument("--no-closed-form", action="store_true", help="skip the closed-form (likelihood) scorer")
    b.add_argument("--no-prototype", action="store_true", help="skip the prototype reference")
    b.add_argument("--synthetic-per-class", type=int, default=60, help="--data synthetic: images per class")

    g = p.add_argument_group("prompt and generation (defaults: OpenFlamingo's)")
    g.add_argument(
        "--template",
        help="demonstration template with <image> and the answer field "
        "({caption} / {question},{answer} / {class_name})",
    )
    g.add_argument(
        "--demo-separator",
        default="",
        help='text after each demonstration; "\\n" is what OpenFlamingo\'s released evaluate.py uses',
    )
    g.add_argument(
        "--stop-words",
        nargs="*",
        default=None,
        help="cut the output at the first of these (default: Output Question; vqa adds Answer Short)",
    )
    g.add_argument("--num-beams", type=int, default=3)
    g.add_argument("--max-new-tokens", type=int, default=None, help="default 20 (captioning), 5 (vqa)")
    g.add_argument("--length-penalty", type=float, default=0.0)
    g.add_argument(
        "--sum-class-logprobs",
        action="store_true",
        help="classification: sum the class name's token log-probabilities instead of averaging them",
    )

    o = p.add_argument_group("run")
    o.add_argument("--batch-size", type=int, default=8, help="queries per forward")
    o.add_argument("--workers", type=int, default=0, help="DataLoader workers loading the images")
    o.add_argument("--rows-per-call", type=int, default=64, help="classification: (query, class) rows per LM call")
    o.add_argument("--cache-dir", default=None, help="RICES features and extracted archives (~/.cache/vlm_eval)")
    o.add_argument("--out", default=None, help="output directory (default outputs/eval/<task>)")
    o.add_argument(
        "--no-resume",
        action="store_true",
        help="run every trial again, ignoring the finished trials a killed run of this command left in OUT/trials",
    )
    o.add_argument("--no-plot", action="store_true")
    o.add_argument("--quiet", action="store_true", help="no progress bars")
    return p  # fmt: skip


def _datasets(args, p: argparse.ArgumentParser):
    from . import datasets as ds

    if args.task == "captioning":
        if not args.data:
            p.error("captioning needs --data")
        split = args.split or "test"
        if args.dataset == "flickr":
            return (
                ds.load_flickr(args.data, split, args.cache_dir),
                ds.load_flickr(args.data, args.train_split, args.cache_dir),
            )
        if not args.images:
            p.error("--dataset karpathy needs --images (the image root)")
        return ds.load_karpathy(args.data, args.images, split), ds.load_karpathy(
            args.data, args.images, args.train_split
        )
    if args.task == "vqa":
        need = [
            "train_questions",
            "train_annotations",
            "train_images",
            "test_questions",
            "test_annotations",
            "test_images",
        ]
        missing = ["--" + n.replace("_", "-") for n in need if getattr(args, n) is None]
        if missing:
            p.error(f"vqa needs {' '.join(missing)}")
        pattern = args.image_pattern or ds.VQA_IMAGE_PATTERN
        test = ds.load_vqa(args.test_questions, args.test_annotations, args.test_images, pattern, split=args.split)
        train = ds.load_vqa(args.train_questions, args.train_annotations, args.train_images, pattern)
        return test, train
    if not args.data:
        p.error("classification needs --data (an image-folder root)")
    names = json.loads(open(args.class_names).read()) if args.class_names else None
    root = ds.resolve_data_path(args.data, args.cache_dir)
    split = args.split or ("test" if any(root.glob("test")) or any(root.glob("*/test")) else "val")
    return (
        ds.load_image_folder(root, split, names, args.cache_dir),
        ds.load_image_folder(root, args.train_split, names, args.cache_dir),
    )


def _load_model(args):
    """The model (an export or an OpenFlamingo checkpoint) and its identity, from the model arguments."""
    from .models import load_model

    return load_model(
        model_dir=args.model_dir,
        openflamingo_checkpoint=args.openflamingo_checkpoint,
        clip_vision_encoder_path=args.clip_vision_encoder_path,
        clip_vision_encoder_pretrained=args.clip_vision_encoder_pretrained,
        lang_encoder_path=args.lang_encoder_path,
        tokenizer_path=args.tokenizer_path,
        cross_attn_every_n_layers=args.cross_attn_every_n_layers,
        clip_configs=args.clip_config,
        device=args.device,
        dtype=args.dtype,
        allow_missing_output_rows=args.allow_missing_output_rows,
    )


def _lock_out(out):
    """Hold ``--out`` for this evaluation (as the trainer holds its directories): a second evaluation writing the
    same predictions and results stops at once, naming the first."""
    from training.lock import OutputDirBusy, OutputDirLock

    try:
        return OutputDirLock(out, key="--out").acquire()
    except OutputDirBusy as e:
        raise SystemExit(f"error: {e}") from None


def _binding(args, p: argparse.ArgumentParser) -> int:
    from pathlib import Path

    from .binding import BindingTask, evaluate_binding, format_binding_table, plot_binding
    from .compare import format_differences
    from .datasets import default_cache_dir, load_class_tree
    from .report import write_results

    if not args.data:
        p.error("binding needs --data (a class tree, its tar, or 'synthetic')")
    try:
        task = BindingTask(
            **({"template": args.binding_template} if args.binding_template else {}),
            task_induction=args.task_induction,
            repeats=args.repeats,
            names=args.names,
            closed_form=not args.no_closed_form,
            **({"max_new_tokens": args.max_new_tokens} if args.max_new_tokens else {}),
        )
    except ValueError as e:
        p.error(str(e))
    shots = args.shots if args.shots is not None else [0, 1, 3, 5]
    if args.episodes < 1 or min(shots) < 0 or min(args.ways) < 2:
        p.error(f"need --episodes >= 1, --shots >= 0 and --ways >= 2; got {args.episodes}, {shots}, {args.ways}")
    names = json.loads(open(args.class_names).read()) if args.class_names else None
    if args.data == "synthetic":
        from data_pipelines.synthetic import write_scene_classes

        cache = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
        root = write_scene_classes(cache / f"scene_classes-{args.synthetic_per_class}", args.synthetic_per_class)
        dataset = load_class_tree(root, "test", names)
    else:
        dataset = load_class_tree(args.data, args.split, names, args.cache_dir)
    from .binding import select_classes

    try:
        selected = select_classes(dataset, args.classes)
    except ValueError as e:
        p.error(str(e))
    if max(args.ways) > len(selected):
        p.error(f"--ways {max(args.ways)} needs as many classes; {len(selected)} are evaluated")
    out = Path(args.out or "outputs/eval/binding")
    lock = _lock_out(out)  # noqa: F841 - held until this evaluation ends
    model, identity = _load_model(args)
    results = evaluate_binding(
        model,
        dataset,
        classes=args.classes,
        ways=args.ways,
        shots=shots,
        episodes=args.episodes,
        trials=args.trials,
        seeds=args.seeds,
        task=task,
        word_pool_size=args.word_pool_size,
        word_max_tokens=args.word_max_tokens or None,
        batch_size=args.batch_size,
        num_workers=args.workers,
        prototype=not args.no_prototype,
        model_info=identity,
        progress=not args.quiet,
        trials_dir=out / "trials",
        reuse_trials=not args.no_resume,
    )
    path = write_results(results, out, plot=False)
    if not args.no_plot:
        plot_binding(results, out / "binding_shots.png")
    print(format_binding_table(results))
    if results["paired_differences"]:
        print("paired differences (same episodes; 95% bootstrap interval):")
        print(format_differences(results["paired_differences"]))
    print(f"batched inference: {results['images_per_s']:.1f} images/s (mean over trials)")
    if results.get("resumed_trials"):
        print(
            f"{len(results['resumed_trials'])} trial(s) read back from {out / 'trials'} (--no-resume runs them again)"
        )
    print(f"results: {path}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if (args.model_dir is None) == (args.openflamingo_checkpoint is None):
        p.error("give exactly one of --model-dir and --openflamingo-checkpoint")
    if args.task == "binding":
        return _binding(args, p)
    if args.shots is None:
        args.shots = [0, 4, 8, 16, 32]
    modes = list(args.modes or [])
    if args.rices:
        modes.append("rices")
    ablate = args.ablate_images
    if args.all_modes:
        modes, ablate = ["random", "rices"], True
    modes = list(dict.fromkeys(modes or ["random"]))

    from pathlib import Path

    from .compare import format_differences
    from .report import format_table, write_results
    from .runner import evaluate
    from .tasks import CaptioningTask, ClassificationTask, VQATask

    task_kw = {
        "num_beams": args.num_beams,
        "length_penalty": args.length_penalty,
        "demo_separator": args.demo_separator.replace("\\n", "\n"),  # a typed \n is a newline
    }
    if args.template:
        task_kw["template"] = args.template
    if args.stop_words is not None:
        task_kw["stop_words"] = tuple(args.stop_words)
    if args.max_new_tokens is not None:
        task_kw["max_new_tokens"] = args.max_new_tokens
    if args.task == "classification":
        task = ClassificationTask(normalize_length=not args.sum_class_logprobs, **task_kw)
    else:
        task = (CaptioningTask if args.task == "captioning" else VQATask)(**task_kw)
    test, train = _datasets(args, p)

    out = Path(args.out or f"outputs/eval/{args.task}")
    lock = _lock_out(out)  # noqa: F841 - held until this evaluation ends
    model, identity = _load_model(args)
    results = evaluate(
        task,
        model,
        test,
        train,
        shots=args.shots,
        seeds=args.seeds,
        trials=args.trials,
        mode=modes,
        ablate_images=ablate,
        num_samples=args.num_samples,
        query_set_size=args.query_set_size,
        batch_size=args.batch_size,
        num_workers=args.workers,
        cache_dir=args.cache_dir,
        rows_per_call=args.rows_per_call,
        model_info=identity,
        progress=not args.quiet,
        trials_dir=out / "trials",
        reuse_trials=not args.no_resume,
    )
    if args.task == "captioning":
        results["data"]["dataset"] = args.dataset
    path = write_results(results, out, plot=not args.no_plot)
    print(format_table(results))
    if results["paired_differences"]:
        print("paired differences (same samples; 95% bootstrap interval):")
        print(format_differences(results["paired_differences"]))
    print(f"batched inference: {results['images_per_s']:.1f} images/s (mean over trials)")
    if results.get("resumed_trials"):
        print(
            f"{len(results['resumed_trials'])} trial(s) read back from {out / 'trials'}, finished by an earlier run "
            "of this evaluation (--no-resume runs them again)"
        )
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
