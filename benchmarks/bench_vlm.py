"""Flamingo benchmark: this project's `vlm` vs the `open-flamingo` reference package, same components.

Both models are built from the same small offline components (an open_clip ViT saved to a local
checkpoint file, a Llama-style LM and a tokenizer saved to local directories) with OpenFlamingo's
default resampler / cross-attention sizes, and the reference's weights are loaded into ours with
`vlm.load_openflamingo_checkpoint`, so both compute the same function (checked: logits and greedy
tokens are compared before timing).

Measured, interleaved in one process so a busy machine slows both alike:
  * training step: forward + backward with frozen vision tower and LM (each model's own trainable set:
    OpenFlamingo trains the whole input-embedding matrix, this project only the added token rows);
  * generation: greedy decoding of `--new-tokens` tokens after a prompt with `--shots` images.
    Ours runs `Flamingo.generate` (Hugging Face `generate`). The reference's `generate` does not run on
    transformers 5.x (its `FlamingoLMMixin.forward` requires `attention_mask` positionally, which the
    generation prefill does not pass), so it is driven by the loop its `generate` delegates to: images
    encoded once, then the LM called token by token with its KV cache. That loop has less overhead than
    `generate`, which favours the reference.

    python benchmarks/bench_vlm.py                    # results in benchmarks/results/vlm.json
    python benchmarks/bench_vlm.py --repeats 3 --threads 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT / "tests"))  # the open-flamingo helpers shared with the parity tests

from vlm_helpers import import_open_flamingo, openflamingo_greedy  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
from common import PRECISIONS, count_flops, gemm_peak_gflops, precision_context  # noqa: E402

# Scaled-down shapes of the released OpenFlamingo models: what matters for the comparison is the vision width
# relative to the LM width (ViT-L/14 is 1024 wide; the 3B LM 2048, the 9B LM 4096) and how often
# cross-attention is inserted. Resampler and cross-attention sizes are OpenFlamingo's defaults in both.
CONFIGS = {
    # tiny components as in the tests: per-step overheads dominate
    "tiny": dict(vision_width=64, vision_layers=2, lm_width=64, lm_layers=2, cross_attn_every=1),
    "3b-shape": dict(vision_width=384, vision_layers=4, lm_width=768, lm_layers=6, cross_attn_every=1),
    "9b-shape": dict(vision_width=192, vision_layers=4, lm_width=768, lm_layers=8, cross_attn_every=4),
}


def build_components(args, shape: dict, directory: Path) -> dict:
    import open_clip

    from training.config import TinyBasesConfig
    from training.tiny_bases import ensure_tiny_bases

    cfg = TinyBasesConfig(
        image_size=args.image_size,
        patch_size=16,
        vision_width=shape["vision_width"],
        vision_layers=shape["vision_layers"],
        vision_head_width=64,
        lm_hidden_size=shape["lm_width"],
        lm_layers=shape["lm_layers"],
        lm_heads=shape["lm_width"] // 64,
        lm_intermediate_size=4 * shape["lm_width"],
        lm_max_positions=1024,
        vocab_size=512,
    )
    bases = ensure_tiny_bases(cfg, directory)
    torch.manual_seed(0)
    clip = open_clip.create_model(bases.clip_name, pretrained=None)
    clip_ckpt = directory / "clip.pt"
    torch.save(clip.state_dict(), clip_ckpt)
    return dict(
        clip_vision_encoder_path=bases.clip_name,
        clip_vision_encoder_pretrained=str(clip_ckpt),
        lang_encoder_path=bases.lang_encoder_path,
        tokenizer_path=bases.tokenizer_path,
    )


def build_models(components: dict, every: int):
    import vlm

    of = import_open_flamingo()
    torch.manual_seed(1)
    ref, _, ref_tok = of.create_model_and_transforms(**components, cross_attn_every_n_layers=every)
    with torch.no_grad():  # open the gates and move the embeddings, as training would
        for name, p in ref.named_parameters():
            if name.endswith(("attn_gate", "ff_gate")):
                p.uniform_(0.5, 1.5)
        emb = ref.lang_encoder.get_input_embeddings().weight
        emb.add_(0.05 * torch.randn_like(emb))
    ours, _, tok = vlm.create_model_and_transforms(**components, cross_attn_every_n_layers=every)
    vlm.load_openflamingo_checkpoint(ours, ref.state_dict())
    return ours, tok, ref, ref_tok


def make_batch(tok, batch: int, shots: int, image_size: int, seed: int = 0):
    """`shots` captioned images per example; for generation the last caption is left open."""
    g = torch.Generator().manual_seed(seed)
    vision_x = torch.randn(batch, shots, 1, 3, image_size, image_size, generator=g)
    demo = "<image>Output: a red circle and two blue squares on a white background.<|endofchunk|>"
    train_text = [demo * shots] * batch
    prompt = [demo * (shots - 1) + "<image>Output:"] * batch
    train = tok(train_text, return_tensors="pt")
    labels = train.input_ids.clone()
    labels[labels == tok.convert_tokens_to_ids("<image>")] = -100
    gen = tok(prompt, return_tensors="pt")
    return vision_x, train.input_ids, train.attention_mask, labels, gen.input_ids, gen.attention_mask


def ours_greedy(model, vision_x, input_ids, attention_mask, new_tokens: int) -> torch.Tensor:
    return model.generate(
        vision_x,
        input_ids,
        attention_mask=attention_mask,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        num_beams=1,
    )


def train_step(model, vision_x, ids, mask, labels, precision: str = "fp32") -> None:
    model.zero_grad(set_to_none=True)
    with precision_context(precision):
        loss = model(vision_x, ids, attention_mask=mask, labels=labels).loss
    loss.backward()


def compile_reference_added_modules(ref) -> int:
    """torch.compile (in place) the parts OpenFlamingo adds, the ones ``compile_own_modules`` compiles in ours:
    the resampler and the gated cross-attention blocks."""
    targets = [ref.perceiver, *[b for b in ref.lang_encoder.gated_cross_attn_layers if b is not None]]
    for module in targets:
        module.compile()
    return len(targets)


def time_interleaved(fns: dict, repeats: int, desc: str) -> dict:
    times = {k: [] for k in fns}
    for fn in fns.values():  # warm-up
        fn()
    for _ in tqdm(range(repeats), desc=desc, leave=False):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--shots", type=int, default=4, help="images per example (in-context images for generation)")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--image-size", type=int, default=112)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--precision", choices=PRECISIONS, default="fp32", help="bf16: autocast, for both models")
    p.add_argument(
        "--peak-size",
        type=int,
        default=4096,
        help="side of the square matrix multiply that measures the GEMM peak (smaller: a quicker, lower peak)",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the resampler and cross-attention of both")
    p.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/vlm[_bf16][_compiled].json")
    args = p.parse_args()
    if args.out is None:
        suffix = "" if args.precision == "fp32" and not args.compile else f"_{args.precision}"
        args.out = RESULTS / f"vlm{suffix}{'_compiled' if args.compile else ''}.json"
    if args.threads:
        torch.set_num_threads(args.threads)

    peak = gemm_peak_gflops(args.precision, size=args.peak_size)
    print(f"measured {args.precision} GEMM peak ({args.peak_size}^3 matrix multiply): {peak:.0f} GFLOP/s")
    results = {
        "threads": torch.get_num_threads(),
        "precision": args.precision,
        "compile": args.compile,
        "gemm_peak_gflops": peak,
        "args": {k: str(v) for k, v in vars(args).items()},
        "configs": {},
    }
    args.peak = peak
    for name in args.configs:
        results["configs"][name] = run_config(name, CONFIGS[name], args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    plot(results, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


def plot(results: dict, path: Path) -> None:
    """Bars: time of a training step and of generating the tokens, per shape, ours next to OpenFlamingo."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["configs"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, speedup, title in (
        (axes[0], "train_step_s", "train_speedup", "training step (forward + backward)"),
        (axes[1], "generate_s", "generate_speedup", "greedy generation"),
    ):
        xs = range(len(names))
        ours = [results["configs"][n][key]["ours"] for n in names]
        ref = [results["configs"][n][key]["openflamingo"] for n in names]
        ax.bar([x - 0.2 for x in xs], ours, width=0.4, label="this project")
        ax.bar([x + 0.2 for x in xs], ref, width=0.4, label="open-flamingo")
        for x, n in zip(xs, names):
            ax.annotate(f"{results['configs'][n][speedup]:.2f}x", (x, max(ours[x], ref[x])), ha="center", va="bottom")
        ax.set_xticks(list(xs), names)
        ax.set_ylabel("seconds")
        ax.set_title(title)
        ax.set_ylim(0, 1.2 * max(ours + ref))
        ax.legend(loc="upper left")
    fig.suptitle(
        f"Flamingo vs open-flamingo, same weights, {results['precision']}"
        f"{' compiled' if results['compile'] else ''} ({results['threads']} CPU threads)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_config(name: str, shape: dict, args) -> dict:
    print(f"== {name}: {shape}")
    with tempfile.TemporaryDirectory(prefix="bench-vlm-") as tmp:
        components = build_components(args, shape, Path(tmp))
        ours, tok, ref, ref_tok = build_models(components, shape["cross_attn_every"])
        vision_x, ids, mask, labels, gen_ids, gen_mask = make_batch(tok, args.batch, args.shots, args.image_size)
        ref_ids = ref_tok(tok.batch_decode(ids), return_tensors="pt", add_special_tokens=False).input_ids
        if not torch.equal(ref_ids, ids):
            raise RuntimeError("the two tokenizers disagree on the benchmark text")

        # Same function: logits and greedy tokens agree before anything is timed.
        for model in (ours, ref):
            model.eval()
        with torch.no_grad():
            diff = ours(vision_x, ids, attention_mask=mask).logits - ref(vision_x, ids, attention_mask=mask).logits
            max_diff = diff.abs().max().item()
        same_tokens = torch.equal(
            ours_greedy(ours, vision_x, gen_ids, gen_mask, args.new_tokens),
            openflamingo_greedy(ref, vision_x, gen_ids, gen_mask, args.new_tokens),
        )
        print(f"max |logits ours - OpenFlamingo| = {max_diff:.2e}; identical greedy tokens: {same_tokens}")
        if max_diff > 1e-4 or not same_tokens:
            raise RuntimeError("the two models do not compute the same function; timings would not be comparable")

        for model in (ours, ref):
            model.train()
        prec = args.precision
        train_flops = count_flops(lambda: train_step(ref, vision_x, ids, mask, labels, prec))
        if args.compile:
            from training.modeling import compile_own_modules

            compile_own_modules(ours)
            compile_reference_added_modules(ref)
        train = time_interleaved(
            {
                "ours": lambda: train_step(ours, vision_x, ids, mask, labels, prec),
                "openflamingo": lambda: train_step(ref, vision_x, ids, mask, labels, prec),
            },
            args.repeats,
            "training step",
        )
        for model in (ours, ref):
            model.eval()
        with torch.no_grad(), precision_context(prec):
            gen_flops = count_flops(
                lambda: openflamingo_greedy(ref, vision_x, gen_ids, gen_mask, args.new_tokens), frozen=[ref]
            )
            gen = time_interleaved(
                {
                    "ours": lambda: ours_greedy(ours, vision_x, gen_ids, gen_mask, args.new_tokens),
                    "openflamingo": lambda: openflamingo_greedy(ref, vision_x, gen_ids, gen_mask, args.new_tokens),
                },
                args.repeats,
                "generation",
            )

    new = args.batch * args.new_tokens
    result = {
        "shape": shape,
        "train_tokens_per_step": int(mask.sum()),
        "max_abs_logit_diff": max_diff,
        "identical_greedy_tokens": same_tokens,
        "train_step_s": train,
        "train_speedup": train["openflamingo"] / train["ours"],
        "generate_s": gen,
        "generate_tokens_per_s": {k: new / v for k, v in gen.items()},
        "generate_speedup": gen["openflamingo"] / gen["ours"],
        # FLOPs counted once on the reference (forward + backward; the whole greedy loop)
        "train_flops": train_flops,
        "generate_flops": gen_flops,
        "train_gflops": {k: train_flops / v / 1e9 for k, v in train.items()},
        "generate_gflops": {k: gen_flops / v / 1e9 for k, v in gen.items()},
        "train_fraction_of_peak": {k: train_flops / v / 1e9 / args.peak for k, v in train.items()},
        "generate_fraction_of_peak": {k: gen_flops / v / 1e9 / args.peak for k, v in gen.items()},
    }
    print(
        f"training step (B={args.batch}, {args.shots} images, {result['train_tokens_per_step']} tokens): "
        f"ours {train['ours']:.3f} s, OpenFlamingo {train['openflamingo']:.3f} s -> {result['train_speedup']:.2f}x; "
        f"{train_flops / 1e9:.1f} GFLOP: ours {result['train_fraction_of_peak']['ours']:.0%} of the "
        f"{prec} peak, OpenFlamingo {result['train_fraction_of_peak']['openflamingo']:.0%}"
    )
    print(
        f"generation ({args.new_tokens} new tokens, {args.shots} images, B={args.batch}): "
        f"ours {result['generate_tokens_per_s']['ours']:.1f} tok/s, "
        f"OpenFlamingo {result['generate_tokens_per_s']['openflamingo']:.1f} tok/s -> {result['generate_speedup']:.2f}x; "
        f"{gen_flops / 1e9:.1f} GFLOP (reference loop): ours {result['generate_fraction_of_peak']['ours']:.0%} of peak, "
        f"OpenFlamingo {result['generate_fraction_of_peak']['openflamingo']:.0%}"
    )
    return result


if __name__ == "__main__":
    main()
