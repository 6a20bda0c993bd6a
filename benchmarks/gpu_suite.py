"""The whole GPU story in one run of a few minutes: throughput, MFU, the training engine, data decoding.

Parts (written to ``benchmarks/results/gpu_<device-name>.md`` after each one, so a killed run
still leaves a file):

1. Inference and training throughput (clips/s), latency and peak memory of ViT-B/16 at 16 x 224^2:
   naive vs InTI ``[4, 6]`` (``kernel="auto"``) vs InTI with the hand-fused CPU kernel
   (``kernel="fused"``; the verdict says which kernel ``auto`` should pick on the device, eager and
   compiled) vs InTI + ``UNIFORMERV2_B`` vs ToMe at InTI's GFLOPs; bf16 autocast, SDPA (the kernel
   that ran is reported), eager and ``torch.compile``; each batch is doubled until the device is
   full (memory cap) or a step gets slow.
2. Model FLOP utilisation: FLOPs from ``ia.count_gflops`` (2 per multiply-add, x3 for a training
   step) per second over the device's dense bf16 peak.
3. ~30 steps of the real training engine (``torchrun --nproc_per_node 1``, DeepSpeed ZeRO-2, bf16,
   NCCL) on the built-in data set, with a checkpoint in the middle and a resume from it.
4. Frames decoded per second on the device (nvjpeg) next to one CPU core (JPEG and the video reader).
5. The targets, met or missed.

Order of work: 1 (eager) -> 3 -> 4 -> 1 (compiled, with all the time left) -> 5. ``--budget-s``
bounds the whole run; each stage stops at its share and still writes what it has.

    python benchmarks/gpu_suite.py                       # on a GPU: ~7 minutes (default --budget-s 420)
    python benchmarks/gpu_suite.py --smoke               # the same code on CPU with a tiny model, < 1 minute
    python benchmarks/gpu_suite.py --parts throughput --no-compile --budget-s 120
"""

from __future__ import annotations

import argparse
import faulthandler
import importlib.util
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
if importlib.util.find_spec("inti_adapters") is None:  # a bare repository copy: use it without installing
    sys.path.insert(0, str(HERE.parent))

from _common import RESULTS_DIR, log, machine_info, markdown_table  # noqa: E402
from _gpu_common import (  # noqa: E402
    Budget,
    PartResult,
    PartTimeout,
    Report,
    Settings,
    device_facts,
    device_name,
    device_slug,
    peak_bf16_tflops,
)
from _gpu_engine import EngineJob, summarise  # noqa: E402
from _gpu_targets import engine_body, evaluate_targets, kernel_verdict, targets_body  # noqa: E402
from _gpu_throughput import (  # noqa: E402
    COMPILE_ORDER,
    ThroughputState,
    errors_text,
    mfu_table,
    plan_variants,
    run_compiled,
    run_eager,
    throughput_table,
    trials_text,
)

PARTS = (("throughput", "1. Throughput, latency and memory"), ("mfu", "2. Model FLOP utilisation"),
         ("engine", "3. Training engine (DeepSpeed ZeRO-2, torchrun)"), ("data", "4. Data: frame decoding"),
         ("targets", "5. Targets"))
STAGE_ENDS = {"eager": 0.40, "engine": 0.62, "data": 0.70, "compile": 0.97}
ALL_PARTS = ("throughput", "engine", "data", "compile")


