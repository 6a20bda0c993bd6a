"""Wrong data gets a clear error naming what is wrong and where: two labels in a sample, a key used twice, a
corrupt sizes.json, an evaluation of nothing, file names that are not UTF-8, a resume refused for a reason."""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
from pathlib import Path

import pytest
import torch
from test_data_pipeline import _cfg, _video, make_shards

from inti_adapters.data import build_dataloader, encode_video, write_shards
from inti_adapters.data._lock import OutputLock
from inti_adapters.train.evaluate import evaluate


def _tar(path: Path, members: list[tuple[str, bytes]]) -> str:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def _sample(key: str, label: int) -> list[tuple[str, bytes]]:
    return [(f"{key}.mp4", _video(label, 4)), (f"{key}.cls", str(label).encode())]


@pytest.mark.parametrize("train", [True, False])
def test_a_sample_with_two_labels_is_refused_naming_its_key(tmp_path, train):
    shard = _tar(tmp_path / "two.tar", _sample("a", 0) + _sample("b", 1) + [("b.cls", b"2")] + _sample("c", 0))
    with pytest.raises(ValueError, match=r"sample 'b' of .*two\.tar: two '\.cls' members \(member 'b\.cls' repeats"):
        list(build_dataloader(_cfg(shard, batch_size=1, train_samples=3), train=train))


def test_a_duplicate_key_is_reported_as_such(tmp_path):
    shard = _tar(tmp_path / "dup.tar", _sample("a", 0) + _sample("b", 1) + _sample("a", 2))
    with pytest.raises(ValueError, match=r"sample 'a' of .*dup\.tar: duplicate sample key 'a'"):
        list(build_dataloader(_cfg(shard, batch_size=1), train=False))


def test_a_corrupt_sizes_json_is_named(tmp_path):
    shards = make_shards(tmp_path / "s", [4])
    (tmp_path / "s" / "sizes.json").write_text('{"part-000000.tar": 4,')
    with pytest.raises(ValueError, match=rf"{tmp_path}/s/sizes\.json is not valid JSON .*rewrite or remove it"):
        build_dataloader(_cfg(shards), train=True)
    (tmp_path / "s" / "sizes.json").write_text('{"part-000000.tar": "four"}')
    with pytest.raises(ValueError, match=r"sizes\.json must be a JSON object mapping shard file names to sample counts"):
        build_dataloader(_cfg(shards), train=False)


def test_evaluating_no_sample_fails(tmp_path, caplog):
    shards = make_shards(tmp_path / "s", [3], bad={0: b"junk", 1: b"junk", 2: b"junk"})
    loader = build_dataloader(_cfg(shards), train=False)
    with caplog.at_level(logging.ERROR), pytest.raises(RuntimeError, match=r"evaluation saw no sample .*1 shard\(s\) "
                                                                          r"\(.*part-000000\.tar\)"):
        evaluate(lambda x: torch.zeros(x.shape[0], 3), loader)
    with pytest.raises(RuntimeError, match="saw no sample .* from the loader list"):
        evaluate(lambda x: torch.zeros(x.shape[0], 3), [])


def _tree(root: Path) -> Path:
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        for i in range(2):
            (root / c / f"{i}.mp4").write_bytes(_video(i, 4))
    return root


def test_a_file_name_that_is_not_utf8_is_skipped_counted_and_named(tmp_path, caplog):
    root = _tree(tmp_path / "v")
    with open(os.fsencode(root / "cat") + b"/bad\xff.mp4", "wb") as f:
        f.write(_video(3, 4))
    with caplog.at_level(logging.WARNING, logger="inti_adapters.data"):
        summary = write_shards(source=str(root), output=str(tmp_path / "out"), samples_per_shard=3, progress=False)
    assert summary.written == 4 and summary.skipped == 1
    assert summary.skipped_videos == [("cat/bad\\xff.mp4", "its file name is not valid UTF-8 (rename it)")]
    assert "skipped cat/bad\\xff.mp4 under" in caplog.text


def test_resume_accepts_the_same_videos_by_relative_or_absolute_path(tmp_path, monkeypatch):
    _tree(tmp_path / "videos")
    monkeypatch.chdir(tmp_path)
    first = write_shards(source="videos", output="shards", samples_per_shard=3, progress=False)
    again = write_shards(source=str(tmp_path / "videos"), output="shards", samples_per_shard=3, progress=False)
    assert again.resumed_shards == len(first.shards) == 2 and again.written == 4
    with pytest.raises(ValueError, match=r"different run \(samples_per_shard 3 then, 2 now\)"):
        write_shards(source="videos", output="shards", samples_per_shard=2, progress=False)
    (tmp_path / "videos" / "dog" / "2.mp4").write_bytes(encode_video(torch.zeros(3, 8, 8, 3).byte().numpy(), 8))
    with pytest.raises(ValueError, match=r"other videos: 4 videos from 'videos' then, 5 from 'videos' now"):
        write_shards(source="videos", output="shards", samples_per_shard=3, progress=False)
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert manifest["num_items"] == 4 and manifest["source"] == "videos"


def test_two_inti_shards_runs_on_one_output_are_refused(tmp_path):
    root = _tree(tmp_path / "v")
    with OutputLock(tmp_path / "out", "inti-shards"), pytest.raises(
            ValueError, match=rf"{tmp_path}/out is being written by another inti-shards run \(pid {os.getpid()} on host"):
        write_shards(source=str(root), output=str(tmp_path / "out"), progress=False)
    assert write_shards(source=str(root), output=str(tmp_path / "out"), progress=False).written == 4  # released
