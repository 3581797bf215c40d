"""Safety of the training job's files: verified checkpoints with fallback, no code run by loading, strict weights,
the learning rate on resume, one run per output directory, export leftovers, gradient clipping, broken inputs.

The first half uses a stand-in for the DeepSpeed engine (fast); the second half trains the tiny model with DeepSpeed
on CPU, in this process (a few seconds per trainer).
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from train_helpers import run_training, small_config

from training.checkpoint import (
    LATEST,
    MANIFEST,
    CheckpointError,
    CheckpointManager,
    _WeightsOnlyLoads,
    capture_rng,
    clean_export_leftovers,
    restore_rng,
    sha256_of,
    verify_checkpoint,
)
from training.config import ConfigError
from training.distributed import DistContext
from training.lock import OutputDirBusy, OutputDirLock, sibling_lock_path
from training.metrics import read_records

CTX = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
MODEL_FILE = "mp_rank_00_model_states.pt"


class FakeEngine:
    """What CheckpointManager.save needs from a DeepSpeed engine: ``save_checkpoint`` writing a torch file."""

    def __init__(self, payload_size: int = 1000) -> None:
        self.payload = torch.arange(payload_size, dtype=torch.float32)

    def save_checkpoint(self, save_dir, tag, save_latest, exclude_frozen_parameters):
        (Path(save_dir) / tag).mkdir(parents=True, exist_ok=True)
        torch.save({"module": {"w": self.payload}}, Path(save_dir) / tag / MODEL_FILE)


def _save_steps(directory: Path, steps, keep_last: int = 10) -> CheckpointManager:
    manager = CheckpointManager(directory, CTX, keep_last=keep_last)
    for step in steps:
        manager.save(FakeEngine(), step, {"step": step, "world_size": 1, "rng": capture_rng()})
    return manager


class RunsCode:
    """A pickle that runs a shell command when loaded (what a crafted checkpoint file can hold)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# ------------------------------------------------------------------------------------------------ manifest


def test_checkpoint_manifest_records_every_file(tmp_path):
    manager = _save_steps(tmp_path, [1])
    path = tmp_path / "step_00000001"
    manifest = json.loads((path / MANIFEST).read_text())
    assert set(manifest["files"]) == {MODEL_FILE, "trainer_state_rank0.json"}
    for name, entry in manifest["files"].items():
        assert entry == {"size": (path / name).stat().st_size, "sha256": sha256_of(path / name)}
    assert verify_checkpoint(path) is None and manager.find_resumable() == path


def test_damaged_latest_falls_back_to_the_newest_good_checkpoint(tmp_path, capsys):
    """Truncated, then bit-flipped, then missing files: each skipped with a warning naming the checkpoint and file."""
    manager = _save_steps(tmp_path, [1, 2, 3])
    step = {s: tmp_path / f"step_0000000{s}" for s in (1, 2, 3)}
    model3 = step[3] / MODEL_FILE
    model3.write_bytes(model3.read_bytes()[:100])  # truncated (a kill while the page cache was flushed, a full disk)
    assert manager.find_resumable() == step[2]
    assert len(manager.warnings) == 1 and str(step[3]) in manager.warnings[0] and str(model3) in manager.warnings[0]
    assert "truncated" in manager.warnings[0] and "warning: skipping checkpoint" in capsys.readouterr().out

    data = bytearray((step[2] / MODEL_FILE).read_bytes())
    data[-30] ^= 0xFF  # same size, one byte changed
    (step[2] / MODEL_FILE).write_bytes(bytes(data))
    assert manager.find_resumable() == step[1]
    assert "SHA-256" in manager.warnings[1] and str(step[2] / MODEL_FILE) in manager.warnings[1]

    (step[1] / "trainer_state_rank0.json").unlink()
    with pytest.raises(CheckpointError, match="no usable checkpoint") as err:
        manager.find_resumable()
    assert all(str(step[s]) in str(err.value) for s in (1, 2, 3))
    with pytest.raises(
        CheckpointError, match=r"cannot resume from .*step_00000001: .*trainer_state_rank0.json is missing"
    ):
        manager.load(FakeEngine(), step[1])


def test_a_checkpoint_without_manifest_is_incomplete(tmp_path):
    _save_steps(tmp_path, [1])
    (tmp_path / "step_00000001" / MANIFEST).unlink()
    assert "manifest.json is missing" in verify_checkpoint(tmp_path / "step_00000001")


