"""Frame sampling and spatial transforms: exact index properties, crop geometry, test-view counts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from inti_adapters.data import DataConfig, dense_indices, sample_indices, uniform_indices
from inti_adapters.data.transforms import (
    random_resized_crop_box,
    resize_short_side,
    spatial_crops,
    train_transform,
)
from inti_adapters.data.transforms import test_views as make_test_views

GRID = [(n, t) for n in (1, 2, 5, 7, 8, 16, 31, 300) for t in (1, 4, 8, 16)]


def _check_indices(idx: np.ndarray, n: int, t: int) -> None:
    assert idx.dtype == np.int64
    assert idx.shape == (t,)
    assert idx.min() >= 0 and idx.max() < n
    assert np.all(np.diff(idx) >= 0), f"not sorted: {idx}"


@pytest.mark.parametrize("n,t", GRID)
def test_uniform_indices_properties(n, t):
    rng = np.random.default_rng(n * 100 + t)
    for _ in range(20):
        idx = uniform_indices(n, t, rng=rng)
        _check_indices(idx, n, t)
        # one frame per segment: frame i comes from [floor(i n / t), ceil((i + 1) n / t))
        lo = np.floor(np.arange(t) * n / t)
        hi = np.ceil((np.arange(t) + 1) * n / t)
        assert np.all(idx >= lo) and np.all(idx < hi)
        if n % t == 0:  # whole-frame segments: all distinct
            assert len(set(idx.tolist())) == t
    test_idx = uniform_indices(n, t)
    _check_indices(test_idx, n, t)
    np.testing.assert_array_equal(test_idx, uniform_indices(n, t))  # deterministic


def test_uniform_test_clips_are_offsets_within_segments():
    clips = [uniform_indices(40, 4, clip_index=c, num_clips=2) for c in range(2)]
    np.testing.assert_array_equal(clips[0], [2, 12, 22, 32])  # (i + 0.25) * 10
    np.testing.assert_array_equal(clips[1], [7, 17, 27, 37])  # (i + 0.75) * 10
    np.testing.assert_array_equal(uniform_indices(40, 4), [5, 15, 25, 35])


@pytest.mark.parametrize("n,t", GRID)
@pytest.mark.parametrize("stride", [1, 2, 4])
def test_dense_indices_properties(n, t, stride):
    span = (t - 1) * stride + 1
    starts = set()
    for s in range(20):
        idx = dense_indices(n, t, stride, rng=np.random.default_rng(s))
        _check_indices(idx, n, t)
        if n >= span:
            np.testing.assert_array_equal(np.diff(idx), np.full(t - 1, stride))
            starts.add(int(idx[0]))
        else:  # short video: uniform segments over the whole video
            np.testing.assert_array_equal(idx, uniform_indices(n, t, rng=np.random.default_rng(s)))
    if n >= span + 4:
        assert len(starts) > 1, "training starts should vary"
    for c in range(3):
        _check_indices(dense_indices(n, t, stride, clip_index=c, num_clips=3), n, t)


def test_dense_test_clips_cover_the_video():
    clips = [dense_indices(100, 8, 2, clip_index=c, num_clips=3) for c in range(3)]
    assert clips[0][0] == 0 and clips[-1][-1] == 99  # first clip at the start, last one ends at the end
    assert clips[1][0] == round((100 - 15) / 2)
    np.testing.assert_array_equal(dense_indices(100, 8, 2), 42 + 2 * np.arange(8))  # centred single clip


def test_short_video_repeats_frames_but_keeps_count():
    for mode in ("uniform", "dense"):
        idx = sample_indices(mode, 3, 8, stride=4, rng=np.random.default_rng(0))
        _check_indices(idx, 3, 8)
        assert set(idx.tolist()) == {0, 1, 2}  # every frame of the short video is used


def test_sampling_rejects_bad_input():
    with pytest.raises(ValueError, match="at least 1"):
        uniform_indices(0, 8)
    with pytest.raises(ValueError, match="clip_index"):
        uniform_indices(10, 4, clip_index=2, num_clips=2)
    with pytest.raises(ValueError, match="sampling mode"):
        sample_indices("random", 10, 4)
    with pytest.raises(ValueError, match="stride"):
        dense_indices(10, 4, 0)


def test_random_resized_crop_box_bounds_and_area():
    rng = np.random.default_rng(0)
    for h, w in [(64, 64), (120, 200), (300, 90)]:
        for _ in range(100):
            top, left, ch, cw = random_resized_crop_box(h, w, (0.3, 0.9), (3 / 4, 4 / 3), rng)
            assert 0 <= top and top + ch <= h and 0 <= left and left + cw <= w
            assert ch >= 1 and cw >= 1
    # a range that cannot be met falls back to the largest centred crop with a ratio inside the range
    top, left, ch, cw = random_resized_crop_box(10, 100, (0.99, 1.0), (0.9, 1.1), np.random.default_rng(0))
    assert ch == 10 and cw == 11 and left == (100 - 11) // 2


def _ramp_clip(t=4, h=40, w=60) -> torch.Tensor:
    x = torch.arange(w, dtype=torch.float32).view(1, 1, 1, w).expand(t, 3, h, w) * 4
    return x.clamp(0, 255).to(torch.uint8).contiguous()


def test_train_transform_shape_and_flip():
    clip = _ramp_clip()
    rng = np.random.default_rng(0)
    out = train_transform(clip, crop_size=32, short_side=36, scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3),
                          hflip=False, rng=rng)
    assert out.shape == (4, 3, 32, 32) and out.dtype == torch.uint8
    # without flip, a left-to-right ramp stays increasing
    assert (out[..., 1:].int() - out[..., :-1].int()).min() >= 0
    # same frames get the same crop: all frames of the constant-in-time clip are identical
    assert torch.equal(out[0], out[-1])
    flips = 0
    for s in range(20):
        o = train_transform(clip, crop_size=32, short_side=36, scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3),
                            hflip=True, rng=np.random.default_rng(s))
        flips += int(o[0, 0, 0, 0] > o[0, 0, 0, -1])
    assert 0 < flips < 20


def test_spatial_crops_positions():
    clip = torch.zeros(2, 3, 10, 16, dtype=torch.uint8)
    clip[..., :, :] = torch.arange(16, dtype=torch.uint8)
    crops = spatial_crops(clip, 10, 3)
    assert [int(c[0, 0, 0, 0]) for c in crops] == [0, 3, 6]  # left, centre, right
    tall = clip.transpose(-1, -2).contiguous()  # 16 x 10 portrait frames: top / centre / bottom
    assert [int(c[0, 0, 0, 0]) for c in spatial_crops(tall, 10, 3)] == [0, 3, 6]
    (centre,) = spatial_crops(clip, 10, 1)
    assert int(centre[0, 0, 0, 0]) == 3
    with pytest.raises(ValueError, match="smaller than crop_size"):
        spatial_crops(clip, 12, 1)


def test_test_views_count_and_resize():
    clip = torch.randint(0, 255, (4, 3, 48, 64), dtype=torch.uint8)
    views = make_test_views(clip, crop_size=24, short_side=24, num_crops=3)
    assert len(views) == 3 and all(v.shape == (4, 3, 24, 24) for v in views)
    assert resize_short_side(clip, 24).shape[-2:] == (24, 32)


def test_data_config_validation():
    cfg = DataConfig(train_shards="a-{0..3}.tar", crop_size=64)
    assert cfg.resolved_short_side == 73 and cfg.num_views == 1
    assert DataConfig(num_clips=4, num_crops=3).num_views == 12
    assert DataConfig.from_dict(cfg.to_dict()) == cfg  # JSON/YAML round trip (tuples come back as tuples)
    for bad, match in [
        (dict(sampling="random"), "sampling"),
        (dict(num_crops=2), "num_crops"),
        (dict(scale=(0.8, 0.2)), "scale"),
        (dict(short_side=100, crop_size=224), "short_side"),
        (dict(decoder="ffmpeg"), "decoder"),
        (dict(num_frames=0), "num_frames"),
        (dict(batch_size=True), "batch_size"),
        (dict(train_shards=[]), "empty"),
    ]:
        with pytest.raises(ValueError, match=match):
            DataConfig(**bad)
    with pytest.raises(TypeError, match="train_shards"):
        DataConfig(train_shards=3)
