"""Every open_clip vision tower (VisionTransformer, ModifiedResNet, TimmModel) gives its final feature grid as
tokens (N, v, D), and a Flamingo builds and runs on each."""

from __future__ import annotations

import json

import open_clip
import pytest
import torch
from vlm_helpers import SMALL_KWARGS, set_gates, tiny_assets

import vlm
from vlm.vision import ClipVisionEncoder

TIMM_TOWERS = {  # small open_clip models with timm trunks, random weights (no download)
    "tiny-timm-effnet-vision-test": {"timm_model_name": "tf_efficientnet_lite0", "image_size": 64},
    "tiny-timm-vit-vision-test": {"timm_model_name": "vit_tiny_patch16_224", "image_size": 224},
}


@pytest.fixture(scope="module")
def timm_towers(tmp_path_factory):
    directory = tmp_path_factory.mktemp("timm_configs")
    for name, vision in TIMM_TOWERS.items():
        config = {
            "embed_dim": 32,
            "vision_cfg": {**vision, "timm_model_pretrained": False, "timm_pool": "avg", "timm_proj": "linear"},
            "text_cfg": {"context_length": 8, "vocab_size": 16, "width": 16, "heads": 1, "layers": 1},
        }
        (directory / f"{name}.json").write_text(json.dumps(config))
    open_clip.add_model_config(directory)
    return list(TIMM_TOWERS)


def random_images(n: int, size: int) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))


def test_vit_tokens_equal_the_patch_tokens_openflamingo_reads():
    a = tiny_assets()
    model = open_clip.create_model(a["clip"], pretrained=a["clip_ckpt"]).eval()
    encoder = ClipVisionEncoder(model.visual)
    images = random_images(3, 32)
    ours = encoder(images)
    model.visual.output_tokens = True  # open_clip's own patch-token output, what this encoder returned before
    _, reference = model.visual(images)
    assert ours.shape == (3, 16, 32) and encoder.num_channels == 32
    torch.testing.assert_close(ours, reference, rtol=0, atol=0)


def test_rn50_tower_and_flamingo():
    a = tiny_assets()
    torch.manual_seed(0)
    model, preprocess, tokenizer = vlm.create_model_and_transforms(
        clip_vision_encoder_path="RN50",
        clip_vision_encoder_pretrained=None,
        lang_encoder_path=a["llama"],
        tokenizer_path=a["tokenizer"],
        **SMALL_KWARGS,
    )
    model.eval()
    visual = model.vision_encoder.visual
    assert type(visual).__name__ == "ModifiedResNet" and model.vision_encoder.num_channels == 2048
    images = random_images(2, 224)
    tokens = model.vision_encoder(images)
    # the layer4 grid (before CLIP's attention pooling): 2048 x 7 x 7 at 224 px
    grid = visual.layer4(visual.layer3(visual.layer2(visual.layer1(visual.stem(images)))))
    torch.testing.assert_close(tokens, grid.flatten(2).transpose(1, 2))
    _run_flamingo(model, tokenizer, images)


@pytest.mark.parametrize("name", list(TIMM_TOWERS))
def test_timm_towers_and_flamingo(timm_towers, name):
    a = tiny_assets()
    torch.manual_seed(0)
    model, _, tokenizer = vlm.create_model_and_transforms(name, None, a["llama"], a["tokenizer"], **SMALL_KWARGS)
    model.eval()
    trunk = model.vision_encoder.visual.trunk
    images = random_images(2, TIMM_TOWERS[name]["image_size"])
    tokens = model.vision_encoder(images)
    features = trunk.forward_features(images)  # timm's final features, before pooling and head
    if features.dim() == 4:  # a CNN: the grid after the head conv (1280 channels for EfficientNet-Lite0)
        expected = features.flatten(2).transpose(1, 2)
        assert tokens.shape == (2, 4, 1280)
    else:  # a ViT: patch tokens without the class token
        expected = features[:, trunk.num_prefix_tokens :]
        assert tokens.shape == (2, 196, 192)
    torch.testing.assert_close(tokens, expected)
    assert model.vision_encoder.num_channels == tokens.shape[-1]
    _run_flamingo(model, tokenizer, images)


def _run_flamingo(model, tokenizer, images):
    ids = tokenizer(["<image>a cat<|endofchunk|>", "<image>a dog<|endofchunk|>"], return_tensors="pt", padding=True)
    ids = ids.input_ids
    set_gates(model, 0.5)  # closed gates pass no gradient to the resampler
    out = model(images[:, None, None], ids, labels=ids)
    assert out.logits.shape[:2] == ids.shape and torch.isfinite(out.loss)
    out.loss.backward()  # gradients reach the resampler through the frozen tower's features
    assert model.perceiver.latents.grad is not None and model.perceiver.latents.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.vision_encoder.parameters())


def test_frozen_tower_keeps_batch_norm_statistics():
    encoder, _ = vlm.create_vision_encoder("efficientnet-lite0", None)
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    encoder.train()  # a frozen tower stays in eval mode: batch norm neither uses nor updates batch statistics
    encoder(random_images(2, 224))
    assert all(torch.equal(before[k], v) for k, v in encoder.state_dict().items())


def test_not_an_open_clip_tower():
    with pytest.raises(ValueError, match="Linear"):
        ClipVisionEncoder(torch.nn.Linear(2, 2))


def test_convolutional_towers_read_channels_last(timm_towers):
    """CNN towers get channels-last images (faster oneDNN convolutions) and give the same tokens; ViTs do not."""
    a = tiny_assets()
    vit = ClipVisionEncoder(open_clip.create_model(a["clip"], pretrained=a["clip_ckpt"]).visual)
    effnet = ClipVisionEncoder(open_clip.create_model("tiny-timm-effnet-vision-test").visual)
    rn50 = ClipVisionEncoder(open_clip.create_model("RN50").visual)
    assert not vit.channels_last and effnet.channels_last and rn50.channels_last
    seen = []
    conv = effnet.visual.trunk.conv_stem
    handle = conv.register_forward_pre_hook(
        lambda m, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last))
    )
    images = random_images(2, 64)
    tokens = effnet(images)
    handle.remove()
    assert seen == [True]
    effnet.channels_last = False
    torch.testing.assert_close(tokens, effnet(images), rtol=1e-4, atol=1e-5)