def test_writing_refuses_a_truncated_torch_file(tmp_path):
    class Truncating(FakeEngine):
        def save_checkpoint(self, save_dir, tag, **kw):
            super().save_checkpoint(save_dir, tag, **kw)
            file = Path(save_dir) / tag / MODEL_FILE
            file.write_bytes(file.read_bytes()[:200])

    manager = CheckpointManager(tmp_path, CTX)
    with pytest.raises(CheckpointError, match=rf"{MODEL_FILE} is truncated .* right after saving"):
        manager.save(Truncating(), 1, {"step": 1, "world_size": 1})
    assert not (tmp_path / LATEST).exists() and manager.completed() == []


def test_keep_last_deletes_the_oldest_checkpoints(tmp_path):
    manager = _save_steps(tmp_path, [1, 2, 3, 4, 5], keep_last=2)
    assert [p.name for p in manager.completed()] == ["step_00000004", "step_00000005"]
    assert (tmp_path / LATEST).read_text().strip() == "step_00000005"


# ------------------------------------------------------------------------------------------------ no code on load


def test_trainer_state_is_json_and_rng_states_round_trip(tmp_path):
    import random

    import numpy as np

    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    _save_steps(tmp_path, [1])
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    state = json.loads((tmp_path / "step_00000001" / "trainer_state_rank0.json").read_text())
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    restore_rng(state["rng"])
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected


def test_a_crafted_pickle_is_never_unpickled(tmp_path):
    """A crafted ``trainer_state_rank0.pt`` (the old format) or DeepSpeed file in a checkpoint runs no command."""
    marker = tmp_path / "pwned"
    crafted = tmp_path / "ckpt" / "step_00000001"
    crafted.mkdir(parents=True)
    with open(crafted / "trainer_state_rank0.pt", "wb") as f:
        pickle.dump(RunsCode(marker), f)
    torch.save({"module": RunsCode(marker)}, crafted / MODEL_FILE)
    manager = CheckpointManager(tmp_path / "ckpt", CTX)
    with pytest.raises(CheckpointError, match="pickled trainer state .* not loaded"):
        manager.read_trainer_state(crafted)
    assert "older version" in verify_checkpoint(crafted)
    with pytest.raises(CheckpointError, match=rf"cannot load .*{MODEL_FILE}: UnpicklingError"):
        _WeightsOnlyLoads(None).load(str(crafted / MODEL_FILE))
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------ lock, leftovers


LOCK_HOLDER = """
import sys, time
sys.path.insert(0, sys.argv[2])
from training.lock import OutputDirLock
lock = OutputDirLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(600)
"""


def test_output_dir_lock_names_the_holder_and_dies_with_it(tmp_path):
    root = str(Path(__file__).resolve().parents[1])
    holder = subprocess.Popen(
        [sys.executable, "-c", LOCK_HOLDER, str(tmp_path), root], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(OutputDirBusy) as err:
            OutputDirLock(tmp_path).acquire()
        assert str(tmp_path) in str(err.value) and f"pid {holder.pid} on host" in str(err.value)
    finally:
        holder.kill()  # killed, not closed: the kernel releases the lock
        holder.wait()
    lock = OutputDirLock(tmp_path).acquire()
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    lock.release()


def test_export_leftovers_are_removed(tmp_path):
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "flamingo_config.json").write_text("{}")
    for name in (".export-old-4242", ".export-abc123", ".exported-not-ours"):
        (tmp_path / name).mkdir()
    done = clean_export_leftovers(tmp_path / "export", exclusive=True)
    assert len(done) == 2 and sorted(p.name for p in tmp_path.iterdir()) == [".exported-not-ours", "export"]
    # not holding the lock: only leftovers of processes that are gone
    mine, staging = tmp_path / f".export-old-{os.getpid()}", tmp_path / ".export-xyz"
    mine.mkdir()
    staging.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / f".export-old-{dead.pid}").mkdir()
    clean_export_leftovers(tmp_path / "export", exclusive=False)
    assert mine.exists() and staging.exists() and not (tmp_path / f".export-old-{dead.pid}").exists()


