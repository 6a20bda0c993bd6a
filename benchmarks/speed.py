"""Speed side by side: naive vs InTI (early / middle / late) vs other compressors at matched GFLOPs.

Measures, in one process with the variants interleaved (round-robin over variants for each
repeat, after warm-up), the median inference latency and throughput, the median training step
time (forward + backward + AdamW step, full fine-tuning) and the training peak memory, next to
each variant's GFLOPs (``inti_adapters.count_gflops``, counted on the meta device). ``tome``
merges the same number ``r`` of tokens per frame after every block but the last (ToMe's
schedule; ``--tome-layers``), with ``r`` bisected so that its GFLOPs match InTI middle.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` (minus what the other variants hold);
on CPU the training step's activation memory measured exactly with
``torch.autograd.graph.saved_tensors_hooks`` (bytes of the unique storages saved for backward,
parameters excluded) plus the bytes of parameters, gradients and optimizer state.

    python benchmarks/speed.py                       # ViT-S/16, 16 x 224^2, batch 1, CPU
    python benchmarks/speed.py --quick               # ~1-minute smoke run (8 x 112^2)
    python benchmarks/speed.py --threads 1           # steadier figures on a CPU shared with other jobs
    python benchmarks/speed.py --device cuda --dtype bf16 --backbone vit_base_patch16_clip_224 --batch 8

Writes ``benchmarks/results/speed_<device>[_quick].md`` and a PNG beside it.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from _common import (
    RESULTS_DIR,
    SavedTensorBytes,
    cuda_peak_bytes,
    interleaved_timings,
    log,
    machine_info,
    markdown_table,
    median,
    module_seconds,
    profile_table,
    spread,
    storage_bytes,
    write_results,
)
from torch import nn

import inti_adapters as ia

SETTINGS = {"inti_early": (2, 4), "inti_middle": (4, 6), "inti_late": (6, 8)}  # ViT-B/16 (12 blocks)
BASELINE_LAYERS = (4, 6)  # the other frame compressors sit where InTI middle does
MIB = 2**20


@dataclass
class Variant:
    name: str
    layers: tuple[int, ...]
    compressor: str = "inti"
    options: dict[str, Any] = field(default_factory=dict)
    note: str = ""
    gflops: float = 0.0  # per clip
    compressor_gflops: float = 0.0  # per clip, the compressor modules alone
    model: nn.Module | None = None
    optimizer: torch.optim.Optimizer | None = None
    infer_s: list[float] = field(default_factory=list)
    train_s: list[float] = field(default_factory=list)
    memory: dict[str, float] = field(default_factory=dict)  # bytes

    def inject(self, backbone: nn.Module) -> ia.InTIModel:
        return ia.inject(backbone, list(self.layers), compressor=self.compressor, **self.options)


# -- setup ----------------------------------------------------------------------------------------
def scale_layers(layers: Sequence[int], depth: int) -> tuple[int, ...]:
    """Map 12-block positions to a backbone of ``depth`` blocks (after block i of 12 -> same fraction)."""
    return tuple(sorted({min(depth - 2, max(0, round((i + 1) * depth / 12) - 1)) for i in layers}))


def build_backbone(args: argparse.Namespace, device: str | torch.device) -> nn.Module:
    torch.manual_seed(args.seed)
    with torch.device(device):
        return timm.create_model(args.backbone, pretrained=False, num_classes=args.num_classes, img_size=args.size)


def plan_variants(args: argparse.Namespace, depth: int) -> tuple[list[Variant], list[str]]:
    """The variants to measure and notes on those skipped."""
    notes: list[str] = []
    registered = set(ia.list_compressors())
    scale = (lambda ls: tuple(ls)) if depth == 12 else (lambda ls: scale_layers(ls, depth))
    if depth != 12:
        notes.append(f"the backbone has {depth} blocks, not 12: the ViT-B/16 insertion points are scaled to it")
    variants = [Variant("naive", ())]
    variants += [Variant(name, scale(layers)) for name, layers in SETTINGS.items()]
    for name in ("linear_pool", "conv_pool", "tome"):
        if name not in registered:
            notes.append(f"skipped {name}: no compressor of that name is registered yet")
            continue
        if name == "tome":
            layers = tuple(range(depth - 1)) if args.tome_layers == "all" else scale(
                int(x) for x in args.tome_layers.split(","))
            variants.append(Variant("tome", layers, "tome"))
        else:
            variants.append(Variant(name, scale(BASELINE_LAYERS), name))
    if args.variants:
        wanted = [v.strip() for v in args.variants.split(",")]
        unknown = sorted(set(wanted) - {v.name for v in variants})
        if unknown:
            notes.append(f"--variants names unknown or unavailable variants {unknown}; ignored")
        variants = [v for v in variants if v.name in wanted or v.name == "naive"]
    return variants, notes


def count_gflops(args: argparse.Namespace, variant: Variant, meta_backbone: nn.Module,
                 meta_video: torch.Tensor) -> tuple[float, float]:
    """GFLOPs per clip of the whole model and of its compressors alone (meta device, no compute)."""
    model = variant.inject(meta_backbone)
    try:
        counter = ia.FlopCounter()
        with torch.no_grad(), counter:
            model(meta_video)
    finally:
        model.unload()
    by_module = counter.gflops_by_module()
    comp = sum(v for k, v in by_module.items() if re.fullmatch(r"[^.]+\.compressors\.\d+", k))
    return counter.gflops / args.batch, comp / args.batch


def match_tome(args: argparse.Namespace, variant: Variant, target: float, meta_backbone: nn.Module,
               meta_video: torch.Tensor) -> str:
    """Bisect tome's ``r`` so its GFLOPs are closest to ``target`` (per clip); returns a note."""
    from inti_adapters.compressors.tome import r_for_budget

    r = r_for_budget(meta_backbone, meta_video, list(variant.layers), target * args.batch)
    best = None
    for cand in sorted({max(0, r - 1), r}):
        variant.options = {"r": cand}
        g, _ = count_gflops(args, variant, meta_backbone, meta_video)
        if best is None or abs(g - target) < abs(best[1] - target):
            best = (cand, g)
    variant.options = {"r": best[0]}
    variant.note = f"r={best[0]}"
    return (f"tome: r={best[0]} tokens merged per frame after each of blocks {list(variant.layers)} gives "
            f"{best[1]:.2f} GFLOPs/clip, {100 * (best[1] / target - 1):+.1f}% from InTI middle ({target:.2f})")


