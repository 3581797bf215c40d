"""CIFAR-10 from raw pixels: this project's Perceiver vs ``perceiver-pytorch`` under the same CPU-time budget.

Both models get the same pixels (per-channel standardised, channels last), the same Fourier position features
(``num_bands`` frequencies from 1 to ``max_resolution / 2`` per axis), the same architecture sizes, the same
batches in the same order, the same optimiser and learning-rate schedule and the same budget of process CPU
seconds; test accuracy is measured on all test images. Example::

    python recipes/cifar10_perceiver.py --data /work/shared/data/cifar10.tar.gz --budget-cpu-seconds 600
"""

from __future__ import annotations

import hashlib
import io
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from perceiver import ArrayInputAdapter, EncoderConfig, Perceiver  # noqa: E402
from recipes.common import (  # noqa: E402
    base_parser,
    check_args,
    command_line,
    print_table,
    results_header,
    seed_everything,
    torch_threads,
    train_under_budget,
    training_record,
    write_results,
)

OURS = "perceiver (this project)"
BASELINE = "perceiver-pytorch"


# ------------------------------------------------------------------------------------------------- data


def load_cifar10(archive: Path, cache_dir: Path) -> dict:
    """Decode ``train/<class>/*.jpg`` and ``test/<class>/*.jpg`` of the archive once into uint8 tensors.

    Returns ``{"classes", "train_x" (N, 32, 32, 3) uint8, "train_y" (N,), "test_x", "test_y"}``, cached in
    ``cache_dir`` under a name derived from the archive's name, size and modification time.
    """
    from PIL import Image

    stat = archive.stat()
    key = hashlib.sha1(f"{archive.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    cache = cache_dir / f"{archive.name.split('.')[0]}-{key}.pt"
    if cache.is_file():
        return torch.load(cache)

    images: dict[str, list[tuple[str, str, np.ndarray]]] = {"train": [], "test": []}
    with tarfile.open(archive, "r:*") as tar:
        for member in tar:
            parts = Path(member.name).parts
            if not member.isfile() or len(parts) < 3 or parts[-3] not in images:
                continue
            if not parts[-1].lower().endswith((".jpg", ".jpeg", ".png")):
                continue
            data = tar.extractfile(member).read()  # type: ignore[union-attr]
            img = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
            if img.shape != (32, 32, 3):
                raise ValueError(f"{member.name}: expected a 32x32 RGB image, got shape {img.shape}")
            images[parts[-3]].append((parts[-2], parts[-1], img))
    if not images["train"] or not images["test"]:
        raise ValueError(
            f"{archive} holds {len(images['train'])} train and {len(images['test'])} test images; "
            "expected train/<class>/*.jpg and test/<class>/*.jpg"
        )
    classes = sorted({c for c, _, _ in images["train"]})
    unknown = sorted({c for c, _, _ in images["test"]} - set(classes))
    if unknown:
        raise ValueError(f"test classes {unknown} do not occur in train classes {classes}")
    out: dict = {"classes": classes}
    for split, items in images.items():
        items.sort(key=lambda t: (t[0], t[1]))
        out[f"{split}_x"] = torch.from_numpy(np.stack([img for _, _, img in items]))
        out[f"{split}_y"] = torch.tensor([classes.index(c) for c, _, _ in items])
    cache_dir.mkdir(parents=True, exist_ok=True)
    torch.save(out, cache)
    return out


class Normalizer:
    """uint8 (B, H, W, 3) -> float (B, H, W, 3), standardised with the training set's channel statistics."""

    def __init__(self, train_x: Tensor):
        x = train_x.float().div(255.0)
        self.mean = x.mean(dim=(0, 1, 2))
        self.std = x.std(dim=(0, 1, 2)).clamp(min=1e-3)

    def __call__(self, x: Tensor) -> Tensor:
        return (x.float().div(255.0) - self.mean) / self.std


def batches(x: Tensor, y: Tensor, batch_size: int, seed: int, norm: Normalizer, flip: bool) -> Iterator:
    """Endless shuffled epochs; the order (and the flips) depend only on ``seed``."""
    g = torch.Generator().manual_seed(seed)
    step = min(batch_size, len(x))
    while True:
        order = torch.randperm(len(x), generator=g)
        for i in range(0, len(order) - step + 1, step):  # full batches only
            idx = order[i : i + step]
            xb = norm(x[idx])
            if flip:
                mask = torch.rand(len(idx), generator=g) < 0.5
                xb = torch.where(mask[:, None, None, None], xb.flip(2), xb)
            yield xb, y[idx]


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor, norm: Normalizer, batch_size: int = 500) -> float:
    correct = 0
    for i in range(0, len(x), batch_size):
        correct += (model(norm(x[i : i + batch_size])).argmax(-1) == y[i : i + batch_size]).sum().item()
    return correct / len(x)


# ----------------------------------------------------------------------------------------------- models


def build_ours(args, num_classes: int) -> Perceiver:
    adapter = ArrayInputAdapter((32, 32), 3, num_bands=args.num_bands, max_resolution=args.max_resolution)
    encoder = EncoderConfig(
        num_input_channels=adapter.num_input_channels,
        num_latents=args.num_latents,
        num_latent_channels=args.latent_channels,
        num_cross_attention_heads=args.cross_heads,
        num_cross_attention_qk_channels=args.cross_head_channels * args.cross_heads,
        num_cross_attention_v_channels=args.cross_head_channels * args.cross_heads,
        cross_attention_widening_factor=4,
        num_self_attention_heads=args.self_heads,
        self_attention_widening_factor=4,
        num_self_attends_per_block=args.self_per_cross,
        num_blocks=args.depth,
        num_cross_attends=args.depth,
        weight_sharing="all_but_first" if args.weight_sharing else "none",
    )
    return Perceiver(adapter, encoder, num_classes)


