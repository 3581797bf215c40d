"""Binding episodes composed on the fly against the same episodes written as document shards.

The episodes stream (``LoaderConfig(kind="episodes")``) composes each episode when it is read: it draws classes,
made-up words and images from class shards, so no word is ever tied to a class across the data. The alternative is
to compose a fixed set of episodes once and write them as interleaved documents (MMC4 layout) that the documents
stream reads. This measures, in one process and interleaved, what each costs the data side: episodes/s and
images/s of the loader (tokenized batches with preprocessed images, as training consumes them), with the loader's
own bookkeeping. The written episodes are the first ``--episodes`` of the on-the-fly stream, so both read the same
text and images.

    python benchmarks/bench_episodes.py --shards 'outputs/flickr8k/shards/binding_train/*.tar' \\
        --lm smollm2-135m --tower efficientnet-lite0 --out benchmarks/results/episodes_loader.json
"""

from __future__ import annotations

import argparse
import base64
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


def episode_documents(loader, count: int) -> list[dict]:
    """The first ``count`` episodes of ``loader`` (an episodes ShardLoader) as MMC4 documents: one sentence per image
    ("This is a dax."), each image embedded as base64 and matched to its sentence."""
    from data_pipelines.binding import fill

    core, source = loader._core, 0
    template = core.config.episodes.template
    docs = []
    for position in range(count):
        episode = core.episode(source, position)
        text_list, image_info = [], []
        for i, (sample_id, label) in enumerate(zip(episode.sample_ids, episode.labels)):
            text_list.append(fill(template, episode.words[label]))
            raw = core.readers[source].read(core.indexes[source].samples[sample_id])
            data = next(v for k, v in raw.items() if k.lower() in IMAGE_EXTENSIONS)
            image_info.append({"image_base64": base64.b64encode(data).decode(), "matched_text_index": i})
        docs.append({"text_list": text_list, "image_info": image_info})
    return docs


def machine(threads: int) -> dict:
    """CPU model, its bf16 flags and the threads used (Linux /proc/cpuinfo where readable)."""
    info = {"cpu": platform.processor() or platform.machine(), "threads": threads, "bf16_flags": []}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    for line in text.splitlines():
        if line.startswith("model name"):
            info["cpu"] = line.split(":", 1)[1].strip()
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            info["bf16_flags"] = sorted(flags & {"amx_bf16", "avx512_bf16"})
    return info


def time_loader(loader, batches: int) -> tuple[float, int, int]:
    """Seconds, samples and images of ``batches`` batches (after one warm-up batch)."""
    it = iter(loader)
    next(it)
    samples = images = 0
    t = time.perf_counter()
    for _ in range(batches):
        batch = next(it)
        samples += batch["input_ids"].shape[0]
        images += int(batch["media_mask"].sum()) if "media_mask" in batch else batch["vision_x"].shape[1]
    return time.perf_counter() - t, samples, images


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", required=True, help="class shards (data_pipelines.from_classes), a glob")
    p.add_argument("--lm", default="smollm2-135m", help="tokenizer: an offline base name or a directory")
    p.add_argument("--tower", default="efficientnet-lite0", help="open_clip tower whose image transform is used")
    p.add_argument("--tower-pretrained", default="imagenet", help="its pretrained tag ('none': random weights)")
    p.add_argument("--tokenizer", default=None, help="default: --lm")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-images", type=int, default=10)
    p.add_argument("--word-max-tokens", type=int, default=3, help="0: words of any length")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "episodes_loader.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    import vlm
    from data_pipelines import LoaderConfig, ShardLoader
    from data_pipelines.binding import EpisodeConfig
    from data_pipelines.from_mmc4 import write_document_shards
    from data_pipelines.shards import ShardWriterConfig

    pretrained = None if args.tower_pretrained.lower() == "none" else args.tower_pretrained
    _, transform, tokenizer = vlm.create_model_and_transforms(
        args.tower, pretrained, args.lm, args.tokenizer or args.lm
    )
    episodes = EpisodeConfig(
        ways=(2, 4), shots=(1, 4), queries=(1, 2), loss_on="answers", word_max_tokens=args.word_max_tokens or None
    )
    on_the_fly = ShardLoader(
        LoaderConfig(args.shards, kind="episodes", batch_size=args.batch_size, max_images=args.max_images,
                     max_length=128, infinite=True, episodes=episodes),
        tokenizer, transform,
    )  # fmt: skip
    count = args.batch_size * (args.batches + 1) * args.repeats
    with tempfile.TemporaryDirectory() as tmp:
        jsonl = Path(tmp) / "episodes.jsonl"
        with jsonl.open("w") as f:
            for doc in episode_documents(on_the_fly, count):
                f.write(json.dumps(doc) + "\n")
        write_document_shards([jsonl], ShardWriterConfig(Path(tmp) / "shards", prefix="episodes"), show_progress=False)
        written = ShardLoader(
            LoaderConfig(str(Path(tmp) / "shards" / "*.tar"), kind="documents", batch_size=args.batch_size,
                         max_images=args.max_images, max_length=128, infinite=True, shuffle="none"),
            tokenizer, transform,
        )  # fmt: skip
        # the written shards hold the same episodes: the first batches are token for token the same
        same_tokens = torch.equal(next(iter(on_the_fly))["input_ids"], next(iter(written))["input_ids"])
        rows = {"on_the_fly": [], "document_shards": []}
        for _ in range(args.repeats):  # interleaved: a busy machine slows both alike
            for name, loader in (("on_the_fly", on_the_fly), ("document_shards", written)):
                seconds, samples, images = time_loader(loader, args.batches)
                rows[name].append(
                    {"seconds": seconds, "episodes_per_s": samples / seconds, "images_per_s": images / seconds}
                )
    summary = {
        name: {
            "episodes_per_s": statistics.median(r["episodes_per_s"] for r in runs),
            "images_per_s": statistics.median(r["images_per_s"] for r in runs),
        }
        for name, runs in rows.items()
    }
    result = {
        "machine": machine(args.threads),
        "settings": {k: str(v) for k, v in vars(args).items()},
        "same_tokens": same_tokens,
        "runs": rows,
        "median": summary,
        "ratio_on_the_fly_to_shards": summary["on_the_fly"]["episodes_per_s"]
        / summary["document_shards"]["episodes_per_s"],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    for name, s in summary.items():
        print(f"{name:16s} {s['episodes_per_s']:7.1f} episodes/s  {s['images_per_s']:7.1f} images/s")
    print(f"same episodes, token for token: {same_tokens}")
    print(f"on the fly / written shards: {result['ratio_on_the_fly_to_shards']:.2f}x  ({args.out})")
    return result


if __name__ == "__main__":
    main()