def test_batch_check_names_the_stream_and_rows():
    from training.data import check_batch

    batch = {"vision_x": torch.zeros(3, 1, 1, 3, 4, 4), "metadata": [{"source": "s", "key": f"k{i}"} for i in range(3)]}
    assert check_batch("pairs", batch) is batch
    batch["vision_x"][2, 0, 0, 1, 2, 2] = float("nan")
    with pytest.raises(
        ValueError, match=r"data\.pairs: batch vision_x holds NaN or Inf values in row\(s\) \[2\] \(s:k2\)"
    ):
        check_batch("pairs", batch)
    with pytest.raises(ValueError, match=r"data\.documents: batch vision_x has dtype torch\.uint8"):
        check_batch("documents", {"vision_x": torch.zeros(1, 1, 1, 3, 4, 4, dtype=torch.uint8)})


# ------------------------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("train-cache")


def test_truncated_latest_checkpoint_falls_back_and_training_goes_on(cache, tmp_path, capsys):
    # warmup over steps 1-2: steps 3 and 4 then start the same cosine in a 4-step and in a 6-step run
    steps = ["checkpoint.every_steps=2", "checkpoint.keep_last=2", "optim.warmup_steps=2"]
    first, _ = run_training(small_config(cache, tmp_path, "run.max_steps=4", *steps))
    model4 = tmp_path / "checkpoints" / "step_00000004" / MODEL_FILE
    model4.write_bytes(model4.read_bytes()[: model4.stat().st_size // 2])
    capsys.readouterr()
    resumed, trainer = run_training(small_config(cache, tmp_path, "run.max_steps=6", *steps))
    out = capsys.readouterr().out
    assert trainer.resumed_from.name == "step_00000002" and resumed.start_step == 2
    assert f"skipping checkpoint {model4.parent}" in out and str(model4) in out
    # from step 2's weights, data position and RNG the run repeats steps 3 and 4 exactly
    assert [resumed.losses[s] for s in (3, 4)] == [first.losses[s] for s in (3, 4)]
    assert [p.name for p in trainer.checkpoints.completed()] == ["step_00000004", "step_00000006"]  # keep_last=2
    assert verify_checkpoint(model4.parent) is None  # step 4 written again, complete


FROZEN = ["model.freeze_vision_encoder=true", "model.freeze_lm=true", "model.gate_init=null"]


def test_resume_is_strict_about_the_model_weights(cache, tmp_path):
    """A checkpoint of a frozen-backbone run lacks the LM weights; resuming it with model.freeze_lm=false would have
    trained from random LM weights. The error names the tensors; the failed start releases the output lock."""
    run_training(small_config(cache, tmp_path, "run.max_steps=1", *FROZEN))
    unfrozen = [s for s in FROZEN if "freeze_lm" not in s] + ["model.freeze_lm=false"]
    with pytest.raises(CheckpointError) as err:
        run_training(small_config(cache, tmp_path, "run.max_steps=2", *unfrozen))
    message = str(err.value)
    assert "step_00000001" in message and "do not fit this model: missing" in message
    assert "lang_encoder.model.layers.0.decoder_layer." in message
    result, _ = run_training(small_config(cache, tmp_path, "run.max_steps=2", *FROZEN))  # lock was released
    assert result.step == 2


@pytest.mark.parametrize(
    "deepspeed, crafted_file",
    [
        ("configs/deepspeed/zero0.json", MODEL_FILE),
        ("configs/deepspeed/zero2.json", "zero_pp_rank_0_mp_rank_00_optim_states.pt"),  # the partitioned optimizer
    ],
    ids=["zero0-model-states", "zero2-optim-states"],
)
def test_crafted_files_in_a_resumed_checkpoint_run_no_code(cache, tmp_path, deepspeed, crafted_file):
    """Under ZeRO-2 DeepSpeed also reads each rank's optimizer partition (zero_pp_rank_<r>_..._optim_states.pt)
    through its checkpoint engine: that file, crafted, runs no code either, and the error names it."""
    import shutil

    ds = f"run.deepspeed={deepspeed}"
    run_training(small_config(cache, tmp_path / "run", "run.max_steps=1", ds))
    good = tmp_path / "run" / "checkpoints" / "step_00000001"
    marker = tmp_path / "pwned"

    # 1. the old pickled trainer state, as given with checkpoint.resume=<path>
    old = tmp_path / "old" / good.name
    shutil.copytree(good, old)
    (old / "trainer_state_rank0.json").unlink()
    (old / MANIFEST).unlink()
    with open(old / "trainer_state_rank0.pt", "wb") as f:
        pickle.dump({"step": RunsCode(marker)}, f)
    with pytest.raises(CheckpointError, match="older version"):
        run_training(small_config(cache, tmp_path / "b", "run.max_steps=2", ds, f"checkpoint.resume={old}"))

    # 2. a DeepSpeed file replaced by a crafted pickle, with a manifest that matches it
    crafted = tmp_path / "crafted" / good.name
    shutil.copytree(good, crafted)
    target = crafted / crafted_file
    assert target.is_file()  # the file this stage writes (and reads back)
    key = "module" if crafted_file == MODEL_FILE else "optimizer_state_dict"
    torch.save({key: RunsCode(marker)}, target)
    manifest = json.loads((crafted / MANIFEST).read_text())
    assert crafted_file in manifest["files"]
    manifest["files"][crafted_file] = {"size": target.stat().st_size, "sha256": sha256_of(target)}
    (crafted / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=rf"cannot load {target}: UnpicklingError"):
        run_training(small_config(cache, tmp_path / "c", "run.max_steps=2", ds, f"checkpoint.resume={crafted}"))
    assert not marker.exists()


def test_resume_with_a_changed_learning_rate_follows_the_new_schedule(cache, tmp_path, capsys):
    """Stopped at step 2 with optim.lr=2e-3, resumed with optim.lr=1e-3 (and another weight decay): steps 3 and 4
    use the learning rates of a run configured with 1e-3 from the start, as config.yaml says, and it is reported."""
    new = ["optim.lr=1e-3", "optim.weight_decay=0.05"]
    run_training(small_config(cache, tmp_path / "ref", "run.max_steps=4", *new))
    run_training(small_config(cache, tmp_path / "run", "run.max_steps=4", "checkpoint.stop_at_step=2"))
    capsys.readouterr()
    _, trainer = run_training(small_config(cache, tmp_path / "run", "run.max_steps=4", *new))
    out = capsys.readouterr().out
    lrs = {r["step"]: r["lr"] for r in read_records(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "train"}
    ref = {r["step"]: r["lr"] for r in read_records(tmp_path / "ref" / "metrics.jsonl") if r["kind"] == "train"}
    assert lrs[3] == pytest.approx(ref[3], rel=1e-12) and lrs[4] == pytest.approx(ref[4], rel=1e-12)
    assert lrs[2] == pytest.approx(2 * ref[2], rel=1e-12)  # the first two steps ran with the old rate
    assert "learning rate of the next step" in out and "weight_decay 0.1 in the checkpoint -> 0.05 now" in out
    import yaml

    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["optim"]["lr"] == 1e-3
    decay = [g for g in trainer.optimizer.param_groups if g["name"] == "decay"]
    assert decay and decay[0]["weight_decay"] == 0.05


def test_a_second_run_on_the_same_output_dir_is_refused(cache, tmp_path):
    from training.trainer import Trainer

    first = Trainer(small_config(cache, tmp_path, "run.max_steps=1"))
    try:
        start = time.perf_counter()
        with pytest.raises(OutputDirBusy) as err:
            Trainer(small_config(cache, tmp_path, "run.max_steps=1"))
        assert time.perf_counter() - start < 30
        assert f"run.output_dir: '{tmp_path}' is in use by another run (pid {os.getpid()} on host" in str(err.value)
        assert isinstance(err.value, ConfigError)  # train.py exits with code 2 and the message

        # the trainer's batch check stops NaN pixels before the model sees them
        stream = first.streams["pairs"]
        clean = stream.next()
        poisoned = {**clean, "vision_x": clean["vision_x"].clone()}
        poisoned["vision_x"][1, 0, 0, 0, 0, 0] = float("inf")
        stream.next = lambda: poisoned
        with pytest.raises(ValueError, match=r"data\.pairs: batch vision_x holds NaN or Inf values in row\(s\) \[1\]"):
            first.train_step()
    finally:
        first.close()
    second = Trainer(small_config(cache, tmp_path, "run.max_steps=1"))  # released by close()
    second.close()


def test_a_second_run_sharing_the_checkpoint_or_export_dir_is_refused(cache, tmp_path):
    """Different output directories, one checkpoint (or export) directory: the second run is refused, naming the
    directory and the holder, whether both set checkpoint.dir or one points it at the other's default
    <output_dir>/checkpoints (another spelling of the path included)."""
    from training.trainer import Trainer

    shared = tmp_path / "shared-checkpoints"
    first = Trainer(small_config(cache, tmp_path / "a", "run.max_steps=1", f"checkpoint.dir={shared}"))
    default = Trainer(small_config(cache, tmp_path / "b", "run.max_steps=1"))
    try:
        refused = [
            ("c", f"checkpoint.dir={tmp_path / 'x' / '..' / shared.name}", "checkpoint.dir", shared),
            ("d", f"checkpoint.dir={tmp_path / 'b' / 'checkpoints'}", "checkpoint.dir", tmp_path / "b" / "checkpoints"),
            (
                "e",
                f"checkpoint.export_dir={tmp_path / 'b' / 'export'}",
                "checkpoint.export_dir",
                tmp_path / "b" / "export",
            ),
        ]
        for name, override, key, directory in refused:
            with pytest.raises(OutputDirBusy) as err:
                Trainer(small_config(cache, tmp_path / name, "run.max_steps=1", override))
            message = str(err.value)
            assert message.startswith(f"{key}: ") and f"is in use by another run (pid {os.getpid()} on host" in message
            assert str(directory) in message and f"lock {sibling_lock_path(directory)})" in message
            assert message.endswith(f"or use another {key}")
            # refused before writing anything, and its own output directory's lock released
            assert not (tmp_path / name / "metrics.jsonl").exists()
            OutputDirLock(tmp_path / name).acquire().release()
    finally:
        first.close()
        default.close()
    second = Trainer(small_config(cache, tmp_path / "c", "run.max_steps=1", f"checkpoint.dir={shared}"))  # released
    second.close()


def test_kill_during_export_leaves_nothing_behind(cache, tmp_path, monkeypatch):
    """A crash between moving the old export aside and renaming the new one into place: the next start removes the
    leftovers and exports again from the final checkpoint."""
    import training.modeling as modeling

    run_training(small_config(cache, tmp_path, "run.max_steps=1", "checkpoint.export=true"))
    real_replace = os.replace

    def crash_on_publish(src, dst):
        if Path(src).name.startswith(".export-") and "-old-" not in Path(src).name:
            raise KeyboardInterrupt("killed while exporting")
        return real_replace(src, dst)

    monkeypatch.setattr(modeling.os, "replace", crash_on_publish)
    with pytest.raises(KeyboardInterrupt):
        run_training(small_config(cache, tmp_path, "run.max_steps=2", "checkpoint.export=true"))
    monkeypatch.setattr(modeling.os, "replace", real_replace)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".export-old-")]
    assert not (tmp_path / "export").exists()
    result, _ = run_training(small_config(cache, tmp_path, "run.max_steps=2", "checkpoint.export=true"))
    assert result.export_dir is not None and (tmp_path / "export" / "flamingo_config.json").is_file()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".export-")]


