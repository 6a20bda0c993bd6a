"""The built-in moving-digits data set: labels, motion, disjoint scans, caching, encode/decode fidelity."""

from __future__ import annotations

import json
import tarfile

import numpy as np
import pytest
import torch

from inti_adapters.data import (
    DIRECTIONS,
    build_dataloader,
    decode_label,
    ensure_builtin_dataset,
    label_accuracies,
    make_label,
    open_video,
)
from inti_adapters.data import digits as digits_mod

SMALL = dict(num_train=48, num_val=24, samples_per_shard=16, seed=3)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return ensure_builtin_dataset(tmp_path_factory.mktemp("digits"), workers=1, **SMALL)


def _samples(shards):
    for s in shards:
        with tarfile.open(s) as tar:
            members = {}
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                members.setdefault(key, {})[ext] = tar.extractfile(m).read()
        yield from members.values()


def test_label_codec():
    assert [decode_label(make_label(d, r)) for d in (0, 9) for r in range(4)] == [
        (0, 0), (0, 1), (0, 2), (0, 3), (9, 0), (9, 1), (9, 2), (9, 3)]
    assert sorted(make_label(d, r) for d in range(10) for r in range(4)) == list(range(40))
    labels = torch.arange(40)
    d, r = decode_label(labels)
    assert torch.equal(d * 4 + r, labels) and d.max() == 9 and r.max() == 3
    with pytest.raises(ValueError):
        decode_label(40)
    with pytest.raises(ValueError):
        make_label(3, 4)
    # a model that gets the axis right but the sign wrong: direction accuracy 0, axis accuracy 1
    target = torch.tensor([make_label(1, 0), make_label(2, 3)])
    pred = torch.tensor([make_label(1, 1), make_label(2, 2)])
    acc = label_accuracies(pred, target)
    assert acc == {"accuracy": 0.0, "digit": 1.0, "direction": 0.0, "axis": 1.0}


def test_shards_labels_and_metadata(small):
    assert small.num_classes == 40 and len(small.class_names) == 40 and small.class_names[5] == "1-left"
    assert (small.num_frames, small.image_size) == (8, 64)
    assert len(small.train_shards) == 3 and len(small.val_shards) == 2
    scans = {"train": set(), "val": set()}
    from sklearn.datasets import load_digits

    targets = load_digits().target
    for split, shards in (("train", small.train_shards), ("val", small.val_shards)):
        metas = [json.loads(s["json"]) | {"cls": int(s["cls"])} for s in _samples(shards)]
        assert len(metas) == SMALL[f"num_{split}"]
        for m in metas:
            assert m["cls"] == m["label"] == make_label(m["digit"], DIRECTIONS.index(m["direction"]))
            assert decode_label(m["cls"]) == (m["digit"], DIRECTIONS.index(m["direction"]))
            assert targets[m["scan"]] == m["digit"]  # the label's digit is the scan's true digit
            scans[split].add(m["scan"])
    assert not scans["train"] & scans["val"]  # disjoint digit scans
    train_ids, val_ids = digits_mod.split_scans(1797, 0.2, SMALL["seed"])
    assert scans["train"] <= set(train_ids.tolist()) and scans["val"] <= set(val_ids.tolist())
    assert not set(train_ids.tolist()) & set(val_ids.tolist()) and len(train_ids) + len(val_ids) == 1797


def test_digits_move_in_the_labelled_direction(small):
    for s in _samples(small.val_shards):
        direction = DIRECTIONS[int(s["cls"]) % 4]
        video = open_video(s["mp4"]).get_frames(range(8)).float()[:, 0]  # (T, H, W)
        mass = (video - 20).clamp(min=0)
        ys = (mass.sum(2) * torch.arange(64)).sum(1) / mass.sum((1, 2))
        xs = (mass.sum(1) * torch.arange(64)).sum(1) / mass.sum((1, 2))
        dx, dy = float(xs[-1] - xs[0]), float(ys[-1] - ys[0])
        expected = {"right": dx > 8, "left": dx < -8, "down": dy > 8, "up": dy < -8}[direction]
        assert expected, (direction, dx, dy)
        assert abs(dy if direction in ("right", "left") else dx) < 2  # straight line along one axis


def test_order_blind_frame_sets_are_identical_across_signs():
    """A right- and a left-moving clip over the same path hold the same frames in reverse order."""
    opts = digits_mod.DigitsOptions()
    for seed in range(5):
        for fwd, back in ((0, 1), (2, 3)):
            p = digits_mod._path(opts, fwd, np.random.default_rng(seed))
            q = digits_mod._path(opts, back, np.random.default_rng(seed))
            np.testing.assert_array_equal(p, q[::-1])


def test_encode_decode_is_near_lossless():
    opts = digits_mod.DigitsOptions()
    scans, _ = digits_mod._load_scans(opts.digit_size)
    rng = np.random.default_rng(0)
    frames = digits_mod.render_clip(opts, scans, 17, 2, rng, distractor_scan=40)
    decoded = open_video(digits_mod.encode_video(frames, opts.fps, crf=opts.crf)).get_frames(range(8))
    err = (decoded.permute(0, 2, 3, 1).int() - torch.from_numpy(frames).int()).abs().float()
    assert decoded.shape == (8, 3, 64, 64)
    assert err.mean() < 2.0 and np.percentile(err.numpy(), 99) < 12


def test_cache_and_regeneration(tmp_path, monkeypatch):
    calls = []
    real = digits_mod._generate
    monkeypatch.setattr(digits_mod, "_generate", lambda *a: calls.append(1) or real(*a))
    opts = dict(num_train=8, num_val=4, samples_per_shard=4, num_frames=4, image_size=32, digit_size=12)
    a = ensure_builtin_dataset(tmp_path, workers=1, **opts)
    first = {p: open(p, "rb").read() for p in a.train_shards}
    b = ensure_builtin_dataset(tmp_path, workers=1, **opts)
    assert len(calls) == 1 and b.train_shards == a.train_shards  # cached
    c = ensure_builtin_dataset(tmp_path, workers=1, **{**opts, "num_train": 12})
    assert len(calls) == 2 and len(c.train_shards) == 3  # options changed: regenerated
    d = ensure_builtin_dataset(tmp_path, workers=1, **opts)
    assert len(calls) == 3 and {p: open(p, "rb").read() for p in d.train_shards} == first  # deterministic
    with pytest.raises(ValueError, match="does not fit"):
        ensure_builtin_dataset(tmp_path, image_size=32, digit_size=24)


def test_read_through_the_pipeline(small):
    cfg = small.to_data_config(batch_size=8, num_clips=2)
    assert cfg.hflip is False and cfg.crop_size == 64 and cfg.train_samples == 48
    loader = build_dataloader(cfg, train=True)
    batches = list(loader)
    assert len(batches) == 6
    video, label = batches[0]
    assert video.shape == (8, 3, 8, 64, 64) and video.dtype == torch.uint8 and label.max() < 40
    ev = list(build_dataloader(cfg, train=False))
    assert sum(len(y) for _, y in ev) == 24 and ev[0][0].shape[1:] == (2, 3, 8, 64, 64)
