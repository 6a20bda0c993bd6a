"""Cascaded InTI weights (the paper's Figure 4), their plot and the ``inti-viz`` command."""

from __future__ import annotations

import av
import numpy as np
import pytest
import timm
import torch
from conftest import IMG, make_vit
from safetensors.torch import load_file

import inti_adapters as ia
from inti_adapters.viz import (
    _infer_layers,
    cascaded_weights,
    frame_groups,
    main,
    plot_cascaded_weights,
    read_clip,
    weighted_frames,
)

GRID = IMG // 8  # conftest's tiny ViT: patch 8


def _perturb(model: ia.InTIModel, seed: int = 0) -> ia.InTIModel:
    """Random InTI heads and temporal tables, so weights differ per token, frame and clip."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.compressors.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.5)
    return model


def _video(batch: int, frames: int, size: int = IMG, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, frames, size, size, generator=torch.Generator().manual_seed(seed))


def _reference(model: ia.InTIModel, video: torch.Tensor) -> torch.Tensor:
    """Cascaded weights by explicit loops over frames, from weights recomputed outside the model."""
    inputs = {}
    handles = [c.register_forward_hook(lambda m, a, o, k=k: inputs.__setitem__(k, a))
               for k, c in model.compressors.items()]
    with torch.no_grad():
        model.eval()(video)
    for h in handles:
        h.remove()
    weights = []
    with torch.no_grad():
        for k in sorted(model.compressors, key=int):
            x, layout = inputs[k]
            _, w = model.compressors[k](x, layout, return_weights=True)
            weights.append((w[:, :, layout.num_prefix_tokens:], x.shape[1]))
    b, t = video.shape[0], video.shape[2]
    out = torch.ones(b, t, GRID * GRID)
    for f in range(t):
        idx = f
        for w, frames_in in weights:
            pair, slot = divmod(idx, 2)
            if idx == frames_in - 1 and frames_in % 2:  # paired with a copy of itself
                out[:, f] *= w[:, pair, :, 0] + w[:, pair, :, 1]
            else:
                out[:, f] *= w[:, pair, :, slot]
            idx = pair
    return out.reshape(b, t, GRID, GRID)


def _write_mp4(path, frames: np.ndarray, fps: int = 8) -> None:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt, stream.options = "yuv420p", {"crf": "0"}
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def test_frame_groups():
    assert frame_groups(8, 2) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert frame_groups(6, 2) == [[0, 1, 2, 3], [4, 5]]
    assert frame_groups(5, 1) == [[0, 1], [2, 3], [4]]
    assert frame_groups(3, 0) == [[0], [1], [2]]
    with pytest.raises(ValueError, match="num_frames"):
        frame_groups(0, 1)


def test_fresh_model_weights_are_exactly_a_quarter():
    model = ia.inject(make_vit(), layers=[1, 2])
    w = cascaded_weights(model, _video(2, 4))
    assert w.shape == (2, 4, GRID, GRID)
    assert torch.equal(w, torch.full_like(w, 0.25))


def test_fresh_model_odd_frames_last_frame_passes_through():
    model = ia.inject(make_vit(), layers=[1, 2])
    w = cascaded_weights(model, _video(1, 5))
    assert torch.equal(w[:, :4], torch.full_like(w[:, :4], 0.25))
    assert torch.equal(w[:, 4], torch.ones_like(w[:, 4]))  # its two weights add up, at both layers


@pytest.mark.parametrize("frames,layers", [(4, [1, 2]), (5, [1, 2]), (6, [1, 2]), (7, [0, 1, 3]), (8, [0, 2, 3])])
def test_learned_weights_sum_to_one_and_match_loop_reference(frames, layers):
    model = _perturb(ia.inject(make_vit(), layers=layers))
    video = _video(2, frames)
    w = cascaded_weights(model, video)
    assert w.shape == (2, frames, GRID, GRID)
    assert (w >= 0).all()
    assert not torch.allclose(w, w.flatten(2).mean(-1)[..., None, None])  # really varies per token
    for group in frame_groups(frames, len(layers)):
        torch.testing.assert_close(w[:, group].sum(1), torch.ones(2, GRID, GRID), rtol=0, atol=1e-5)
    torch.testing.assert_close(w, _reference(model, video), rtol=1e-5, atol=1e-6)
    assert _infer_layers(w[0]) == len(layers)


def test_odd_frames_learned_weights_add_up_on_the_repeated_frame():
    model = _perturb(ia.inject(make_vit(), layers=[1, 2]), seed=3)
    w = cascaded_weights(model, _video(1, 5))
    torch.testing.assert_close(w[:, 4], torch.ones_like(w[:, 4]), rtol=0, atol=1e-6)  # alone in its group
    assert not torch.allclose(w[:, :4], torch.full_like(w[:, :4], 0.25))


def test_no_side_effects_and_ntchw_layout():
    model = _perturb(ia.inject(make_vit(), layers=[1, 2])).train()
    video = _video(1, 4)
    with torch.no_grad():
        ref = model.eval()(video)
    model.train()
    w = cascaded_weights(model, video)
    assert model.training
    assert all(not c._forward_hooks and not c._forward_pre_hooks for c in model.compressors.values())
    with torch.no_grad():
        assert torch.equal(model.eval()(video), ref)
    w2 = cascaded_weights(model, video.transpose(1, 2), layout="NTCHW")
    torch.testing.assert_close(w2, w)


def test_weights_are_per_clip():
    model = _perturb(ia.inject(make_vit(), layers=[1]))
    video = _video(2, 4)
    w = cascaded_weights(model, video)
    torch.testing.assert_close(cascaded_weights(model, video[1:]), w[1:])
    assert not torch.allclose(w[0], w[1])


def test_refusals():
    with pytest.raises(TypeError, match="InTIModel"):
        cascaded_weights(make_vit(), _video(1, 4))
    with pytest.raises(TypeError, match="compressor='inti'"):
        cascaded_weights(ia.inject(make_vit(), layers=[1], compressor="linear_pool"), _video(1, 4))
    with pytest.raises(ValueError, match="5-D"):
        cascaded_weights(ia.inject(make_vit(), layers=[1]), torch.randn(1, 3, IMG, IMG))


def test_weighted_frames_of_uniform_weights_is_the_mean():
    frames = torch.rand(3, 6, 16, 16)
    groups = frame_groups(6, 2)
    weights = torch.tensor([0.25] * 4 + [0.5] * 2)[:, None, None].expand(6, 4, 4)
    out = weighted_frames(frames, weights, groups)
    assert out.shape == (3, 2, 16, 16)
    torch.testing.assert_close(out[:, 0], frames[:, :4].mean(1))
    torch.testing.assert_close(out[:, 1], frames[:, 4:].mean(1))
    # one weight per patch: a 4x4 grid over 16x16 pixels weighs each 4x4 block
    w = torch.zeros(6, 4, 4)
    w[0, 0, 0], w[1] = 1.0, 1.0
    out = weighted_frames(frames, w, groups)
    torch.testing.assert_close(out[:, 0, :4, :4], frames[:, 0, :4, :4] + frames[:, 1, :4, :4])
    torch.testing.assert_close(out[:, 0, 4:, 4:], frames[:, 1, 4:, 4:])


@pytest.mark.parametrize("kind", ["uint8", "normalised"])
def test_plot_writes_png(tmp_path, kind):
    import matplotlib.image

    model = _perturb(ia.inject(make_vit(), layers=[1, 2]))
    video = _video(2, 5)
    w = cascaded_weights(model, video)
    shown = (video.clamp(-2, 2) * 60 + 128).to(torch.uint8) if kind == "uint8" else video
    path = plot_cascaded_weights(shown, w, tmp_path / "sub" / "fig.png", sample=1, title="test")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > img.shape[0]  # 2 rows x 5 columns
    with pytest.raises(ValueError, match="weights"):
        plot_cascaded_weights(video[0], w[0, :3], tmp_path / "bad.png")


def test_read_clip_samples_segment_centres(tmp_path):
    frames = np.stack([np.full((96, 128, 3), 20 + 10 * i, np.uint8) for i in range(20)])
    _write_mp4(tmp_path / "v.mp4", frames)
    clip = read_clip(tmp_path / "v.mp4", 4, 64)
    assert clip.shape == (3, 4, 64, 64) and clip.dtype == torch.uint8
    # segment centres of 20 frames in 4 segments: frames 2, 7, 12, 17
    means = clip.float().mean(dim=(0, 2, 3))
    torch.testing.assert_close(means, torch.tensor([40.0, 90.0, 140.0, 190.0]), rtol=0, atol=3.0)
    with pytest.raises(FileNotFoundError):
        read_clip(tmp_path / "missing.mp4", 4, 64)


def test_cli_end_to_end(tmp_path, capsys):
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, num_classes=7)
    model = _perturb(ia.inject(vit, layers=[1, 2], freeze_backbone=True))
    model.save_pretrained(tmp_path / "ckpt", save_backbone=True)  # full weights: the CLI's model is this one
    rng = np.random.default_rng(0)
    _write_mp4(tmp_path / "v.mp4", rng.integers(0, 256, (24, 80, 112, 3), dtype=np.uint8))

    rc = main(["--checkpoint", str(tmp_path / "ckpt"), "--backbone", "vit_tiny_patch16_224",
               "--video", str(tmp_path / "v.mp4"), "--frames", "8", "--size", "64",
               "--out", str(tmp_path / "fig.png"), "--save-weights", str(tmp_path / "w.safetensors")])
    assert rc == 0, capsys.readouterr().err
    assert (tmp_path / "fig.png").read_bytes()[:4] == b"\x89PNG"
    saved = load_file(tmp_path / "w.safetensors")
    clip = read_clip(tmp_path / "v.mp4", 8, 64)
    assert torch.equal(saved["clip"], clip)
    video = ia.normalize_video(clip[None], (vit.pretrained_cfg["mean"], vit.pretrained_cfg["std"]))
    torch.testing.assert_close(saved["weights"], cascaded_weights(model, video))

    rc = main(["--checkpoint", str(tmp_path / "nothing"), "--backbone", "vit_tiny_patch16_224",
               "--video", str(tmp_path / "v.mp4")])
    assert rc == 2 and "inti_config.json" in capsys.readouterr().err