@pytest.mark.parametrize("stage", [0, 2])
def test_gradient_clipping_is_applied(cache, tmp_path, stage):
    """With optim.grad_clip=0.01 the optimizer steps on gradients of global norm 0.01 (the loss's are far larger).
    ZeRO-2 steps the inner optimizer once per parameter group: the norms of one step's calls are combined."""
    from training.trainer import Trainer

    clip = 0.01
    trainer = Trainer(
        small_config(
            cache,
            tmp_path,
            "run.max_steps=2",
            f"optim.grad_clip={clip}",
            f"run.deepspeed=configs/deepspeed/zero{stage}.json",
        )
    )
    squares: list[float] = []
    inner = trainer.optimizer.step

    def recording_step(*args, **kwargs):
        grads = [
            p.grad.detach().double() for g in trainer.optimizer.param_groups for p in g["params"] if p.grad is not None
        ]
        squares.append(float(sum((g * g).sum() for g in grads)))
        return inner(*args, **kwargs)

    trainer.optimizer.step = recording_step
    norms, records = [], []
    try:
        for _ in range(2):
            before = len(squares)
            records.append(trainer.train_step())
            assert len(squares) > before
            norms.append(sum(squares[before:]) ** 0.5)
    finally:
        trainer.close()
    assert all(r["grad_norm"] > 10 * clip for r in records)  # unclipped norms, as logged
    assert norms == pytest.approx([clip, clip], rel=1e-3)


