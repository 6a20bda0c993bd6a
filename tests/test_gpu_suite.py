"""The GPU suite (``benchmarks/gpu_suite.py``) kept runnable: its CPU smoke run end to end, and its
decisions (peaks, budget, batch search, engine checks) on their own."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "benchmarks"
sys.path.insert(0, str(BENCH))

from _gpu_common import Budget, PartTimeout, hard_deadline, peak_bf16_tflops  # noqa: E402
from _gpu_engine import summarise  # noqa: E402

HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
HEADINGS = ("1. Throughput, latency and memory", "2. Model FLOP utilisation", "3. Training engine",
            "4. Data: frame decoding", "5. Targets")


# -- the smoke run --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[str, float]:
    """Run ``gpu_suite.py --smoke`` once for the module: ``(the results markdown, wall seconds)``."""
    out = tmp_path_factory.mktemp("gpu_suite")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    # the engine tests build DeepSpeed's CPU op into this cache too: shared, it is built once
    env.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/inti_adapters/torch_extensions"))
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    start = time.perf_counter()
    # a budget that never binds on a loaded machine: cutting parts short is tested on its own below
    proc = subprocess.run([sys.executable, str(BENCH / "gpu_suite.py"), "--smoke", "--budget-s", "900", "--out",
                           str(out), "--work-dir", str(out / "work")], env=env, capture_output=True, text=True,
                          timeout=900)
    seconds = time.perf_counter() - start
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    files = sorted(out.glob("gpu_smoke_*.md"))
    assert [f.name for f in files] == ["gpu_smoke_cpu.md"]
    assert not any((out / "work").iterdir()), "the scratch directory is cleaned up"
    return files[0].read_text(), seconds


def section(md: str, heading: str) -> str:
    parts = [p for p in md.split("\n## ") if p.startswith(heading)]
    assert len(parts) == 1, f"no single section {heading!r}"
    return parts[0]


def table_rows(text: str, first_cell: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip().strip("|").split("|")] for line in text.splitlines()
            if line.startswith(f"| {first_cell}")]


def test_the_file_says_what_produced_it_and_that_it_is_not_a_gpu_run(smoke):
    md, _ = smoke
    assert md.startswith("# GPU suite: CPU smoke run (tiny model, not GPU figures)")
    assert "gpu_suite.py --smoke --budget-s 900" in md and "- **torch**: " in md and "- **accelerator**: none" in md
    assert re.search(r"## Status\n\ncomplete in \d+ s of a 900 s budget", md)


def test_every_part_has_figures_or_a_recorded_reason(smoke):
    md, _ = smoke
    for heading in HEADINGS:
        text = section(md, heading)
        status = re.search(r"Status: \*\*(measured|partial|skipped|error)\*\* \(\d+ s\)(: .+)?", text)
        assert status, heading
        if status.group(1) in ("skipped", "error"):
            assert status.group(2), f"{heading}: {status.group(1)} without a reason"
        else:
            assert re.search(r"\| [^|]*\d", text) or re.search(r"- .*\d", text), f"{heading}: no figures"


def test_throughput_measures_every_variant_in_both_modes_and_a_compiled_one(smoke):
    md, _ = smoke
    text = section(md, HEADINGS[0])
    rows = {(r[0], r[1], r[2]): r for name in ("naive", "InTI", "InTI + UniFormerV2-B", "ToMe @ InTI GFLOPs")
            for r in table_rows(text, name)}
    for name in ("naive", "InTI", "InTI + UniFormerV2-B", "ToMe @ InTI GFLOPs"):
        for mode in ("inference", "training"):
            row = rows[(name, mode, "no")]
            assert float(row[5]) > 0, row  # clips/s
            assert int(row[3]) in (1, 2), row  # batch from the search (smoke limit 2)
            assert float(row[8]) > 0, row  # batch-1 latency from the search
            assert "flash (CPU)" in row[10], row  # the SDPA kernel that ran
    for name in ("InTI", "InTI, fused CPU kernel"):  # both InTI kernels, eager and compiled
        assert float(rows[(name, "training", "no")][5]) > 0, rows[(name, "training", "no")]
        compiled = rows[(name, "training", "yes")]
        assert float(compiled[5]) > 0 and compiled[11] != "-", compiled  # clips/s and compile seconds
    # the verdict on the kernel 'auto' picks: on the CPU it runs the fused one eager, the plain one compiled
    assert "- eager: `auto` runs **fused** here; training: both rows run the fused kernel" in text
    assert re.search(r"- torch.compile: `auto` runs \*\*reference\*\* here; training: fused / reference clips/s = "
                     r"[\d.]+; inference: not measured\. Should pick: \*\*reference\*\*", text)
    assert re.search(r"ToMe: r=\d+ tokens merged per frame", text)
    assert "- naive / training: 1: " in text  # the batch search trials


def test_mfu_is_computed_and_flags_the_unknown_peak(smoke):
    text = section(smoke[0], HEADINGS[1])
    rows = table_rows(text, "InTI")
    assert rows and all(r[6] == "n/a (unknown peak)" for r in rows)
    assert any(float(r[5]) > 0 for r in rows if r[5] != "n/a")  # achieved TFLOP/s


@pytest.mark.skipif(not HAS_DEEPSPEED, reason="deepspeed is not installed")
def test_engine_run_learns_and_resumes_exactly(smoke):
    text = section(smoke[0], HEADINGS[2])
    assert "Status: **measured**" in text
    assert "backend gloo" in text and "DeepSpeed ZeRO stage 2 (DeepSpeedZeroOptimizer)" in text
    assert "**Loss fell: yes**" in text
    assert "**resume reproduced the step: yes** (first step after resuming 7, expected 7; final step 12" in text
    assert "**resume reproduced the loss: yes**" in text


@pytest.mark.skipif(HAS_DEEPSPEED, reason="deepspeed is installed")
def test_engine_part_is_skipped_with_a_reason_without_deepspeed(smoke):
    assert "Status: **skipped** (0 s): deepspeed is not installed" in section(smoke[0], HEADINGS[2])


def test_data_part_measures_cpu_and_batched_decoding(smoke):
    text = section(smoke[0], HEADINGS[3])
    rows = table_rows(text, "JPEG decode, torchvision, one by one") + table_rows(text, "JPEG decode, decode_jpeg(list")
    assert len(rows) == 2 and all(float(r[2]) > 0 for r in rows)
    assert "CPU (smoke: not a GPU figure)" in text and "frames/s" in text


def test_targets_are_listed_and_not_judged_on_a_cpu(smoke):
    text = section(smoke[0], HEADINGS[4])
    statuses = [r[1] for r in (table_rows(text, "InTI") + table_rows(text, "naive") + table_rows(text, "engine"))]
    assert len(statuses) == 9
    assert "MET" not in statuses and "MISSED" not in statuses
    assert statuses.count("not applicable (smoke)") >= 4  # throughput (eager) and engine targets have figures


# -- the suite's decisions, without running it ----------------------------------------------------
@pytest.mark.parametrize(("name", "tflops"), [
    ("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H100 PCIe", 756.5), ("NVIDIA H100 NVL", 835.5),
    ("NVIDIA H200", 989.4), ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA A100 80GB PCIe", 312.0),
    ("NVIDIA L4", 121.0), ("NVIDIA L40S", None), ("NVIDIA GeForce RTX 4090", None)])
def test_peak_table(name, tflops):
    assert peak_bf16_tflops(name)[0] == tflops


def test_budget_rolls_unused_time_forward_and_the_hard_deadline_interrupts():
    budget = Budget(100.0, {"a": 0.25, "b": 0.5, "c": 1.0})
    assert budget.deadline("b") - budget.start == pytest.approx(50.0)
    assert 49 < budget.left("b") <= 50  # stage b also gets whatever stage a did not use
    with pytest.raises(ValueError):
        Budget(10.0, {"a": 0.5, "b": 0.4})
    start = time.perf_counter()
    with pytest.raises(PartTimeout), hard_deadline(0.2):
        while time.perf_counter() - start < 5:
            pass
    assert time.perf_counter() - start < 2


def test_batch_search_keeps_the_largest_batch_that_fit():
    from _gpu_throughput import search_batch

    class Fake:  # a workload whose step runs out of device memory from batch 8 on
        class s:  # noqa: N801 - the Settings fields search_batch reads
            device, max_batch, step_cap_s, memory_cap = torch.device("cpu"), 64, 10.0, 0.8

        def step(self, batch):
            def run():
                if batch >= 8:
                    raise torch.cuda.OutOfMemoryError("CUDA out of memory (fake)")
            return run

    best, trials, why = search_batch(Fake(), time.perf_counter() + 30)
    assert best == 4 and [t[0] for t in trials] == [1, 2, 4] and why == "batch 8 ran out of memory"
    Fake.s.max_batch = 2
    assert search_batch(Fake(), time.perf_counter() + 30)[0] == 2


def test_a_batch_that_does_not_fit_when_timed_is_halved_once():
    from _gpu_throughput import Measurement, time_at_largest

    class Fake:  # fits batch 4 in the search, but not in the timed run
        class s:  # noqa: N801
            device, warmup, repeats = torch.device("cpu"), 1, 2

        def step(self, batch):
            def run():
                if batch >= 8:
                    raise torch.cuda.OutOfMemoryError("CUDA out of memory (fake)")
            return run

    m = Measurement("naive", "training", False, batch=8, note="search stopped at the batch limit 8")
    time_at_largest(Fake(), m, time.perf_counter() + 30)
    assert m.batch == 4 and len(m.step_s) == 2 and m.note.endswith("out of memory when timing batch 8: timed 4")
    m = Measurement("naive", "training", False, batch=16)
    Fake.step = lambda self, batch: (lambda: (_ for _ in ()).throw(torch.cuda.OutOfMemoryError("fake")))
    with pytest.raises(torch.cuda.OutOfMemoryError):  # twice in a row: a real problem, reported as an error
        time_at_largest(Fake(), m, time.perf_counter() + 30)


def engine_json(ref_losses, resumed, save_at=2):
    ref = {"history": [[i + 1, v] for i, v in enumerate(ref_losses)], "final_step": len(ref_losses),
           "step_ends": [0.0, 1.0, 1.5, 2.0, 2.5, 3.0], "global_batch": 4}
    res = {"history": resumed, "final_step": resumed[-1][0] if resumed else save_at}
    return {"save_at": save_at, "reference": ref, "resume": res}


def test_engine_checks_can_fail():
    ok = summarise(engine_json([3.7, 3.6, 3.4, 3.0], [[3, 3.4], [4, 3.0]]), cuda=False)
    assert ok["loss_fell"] and ok["step_reproduced"] and ok["loss_reproduced"] and ok["step_s"] == 0.5
    flat = summarise(engine_json([3.0, 3.1, 3.4, 3.6], [[3, 3.4], [4, 3.6]]), cuda=False)
    assert not flat["loss_fell"]
    restarted = summarise(engine_json([3.7, 3.6, 3.4, 3.0], [[1, 3.7], [2, 3.6], [3, 3.4], [4, 3.0]]), cuda=False)
    assert not restarted["step_reproduced"]
    drifted = summarise(engine_json([3.7, 3.6, 3.4, 3.0], [[3, 3.41], [4, 3.0]]), cuda=False)
    assert drifted["step_reproduced"] and not drifted["loss_reproduced"]
    assert summarise(engine_json([3.7, 3.6, 3.4, 3.0], [[3, 3.41], [4, 3.0]]), cuda=True)["loss_reproduced"]


def test_a_failing_variant_is_recorded_and_does_not_stop_the_others():
    import gpu_suite
    from _gpu_throughput import ThroughputState, Variant, measure_eager, run_eager

    s = gpu_suite.parse_args(["--smoke", "--repeats", "1", "--warmup", "1", "--max-batch", "1"])
    m = measure_eager(s, Variant("naive", compressor="no_such_compressor", layers=(1,)), "inference",
                      time.perf_counter() + 30)
    assert m.note.startswith("error: ") and "no_such_compressor" in m.trace and not m.step_s
    state = ThroughputState([Variant("naive", compressor="no_such_compressor", layers=(1,)), Variant("naive")])
    run_eager(s, state, time.perf_counter() + 60, min_start_s=0.1)
    assert [bool(m.clips_per_s) for m in state.measurements] == [False, False, True, True]


@pytest.mark.parametrize(("fused_ms", "pick"), [(90, "fused"), (100, "reference"), (120, "reference")])
def test_the_kernel_verdict_picks_the_fused_kernel_only_where_it_wins_both_modes(fused_ms, pick):
    import gpu_suite
    from _gpu_targets import kernel_verdict
    from _gpu_throughput import Measurement, ThroughputState

    s = gpu_suite.parse_args(["--smoke"])
    state = ThroughputState()
    for mode in ("training", "inference"):
        state.measurements += [Measurement("inti", mode, True, batch=4, step_s=[0.1]),
                               Measurement("inti_fused", mode, True, batch=4, step_s=[fused_ms / 1e3])]
    text = kernel_verdict(s, state)
    compiled = next(line for line in text.splitlines() if line.startswith("- torch.compile"))
    assert f"fused / reference clips/s = {100 / fused_ms:.3f}" in compiled
    assert f"Should pick: **{pick}** ({'keep it' if pick == 'reference' else 'switch it to fused'}" in compiled
    assert "- eager: `auto` runs **fused** here; training: not measured" in text


def test_no_time_left_skips_every_measurement_with_a_reason():
    import gpu_suite
    from _gpu_throughput import ThroughputState, Variant, run_compiled, run_eager

    s = gpu_suite.parse_args(["--smoke"])
    state = ThroughputState([Variant("naive"), Variant("inti", (1, 2))])
    run_eager(s, state, time.perf_counter() - 1, min_start_s=1.0)
    assert len(state.measurements) == 4 and all(m.note.startswith("skipped: only") for m in state.measurements)
    run_compiled(s, state, time.perf_counter() + 100, min_start_s=1.0)
    assert state.measurements[-1].note == "skipped: no eager batch to reuse"


def test_a_budget_too_small_still_writes_every_part_with_a_reason(tmp_path):
    import signal

    import gpu_suite

    threads, sigterm = torch.get_num_threads(), signal.getsignal(signal.SIGTERM)
    try:
        rc = gpu_suite.main(["--smoke", "--parts", "throughput,data", "--budget-s", "1", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
        signal.signal(signal.SIGTERM, sigterm)
    assert rc == 0
    md = (tmp_path / "gpu_smoke_cpu.md").read_text()
    assert "Status: **partial**" in section(md, HEADINGS[0]) and "skipped: only" in section(md, HEADINGS[0])
    assert "Status: **skipped** (0 s): not in --parts" in section(md, HEADINGS[2])
    data = section(md, HEADINGS[3])
    assert "Status: **partial**" in data and "time share spent" in data  # the first figure, then it stopped
    assert "NOT MEASURED" in section(md, HEADINGS[4])


def test_a_tome_budget_that_cannot_be_met_drops_tome_with_a_note():
    import dataclasses

    import gpu_suite
    from _gpu_throughput import plan_variants

    # 2 x 2 patches per frame and InTI right after the first block: no r is small enough for ToMe
    s = dataclasses.replace(gpu_suite.parse_args(["--smoke", "--size", "16"]), layers=(0,))
    state = plan_variants(s)
    assert [v.name for v in state.variants] == ["naive", "inti", "inti_fused", "inti_uniformerv2"]
    assert state.notes[-1].startswith("ToMe not measured: no r reaches")
