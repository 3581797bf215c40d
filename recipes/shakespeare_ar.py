"""Character-level tiny Shakespeare: Perceiver AR vs a plain causal transformer under the same CPU-time budget.

The last 10% of the text is the validation set. Both models have the same width, depth (Perceiver AR: one
cross-attention + ``--self-layers`` latent layers; transformer: ``--self-layers + 1`` layers), context length,
batches, optimiser and budget of process CPU seconds. Validation is scored in windows of ``--seq-len``
characters advancing by ``--num-latents``: each model predicts the same last ``--num-latents`` characters of every
window from the same context, reported in bits per character (nats / ln 2). Example::

    python recipes/shakespeare_ar.py --data /work/shared/data/tinyshakespeare.txt --budget-cpu-seconds 600
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from perceiver import PerceiverAR, PerceiverARConfig, SelfAttentionLayer, sample_next_token  # noqa: E402
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

OURS = "perceiver-ar"
BASELINE = "causal-transformer"


class CharTokenizer:
    """Characters of a text <-> ids, in sorted order."""

    def __init__(self, text: str):
        self.chars = sorted(set(text))
        self.index = {c: i for i, c in enumerate(self.chars)}

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> Tensor:
        missing = sorted(set(text) - set(self.index))
        if missing:
            raise ValueError(f"characters {missing} are not in the vocabulary")
        return torch.tensor([self.index[c] for c in text], dtype=torch.long)

    def decode(self, ids: Tensor) -> str:
        return "".join(self.chars[i] for i in ids.tolist())


class CausalTransformer(nn.Module):
    """Baseline: token + learned position embeddings, causal pre-LN self-attention layers, LN, linear head."""

    def __init__(self, vocab_size: int, max_seq_len: int, channels: int, heads: int, layers: int, widening: int):
        super().__init__()
        self.max_seq_len = max_seq_len
        self.token_embedding = nn.Embedding(vocab_size, channels)
        self.position_embedding = nn.Embedding(max_seq_len, channels)
        self.layers = nn.ModuleList(
            [
                SelfAttentionLayer(channels, num_heads=heads, widening_factor=widening, causal=True)
                for _ in range(layers)
            ]
        )
        self.norm = nn.LayerNorm(channels)
        self.head = nn.Linear(channels, vocab_size)
        for m in self.modules():  # the same initialisation as PerceiverAR
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, input_ids: Tensor) -> Tensor:
        """(B, L) -> next-token logits (B, L, V)."""
        if input_ids.shape[1] > self.max_seq_len:
            raise ValueError(f"input length {input_ids.shape[1]} exceeds max_seq_len={self.max_seq_len}")
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.token_embedding(input_ids) + self.position_embedding(pos)  # (B, L, C)
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x))

    @torch.no_grad()
    def generate(self, input_ids: Tensor, max_new_tokens: int, generator=None, **sampling) -> Tensor:
        """Sample without a cache, the context cropped to the last ``max_seq_len`` tokens."""
        seq = input_ids
        for _ in range(max_new_tokens):
            logits = self(seq[:, -self.max_seq_len :])[:, -1]
            seq = torch.cat([seq, sample_next_token(logits, generator=generator, **sampling)[:, None]], dim=1)
        return seq


def next_token_logits(model: nn.Module, windows: Tensor, num_targets: int) -> Tensor:
    """Logits (B, num_targets, V) predicting the token after each of the last ``num_targets`` window positions."""
    if isinstance(model, PerceiverAR):
        return model(windows, num_latents=num_targets)
    return model(windows)[:, -num_targets:]


def train_batches(tokens: Tensor, seq_len: int, batch_size: int, seed: int) -> Iterator[Tensor]:
    """Endless batches (B, seq_len + 1) of random windows; the order depends only on ``seed``."""
    g = torch.Generator().manual_seed(seed)
    offsets = torch.arange(seq_len + 1)
    while True:
        starts = torch.randint(0, len(tokens) - seq_len, (batch_size,), generator=g)
        yield tokens[starts[:, None] + offsets]


@torch.no_grad()
def bits_per_char(model: nn.Module, tokens: Tensor, seq_len: int, num_targets: int, batch_size: int = 32) -> dict:
    """Mean cross-entropy in bits of the targets ``tokens[seq_len - num_targets + 1 :]`` (whole windows only)."""
    num_windows = (len(tokens) - seq_len - 1) // num_targets + 1
    if num_windows < 1 or len(tokens) < seq_len + 1:
        raise ValueError(f"validation text of {len(tokens)} characters is shorter than seq_len + 1 = {seq_len + 1}")
    starts = torch.arange(num_windows) * num_targets
    offsets = torch.arange(seq_len + 1)
    total, count = 0.0, 0
    for i in range(0, num_windows, batch_size):
        w = tokens[starts[i : i + batch_size, None] + offsets]  # (B, seq_len + 1)
        logits = next_token_logits(model, w[:, :-1], num_targets)
        total += F.cross_entropy(logits.flatten(0, 1).float(), w[:, -num_targets:].flatten(), reduction="sum").item()
        count += w.shape[0] * num_targets
    return {"bits_per_char": total / count / math.log(2), "chars_scored": count}


def parse_args(argv: Optional[list[str]] = None):
    p = base_parser(__doc__.split("\n")[0], "results/shakespeare")
    p.add_argument("--models", default=f"{OURS},{BASELINE}", help="comma-separated subset of the two models")
    p.add_argument("--seq-len", type=int, default=256, help="context length of both models")
    p.add_argument("--num-latents", type=int, default=64, help="Perceiver AR latents; also the validation stride")
    p.add_argument("--channels", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--self-layers", type=int, default=3, help="Perceiver AR latent layers (transformer: this + 1)")
    p.add_argument("--widening", type=int, default=4)
    p.add_argument("--position-encoding", choices=("rotary", "learned"), default="rotary", help="of Perceiver AR")
    p.add_argument("--cross-attention-dropout", type=float, default=0.0, help="Perceiver AR prefix dropout")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--curve-val-chars", type=int, default=20000, help="validation characters for the learning curve")
    p.add_argument(
        "--prompt",
        default=None,
        help="prompt of the generated samples (default: the first --seq-len characters of the validation text; "
        "Perceiver AR is trained to predict with at least seq_len - num_latents + 1 characters of context)",
    )
    p.add_argument("--sample-chars", type=int, default=400)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-p", type=float, default=0.95)
    args = p.parse_args(argv)
    check_args(args)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    bad = [m for m in args.models if m not in (OURS, BASELINE)]
    if bad or not args.models:
        raise SystemExit(f"--models must be a non-empty subset of {[OURS, BASELINE]}, got {args.models}")
    if not 0 < args.num_latents <= args.seq_len:
        raise SystemExit(f"--num-latents {args.num_latents} must be in [1, --seq-len {args.seq_len}]")
    if not 0.0 < args.val_fraction < 1.0:
        raise SystemExit(f"--val-fraction must be in (0, 1), got {args.val_fraction}")
    return args


def main(argv: Optional[list[str]] = None) -> dict:
    args = parse_args(argv)
    with torch_threads(args.threads):
        return run(args, command_line(argv))


def run(args, command: str) -> dict:
    text = args.data.read_text(encoding="utf-8")
    tok = CharTokenizer(text)
    split = int(len(text) * (1.0 - args.val_fraction))
    train, val = tok.encode(text[:split]), tok.encode(text[split:])
    curve_val = val[: max(args.curve_val_chars, args.seq_len + 1)]
    prompt_text = text[split : split + args.seq_len] if args.prompt is None else args.prompt
    prompt = tok.encode(prompt_text)[None]
    print(
        f"tiny Shakespeare: {len(train):,} train / {len(val):,} validation characters, vocabulary {tok.vocab_size}; "
        f"budget {args.budget_cpu_seconds:g} CPU-s per model, {args.threads} thread(s)"
    )

    def build(name: str) -> nn.Module:
        if name == OURS:
            cfg = PerceiverARConfig(
                vocab_size=tok.vocab_size,
                max_seq_len=args.seq_len,
                num_latents=args.num_latents,
                num_channels=args.channels,
                num_heads=args.heads,
                num_self_attention_layers=args.self_layers,
                cross_attention_widening_factor=args.widening,
                self_attention_widening_factor=args.widening,
                position_encoding=args.position_encoding,
                cross_attention_dropout=args.cross_attention_dropout,
            )
            return PerceiverAR(cfg)
        return CausalTransformer(
            tok.vocab_size, args.seq_len, args.channels, args.heads, args.self_layers + 1, args.widening
        )

    def loss_fn(model: nn.Module, batch: Tensor) -> Tensor:
        if isinstance(model, PerceiverAR):
            return model.loss(batch)  # the latent positions
        logits = model(batch[:, :-1])  # every position
        return F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())

    results = results_header(
        "shakespeare_ar",
        command,
        args,
        num_train_chars=len(train),
        num_val_chars=len(val),
        vocab_size=tok.vocab_size,
        sample_prompt=prompt_text,
    )
    for name in args.models:
        seed_everything(args.seed)
        model = build(name)
        trained = train_under_budget(
            model,
            loss_fn,
            train_batches(train, args.seq_len, args.batch_size, args.seed),
            args.budget_cpu_seconds,
            args.lr,
            args.weight_decay,
            lambda m: {"val_subset_bpc": bits_per_char(m, curve_val, args.seq_len, args.num_latents)["bits_per_char"]},
            args.num_evals,
            desc=name,
            progress=not args.no_progress,
        )
        score = bits_per_char(model, val, args.seq_len, args.num_latents)
        gen = torch.Generator().manual_seed(args.seed)
        sampling = dict(temperature=args.temperature, top_p=args.top_p, generator=gen)
        sample = model.generate(prompt, args.sample_chars, **sampling)
        for p in trained.curve:
            if "train_loss" in p:
                p["train_bpc"] = p["train_loss"] / math.log(2)
        record = training_record(
            model,
            trained,
            "train_sequences",
            val_bits_per_char=score["bits_per_char"],
            val_chars_scored=score["chars_scored"],
        )
        results["models"][name] = {**record, "sample": tok.decode(sample[0]), "curve": trained.curve}

    rows = [
        [
            name,
            f"{r['parameters']:,}",
            f"{r['train_cpu_seconds']:.0f}",
            r["train_steps"],
            f"{r['val_bits_per_char']:.3f}",
        ]
        for name, r in results["models"].items()
    ]
    print()
    results["table"] = print_table(["model", "params", "train CPU-s", "steps", "val bits/char"], rows)
    for name, r in results["models"].items():
        print(f"\n--- {name} sample (T={args.temperature}, top-p={args.top_p}) ---\n{r['sample']}")
    print(f"\n(the first {len(prompt_text)} characters of each sample are the prompt)")
    curves = {n: r["curve"] for n, r in results["models"].items()}
    write_results(
        args.out,
        results,
        [
            ("train_bpc", curves, "training loss, bits/char (running mean)"),
            ("val_subset_bpc", curves, f"validation bits/char ({len(curve_val):,} chars)"),
        ],
        f"tiny Shakespeare, {args.budget_cpu_seconds:g} CPU-s per model, {args.threads} thread(s)",
    )
    return results


if __name__ == "__main__":
    main()