def test_broken_shards_are_reported_before_any_work(cache, tmp_path, capsys):
    """A 0-byte or non-tar shard is a configuration error naming the key and the file (preflight: no model, no
    data loading); a brace range with missing shards is a warning with the count."""
    from data_helpers import write_pair_shards

    from training.trainer import preflight

    shards = tmp_path / "shards"
    write_pair_shards(shards, count=12, per_shard=4)  # pairs-000000..000002.tar
    range_spec = str(shards / "pairs-{000000..000004}.tar")
    config = small_config(cache, tmp_path / "run", f"data.pairs.sources=[{{shards: '{range_spec}'}}]")
    preflight(config)
    err = capsys.readouterr().err
    assert "warning: data.pairs.sources[0].shards: 2 of 5 shards of" in err and "using the other 3" in err
    for content in (b"", b"<html>404 not found</html>" * 30):
        (shards / "pairs-000001.tar").write_bytes(content)
        config = small_config(cache, tmp_path / "run", f"data.pairs.sources=[{{shards: '{shards}'}}]")
        with pytest.raises(ConfigError, match=r"data\.pairs\.sources\[0\]\.shards: 1 of 3 shard") as info:
            preflight(config)
        assert str(shards / "pairs-000001.tar") in str(info.value)


@pytest.mark.timeout(300)
def test_training_on_a_source_of_corrupt_images_stops_with_its_name(cache, tmp_path):
    """It used to spin forever without a step; now the first step fails once 1000 samples in a row were skipped."""
    from data_helpers import write_pair_shards

    from data_pipelines import DataSourceError

    shards = tmp_path / "bad"
    write_pair_shards(shards, count=40, per_shard=20, corrupt=tuple(range(40)))
    config = small_config(
        cache, tmp_path / "run", "run.max_steps=2", f"data.pairs.sources=[{{shards: '{shards}', name: scraped}}]"
    )
    with pytest.raises(DataSourceError, match=r"source 'scraped': the last \d+ samples in a row .* corrupt_image"):
        run_training(config)


