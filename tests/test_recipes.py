"""Smoke tests of the real-data recipes on tiny data made here (never on the real data sets)."""

import io
import json
import math
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from recipes import cifar10_perceiver, shakespeare_ar  # noqa: E402
from recipes.common import CpuBudget, lr_factor  # noqa: E402


def make_cifar_archive(path: Path, per_class: dict[str, int]) -> None:
    """A tar.gz of 32x32 JPEGs ``<split>/<class>/NNNN.jpg``: 'red' images are reddish, 'blue' bluish."""
    rng = np.random.default_rng(0)
    with tarfile.open(path, "w:gz") as tar:
        for split, n in per_class.items():
            for cls, channel in (("red", 0), ("blue", 2)):
                for i in range(n):
                    img = rng.integers(0, 90, (32, 32, 3), dtype=np.uint8)
                    img[..., channel] += 150
                    buf = io.BytesIO()
                    Image.fromarray(img).save(buf, format="JPEG", quality=95)
                    info = tarfile.TarInfo(f"{split}/{cls}/{i:04d}.jpg")
                    info.size = buf.tell()
                    buf.seek(0)
                    tar.addfile(info, buf)


TINY_CIFAR = [
    "--num-latents", "4", "--latent-channels", "16", "--self-heads", "2", "--cross-head-channels", "8",
    "--depth", "1", "--self-per-cross", "1", "--num-bands", "2", "--batch-size", "4", "--lr", "3e-3",
    "--num-evals", "2", "--no-progress",
]  # fmt: skip


def test_cifar_recipe_smoke(tmp_path):
    pytest.importorskip("perceiver_pytorch")
    archive = tmp_path / "cifar10.tar.gz"
    make_cifar_archive(archive, {"train": 6, "test": 4})  # 20 images, 2 classes
    out = tmp_path / "out"
    args = [
        "--data",
        str(archive),
        "--budget-cpu-seconds",
        "2",
        "--out",
        str(out),
        "--cache-dir",
        str(tmp_path / "cache"),
    ]
    res = cifar10_perceiver.main(args + TINY_CIFAR)

    saved = json.loads((out / "results.json").read_text())
    assert saved["models"].keys() == {cifar10_perceiver.OURS, cifar10_perceiver.BASELINE}
    assert saved["num_train"] == 12 and saved["num_test"] == 8 and saved["classes"] == ["blue", "red"]
    assert saved["budget_cpu_seconds"] == 2 and saved["threads"] == 1
    for r in saved["models"].values():
        assert r["train_cpu_seconds"] >= 2.0  # trained until the budget was spent
        assert r["train_steps"] > 0 and r["train_images"] == 4 * r["train_steps"]
        assert r["parameters"] > 1000
        assert 0.0 <= r["test_accuracy"] <= 1.0 and (r["test_accuracy"] * 8).is_integer()
        cpu = [p["cpu_seconds"] for p in r["curve"]]
        assert cpu[0] == 0.0 and cpu == sorted(cpu) and len(cpu) >= 3
        assert all(0.0 <= p["test_subset_accuracy"] <= 1.0 for p in r["curve"])
        assert all(math.isfinite(p["train_loss"]) for p in r["curve"][1:])
    # the colour classes are easy: our Perceiver must have learned them within the budget
    assert saved["models"][cifar10_perceiver.OURS]["test_accuracy"] >= 0.75
    assert (out / "curves.png").stat().st_size > 1000
    assert res["models"].keys() == saved["models"].keys()
    # decoded once, then served from the cache
    cached = list((tmp_path / "cache").glob("cifar10-*.pt"))
    assert len(cached) == 1
    again = cifar10_perceiver.load_cifar10(archive, tmp_path / "cache")
    assert again["train_x"].dtype == torch.uint8 and again["train_x"].shape == (12, 32, 32, 3)
    assert again["train_y"].tolist() == [0] * 6 + [1] * 6


def test_cifar_loader_rejects_an_archive_without_test_images(tmp_path):
    archive = tmp_path / "broken.tar.gz"
    make_cifar_archive(archive, {"train": 1})
    with pytest.raises(ValueError, match="holds 2 train and 0 test images"):
        cifar10_perceiver.load_cifar10(archive, tmp_path / "cache")


