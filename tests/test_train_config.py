"""Training configuration: presets, validation errors, overrides, DeepSpeed JSON, optimizer groups, schedule,
and the checks that fail before any work (bad key, missing shards, CUDA on a CPU machine)."""

from __future__ import annotations

import collections.abc
import contextlib
import json
import math
import types
from pathlib import Path

import pytest
import torch

from training.config import PROJECT_ROOT, ConfigError, TrainConfig, load_config
from training.engine import build_deepspeed_config, load_deepspeed_json, zero_stage
from training.optim import build_optimizer, build_scheduler, lr_multiplier, parameter_groups

CONFIGS = sorted((PROJECT_ROOT / "configs").glob("*.yaml"))
TINY_RANDOM = PROJECT_ROOT / "configs" / "tiny-random.yaml"
DS_CONFIGS = sorted((PROJECT_ROOT / "configs" / "deepspeed").glob("*.json"))


def test_presets_exist():
    names = {p.name for p in CONFIGS}
    assert {
        "default.yaml",
        "tiny-random.yaml",
        "openflamingo-3b.yaml",
        "openflamingo-4b.yaml",
        "openflamingo-9b.yaml",
    } <= names
    assert {p.name for p in DS_CONFIGS} == {f"zero{i}.json" for i in range(4)}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_preset_validates(path):
    config = load_config(path)
    assert isinstance(config, TrainConfig)
    ds = load_deepspeed_json(config.run.deepspeed_path())  # the named ZeRO file exists and is valid
    full = build_deepspeed_config(config, ds)
    assert full["gradient_accumulation_steps"] == config.optim.grad_accum_steps
    assert full["bf16"]["enabled"] == (config.run.precision == "bf16")


def test_default_preset_is_the_embedded_default():
    assert load_config(PROJECT_ROOT / "configs" / "default.yaml") == TrainConfig() == load_config(None)
    model = TrainConfig().model
    # the Flamingo recipe on offline pretrained bases: both frozen, gates start slightly open, token positions
    assert model.tiny is None and model.freeze_vision_encoder and model.freeze_lm and model.gate_init == 0.1
    assert model.vision_image_size == 128 and model.max_num_media_tokens == 16  # EfficientNet-Lite0's 4 x 4 grid
    # captions and binding episodes of the generated scenes, three colour x shape classes held out of the episodes
    data = TrainConfig().data
    assert data.documents is not None and data.episodes.episodes.loss_on == "answers"
    assert len(data.episodes.episodes.classes) == 12 and TrainConfig().eval.final_binding
    assert (model.clip_vision_encoder_path, model.clip_vision_encoder_pretrained) == ("efficientnet-lite0", "imagenet")
    assert model.lang_encoder_path == model.tokenizer_path == "smollm2-135m"
    assert TrainConfig().run.precision == "auto"


def _dotted_keys(tree: dict, prefix: str = "") -> set:
    keys = set()
    for k, v in tree.items():
        keys.add(prefix + k)
        if isinstance(v, dict):
            keys |= _dotted_keys(v, f"{prefix}{k}.")
    return keys


def test_default_preset_spells_out_every_key():
    """configs/default.yaml is where users read the defaults: every key of TrainConfig is written there."""
    import yaml

    written = _dotted_keys(yaml.safe_load((PROJECT_ROOT / "configs" / "default.yaml").read_text()))
    missing = _dotted_keys(TrainConfig().to_dict()) - written
    assert not missing, f"configs/default.yaml lacks {sorted(missing)}"


def test_tiny_random_preset_is_the_former_default():
    c = load_config(TINY_RANDOM)
    assert c.model.tiny is not None and not c.model.freeze_vision_encoder and not c.model.freeze_lm
    assert c.model.gate_init == 0.5 and c.model.cross_attn_every_n_layers == 1
    assert (c.model.resampler_depth, c.model.resampler_num_latents, c.model.resampler_head_channels) == (2, 8, 16)
    assert (c.run.precision, c.run.num_threads, c.run.output_dir) == ("fp32", 1, "outputs/tiny")
    assert (c.eval.final_queries, c.eval.final_ablation) == (6, False)
    assert c.optim.lr == 2e-3 and c.run.max_steps == 300