@pytest.mark.slow
def test_train_py_exits_with_code_2_when_the_output_dir_is_taken(cache, tmp_path):
    """The command line: a second job on a directory another process holds stops at start-up, before any work."""
    from train_helpers import ROOT, small_args

    holder = subprocess.Popen(
        [sys.executable, "-c", LOCK_HOLDER, str(tmp_path), str(ROOT)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
        proc = subprocess.run(
            [sys.executable, "training/train.py", *small_args(cache, tmp_path, "run.max_steps=1")],
            cwd=ROOT,
            env={**env, "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu"},
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        holder.kill()
        holder.wait()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"'{tmp_path}' is in use by another run (pid {holder.pid} on host" in proc.stderr
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "config.yaml").exists()


# ------------------------------------------------------------------------------------------------ full disk


class FullDiskEngine(FakeEngine):
    """Writes part of a file, then fails as torch does when the disk is full."""

    def __init__(self, error: Exception) -> None:
        super().__init__()
        self.error = error

    def save_checkpoint(self, save_dir, tag, save_latest, exclude_frozen_parameters):
        (Path(save_dir) / tag).mkdir(parents=True, exist_ok=True)
        (Path(save_dir) / tag / MODEL_FILE).write_bytes(b"partial")
        raise self.error


@pytest.mark.parametrize(
    "error, free",
    [
        (RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0"), 0),
        (OSError(28, "No space left on device"), 10 * 2**30),
    ],
)
def test_a_full_disk_during_a_checkpoint_says_so_and_keeps_the_previous_one(tmp_path, monkeypatch, error, free):
    import shutil
    from collections import namedtuple

    manager = _save_steps(tmp_path, [10])
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(2**40, 2**40 - free, free))
    with pytest.raises(CheckpointError) as err:
        manager.save(FullDiskEngine(error), 20, {"step": 20, "world_size": 1, "rng": capture_rng()})
    message = str(err.value)
    assert "No space left on device writing checkpoint step_00000020" in message
    assert str(tmp_path) in message and f"the previous checkpoint {tmp_path / 'step_00000010'} is intact" in message
    assert not (tmp_path / ".staging" / "step_00000020").exists()  # no partial file left behind
    assert manager.latest() == tmp_path / "step_00000010"


def test_other_checkpoint_write_errors_name_the_checkpoint(tmp_path):
    manager = _save_steps(tmp_path, [])
    with pytest.raises(
        CheckpointError, match=r"writing checkpoint step_00000005 to .*\.staging failed \(PermissionError"
    ):
        manager.save(FullDiskEngine(PermissionError("denied")), 5, {"step": 5, "world_size": 1, "rng": capture_rng()})
