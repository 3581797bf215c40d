"""What bounds the captions: do the frozen vision features know more than the generated captions say?

For the most frequent content words of the training captions ("dog", "man", "water", "snow", "red", ...), a photo
is labelled with a word when at least 2 of its 5 human captions use it. A linear probe per word (logistic regression
on the mean-pooled feature grid of the frozen tower, trained on the training split, its threshold chosen on a tenth
held out of it) predicts the labels of the evaluated test images; the generated captions of a ``vlm.eval`` run
"predict" a word by using it. Per word and on average: F1 of the probe against F1 of the captions.

    python recipes/flickr8k_word_probe.py --data ../shared/data/flickr8k.tar \
        --predictions outputs/flickr8k/eval/predictions/captioning_rices_8shot_seed42.jsonl \
        --model-dir outputs/flickr8k/train/export --out outputs/flickr8k/word_probe.json
    # another tower's features instead of the model's own:
    #   --vision-encoder efficientnet-lite2 --pretrained imagenet

A probe far above the captions says the features carry the words and the trained connection (resampler, gated
cross-attention, decoding) does not pass them on; a probe near the captions says the tower bounds them. A caption
names a few things where the probe may flag every word, so the captions' F1 is a lower bound of what they carry.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

STOP_WORDS = frozenset(
    "a an the is are in on of and with at to his her their its while some two three one into for from by near "
    "front other up down next over through another who as it this that out each wearing".split()
)
MIN_REFERENCES = 2  # a photo has a word when at least this many of its captions use it


def words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


def vocabulary(captions: Sequence[Sequence[str]], size: int) -> list[str]:
    """The ``size`` content words used by the most training photos (a word counts once per photo)."""
    counts = collections.Counter(w for caps in captions for w in set().union(*map(words, caps)) if w not in STOP_WORDS)
    return [w for w, _ in counts.most_common(size)]


def word_labels(captions: Sequence[Sequence[str]], vocab: Sequence[str]) -> torch.Tensor:
    """(photos, words) 0/1: the word is in at least MIN_REFERENCES of the photo's captions."""
    rows = [[sum(w in words(c) for c in caps) >= MIN_REFERENCES for w in vocab] for caps in captions]
    return torch.tensor(rows, dtype=torch.float32).reshape(len(captions), len(vocab))