@pytest.mark.parametrize(
    "name, lm, every, stage",
    [
        ("3b", "anas-awadalla/mpt-1b-redpajama-200b", 1, 2),
        ("4b", "togethercomputer/RedPajama-INCITE-Base-3B-v1", 2, 2),
        ("9b", "anas-awadalla/mpt-7b", 4, 3),
    ],
)
def test_openflamingo_presets(name, lm, every, stage):
    c = load_config(PROJECT_ROOT / "configs" / f"openflamingo-{name}.yaml")
    assert (c.model.clip_vision_encoder_path, c.model.clip_vision_encoder_pretrained) == ("ViT-L-14", "openai")
    assert c.model.lang_encoder_path == c.model.tokenizer_path == lm
    assert c.model.cross_attn_every_n_layers == every
    assert c.model.tiny is None and c.model.freeze_vision_encoder and c.model.freeze_lm
    assert (c.model.resampler_depth, c.model.resampler_num_latents, c.model.cross_attn_num_heads) == (6, 64, 8)
    assert c.optim.lr == 1e-4 and c.optim.weight_decay == 0.1 and c.optim.schedule == "constant"
    assert zero_stage(load_deepspeed_json(c.run.deepspeed_path())) == stage


def test_ds_stage_files():
    for i in range(4):
        assert zero_stage(load_deepspeed_json(PROJECT_ROOT / "configs" / "deepspeed" / f"zero{i}.json")) == i


def test_overrides_are_typed_yaml():
    c = load_config(TINY_RANDOM, ["optim.lr=3e-4", "run.max_steps=77", "model.tiny.lm_layers=3", "data.documents=null"])
    assert c.optim.lr == pytest.approx(3e-4) and isinstance(c.optim.lr, float)
    assert c.run.max_steps == 77 and c.model.tiny.lm_layers == 3 and c.data.documents is None
    # a partial section keeps the other defaults of that section
    assert c.model.tiny.lm_hidden_size == load_config(TINY_RANDOM).model.tiny.lm_hidden_size
    c = load_config(None, ["data.pairs.sources=[{shards: 'a/{000..009}.tar', weight: 2}, b.tar]"])
    assert [s.weight for s in c.data.pairs.sources] == [2.0, 1.0]
    assert c.data.pairs.sources[1].shards == "b.tar"


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["optim.lrr=1"], "optim.lrr"),
        (["optimizer.lr=1"], "optimizer"),
        (["optim.lr=fast"], "optim.lr"),
        (["run.max_steps=2.5"], "run.max_steps"),
        (["run.device=tpu"], "run.device"),
        (["logging.progress_bar=maybe"], "logging.progress_bar"),
        (["data.pairs.sources=[{shards: a.tar, wieght: 2}]"], "wieght"),
        (["run.max_steps=0"], "max_steps"),
        (["optim.lr=-1"], "lr"),
        (["model.tiny=null"], "clip_vision_encoder_path"),
        (["model.lang_encoder_path=gpt2"], "lang_encoder_path"),
        (["data.pairs=null", "data.documents=null"], "at least one"),
        (["data.synthetic=null"], "data.synthetic"),
        (["data.pairs.sources=synthetic:nope"], "synthetic"),
        (["checkpoint.stop_at_step=500"], "stop_at_step"),
        (["optim.lr"], "key=value"),
    ],
)
def test_bad_config_names_the_key(overrides, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(TINY_RANDOM, overrides)
    assert fragment in str(err.value)


def test_bad_config_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 1e-3\n  betas: [0.9, 0.95]\n")
    with pytest.raises(ConfigError, match="optim.betas"):
        load_config(path)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    path.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(path)


def test_direct_construction_is_checked():
    from training.config import OptimConfig

    with pytest.raises(ConfigError, match="OptimConfig.lr"):
        OptimConfig(lr="fast")
    assert OptimConfig(lr=1).lr == 1.0 and isinstance(OptimConfig(lr=1).lr, float)


def test_deepspeed_json_may_not_set_owned_keys(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2}, "gradient_clipping": 5.0}))
    with pytest.raises(ConfigError, match="gradient_clipping.*optim.grad_clip"):
        load_deepspeed_json(path)
    path.write_text(json.dumps({"zero_optimization": {"stage": 4}}))
    with pytest.raises(ConfigError, match="stage"):
        load_deepspeed_json(path)


