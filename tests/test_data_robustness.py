"""Failure modes of issue 13 on the data side: worker pools after torch work, a writer killed with
SIGKILL, a damaged tar header mid-shard, a truncated tar without sizes.json, empty classes."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from inti_adapters.data import DataConfig, build_dataloader, encode_video, write_shards
from inti_adapters.data.shards import SIZES_FILE, ShardSink, shard_pattern, write_json_atomic
from inti_adapters.train.evaluate import evaluate

REPO = Path(__file__).resolve().parent.parent


def _run(code: str, timeout: float, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], timeout=timeout, capture_output=True,
                          text=True, env=env, **kw)


@pytest.mark.slow
def test_worker_pools_after_torch_work_do_not_hang(tmp_path):
    """Forked workers of a process that ran a multi-threaded forward + backward used to block on a futex
    (built-in data generation, the shard writer); DataLoader workers must keep working there too."""
    code = f"""
        import torch, timm, numpy as np
        torch.set_num_threads(2)
        from inti_adapters.data import ensure_builtin_dataset, encode_video, write_shards
        m = timm.create_model('vit_tiny_patch16_224', num_classes=10, img_size=32, patch_size=8, depth=3,
                              embed_dim=32, num_heads=2)
        m(torch.randn(4, 3, 32, 32)).sum().backward()
        ds = ensure_builtin_dataset({str(tmp_path / 'd')!r}, workers=2, num_train=32, num_val=8, num_frames=4,
                                    image_size=32, digit_size=12, samples_per_shard=16, store='frames')
        from inti_adapters.data import build_dataloader  # DataLoader workers (fork) after torch work too
        assert sum(len(y) for _, y in build_dataloader(ds.to_data_config(num_workers=2, batch_size=4), train=True)) == 32
        import pathlib
        root = pathlib.Path({str(tmp_path / 'v')!r})
        for c in range(2):
            (root / str(c)).mkdir(parents=True)
            for i in range(3):
                (root / str(c) / f'{{i}}.mp4').write_bytes(encode_video(np.full((4, 16, 16, 3), 40 * i, np.uint8), 8))
        s = write_shards(source=str(root), output={str(tmp_path / 'f')!r}, store='frames', workers=2,
                         samples_per_shard=3, progress=False)
        print('ok', s.written)
    """
    result = _run(code, timeout=240)
    assert result.returncode == 0 and "ok 6" in result.stdout, result.stderr[-2000:]


def _tree(root: Path, classes: int = 2, per_class: int = 6) -> Path:
    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            frames = np.full((3 + i % 3, 16, 16, 3), 20 * i + c, np.uint8)
            (root / f"c{c}" / f"v{i}.mp4").write_bytes(encode_video(frames, 8))
    return root


KILLED_WRITER = """
    import sys, time
    from inti_adapters.data import shards
    real, calls = shards.prepare_item, [0]
    def slow(item, options):
        calls[0] += 1
        if calls[0] == 6:  # in the middle of the second shard: tell the test, then wait to be killed
            open(sys.argv[1], "w").close()
            time.sleep(600)
        return real(item, options)
    shards.prepare_item = slow
    shards.write_shards(source=sys.argv[2], output=sys.argv[3], samples_per_shard=4, store=sys.argv[4],
                        progress=False)
