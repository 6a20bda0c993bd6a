"""The InTI layer's two kernels side by side (``speed.py --kernels``): the hand-fused CPU kernel
(``kernels/inti_cpu.py``) and the plain layer (``inti.py``), each eager and under ``torch.compile``,
on one InTI variant of the run (``InTIConfig.kernel`` forced to ``fused`` / ``reference``).

Per (kernel, mode): the median training step (forward + backward + AdamW, interleaved over the four
models as in the main table), the median inference call, the first call's seconds (the compilation,
for the compiled models: a training and an inference graph) and the largest difference of the
logits from the eager fused model's (the four compute one function). The last line says which
kernel ``kernel="auto"`` runs in each mode on this device.
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from _common import interleaved_timings, log, markdown_table, median, synchronize
from _speed_parts import Variant
from torch import nn

import inti_adapters as ia

KERNELS = ("fused", "reference")
MODES = ("eager", "compiled")


@dataclass
class KernelRun:
    kernel: str
    mode: str
    model: nn.Module
    call: Callable[..., Any]
    optimizer: torch.optim.Optimizer
    first_s: float = 0.0
    train_s: list[float] = field(default_factory=list)
    infer_s: list[float] = field(default_factory=list)
    max_diff: float = 0.0


def auto_choice(device: torch.device) -> dict[str, str]:
    """The kernel ``kernel="auto"`` runs on ``device``, eager and under ``torch.compile``."""
    layer = ia.InTILayer(8)
    x = torch.empty(1, 2, 1, 8, device=device)
    eager = "fused" if layer.uses_fused_kernel(x) else "reference"
    compiled = []
    fn = torch.compile(lambda v: compiled.append(layer.uses_fused_kernel(v)) or v, backend="eager", fullgraph=False)
    fn(x)
    return {"eager": eager, "compiled": "fused" if compiled and compiled[0] else "reference"}


def _runs(variant: Variant, base: nn.Module, backend: str) -> list[KernelRun]:
    runs = []
    for mode in MODES:
        for kernel in KERNELS:
            v = Variant(variant.name, variant.layers, variant.compressor, {**variant.options, "kernel": kernel},
                        temporal=variant.temporal)
            model = v.inject(copy.deepcopy(base)).train()
            call = torch.compile(model, backend=backend) if mode == "compiled" else model
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
            runs.append(KernelRun(kernel, mode, model, call, opt))
    return runs


def _step(run: KernelRun, video: torch.Tensor, labels: torch.Tensor, autocast: Callable[[], Any]) -> Callable[[], Any]:
    def train() -> Any:
        run.optimizer.zero_grad(set_to_none=True)
        with autocast():
            loss = F.cross_entropy(run.call(video).float(), labels)
        loss.backward()
        run.optimizer.step()
        return loss.detach()

    return train


def _infer(run: KernelRun, video: torch.Tensor, autocast: Callable[[], Any]) -> Callable[[], Any]:
    def infer() -> Any:
        with torch.no_grad(), autocast():
            return run.call(video)

    return infer


def measure_kernels(variant: Variant, base: nn.Module, video: torch.Tensor, labels: torch.Tensor,
                    autocast: Callable[[], Any], *, repeats: int, train_repeats: int, backend: str = "inductor",
                    ) -> list[KernelRun]:
    """Build, compile (first calls) and time the four (kernel, mode) models of ``variant``."""
    device = video.device
    runs = _runs(variant, base, backend)
    reference = None
    for r in runs:
        log(f"kernels: {r.kernel} / {r.mode}: first calls")
        start = time.perf_counter()
        _step(r, video, labels, autocast)()
        out = _infer(r, video, autocast)()
        synchronize(device)
        r.first_s = time.perf_counter() - start
        reference = out.float() if reference is None else reference
        r.max_diff = (out.float() - reference).abs().max().item()
    names = {f"{r.kernel}/{r.mode}": r for r in runs}
    for n, ts in interleaved_timings({n: _step(r, video, labels, autocast) for n, r in names.items()},
                                     repeats=train_repeats, warmup=1, device=device, progress=log).items():
        names[n].train_s = ts
    for n, ts in interleaved_timings({n: _infer(r, video, autocast) for n, r in names.items()},
                                     repeats=repeats, warmup=1, device=device, progress=log).items():
        names[n].infer_s = ts
    return runs


def kernels_section(variant: Variant, runs: list[KernelRun], device: torch.device, backend: str) -> str:
    """The markdown of the comparison: a table and what ``auto`` picks."""
    rows = [[r.kernel, r.mode if r.mode == "eager" else f"compiled ({backend})", f"{median(r.train_s) * 1e3:.1f}",
             f"{median(r.infer_s) * 1e3:.1f}", f"{r.first_s:.1f}", f"{r.max_diff:.1e}"] for r in runs]
    headers = ["kernel", "mode", "train step ms (median)", "inference ms (median)", "first calls s",
               "max |logits - fused eager|"]
    auto = auto_choice(device)
    by = {(r.kernel, r.mode): median(r.train_s) for r in runs}
    faster = {m: min(KERNELS, key=lambda k, m=m: by[(k, m)]) for m in MODES}
    lines = [f"Variant {variant.name} (InTI after blocks {list(variant.layers)}); the training step includes "
             "AdamW; the model's other parts are the same in all four.",
             markdown_table(headers, rows, align="llrrrr"),
             *(f"- {m} on {device.type}: `auto` runs **{auto[m]}**; the faster training step here: **{faster[m]}**"
               for m in MODES)]
    return "\n\n".join(lines[:2]) + "\n\n" + "\n".join(lines[2:])


def compare_kernels(args: argparse.Namespace, variants: list[Variant], base: nn.Module,
                    autocast: Callable[[], Any]) -> str:
    """The ``--kernels`` section of ``speed.py``: the first InTI variant with each kernel, eager and compiled."""
    inti = next((v for v in variants if v.layers and v.compressor == "inti"), None)
    if inti is None:
        return "no InTI variant measured"
    device = next(base.parameters()).device
    gen = torch.Generator(device=device).manual_seed(args.seed)
    video = torch.randn(args.batch, 3, args.frames, args.size, args.size, device=device, generator=gen)
    labels = torch.randint(0, args.num_classes, (args.batch,), device=device, generator=gen)
    runs = measure_kernels(inti, base, video, labels, autocast, repeats=args.repeats,
                           train_repeats=args.train_repeats, backend=args.compile_backend)
    return kernels_section(inti, runs, device, args.compile_backend)