def _cli(tmp_path, *args: str):
    from training.train import main

    return main([f"run.output_dir={tmp_path / 'out'}", f"data.cache_dir={tmp_path / 'cache'}", *args])


def test_cli_errors_before_any_work(tmp_path, capsys):
    """A bad key, a missing shard and CUDA on a CPU machine stop the job with exit code 2 and a message naming
    the problem, before any directory, cache, model or data is made."""
    assert _cli(tmp_path, "optim.lrr=1") == 2
    assert "optim.lrr" in capsys.readouterr().err
    missing = tmp_path / "nowhere" / "shard-{000000..000003}.tar"
    assert _cli(tmp_path, f"data.pairs.sources=[{{shards: '{missing}'}}]") == 2
    err = capsys.readouterr().err
    assert "data.pairs.sources[0].shards" in err and "matched no file" in err
    assert _cli(tmp_path, "run.deepspeed=configs/deepspeed/zero9.json") == 2
    assert "zero9.json" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert _cli(tmp_path, "run.device=cuda") == 2
        assert "CUDA" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


def test_cli_rejects_stray_arguments(tmp_path, capsys):
    assert _cli(tmp_path, "--lr", "3") == 2
    assert "--lr" in capsys.readouterr().err


def test_lr_schedule():
    from training.config import OptimConfig

    cfg = OptimConfig(lr=1.0, warmup_steps=4, schedule="cosine", min_lr_ratio=0.1)
    f = lr_multiplier(cfg, total_steps=14)
    assert [round(f(s), 6) for s in range(4)] == [0.2, 0.4, 0.6, 0.8]  # linear warmup
    assert f(4) == pytest.approx(1.0) and f(14) == pytest.approx(0.1) and f(100) == pytest.approx(0.1)
    assert f(9) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_multiplier(OptimConfig(warmup_steps=0, schedule="constant"), 10)(7) == 1.0
    assert lr_multiplier(OptimConfig(warmup_steps=0, schedule="linear"), 10)(5) == pytest.approx(0.5)


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny-cache")


