"""The training job in one process (DeepSpeed on CPU, gloo, world size 1): smoke run with metrics, evaluation,
export and few-shot demo; exact resume; non-finite losses; crash-safe checkpoints; activation checkpointing."""

from __future__ import annotations

import json
import math

import pytest
import torch
from train_helpers import run_training, small_config

from training.checkpoint import STAGING, CheckpointManager
from training.metrics import read_records, train_losses
from training.trainer import NonFiniteLossError, Trainer


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("train-cache")


def _param_checksum(model) -> float:
    with torch.no_grad():
        return float(sum(p.double().sum() for p in model.parameters()))


def test_smoke_default_config_loss_falls(cache, tmp_path, capsys, monkeypatch):
    """The default model, batch sizes and schedule for 30 steps (on a smaller generated dataset): the loss falls,
    every step is logged, the held-out evaluation runs, and the export loads without DeepSpeed and computes the
    same logits as the trained model."""
    from training.modeling import load_exported

    out = tmp_path / "run"
    config = small_config(
        cache,
        out,
        "data.pairs.batch_size=16",
        "data.documents.batch_size=4",
        "optim.warmup_steps=20",
        "run.max_steps=30",
        "eval.every_steps=30",
        "checkpoint.every_steps=15",
        "checkpoint.export=true",
        "logging.tensorboard=true",
        "logging.loss_curve=true",
    )
    import training.trainer as trainer_module

    kernels = []  # every training forward picks its attention kernel (training.trainer.training_attention)

    def recorded(device, length, choose=trainer_module.training_attention):
        kernels.append(length)
        return choose(device, length)

    monkeypatch.setattr(trainer_module, "training_attention", recorded)
    trainer = Trainer(config)
    try:
        result = trainer.fit()
        longest = max(config.data.pairs.max_length, config.data.documents.max_length)
        assert kernels == [longest] * 2 * 30  # the forward and the backward of 30 steps
        losses = [result.losses[s] for s in range(1, 31)]
        assert all(math.isfinite(v) for v in losses)
        first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
        assert last < 0.8 * first, (first, last)

        records = read_records(out / "metrics.jsonl")
        train = [r for r in records if r["kind"] == "train"]
        assert [r["step"] for r in train] == list(range(1, 31))
        assert all(r["samples"] == 20 and r["tokens"] > 20 and r["samples_per_s"] > 0 for r in train)
        assert all(r["positions"] >= r["tokens"] for r in train)  # real tokens + padding
        assert sum(r["positions"] for r in train) > sum(r["tokens"] for r in train)  # the generated captions vary
        assert train[0]["lr"] == pytest.approx(config.optim.lr / 21)
        assert train[-1]["lr"] < train[20]["lr"]  # cosine decay after warmup
        assert all(r["grad_norm"] is not None and r["grad_norm"] > 0 for r in train)
        assert train[0]["loss"] == pytest.approx(train[0]["loss_pairs"] + train[0]["loss_documents"])
        evals = [r for r in records if r["kind"] == "eval"]
        assert len(evals) == 1 and math.isfinite(evals[0]["loss"]) and len(evals[0]["generations"]) == 2
        # the image-ablated held-out loss: the same batches with every image replaced by the constant one
        ablated = evals[0]["ablated_loss"]
        assert math.isfinite(ablated) and ablated != evals[0]["loss"]
        # the shuffled-image control: each held-out caption with the images of another sample of its batch
        shuffled = evals[0]["shuffled_loss"]
        assert math.isfinite(shuffled) and shuffled != evals[0]["loss"] and shuffled != ablated
        assert "with another sample's images" in capsys.readouterr().out
        trainer.model.eval()
        loader = trainer.val_loader
        for control, images in (
            (ablated, lambda v: torch.zeros_like(v)),
            (shuffled, lambda v: torch.cat([v[-1:], v[:-1]])),
        ):
            num, den = 0.0, 0
            loader.load_state_dict({**loader.state_dict(), "position": 0})
            with torch.no_grad():
                for _, batch in zip(range(config.eval.batches), loader):
                    assert batch["vision_x"].shape[0] > 1
                    out_ = trainer.model(images(batch["vision_x"]), batch["input_ids"],
                                         attention_mask=batch["attention_mask"], labels=batch["labels"],
                                         media_mask=batch["media_mask"], loss_only=True)  # fmt: skip
                    n = int((batch["labels"][:, 1:] != -100).sum())
                    num, den = num + float(out_.loss) * n, den + n
            assert control == pytest.approx(num / den, rel=1e-9, abs=0)  # the same computation
        assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert list((out / "tensorboard").glob("events.out.tfevents.*"))
        assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000030"
        assert yaml_equal(out / "config.yaml", config)

        # export: loadable for generation without DeepSpeed, same function as the trained model
        exported = load_exported(result.export_dir).eval()
        batch = next(iter(trainer.val_loader))
        trainer.model.eval()
        with torch.no_grad():
            args = (batch["vision_x"], batch["input_ids"])
            kwargs = {"attention_mask": batch["attention_mask"], "media_mask": batch["media_mask"]}
            torch.testing.assert_close(exported(*args, **kwargs).logits, trainer.model(*args, **kwargs).logits)

        samples = trainer.few_shot_demo(num_queries=2)
        printed = capsys.readouterr().out
        assert len(samples) == 2 and all(s.true and isinstance(s.generated, str) for s in samples)
        assert all(s.true in printed for s in samples) and "exported model" in printed
    finally:
        trainer.close()


