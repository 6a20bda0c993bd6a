"""benchmarks/speed.py runs end to end on a tiny setting (it is not run by CI otherwise, so it could rot)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

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