@pytest.mark.parametrize("frozen", [True, False], ids=["frozen-backbones", "trainable-backbones"])
def test_optimizer_gets_only_trainable_params_and_decay_only_on_cross_attention(tiny_cache, frozen):
    from training.config import ModelConfig
    from training.modeling import build_model, resolve_bases

    cfg = ModelConfig(freeze_vision_encoder=frozen, freeze_lm=frozen, gate_init=None, freeze_lm_embeddings=False)
    bases, _ = resolve_bases(cfg, tiny_cache)
    model, _, _ = build_model(cfg, bases, seed=0)
    groups = parameter_groups(model, weight_decay=0.1, lr=1e-3)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    undecayed = {names[id(p)] for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert decayed | undecayed == trainable and not decayed & undecayed
    if frozen:  # as OpenFlamingo: resampler, cross-attention, new token rows
        assert trainable == set(model.added_parameter_names())
    else:
        assert trainable == {n for n, _ in model.named_parameters()}
    assert decayed and all("gated_cross_attn" in n for n in decayed)
    # OpenFlamingo's apply_decay: the cross-attention weights, not their gates, LayerNorms or biases
    assert all(n.endswith(".weight") and "norm" not in n for n in decayed)
    xattn_undecayed = {n for n in undecayed if "gated_cross_attn" in n}
    assert xattn_undecayed and all(n.endswith(("_gate", ".bias")) or "norm" in n for n in xattn_undecayed)
    assert {n.rsplit(".", 1)[-1] for n in xattn_undecayed} >= {"attn_gate", "mlp_gate", "weight", "bias"}
    assert any(n.startswith("perceiver.") for n in undecayed)  # the resampler trains, without decay
    assert all(float(b.attn_gate.detach()) == 0.0 for b in model.gated_cross_attn_layers)  # gate_init=None: 0
    opt = build_optimizer(model, TrainConfig().optim)
    sched = build_scheduler(opt, TrainConfig().optim, total_steps=100)
    assert opt.param_groups[0]["lr"] == pytest.approx(TrainConfig().optim.lr / (TrainConfig().optim.warmup_steps + 1))
    assert sched.get_last_lr()[0] == opt.param_groups[0]["lr"]


def test_skipped_optimizer_step_changes_nothing():
    from training.config import OptimConfig

    p = torch.nn.Parameter(torch.ones(3))
    opt = build_optimizer(torch.nn.ModuleDict({"gated_cross_attn": torch.nn.Linear(3, 3)}), OptimConfig())
    opt.add_param_group({"params": [p], "weight_decay": 0.1})
    p.grad = torch.full((3,), float("nan"))
    opt.skip_next_step = True
    opt.step()
    assert torch.equal(p.detach(), torch.ones(3)) and not opt.state[p]
    opt.skip_next_step = False
    p.grad = torch.ones(3)
    opt.step()
    assert (p.detach() < 1).all() and int(opt.state[p]["step"]) == 1


def test_tiny_bases_are_deterministic_and_loadable(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from training.config import TinyBasesConfig
    from training.tiny_bases import ensure_tiny_bases

    cfg = TinyBasesConfig(vision_layers=1, lm_layers=1, lm_hidden_size=32, lm_heads=2, lm_intermediate_size=32)
    a = ensure_tiny_bases(cfg, tmp_path / "a")
    b = ensure_tiny_bases(cfg, tmp_path / "b")
    tok = AutoTokenizer.from_pretrained(a.tokenizer_path)
    caption = "two blue squares on the right and a red circle at the top."
    assert tok.decode(tok(caption)["input_ids"]) == caption
    assert len(tok(caption)["input_ids"]) <= 20  # words of the captions are (mostly) single tokens
    assert tok.get_vocab() == AutoTokenizer.from_pretrained(b.tokenizer_path).get_vocab()
    lm_a = AutoModelForCausalLM.from_pretrained(a.lang_encoder_path)
    lm_b = AutoModelForCausalLM.from_pretrained(b.lang_encoder_path)
    for (n, pa), (_, pb) in zip(lm_a.named_parameters(), lm_b.named_parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0, msg=n)
    assert json.loads((Path(a.clip_config_dir) / f"{a.clip_name}.json").read_text())["vision_cfg"]["layers"] == 1


# ---------------------------------------------------------------------------------------------- one tree


def _other_value(f, default):
    """A valid value of FlamingoConfig field ``f`` that is not its training default."""
    if isinstance(default, bool):
        return not default
    if isinstance(default, int):
        return default + 1
    if f.name in ("max_num_media", "max_num_frames", "max_num_media_tokens", "resampler_channels", "vision_image_size"):
        return 3
    return f"custom-{f.name}"  # names, paths, decoder_layers_attr_name


def _flamingo_fields():
    import dataclasses

    from vlm.config import FlamingoConfig

    return dataclasses.fields(FlamingoConfig)


@pytest.mark.parametrize("f", _flamingo_fields(), ids=lambda f: f.name)
def test_every_flamingo_field_is_settable_from_yaml_and_overrides(tmp_path, f):
    """Each field of vlm.FlamingoConfig is a model key of the same name, from a YAML file and from key=value, and
    reaches the FlamingoConfig the model is built from."""
    import yaml

    default = getattr(TrainConfig().model, f.name)
    value = _other_value(f, default)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"model": {f.name: value}}))
    from_file = load_config(path)
    from_override = load_config(None, [f"model.{f.name}={yaml.safe_dump(value).strip().removesuffix('...').strip()}"])
    assert from_file == from_override
    assert getattr(from_file.model.flamingo_config(), f.name) == value != default