def yaml_equal(path, config) -> bool:
    import yaml

    return yaml.safe_load(path.read_text()) == config.to_dict()


@pytest.mark.parametrize(
    "frozen, lm_scale", [(False, False), (True, False), (True, True)], ids=["all-trainable", "frozen", "lm-scale"]
)
def test_stop_and_resume_reproduces_the_uninterrupted_run(cache, tmp_path, frozen, lm_scale):
    """6 steps in one go == 3 steps, stop (checkpoint), new trainer resumes from it, 3 more: identical losses.
    With frozen backbones (as the real configs) the checkpoint holds only the trainable weights. With
    model.match_lm_scale (configs/flickr8k.yaml) the resumed run rebuilds the same scaled parameter groups."""
    steps = ["run.max_steps=6", "checkpoint.every_steps=2"]
    if frozen:
        steps += ["model.freeze_vision_encoder=true", "model.freeze_lm=true"]
        steps += ["model.match_lm_scale=true", "model.latents_init_std=0.1"] if lm_scale else ["model.gate_init=null"]
    reference, _ = run_training(small_config(cache, tmp_path / "a", *steps))
    first, _ = run_training(small_config(cache, tmp_path / "b", *steps, "checkpoint.stop_at_step=3"))
    assert first.stopped_early and first.step == 3 and first.checkpoint.name == "step_00000003"
    resumed, trainer = run_training(small_config(cache, tmp_path / "b", *steps))
    assert trainer.resumed_from.name == "step_00000003" and resumed.start_step == 3
    assert not trainer._resume_notes  # the same config: nothing differs from the checkpoint's run
    if lm_scale:
        assert any("_x" in g["name"] for g in trainer.optimizer.param_groups)
    expected = [reference.losses[s] for s in range(1, 7)]
    got = [first.losses[s] for s in range(1, 4)] + [resumed.losses[s] for s in range(4, 7)]
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=0, atol=1e-6)
    # the metrics file holds exactly one trajectory, equal to the reference
    assert train_losses(tmp_path / "b" / "metrics.jsonl") == train_losses(tmp_path / "a" / "metrics.jsonl")
    assert len([r for r in read_records(tmp_path / "b" / "metrics.jsonl") if r["kind"] == "train"]) == 6
    saved = torch.load(
        tmp_path / "b" / "checkpoints" / "step_00000006" / "mp_rank_00_model_states.pt", weights_only=False
    )["module"]
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert set(saved) == trainable if frozen else trainable <= set(saved)
    assert any(n.startswith("lang_encoder.model.layers.0.decoder_layer.") for n in saved) != frozen


def test_data_workers_see_the_same_samples_and_resume_exactly(cache, tmp_path):
    """data.{pairs,documents}.num_workers=2: same losses as loading in the main process, also across a stop and resume."""
    steps = ["run.max_steps=6", "checkpoint.every_steps=3"]
    reference, _ = run_training(small_config(cache, tmp_path / "a", *steps))
    workers = [*steps, "data.pairs.num_workers=2", "data.documents.num_workers=2"]
    first, _ = run_training(small_config(cache, tmp_path / "b", *workers, "checkpoint.stop_at_step=3"))
    resumed, trainer = run_training(small_config(cache, tmp_path / "b", *workers))
    assert trainer.resumed_from.name == "step_00000003"
    expected = [reference.losses[s] for s in range(1, 7)]
    got = [first.losses[s] for s in range(1, 4)] + [resumed.losses[s] for s in range(4, 7)]
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=0, atol=1e-6)


