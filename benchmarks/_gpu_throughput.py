"""Parts 1 and 2 of the GPU suite: throughput, latency and peak memory of naive / InTI / InTI +
UniFormerV2 / ToMe at InTI's GFLOPs (eager and ``torch.compile``), and model FLOP utilisation.

Every (variant, mode) runs alone on the device: its model is built, the batch is doubled from 1
until a step runs out of memory, peaks above the memory cap, gets slower than the step cap or
would (linear estimate from the last two trials) pass the cap; the largest batch that fit is then
timed (``_common.interleaved_timings``: warm-up, then synchronised repeats) and the model freed.
Compiled variants reuse their eager batch (no recompilation per batch size) and run last, with
whatever time the run has left, in priority order (naive and InTI training first: the MFU target).

Which attention kernel ran: one step runs under ``torch.profiler`` (CPU activity only, which
records every ATen op the dispatcher sees, also those an Inductor graph calls) and the
``aten::_scaled_dot_product_*`` forward ops it contains are counted: flash, mem-efficient, cuDNN,
math. This names the kernel that really ran for the model's own shapes, masks and dtypes, for the
eager and the compiled model alike, and does not depend on kernel names of a CUDA version.
"""

from __future__ import annotations

import contextlib
import math
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import timm
import torch
import torch.nn.functional as F
from _common import interleaved_timings, log, markdown_table, median, spread, synchronize, time_once
from _gpu_common import GIB, PartTimeout, Settings, fmt, free_device_memory, hard_deadline, seconds_left
from torch import nn

import inti_adapters as ia

MODES = ("inference", "training")
LABELS = {"naive": "naive", "inti": "InTI", "inti_fused": "InTI, fused CPU kernel",
          "inti_uniformerv2": "InTI + UniFormerV2-B", "tome": "ToMe @ InTI GFLOPs"}
# compiled (variant, mode) pairs in the order they get the remaining time
COMPILE_ORDER = (("naive", "training"), ("inti", "training"), ("inti_fused", "training"), ("naive", "inference"),
                 ("inti", "inference"), ("inti_fused", "inference"), ("inti_uniformerv2", "training"),
                 ("tome", "training"), ("inti_uniformerv2", "inference"), ("tome", "inference"))
SDPA_OPS = {
    "aten::_scaled_dot_product_flash_attention": "flash",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "flash (CPU)",
    "aten::_scaled_dot_product_efficient_attention": "mem-efficient",
    "aten::_scaled_dot_product_cudnn_attention": "cuDNN",
    "aten::_scaled_dot_product_attention_math": "math",
    "aten::_scaled_dot_product_fused_attention_overrideable": "overrideable",
}
HARD_GRACE_S = 20.0  # a measurement is interrupted this long after its soft deadline


@dataclass
class Variant:
    """One model: where compressors sit, which, with which options and temporal modules."""

    name: str
    layers: tuple[int, ...] = ()
    compressor: str = "inti"
    options: dict[str, Any] = field(default_factory=dict)
    temporal: tuple[dict[str, Any], ...] = ()
    gflops: float = math.nan  # multiply-adds per clip, in billions (paper convention)

    def inject(self, backbone: nn.Module) -> ia.InTIModel:
        return ia.inject(backbone, list(self.layers), compressor=self.compressor, temporal=list(self.temporal),
                         **self.options)


@dataclass
class Measurement:
    """One (variant, mode, eager or compiled) on the device."""

    variant: str
    mode: str
    compiled: bool
    batch: int | None = None
    step_s: list[float] = field(default_factory=list)
    peak_bytes: float | None = None
    sdpa: str = "not probed"
    compile_s: float | None = None
    trials: list[tuple[int, float, float | None]] = field(default_factory=list)  # (batch, s, peak bytes)
    note: str = ""
    trace: str = ""  # traceback tail of an error

    def failed(self, exc: BaseException, what: str) -> None:
        """Record an error (or a time limit a compiler wrapped into its own exception) and go on."""
        if _is_timeout(exc):
            self.note = f"skipped: {what} did not finish within its time share"
        else:
            self.note = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
            self.trace = traceback.format_exc()[-1500:]
        self.step_s = []

    @property
    def clips_per_s(self) -> float | None:
        return self.batch / median(self.step_s) if self.step_s and self.batch else None