def test_architecture_fields_reach_the_built_model(tiny_cache):
    """Fields the training config could not set before reach the model: the MLP widths follow the widening factors,
    and the attention span / media limits are the model's."""
    from training.modeling import build_model, resolve_bases

    config = load_config(
        TINY_RANDOM,
        [
            "model.resampler_widening_factor=2",
            "model.cross_attn_widening_factor=3",
            "model.only_attend_immediate_media=false",
            "model.max_num_media=3",
            "model.max_num_frames=2",
        ],
    )
    flamingo, _ = resolve_bases(config.model, tiny_cache)
    model, _, _ = build_model(config.model, flamingo, seed=0)
    width = config.model.tiny.vision_width
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    assert shapes["perceiver.layers.0.mlp.0.weight"] == (2 * width, width)  # resampler MLP: x2
    lm_width = config.model.tiny.lm_hidden_size
    cross = [s for n, s in shapes.items() if n.endswith("gated_cross_attn_layer.mlp.0.weight")]
    assert cross and all(s == (3 * lm_width, lm_width) for s in cross)  # cross-attention MLP: x3
    assert model.config.only_attend_immediate_media is False
    assert (model.config.max_num_media, model.config.max_num_frames) == (3, 2)


def test_every_loader_option_is_settable_per_stream():
    """The streams are data_pipelines.LoaderConfig's fields (less those the trainer sets), each reaching the
    LoaderConfig of the stream; data.synthetic is data_pipelines.SyntheticConfig."""
    import dataclasses

    from data_pipelines import LoaderConfig, SyntheticConfig
    from training.config import TRAINER_LOADER_FIELDS

    c = load_config(
        None,
        [
            "data.pairs.max_consecutive_skips=7",
            "data.episodes.num_workers=2",
            "data.episodes.prefetch_factor=3",
            "data.pairs.padding=max_length",
            "data.val.max_consecutive_skips=9",
            "data.synthetic.samples_per_shard=50",
        ],
    )
    owned = set(TRAINER_LOADER_FIELDS) | {"source_configs"}
    assert {f.name for f in dataclasses.fields(LoaderConfig)} - owned == set(c.data.pairs.LOADER_FIELDS)
    pairs = c.data.pairs.loader_config(c.data.pairs.sources, kind="pairs", infinite=True)
    assert (pairs.max_consecutive_skips, pairs.padding, pairs.batch_size, pairs.max_length) == (7, "max_length", 16, 32)
    episodes = c.data.episodes.loader_config(c.data.episodes.sources, kind="episodes", infinite=True)
    assert (episodes.num_workers, episodes.prefetch_factor, episodes.max_images) == (2, 3, 8)
    assert c.data.val.loader_config(c.data.val.shards, kind="pairs").max_consecutive_skips == 9
    assert isinstance(c.data.synthetic, SyntheticConfig) and c.data.synthetic.samples_per_shard == 50


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_written_config_loads_back_the_same(tmp_path, path):
    config = load_config(path)
    written = tmp_path / "config.yaml"
    written.write_text(config.to_yaml())  # what a run writes into its output directory
    assert load_config(written) == config


# ---------------------------------------------------------------------------------------------- errors


def _error(*overrides: str, path=TINY_RANDOM) -> str:
    with pytest.raises(ConfigError) as err:
        load_config(path, list(overrides))
    return str(err.value)