# -- measured functions ---------------------------------------------------------------------------
def autocast(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    if dtype == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def inference_fn(model: nn.Module, video: torch.Tensor, device: torch.device, dtype: str) -> Callable[[], Any]:
    def run() -> torch.Tensor:
        with torch.inference_mode(), autocast(device, dtype):
            return model(video)

    return run


def train_fn(model: nn.Module, opt: torch.optim.Optimizer, video: torch.Tensor, labels: torch.Tensor,
             device: torch.device, dtype: str) -> Callable[[], Any]:
    def run() -> float:
        opt.zero_grad(set_to_none=True)
        with autocast(device, dtype):
            loss = F.cross_entropy(model(video).float(), labels)
        loss.backward()
        opt.step()
        return loss.detach()

    return run


def state_bytes(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, float]:
    params = list(model.parameters())
    opt_tensors = [v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor) and v.dim()]
    return {"params": storage_bytes(params),
            "grads": sum(p.numel() * p.element_size() for p in params if p.requires_grad),
            "optimizer": storage_bytes(opt_tensors)}


def cpu_training_memory(variant: Variant, video: torch.Tensor, labels: torch.Tensor, device: torch.device,
                        dtype: str) -> dict[str, float]:
    """Activation bytes saved for backward (unique storages, parameters excluded) + state bytes."""
    model, opt = variant.model, variant.optimizer
    opt.zero_grad(set_to_none=True)
    meter = SavedTensorBytes(exclude=model.parameters(), within=model.compressors.values())
    with meter, autocast(device, dtype):
        loss = F.cross_entropy(model(video).float(), labels)
    loss.backward()
    opt.step()
    out = {"activations": float(meter.total), "compressor_activations": float(meter.within_total),
           **state_bytes(model, opt)}
    out["total"] = out["activations"] + out["params"] + out["grads"] + out["optimizer"]
    return out