# -- settings -------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None) -> Settings:
    """Command line -> :class:`Settings` (full run on CUDA, or ``--smoke`` on the CPU)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny model on CPU, every part, < 1 minute (CI)")
    p.add_argument("--device", default=None, help="cuda (default) or cpu (default with --smoke)")
    p.add_argument("--budget-s", type=float, default=None, help="seconds for the whole run (default 420; smoke 150)")
    p.add_argument("--out", type=Path, default=None,
                   help="results directory (default benchmarks/results; smoke: a temporary directory)")
    p.add_argument("--results-name", default=None, help="file name without .md (default gpu_<device-name>)")
    p.add_argument("--parts", default=",".join(ALL_PARTS), help=f"comma list of {', '.join(ALL_PARTS)}")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile measurements")
    p.add_argument("--compile-backend", default=None, help="torch.compile backend (default inductor; smoke eager)")
    p.add_argument("--compile-cap-s", type=float, default=150.0, help="most seconds for one compiled variant")
    p.add_argument("--backbone", default=None, help="timm model (default vit_base_patch16_clip_224)")
    p.add_argument("--frames", type=int, default=None, help="frames per clip (default 16; smoke 8)")
    p.add_argument("--size", type=int, default=None, help="frame size (default 224; smoke 32)")
    p.add_argument("--max-batch", type=int, default=None, help="largest batch tried (default 1024; smoke 4)")
    p.add_argument("--memory-cap", type=float, default=0.8, help="fraction of device memory a batch may use")
    p.add_argument("--step-cap-s", type=float, default=None, help="slowest step the batch search accepts (1 s)")
    p.add_argument("--repeats", type=int, default=None, help="timed steps per measurement (default 10; smoke 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 2; smoke 1)")
    p.add_argument("--threads", type=int, default=None, help="torch threads of this process (default: torch's; smoke 1)")
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak, for a device not in the table")
    p.add_argument("--work-dir", type=Path, default=None, help="scratch space (default: a temporary directory)")
    p.add_argument("--note", action="append", default=[], help="a line for the Notes section (repeatable)")
    a = p.parse_args(argv)
    parts = tuple(x.strip() for x in a.parts.split(",") if x.strip())
    if unknown := sorted(set(parts) - set(ALL_PARTS)):
        p.error(f"--parts: unknown {unknown}; choose from {list(ALL_PARTS)}")
    device = torch.device(a.device or ("cpu" if a.smoke else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("no CUDA device (torch.cuda.is_available() is False); use --smoke for the CPU run")
    return build_settings(a, device, parts)


def build_settings(a: argparse.Namespace, device: torch.device, parts: tuple[str, ...]) -> Settings:
    """The full run's ViT-B/16 setup, or the smoke run's tiny one, with the options applied."""
    from inti_adapters.temporal import UNIFORMERV2_B

    smoke, name = a.smoke, device_name(device)
    peak, peak_note = (a.peak_tflops, "--peak-tflops") if a.peak_tflops else peak_bf16_tflops(name)
    if smoke:
        model = dict(backbone=a.backbone or "vit_tiny_patch16_224", layers=(1, 2), tome_layers=(0, 1, 2),
                     model_kwargs={"patch_size": 8, "depth": 4, "embed_dim": 64, "num_heads": 2}, num_classes=10,
                     temporal=tuple({**spec, "num_heads": 2} for spec in UNIFORMERV2_B))
    else:
        model = dict(backbone=a.backbone or "vit_base_patch16_clip_224", layers=(4, 6), tome_layers=tuple(range(11)),
                     model_kwargs={}, num_classes=400, temporal=tuple(UNIFORMERV2_B))
    s = Settings(
        device=device, smoke=smoke, budget_s=a.budget_s or (150.0 if smoke else 420.0),
        out_dir=a.out or (Path(tempfile.gettempdir()) / "inti_gpu_suite_smoke" if smoke else RESULTS_DIR),
        results_name=a.results_name or ("gpu_smoke_" if smoke else "gpu_") + device_slug(name),
        frames=a.frames or (8 if smoke else 16), size=a.size or (32 if smoke else 224),
        dtype="bf16" if device.type == "cuda" else "fp32", warmup=a.warmup or (1 if smoke else 2),
        repeats=a.repeats or (2 if smoke else 10), max_batch=a.max_batch or (2 if smoke else 1024),
        memory_cap=a.memory_cap, step_cap_s=a.step_cap_s or 1.0,
        compile=not a.no_compile and "compile" in parts,
        compile_backend=a.compile_backend or ("eager" if smoke else "inductor"), compile_cap_s=a.compile_cap_s,
        compile_items=(("inti", "training"), ("inti_fused", "training")) if smoke else COMPILE_ORDER, threads=a.threads or (1 if smoke else None),
        peak_tflops=peak, parts=parts, engine=engine_options(smoke), data=data_options(smoke),
        notes=[f"peak FLOP/s: {peak_note}", *a.note], **model)
    s.work_dir = a.work_dir
    return s


def engine_options(smoke: bool) -> dict[str, object]:
    """Worker options of part 3: one epoch = clips / batch steps; the checkpoint lands mid-epoch."""
    if smoke:
        return {"clips": 16, "batch": 4, "epochs": 3, "save_at": 6, "lr": 3e-3, "data_workers": 1,
                "loader_workers": 0}
    return {"clips": 96, "batch": 16, "epochs": 5, "save_at": 15, "lr": 3e-3,
            "data_workers": min(8, os.cpu_count() or 1), "loader_workers": 2}


def data_options(smoke: bool) -> dict[str, object]:
    if smoke:
        return {"jpegs": 8, "height": 64, "width": 85, "quality": 90, "batches": [4], "min_s": 0.2,
                "clip_frames": 8, "crop": 64, "videos": 1, "video_seconds": 1.0, "video_short_side": 96,
                "reader_clips": 2}
    return {"jpegs": 64, "height": 256, "width": 341, "quality": 90, "batches": [16, 64, 256], "min_s": 1.0,
            "clip_frames": 16, "crop": 224, "videos": 2, "video_seconds": 4.0, "video_short_side": 320,
            "reader_clips": 8}


def setup_text(s: Settings) -> str:
    """The 'Setup' section: what is measured and how."""
    kind = "CPU smoke run of the suite's code path: tiny model, figures are NOT GPU figures" if s.smoke else \
        f"{device_name(s.device)}"
    return (f"{kind}. Model: {s.backbone} (random init, {s.model_kwargs or 'default size'}), clips 3 x {s.frames} "
            f"x {s.size}^2, {s.num_classes} classes; InTI after blocks {list(s.layers)}; UniFormerV2-B global "
            f"modules (`UNIFORMERV2_B`); ToMe after blocks {list(s.tome_layers)} with r matched to InTI's GFLOPs. "
            f"{'bf16 autocast' if s.dtype == 'bf16' else 'fp32'}; weights and AdamW (fused on CUDA) in fp32; "
            "training = full fine-tuning, cross-entropy on random labels. Throughput: batch doubled from 1 up to "
            f"{s.max_batch} while the peak stays under {100 * s.memory_cap:.0f}% of device memory and a step under "
            f"{s.step_cap_s:g} s; then {s.warmup} warm-up + up to {s.repeats} synchronised steps; median ms per "
            "batch, ± = (max - min) / median; clips/s = batch / median. torch.compile: backend "
            f"{s.compile_backend!r}, default mode (max-autotune is not used: its autotuning takes longer than this "
            f"run may), at the eager batch, at most {s.compile_cap_s:g} s per variant; 'compile s' = first step "
            f"minus a normal one. Budget {s.budget_s:g} s in all; stages end by "
            + ", ".join(f"{k} {100 * v:.0f}%" for k, v in STAGE_ENDS.items()) + " of it (unused time moves on).")


# -- stages ---------------------------------------------------------------------------------------
def guarded(key: str, fn: Callable[[], PartResult]) -> PartResult:
    """Run one part; an exception becomes an 'error' result with its traceback, never a crash."""
    start = time.perf_counter()
    log(f"part {key}: start")
    try:
        res = fn()
    except PartTimeout as e:
        res = PartResult(key, "partial", reason=f"stopped at its time limit ({e})")
    except Exception as e:  # noqa: BLE001 - recorded in the results file, the next part still runs
        res = PartResult(key, "error", reason=f"{type(e).__name__}: {e}", trace=traceback.format_exc()[-4000:])
    res.seconds = time.perf_counter() - start
    log(f"part {key}: {res.status} in {res.seconds:.0f} s {res.reason}")
    return res


def throughput_results(s: Settings, state: ThroughputState, seconds: float) -> tuple[PartResult, PartResult]:
    """Parts 1 and 2 rendered from what is measured so far."""
    measured = [m for m in state.measurements if m.clips_per_s]
    wanted = [m for m in state.measurements if not (m.compiled and m.note.startswith("skipped"))]
    errors = [m for m in state.measurements if m.note.startswith("error")]
    status = "measured" if measured and len(measured) == len(wanted) else \
        ("error" if errors and not measured else "partial")  # partial: some figures, or the time ran out
    reason = "" if status == "measured" else f"{len(measured)} of {len(state.measurements)} measurements have figures"
    body = (throughput_table(s, state) + "\n\n'x naive' = clips/s over naive's in the same mode and compile setting; "
            "'naive/GFLOPs' = naive's GFLOPs over the variant's, the speed-up the FLOPs promise.\n\n"
            + kernel_verdict(s, state) + "\n\nBatch search (batch: one step, peak memory):\n\n" + trials_text(state)
            + "\n\n" + "\n".join(f"- {n}" for n in state.notes))
    if errors := errors_text(state):
        body += "\n\nErrors:\n\n" + errors
    thr = PartResult("throughput", status, body=body, reason=reason, seconds=seconds)
    peak_note = next((n.split(": ", 1)[1] for n in s.notes if n.startswith("peak FLOP/s")), "")
    mfu = PartResult("mfu", "measured" if measured else "skipped", body=mfu_table(s, state, peak_note) if measured
                     else "", reason="" if measured else "part 1 has no figures", seconds=0.0)
    return thr, mfu


def stage_eager(s: Settings, state: ThroughputState, budget: Budget) -> PartResult:
    start = time.perf_counter()
    log("counting GFLOPs on the meta device")
    planned = plan_variants(s)
    state.variants, state.notes = planned.variants, planned.notes
    run_eager(s, state, budget.deadline("eager"), min_start_s=1.0 if s.smoke else 10.0)
    return throughput_results(s, state, time.perf_counter() - start)[0]


def start_engine(s: Settings, work: Path) -> EngineJob | None:
    """Start part 3's worker now, so its imports and data set overlap part 1 (None if it will not run)."""
    if "engine" not in s.parts or importlib.util.find_spec("deepspeed") is None:
        return None
    log("engine: starting the torchrun worker (it imports and builds its data set, then waits)")
    return EngineJob(s.engine, work / "engine", s.smoke, wait_s=s.budget_s + 60)  # an orphan gives up


