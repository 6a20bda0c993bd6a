"""benchmarks/speed.py runs end to end on a tiny setting (it is not run by CI otherwise, so it could rot)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_speed_benchmark_smoke(tmp_path):
    out = tmp_path / "speed_smoke"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "speed.py"), "--quick", "--frames", "2", "--size", "112",
           "--repeats", "1", "--train-repeats", "1", "--breakdown-rounds", "1", "--warmup", "0", "--threads", "1",
           "--profile", "never", "--variants", "inti_middle,tome", "--results-name", str(out)]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    text = out.with_suffix(".md").read_text()
    rows: dict[str, str] = {}
    for line in text.splitlines():  # the first table (results) names each variant first
        if line.startswith("| "):
            rows.setdefault(line.split("|")[1].strip(), line)
    assert {"naive", "inti_middle", "tome"} <= set(rows)
    assert "r=" in rows["tome"]  # tome's r was matched to InTI middle's GFLOPs
    assert "InTI layers' share of step time <= 1.5 x their share of GFLOPs" in text
    assert "| inti_middle | InTI layers" in text and out.with_suffix(".png").stat().st_size > 0


@pytest.mark.parametrize(("inti_ms", "tome_ms", "met"), [
    ([100, 101, 102], [110, 111, 112], True),  # 9% faster, rounds within 2%: shown
    ([100, 130, 70], [101, 99, 102], False),  # the medians differ by 1%, InTI's rounds by 60%: not shown
    ([110, 111, 112], [100, 101, 102], False),  # slower
])
def test_inti_faster_than_tome_is_met_only_outside_the_round_spread(inti_ms, tome_ms, met):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from _speed_parts import Variant, evaluate_targets

    def variant(name, infer_ms, compressor="inti"):
        v = Variant(name, (4, 6) if compressor else (), compressor or "inti")
        v.infer_s, v.train_s, v.gflops = [ms / 1e3 for ms in infer_ms], [1.0], 1.0
        v.memory = {"train": 1.0, "activations": 1.0}
        return v

    by_name = {"naive": variant("naive", [200, 200, 200], None), "inti_middle": variant("inti_middle", inti_ms),
               "tome": variant("tome", tome_ms, "tome")}
    target = next(t for t in evaluate_targets(by_name) if "faster than tome" in t.goal)
    assert target.met is met
    assert ("not conclusive" in target.detail) == (inti_ms[1] == 130)


@pytest.mark.slow
def test_kernel_comparison_times_both_kernels_eager_and_compiled():
    """speed.py --kernels on a tiny model (backend 'eager': the plumbing, not inductor's kernels): four rows, the
    same logits from all four, and the kernel 'auto' runs in each mode on the CPU."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import timm
    from _speed_kernels import compare_kernels
    from _speed_parts import Variant

    args = type("Args", (), dict(seed=0, batch=1, frames=4, size=32, num_classes=5, repeats=1, train_repeats=1,
                                 compile_backend="eager"))()
    torch._dynamo.reset()
    base = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5, img_size=32, patch_size=8,
                             depth=2, embed_dim=32, num_heads=2)
    no_autocast = lambda: torch.autocast("cpu", enabled=False)  # noqa: E731
    text = compare_kernels(args, [Variant("naive", ()), Variant("inti", (1,))], base, no_autocast)
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines() if line.startswith("| ")]
    assert [r[:2] for r in rows[1:]] == [["fused", "eager"], ["reference", "eager"], ["fused", "compiled (eager)"],
                                         ["reference", "compiled (eager)"]], text
    assert all(float(r[2]) > 0 and float(r[3]) > 0 and float(r[5]) < 1e-4 for r in rows[1:]), text
    assert "- eager on cpu: `auto` runs **fused**" in text and "- compiled on cpu: `auto` runs **reference**" in text