def f1(pred: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-column F1 of 0/1 predictions (0 where a column has no true or no predicted positives)."""
    tp = (pred * labels).sum(0)
    precision, recall = tp / pred.sum(0).clamp(min=1), tp / labels.sum(0).clamp(min=1)
    return 2 * precision * recall / (precision + recall).clamp(min=1e-12)


def fit_probe(
    features: torch.Tensor, labels: torch.Tensor, steps: int = 400, weight_decay: float = 1e-3, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logistic regression per word on standardised features: (mean, std, weights, bias)."""
    torch.manual_seed(seed)
    mean, std = features.mean(0), features.std(0) + 1e-6
    x = (features - mean) / std
    weight = torch.zeros(x.shape[1], labels.shape[1], requires_grad=True)
    bias = torch.zeros(labels.shape[1], requires_grad=True)
    opt = torch.optim.Adam([weight, bias], lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ weight + bias, labels)
        (loss + weight_decay * weight.pow(2).sum()).backward()
        opt.step()
    return mean, std, weight.detach(), bias.detach()


def probe_words(
    train_features: torch.Tensor,
    train_captions: Sequence[Sequence[str]],
    test_features: torch.Tensor,
    test_captions: Sequence[Sequence[str]],
    predictions: Sequence[str],
    vocab_size: int = 60,
    min_support: int = 10,
) -> dict:
    """Probe F1 and caption F1 per word (words on at least ``min_support`` evaluated photos) and their means."""
    if len(train_features) != len(train_captions) or len(test_features) != len(test_captions):
        raise ValueError("one feature row per photo is needed")
    if len(predictions) != len(test_captions):
        raise ValueError(f"{len(predictions)} predictions for {len(test_captions)} evaluated photos")
    vocab = vocabulary(train_captions, vocab_size)
    y_train, y_test = word_labels(train_captions, vocab), word_labels(test_captions, vocab)
    held_out = torch.arange(len(train_captions)) % 10 == 0  # picks each word's threshold
    mean, std, weight, bias = fit_probe(train_features[~held_out], y_train[~held_out])
    score = lambda f: torch.sigmoid(((f - mean) / std) @ weight + bias)  # noqa: E731
    grid = torch.linspace(0.05, 0.95, 19)
    p_val = score(train_features[held_out])
    best = torch.stack([f1((p_val >= t).float(), y_train[held_out]) for t in grid]).argmax(0)
    probe = (score(test_features) >= grid[best]).float()
    said = torch.tensor([[w in words(p) for w in vocab] for p in predictions], dtype=torch.float32)
    said = said.reshape(len(predictions), len(vocab))
    f_probe, f_said, support = f1(probe, y_test), f1(said, y_test), y_test.sum(0)
    keep = support >= min_support
    per_word = {
        w: {
            "photos": int(support[j]),
            "probe_f1": round(float(f_probe[j]), 4),
            "caption_f1": round(float(f_said[j]), 4),
        }
        for j, w in enumerate(vocab)
        if keep[j]
    }
    return {
        "words": per_word,
        "num_words": int(keep.sum()),
        "mean_probe_f1": float(f_probe[keep].mean()) if keep.any() else None,
        "mean_caption_f1": float(f_said[keep].mean()) if keep.any() else None,
        "train_photos": len(train_captions),
        "test_photos": len(test_captions),
    }


@torch.no_grad()
def grid_features(
    encoder, preprocess, paths: Sequence[str], batch_size: int = 32, desc: str = "features"
) -> torch.Tensor:
    """Mean over the tower's feature grid, (photos, D) float32, bf16 autocast where the CPU has it natively."""
    from PIL import Image
    from tqdm import tqdm

    from training.distributed import cpu_bf16_features

    param = next(encoder.parameters())
    autocast = param.device.type == "cpu" and bool(cpu_bf16_features())
    out = []
    for start in tqdm(range(0, len(paths), batch_size), desc=desc, leave=False):
        batch = torch.stack([preprocess(Image.open(p).convert("RGB")) for p in paths[start : start + batch_size]])
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            out.append(encoder(batch.to(param.device, param.dtype)).float().mean(1).cpu())
    return torch.cat(out) if out else torch.zeros(0, 0)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--data", required=True, help="Flickr8k (tar or directory, the CSV layout vlm.eval reads)")
    p.add_argument("--predictions", required=True, type=Path, help="a vlm.eval predictions JSONL of the test split")
    tower = p.add_mutually_exclusive_group(required=True)
    tower.add_argument("--model-dir", type=Path, help="an export: probe the features its own vision tower gives")
    tower.add_argument("--vision-encoder", help="an open_clip model or named base (vlm.bases), e.g. efficientnet-lite2")
    p.add_argument("--pretrained", default=None, help="with --vision-encoder: its weights tag (e.g. imagenet)")
    p.add_argument("--vocab-size", type=int, default=60)
    p.add_argument("--min-support", type=int, default=10, help="words on at least this many evaluated photos")
    p.add_argument("--cache-dir", default=None, help="extracted archives (vlm.eval's cache)")
    p.add_argument("--out", type=Path, default=None, help="write the result as JSON here")
    args = p.parse_args(argv)
    if not args.predictions.is_file():
        p.error(f"--predictions {args.predictions}: no such file")
    if args.vocab_size < 1 or args.min_support < 1:
        p.error("--vocab-size and --min-support must be >= 1")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    from vlm.eval import load_flickr

    records = [json.loads(line) for line in args.predictions.read_text().splitlines() if line.strip()]
    train, test = load_flickr(args.data, "train", args.cache_dir), load_flickr(args.data, "test", args.cache_dir)
    by_id: Mapping[str, object] = {s.id: s for s in test.samples}
    unknown = [r["id"] for r in records if r["id"] not in by_id]
    if unknown:
        raise SystemExit(f"{len(unknown)} predictions are not test photos of {args.data}, e.g. {unknown[:3]}")
    evaluated = [by_id[r["id"]] for r in records]
    if args.model_dir is not None:
        from vlm.eval import load_model

        model, _ = load_model(model_dir=args.model_dir)
        encoder, preprocess, tower = model.vision_encoder, model.image_processor, f"{args.model_dir} (its own tower)"
    else:
        from vlm.vision import create_vision_encoder

        encoder, preprocess = create_vision_encoder(args.vision_encoder, args.pretrained)
        tower = f"{args.vision_encoder} ({args.pretrained or 'random weights'})"
    encoder.eval()
    start = time.perf_counter()
    train_x = grid_features(encoder, preprocess, [s.image for s in train.samples], desc="training photos")
    test_x = grid_features(encoder, preprocess, [s.image for s in evaluated], desc="evaluated photos")
    seconds = time.perf_counter() - start
    result = probe_words(
        train_x,
        [s.captions for s in train.samples],
        test_x,
        [s.captions for s in evaluated],
        [r["prediction"] for r in records],
        args.vocab_size,
        args.min_support,
    )
    result = {"tower": tower, "predictions": str(args.predictions), "feature_seconds": round(seconds, 1), **result}
    print(f"{tower}: features of {len(train_x) + len(test_x)} photos in {seconds:.0f} s")
    print(
        f"{result['num_words']} words on >= {args.min_support} of {len(evaluated)} evaluated photos: mean F1 "
        f"probe {result['mean_probe_f1'] or 0:.3f}, captions {result['mean_caption_f1'] or 0:.3f}"
    )
    print("| word | photos | probe F1 | caption F1 |\n|---|---|---|---|")
    for w, r in sorted(result["words"].items(), key=lambda kv: -kv[1]["photos"]):
        print(f"| {w} | {r['photos']} | {r['probe_f1']:.2f} | {r['caption_f1']:.2f} |")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