def stage_engine(s: Settings, budget: Budget, job: EngineJob | None) -> PartResult:
    """Part 3: let the prewarmed worker train and resume, within the engine stage's time."""
    if job is None:
        return PartResult("engine", "skipped", reason="deepspeed is not installed (pip install deepspeed)")
    left = budget.left("engine")
    if left < (5 if s.smoke else 30):
        job.cancel()
        return PartResult("engine", "skipped", reason=f"only {left:.0f} s of the budget left")
    log(f"engine: go, up to {left:.0f} s")
    data, tail, _ = job.run(left)
    summary = summarise(data, s.device.type == "cuda")
    body = engine_body(s, data, summary)
    if data.get("resume") and data.get("returncode") == 0:
        return PartResult("engine", "measured", body=body, data=summary)
    why = "timed out" if data.get("returncode") is None else f"worker exited with {data.get('returncode')}"
    status = "partial" if data.get("reference") else "error"
    return PartResult("engine", status, body=body, reason=why, trace="worker log (tail):\n" + tail, data=summary)


def stage_data(s: Settings, budget: Budget, state: ThroughputState) -> PartResult:
    """Part 4, with part 1's eager InTI training clips/s as the rate to feed."""
    from _gpu_data import run_data

    if importlib.util.find_spec("torchvision") is None:
        return PartResult("data", "skipped", reason="torchvision is not installed (its decode_jpeg is measured)")
    inti = state.find("inti", "training", False)
    body, figures, problems = run_data(s, budget.deadline("data"), inti.clips_per_s if inti else None)
    status = "partial" if problems else "measured"
    return PartResult("data", status, body=body, reason="; ".join(problems), data=figures)