@dataclass
class ThroughputState:
    """What parts 1 and 2 know so far (rendered again after the compiled phase)."""

    variants: list[Variant] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    measurements: list[Measurement] = field(default_factory=list)

    def find(self, variant: str, mode: str, compiled: bool) -> Measurement | None:
        for m in self.measurements:
            if (m.variant, m.mode, m.compiled) == (variant, mode, compiled):
                return m
        return None

    def gflops(self, variant: str) -> float:
        return next(v.gflops for v in self.variants if v.name == variant)


# -- models and their cost ------------------------------------------------------------------------
def create_backbone(s: Settings, device: torch.device | str) -> nn.Module:
    torch.manual_seed(0)
    with torch.device(device):
        return timm.create_model(s.backbone, pretrained=False, num_classes=s.num_classes, img_size=s.size,
                                 **s.model_kwargs)


def count_variant(variant: Variant, meta_backbone: nn.Module, video: torch.Tensor) -> float:
    model = variant.inject(meta_backbone)
    try:
        return ia.count_gflops(model, video) / video.shape[0]
    finally:
        model.unload()


def plan_variants(s: Settings) -> ThroughputState:
    """The variants with their GFLOPs per clip (meta device); ToMe's ``r`` matched to InTI's. 'inti' runs the
    default kernel (``kernel="auto"``), 'inti_fused' the hand-fused CPU kernel, to say which 'auto' should pick."""
    meta_backbone = create_backbone(s, "meta")
    video = torch.empty(1, 3, s.frames, s.size, s.size, device="meta")
    state = ThroughputState([Variant("naive"), Variant("inti", s.layers),
                             Variant("inti_fused", s.layers, options={"kernel": "fused"}),
                             Variant("inti_uniformerv2", s.layers, temporal=s.temporal)])
    for v in state.variants:
        v.gflops = count_variant(v, meta_backbone, video)
    tome = Variant("tome", s.tome_layers, "tome")
    try:
        state.notes.append(match_tome(tome, state.variants[1].gflops, meta_backbone, video))
        state.variants.append(tome)
    except ValueError as e:  # e.g. too few tokens per frame to reach InTI's budget
        state.notes.append(f"ToMe not measured: {e}")
    return state


def match_tome(tome: Variant, target: float, meta_backbone: nn.Module, video: torch.Tensor) -> str:
    """Set ToMe's ``r`` (``r_for_budget``, or one less if closer) and GFLOPs to match ``target``; a note."""
    from inti_adapters.planning import r_for_budget

    r = r_for_budget(meta_backbone, video, list(tome.layers), target)
    best: tuple[int, float] | None = None
    for cand in sorted({max(0, r - 1), r}):  # the smallest r under the budget, or one less if closer
        tome.options = {"r": cand}
        g = count_variant(tome, meta_backbone, video)
        if best is None or abs(g - target) < abs(best[1] - target):
            best = (cand, g)
    tome.options, tome.gflops = {"r": best[0]}, best[1]
    return (f"ToMe: r={best[0]} tokens merged per frame after each of blocks {list(tome.layers)} "
            f"(r_for_budget on the meta device) gives {best[1]:.4g} GFLOPs/clip, "
            f"{100 * (best[1] / target - 1):+.1f}% from InTI's {target:.4g}")


