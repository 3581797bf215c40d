"""torch.compile of the project's attention path: no graph breaks (fp32 and under bf16 autocast), same values as
eager, and the trainer's run.compile switch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from perceiver.resampler import PerceiverResampler
from vlm.cross_attention import GatedCrossAttentionBlock


def _resampler_case():
    torch.manual_seed(0)
    model = PerceiverResampler(num_channels=32, depth=2, num_latents=4, num_heads=2, head_channels=8,
                               max_num_media_tokens=6).eval()  # fmt: skip
    x = torch.randn(2, 3, 1, 6, 32)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    return model, (x, mask)


def _gated_case():
    torch.manual_seed(0)
    block = GatedCrossAttentionBlock(num_channels=24, num_media_channels=32, num_heads=2, head_channels=8).eval()
    with torch.no_grad():
        block.attn_gate.fill_(0.5)
        block.mlp_gate.fill_(0.5)
    x, media = torch.randn(2, 5, 24), torch.randn(2, 8, 32)
    mask = torch.rand(2, 1, 5, 8) > 0.3
    mask[0, 0, 1] = False  # a text token that sees no image
    return block, (x, media, mask)


def _first(out):
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("case", [_resampler_case, _gated_case], ids=["resampler", "gated-cross-attention"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_attention_path_compiles_without_graph_breaks(case, precision):
    module, args = case()
    ctx = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    with ctx:
        explanation = torch._dynamo.explain(module)(*args)
        assert explanation.graph_break_count == 0, explanation.break_reasons
        compiled = torch.compile(module, backend="aot_eager", fullgraph=True)
        out, ref = _first(compiled(*args)), _first(module(*args))
    tol = {"fp32": {}, "bf16": {"atol": 2e-2, "rtol": 2e-2}}[precision]
    assert_close(out, ref, **tol)


def test_compile_own_modules_is_in_place_and_keeps_parameter_names():
    from training.modeling import compile_own_modules

    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.perceiver, _ = _resampler_case()
            self.blocks = torch.nn.ModuleList([_gated_case()[0]])

        @property
        def gated_cross_attn_layers(self):
            return list(self.blocks)

    model = Holder()
    names = [n for n, _ in model.named_parameters()]
    assert compile_own_modules(model) == 2
    assert [n for n, _ in model.named_parameters()] == names
    assert model.perceiver._compiled_call_impl is not None and model.blocks[0]._compiled_call_impl is not None


@pytest.mark.slow
def test_training_with_run_compile_matches_eager(tmp_path):
    """run.compile=true (inductor) trains the same losses as eager, up to float reassociation."""
    from train_helpers import run_training, small_config

    losses = {}
    for flag in ("false", "true"):
        cfg = small_config(tmp_path / "cache", tmp_path / f"out-{flag}", "run.max_steps=3", f"run.compile={flag}",
                           "checkpoint.every_steps=0")  # fmt: skip
        result, trainer = run_training(cfg)
        losses[flag] = [r["loss"] for r in trainer_train_records(trainer)]
        if flag == "true":
            assert trainer.model.perceiver._compiled_call_impl is not None
    assert len(losses["true"]) == 3
    assert_close(torch.tensor(losses["true"]), torch.tensor(losses["false"]), atol=1e-3, rtol=1e-3)


def trainer_train_records(trainer):
    from training.metrics import read_records

    return [r for r in read_records(Path(trainer.config.run.output_dir) / "metrics.jsonl") if r.get("kind") == "train"]
