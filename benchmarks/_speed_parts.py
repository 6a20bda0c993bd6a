"""Parts of ``speed.py``: the variant record, the targets and their explanations, and the
per-component breakdown of the training step (time next to GFLOPs, see ``_components.py``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from _common import markdown_table, median, spread
from _components import COMPONENTS, PRODUCTS
from torch import nn

import inti_adapters as ia

SETTINGS = {"inti_early": (2, 4), "inti_middle": (4, 6), "inti_late": (6, 8)}  # ViT-B/16 (12 blocks)
MIB = 2**20
SHARE_LIMIT = 1.5  # InTI layers' share of the step time <= SHARE_LIMIT x their share of GFLOPs


@dataclass
class Variant:
    """One model measured side by side with the others, and what was measured."""

    name: str
    layers: tuple[int, ...]
    compressor: str = "inti"
    options: dict[str, Any] = field(default_factory=dict)
    note: str = ""
    temporal: tuple[dict[str, Any], ...] = ()  # temporal adapters, as for ia.inject(temporal=...)
    gflops: float = 0.0  # per clip
    compressor_gflops: float = 0.0  # per clip, the compressor modules alone
    component_gflops: dict[str, float] = field(default_factory=dict)  # per clip, by component
    component_s: dict[str, list[float]] = field(default_factory=dict)  # fwd+bwd seconds by component, per round
    model: nn.Module | None = None
    optimizer: torch.optim.Optimizer | None = None
    infer_s: list[float] = field(default_factory=list)
    train_s: list[float] = field(default_factory=list)
    memory: dict[str, float] = field(default_factory=dict)  # bytes

    def inject(self, backbone: nn.Module) -> ia.InTIModel:
        return ia.inject(backbone, list(self.layers), compressor=self.compressor, temporal=list(self.temporal),
                         **self.options)


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


def evaluate_targets(by_name: dict[str, Variant], preset: str = "vit") -> list[Target]:
    """The latency, training-step and memory targets (ViT preset), then the InTI time-share targets."""
    shares = share_targets(list(by_name.values()))
    if preset != "vit":
        return shares
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
        conclusive = abs(a - b) / min(a, b) >= noise
        if not conclusive:  # not shown, whichever median is lower
            detail += (f"; the {100 * abs(a - b) / min(a, b):.0f}% difference is smaller than the round-to-round "
                       f"spread (±{100 * noise:.0f}%), so it is not conclusive on this machine")
        targets.append(Target(goal, a < b and conclusive, detail, [("infer", "inti_middle"), ("infer", "tome")]))
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
    return targets + shares


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




# -- tables and picture ----------------------------------------------------------------------------
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


# -- per-component breakdown of the training step ----------------------------------------------------
def is_inti(v: Variant) -> bool:
    return v.compressor == "inti" and bool(v.layers)


def component_shares(v: Variant) -> tuple[dict[str, float], dict[str, float]]:
    """``(time share, GFLOPs share)`` of each component; time: the median over the profiled rounds."""
    totals = v.component_s["total"]
    time = {c: median([s / tot for s, tot in zip(v.component_s[c], totals, strict=True)]) for c in COMPONENTS}
    flops = {c: v.component_gflops.get(c, 0.0) / v.gflops for c in COMPONENTS}
    return time, flops


def breakdown_table(variants: list[Variant]) -> str:
    """Per variant and component: GFLOPs and their share, fwd+bwd ms and their share, the ratio."""
    headers = ["variant", "component", "GFLOPs/clip", "GFLOPs share", "fwd+bwd ms", "time share",
               "time / GFLOPs share", "in products"]
    rows = []
    for v in variants:
        if not v.component_s:
            continue
        time, flops = component_shares(v)
        for c in COMPONENTS:
            if c in ("compressors", "temporal adapters") and not v.component_gflops.get(c) and not time[c] > 0.001:
                continue
            label = "InTI layers" if c == "compressors" and v.compressor == "inti" else c
            ratio = f"{time[c] / flops[c]:.2f}" if flops[c] > 0.001 else "-"
            rows.append([v.name, label, f"{v.component_gflops.get(c, 0.0):.3f}", f"{flops[c]:.3f}",
                         f"{1e3 * median(v.component_s[c]):.1f}", f"{time[c]:.3f}", ratio, product_share(v, c)])
        rows.append([v.name, "total (profiled step)", f"{v.gflops:.3f}", "1.000",
                     f"{1e3 * median(v.component_s['total']):.1f}", "1.000", "", ""])
    return markdown_table(headers, rows, align="ll" + "r" * 6)


def product_share(v: Variant, component: str) -> str:
    """The median share of a component's time spent in matrix products and convolutions (CPU only)."""
    products = v.component_s.get(PRODUCTS + component)
    if not products:
        return "-"
    shares = [p / s for p, s in zip(products, v.component_s[component], strict=True) if s > 0]
    return f"{median(shares):.2f}" if shares else "-"