def test_error_messages_name_key_value_and_expectation():
    message = _error("data.pairs.max_consecutive_skip=5")  # unknown key (a LoaderConfig field, misspelt)
    assert message.startswith("unknown config key data.pairs.max_consecutive_skip;")
    assert "'max_consecutive_skips'" in message  # the known keys of that section are listed
    assert _error("optim.lr=fast") == (
        "optim.lr: expected a valid number (unable to parse string as a number), got 'fast'"
    )
    assert _error("model.freeze_lm=1") == "model.freeze_lm: expected a valid boolean, got 1"
    assert _error("run.device=tpu") == "run.device: expected 'auto', 'cpu' or 'cuda', got 'tpu'"
    assert _error("run.max_steps=0") == "run.max_steps: expected greater than 0, got 0"
    assert _error("optim.beta2=1.5") == "optim.beta2: expected less than 1, got 1.5"
    # ranges the libraries check themselves, reported under the training config's key
    assert (
        _error("model.resampler_widening_factor=0") == "model.resampler_widening_factor: must be a positive int, got 0"
    )
    assert _error("data.synthetic.max_count=7") == "data.synthetic.max_count: must be an int in [1, 4], got 7"
    assert _error("data.pairs.sources=[{shards: a.tar, weight: -1}]") == (
        "data.pairs.sources[0].weight: must be a finite number > 0, got -1.0"
    )
    assert _error("data.documents.max_consecutive_skips=0") == (
        "data.documents.max_consecutive_skips: must be an int >= 1, got 0"
    )
    assert _error("model.freeze_vision=false").startswith("unknown config key model.freeze_vision;")  # renamed
    assert _error("data.num_workers=2").startswith("unknown config key data.num_workers;")  # now per stream


def test_warmup_must_end_before_max_steps():
    message = _error("run.max_steps=20", "optim.warmup_steps=20")
    assert message.startswith("optim.warmup_steps: expected < run.max_steps=20") and message.endswith("got 20")
    assert "optim.warmup_steps: expected < run.max_steps=10" in _error("run.max_steps=10", "optim.warmup_steps=30")
    assert load_config(TINY_RANDOM, ["run.max_steps=21", "optim.warmup_steps=20"]).optim.warmup_steps == 20


def test_num_shots_must_leave_queries_in_the_held_out_set():
    message = _error("data.synthetic.num_val_pairs=8", "eval.num_shots=8")
    assert message == (
        "eval.num_shots: expected < data.synthetic.num_val_pairs=8 (the demonstrations and the queries are drawn "
        "from the held-out set; more would repeat them), got 8"
    )
    # no demonstrations are used: no limit
    load_config(
        TINY_RANDOM,
        ["data.synthetic.num_val_pairs=8", "eval.num_shots=8", "eval.final_few_shot=false", "eval.num_generations=0"],
    )