"""


@pytest.mark.slow
@pytest.mark.parametrize("store", ["video", "frames"])
def test_sigkill_mid_write_then_rerun_gives_identical_shards(tmp_path, store):
    src = _tree(tmp_path / "videos")
    reference = write_shards(source=str(src), output=str(tmp_path / "ref"), samples_per_shard=4, store=store,
                             progress=False)
    out, ready = tmp_path / "out", tmp_path / "ready"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(KILLED_WRITER), str(ready), str(src), str(out),
                             store], env=env, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not ready.exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "the writer never reached the second shard"
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert sorted(p.name for p in out.glob("*.tar")) == ["shard-000000.tar"]  # no partial shard under a final name
    assert list(out.glob(".shard-000001.tar.*.tmp"))  # the killed shard's temporary is there ...
    summary = write_shards(source=str(src), output=str(out), samples_per_shard=4, store=store, progress=False)
    assert not list(out.glob("*.tmp"))  # ... and removed by the rerun
    assert summary.resumed_shards == 1 and summary.written == 12
    assert {Path(p).name: Path(p).read_bytes() for p in summary.shards} == \
        {Path(p).name: Path(p).read_bytes() for p in reference.shards}


def _shard(path: Path, n: int) -> None:
    with ShardSink(path) as sink:
        for i in range(n):
            sink.add(f"k{i:03d}", {"mp4": encode_video(np.full((3, 16, 16, 3), 10 * i, np.uint8), 8),
                                   "cls": str(i).encode()})
        sink.commit()


def _damage_header(path: Path, member: str) -> None:
    with tarfile.open(path) as tar:
        offset = tar.getmember(member).offset
    data = bytearray(path.read_bytes())
    data[offset:offset + 16] = b"X" * 16  # the header checksum no longer matches
    path.write_bytes(bytes(data))


def test_damaged_tar_header_mid_shard_is_counted_and_fails_evaluation(tmp_path, caplog):
    shard = tmp_path / "val-000000.tar"
    _shard(shard, 15)
    write_json_atomic(tmp_path / SIZES_FILE, {shard.name: 15})
    _damage_header(shard, "k010.mp4")
    cfg = DataConfig(val_shards=[str(shard)], num_frames=2, crop_size=16, short_side=16, batch_size=4)
    loader = build_dataloader(cfg, train=False)
    with caplog.at_level(logging.WARNING, logger="inti_adapters.data"):
        n = sum(len(y) for _, y in loader)
    assert n == 10 and loader.damaged_shards == 1 and loader.samples_missing == 5
    assert str(shard) in caplog.text and "damaged" in caplog.text and "sizes.json lists 15" in caplog.text
    report = loader.read_report
    assert (report.expected, report.read, report.missing) == (15, 10, 5)

    def model(x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(x.shape[0], 15)

    with pytest.raises(RuntimeError, match="read 10 samples but sizes.json lists 15"):
        evaluate(model, build_dataloader(cfg, train=False), mean_std="imagenet")
    with caplog.at_level(logging.WARNING):
        result = evaluate(model, build_dataloader(cfg.replace(on_incomplete="warn"), train=False),
                          mean_std="imagenet")
    assert (result.num_samples, result.expected_samples, result.read_samples) == (10, 15, 10)
    assert "10 of 15 listed samples read" in result.summary() and "not that of the whole set" in caplog.text
    # training goes on past the damage, with the same warning
    train = build_dataloader(cfg.replace(train_shards=[str(shard)], batch_size=2), train=True)
    assert len(list(train)) == 7 and train.damaged_shards >= 1
    # an intact set evaluates without complaint and says so
    ok = tmp_path / "ok"
    ok.mkdir()
    _shard(ok / "val-000000.tar", 5)
    result = evaluate(model, build_dataloader(cfg.replace(val_shards=str(ok)), train=False), mean_std="imagenet")
    assert (result.expected_samples, result.read_samples) == (5, 5)


def test_truncated_tar_without_sizes_names_the_shard(tmp_path):
    shard = tmp_path / "part-000000.tar"
    _shard(shard, 6)
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2 + 100])
    cfg = DataConfig(train_shards=[str(shard)], val_shards=[str(shard)], num_frames=2, crop_size=16, short_side=16)
    for train in (True, False):
        with pytest.raises(ValueError, match=f"shard {shard}"):
            build_dataloader(cfg, train=train)
    header = tmp_path / "h"  # a damaged header (tarfile would silently stop there) is named too
    header.mkdir()
    _shard(header / "part-000000.tar", 6)
    _damage_header(header / "part-000000.tar", "k003.mp4")
    with pytest.raises(ValueError, match="is damaged at byte"):
        build_dataloader(cfg.replace(train_shards=str(header)), train=True)


def test_empty_and_all_corrupt_class_folders(tmp_path, caplog):
    root = _tree(tmp_path / "videos", classes=2, per_class=3)
    (root / "empty").mkdir()
    (root / ".ipynb_checkpoints").mkdir()
    (root / "broken").mkdir()
    for i in range(2):
        (root / "broken" / f"x{i}.mp4").write_bytes(b"not a video" * 20)
    with caplog.at_level(logging.WARNING, logger="inti_adapters.data"):
        summary = write_shards(source=str(root), output=str(tmp_path / "s"), samples_per_shard=2, shuffle=False,
                               progress=False)
    classes = json.loads((tmp_path / "s" / "classes.json").read_text())
    assert list(classes) == ["broken", "c0", "c1"]  # 'empty' and the hidden folder are not classes
    assert "hold no video file (empty)" in caplog.text
    assert summary.empty_classes == ["broken"] and "no sample" in str(summary) and "broken" in caplog.text
    # the 2 broken videos filled a whole shard: it is not written, sizes.json and the pattern skip it
    sizes = json.loads((tmp_path / "s" / SIZES_FILE).read_text())
    assert "shard-000000.tar" not in sizes and sum(sizes.values()) == summary.written == 6
    assert all(Path(p).exists() for p in summary.shards) and len(summary.shards) == 3
    assert summary.pattern.endswith("shard-{000001..000003}.tar")
    assert shard_pattern(["d/shard-000000.tar", "d/shard-000002.tar"]) == "d/shard-??????.tar"  # a gap
    assert build_dataloader(DataConfig(train_shards=summary.pattern, num_frames=2, crop_size=16, short_side=16,
                                       batch_size=2), train=True).epoch_samples == 6
    again = write_shards(source=str(root), output=str(tmp_path / "s"), samples_per_shard=2, shuffle=False,
                         progress=False)
    assert again.resumed_shards == 4 and again.shards == summary.shards
    (root / "c0").rename(tmp_path / "c0")
    (root / "c1").rename(tmp_path / "c1")
    with pytest.raises(ValueError, match="no video of .* could be read"):
        write_shards(source=str(root), output=str(tmp_path / "none"), progress=False)
