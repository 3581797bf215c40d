"""Interleaved prompt processor: token/image layout, padding, media mask, errors."""

import pytest
import torch
from PIL import Image
from vlm_helpers import IMAGE_SIZE, build_model, random_images

from vlm import FlamingoProcessor, build_few_shot_prompt


@pytest.fixture(scope="module")
def parts():
    model, image_processor, tok = build_model("llama")
    return model, FlamingoProcessor(tok, image_processor), tok


def test_interleaved_layout_left_padding(parts):
    model, proc, tok = parts
    imgs = random_images(3)
    batch = [[imgs[0], "a cat<|endofchunk|>", imgs[1], "a dog"], ["one", imgs[2], "bird"]]
    out = proc(batch)
    assert out.vision_x.shape == (2, 2, 1, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert out.media_mask.tolist() == [[True, True], [True, False]]
    assert torch.equal(out.vision_x[0, 1, 0], imgs[1]) and torch.equal(out.vision_x[1, 0, 0], imgs[2])
    assert torch.equal(out.vision_x[1, 1], torch.zeros_like(out.vision_x[1, 1]))
    # left padding: the real tokens are right-aligned and equal the unpadded encoding
    for i, text in enumerate(["<image>a cat<|endofchunk|><image>a dog", "one<image>bird"]):
        ids = tok(text).input_ids
        assert out.input_ids[i, -len(ids) :].tolist() == ids
        assert out.attention_mask[i].tolist() == [0] * (out.input_ids.shape[1] - len(ids)) + [1] * len(ids)
    assert (out.input_ids[out.attention_mask == 0] == model.pad_token_id).all()
    right = proc(batch, padding_side="right")
    assert right.attention_mask[1, 0] == 1 and right.attention_mask[1, -1] == 0


def test_pil_images_and_video_tensors(parts):
    _, proc, _ = parts
    pil = Image.new("RGB", (48, 40), color=(10, 200, 30))
    out = proc([[pil, "a green square"]])
    torch.testing.assert_close(out.vision_x[0, 0, 0], proc.image_processor(pil))
    video = random_images(3)  # (F=3, C, H, W)
    assert proc([[video, "frames"]]).vision_x.shape == (1, 1, 3, 3, IMAGE_SIZE, IMAGE_SIZE)


def test_text_only_batch(parts):
    _, proc, _ = parts
    out = proc([["a photo of"], ["a dog"]])
    assert out.vision_x is None and out.media_mask is None and out.input_ids.shape[0] == 2


def test_processor_errors(parts):
    _, proc, tok = parts
    with pytest.raises(ValueError, match="pass images as items"):
        proc([["a <image> inside text"]])
    with pytest.raises(ValueError, match=r"\(C, H, W\) or \(F, C, H, W\)"):
        proc([[torch.zeros(2, 2), "x"]])
    with pytest.raises(ValueError, match="same \\(F, C, H, W\\) shape"):
        proc([[random_images(1)[0], "x", torch.zeros(3, 8, 8)]])
    with pytest.raises(ValueError, match="list of examples"):
        proc("just a string")
    with pytest.raises(ValueError, match="padding_side"):
        proc([["x"]], padding_side="middle")
    with pytest.raises(ValueError, match="no image_processor"):
        FlamingoProcessor(tok)([[Image.new("RGB", (8, 8)), "x"]])


def test_few_shot_prompt_format(parts):
    _, proc, tok = parts
    a, b, q = random_images(3)
    items = build_few_shot_prompt([(a, "a cat"), (b, "a dog")], q, prompt_prefix="Output:")
    texts = [x for x in items if isinstance(x, str)]
    assert "".join(t if isinstance(t, str) else "<image>" for t in items) == (
        "<image>Output:a cat<|endofchunk|><image>Output:a dog<|endofchunk|><image>Output:"
    )
    assert len(texts) == 3 and proc([items]).media_mask.sum() == 3