def build_baseline(args, num_classes: int) -> nn.Module:
    from perceiver_pytorch import Perceiver as LucidrainsPerceiver

    return LucidrainsPerceiver(
        input_channels=3,
        input_axis=2,
        num_freq_bands=args.num_bands,
        max_freq=args.max_resolution,
        depth=args.depth,
        num_latents=args.num_latents,
        latent_dim=args.latent_channels,
        cross_heads=args.cross_heads,
        latent_heads=args.self_heads,
        cross_dim_head=args.cross_head_channels,
        latent_dim_head=args.latent_channels // args.self_heads,
        num_classes=num_classes,
        self_per_cross_attn=args.self_per_cross,
        weight_tie_layers=args.weight_sharing,
    )


# ------------------------------------------------------------------------------------------------- main


def parse_args(argv: Optional[list[str]] = None):
    p = base_parser(__doc__.split("\n")[0], "results/cifar10")
    p.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "perceiver-recipes")
    p.add_argument("--models", default=f"{OURS},{BASELINE}", help="comma-separated subset of the two models")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--no-flip", action="store_true", help="no random horizontal flips")
    p.add_argument("--num-latents", type=int, default=32)
    p.add_argument("--latent-channels", type=int, default=96)
    p.add_argument("--cross-heads", type=int, default=1)
    p.add_argument("--cross-head-channels", type=int, default=32)
    p.add_argument("--self-heads", type=int, default=4)
    p.add_argument("--self-per-cross", type=int, default=2, help="self-attention layers after each cross-attention")
    p.add_argument("--depth", type=int, default=2, help="cross-attention + latent block repeats")
    p.add_argument("--weight-sharing", action="store_true", help="share all repeats but the first (paper style)")
    p.add_argument("--num-bands", type=int, default=8)
    p.add_argument("--max-resolution", type=int, default=32)
    p.add_argument("--curve-test-size", type=int, default=1000, help="test images scored for the learning curve")
    args = p.parse_args(argv)
    check_args(args)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    bad = [m for m in args.models if m not in (OURS, BASELINE)]
    if bad or not args.models:
        raise SystemExit(f"--models must be a non-empty subset of {[OURS, BASELINE]}, got {args.models}")
    if BASELINE in args.models:
        try:
            import perceiver_pytorch  # noqa: F401
        except ImportError as e:
            raise SystemExit(
                f"the baseline needs `pip install perceiver-pytorch` ({e}); or pass --models '{OURS}'"
            ) from e
    if args.latent_channels % args.self_heads:
        raise SystemExit(
            f"--latent-channels {args.latent_channels} must be divisible by --self-heads {args.self_heads}"
        )
    return args


def main(argv: Optional[list[str]] = None) -> dict:
    args = parse_args(argv)
    with torch_threads(args.threads):
        return run(args, command_line(argv))


def run(args, command: str) -> dict:
    data = load_cifar10(args.data, args.cache_dir)
    classes = data["classes"]
    norm = Normalizer(data["train_x"])
    g = torch.Generator().manual_seed(args.seed)
    curve_idx = torch.randperm(len(data["test_x"]), generator=g)[: args.curve_test_size]
    curve_x, curve_y = data["test_x"][curve_idx], data["test_y"][curve_idx]
    print(
        f"CIFAR-10: {len(data['train_x'])} train / {len(data['test_x'])} test images, {len(classes)} classes; "
        f"budget {args.budget_cpu_seconds:g} CPU-s per model, {args.threads} thread(s)"
    )

    builders = {OURS: build_ours, BASELINE: build_baseline}
    results = results_header(
        "cifar10_perceiver",
        command,
        args,
        num_train=len(data["train_x"]),
        num_test=len(data["test_x"]),
        classes=classes,
    )
    for name in args.models:
        seed_everything(args.seed)
        model = builders[name](args, len(classes))
        trained = train_under_budget(
            model,
            lambda m, b: F.cross_entropy(m(b[0]), b[1]),
            batches(data["train_x"], data["train_y"], args.batch_size, args.seed, norm, flip=not args.no_flip),
            args.budget_cpu_seconds,
            args.lr,
            args.weight_decay,
            lambda m: {"test_subset_accuracy": accuracy(m, curve_x, curve_y, norm)},
            args.num_evals,
            desc=name,
            progress=not args.no_progress,
        )
        test_acc = accuracy(model, data["test_x"], data["test_y"], norm)
        record = training_record(model, trained, "train_images", test_accuracy=test_acc)
        record["epochs"] = trained.examples / len(data["train_x"])
        results["models"][name] = {**record, "curve": trained.curve}

    rows = [
        [
            name,
            f"{r['parameters']:,}",
            f"{r['train_cpu_seconds']:.0f}",
            r["train_steps"],
            f"{r['epochs']:.2f}",
            f"{100 * r['test_accuracy']:.2f}%",
        ]
        for name, r in results["models"].items()
    ]
    print()
    results["table"] = print_table(
        ["model", "params", "train CPU-s", "steps", "epochs", f"test acc ({len(data['test_x'])} images)"], rows
    )
    curves = {n: r["curve"] for n, r in results["models"].items()}
    write_results(
        args.out,
        results,
        [
            ("train_loss", curves, "training loss (running mean)"),
            ("test_subset_accuracy", curves, f"accuracy on {len(curve_x)} test images"),
        ],
        f"CIFAR-10, {args.budget_cpu_seconds:g} CPU-s per model, {args.threads} thread(s)",
    )
    return results


if __name__ == "__main__":
    main()
