"""Loading the evaluated model: a ``Flamingo.save_pretrained`` export or an OpenFlamingo checkpoint,
with an identity (source, config, weights digest) recorded in the results."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional, Union

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def file_digest(path: Union[str, os.PathLike], chunk: int = 16 << 20) -> str:
    """sha256 of the whole file up to 256 MiB; beyond, of its size and its first and last ``chunk`` bytes."""
    path = Path(path)
    size = path.stat().st_size
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if size <= 256 << 20:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
            return h.hexdigest()
        h.update(str(size).encode())
        h.update(f.read(chunk))
        f.seek(size - chunk)
        h.update(f.read(chunk))
    return "partial:" + h.hexdigest()


def load_model(
    model_dir: Optional[Union[str, os.PathLike]] = None,
    openflamingo_checkpoint: Optional[Union[str, os.PathLike]] = None,
    clip_vision_encoder_path: Optional[str] = None,
    clip_vision_encoder_pretrained: Optional[str] = None,
    lang_encoder_path: Optional[str] = None,
    tokenizer_path: Optional[str] = None,
    cross_attn_every_n_layers: int = 1,
    clip_configs: Sequence[Union[str, os.PathLike]] = (),
    device: str = "cpu",
    dtype: str = "float32",
    allow_missing_output_rows: bool = False,
    **config_kwargs: Any,
):
    """``(model, identity)``. ``model_dir``: an export (its bundled open_clip configs in
    ``DIR/bases/open_clip`` are registered first); otherwise the OpenFlamingo route: the
    :func:`vlm.create_model_and_transforms` arguments plus ``openflamingo_checkpoint``."""
    import open_clip

    from ..factory import create_model_and_transforms
    from ..model import CONFIG_NAME, WEIGHTS_NAME, Flamingo
    from ..openflamingo import load_openflamingo_checkpoint

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if (model_dir is None) == (openflamingo_checkpoint is None):
        raise ValueError("give exactly one of model_dir (an export) and openflamingo_checkpoint")
    for path in clip_configs:
        open_clip.add_model_config(path)
    if model_dir is not None:
        model_dir = Path(model_dir)
        model = Flamingo.from_pretrained(model_dir, **config_kwargs)  # registers DIR/bases/open_clip itself
        identity = {
            "source": "export",
            "path": str(model_dir.resolve()),
            "config": json.loads((model_dir / CONFIG_NAME).read_text()),
            "weights_digest": file_digest(model_dir / WEIGHTS_NAME),
        }
    else:
        missing = [
            n
            for n, v in (
                ("clip_vision_encoder_path", clip_vision_encoder_path),
                ("lang_encoder_path", lang_encoder_path),
                ("tokenizer_path", tokenizer_path),
            )
            if v is None
        ]
        if missing:
            raise ValueError(f"an OpenFlamingo checkpoint also needs {', '.join(missing)}")
        model, _, _ = create_model_and_transforms(
            clip_vision_encoder_path,
            clip_vision_encoder_pretrained,
            lang_encoder_path,
            tokenizer_path,
            cross_attn_every_n_layers=cross_attn_every_n_layers,
            **config_kwargs,
        )
        load_openflamingo_checkpoint(
            model, openflamingo_checkpoint, allow_missing_output_rows=allow_missing_output_rows
        )
        identity = {
            "source": "openflamingo",
            "checkpoint": str(Path(openflamingo_checkpoint).resolve()),
            "checkpoint_digest": file_digest(openflamingo_checkpoint),
            "config": model.config.to_dict(),
        }
    model = model.to(device=device, dtype=DTYPES[dtype]).eval()
    check_finite_outputs(model)
    identity.update(device=str(device), dtype=dtype)
    return model, identity


def check_finite_outputs(model) -> None:
    """One forward pass on a grey image and a short prompt; a model whose logits hold NaN/Inf gets no score (its
    generations would be empty text, scored as a valid 0)."""
    import torch
    from PIL import Image

    from ..processor import FlamingoProcessor

    if model.tokenizer is None or model.image_processor is None:
        return
    processor = FlamingoProcessor(model.tokenizer, model.image_processor)
    grey = Image.new("RGB", (32, 32), (128, 128, 128))
    inputs = processor([[grey, "Output: a photo"]]).to(next(model.parameters()).device)
    vision_x = inputs.vision_x.to(next(model.parameters()).dtype)
    with torch.no_grad():
        logits = model(
            vision_x, inputs.input_ids, attention_mask=inputs.attention_mask, media_mask=inputs.media_mask
        ).logits
    finite = torch.isfinite(logits)
    if not bool(finite.all()):
        raise ValueError(
            f"the model's logits are not finite ({int((~finite).sum())} of {finite.numel()} NaN/Inf on a grey image "
            "and '<image>Output: a photo'): refusing to evaluate a model whose scores would mean nothing"
        )
