"""Command line few-shot generation with a saved model.

    python -m vlm.generate --model-dir DIR --demo cat.jpg "a cat" --demo dog.jpg "a dog" \\
        --query q1.jpg --query q2.jpg --prefix "Output:" --max-new-tokens 20

Prints one line per query: the image path, a tab, the completion.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Optional


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m vlm.generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", required=True, help="directory written by Flamingo.save_pretrained")
    p.add_argument(
        "--demo", nargs=2, action="append", default=[], metavar=("IMAGE", "TEXT"), help="a demonstration; repeatable"
    )
    p.add_argument(
        "--query", action="append", required=True, metavar="IMAGE", help="a query image; repeatable (batched)"
    )
    p.add_argument("--prefix", default="", help='text before each answer, e.g. "Output:"')
    p.add_argument("--max-new-tokens", type=int, default=20)
    p.add_argument("--num-beams", type=int, default=1)
    p.add_argument("--do-sample", action="store_true")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--clip-config",
        action="append",
        default=[],
        metavar="PATH",
        help="extra open_clip model config (JSON file or directory) to register; repeatable",
    )
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.max_new_tokens < 1:
        raise SystemExit(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.num_beams < 1:
        raise SystemExit(f"--num-beams must be >= 1, got {args.num_beams}")
    import open_clip
    import torch

    from data_pipelines.images import ImageLoadError, load_image

    from .few_shot import few_shot
    from .model import Flamingo

    for path in args.clip_config:
        open_clip.add_model_config(path)
    try:  # every image before the model loads
        demos = [(load_image(img), text) for img, text in args.demo]
        queries = [load_image(q) for q in args.query]
    except ImageLoadError as err:
        raise SystemExit(f"error: {err}") from None
    torch.manual_seed(args.seed)
    model = Flamingo.from_pretrained(args.model_dir).to(args.device).eval()
    gen = {"num_beams": args.num_beams, "do_sample": args.do_sample}
    if args.do_sample:
        gen.update(temperature=args.temperature, top_p=args.top_p)
    outputs = few_shot(model, demos, queries, prompt_prefix=args.prefix, max_new_tokens=args.max_new_tokens, **gen)
    for path, text in zip(args.query, outputs):
        print(f"{path}\t{text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