def share_targets(variants: list[Variant]) -> list[Target]:
    """For every InTI variant: its InTI layers' share of the fwd+bwd time vs their share of GFLOPs."""
    targets = []
    for v in variants:
        if not is_inti(v):
            continue
        goal = f"{v.name}: InTI layers' share of step time <= {SHARE_LIMIT} x their share of GFLOPs"
        if not v.component_s:
            targets.append(Target(goal, None, "not measured"))
            continue
        time, flops = component_shares(v)
        t, g = time["compressors"], flops["compressors"]
        runs = ", ".join(f"{s / tot:.3f}" for s, tot in zip(v.component_s["compressors"], v.component_s["total"],
                                                                 strict=True))
        met = t <= SHARE_LIMIT * g
        why = [] if met else explain_share(v, time, flops)
        targets.append(Target(goal, met, f"time share {t:.3f} vs GFLOPs share {g:.3f} "
                              f"(x{t / g:.3f}; per profiled round {runs})", [("train", v.name)], why))
    return targets


def explain_share(v: Variant, time: dict[str, float], flops: dict[str, float]) -> list[str]:
    """Where an InTI variant's excess time share comes from: its matrix products vs everything else."""
    if not v.component_s.get(PRODUCTS + "compressors"):
        return []
    totals = v.component_s["total"]
    prod = {c: median([p / tot for p, tot in zip(v.component_s[PRODUCTS + c], totals, strict=True)])
            for c in ("compressors", "blocks")}
    rest = time["compressors"] - prod["compressors"]
    return [f"The InTI layers' matrix products and convolutions alone take {prod['compressors']:.3f} of the step "
            f"(x{prod['compressors'] / flops['compressors']:.2f} their GFLOPs share; the blocks' take "
            f"{prod['blocks']:.3f}, x{prod['blocks'] / flops['blocks']:.2f} theirs). The rest, {rest:.3f} of the "
            f"step ({product_share(v, 'compressors')} of the layers' time is in products against "
            f"{product_share(v, 'blocks')} of the blocks'), is layer norms, GELUs, softmax, frame-pair copies and "
            "element-wise interpolation: work that GFLOPs do not count and that grows with the width C while the "
            "products grow with C^2, so it weighs most on narrow models."]


def fwd_bwd_fn(model: nn.Module, video: torch.Tensor, labels: torch.Tensor, amp: Any) -> Any:
    """One forward + backward of the training step (no optimizer step): what the breakdown profiles."""
    def run() -> None:
        model.zero_grad(set_to_none=True)
        with amp():
            loss = torch.nn.functional.cross_entropy(model(video).float(), labels)
        loss.backward()

    return run


BREAKDOWN_HOW = (
    "Each component's forward + backward time comes from torch.profiler: forward hooks open a range per "
    "component call (forward: the range's wall time minus the ranges nested in it), and every autograd node "
    "of the backward is charged to the component whose forward op created it; 'other' (patch embedding, loss, "
    "autograd bookkeeping) is the rest of the profiled step, so the parts add up to it. GFLOPs by component "
    "are counted the same way (FLOPs between hook boundaries go to the innermost running component). The "
    "profiler adds a few microseconds per op, which weighs most on the components with the most ops per "
    "FLOP (the InTI layers). 'in products' (CPU): the share of a component's time spent in matrix products "
    "and convolutions, the ops that GFLOPs count; the rest (layer norms, activations, softmax, copies, "
    "element-wise arithmetic) grows with the width C where products grow with C^2, so narrow models pay "
    "relatively more for it. Details: benchmarks/_components.py.")
