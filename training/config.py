"""Typed, self-validating configuration of the training job.

A config is a YAML (or JSON) file of sections -- ``run``, ``model``, ``data``, ``optim``, ``checkpoint``,
``logging``, ``eval`` -- plus ``key=value`` overrides on the command line (``optim.lr=3e-4``,
``model.tiny=null``, ``data.pairs.sources=[{shards: 'a/{000..009}.tar', weight: 2}]``; values are YAML).
Every section is a dataclass that checks the type of each field and its range in ``__post_init__``
(:mod:`training.typed_config`); an unknown key or a value of the wrong type is an error naming the dotted key,
raised before any work.

The defaults of the dataclasses *are* the embedded default run (``configs/default.yaml`` spells the same values
out): the Flamingo recipe on offline pretrained bases -- a frozen EfficientNet-Lite0 vision tower and a frozen
SmolLM2-135M language model (:mod:`vlm.bases`), only the resampler, the gated cross-attention layers and the new
token rows training -- on the generated scenes dataset. ``configs/tiny-random.yaml`` is the tiny, random-weights
configuration the tests and quick smoke runs use.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from .typed_config import ConfigError, Section, from_dict

__all__ = ["ConfigError", "Section", "TrainConfig", "from_dict", "load_config"]

SYNTHETIC_PREFIX = "synthetic:"
SYNTHETIC_SPLITS = ("pairs", "documents", "val_pairs")
PROJECT_ROOT = Path(__file__).resolve().parent.parent

# ---------------------------------------------------------------------------------------------- sections


@dataclass
class RunConfig(Section):
    """Where the run writes, how long it trains, on what.

    output_dir: checkpoints, exported model, metrics, config.yaml. device: "auto" (CUDA if available), "cpu" or
    "cuda" (an error on a machine without CUDA). precision: "fp32", "bf16" (DeepSpeed bf16: bf16 weights and
    activations, fp32 master weights and optimizer state) or "auto": bf16 where the device computes it natively
    (a CUDA GPU with bf16, a CPU with AMX or AVX-512 BF16), fp32 elsewhere; the run prints which it chose.
    num_threads: intra-op CPU threads per process (null: torch's default, all cores). deepspeed: a DeepSpeed JSON config holding the ZeRO
    settings (relative paths are looked up in the working directory, then in the project root).
    max_seconds: a time limit (wall-clock seconds of the training loop, rank 0's clock; null: none). When it is
    reached the run ends like a finished one -- held-out loss, checkpoint, export -- at the step it reached; the
    LR schedule still spans max_steps (it is cut short, not compressed). Starting the run again continues it.
    """

    output_dir: str = "outputs/default"
    seed: int = 0
    max_steps: int = 300
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    deepspeed: str = "configs/deepspeed/zero0.json"
    num_threads: Optional[int] = None
    max_seconds: Optional[float] = None

    def validate(self) -> None:
        self._at_least(1, "max_steps", "num_threads")
        if self.max_seconds is not None and not (math.isfinite(self.max_seconds) and self.max_seconds > 0):
            self._fail("max_seconds", "null or a finite number of seconds > 0")
        self._at_least(0, "seed")
        if not self.output_dir:
            self._fail("output_dir", "a directory path")

    def deepspeed_path(self) -> Path:
        path = Path(self.deepspeed)
        if path.is_absolute() or path.exists():
            return path
        return PROJECT_ROOT / path


@dataclass
class TinyBasesConfig(Section):
    """A tiny vision tower, language model and tokenizer built offline with random weights (no download).

    The vision tower is an open_clip ViT registered from a generated model config; the LM a Llama-style
    ``transformers`` model saved locally; the tokenizer a byte-level BPE trained on the synthetic captions.
    """

    image_size: int = 64
    patch_size: int = 8
    vision_width: int = 64
    vision_layers: int = 2
    vision_head_width: int = 16
    lm_hidden_size: int = 64
    lm_layers: int = 2
    lm_heads: int = 4
    lm_intermediate_size: int = 128
    lm_max_positions: int = 512
    vocab_size: int = 320
    seed: int = 0

    def validate(self) -> None:
        self._at_least(1, *(f.name for f in fields(self) if f.name != "seed"))
        self._at_least(0, "seed")
        if self.image_size % self.patch_size:
            self._fail("patch_size", f"a divisor of image_size={self.image_size}")
        if self.vision_width % self.vision_head_width:
            self._fail("vision_head_width", f"a divisor of vision_width={self.vision_width}")
        if self.lm_hidden_size % self.lm_heads:
            self._fail("lm_heads", f"a divisor of lm_hidden_size={self.lm_hidden_size}")
        if self.vocab_size < 260:
            self._fail("vocab_size", ">= 260 (256 byte tokens + specials + merges)")


@dataclass
class ModelConfig(Section):
    """The Flamingo model: either ``tiny`` bases (built offline) or named pretrained bases, plus the added parts.

    clip_vision_encoder_path / clip_vision_encoder_pretrained: open_clip model name and pretrained tag (or file);
    lang_encoder_path / tokenizer_path: Hugging Face hub ids or local directories. Named offline bases
    (``efficientnet-lite0``/``-lite2`` + ``imagenet``, ``smollm2-135m``; see vlm.bases) work everywhere these do.
    freeze_vision / freeze_lm: keep the base weights frozen (as OpenFlamingo does); tiny random bases must train.
    activation_checkpointing: recompute the LM decoder layers, cross-attention blocks and resampler layers in the
    backward pass. gate_init: start value of the cross-attention tanh gates; null keeps the model's 0 (the blocks
    start as the identity, right for a pretrained LM). From-scratch bases need open gates: with a random LM and
    vision tower, gates at 0 get no consistent gradient and the visual pathway never starts to learn.
    """

    tiny: Optional[TinyBasesConfig] = None
    clip_vision_encoder_path: Optional[str] = "efficientnet-lite0"
    clip_vision_encoder_pretrained: Optional[str] = "imagenet"
    lang_encoder_path: Optional[str] = "smollm2-135m"
    tokenizer_path: Optional[str] = "smollm2-135m"
    use_local_files: bool = False
    cross_attn_every_n_layers: int = 5
    decoder_layers_attr_name: Optional[str] = None
    resampler_depth: int = 2
    resampler_num_latents: int = 16
    resampler_num_heads: int = 8
    resampler_head_channels: int = 64
    cross_attn_num_heads: int = 8
    cross_attn_head_channels: int = 64
    freeze_vision: bool = True
    freeze_lm: bool = True
    freeze_lm_embeddings: bool = False
    activation_checkpointing: bool = False
    gate_init: Optional[float] = None

    def validate(self) -> None:
        if self.gate_init is not None and not (-1 < self.gate_init < 1):
            self._fail("gate_init", "null or a number in (-1, 1)")
        self._at_least(
            1,
            "cross_attn_every_n_layers",
            "resampler_depth",
            "resampler_num_latents",
            "resampler_num_heads",
            "resampler_head_channels",
            "cross_attn_num_heads",
            "cross_attn_head_channels",
        )
        named = ("clip_vision_encoder_path", "lang_encoder_path", "tokenizer_path")
        if self.tiny is not None:
            given = [n for n in (*named, "clip_vision_encoder_pretrained") if getattr(self, n) is not None]
            if given:
                raise ConfigError(
                    f"ModelConfig.{given[0]}: must be null when model.tiny is set (the tiny bases are generated); "
                    f"set model.tiny=null to use named bases, got {getattr(self, given[0])!r}"
                )
        else:
            for name in named:
                if not getattr(self, name):
                    self._fail(name, "a model name or path (required when model.tiny is null)")

    def flamingo_kwargs(self) -> dict[str, Any]:
        """Sizes of the added parts, as ``vlm.create_model_and_transforms`` keyword arguments."""
        return {
            "cross_attn_every_n_layers": self.cross_attn_every_n_layers,
            "decoder_layers_attr_name": self.decoder_layers_attr_name,
            "freeze_lm_embeddings": self.freeze_lm_embeddings,
            "resampler_depth": self.resampler_depth,
            "resampler_num_latents": self.resampler_num_latents,
            "resampler_num_heads": self.resampler_num_heads,
            "resampler_head_channels": self.resampler_head_channels,
            "cross_attn_num_heads": self.cross_attn_num_heads,
            "cross_attn_head_channels": self.cross_attn_head_channels,
            "freeze_vision_encoder": self.freeze_vision,
        }


@dataclass
class SourceSpec(Section):
    """One weighted source: shard path / directory / glob / brace pattern (or a list), or ``synthetic:<split>``."""

    shards: Union[str, list[str]]
    weight: float = 1.0
    name: str = ""

    def validate(self) -> None:
        if isinstance(self.shards, list) and not self.shards or self.shards == "":
            self._fail("shards", "a shard path or pattern")
        if not (math.isfinite(self.weight) and self.weight > 0):
            self._fail("weight", "a finite number > 0")
        specs = self.shards if isinstance(self.shards, list) else [self.shards]
        for spec in specs:
            if spec.startswith(SYNTHETIC_PREFIX):
                if spec[len(SYNTHETIC_PREFIX) :] not in SYNTHETIC_SPLITS:
                    self._fail("shards", f"'synthetic:' followed by one of {SYNTHETIC_SPLITS}")
                if len(specs) > 1:
                    self._fail("shards", "a synthetic split on its own, not in a list with other shards")

    @property
    def synthetic_split(self) -> Optional[str]:
        if isinstance(self.shards, str) and self.shards.startswith(SYNTHETIC_PREFIX):
            return self.shards[len(SYNTHETIC_PREFIX) :]
        return None


@dataclass
class StreamConfig(Section):
    """One training stream (image-text pairs or interleaved documents): weighted sources mixed into batches.

    batch_size is per rank and micro-step. loss_weight multiplies this stream's loss (OpenFlamingo's
    loss_multiplier_*). max_length: token limit (None: 32 for pairs, 256 for documents). max_images / min_images:
    images per document. shuffle / resample: the loader's order (see data_pipelines.loader). caption_prefix
    (pairs only): text before every caption, ``<image>{caption_prefix}{caption}<|endofchunk|>`` -- "Output:" gives
    the captioning prompt of ``vlm.eval``.
    """

    sources: Union[str, list[Union[SourceSpec, str]]]
    batch_size: int = 16
    loss_weight: float = 1.0
    max_length: Optional[int] = None
    max_images: int = 5
    min_images: int = 1
    shuffle: Literal["samples", "shards", "none"] = "samples"
    resample: bool = False
    caption_prefix: str = ""

    def validate(self) -> None:
        if isinstance(self.sources, str):
            self.sources = [self.sources]
        self.sources = [SourceSpec(s) if isinstance(s, str) else s for s in self.sources]
        if not self.sources:
            self._fail("sources", "at least one source")
        self._at_least(1, "batch_size", "max_images", "min_images")
        self._at_least(4, "max_length")
        self._at_least(0, "loss_weight")
        if self.min_images > self.max_images:
            self._fail("min_images", f"<= max_images={self.max_images}")


@dataclass
class EvalStreamConfig(Section):
    """Held-out image-text pairs for the evaluation hook and the final few-shot demonstration (caption_prefix: as in
    the pairs stream, for the held-out loss)."""

    shards: str = "synthetic:val_pairs"
    batch_size: int = 16
    max_length: Optional[int] = None
    caption_prefix: str = ""

    def validate(self) -> None:
        SourceSpec(self.shards)  # same shard-spec checks
        self._at_least(1, "batch_size")
        self._at_least(4, "max_length")


@dataclass
class SyntheticDataConfig(Section):
    """Parameters of the generated dataset (data_pipelines.synthetic), written once into ``data.cache_dir``."""

    num_pairs: int = 2000
    num_docs: int = 600
    num_val_pairs: int = 64
    seed: int = 0
    image_size: int = 64
    max_count: int = 3
    max_doc_images: int = 4

    def validate(self) -> None:
        self._at_least(0, "num_pairs", "num_docs", "num_val_pairs", "seed")
        self._at_least(24, "image_size")
        if not 1 <= self.max_count <= 4:
            self._fail("max_count", "an int in [1, 4]")
        self._at_least(2, "max_doc_images")


@dataclass
class DataConfig(Section):
    """Training streams (each optional, at least one), held-out pairs, and the generated dataset.

    A source written ``synthetic:<split>`` (pairs, documents, val_pairs) reads the dataset generated from
    ``synthetic`` into ``cache_dir`` (generated only once). num_workers: DataLoader worker processes per rank.
    """

    pairs: Optional[StreamConfig] = field(
        default_factory=lambda: StreamConfig("synthetic:pairs", batch_size=16, max_length=32)
    )
    documents: Optional[StreamConfig] = field(
        default_factory=lambda: StreamConfig("synthetic:documents", batch_size=4, max_length=96, max_images=4)
    )
    val: Optional[EvalStreamConfig] = field(default_factory=EvalStreamConfig)
    synthetic: Optional[SyntheticDataConfig] = field(default_factory=SyntheticDataConfig)
    cache_dir: str = "outputs/cache"
    num_workers: int = 0

    def validate(self) -> None:
        if self.pairs is None and self.documents is None:
            raise ConfigError("DataConfig: at least one of data.pairs and data.documents must be set")
        self._at_least(0, "num_workers")
        if self.documents is not None and self.documents.caption_prefix:
            raise ConfigError(
                "DataConfig: data.documents.caption_prefix applies to pairs only (a document's text is its own); "
                f"got {self.documents.caption_prefix!r}"
            )
        for spec in self.all_source_specs():
            split = spec.synthetic_split
            if split is not None and self.synthetic is None:
                raise ConfigError(f"DataConfig: source {spec.shards!r} needs data.synthetic (it is null)")
            if split == "documents" and self.synthetic is not None and self.synthetic.num_docs == 0:
                raise ConfigError("DataConfig: source 'synthetic:documents' needs data.synthetic.num_docs > 0")
            if split == "val_pairs" and self.synthetic is not None and self.synthetic.num_val_pairs == 0:
                raise ConfigError("DataConfig: source 'synthetic:val_pairs' needs data.synthetic.num_val_pairs > 0")

    def all_source_specs(self) -> list[SourceSpec]:
        specs = [s for stream in (self.pairs, self.documents) if stream is not None for s in stream.sources]
        if self.val is not None:
            specs.append(SourceSpec(self.val.shards))
        return specs

    def uses_synthetic(self) -> bool:
        return any(s.synthetic_split is not None for s in self.all_source_specs())


@dataclass
class OptimConfig(Section):
    """AdamW on the trainable parameters; weight decay only on the gated cross-attention layers (OpenFlamingo).

    schedule: linear warmup over ``warmup_steps``, then "cosine" (to ``min_lr_ratio * lr``), "linear" (to 0)
    or "constant". grad_clip: global gradient-norm clipping (0 disables). grad_accum_steps: micro-batches per
    optimizer step. max_consecutive_nonfinite: abort after this many skipped steps in a row.
    """

    lr: float = 2e-3
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 20
    min_lr_ratio: float = 0.05
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    grad_clip: float = 1.0
    grad_accum_steps: int = 1
    max_consecutive_nonfinite: int = 5

    def validate(self) -> None:
        if not (math.isfinite(self.lr) and self.lr > 0):
            self._fail("lr", "a finite number > 0")
        self._at_least(0, "warmup_steps", "weight_decay", "grad_clip", "eps")
        self._at_least(1, "grad_accum_steps", "max_consecutive_nonfinite")
        for name in ("beta1", "beta2", "min_lr_ratio"):
            if not 0 <= getattr(self, name) < 1 + (name == "min_lr_ratio"):
                self._fail(name, "a number in [0, 1)" if name != "min_lr_ratio" else "a number in [0, 1]")


@dataclass
class CheckpointConfig(Section):
    """DeepSpeed checkpoints every ``every_steps`` optimizer steps (0: only at the end) and at the end.

    dir / export_dir default to ``<output_dir>/checkpoints`` and ``<output_dir>/export``. resume: "auto" (the
    latest checkpoint in dir, if any), "never" (an error if dir already holds checkpoints), or a checkpoint
    path. stop_at_step: save and stop at that step (a planned interruption; resume later with the same config).
    """

    every_steps: int = 100
    keep_last: int = 2
    dir: Optional[str] = None
    export_dir: Optional[str] = None
    resume: str = "auto"
    stop_at_step: Optional[int] = None
    export: bool = True

    def validate(self) -> None:
        self._at_least(0, "every_steps")
        self._at_least(1, "keep_last", "stop_at_step")
        if not self.resume:
            self._fail("resume", "'auto', 'never' or a checkpoint path")


@dataclass
class LoggingConfig(Section):
    """Progress bar (rank 0), ``metrics.jsonl`` (one record per step), TensorBoard, loss curve PNG at the end.

    log_every: steps between progress-bar postfix updates / console lines when the bar is off.
    """

    log_every: int = 10
    progress_bar: bool = True
    tensorboard: bool = True
    loss_curve: bool = True

    def validate(self) -> None:
        self._at_least(1, "log_every")


@dataclass
class EvalConfig(Section):
    """Periodic evaluation (held-out loss on ``batches`` batches and a few generations) and the final few-shot
    demonstration: ``final_queries`` held-out images captioned after ``num_shots`` demonstrations, scored, and with
    ``final_ablation`` scored again with every image replaced by a constant one (what the text alone gives)."""

    every_steps: int = 100
    batches: int = 2
    num_generations: int = 2
    num_shots: int = 2
    max_new_tokens: int = 32
    final_few_shot: bool = True
    final_queries: int = 64
    final_ablation: bool = True

    def validate(self) -> None:
        self._at_least(0, "every_steps", "batches", "num_generations", "num_shots", "final_queries")
        self._at_least(1, "max_new_tokens")


@dataclass
class TrainConfig(Section):
    """The whole job. ``TrainConfig()`` is the embedded default (``configs/default.yaml``)."""

    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self) -> None:
        if self.checkpoint.stop_at_step is not None and self.checkpoint.stop_at_step > self.run.max_steps:
            raise ConfigError(
                f"checkpoint.stop_at_step: expected <= run.max_steps={self.run.max_steps}, "
                f"got {self.checkpoint.stop_at_step}"
            )
        if self.eval.final_few_shot or (self.eval.every_steps and (self.eval.batches or self.eval.num_generations)):
            if self.data.val is None:
                raise ConfigError("eval: evaluation and the final few-shot demo need data.val (it is null)")

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.checkpoint.dir or Path(self.run.output_dir) / "checkpoints")

    @property
    def export_dir(self) -> Path:
        return Path(self.checkpoint.export_dir or Path(self.run.output_dir) / "export")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ---------------------------------------------------------------------------------------------- loading


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"optim.lr=3e-4"`` -> (["optim", "lr"], "3e-4" parsed as YAML)."""
    key, sep, raw = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: expected key=value with a dotted key, e.g. optim.lr=3e-4")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({e})") from None
    return key.split("."), value


def apply_override(data: dict, path: list[str], value: Any) -> None:
    """Set ``data[path[0]]...[path[-1]] = value``, creating intermediate mappings."""
    node = data
    for i, part in enumerate(path[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise ConfigError(f"override {'.'.join(path)}: {'.'.join(path[: i + 1])} is {child!r}, not a mapping")
        node = child
    node[path[-1]] = value


def load_config(path: Optional[str | Path] = None, overrides: list[str] = ()) -> TrainConfig:
    """The config file (or the embedded default when ``path`` is None) with ``key=value`` overrides applied."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} not found")
        text = path.read_text()
        try:
            data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        except (json.JSONDecodeError, yaml.YAMLError) as e:
            raise ConfigError(
                f"config file {str(path)!r} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {e}"
            ) from None
        data = {} if data is None else data
        if not isinstance(data, dict):
            raise ConfigError(f"config file {str(path)!r}: expected a mapping of sections, got {type(data).__name__}")
    for text in overrides:
        key, value = parse_override(text)
        apply_override(data, key, value)
    return from_dict(TrainConfig, data)