# -- targets --------------------------------------------------------------------------------------
@dataclass
class Target:
    goal: str
    met: bool | None  # None: not measured
    detail: str
    profile: list[tuple[str, str]] = field(default_factory=list)  # (kind, variant) to profile when missed
    why: list[str] = field(default_factory=list)


def _ratio(values: dict[str, Variant], name: str, attr: str) -> float:
    if attr == "gflops":
        return values[name].gflops / values["naive"].gflops
    if attr == "memory":
        return values[name].memory["train"] / values["naive"].memory["train"]
    return median(getattr(values[name], attr)) / median(getattr(values["naive"], attr))


def evaluate_targets(by_name: dict[str, Variant]) -> list[Target]:
    targets = []
    for s in SETTINGS:
        goal = f"{s}: inference latency ratio within 0.05 of its GFLOPs ratio"
        if s not in by_name:
            targets.append(Target(goal, None, "not measured"))
            continue
        lat, gfl = _ratio(by_name, s, "infer_s"), _ratio(by_name, s, "gflops")
        targets.append(Target(goal, abs(lat - gfl) <= 0.05, f"latency {lat:.3f} vs GFLOPs {gfl:.3f} "
                              f"(difference {lat - gfl:+.3f})", [("infer", s), ("infer", "naive")]))
    goal = "inti_middle faster than tome at matched GFLOPs (inference)"
    if {"inti_middle", "tome"} <= set(by_name):
        inti, tome = by_name["inti_middle"].infer_s, by_name["tome"].infer_s
        a, b = median(inti), median(tome)
        g = by_name["tome"].gflops / by_name["inti_middle"].gflops
        detail = f"{1e3 * a:.1f} ms vs {1e3 * b:.1f} ms (tome/InTI GFLOPs {g:.3f})"
        noise = max(spread(inti), spread(tome))
        if abs(a - b) / min(a, b) < noise:
            detail += (f"; the {100 * abs(a - b) / min(a, b):.0f}% difference is smaller than the round-to-round "
                       f"spread (±{100 * noise:.0f}%), so it is not conclusive on this machine")
        targets.append(Target(goal, a < b, detail, [("infer", "inti_middle"), ("infer", "tome")]))
    else:
        targets.append(Target(goal, None, "not measured (tome or inti_middle missing)"))
    if "inti_middle" in by_name:
        r = _ratio(by_name, "inti_middle", "train_s")
        targets.append(Target("inti_middle training step time <= 0.8 of naive", r <= 0.8, f"ratio {r:.3f}",
                              [("train", "inti_middle"), ("train", "naive")]))
        m = _ratio(by_name, "inti_middle", "memory")
        act = by_name["inti_middle"].memory.get("activations")
        extra = f" (activations alone {act / by_name['naive'].memory['activations']:.3f})" if act else ""
        targets.append(Target("inti_middle training peak memory <= 0.75 of naive", m <= 0.75,
                              f"ratio {m:.3f}{extra}", [("train_memory", "inti_middle"), ("train_memory", "naive")]))
    return targets


