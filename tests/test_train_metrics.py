"""Metrics file handling (resume truncation, a line cut by a crash), the loss-curve PNG, caption scoring, and the
checkpoint directory's `latest` pointer."""

from __future__ import annotations

import pytest

from training.checkpoint import TAG_RE, CheckpointManager, tag_for
from training.config import LoggingConfig
from training.distributed import DistContext
from training.evaluation import FewShotSample, format_scene_scores, score_scene_captions
from training.metrics import MetricsLogger, plot_loss_curve, read_records, train_losses


def _record(step: int, loss: float) -> dict:
    return {"step": step, "loss": loss, "lr": 1e-3, "grad_norm": 1.0, "skipped": False, "nonfinite_total": 0,
            "samples": 4, "tokens": 40, "loss_pairs": loss / 2, "loss_documents": loss / 2}  # fmt: skip


def test_metrics_file_is_cut_back_to_the_resumed_step(tmp_path):
    cfg = LoggingConfig(progress_bar=False, tensorboard=False)
    logger = MetricsLogger(tmp_path, cfg, enabled=True, start_step=0, max_steps=10)
    for step in range(1, 6):
        logger.log_step(_record(step, 10.0 - step), seconds=0.5)
    logger.log_eval(4, {"loss": 3.0, "generations": []})
    logger.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "step": 6, "lo')  # a record cut by a crash
    assert sorted(train_losses(tmp_path / "metrics.jsonl")) == [1, 2, 3, 4, 5]

    resumed = MetricsLogger(tmp_path, cfg, enabled=True, start_step=4, max_steps=10)
    resumed.log_step(_record(5, 1.5), seconds=0.5)
    resumed.close()
    records = read_records(tmp_path / "metrics.jsonl")
    assert [(r["kind"], r["step"]) for r in records] == [("train", s) for s in range(1, 5)] + [
        ("eval", 4),
        ("train", 5),
    ]
    assert records[-1]["loss"] == 1.5 and records[-1]["samples_per_s"] == pytest.approx(8.0)

    png = plot_loss_curve(tmp_path / "metrics.jsonl", tmp_path / "curve.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_disabled_logger_writes_nothing(tmp_path):
    logger = MetricsLogger(tmp_path / "x", LoggingConfig(), enabled=False, start_step=0, max_steps=3)
    logger.log_step(_record(1, 1.0), seconds=0.1)
    logger.close()
    assert not (tmp_path / "x").exists()


def test_scene_caption_scores():
    samples = [
        FewShotSample("a red circle at the top.", "a red circle at the top."),
        FewShotSample("two blue squares on the left.", "two green squares on the left."),
        FewShotSample("a red circle at the top.", "not a caption"),
    ]
    scores = score_scene_captions(samples)
    assert scores["exact_match"] == pytest.approx(1 / 3)
    assert scores["well_formed"] == pytest.approx(2 / 3)
    assert scores["attribute_accuracy"] == pytest.approx(5 / 9)  # 3 + 2 + 0 of 3 attributes each
    assert scores["position_accuracy"] == pytest.approx(2 / 3)
    assert (scores["shape_accuracy"], scores["colour_accuracy"], scores["count_accuracy"]) == pytest.approx(
        (2 / 3, 1 / 3, 2 / 3)
    )
    # two groups, one at a position the caption does not name: that group's attributes are all wrong
    two = score_scene_captions(
        [FewShotSample("a red circle at the top and two blue squares on the left.", "a red square at the top.")]
    )
    assert two["position_accuracy"] == 0.5 and two["shape_accuracy"] == 0 and two["colour_accuracy"] == 0.5
    assert two["attribute_accuracy"] == pytest.approx(2 / 6)
    assert "colour 50%" in format_scene_scores(two) and "attributes right: 33.3%" in format_scene_scores(two)


def test_latest_pointer(tmp_path):
    manager = CheckpointManager(tmp_path, DistContext(0, 1, 0, None), keep_last=2)
    assert manager.latest() is None
    (tmp_path / tag_for(7)).mkdir()
    (tmp_path / "latest").write_text(tag_for(7) + "\n")
    assert manager.latest() == tmp_path / "step_00000007"
    (tmp_path / "latest").write_text("step_00000009\n")
    with pytest.raises(RuntimeError, match="step_00000009"):
        manager.latest()
    assert tag_for(123456789) == "step_123456789" and TAG_RE.match(tag_for(123456789))


def _binding_results() -> dict:
    """An evaluate_binding result of two settings with hand-made predictions."""

    def run(ways, shots, ablated, correct):
        preds = [{"query_class": c, "correct": ok} for c, ok in correct]
        acc = 100.0 * sum(ok for _, ok in correct) / len(correct)
        return {"ways": ways, "shots": shots, "ablate_images": ablated, "mean": {"accuracy": acc},
                "trials": [{"predictions": preds}]}  # fmt: skip

    seen, new = "red circle", "blue circle"
    return {
        "runs": [
            run(2, 1, False, [(seen, True), (seen, True), (new, False), (new, True)]),
            run(2, 1, True, [(seen, False), (seen, True), (new, False), (new, False)]),
            run(2, 0, False, [(seen, False), (seen, False), (new, False), (new, False)]),
            run(2, 0, True, [(seen, False), (seen, False), (new, False), (new, False)]),
        ],
        "prototype": {"2-way": {"1": {"mean": 90.0}}},
    }


def test_binding_table_splits_by_the_training_classes(tmp_path):
    from training.evaluation import binding_table, format_binding_rows

    rows = binding_table(_binding_results(), {"red circle"})
    assert [(r["ways"], r["shots"]) for r in rows] == [(2, 0), (2, 1)]
    one = rows[1]
    assert (one["accuracy"], one["ablated"], one["prototype"], one["chance"]) == (75.0, 25.0, 90.0, 50.0)
    assert (one["trained"], one["held_out"]) == (100.0, 50.0)
    assert (one["trained_episodes"], one["held_out_episodes"]) == (2, 2)
    assert rows[0]["prototype"] is None and rows[0]["accuracy"] == 0.0
    everything = binding_table(_binding_results(), {"red circle", "blue circle"})
    assert everything[1]["held_out"] is None and everything[1]["trained"] == 75.0
    text = format_binding_rows(rows)
    assert "held-out" in text and "  2     1    75.0    100.0      50.0     25.0       90.0    50.0" in text

    logger = MetricsLogger(tmp_path, LoggingConfig(progress_bar=False, tensorboard=False), True, 0, 2)
    logger.log_step(_record(1, 2.0), seconds=0.5)
    logger.close()
    final = {"images": {"attribute_accuracy": 0.7}, "ablated": {"attribute_accuracy": 0.1},
             "binding": {"table": rows}}  # fmt: skip
    png = plot_loss_curve(tmp_path / "metrics.jsonl", tmp_path / "curve.png", final=final)
    from PIL import Image

    assert (
        Image.open(png).size[0] > Image.open(plot_loss_curve(tmp_path / "metrics.jsonl", tmp_path / "c2.png")).size[0]
    )