def test_recipes_have_help_and_reject_bad_arguments(tmp_path, capsys):
    for recipe in (cifar10_perceiver, shakespeare_ar):
        with pytest.raises(SystemExit) as e:
            recipe.main(["--help"])
        assert e.value.code == 0
        assert "--budget-cpu-seconds" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="is not a file"):
        shakespeare_ar.main(["--data", str(tmp_path / "missing.txt"), "--budget-cpu-seconds", "1"])
    text = tmp_path / "t.txt"
    text.write_text("abc" * 100)
    with pytest.raises(SystemExit, match="--num-latents 50 must be in"):
        shakespeare_ar.main(
            ["--data", str(text), "--budget-cpu-seconds", "1", "--seq-len", "32", "--num-latents", "50"]
        )


TEXT = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n" * 40
TINY_AR = [
    "--seq-len", "32", "--num-latents", "8", "--channels", "32", "--heads", "2", "--self-layers", "1",
    "--batch-size", "8", "--lr", "3e-3", "--num-evals", "2", "--sample-chars", "30",
    "--curve-val-chars", "200", "--no-progress",
]  # fmt: skip


def check_shakespeare_results(saved: dict, budget: float, learned: bool = True) -> None:
    assert saved["models"].keys() == {shakespeare_ar.OURS, shakespeare_ar.BASELINE}
    split = int(len(TEXT) * 0.9)
    assert saved["num_val_chars"] == len(TEXT) - split
    prompt = saved["sample_prompt"]
    assert prompt == TEXT[split : split + 32]  # default prompt: the first seq_len validation characters
    vocab = len(set(TEXT))
    assert saved["vocab_size"] == vocab
    scored = {r["val_chars_scored"] for r in saved["models"].values()}
    assert len(scored) == 1 and scored.pop() % 8 == 0  # both models score the same characters
    for r in saved["models"].values():
        assert r["train_cpu_seconds"] >= budget and r["train_steps"] > 0
        assert r["sample"].startswith(prompt) and len(r["sample"]) == len(prompt) + 30
        assert set(r["sample"]) <= set(TEXT)
        curve = r["curve"]
        assert all(math.isfinite(p["train_bpc"]) for p in curve[1:])
        assert 0.0 < r["val_bits_per_char"] < math.log2(vocab) + 1
        if learned:  # the text repeats itself: both models must beat a uniform guess by far
            assert r["val_bits_per_char"] < 0.4 * math.log2(vocab), r["val_bits_per_char"]
            assert curve[-1]["val_subset_bpc"] < 0.5 * curve[0]["val_subset_bpc"]


def test_shakespeare_recipe_smoke(tmp_path):
    data = tmp_path / "shakespeare.txt"
    data.write_text(TEXT)
    out = tmp_path / "out"
    shakespeare_ar.main(["--data", str(data), "--budget-cpu-seconds", "2", "--out", str(out)] + TINY_AR)
    check_shakespeare_results(json.loads((out / "results.json").read_text()), 2.0)
    assert (out / "curves.png").stat().st_size > 1000


@pytest.mark.slow
def test_shakespeare_recipe_runs_as_a_script(tmp_path):
    data = tmp_path / "shakespeare.txt"
    data.write_text(TEXT)
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "recipes" / "shakespeare_ar.py"), "--data", str(data)]
    cmd += ["--budget-cpu-seconds", "0.5", "--out", str(out)] + TINY_AR
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "val bits/char" in proc.stdout and "perceiver-ar sample" in proc.stdout
    saved = json.loads((out / "results.json").read_text())
    check_shakespeare_results(saved, 0.5, learned=False)
    assert "shakespeare_ar.py" in saved["command"]


def test_cpu_budget_and_learning_rate_schedule():
    budget = CpuBudget(10.0)
    with budget.measure():
        t = time.process_time()
        while time.process_time() - t < 0.05:
            pass
    time.sleep(0.1)  # sleeping outside (or inside) a measured block costs no CPU time
    assert 0.05 <= budget.used < 0.09
    assert not budget.exhausted and budget.fraction == pytest.approx(budget.used / 10.0)
    assert lr_factor(0.0) == pytest.approx(0.01) and lr_factor(0.025) == pytest.approx(0.5)
    assert lr_factor(0.05) == pytest.approx(1.0) and lr_factor(1.0) == pytest.approx(0.1)
    xs = [lr_factor(f / 100) for f in range(5, 101)]
    assert all(a >= b for a, b in zip(xs, xs[1:]))  # monotone decay after warm-up