def test_deepspeed_json_with_an_unknown_key(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimisation": {"stage": 2}}))
    with pytest.raises(ConfigError) as err:
        load_deepspeed_json(path)
    assert str(err.value) == (
        f"run.deepspeed: {str(path)!r} sets 'zero_optimisation', which is no DeepSpeed setting (DeepSpeed would "
        "ignore it); did you mean 'zero_optimization'?"
    )
    path.write_text(json.dumps({"zero_optimization": {"stage": 1}, "frobnicate": 1}))
    with pytest.raises(ConfigError, match="'frobnicate'.*expected one of .*'zero_optimization'"):
        load_deepspeed_json(path)


def test_known_deepspeed_keys_are_those_deepspeed_reads():
    """Every top-level key the installed DeepSpeed's config reads is allowed (recorded while DeepSpeedConfig parses
    a config), so the check rejects typos, not settings."""
    from deepspeed.runtime.config import DeepSpeedConfig

    from training.engine import DEEPSPEED_KEYS

    read: set[str] = set()

    class Recording(dict):
        def __getitem__(self, key):
            read.add(key)
            return super().__getitem__(key)

        def get(self, key, default=None):
            read.add(key)
            return super().get(key, default)

        def __contains__(self, key):
            read.add(key)
            return super().__contains__(key)

        def keys(self):
            outer = self

            class Keys(collections.abc.KeysView):
                def __contains__(self, key):
                    read.add(key)
                    return dict.__contains__(outer, key)

            return Keys(self)

    DeepSpeedConfig(Recording({"train_batch_size": 1, "train_micro_batch_size_per_gpu": 1}))
    read = {k for k in read if isinstance(k, str)}
    assert "zero_optimization" in read and len(read) > 30
    assert read <= DEEPSPEED_KEYS, sorted(read - DEEPSPEED_KEYS)


def test_few_shot_prompts_longer_than_the_lm_stop_before_training(tiny_cache, tmp_path):
    """15 demonstrations and 480 new tokens exceed the tiny LM's 512 positions: a ConfigError naming the keys and
    the lengths when the trainer is built (the demonstrations read, nothing trained), not minutes of generation."""
    from train_helpers import small_config

    from training.trainer import Trainer

    out = tmp_path / "run"
    extra = ["eval.final_few_shot=true", "eval.num_shots=15", "eval.max_new_tokens=480"]
    with pytest.raises(ConfigError) as err:
        Trainer(small_config(tiny_cache, out, *extra))
    message = str(err.value)
    assert message.startswith("eval.num_shots: 15 demonstrations make a ") and "eval.max_new_tokens=480" in message
    assert "the language model has 512" in message and message.endswith("got eval.num_shots=15")
    assert not (out / "metrics.jsonl").exists() and not (out / "checkpoints").exists()


def test_num_shots_must_leave_queries_in_real_held_out_shards(tiny_cache, tmp_path):
    """Real held-out shards (not synthetic): their sample count is known only once the loader has read the shard
    index, so the trainer checks eval.num_shots against it when it is built, before a checkpoint or a metric."""
    from data_helpers import write_pair_shards
    from train_helpers import small_config

    from training.trainer import Trainer

    num = 4
    write_pair_shards(tmp_path / "val", count=num, per_shard=1, prefix="val")
    shards = str(tmp_path / "val" / "val-{000000..000003}.tar")
    out = tmp_path / "run"
    extra = [f"data.val.shards={shards}", f"eval.num_shots={num}", "eval.final_few_shot=true"]
    with pytest.raises(ConfigError) as err:
        Trainer(small_config(tiny_cache, out, *extra))
    assert str(err.value) == (
        f"eval.num_shots: expected < the {num} samples of data.val.shards={shards!r} (the demonstrations and the "
        f"queries are drawn from them; more would repeat them), got {num}"
    )
    assert not (out / "metrics.jsonl").exists() and not (out / "checkpoints").exists()
    # nothing but the locks of the output, checkpoint and export directories (training.lock)
    assert sorted(p.name for p in out.iterdir()) == [".checkpoints.lock", ".export.lock", ".lock"]


def test_shuffled_loss_needs_two_samples_a_batch():
    message = _error("data.val.batch_size=1")
    assert message.startswith("data.val.batch_size: expected >= 2 with eval.shuffled_loss") and message.endswith(
        "got 1"
    )
    load_config(TINY_RANDOM, ["data.val.batch_size=1", "eval.shuffled_loss=false"])
    load_config(TINY_RANDOM, ["data.val.batch_size=1", "eval.batches=0"])  # no held-out loss, no control


def test_shuffled_images_control_of_the_held_out_loss():
    """Each sample gets another sample's images; a last batch of one takes an image of the batch before; a first
    batch of one cannot be shuffled."""
    from training.evaluation import held_out_loss

    class Loader:
        def __init__(self, sizes):
            self.batches = [
                {
                    "vision_x": torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1, 1, 1) + 10 * i,
                    "input_ids": torch.zeros(n, 3, dtype=torch.long),
                    "attention_mask": torch.ones(n, 3, dtype=torch.long),
                    "labels": torch.ones(n, 3, dtype=torch.long),
                    "media_mask": torch.zeros(n, 3, dtype=torch.bool),
                }
                for i, n in enumerate(sizes)
            ]

        def state_dict(self):
            return {"position": 0}

        def load_state_dict(self, state):
            pass

        def __iter__(self):
            return iter(self.batches)

    seen = []

    class Model(torch.nn.Module):
        def forward(self, vision_x, input_ids, **kwargs):
            seen.append(vision_x.flatten().tolist())
            return types.SimpleNamespace(loss=vision_x.float().mean())

    held_out_loss(Model(), Loader([3, 1]), 2, torch.device("cpu"), torch.float32, shuffle_images=True)
    assert seen == [[2.0, 0.0, 1.0], [0.0]]  # rolled by one; the single sample takes the batch before's first
    seen.clear()
    held_out_loss(Model(), Loader([3, 1]), 2, torch.device("cpu"), torch.float32, ablate_images=True)
    assert seen == [[0.0, 0.0, 0.0], [0.0]]
    with pytest.raises(ValueError, match="at least 2 samples.*got a batch of 1"):
        held_out_loss(Model(), Loader([1, 3]), 2, torch.device("cpu"), torch.float32, shuffle_images=True)
    with pytest.raises(ValueError, match="pick one"):
        held_out_loss(Model(), Loader([3]), 1, torch.device("cpu"), torch.float32, True, True)


