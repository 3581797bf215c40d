"""Caption CSV files are read strictly, by the writers and by vlm.eval alike: a malformed row is an error that
names the file and the line, never a silently wrong reference."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from data_pipelines.from_captions import read_caption_csv, read_caption_rows, write_caption_shards
from data_pipelines.shards import ShardWriterConfig
from vlm.eval.datasets import load_flickr

GOOD = 'image,caption\na.jpg,A dog runs .\na.jpg,"A dog, brown, runs ."\nb.jpg,A cat sits .\n'


def _write(tmp_path: Path, text: str | bytes, name: str = "captions.txt") -> Path:
    path = tmp_path / name
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


def test_a_well_formed_file_reads_every_row(tmp_path):
    rows = read_caption_csv(_write(tmp_path, GOOD))
    assert rows == [("a.jpg", "A dog runs ."), ("a.jpg", "A dog, brown, runs ."), ("b.jpg", "A cat sits .")]


@pytest.mark.parametrize(
    "bad_row, message",
    [
        ("c.jpg,a caption, with, extra, commas,", r"captions.txt:3: expected 2 fields \(image, caption\), got 6"),
        ("c.jpg", r"captions.txt:3: expected 2 fields \(image, caption\), got 1"),
        (',"a caption"', r"captions.txt:3: empty image name"),
    ],
)
def test_a_malformed_row_names_the_file_and_line(tmp_path, bad_row, message):
    path = _write(tmp_path, f"image,caption\na.jpg,ok .\n{bad_row}\nb.jpg,fine .\n")
    with pytest.raises(ValueError, match=message):
        read_caption_csv(path)


def test_an_unterminated_quote_is_an_error_not_a_swallowed_caption(tmp_path):
    path = _write(tmp_path, 'image,caption\na.jpg,"an open quote .\nb.jpg,swallowed .\nc.jpg,also swallowed .\n')
    with pytest.raises(
        ValueError, match=r"captions.txt:2: malformed CSV \(unexpected end of data\) \(an unterminated quote\?\)"
    ):
        read_caption_csv(path)
    closed_later = _write(tmp_path, 'image,caption\na.jpg,"open .\nb.jpg,swallowed .\nc.jpg,closed"\nd.jpg,ok .\n')
    with pytest.raises(ValueError, match=r"captions.txt:2-4: a quoted field runs over 3 lines"):
        read_caption_csv(closed_later)


def test_empty_captions_come_back_empty_for_the_caller_to_skip(tmp_path):
    rows = read_caption_csv(_write(tmp_path, "image,caption\na.jpg ,  \nb.jpg,ok .\n"))
    assert rows == [("a.jpg", ""), ("b.jpg", "ok .")]


def test_invalid_utf8_and_huge_fields_name_the_file(tmp_path):
    with pytest.raises(ValueError, match="captions.txt: not UTF-8"):
        read_caption_csv(_write(tmp_path, b"image,caption\na.jpg,caf\xe9 .\n"))
    with pytest.raises(ValueError, match=r"captions.txt:\d+: malformed CSV \(field larger than field limit"):
        read_caption_csv(_write(tmp_path, "image,caption\na.jpg," + "x" * 1_000_000 + "\n"))


def test_a_missing_column_names_the_header(tmp_path):
    with pytest.raises(ValueError, match="has no column 'caption'"):
        read_caption_csv(_write(tmp_path, "image,text\na.jpg,x\n"))


def _flickr_layout(root: Path, captions: str) -> Path:
    (root / "Images").mkdir(parents=True)
    for name in ("a.jpg", "b.jpg"):
        Image.new("RGB", (8, 8), (10, 20, 30)).save(root / "Images" / name)
    (root / "Flickr_8k.testImages.txt").write_text("a.jpg\nb.jpg\n")
    (root / "captions.txt").write_text(captions)
    return root


def test_vlm_eval_refuses_a_malformed_reference_file(tmp_path):
    root = _flickr_layout(tmp_path / "flickr", "image,caption\na.jpg,one, two, three\nb.jpg,fine .\n")
    with pytest.raises(ValueError, match=r"captions.txt:2: expected 2 fields"):
        load_flickr(root, "test")


def test_vlm_eval_skips_and_counts_empty_references(tmp_path):
    root = _flickr_layout(tmp_path / "flickr", 'image,caption\na.jpg,"A dog, running ."\na.jpg,  \nb.jpg,fine .\n')
    data = load_flickr(root, "test")
    assert [s.captions for s in data.samples] == [["A dog, running ."], ["fine ."]]
    assert data.identity()["empty_captions_skipped"] == 1


def test_the_writer_refuses_a_malformed_file_before_writing(tmp_path):
    root = _flickr_layout(tmp_path / "flickr", "image,caption\na.jpg,fine .\nb.jpg,a, b\n")
    out = tmp_path / "shards"
    with pytest.raises(ValueError, match=r"captions.txt:3: expected 2 fields"):
        write_caption_shards(
            root / "Images", root / "captions.txt", ShardWriterConfig(out_dir=str(out), prefix="t"), show_progress=False
        )
    assert not out.exists() or not any(out.iterdir())
    assert read_caption_rows(_write(tmp_path, GOOD, "ok.csv"))[1] == ("a.jpg", "A dog, brown, runs .")
