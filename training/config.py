"""Typed, self-validating configuration of the training job.

A config is a YAML (or JSON) file of sections -- ``run``, ``model``, ``data``, ``optim``, ``checkpoint``,
``logging``, ``eval`` -- plus ``key=value`` overrides on the command line (``optim.lr=3e-4``,
``model.tiny=null``, ``data.pairs.sources=[{shards: 'a/{000..009}.tar', weight: 2}]``; values are YAML).
Sections are pydantic models (:mod:`training.config_base`); an unknown key, a value of the wrong type or out of
range is a :class:`ConfigError` naming the dotted key, the value and what was expected, raised before any work.

One tree, not mirrors: the model section *is* ``vlm.FlamingoConfig``'s fields (same names, types and checks; only
the training defaults differ) plus the training-only ones; the streams are ``data_pipelines.LoaderConfig``'s
fields (less those the trainer sets: kind, seed, rank, ...) plus ``loss_weight``; their sources are
``data_pipelines.SourceConfig`` and ``data.synthetic`` is ``data_pipelines.SyntheticConfig`` itself.

The defaults *are* the embedded default run (``configs/default.yaml`` spells the same values out): the Flamingo
recipe on offline pretrained bases -- a frozen EfficientNet-Lite0 vision tower and a frozen SmolLM2-135M language
model (:mod:`vlm.bases`), only the resampler, the gated cross-attention layers and the new token rows training -- on
the generated scenes dataset. ``configs/tiny-random.yaml`` is the tiny, random-weights configuration the tests and
quick smoke runs use.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Optional

import yaml
from pydantic import (
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveInt,
    StrictBool,
    create_model,
    field_validator,
    model_validator,
)

from data_pipelines.binding import EpisodeConfig
from data_pipelines.loader import LoaderConfig, SourceConfig
from data_pipelines.synthetic import SyntheticConfig
from vlm.config import FlamingoConfig

from .config_base import ConfigError, Section, dataclass_fields, expected, invalid, library_error, merge

__all__ = ["ConfigError", "Section", "TrainConfig", "load_config"]

SYNTHETIC_PREFIX = "synthetic:"
SYNTHETIC_SPLITS = ("pairs", "documents", "val_pairs")
STREAMS = ("pairs", "documents", "episodes")
PROJECT_ROOT = Path(__file__).resolve().parent.parent

FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
Fraction = Annotated[float, Field(ge=0, lt=1)]

# ---------------------------------------------------------------------------------------------- run


class RunConfig(Section):
    """Where the run writes, how long it trains, on what.

    output_dir: checkpoints, exported model, metrics, config.yaml. device: "auto" (CUDA if available), "cpu" or
    "cuda" (an error on a machine without CUDA). precision: "fp32", "bf16" (DeepSpeed bf16: bf16 weights and
    activations, fp32 master weights and optimizer state) or "auto": bf16 where the device computes it natively
    (a CUDA GPU with bf16, a CPU with AMX or AVX-512 BF16), fp32 elsewhere; the run prints which it chose.
    num_threads: intra-op CPU threads per process (null: torch's default, all cores). deepspeed: a DeepSpeed JSON
    config holding the ZeRO settings (relative paths are looked up in the working directory, then in the project
    root). max_seconds: a time limit (wall-clock seconds of the training loop, rank 0's clock; null: none). When it
    is reached the run ends like a finished one -- held-out loss, checkpoint, export -- at the step it reached; the
    LR schedule still spans max_steps (it is cut short, not compressed). Starting the run again continues it.
    compile: ``torch.compile`` the resampler and the gated cross-attention blocks (training.modeling
    .compile_own_modules; the first steps then include the compilation).
    """

    output_dir: Annotated[str, Field(min_length=1)] = "outputs/default"
    seed: NonNegativeInt = 0
    max_steps: PositiveInt = 240
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    deepspeed: str = "configs/deepspeed/zero0.json"
    num_threads: Optional[PositiveInt] = None
    max_seconds: Optional[Annotated[float, Field(gt=0, allow_inf_nan=False)]] = None
    compile: StrictBool = False

    def deepspeed_path(self) -> Path:
        path = Path(self.deepspeed)
        if path.is_absolute() or path.exists():
            return path
        return PROJECT_ROOT / path


# ---------------------------------------------------------------------------------------------- model


class TinyBasesConfig(Section):
    """A tiny vision tower, language model and tokenizer built offline with random weights (no download).

    The vision tower is an open_clip ViT registered from a generated model config; the LM a Llama-style
    ``transformers`` model saved locally; the tokenizer a byte-level BPE trained on the synthetic captions.
    """

    image_size: PositiveInt = 64
    patch_size: PositiveInt = 8
    vision_width: PositiveInt = 64
    vision_layers: PositiveInt = 2
    vision_head_width: PositiveInt = 16
    lm_hidden_size: PositiveInt = 64
    lm_layers: PositiveInt = 2
    lm_heads: PositiveInt = 4
    lm_intermediate_size: PositiveInt = 128
    lm_max_positions: PositiveInt = 512
    vocab_size: Annotated[int, Field(ge=260)] = 320  # 256 byte tokens + specials + merges
    seed: NonNegativeInt = 0

    @model_validator(mode="after")
    def _divisors(self) -> TinyBasesConfig:
        for name, whole in (("patch_size", "image_size"), ("vision_head_width", "vision_width")):
            if getattr(self, whole) % getattr(self, name):
                raise expected(name, f"a divisor of {whole}={getattr(self, whole)}", getattr(self, name))
        if self.lm_hidden_size % self.lm_heads:
            raise expected("lm_heads", f"a divisor of lm_hidden_size={self.lm_hidden_size}", self.lm_heads)
        return self


# FlamingoConfig's fields that name the bases: null when model.tiny is set (the tiny bases fill them when built)
BASE_NAMES = ("clip_vision_encoder_path", "clip_vision_encoder_pretrained", "lang_encoder_path", "tokenizer_path")
# the training defaults where they differ from FlamingoConfig's (OpenFlamingo's): offline bases, a small resampler
MODEL_DEFAULTS: dict[str, Any] = {
    "clip_vision_encoder_path": "efficientnet-lite0",
    "clip_vision_encoder_pretrained": "imagenet",
    "lang_encoder_path": "smollm2-135m",
    "tokenizer_path": "smollm2-135m",
    "cross_attn_every_n_layers": 5,  # SmolLM2-135M has 30 layers: 6 gated cross-attention layers
    "resampler_depth": 2,
    "resampler_num_latents": 16,
    # learned positions of a frame's tokens: a CNN grid (EfficientNet-Lite0's 4 x 4 at 128 px) carries no position
    # information of its own, and without them the resampler sees a bag of features
    "max_num_media_tokens": 16,
    # the generated scenes are 64 px: the tower reads them at 128 px (a 4 x 4 grid) instead of 224 (7 x 7), a third
    # of the compute with the colour x shape classes as separable (linear probe 99.3% against 99.6%)
    "vision_image_size": 128,
    # the resampler and the cross-attention's media at 512 channels instead of the tower's 1280 (a learned projection)
    "resampler_channels": 512,
}
# the classes of the generated one-group scenes ("<colour> <shape>") the default job's binding episodes use; the
# other three (red triangle, green square, blue circle) appear only in the final binding table
DEFAULT_EPISODE_CLASSES = (
    "red circle", "red square", "green circle", "green triangle", "blue square", "blue triangle", "yellow circle",
    "yellow square", "yellow triangle", "purple circle", "purple square", "purple triangle",
)  # fmt: skip
_FlamingoFields = create_model(
    "_FlamingoFields",
    __base__=Section,
    __module__=__name__,
    **dataclass_fields(FlamingoConfig, defaults=MODEL_DEFAULTS, optional=BASE_NAMES),
)
FLAMINGO_FIELDS = tuple(_FlamingoFields.model_fields)


class ModelConfig(_FlamingoFields):
    """The Flamingo model: every field of :class:`vlm.FlamingoConfig` (see there; the training defaults are
    ``MODEL_DEFAULTS``), plus what only training needs.

    The bases are either ``tiny`` (built offline; the four base-naming fields are then null) or named:
    clip_vision_encoder_path / clip_vision_encoder_pretrained an open_clip model name and pretrained tag (or file),
    lang_encoder_path / tokenizer_path Hugging Face hub ids or local directories; named offline bases
    (``efficientnet-lite0``/``-lite2`` + ``imagenet``, ``smollm2-135m``; see vlm.bases) work everywhere.
    use_local_files: no hub downloads. freeze_lm (freeze_vision_encoder: FlamingoConfig's): keep the base weights
    frozen (as OpenFlamingo does); tiny random bases must train. activation_checkpointing: recompute the LM decoder
    layers, cross-attention blocks and resampler layers in the backward pass. gate_init: start value of the
    cross-attention tanh gates; null keeps the model's 0 (the blocks start as the identity, as OpenFlamingo does);
    slightly open gates let a frozen pretrained LM start reading the images, and from-scratch bases need wider ones
    (tiny-random: 0.5). match_lm_scale: size each cross-attention block's outputs to the frozen LM's hidden states
    at its depth (``training.modeling.match_lm_scale``: the output projections start, and learn, ``s`` times larger,
    ``s`` the LM's hidden-state RMS there; the model itself is a plain Flamingo), so that a new block's output is
    not lost in a residual stream of much larger scale. latents_init_std: standard deviation of the resampler's
    learned latents at init (null keeps the model's 1.0, as OpenFlamingo); small latents leave the image most of
    the resampled latents' variance. The measurements behind these defaults are in training/README.md and
    recipes/results/default/README.md.
    """

    tiny: Optional[TinyBasesConfig] = None
    use_local_files: StrictBool = False
    freeze_lm: StrictBool = True
    activation_checkpointing: StrictBool = False
    gate_init: Optional[float] = 0.1
    match_lm_scale: StrictBool = True
    latents_init_std: Optional[float] = 0.1

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if self.gate_init is not None and not -1 < self.gate_init < 1:
            raise expected("gate_init", "null or a number in (-1, 1)", self.gate_init)
        if self.latents_init_std is not None and not (
            math.isfinite(self.latents_init_std) and self.latents_init_std > 0
        ):
            raise expected("latents_init_std", "null or a positive number", self.latents_init_std)
        if self.tiny is not None:
            for name in BASE_NAMES:
                if getattr(self, name) is not None:
                    raise invalid(
                        name,
                        "must be null when model.tiny is set (the tiny bases are generated); set model.tiny=null to "
                        f"use named bases, got {getattr(self, name)!r}",
                    )
        else:
            for name in ("clip_vision_encoder_path", "lang_encoder_path", "tokenizer_path"):
                if not getattr(self, name):
                    raise expected(name, "a model name or path (required when model.tiny is null)", getattr(self, name))
        try:  # FlamingoConfig's own checks (sizes >= 1, ...), before any work
            self.flamingo_config(dict.fromkeys(BASE_NAMES, "tiny") if self.tiny is not None else None)
        except ValueError as e:
            raise library_error(e) from None
        return self

    def flamingo_config(self, bases: Optional[Mapping[str, Optional[str]]] = None) -> FlamingoConfig:
        """The model's :class:`vlm.FlamingoConfig`; with ``tiny`` bases, ``bases`` (``TinyBases.names()``) fills the
        four base-naming fields."""
        values = {name: getattr(self, name) for name in FLAMINGO_FIELDS}
        if self.tiny is not None:
            if bases is None:
                raise ValueError("model.tiny is set: pass the built tiny bases' names (training.tiny_bases)")
            values.update({name: bases[name] for name in BASE_NAMES})
        return FlamingoConfig(**values)


# ---------------------------------------------------------------------------------------------- data


def synthetic_split(shards: Any) -> Optional[str]:
    """``"synthetic:pairs"`` -> ``"pairs"``; None for real shards."""
    if isinstance(shards, str) and shards.startswith(SYNTHETIC_PREFIX):
        return shards[len(SYNTHETIC_PREFIX) :]
    return None


class _LoaderOptions:
    """A stream section's LoaderConfig fields, and the LoaderConfig they make with what the trainer sets."""

    LOADER_FIELDS: ClassVar[tuple[str, ...]] = ()

    def loader_options(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.LOADER_FIELDS}

    def loader_config(self, sources: Any, **owned: Any) -> LoaderConfig:
        return LoaderConfig(sources=sources, **{**self.loader_options(), **owned})


# LoaderConfig's fields the trainer sets: a training stream is infinite, seeded by run.seed, split over the ranks
TRAINER_LOADER_FIELDS = ("sources", "kind", "seed", "infinite", "rank", "world_size", "return_metadata")
_StreamFields = create_model(
    "_StreamFields",
    __base__=Section,
    __module__=__name__,
    sources=(Annotated[list[SourceConfig], Field(min_length=1)], ...),
    **dataclass_fields(LoaderConfig, exclude=TRAINER_LOADER_FIELDS),
)


class StreamConfig(_StreamFields, _LoaderOptions):
    """One training stream (image-text pairs, interleaved documents or binding episodes): weighted sources mixed
    into batches.

    Every field but ``loss_weight`` is a :class:`data_pipelines.LoaderConfig` field (see there: batch_size per rank
    and micro-step, max_length, max_images / min_images, shuffle / resample, num_workers, caption_prefix,
    max_consecutive_skips, ...). sources: a shard spec, or a list of shard specs and
    ``{shards, weight, name}`` mappings (:class:`data_pipelines.SourceConfig`), one source each; ``synthetic:<split>``
    reads the generated dataset. loss_weight multiplies this stream's loss (OpenFlamingo's loss_multiplier_*).
    episodes (the episodes stream only): how binding episodes are drawn from its labelled sources
    (:class:`data_pipelines.binding.EpisodeConfig`: ways, shots, queries, real_names, task_induction, template,
    classes, word pool).
    """

    LOADER_FIELDS: ClassVar[tuple[str, ...]] = tuple(_StreamFields.model_fields)[1:]
    loss_weight: NonNegativeFloat = 1.0

    @field_validator("sources", mode="before")
    @classmethod
    def _one_source_per_item(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [value]
        if isinstance(value, (list, tuple)):
            return [{"shards": v} if isinstance(v, str) else v for v in value]
        return value


# LoaderConfig's fields the evaluation protocol sets: the held-out pairs in written order, their first caption
EVAL_LOADER_FIELDS = (
    *TRAINER_LOADER_FIELDS,
    *("shuffle", "resample", "caption_choice", "max_images", "min_images", "group_by_length", "episodes"),
)
_EvalStreamFields = create_model(
    "_EvalStreamFields",
    __base__=Section,
    __module__=__name__,
    shards=(Annotated[str, Field(min_length=1)], "synthetic:val_pairs"),
    **dataclass_fields(LoaderConfig, exclude=EVAL_LOADER_FIELDS, defaults={"batch_size": 16}),
)


class EvalStreamConfig(_EvalStreamFields, _LoaderOptions):
    """Held-out image-text pairs (one shard spec) for the evaluation hook and the final few-shot demonstration.

    The other fields are :class:`data_pipelines.LoaderConfig`'s (caption_prefix: as in the pairs stream, also the
    prompt prefix of the few-shot captions).
    """

    LOADER_FIELDS: ClassVar[tuple[str, ...]] = tuple(_EvalStreamFields.model_fields)[1:]


class DataConfig(Section):
    """Training streams (each optional, at least one), held-out pairs, and the generated dataset.

    pairs: image-text pairs; documents: interleaved documents; episodes: binding episodes composed on the fly from
    labelled pairs (class-tree shards, or ``synthetic:pairs`` whose one-group scenes are "<colour> <shape>"
    classes), off by default.

    A source written ``synthetic:<split>`` (pairs, documents, val_pairs) reads the dataset generated from
    ``synthetic`` (:class:`data_pipelines.SyntheticConfig`) into ``cache_dir`` (generated only once).
    """

    pairs: Optional[StreamConfig] = Field(
        default_factory=lambda: StreamConfig(sources="synthetic:pairs", batch_size=16, max_length=32)
    )
    documents: Optional[StreamConfig] = Field(
        default_factory=lambda: StreamConfig(sources="synthetic:documents", batch_size=4, max_length=96, max_images=4)
    )
    episodes: Optional[StreamConfig] = Field(
        default_factory=lambda: StreamConfig(
            sources="synthetic:pairs",
            batch_size=4,
            max_length=112,
            max_images=8,
            min_images=3,
            episodes=EpisodeConfig(
                ways=(2, 5), shots=(1, 3), queries=(1, 2), loss_on="answers", classes=DEFAULT_EPISODE_CLASSES
            ),
        )
    )
    val: Optional[EvalStreamConfig] = Field(default_factory=EvalStreamConfig)
    synthetic: Optional[SyntheticConfig] = Field(
        default_factory=lambda: SyntheticConfig(num_docs=600, num_val_pairs=96)
    )
    cache_dir: str = "outputs/cache"

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        if self.pairs is None and self.documents is None and self.episodes is None:
            raise invalid("", "at least one of data.pairs, data.documents and data.episodes must be set")
        sizes = {"pairs": 1, "documents": 1, "val_pairs": 1}
        if self.synthetic is not None:
            sizes = {"pairs": 1, "documents": self.synthetic.num_docs, "val_pairs": self.synthetic.num_val_pairs}
        for key, shards in self.shard_specs():
            split = synthetic_split(shards)
            if split is None:
                continue
            if split not in SYNTHETIC_SPLITS:
                raise expected(key, f"'synthetic:' followed by one of {SYNTHETIC_SPLITS}", shards)
            if self.synthetic is None:
                raise invalid(key, f"{shards!r} needs data.synthetic (it is null)")
            if sizes[split] == 0:
                field = "num_docs" if split == "documents" else "num_val_pairs"
                raise invalid(key, f"{shards!r} needs data.synthetic.{field} > 0")
        for name in STREAMS:  # LoaderConfig's own checks, before any work
            stream = getattr(self, name)
            if stream is not None:
                try:
                    stream.loader_config(stream.sources, kind=name, infinite=True)
                except (TypeError, ValueError) as e:
                    raise library_error(e, name) from None
        if self.val is not None:
            try:
                self.val.loader_config(self.val.shards, kind="pairs", infinite=True)
            except (TypeError, ValueError) as e:
                raise library_error(e, "val") from None
        return self

    def shard_specs(self) -> list[tuple[str, Any]]:
        """(key relative to data, shard spec) of every source, held-out pairs included."""
        specs = [
            (f"{name}.sources[{i}].shards", s.shards)
            for name in STREAMS
            if getattr(self, name) is not None
            for i, s in enumerate(getattr(self, name).sources)
        ]
        if self.val is not None:
            specs.append(("val.shards", self.val.shards))
        return specs

    def uses_synthetic(self) -> bool:
        return any(synthetic_split(shards) is not None for _, shards in self.shard_specs())

    def held_out_size(self) -> Optional[int]:
        """Samples of the held-out set where the config alone says (the generated one); None otherwise."""
        if self.val is None or synthetic_split(self.val.shards) != "val_pairs" or self.synthetic is None:
            return None
        return self.synthetic.num_val_pairs


# ---------------------------------------------------------------------------------------------- loop


class OptimConfig(Section):
    """AdamW on the trainable parameters; weight decay only on the gated cross-attention layers (OpenFlamingo).

    schedule: linear warmup over ``warmup_steps`` (the LR reaches ``lr`` at step warmup_steps + 1, so fewer than
    run.max_steps), then "cosine" (to ``min_lr_ratio * lr``), "linear" (to 0) or "constant". grad_clip: global
    gradient-norm clipping (0 disables). grad_accum_steps: micro-batches per optimizer step.
    max_consecutive_nonfinite: abort after this many skipped steps in a row.
    """

    lr: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 1e-3
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: NonNegativeInt = 20
    min_lr_ratio: Annotated[float, Field(ge=0, le=1)] = 0.05
    weight_decay: Annotated[FiniteFloat, Field(ge=0)] = 0.1
    beta1: Fraction = 0.9
    beta2: Fraction = 0.999
    eps: Annotated[FiniteFloat, Field(ge=0)] = 1e-8
    grad_clip: Annotated[FiniteFloat, Field(ge=0)] = 1.0
    grad_accum_steps: PositiveInt = 1
    max_consecutive_nonfinite: PositiveInt = 5


class CheckpointConfig(Section):
    """DeepSpeed checkpoints every ``every_steps`` optimizer steps (0: only at the end) and at the end.

    dir / export_dir default to ``<output_dir>/checkpoints`` and ``<output_dir>/export``. resume: "auto" (the
    latest checkpoint in dir, if any), "never" (an error if dir already holds checkpoints), or a checkpoint
    path. stop_at_step: save and stop at that step (a planned interruption; resume later with the same config).
    """

    every_steps: NonNegativeInt = 100
    keep_last: PositiveInt = 2
    dir: Optional[str] = None
    export_dir: Optional[str] = None
    resume: Annotated[str, Field(min_length=1)] = "auto"
    stop_at_step: Optional[PositiveInt] = None
    export: StrictBool = True


class LoggingConfig(Section):
    """Progress bar (rank 0), ``metrics.jsonl`` (one record per step), TensorBoard, loss curve PNG at the end.

    log_every: steps between progress-bar postfix updates / console lines when the bar is off.
    """

    log_every: PositiveInt = 10
    progress_bar: StrictBool = True
    tensorboard: StrictBool = True
    loss_curve: StrictBool = True


class EvalConfig(Section):
    """Periodic evaluation (held-out loss on ``batches`` batches, with ``ablated_loss`` also with every image
    replaced by a constant one -- the gap is what the images are worth -- with ``shuffled_loss`` also with each
    sample's images taken from another sample of its batch -- the gap is what the images say about their own text,
    without the constant image's penalty for being out of distribution -- and a few generations) and the final few-shot
    demonstration: ``final_queries`` held-out images captioned after ``num_shots`` demonstrations, scored, and with
    ``final_ablation`` scored again with every image replaced by a constant one (what the text alone gives).

    final_binding: after the captions, the model is shown held-out one-group scenes as binding episodes with words
    of the evaluation pool ("This is a dax.") and names the query scene (:mod:`vlm.eval.binding`): open-ended
    accuracy for ``binding_ways`` x ``binding_shots`` on ``binding_episodes`` episodes each, with the image-ablated
    control and the prototype reference, split by whether the query's class was among the training episodes'
    classes. Needs ``data.synthetic`` (the scenes)."""

    every_steps: NonNegativeInt = 100
    batches: NonNegativeInt = 2
    ablated_loss: StrictBool = True
    shuffled_loss: StrictBool = True
    num_generations: NonNegativeInt = 2
    num_shots: NonNegativeInt = 2
    max_new_tokens: PositiveInt = 32
    final_few_shot: StrictBool = True
    final_queries: NonNegativeInt = 64
    final_ablation: StrictBool = True
    final_binding: StrictBool = True
    binding_ways: list[Annotated[int, Field(ge=2, le=15)]] = Field(default_factory=lambda: [2, 5], min_length=1)
    binding_shots: list[NonNegativeInt] = Field(default_factory=lambda: [0, 1, 3], min_length=1)
    binding_episodes: PositiveInt = 50

    def uses_held_out(self) -> bool:
        return self.final_few_shot or bool(self.every_steps and (self.batches or self.num_generations))

    def uses_demonstrations(self) -> bool:
        """Whether few-shot prompts are built (final demo or periodic generations) with num_shots > 0."""
        final = self.final_few_shot and self.final_queries > 0
        periodic = self.every_steps > 0 and self.num_generations > 0
        return self.num_shots > 0 and (final or periodic)


class TrainConfig(Section):
    """The whole job. ``TrainConfig()`` is the embedded default (``configs/default.yaml``)."""

    run: RunConfig = Field(default_factory=RunConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @model_validator(mode="after")
    def _cross_checks(self) -> TrainConfig:
        run, optim, ev = self.run, self.optim, self.eval
        if self.checkpoint.stop_at_step is not None and self.checkpoint.stop_at_step > run.max_steps:
            raise expected("checkpoint.stop_at_step", f"<= run.max_steps={run.max_steps}", self.checkpoint.stop_at_step)
        if optim.warmup_steps >= run.max_steps:
            raise invalid(
                "optim.warmup_steps",
                f"expected < run.max_steps={run.max_steps} (the warmup reaches optim.lr={optim.lr:g} at step "
                f"warmup_steps + 1, so the peak learning rate would never be used), got {optim.warmup_steps}",
            )
        if ev.uses_held_out() and self.data.val is None:
            raise invalid("eval", "evaluation and the final few-shot demo need data.val (it is null)")
        if ev.shuffled_loss and ev.every_steps and ev.batches and self.data.val is not None:
            if self.data.val.batch_size < 2:
                raise expected(
                    "data.val.batch_size",
                    ">= 2 with eval.shuffled_loss (each held-out sample takes the images of another in its batch)",
                    self.data.val.batch_size,
                )
        if ev.final_binding and self.data.synthetic is None:
            raise invalid(
                "eval.final_binding",
                "the final binding table reads held-out generated scenes: it needs data.synthetic (it is null); "
                "set eval.final_binding=false or evaluate with python -m vlm.eval binding",
            )
        held_out = self.data.held_out_size()
        if ev.uses_demonstrations() and held_out is not None and ev.num_shots >= held_out:
            raise invalid(
                "eval.num_shots",
                f"expected < data.synthetic.num_val_pairs={held_out} (the demonstrations and the queries are "
                f"drawn from the held-out set; more would repeat them), got {ev.num_shots}",
            )
        return self

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
    """The config file (or the embedded default when ``path`` is None) with ``key=value`` overrides applied; keys
    not given keep their defaults (a partial section too)."""
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
    return TrainConfig.from_dict(merge(TrainConfig().to_dict(), data))
