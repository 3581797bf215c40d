"""Perceiver AR generation window: where a restarted window starts and how many latents it has, against the schedule
written out here (so a change to the window's room changes the tokens and fails)."""

from __future__ import annotations

import pytest
import torch

from perceiver import PerceiverAR, PerceiverARConfig

VOCAB = 13
MAX_SEQ_LEN, NUM_LATENTS = 20, 6


def make_model(seed: int = 0) -> PerceiverAR:
    torch.manual_seed(seed)
    config = PerceiverARConfig(
        vocab_size=VOCAB,
        max_seq_len=MAX_SEQ_LEN,
        num_latents=NUM_LATENTS,
        num_channels=32,
        num_heads=4,
        num_self_attention_layers=2,
    )
    return PerceiverAR(config).double().eval()


def reference_greedy(model: PerceiverAR, prompt: torch.Tensor, new_tokens: int, num_latents: int, room=None):
    """Greedy decoding by full forwards over the documented window schedule: a (re)started window over ``length``
    tokens keeps ``room = config.num_latents - num_latents`` positions free, so it spans ``max_seq_len - room``
    tokens, of which the last ``num_latents`` are latents; each new token is one more latent until either limit."""
    c = model.config
    room = c.num_latents - num_latents if room is None else room

    def restart(length: int) -> tuple[int, int]:
        start = max(0, length - (c.max_seq_len - room))
        return start, min(num_latents, length - start)

    seq = prompt
    start, n = restart(seq.shape[1])
    with torch.no_grad():
        for _ in range(new_tokens):
            token = model(seq[:, start:], num_latents=n)[:, -1].argmax(-1)
            seq = torch.cat([seq, token[:, None]], dim=1)
            if n + 1 <= c.num_latents and seq.shape[1] - start <= c.max_seq_len:
                n += 1
            else:
                start, n = restart(seq.shape[1])
    return seq


@pytest.mark.parametrize("num_latents", [1, 2, 4, NUM_LATENTS])
def test_restarted_window_leaves_room_for_the_latents_to_grow(num_latents):
    model = make_model()
    for length in (3, 14, 15, 16, 40, 100):
        start, n = model._window(length, num_latents)
        span = length - start
        if length >= MAX_SEQ_LEN - (NUM_LATENTS - num_latents):
            # full window: it grows to num_latents latents exactly at max_seq_len positions ...
            assert span + (NUM_LATENTS - num_latents) == MAX_SEQ_LEN and n == num_latents
            # ... and its first latent sees max_seq_len - config.num_latents + 1 tokens, as in training
            assert span - n + 1 == MAX_SEQ_LEN - NUM_LATENTS + 1
        else:
            assert start == 0 and n == min(num_latents, length)


@pytest.mark.parametrize("num_latents", [1, 3])
@pytest.mark.parametrize("use_cache", [True, False])
def test_generated_tokens_follow_the_documented_window_schedule(num_latents, use_cache):
    model = make_model()
    prompt = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    expected = reference_greedy(model, prompt, 45, num_latents)  # 54 tokens: several restarts past 20 positions
    got = model.generate(prompt, 45, num_latents=num_latents, temperature=0.0, use_cache=use_cache)
    assert torch.equal(got, expected)
    # the window matters: without the room the same model decodes other tokens (so the check above can fail)
    assert not torch.equal(reference_greedy(model, prompt, 45, num_latents, room=0), expected)