# -- one workload ---------------------------------------------------------------------------------
def autocast(s: Settings) -> contextlib.AbstractContextManager:
    if s.dtype == "bf16":
        return torch.autocast(s.device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class Workload:
    """A freshly built model (eager or ``torch.compile``) and its step function at any batch size."""

    def __init__(self, s: Settings, variant: Variant, mode: str, compiled: bool) -> None:
        self.s, self.mode = s, mode
        self.model = variant.inject(create_backbone(s, s.device)).train(mode == "training")
        self.call = torch.compile(self.model, backend=s.compile_backend) if compiled else self.model
        self.opt = None
        if mode == "training":
            params = [p for p in self.model.parameters() if p.requires_grad]
            self.opt = torch.optim.AdamW(params, lr=1e-6, fused=s.device.type == "cuda")

    def step(self, batch: int) -> Callable[[], Any]:
        """One inference forward, or one training step (forward, backward, AdamW), on a fixed random clip batch."""
        s = self.s
        gen = torch.Generator(device=s.device).manual_seed(batch)
        video = torch.randn(batch, 3, s.frames, s.size, s.size, device=s.device, generator=gen)
        if self.opt is None:
            def infer() -> Any:
                with torch.inference_mode(), autocast(s):
                    return self.call(video)
            return infer
        labels = torch.randint(0, s.num_classes, (batch,), device=s.device, generator=gen)
        opt = self.opt

        def train() -> Any:
            opt.zero_grad(set_to_none=True)
            with autocast(s):
                loss = F.cross_entropy(self.call(video).float(), labels)
            loss.backward()
            opt.step()
            return loss.detach()
        return train

    def close(self) -> None:
        self.model = self.call = self.opt = None  # type: ignore[assignment]


def sdpa_kernels(fn: Callable[[], Any]) -> str:
    """The ``scaled_dot_product_attention`` forward kernels one call of ``fn`` ran, with counts."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    counts = {SDPA_OPS[e.key]: e.count for e in prof.key_averages() if e.key in SDPA_OPS}
    if not counts:
        return "none seen (attention by hand, or fused by the compiler)"
    return ", ".join(f"{k} x{n}" for k, n in sorted(counts.items()))


def try_batch(work: Workload, batch: int) -> tuple[float, float | None]:
    """Seconds of one step after a warm-up step at ``batch`` (best of 2 at batch 1), and the peak bytes."""
    device = work.s.device
    fn = work.step(batch)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    fn()
    synchronize(device)
    seconds = min(time_once(fn, device) for _ in range(2 if batch == 1 else 1))
    peak = float(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None
    return seconds, peak


def search_batch(work: Workload, deadline: float) -> tuple[int | None, list[tuple[int, float, float | None]], str]:
    """Double the batch from 1: ``(largest batch that fit, trials, why the search stopped)``."""
    s, device = work.s, work.s.device
    cap = s.memory_cap * torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
    best, trials, batch = None, [], 1
    while True:
        if batch > s.max_batch:
            return best, trials, f"search stopped at the batch limit {s.max_batch}"
        if seconds_left(deadline) <= 0:
            return best, trials, f"search stopped by its time share before batch {batch}"
        oom = False
        try:
            seconds, peak = try_batch(work, batch)
        except torch.cuda.OutOfMemoryError:
            oom = True  # freed below, once the traceback (which holds the step's tensors) is gone
        if oom:
            free_device_memory(device)
            return best, trials, f"batch {batch} ran out of memory"
        trials.append((batch, seconds, peak))
        if cap is not None and peak > cap:
            return best, trials, f"batch {batch} peaked at {peak / GIB:.1f} GiB > cap {cap / GIB:.1f} GiB"
        best = batch
        if seconds > s.step_cap_s:
            return best, trials, f"a step at batch {batch} took {seconds:.2f} s > step cap {s.step_cap_s:g} s"
        if cap is not None:
            held = float(torch.cuda.memory_allocated(device))
            if 2 * peak - held > cap:
                return best, trials, (f"batch {2 * batch} would peak at ~{(2 * peak - held) / GIB:.1f} GiB "
                                      f"> cap {cap / GIB:.1f} GiB (linear estimate)")
        batch *= 2


def time_workload(s: Settings, fn: Callable[[], Any], deadline: float) -> tuple[list[float], float | None]:
    """Repeated synchronised step times (repeats cut to fit the deadline, at least 2) and the peak bytes."""
    per_step = time_once(fn, s.device)
    fit = int(0.8 * seconds_left(deadline) / max(per_step, 1e-6)) - s.warmup
    repeats = max(2, min(s.repeats, fit))
    if s.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(s.device)
    times = interleaved_timings({"step": fn}, repeats=repeats, warmup=s.warmup, device=s.device)["step"]
    peak = float(torch.cuda.max_memory_allocated(s.device)) if s.device.type == "cuda" else None
    return times, peak


# -- the two phases -------------------------------------------------------------------------------
def time_at_largest(work: Workload, m: Measurement, deadline: float) -> Callable[[], Any]:
    """Time ``m.batch``; if the timed run does not fit after all (fragmentation), halve it once. The step timed."""
    for attempt in range(2):
        oom = False
        fn = work.step(m.batch)
        try:
            m.step_s, m.peak_bytes = time_workload(work.s, fn, deadline)
            return fn
        except torch.cuda.OutOfMemoryError:
            if attempt or m.batch == 1:
                raise
            oom = True  # freed below, once the traceback is gone
        if oom:
            fn = None
            free_device_memory(work.s.device)
            m.note += f"; out of memory when timing batch {m.batch}: timed {m.batch // 2}"
            m.batch //= 2
    raise AssertionError("unreachable")


def measure_eager(s: Settings, variant: Variant, mode: str, deadline: float) -> Measurement:
    """Search the batch, time it and probe the attention kernel; errors and time limits end up in the note."""
    m = Measurement(variant.name, mode, compiled=False)
    work = None
    try:
        work = Workload(s, variant, mode, compiled=False)
        with hard_deadline(seconds_left(deadline) + HARD_GRACE_S):
            m.batch, m.trials, m.note = search_batch(work, deadline)
            if m.batch is None:
                m.note = "no batch fits: " + m.note
                return m
            fn = time_at_largest(work, m, deadline)
            m.sdpa = sdpa_kernels(fn)
    except PartTimeout:
        m.note += ("; " if m.note else "") + "interrupted at its hard time limit"
    except Exception as e:  # noqa: BLE001 - one variant failing must not cost the others
        m.failed(e, "the measurement")
    finally:
        if work is not None:
            work.close()
        free_device_memory(s.device)
    return m


def measure_compiled(s: Settings, variant: Variant, mode: str, batch: int, cap_s: float) -> Measurement:
    """Compile (timed: first step minus a normal step), then time at the eager batch; ``cap_s`` bounds it all."""
    m = Measurement(variant.name, mode, compiled=True, batch=batch)
    torch._dynamo.reset()
    work, start = None, time.perf_counter()
    try:
        work = Workload(s, variant, mode, compiled=True)
        with hard_deadline(cap_s):
            fn = work.step(batch)
            first = time_once(fn, s.device)
            m.step_s, m.peak_bytes = time_workload(s, fn, start + cap_s)
            m.compile_s = max(0.0, first - median(m.step_s))
            m.sdpa = sdpa_kernels(fn)
    except torch.cuda.OutOfMemoryError:
        m.step_s, m.note = [], f"out of memory at the eager batch {batch} when compiled"
    except Exception as e:  # noqa: BLE001 - PartTimeout too, possibly wrapped by dynamo's BackendCompilerFailed
        m.failed(e, f"compile and timing ({cap_s:.0f} s share)")
    finally:
        if work is not None:
            work.close()
        torch._dynamo.reset()
        free_device_memory(s.device)
    return m


def run_eager(s: Settings, state: ThroughputState, deadline: float, min_start_s: float) -> None:
    """Every variant in both modes, eager; each gets an equal share of the time left."""
    todo = [(v, mode) for v in state.variants for mode in MODES]
    for i, (v, mode) in enumerate(todo):
        left = seconds_left(deadline)
        if left < min_start_s:
            state.measurements.append(Measurement(v.name, mode, False, note=f"skipped: only {left:.0f} s left"))
            log(f"eager {v.name}/{mode}: skipped, only {left:.0f} s left")
            continue
        log(f"eager {v.name}/{mode}: searching the batch and timing ({left / (len(todo) - i):.0f} s share)")
        m = measure_eager(s, v, mode, time_deadline(left / (len(todo) - i)))
        state.measurements.append(m)
        log(f"eager {v.name}/{mode}: batch {m.batch}, {fmt(m.clips_per_s, '.1f')} clips/s; {m.note}")


def run_compiled(s: Settings, state: ThroughputState, deadline: float, min_start_s: float) -> None:
    """The compiled variants of ``s.compile_items`` in their order, each capped at ``s.compile_cap_s``."""
    for name, mode in s.compile_items:
        if not any(v.name == name for v in state.variants):
            continue
        variant = next(v for v in state.variants if v.name == name)
        eager = state.find(name, mode, False)
        left = seconds_left(deadline)
        if eager is None or not eager.batch:
            state.measurements.append(Measurement(name, mode, True, note="skipped: no eager batch to reuse"))
        elif left < min_start_s:
            state.measurements.append(Measurement(name, mode, True, batch=eager.batch,
                                                  note=f"skipped: only {left:.0f} s of the budget left"))
        else:
            cap = min(left, s.compile_cap_s)
            log(f"compiled {name}/{mode}: batch {eager.batch}, up to {cap:.0f} s")
            m = measure_compiled(s, variant, mode, eager.batch, cap)
            state.measurements.append(m)
            log(f"compiled {name}/{mode}: compile {fmt(m.compile_s, '.1f')} s, "
                f"{fmt(m.clips_per_s, '.1f')} clips/s {m.note}")


def _is_timeout(exc: BaseException | None) -> bool:
    while exc is not None:
        if isinstance(exc, PartTimeout) or "PartTimeout" in str(exc)[:300]:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def time_deadline(seconds: float) -> float:
    return time.perf_counter() + seconds


# -- rendering ------------------------------------------------------------------------------------
def speedup(state: ThroughputState, m: Measurement) -> float | None:
    """Clips/s of ``m`` over naive's in the same mode and compile setting."""
    base = state.find("naive", m.mode, m.compiled)
    if base is None or not base.clips_per_s or not m.clips_per_s:
        return None
    return m.clips_per_s / base.clips_per_s


def throughput_table(s: Settings, state: ThroughputState) -> str:
    """Part 1's table: one row per measurement, eager first."""
    naive_g = state.gflops("naive")
    headers = ["variant", "mode", "compiled", "batch", "ms / batch", "clips/s", "x naive", "naive/GFLOPs",
               "batch-1 ms", "peak GiB", "SDPA kernels (per step)", "compile s", "note"]
    rows = []
    for m in sorted(state.measurements, key=lambda m: (m.compiled, MODES.index(m.mode))):
        ms = f"{1e3 * median(m.step_s):.1f} ±{100 * spread(m.step_s):.0f}%" if m.step_s else "n/a"
        rows.append([LABELS[m.variant], m.mode, "yes" if m.compiled else "no", m.batch or "n/a", ms,
                     fmt(m.clips_per_s, ".1f"), fmt(speedup(state, m), ".3f"),
                     f"{naive_g / state.gflops(m.variant):.3f}",
                     f"{1e3 * m.trials[0][1]:.1f}" if m.trials and m.trials[0][0] == 1 else "-",
                     fmt(m.peak_bytes / GIB if m.peak_bytes else None, ".1f", "n/a (CPU)" if s.smoke else "n/a"),
                     m.sdpa, fmt(m.compile_s, ".0f", "-"), m.note or "-"])
    return markdown_table(headers, rows, align="lllrrrrrrrlrl")


def errors_text(state: ThroughputState) -> str:
    """Traceback tails of the measurements that failed ('' if none)."""
    return "\n\n".join(f"{LABELS[m.variant]} / {m.mode}{' / compiled' if m.compiled else ''}:\n\n```\n"
                       f"{m.trace.rstrip()}\n```" for m in state.measurements if m.trace)


def trials_text(state: ThroughputState) -> str:
    lines = []
    for m in state.measurements:
        if m.trials:
            steps = "; ".join(f"{b}: {1e3 * t:.0f} ms" + (f", {p / GIB:.1f} GiB" if p else "") for b, t, p in m.trials)
            lines.append(f"- {LABELS[m.variant]} / {m.mode}: {steps}")
    return "\n".join(lines) or "- none"


def mfu(s: Settings, state: ThroughputState, m: Measurement) -> tuple[float | None, float | None]:
    """``(achieved TFLOP/s, fraction of the peak)``: 2 FLOPs per multiply-add, x3 for a training step."""
    if not m.clips_per_s:
        return None, None
    flops = m.clips_per_s * state.gflops(m.variant) * 1e9 * 2 * (3 if m.mode == "training" else 1)
    return flops / 1e12, (flops / 1e12 / s.peak_tflops if s.peak_tflops else None)


def mfu_table(s: Settings, state: ThroughputState, peak_note: str) -> str:
    """Part 2's table: FLOPs per clip, achieved TFLOP/s and MFU per measurement."""
    headers = ["variant", "mode", "compiled", "GFLOPs/clip (MACs)", "TFLOP per clip", "achieved TFLOP/s", "MFU"]
    rows = []
    for m in sorted(state.measurements, key=lambda m: (m.compiled, MODES.index(m.mode))):
        tflops, frac = mfu(s, state, m)
        per_clip = state.gflops(m.variant) * 2 * (3 if m.mode == "training" else 1) / 1e3
        rows.append([LABELS[m.variant], m.mode, "yes" if m.compiled else "no", f"{state.gflops(m.variant):.4g}",
                     f"{per_clip:.4g}", fmt(tflops, ".4g"),
                     fmt(100 * frac if frac is not None else None, ".1f", "n/a (unknown peak)") +
                     ("%" if frac is not None else "")])
    return (f"Peak: {fmt(s.peak_tflops, '.1f', 'unknown')} TFLOP/s dense bf16 ({peak_note}).\n\n"
            + markdown_table(headers, rows, align="lllrrrr"))