def test_optimizer_is_fused_and_the_same_update_as_torch_adamw():
    """The fused kernel on CPU, the same trajectory as the per-tensor AdamW (weight decay, LR groups) up to rounding."""
    from training.config import OptimConfig

    torch.manual_seed(0)
    model = torch.nn.ModuleDict({"gated_cross_attn": torch.nn.Linear(16, 8), "perceiver": torch.nn.Linear(8, 4)})
    reference = torch.nn.ModuleDict({k: torch.nn.Linear(m.in_features, m.out_features) for k, m in model.items()})
    reference.load_state_dict(model.state_dict())
    start = model["perceiver"].weight.detach().clone()
    cfg = OptimConfig(lr=1e-2, weight_decay=0.1)
    opt = build_optimizer(model, cfg)
    assert all(g["fused"] for g in opt.param_groups)
    ref = torch.optim.AdamW(
        parameter_groups(reference, cfg.weight_decay, cfg.lr), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
        foreach=False, fused=False,
    )  # fmt: skip
    x = torch.randn(32, 16)
    for _ in range(5):
        for m, o in ((model, opt), (reference, ref)):
            o.zero_grad()
            m["perceiver"](torch.tanh(m["gated_cross_attn"](x))).square().mean().backward()
            o.step()
    for (name, a), b in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert not torch.allclose(model["perceiver"].weight, start, atol=1e-3)  # it trained


def test_training_attention_is_the_math_kernel_on_cpu_for_short_sequences():
    import torch.nn.functional as F

    from training.trainer import MATH_ATTENTION_MAX_TOKENS, training_attention

    cpu = torch.device("cpu")
    with training_attention(cpu, 32):
        assert torch.backends.cuda.math_sdp_enabled() and not torch.backends.cuda.flash_sdp_enabled()
    assert torch.backends.cuda.flash_sdp_enabled()  # restored
    with training_attention(cpu, MATH_ATTENTION_MAX_TOKENS + 1):
        assert torch.backends.cuda.flash_sdp_enabled()  # long sequences keep the flash kernel
    with training_attention(cpu, None):
        assert torch.backends.cuda.flash_sdp_enabled()  # so do unbounded ones
    # the same attention and gradients as the default kernel
    q, k, v = (torch.randn(2, 3, 24, 16, requires_grad=True) for _ in range(3))
    results = []
    for context in (training_attention(cpu, 24), contextlib.nullcontext()):
        with context:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            grads = torch.autograd.grad(out.square().sum(), (q, k, v))
        results.append((out, *grads))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_help_names_the_real_default_config(capsys):
    """`train.py --help` names the config it runs without --config, that file exists and equals the default."""
    import re

    from training.train import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = capsys.readouterr().out
    named = set(re.findall(r"configs/[\w.-]+\.yaml", text.split("Arguments:", 1)[1].split("\n\n", 1)[0]))
    assert named == {"configs/default.yaml"}, text
    assert load_config(PROJECT_ROOT / "configs" / "default.yaml") == load_config(None)
    assert "tiny config" not in text