def test_resume_never_refuses_an_existing_run(cache, tmp_path):
    from training.config import ConfigError

    run_training(small_config(cache, tmp_path, "run.max_steps=1"))
    with pytest.raises(ConfigError, match="checkpoint.resume"):
        Trainer(small_config(cache, tmp_path, "run.max_steps=2", "checkpoint.resume=never"))


def test_nonfinite_loss_is_skipped_and_counted(cache, tmp_path, monkeypatch):
    """Steps with a NaN loss change neither weights nor optimizer state nor the LR schedule."""
    config = small_config(cache, tmp_path, "run.max_steps=5", "checkpoint.every_steps=0")
    trainer = Trainer(config)
    checksums, records = [_param_checksum(trainer.model)], []
    inner_step, inner_micro = trainer.train_step, trainer._micro_step

    def micro():
        loss, *counts = inner_micro()  # per-stream losses, samples, tokens, positions
        return (loss * float("nan") if trainer.step + 1 in (2, 3) else loss, *counts)

    def step():
        record = inner_step()
        checksums.append(_param_checksum(trainer.model))
        records.append(record)
        return record

    monkeypatch.setattr(trainer, "_micro_step", micro)
    monkeypatch.setattr(trainer, "train_step", step)
    try:
        result = trainer.fit()
    finally:
        trainer.close()
    assert [r["skipped"] for r in records] == [False, True, True, False, False]
    assert result.losses[2] is None and result.losses[3] is None and math.isfinite(result.losses[4])
    assert checksums[1] != checksums[0] and checksums[1] == checksums[2] == checksums[3] != checksums[4]
    assert records[3]["lr"] == records[1]["lr"]  # the schedule did not advance on skipped steps
    assert trainer.nonfinite_total == 2 and trainer.nonfinite_consecutive == 0
    assert [r["nonfinite_total"] for r in records] == [0, 1, 2, 2, 2]


def test_too_many_nonfinite_steps_abort_with_a_usable_checkpoint(cache, tmp_path):
    steps = ["run.max_steps=6", "checkpoint.every_steps=0", "optim.max_consecutive_nonfinite=3"]
    config = small_config(cache, tmp_path, *steps)
    with pytest.raises(NonFiniteLossError, match=r"3 optimizer steps in a row \(steps 2\.\.4\)") as err:
        run_training(config, nan_at_steps=(2, 3, 4))
    assert "step_00000004" in str(err.value)
    # the checkpoint resumes (past the bad batches) and training finishes
    result, trainer = run_training(small_config(cache, tmp_path, *steps))
    assert trainer.resumed_from.name == "step_00000004" and result.step == 6
    assert all(math.isfinite(result.losses[s]) for s in (5, 6))


