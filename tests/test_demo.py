"""The demo's variants reach the engine config as intended (a silent override slip would mislabel results)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from inti_adapters import demo

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from accuracy import VARIANTS as ACCURACY_VARIANTS  # noqa: E402
from accuracy import _inti_option, ordering, points_from_results, variant_spec  # noqa: E402


@pytest.mark.parametrize("name, spec", list(demo.VARIANTS.items()) + list(ACCURACY_VARIANTS.items()))
def test_variant_config_carries_every_option(name, spec, tmp_path):
    cfg = demo.variant_config(spec, checkpoint=tmp_path / "w.safetensors", data_root=tmp_path, run_dir=tmp_path / "r",
                              epochs=2, steps_per_epoch=7, lr=1e-3, seed=3)
    assert list(cfg.model.layers) == spec["layers"]
    assert cfg.model.compressor == spec.get("compressor", "inti")
    assert dict(cfg.model.compressor_config) == spec.get("compressor_config", {})
    assert [t["name"] for t in cfg.model.temporal] == [t["name"] for t in spec["temporal"]]
    assert (cfg.train.seed, cfg.train.epochs, cfg.train.steps_per_epoch, cfg.optim.lr) == (3, 2, 7, 1e-3)
    assert cfg.model.model_kwargs == demo.MODEL_KWARGS


def test_accuracy_inti_options_reach_the_inti_variants_only(tmp_path):
    options = dict([_inti_option("head_init_std=0.02"), _inti_option("fusion=add")])
    assert options == {"head_init_std": 0.02, "fusion": "add"}
    for name, spec in ACCURACY_VARIANTS.items():
        cfg = demo.variant_config(variant_spec(name, options), checkpoint=tmp_path / "w.safetensors",
                                  data_root=tmp_path, run_dir=tmp_path / "r", epochs=1, steps_per_epoch=1, lr=1e-3)
        inti = bool(spec["layers"]) and spec.get("compressor", "inti") == "inti"
        assert dict(cfg.model.compressor_config) == ({**options} if inti else spec.get("compressor_config", {})), name
    assert ACCURACY_VARIANTS["naive"] == variant_spec("naive", options)  # the table itself is untouched
    for bad in ("head_init_std", "no_such_option=1"):
        with pytest.raises(Exception, match="KEY=VALUE"):
            _inti_option(bad)


def test_accuracy_ordering_compares_alone_and_with_temporal_separately():
    def row(*acc):
        return {"accuracy": list(acc)}

    rows = {"naive": row(0.2, 0.2), "InTI [1, 2] (middle)": row(0.40, 0.42), "linear_pool [1, 2]": row(0.30, 0.30),
            "conv_pool [1, 2]": row(0.50, 0.52), "tome r=9 [0, 1, 2]": row(0.2, 0.2),
            "InTI [1, 2] + local temporal": row(0.70, 0.72), "linear_pool [1, 2] + local temporal": row(0.60, 0.62),
            "conv_pool [1, 2] + local temporal": row(0.55, 0.55)}
    assert ordering(rows) == [
        "Compressors alone:", "",
        "- InTI [1, 2] (middle) > linear_pool [1, 2] (paper): holds here (41.0% vs 30.0%)",
        "- linear_pool [1, 2] > conv_pool [1, 2] (paper): does NOT hold here (30.0% vs 51.0%)",
        "- token methods above temporal downsampling (paper): best token method InTI [1, 2] (middle) 41.0% vs "
        "best pooling conv_pool [1, 2] 51.0%: does NOT hold", "",
        "With the local temporal module in every block (the paper's setting):", "",
        "- InTI [1, 2] + local temporal > linear_pool [1, 2] + local temporal (paper): holds here (71.0% vs 61.0%)",
        "- linear_pool [1, 2] + local temporal > conv_pool [1, 2] + local temporal (paper): holds here "
        "(61.0% vs 55.0%)",
        "- token methods above temporal downsampling (paper): best token method InTI [1, 2] + local temporal "
        "71.0% vs best pooling linear_pool [1, 2] + local temporal 61.0%: holds"]
    # a run of the variants alone prints one part, without a title for the missing one
    assert ordering({k: v for k, v in rows.items() if "temporal" not in k})[0] == "Compressors alone:"
    assert not any("temporal module" in line for line in ordering({k: v for k, v in rows.items()
                                                                   if "temporal" not in k}))


def test_accuracy_replot_reads_back_the_table_it_wrote():
    from _common import markdown_table

    table = markdown_table(["variant", "GFLOPs/clip", "vs naive", "top-1", "digit"],
                           [["naive", "0.126", "+0%", "22.0% ± 0.5%", "94.0% ± 0.6%"],
                            ["conv_pool [1, 2] + local temporal", "0.099", "-21%", "91.2% ± 0.8%", "91.6% ± 0.6%"],
                            ["one seed", "0.050", "-60%", "30.0%", "90.0%"]])
    text = f"# title\n\n## Setup\n\nsetup | text\n\n## Results\n\n{table}\n\n## Picture\n\n| not | a | row | here |\n"
    points = points_from_results(text)
    assert list(points) == ["naive", "conv_pool [1, 2] + local temporal", "one seed"]
    for got, want in zip(points.values(), [(0.126, 0.220, 0.005), (0.099, 0.912, 0.008), (0.05, 0.30, 0.0)],
                         strict=True):
        assert got == pytest.approx(want)
    with pytest.raises(ValueError, match="no Results table"):
        points_from_results("# nothing here\n")


# ---------------------------------------------------------------------------------------------------
# image pre-training: frames drawn like the clips', token windows, the cache

import io  # noqa: E402
import json  # noqa: E402
from contextlib import redirect_stdout  # noqa: E402

import timm  # noqa: E402
import torch  # noqa: E402

from inti_adapters import demo_pretrain  # noqa: E402
from inti_adapters.data import ensure_builtin_dataset  # noqa: E402
from inti_adapters.data.digits import DigitsOptions, render_digit_images, scan_split, split_scans  # noqa: E402
from inti_adapters.demo_pretrain import (  # noqa: E402
    ImageRecipe,
    cache_key,
    pretrain_image_model,
    train_image_model,
    window_logits,
)

TINY_DIGITS = dict(num_train=16, num_val=8, samples_per_shard=8, seed=1, store="frames")


def test_scan_split_is_the_clips_disjoint_split():
    opts = DigitsOptions()
    (train, train_digits), (val, val_digits) = scan_split(opts, "train"), scan_split(opts, "val")
    ids_train, ids_val = split_scans(1797, opts.val_fraction, opts.seed)
    assert train.shape == (len(ids_train), 1, opts.digit_size, opts.digit_size) and len(val) == len(ids_val)
    assert train_digits.shape == (len(ids_train),) and set(val_digits.tolist()) == set(range(10))
    assert float(train.min()) >= 0 and float(train.max()) <= 1
    with pytest.raises(ValueError, match="split"):
        scan_split(opts, "test")


def test_unaugmented_frames_are_drawn_as_the_clips_draw_them():
    """No jitter, no noise: each frame is the upscaled scan, dimmed by one factor, at an integer position."""
    opts = DigitsOptions(noise_std=0.0)
    scans, _ = scan_split(opts, "val")
    frames, idx = render_digit_images(opts, scans, 12, generator=torch.Generator().manual_seed(0))
    assert frames.shape == (12, 3, opts.image_size, opts.image_size) and frames.dtype == torch.uint8
    assert torch.equal(frames[:, 0], frames[:, 2])
    s = opts.digit_size
    for frame, i in zip(frames[:, 0].float(), idx, strict=True):
        ref = scans[i, 0]
        ys, xs = torch.nonzero(frame, as_tuple=True)
        best = min((float((frame[y:y + s, x:x + s] - ref * frame.sum() / ref.sum()).abs().max()), y, x)
                   for y in range(int(ys.max()) - s + 1, int(ys.min()) + 1)
                   for x in range(int(xs.max()) - s + 1, int(xs.min()) + 1))
        assert best[0] < 1.0  # equal up to rounding to uint8
        y, x = best[1:]
        assert float(frame.sum() - frame[y:y + s, x:x + s].sum()) == 0.0  # nothing outside the digit


def test_augmented_frames_fit_a_window_and_follow_the_generator():
    opts = DigitsOptions()
    scans, _ = scan_split(opts, "train")
    kw = dict(image_size=32, scale_jitter=0.15, rotation=12.0)
    a, ia_ = render_digit_images(opts, scans, 6, generator=torch.Generator().manual_seed(4), **kw)
    b, ib = render_digit_images(opts, scans, 6, generator=torch.Generator().manual_seed(4), **kw)
    assert a.shape == (6, 3, 32, 32) and torch.equal(a, b) and torch.equal(ia_, ib)
    c, _ = render_digit_images(opts, scans, 6, generator=torch.Generator().manual_seed(5), **kw)
    assert not torch.equal(a, c)


def test_window_logits_on_the_whole_grid_is_the_vit():
    torch.manual_seed(0)
    for kw in (demo.MODEL_KWARGS, {**demo.MODEL_KWARGS, "class_token": True, "global_pool": "token"}):
        vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, **kw).eval()
        x = torch.randn(3, 3, 64, 64)
        zero = torch.zeros(3, dtype=torch.long)
        torch.testing.assert_close(window_logits(vit, x, zero, zero), vit(x), rtol=1e-5, atol=1e-5)
        # a window sees the position embeddings of its place in the grid: the same as the whole frame
        # when the rest of the frame is dropped and attention cannot see it -> compare to a masked run
        top, left = torch.tensor([0, 2, 4]), torch.tensor([4, 1, 0])
        out = window_logits(vit, x[..., :32, :32], top, left)
        assert out.shape == (3, 10) and torch.isfinite(out).all()
        out.sum().backward()
        assert vit.pos_embed.grad is not None and vit.pos_embed.grad.abs().sum() > 0


def test_recipe_window_schedule_ends_on_the_whole_frame():
    r = ImageRecipe(steps=100, windows=((0.5, 4), (0.8, 6)))
    assert [r.window(s, 8) for s in (0, 49, 50, 79, 80, 99)] == [4, 4, 6, 6, 8, 8]
    assert r.window(0, 3) == 3  # never larger than the grid
    assert cache_key({"a": 1}, r, {"o": 2}) == cache_key({"a": 1}, r, {"o": 2})
    assert cache_key({"a": 1}, r, {"o": 2}) != cache_key({"a": 1}, ImageRecipe(steps=101), {"o": 2})
    assert cache_key({"a": 1}, r, {"o": 2}) != cache_key({"a": 2}, r, {"o": 2})


def test_recipe_label_smoothing_and_weight_average_are_applied(tmp_path, monkeypatch):
    ds = ensure_builtin_dataset(tmp_path / "digits", workers=1, **TINY_DIGITS)
    smoothing = []
    real_ce = torch.nn.functional.cross_entropy

    def ce(*args, **kwargs):
        smoothing.append(kwargs.get("label_smoothing", 0.0))
        return real_ce(*args, **kwargs)

    monkeypatch.setattr(demo_pretrain.F, "cross_entropy", ce)
    runs = {}
    real_step = torch.optim.AdamW.step
    for ema in (0.0, 0.5):
        torch.manual_seed(0)
        vit = demo._vit(10)
        start = {k: v.clone() for k, v in vit.state_dict().items()}
        seen = []  # the weights after every optimizer step

        def step(opt, *a, vit=vit, seen=seen, **k):
            out = real_step(opt, *a, **k)
            seen.append({k: v.clone() for k, v in vit.state_dict().items()})
            return out

        monkeypatch.setattr(torch.optim.AdamW, "step", step)
        train_image_model(vit, ds, ImageRecipe(steps=3, batch=8, windows=((0.5, 4),), label_smoothing=0.2, ema=ema),
                          demo.MEAN_STD)
        runs[ema] = (start, seen, vit.state_dict())
    assert smoothing and set(smoothing) == {0.2}
    start, seen, final = runs[0.0]
    assert all(torch.equal(final[k], seen[-1][k]) for k in final)  # no average: the last weights
    start, seen, final = runs[0.5]
    for k in final:  # average with decay 1/2 over 3 steps: s/8 + w1/8 + w2/4 + w3/2
        expected = start[k] / 8 + seen[0][k] / 8 + seen[1][k] / 4 + seen[2][k] / 2
        torch.testing.assert_close(final[k], expected)


def test_pretraining_is_cached_with_its_accuracy(tmp_path):
    ds = ensure_builtin_dataset(tmp_path / "digits", workers=1, **TINY_DIGITS)
    recipe = ImageRecipe(steps=4, batch=8, windows=((0.5, 4),))
    calls = []

    def make_vit(n):
        calls.append(n)
        return demo._vit(n)

    first = pretrain_image_model(make_vit, ds, tmp_path / "cache", recipe=recipe, model_kwargs=demo.MODEL_KWARGS)
    assert not first.cached and calls == [10] and first.frames == 8 * ds.num_frames
    assert 0.0 <= first.accuracy <= 1.0 and first.path.exists()
    from safetensors.torch import load_file
    weights = load_file(first.path)
    assert weights and not any(k.startswith("head.") for k in weights)
    info = json.loads(first.path.with_suffix(".json").read_text())
    assert info["recipe"]["steps"] == 4 and info["accuracy"] == first.accuracy
    again = pretrain_image_model(make_vit, ds, tmp_path / "cache", recipe=recipe, model_kwargs=demo.MODEL_KWARGS)
    assert again.cached and calls == [10] and (again.path, again.accuracy) == (first.path, first.accuracy)
    other = pretrain_image_model(make_vit, ds, tmp_path / "cache", recipe=ImageRecipe(steps=3, batch=8),
                                 model_kwargs=demo.MODEL_KWARGS)
    assert not other.cached and other.path != first.path


def test_progress_without_a_terminal_prints_a_few_lines(monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    out = io.StringIO()
    with redirect_stdout(out):
        p = demo.PhaseProgress(1000, "phase")
        for i in range(1000):
            p.update(loss=1.0 / (i + 1), window="4x4")
        p.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 4 and lines[-1].startswith("phase: 1000/1000") and "\r" not in out.getvalue()


def _row(acc, direction, gflops, ms):
    return dict(accuracy=acc, digit=0.9, direction=direction, axis=0.9, gflops=gflops, step_ms=ms, engine_step_ms=ms)


def test_table_and_verdict_state_what_was_measured():
    rows = {"naive": _row(0.5, 0.4, 0.12, 200.0), "InTI [1, 2]": _row(0.6, 0.7, 0.09, 180.0),
            "InTI [1, 2] + local temporal": _row(0.7, 0.8, 0.1, 190.0)}
    table = demo.results_table(rows)
    assert "| InTI [1, 2] | 60.0% |" in table and "-25% | 180 | -10% |" in table
    assert all(line.startswith("yes") for line in demo.verdict(rows))
    rows["InTI [1, 2]"]["step_ms"] = 250.0
    rows["InTI [1, 2] + local temporal"]["direction"] = 0.5
    v = demo.verdict(rows)
    assert v[1].startswith("NO") and "time per training step" in v[1] and v[3].startswith("NO")


def test_side_by_side_timing_trains_every_parameter(tmp_path, monkeypatch):
    """Each variant's timed step computes gradients for all its weights (full fine-tuning, as the recipe trains)."""
    import inti_adapters as ia

    ds = ensure_builtin_dataset(tmp_path / "digits", workers=1, **TINY_DIGITS)
    dirs = {}
    for name in ("naive", "InTI [1, 2]"):
        model = ia.inject(demo._vit(ds.num_classes), layers=demo.VARIANTS[name]["layers"])
        ia.save_pretrained(model, tmp_path / name.replace(" ", "_"))
        dirs[name] = tmp_path / name.replace(" ", "_")
    changed = {}
    real_step = demo._train_step

    def spy(model, opt, x, y):
        seconds = real_step(model, opt, x, y)
        params = list(model.parameters())
        changed.setdefault(id(model), (all(p.requires_grad and p.grad is not None for p in params),
                                       sum(p.numel() for p in params)))
        return seconds
    monkeypatch.setattr(demo, "_train_step", spy)
    ms = demo.time_steps_side_by_side(dirs, ds, rounds=2)
    assert set(ms) == set(dirs) and all(v > 0 for v in ms.values())
    assert len(changed) == 2 and all(ok for ok, _ in changed.values())
    assert sorted(n for _, n in changed.values())[0] < sorted(n for _, n in changed.values())[1]  # InTI adds weights