def run_stage(report: Report, budget: Budget, key: str, fn: Callable[[], PartResult]) -> PartResult:
    """Run part ``key`` if ``--parts`` asks for it, record it and rewrite the results file."""
    wanted = key in report.settings.parts
    res = guarded(key, fn) if wanted else PartResult(key, "skipped", reason="not in --parts")
    report.set(res)
    report.write(f"running: part '{key}' done, {budget.elapsed():.0f} s in")
    return res


def main(argv: Sequence[str] | None = None) -> int:
    """Run the stages, rewriting the results file after each; 1 if a part failed."""
    s = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # killed from outside: still clean up below
    faulthandler.dump_traceback_later(s.budget_s + 300, exit=True)  # a hung NCCL / decoder must not hang the run
    if s.device.type == "cuda":
        torch.set_float32_matmul_precision("high")
    if s.threads:
        torch.set_num_threads(s.threads)
    budget, state = Budget(s.budget_s, STAGE_ENDS), ThroughputState()
    info = {**machine_info(s.device, packages=("torchvision", "deepspeed", "triton")), **device_facts(s.device)}
    title = "GPU suite: " + ("CPU smoke run (tiny model, not GPU figures)" if s.smoke else device_name(s.device))
    report = Report(s, title, info, PARTS, setup_text(s))
    report.write("running: started")
    if s.work_dir:
        s.work_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="inti_gpu_suite_", dir=s.work_dir))
    job = start_engine(s, work)
    try:
        thr = run_stage(report, budget, "throughput", lambda: stage_eager(s, state, budget))
        report.set(throughput_results(s, state, thr.seconds)[1] if state.measurements else
                   PartResult("mfu", "skipped", reason="part 1 has no figures"))
        run_stage(report, budget, "engine", lambda: stage_engine(s, budget, job))
        run_stage(report, budget, "data", lambda: stage_data(s, budget, state))
        if s.compile and state.measurements:
            res = guarded("compile", lambda: compile_stage(s, state, budget))
            if res.status == "error":
                state.notes.append(f"torch.compile stage failed: {res.reason}")
            for r in throughput_results(s, state, thr.seconds + res.seconds):
                report.set(r)
        elif state.measurements:
            state.notes.append("torch.compile not measured (--no-compile or not in --parts)")
            report.set(throughput_results(s, state, thr.seconds)[0])
        targets = evaluate_targets(s, state, report.results.get("engine"))
        report.set(PartResult("targets", "measured", body=targets_body(s, targets)))
        path = report.write(f"complete in {budget.elapsed():.0f} s of a {s.budget_s:g} s budget")
    finally:
        if job is not None:
            job.cancel()  # a no-op when it has finished
        shutil.rmtree(work, ignore_errors=True)
        faulthandler.cancel_dump_traceback_later()
    print(markdown_table(["target", "status", "detail"], [[t.goal, t.status, t.detail] for t in targets], "lll"))
    failed = [k for k, r in report.results.items() if r.status == "error"]
    print(f"\nwrote {path}" + (f"; parts with errors: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


def compile_stage(s: Settings, state: ThroughputState, budget: Budget) -> PartResult:
    run_compiled(s, state, budget.deadline("compile"), min_start_s=2.0 if s.smoke else 30.0)
    return PartResult("compile", "measured")


def exit_now(code: int) -> None:
    """Exit without the interpreter's teardown of torch and friends (5-10 s on a loaded 2-core machine):
    the results are written, the engine worker is reaped, and the output streams are flushed here."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_now(main())