def test_crash_while_publishing_keeps_the_previous_checkpoint(cache, tmp_path, monkeypatch):
    """A crash after the checkpoint files were written but before they were published leaves `latest` on the
    previous complete checkpoint; the next start removes the leftovers and resumes from it."""
    steps = ["run.max_steps=4", "checkpoint.every_steps=2"]
    original = CheckpointManager._publish

    def crash_at_step_4(self, staged, tag):
        if tag == "step_00000004":
            raise KeyboardInterrupt("simulated crash while publishing")
        return original(self, staged, tag)

    monkeypatch.setattr(CheckpointManager, "_publish", crash_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        run_training(small_config(cache, tmp_path, *steps))
    ckpt = tmp_path / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "step_00000002"
    assert (ckpt / STAGING / "step_00000004").is_dir() and not (ckpt / "step_00000004").exists()
    monkeypatch.setattr(CheckpointManager, "_publish", original)
    result, trainer = run_training(small_config(cache, tmp_path, *steps))
    assert trainer.resumed_from.name == "step_00000002" and result.start_step == 2 and result.step == 4
    assert (ckpt / "latest").read_text().strip() == "step_00000004"
    assert not (ckpt / STAGING / "step_00000004").exists()


def test_activation_checkpointing_gives_the_same_losses(cache, tmp_path):
    steps = ["run.max_steps=3", "checkpoint.every_steps=0"]
    plain, _ = run_training(small_config(cache, tmp_path / "plain", *steps))
    ckpt, trainer = run_training(small_config(cache, tmp_path / "ckpt", *steps, "model.activation_checkpointing=true"))
    wrapped = [m for m in trainer.model.modules() if m.__dict__.get("_activation_checkpointing")]
    assert len(wrapped) == 2 + 2 + 2  # LM decoder layers, cross-attention blocks, resampler layers
    torch.testing.assert_close(
        torch.tensor([ckpt.losses[s] for s in (1, 2, 3)]), torch.tensor([plain.losses[s] for s in (1, 2, 3)])
    )


def test_gradient_accumulation_and_bf16(cache, tmp_path):
    """Two micro-steps per step consume two batches per stream; bf16 (DeepSpeed on CPU) trains to finite losses."""
    result, trainer = run_training(
        small_config(cache, tmp_path, "run.max_steps=2", "optim.grad_accum_steps=2", "run.precision=bf16")
    )
    assert all(math.isfinite(result.losses[s]) for s in (1, 2))
    # the CPU bf16 path: bf16 weights (the matrix multiplies run in bf16), fp32 master weights in the optimizer
    assert next(trainer.model.parameters()).dtype == torch.bfloat16
    opt = trainer.engine.optimizer  # DeepSpeed's mixed-precision wrapper: fp32 copies that the update is made on
    masters = [p for g in getattr(opt, "fp32_groups", None) or opt.fp32_groups_flat_partition for p in g]
    assert masters and all(m.dtype == torch.float32 for m in masters)
    assert sum(m.numel() for m in masters) >= sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    records = [r for r in read_records(tmp_path / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["samples"] for r in records] == [12, 12]  # 2 x (4 pairs + 2 documents)
    state = json.loads(json.dumps(trainer.streams["pairs"].state_dict()))
    assert state["position"] == 16


EPISODES = (
    "data.episodes={sources: [{shards: 'synthetic:pairs'}], batch_size: 2, max_length: 96, max_images: 6, "
    "min_images: 3, episodes: {ways: [2, 2], shots: [1, 2], queries: [1, 1], loss_on: answers}}"
)


def test_episodes_stream_trains_and_its_probe_measures_the_images(cache, tmp_path, monkeypatch):
    """With data.episodes, each step trains the episodes too (loss_episodes), and every evaluation scores binding
    episodes that training never draws with real and with constant images: their gap is what binding is worth."""
    from training import trainer as trainer_module

    calls = []
    real = trainer_module.held_out_loss

    def spy(model, loader, *args, **kwargs):
        calls.append((loader.config.kind, loader.config.seed, kwargs.get("ablate_images", False)))
        return real(model, loader, *args, **kwargs)

    monkeypatch.setattr(trainer_module, "held_out_loss", spy)
    result, trainer = run_training(small_config(cache, tmp_path, "run.max_steps=2", "eval.every_steps=1", EPISODES))
    records = read_records(trainer.metrics.path)
    steps = [r for r in records if r["kind"] == "train"]
    assert all(math.isfinite(r["loss_episodes"]) for r in steps)
    evals = [r for r in records if r["kind"] == "eval"]
    assert evals and all(e["episodes_loss"] > 0 and e["episodes_ablated_loss"] > 0 for e in evals)
    probe_seed = trainer.episode_probe.config.seed
    assert probe_seed != trainer.streams["episodes"].loader.config.seed  # episodes training never draws
    assert ("episodes", probe_seed, False) in calls and ("episodes", probe_seed, True) in calls
    # the probe's episodes are fixed (held_out_loss reads from position 0) and differ from the trained ones
    probe, stream = trainer.episode_probe, trainer.streams["episodes"].loader
    texts = []
    for loader in (probe, probe, stream):
        loader.load_state_dict({**loader.state_dict(), "position": 0})
        texts.append(next(iter(loader))["input_ids"])
    assert torch.equal(texts[0], texts[1]) and not torch.equal(texts[0], texts[2])


def test_without_episodes_there_is_no_probe(cache, tmp_path):
    _, trainer = run_training(small_config(cache, tmp_path, "run.max_steps=1", "eval.every_steps=1"))
    assert trainer.episode_probe is None
    evals = [r for r in read_records(trainer.metrics.path) if r["kind"] == "eval"]
    assert evals and all(e["episodes_loss"] is None for e in evals)