def explain_latency(by_name: dict[str, Variant], name: str, comp_s: float) -> str:
    """Split a variant's latency/GFLOPs gap into its compressors and the rest of the model."""
    v, n = by_name[name], by_name["naive"]
    lat0, g0 = median(n.infer_s), n.gflops
    lat = median(v.infer_s)
    if v.compressor == "inti":
        uncounted = ("InTI's work that the FLOP convention does not count (LayerNorm over 2C-wide pair features, "
                     "GELU, softmax, concatenations, the depth-wise 3-D convolution's memory traffic)")
    elif v.compressor == "tome":
        uncounted = ("token merging's matching and merging (normalise, sort, gather, scatter-add: hardly any "
                     "multiply-adds), plus the additive attention mask that proportional attention gives every "
                     "later block (kept out of the compressor time above, it lands in the second part)")
    else:
        uncounted = "the compressor's element-wise work, which the FLOP convention does not count"
    return (f"{name}: compressors take {1e3 * comp_s:.1f} ms = {comp_s / lat0:.3f} of naive's latency for "
            f"{v.compressor_gflops / g0:.3f} of its GFLOPs; the rest of the model takes "
            f"{(lat - comp_s) / lat0:.3f} of naive's latency for {(v.gflops - v.compressor_gflops) / g0:.3f} of "
            f"its GFLOPs. The first part is {uncounted}; the second shows how efficiently the blocks run on "
            "fewer frames or tokens (fixed per-call costs, smaller matrix products).")


def explain_memory(by_name: dict[str, Variant], name: str, frames: int) -> str:
    v, n = by_name[name].memory, by_name["naive"].memory
    if "activations" not in v:
        return (f"{name}: peak {v['train'] / MIB:.0f} MiB vs naive {n['train'] / MIB:.0f} MiB (CUDA allocator peak, "
                "including weights, gradients, optimizer state and workspaces); see the memory profiles below")
    schedule = by_name[name].model.frame_schedule(frames)
    frame_ratio = sum(schedule) / (frames * len(schedule))
    comp = v["compressor_activations"]
    state_v, state_n = (m["params"] + m["grads"] + m["optimizer"] for m in (v, n))
    projected = ", ".join(f"{(state_v + k * v['activations']) / (state_n + k * n['activations']):.3f}"
                          for k in (2, 4, 8))
    return (f"{name}: activations {v['activations'] / MIB:.0f} MiB vs naive {n['activations'] / MIB:.0f} MiB (ratio "
            f"{v['activations'] / n['activations']:.3f}). The blocks see {frame_ratio:.3f} of naive's frames "
            f"(schedule {schedule}); their activations are {(v['activations'] - comp) / n['activations']:.3f} of "
            f"naive's, and the compressors save another {comp / MIB:.0f} MiB "
            f"({comp / n['activations']:.3f} of naive's activations) for their backward. Parameters + gradients + "
            f"AdamW state take {state_v / MIB:.0f} MiB vs naive's {state_n / MIB:.0f} MiB (the compressors' own "
            "weights add to them) and do not shrink with fewer frames: at this clip size and batch they are "
            f"{state_n / n['train']:.2f} of naive's total, which pulls the total ratio towards 1. Activations grow "
            "linearly with the batch while the state does not, so the same measurements give a total ratio of "
            f"{projected} for 2, 4 and 8 times this batch (projected, not measured).")


# -- report ---------------------------------------------------------------------------------------
def results_table(variants: list[Variant], batch: int, device: torch.device) -> tuple[list[str], list[list[str]]]:
    naive = variants[0]
    mem_head = "train peak MiB" if device.type == "cuda" else "train act+state MiB"
    headers = ["variant", "layers", "note", "GFLOPs/clip", "x naive", "infer ms", "x naive", "clips/s",
               "train step ms", "x naive", mem_head, "x naive", "params M"]
    rows = []
    for v in variants:
        lat, step = median(v.infer_s), median(v.train_s)
        rows.append([
            v.name, ",".join(map(str, v.layers)) if len(v.layers) <= 4 else f"{v.layers[0]}..{v.layers[-1]}", v.note,
            f"{v.gflops:.2f}", f"{v.gflops / naive.gflops:.3f}",
            f"{1e3 * lat:.1f} ±{100 * spread(v.infer_s):.0f}%", f"{lat / median(naive.infer_s):.3f}", f"{batch / lat:.2f}",
            f"{1e3 * step:.1f} ±{100 * spread(v.train_s):.0f}%", f"{step / median(naive.train_s):.3f}",
            f"{v.memory['train'] / MIB:.0f}", f"{v.memory['train'] / naive.memory['train']:.3f}",
            f"{sum(p.numel() for p in v.model.parameters()) / 1e6:.2f}",
        ])
    return headers, rows


