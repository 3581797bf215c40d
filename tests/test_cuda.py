"""CUDA checks: the same modules on the GPU agree with the CPU, bf16 works, and the training job runs with nccl.

Skipped on machines without CUDA (the CPU suite covers the logic); run them on a GPU machine with
``python -m pytest tests/test_cuda.py``.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch.testing import assert_close

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_attention_on_cuda_matches_cpu_with_masks_and_empty_rows():
    from perceiver import MultiHeadAttention

    torch.manual_seed(0)
    mha = MultiHeadAttention(4, 32, 24, qk_channels=64, out_bias=False).eval()  # empty rows stay exactly 0
    q, kv = torch.randn(3, 7, 32), torch.randn(3, 11, 24)
    mask = torch.rand(3, 7, 11) > 0.4
    mask[0, 2] = False  # a query that sees nothing: zeros, not NaN
    expected = mha(q, kv, mask)
    got = mha.cuda()(q.cuda(), kv.cuda(), mask.cuda()).cpu()
    assert torch.isfinite(got).all() and got[0, 2].abs().max() == 0
    assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_encoder_forward_backward_on_cuda_and_bf16_autocast():
    from perceiver import EncoderConfig, PerceiverEncoder

    torch.manual_seed(0)
    enc = PerceiverEncoder(EncoderConfig(num_input_channels=16, num_latents=32, num_latent_channels=64))
    x = torch.randn(2, 500, 16)
    out = enc(x)
    grads = torch.autograd.grad(out.square().mean(), list(enc.parameters()))
    enc = enc.cuda()
    out_cuda = enc(x.cuda())
    grads_cuda = torch.autograd.grad(out_cuda.square().mean(), list(enc.parameters()))
    assert_close(out_cuda.cpu(), out, atol=1e-4, rtol=1e-4)
    for a, b in zip(grads_cuda, grads):
        assert_close(a.cpu(), b, atol=1e-4, rtol=1e-3)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        low = enc(x.cuda())
    assert torch.isfinite(low).all()
    assert_close(low.float().cpu(), out, atol=0.1, rtol=0.05)


def test_flamingo_on_cuda_matches_cpu_and_cached_generation_is_exact():
    from vlm_helpers import build_model, random_images, set_gates

    model, _, tok = build_model("llama")
    set_gates(model, 1.0)
    enc = tok(["<image>a photo of a cat<|endofchunk|><image>a"], return_tensors="pt")
    vision_x = random_images(1, 2, 1, seed=1)
    with torch.no_grad():
        expected = model(vision_x, enc.input_ids, attention_mask=enc.attention_mask).logits
        model = model.cuda()
        args = (vision_x.cuda(), enc.input_ids.cuda())
        got = model(*args, attention_mask=enc.attention_mask.cuda()).logits
        assert_close(got.cpu(), expected, atol=1e-4, rtol=1e-4)
        cached = model.generate(*args, attention_mask=enc.attention_mask.cuda(), max_new_tokens=8, min_new_tokens=8)
        uncached = model.generate(
            *args, attention_mask=enc.attention_mask.cuda(), max_new_tokens=8, min_new_tokens=8, use_cache=False
        )
    assert torch.equal(cached, uncached)


@pytest.mark.slow
def test_training_job_runs_on_cuda_in_bf16(tmp_path):
    from train_helpers import ROOT, small_args

    from training.metrics import train_losses

    out = tmp_path / "run"
    args = small_args(tmp_path / "cache", out, "run.device=cuda", "run.precision=bf16", "run.max_steps=20")
    env = dict(os.environ, DS_ACCELERATOR="cuda", PYTHONPATH=str(ROOT))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run(
        [sys.executable, "training/train.py", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    losses = train_losses(out / "metrics.jsonl")
    assert sorted(losses) == list(range(1, 21))
    first, last = sum(losses[s] for s in range(1, 6)) / 5, sum(losses[s] for s in range(16, 21)) / 5
    assert last < first, (first, last)
