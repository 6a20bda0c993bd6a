"""Annotation parsing: Kinetics CSV, 'path,label' CSV, Something-Something JSON, folder trees."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from inti_adapters.data import (
    ShardWriterConfig,
    encode_video,
    load_class_index,
    read_annotations,
    write_shards,
)
from inti_adapters.data.annotations import detect_format


def _video(path: Path, frames: int = 4, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    path.write_bytes(encode_video(rng.integers(0, 255, (frames, 16, 16, 3), dtype=np.uint8), 8))


KINETICS = """label,youtube_id,time_start,time_end,split
abseiling,aaa,0,10,train
playing guitar,bbb,12,22,train
abseiling,ccc,5,15,val
playing guitar,ddd,1,11,train
"""


def test_kinetics_csv(tmp_path):
    csv_path = tmp_path / "train.csv"
    csv_path.write_text(KINETICS)
    root = tmp_path / "videos"
    _video(root / "aaa_000000_000010.mp4")                     # flat under the root
    _video(root / "playing_guitar" / "bbb_000012_000022.mp4")   # under the label, spaces as '_'
    _video(root / "val" / "abseiling" / "ccc_000005_000015.mp4")  # under split/label
    # ddd is missing on disk
    cfg = ShardWriterConfig(source=str(csv_path), output=str(tmp_path / "out"), video_root=str(root))
    assert detect_format(csv_path) == "kinetics_csv"
    ann = read_annotations(cfg)
    assert ann.class_names == ["abseiling", "playing guitar"]
    by_name = {Path(it.path).name: (it.path, it.label) for it in ann.items}
    assert set(by_name) == {"aaa_000000_000010.mp4", "bbb_000012_000022.mp4", "ccc_000005_000015.mp4",
                            "ddd_000001_000011.mp4"}
    assert by_name["bbb_000012_000022.mp4"] == (str(root / "playing_guitar" / "bbb_000012_000022.mp4"), 1)
    assert by_name["ccc_000005_000015.mp4"][0] == str(root / "val" / "abseiling" / "ccc_000005_000015.mp4")
    train_only = read_annotations(ShardWriterConfig(source=str(csv_path), output="o", video_root=str(root),
                                                    split="train"))
    assert len(train_only.items) == 3
    # the missing video is skipped and counted by the writer, the others are written
    summary = write_shards(cfg, progress=False, samples_per_shard=10)
    assert (summary.written, summary.skipped) == (3, 1)
    assert summary.skipped_videos[0][0] == "ddd_000001_000011.mp4" and "not found" in summary.skipped_videos[0][1]


def test_path_csv_with_header_and_integer_labels(tmp_path):
    for i in range(3):
        _video(tmp_path / "clips" / f"c{i}.mp4", seed=i)
    (tmp_path / "list.csv").write_text("path,label\nclips/c0.mp4,2\nclips/c1.mp4,0\n\nclips/c2.mp4,2\n")
    ann = read_annotations(ShardWriterConfig(source=str(tmp_path / "list.csv"), output="o"))
    assert [(Path(i.path).name, i.label) for i in ann.items] == [("c0.mp4", 2), ("c1.mp4", 0), ("c2.mp4", 2)]
    assert ann.class_names == ["0", "1", "2"]
    # named labels, no header, classes reused from an index file
    (tmp_path / "named.csv").write_text("clips/c0.mp4,dog\nclips/c1.mp4,cat\n")
    (tmp_path / "classes.json").write_text(json.dumps({"dog": 0, "cat": 1, "emu": 2}))
    ann = read_annotations(ShardWriterConfig(source=str(tmp_path / "named.csv"), output="o",
                                             classes_from=str(tmp_path / "classes.json")))
    assert [i.label for i in ann.items] == [0, 1] and ann.class_names == ["dog", "cat", "emu"]
    (tmp_path / "bad.csv").write_text("clips/c0.mp4,wolf\n")
    with pytest.raises(ValueError, match="wolf"):
        read_annotations(ShardWriterConfig(source=str(tmp_path / "bad.csv"), output="o",
                                           classes_from=str(tmp_path / "classes.json")))


def test_ssv2_json(tmp_path):
    labels = {"Moving something from left to right": "0", "Pushing something so that it falls off": "1"}
    (tmp_path / "labels.json").write_text(json.dumps(labels))
    entries = [
        {"id": "101", "template": "Moving [something] from left to right", "label": "moving a cup from left to right"},
        {"id": "102", "template": "Pushing [something] so that it falls off", "placeholders": ["pen"]},
        {"id": "103", "label": "Moving something from left to right"},
        {"id": "104"},  # test split: no label -> left out and counted
    ]
    (tmp_path / "train.json").write_text(json.dumps(entries))
    vids = tmp_path / "videos"
    _video(vids / "101.webm")  # content is mp4, the extension is what SSv2 ships
    _video(vids / "102.mp4")
    _video(vids / "103.webm")
    cfg = ShardWriterConfig(source=str(tmp_path / "train.json"), output=str(tmp_path / "out"), video_root=str(vids),
                            labels_file=str(tmp_path / "labels.json"))
    ann = read_annotations(cfg)
    assert [(Path(i.path).name, i.label) for i in ann.items] == [("101.webm", 0), ("102.mp4", 1), ("103.webm", 0)]
    assert ann.unlabelled == ["104"]
    assert ann.class_names == list(labels)
    summary = write_shards(cfg, progress=False)
    assert summary.written == 3 and summary.unlabelled == 1
    assert load_class_index(tmp_path / "out" / "classes.json") == list(labels)
    with tarfile.open(summary.shards[0]) as tar:
        exts = sorted(n.rsplit(".", 1)[1] for n in tar.getnames())
    assert exts.count("webm") == 2 and exts.count("mp4") == 1  # copied videos keep their extension
    with pytest.raises(ValueError, match="labels_file"):
        read_annotations(ShardWriterConfig(source=str(tmp_path / "train.json"), output="o"))
    entries.append({"id": "105", "template": "Juggling [something]"})
    (tmp_path / "train.json").write_text(json.dumps(entries))
    with pytest.raises(ValueError, match="Juggling something"):
        read_annotations(cfg)


def test_folder_and_format_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no class sub-folders"):
        read_annotations(ShardWriterConfig(source=str(tmp_path / "empty"), output="o"))
    (tmp_path / "empty" / "cls").mkdir()
    (tmp_path / "empty" / "cls" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="no video files"):
        read_annotations(ShardWriterConfig(source=str(tmp_path / "empty"), output="o"))
    (tmp_path / "list.txt").write_text("x")
    with pytest.raises(ValueError, match="cannot tell the layout"):
        read_annotations(ShardWriterConfig(source=str(tmp_path / "list.txt"), output="o"))
    with pytest.raises(ValueError, match="reencode"):
        ShardWriterConfig(source="a", output="b", short_side=128)
    with pytest.raises(ValueError, match="format"):
        ShardWriterConfig(source="a", output="b", format="imagenet")
