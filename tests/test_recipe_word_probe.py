"""The word probe of recipes/flickr8k_word_probe.py: features that hold the words give a probe F1 near 1 and
features that do not give far less; captions that use a photo's words score F1 1 and empty ones 0; the command runs
on a tiny Flickr-layout archive with a tiny export's own tower."""

import json
import shutil

import pytest
import torch
from eval_helpers import tar_directory, write_flickr
from vlm_helpers import TINY_CLIP, build_model, tiny_assets

from recipes.flickr8k_word_probe import main, probe_words, vocabulary, word_labels

WORDS = ["dog", "cat", "red", "blue", "water", "snow", "ball", "tree"]


def _photos(n, seed):
    g = torch.Generator().manual_seed(seed)
    present = torch.rand(n, len(WORDS), generator=g) < 0.2
    captions = []
    for row in present:
        named = [w for w, p in zip(WORDS, row) if p] or ["thing"]
        captions.append([f"A photo {i} of " + " and ".join(named) + " ." for i in range(5)])
    return present.float(), captions


def test_probe_reads_words_the_features_hold_and_captions_are_scored_by_what_they_say():
    y_train, train_caps = _photos(600, 0)
    y_test, test_caps = _photos(200, 1)
    assert set(WORDS) <= set(vocabulary(train_caps, 20))
    assert torch.equal(word_labels(test_caps, WORDS), y_test)
    g = torch.Generator().manual_seed(2)

    def oracle(y):  # the labels themselves, 4 noise columns, a little noise everywhere
        return torch.cat([y, torch.randn(len(y), 4, generator=g)], 1) + 0.05 * torch.randn(len(y), 12, generator=g)

    told = probe_words(oracle(y_train), train_caps, oracle(y_test), test_caps, [c[0] for c in test_caps], 20, 10)
    assert set(WORDS) <= set(told["words"]) and told["test_photos"] == 200
    for w in WORDS:
        assert told["words"][w]["probe_f1"] > 0.95, (w, told["words"][w])
        assert told["words"][w]["caption_f1"] == 1.0  # the caption is one of the references
    noise = probe_words(torch.randn(600, 12, generator=g), train_caps, torch.randn(200, 12, generator=g), test_caps,
                        [""] * 200, 20, 10)  # fmt: skip
    assert noise["mean_probe_f1"] < 0.6 and noise["mean_caption_f1"] == 0.0
    with pytest.raises(ValueError, match="predictions for"):
        probe_words(y_train, train_caps, y_test, test_caps, ["a dog"], 20, 10)


@pytest.mark.slow
def test_command_line_on_a_tiny_archive(tmp_path, capsys):
    torch.set_num_threads(1)
    base = write_flickr(tmp_path / "src", num_train=12, num_test=4, num_dev=1)
    tar = tar_directory(base, tmp_path / "flickr8k.tar")
    model, _, _ = build_model("llama")
    export = tmp_path / "export"
    model.save_pretrained(export)
    (export / "bases" / "open_clip").mkdir(parents=True)
    shutil.copy(f"{tiny_assets()['clip_dir']}/{TINY_CLIP}.json", export / "bases" / "open_clip")
    ids = [line.strip().rsplit(".", 1)[0] for line in (base / "Flickr_8k.testImages.txt").read_text().split()]
    preds = tmp_path / "predictions.jsonl"
    preds.write_text("".join(json.dumps({"id": i, "prediction": "a dog runs on the grass"}) + "\n" for i in ids))
    out = tmp_path / "probe.json"
    argv = ["--data", str(tar), "--predictions", str(preds), "--model-dir", str(export), "--min-support", "1",
            "--cache-dir", str(tmp_path / "cache"), "--out", str(out)]  # fmt: skip
    result = main(argv)
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(result)) and saved["train_photos"] == 12 and saved["test_photos"] == 4
    assert saved["num_words"] == len(saved["words"]) > 0
    for r in saved["words"].values():
        assert 0 <= r["probe_f1"] <= 1 and 0 <= r["caption_f1"] <= 1 and r["photos"] >= 1
    assert "| word | photos | probe F1 | caption F1 |" in capsys.readouterr().out
    preds.write_text(json.dumps({"id": "not-a-test-photo", "prediction": "x"}) + "\n")
    with pytest.raises(SystemExit, match="not test photos"):
        main(argv)