def plot_ratios(variants: list[Variant], path: Path, title: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    naive = variants[0]
    series = {
        "GFLOPs": [v.gflops / naive.gflops for v in variants],
        "inference latency": [median(v.infer_s) / median(naive.infer_s) for v in variants],
        "training step": [median(v.train_s) / median(naive.train_s) for v in variants],
        "training memory": [v.memory["train"] / naive.memory["train"] for v in variants],
    }
    fig = Figure(figsize=(1.3 * len(variants) + 2, 4.6))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    width = 0.8 / len(series)
    for i, (label, values) in enumerate(series.items()):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(variants))]
        ax.bar(xs, values, width, label=label)
    ax.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax.set_xticks(range(len(variants)), [v.name for v in variants], rotation=20)
    ax.set_ylabel("ratio to naive (lower is better)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, ncols=len(series), loc="upper center", bbox_to_anchor=(0.5, -0.2))
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--backbone", default="vit_small_patch16_224", help="timm model name (random init)")
    p.add_argument("--frames", type=int, default=None, help="frames per clip (default 16; --quick: 8)")
    p.add_argument("--size", type=int, default=None, help="frame size, passed as img_size (default 224; --quick: 112)")
    p.add_argument("--batch", type=int, default=1, help="clips per batch (default 1)")
    p.add_argument("--repeats", type=int, default=None, help="timed inference rounds (default 5)")
    p.add_argument("--train-repeats", type=int, default=None, help="timed training rounds (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds before timing (default 1)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                   help="fp32, or bf16 autocast (weights and optimizer stay fp32)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--num-classes", type=int, default=400)
    p.add_argument("--variants", default=None, help="comma list to measure (naive is always included)")
    p.add_argument("--tome-layers", default="all", help="'all' (every block but the last) or a comma list")
    p.add_argument("--profile", choices=("missed", "always", "never"), default="missed",
                   help="torch.profiler tables for the variants behind missed targets (default), all, or none")
    p.add_argument("--quick", action="store_true", help="~1-minute smoke run: 8 x 112^2 frames")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--results-name", default=None, help="file name under results/ (default speed_<device>[_quick])")
    p.add_argument("--note", action="append", default=[], help="a line for the Notes section (repeatable)")
    args = p.parse_args(argv)
    quick = args.quick
    args.frames = args.frames or (8 if quick else 16)
    args.size = args.size or (112 if quick else 224)
    args.repeats = args.repeats or 5
    args.train_repeats = args.train_repeats or 3
    for name in ("frames", "size", "batch", "repeats", "train_repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def prepare(args: argparse.Namespace) -> tuple[list[Variant], list[str], int]:
    """The variants with their GFLOPs (tome's r matched to InTI middle), notes, and the backbone depth."""
    log(f"counting GFLOPs of {args.backbone} on {args.frames} x {args.size}^2 (meta device)")
    meta_backbone = build_backbone(args, "meta")
    meta_video = torch.empty(args.batch, 3, args.frames, args.size, args.size, device="meta")
    probe = ia.inject(meta_backbone, [])
    depth = len(probe.host.blocks)
    probe.unload()
    variants, notes = plan_variants(args, depth)
    by_name = {v.name: v for v in variants}
    for v in variants:
        if v.compressor != "tome":
            v.gflops, v.compressor_gflops = count_gflops(args, v, meta_backbone, meta_video)
    if "tome" in by_name:
        if "inti_middle" in by_name:
            tome = by_name["tome"]
            notes.append(match_tome(args, tome, by_name["inti_middle"].gflops, meta_backbone, meta_video))
            tome.gflops, tome.compressor_gflops = count_gflops(args, tome, meta_backbone, meta_video)
        else:
            notes.append("skipped tome: its r is matched to inti_middle, which is not measured")
            variants.remove(by_name["tome"])
    for n in notes:
        log("note: " + n)
    return variants, notes, depth


def measure(args: argparse.Namespace, variants: list[Variant], device: torch.device) -> dict[str, dict[str, Any]]:
    """Time inference and training steps (interleaved) and measure training memory; returns the timed functions."""
    log(f"building {len(variants)} models on {device}")
    base = build_backbone(args, device)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    video = torch.randn(args.batch, 3, args.frames, args.size, args.size, device=device, generator=gen)
    labels = torch.randint(0, args.num_classes, (args.batch,), device=device, generator=gen)
    for v in variants:
        v.model = v.inject(copy.deepcopy(base)).eval()
    del base
    by_name = {v.name: v for v in variants}
    fns: dict[str, dict[str, Any]] = {"infer": {}, "train": {}}
    fns["infer"] = {v.name: inference_fn(v.model, video, device, args.dtype) for v in variants}
    log(f"inference: {args.warmup} warm-up + {args.repeats} interleaved rounds")
    for n, ts in interleaved_timings(fns["infer"], repeats=args.repeats, warmup=args.warmup, device=device,
                                     progress=log).items():
        by_name[n].infer_s = ts
    if device.type == "cuda":
        for v in variants:
            v.memory["infer"] = cuda_peak_bytes(fns["infer"][v.name], storage_bytes(v.model.parameters()), device)

    for v in variants:
        v.model.train()
        v.optimizer = torch.optim.AdamW([p for p in v.model.parameters() if p.requires_grad], lr=1e-6)
        fns["train"][v.name] = train_fn(v.model, v.optimizer, video, labels, device, args.dtype)
    log(f"training: {max(1, args.warmup)} warm-up + {args.train_repeats} interleaved rounds")
    for n, ts in interleaved_timings(fns["train"], repeats=args.train_repeats, warmup=max(1, args.warmup),
                                     device=device, progress=log).items():
        by_name[n].train_s = ts
    log("training memory")
    for v in variants:
        if device.type == "cuda":
            grads = sum(p.grad.numel() * p.grad.element_size() for p in v.model.parameters() if p.grad is not None)
            st = state_bytes(v.model, v.optimizer)
            v.memory["train"] = cuda_peak_bytes(fns["train"][v.name], st["params"] + st["optimizer"] + grads, device)
        else:
            v.memory.update(cpu_training_memory(v, video, labels, device, args.dtype))
            v.memory["train"] = v.memory["total"]
    return fns


def diagnose(args: argparse.Namespace, variants: list[Variant], targets: list[Target], fns: dict[str, dict[str, Any]],
             device: torch.device) -> dict[tuple[str, str], str]:
    """Profile the variants behind missed targets (or all, with --profile always) and explain the misses."""
    by_name = {v.name: v for v in variants}
    want = set()
    for t in targets:
        if args.profile == "always" or (args.profile == "missed" and t.met is False):
            want.update(t.profile)
    if not want:
        return {}
    log(f"profiling {sorted(want)}")
    profiles: dict[tuple[str, str], str] = {}
    for kind, vname in sorted(want):
        model = by_name[vname].model
        model.train(kind != "infer")
        fn = fns["infer" if kind == "infer" else "train"][vname]
        profiles[(kind, vname)] = profile_table(fn, device, memory=kind == "train_memory")
    comp_time = {}
    for vname in sorted({n for k, n in want if k == "infer" and n != "naive"}):
        model = by_name[vname].model.eval()
        comp_time[vname] = module_seconds(list(model.compressors.values()), fns["infer"][vname], device, calls=2)
    for t in targets:
        if t.met is False:
            t.why += [explain_latency(by_name, n, comp_time[n]) for k, n in t.profile if k == "infer" and n in comp_time]
            if "memory" in t.goal:
                t.why.append(explain_memory(by_name, "inti_middle", args.frames))
    return profiles


def report(args: argparse.Namespace, variants: list[Variant], targets: list[Target],
           profiles: dict[tuple[str, str], str], notes: list[str], depth: int, device: torch.device,
           info: dict[str, str]) -> Path:
    """Print the table and the targets; write results/<name>.md and the PNG."""
    name = args.results_name or f"speed_{device.type}" + ("_quick" if args.quick else "")
    headers, rows = results_table(variants, args.batch, device)
    table = markdown_table(headers, rows, align="lll" + "r" * (len(headers) - 3))
    status = {True: "MET", False: "MISSED", None: "n/a"}
    target_lines = [f"- **{status[t.met]}** {t.goal}: {t.detail}" for t in targets]
    print(table)
    print("\n".join(target_lines))

    mem_how = ("CUDA: torch.cuda.max_memory_allocated during one step, minus the memory held by the other "
               "variants' models (so it includes this variant's weights, gradients, AdamW state, activations and "
               "workspaces)" if device.type == "cuda" else
               "CPU: exact bytes of the unique tensor storages saved for backward during one training forward "
               "(torch.autograd.graph.saved_tensors_hooks; parameters excluded, autocast weight copies included) "
               "plus the bytes of parameters, gradients and AdamW state. Transient buffers freed during the "
               "forward are not included, so this is the memory held at the start of backward")
    setup = (f"{args.backbone} (random init, {depth} blocks), clip {args.batch} x 3 x {args.frames} x {args.size}^2 "
             f"(batch x C x T x H x W), {args.dtype} on {device}. Inference: eval mode, torch.inference_mode; "
             f"{args.warmup} warm-up + {args.repeats} rounds. Training: full fine-tuning, cross-entropy on random "
             f"labels, AdamW; {max(1, args.warmup)} warm-up + {args.train_repeats} rounds. Every round visits all "
             "variants (round-robin, starting one further each round); figures are medians, ± is (max - min) / "
             "median. GFLOPs: inti_adapters.count_gflops (multiply-adds, paper convention) per clip, counted on the "
             f"meta device. Throughput = batch / median latency.\n\nPeak memory measure: {mem_how}.")
    png = RESULTS_DIR / f"{name}.png"
    sections = [("Setup", setup), ("Results", table), ("Picture", f"![ratios to naive]({png.name})"),
                ("Targets", "\n".join(target_lines))]
    if device.type == "cuda":
        sections.append(("Inference peak memory (MiB)", markdown_table(
            ["variant", "peak MiB"], [[v.name, f"{v.memory['infer'] / MIB:.0f}"] for v in variants])))
    else:
        keys = ("activations", "compressor_activations", "params", "grads", "optimizer", "total")
        sections.append(("Training memory breakdown (MiB)", markdown_table(
            ["variant", "activations", "of which in compressors", "params", "grads", "AdamW state", "total"],
            [[v.name] + [f"{v.memory[k] / MIB:.0f}" for k in keys] for v in variants])))
    why = [f"**{t.goal}** ({t.detail}):\n\n" + "\n\n".join(t.why) for t in targets if t.why]
    if why:
        sections.append(("Why targets were missed", "\n\n".join(why)))
    where = "self CUDA" if device.type == "cuda" else "self CPU"
    for (kind, vname), tab in sorted(profiles.items()):
        what = {"infer": ("inference", "time"), "train": ("training step", "time"),
                "train_memory": ("training step", "memory allocated")}[kind]
        sections.append((f"Profile: {vname}, {what[0]} (top ops by {where} {what[1]})", f"```\n{tab.rstrip()}\n```"))
    sections.append(("Notes", "\n".join(f"- {n}" for n in [*notes, *args.note]) or "- none"))
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    plot_ratios(variants, png, f"{args.backbone}, {args.batch}x{args.frames}x{args.size}^2, {args.dtype}, {device}")
    path = write_results(name, f"Speed: naive vs InTI vs other compressors ({device.type})", sections, info=info)
    print(f"\nwrote {path} and {png}")
    return path


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("speed.py: error: --device cuda but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine_info(device)
    variants, notes, depth = prepare(args)
    fns = measure(args, variants, device)
    targets = evaluate_targets({v.name: v for v in variants})
    profiles = diagnose(args, variants, targets, fns, device)
    report(args, variants, targets, profiles, notes, depth, device, info)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
