"""Speed side by side: naive vs InTI (early / middle / late) vs other compressors at matched GFLOPs.

Measures, in one process with the variants interleaved (round-robin over variants for each
repeat, after warm-up), the median inference latency and throughput, the median training step
time (forward + backward + AdamW step, full fine-tuning) and the training peak memory, next to
each variant's GFLOPs (``inti_adapters.count_gflops``, counted on the meta device). ``tome``
merges the same number ``r`` of tokens per frame after every block but the last (ToMe's
schedule; ``--tome-layers``), with ``r`` bisected so that its GFLOPs match InTI middle.

Per-component breakdown: after the timed rounds, one forward + backward of each variant's training
step is profiled (``--breakdown-rounds`` times) and its time charged to the transformer blocks, the
InTI layers (compressors), the temporal adapters, head/pool and other, next to each component's share
of GFLOPs (see ``_components.py`` for how; the optimizer step is left out: it is per-parameter work
that GFLOPs do not count). Target: the InTI layers' share of step time <= 1.5 x their share of GFLOPs.

``--preset demo`` measures the model ``make demo`` trains (``inti_adapters.demo``: a 4-block ViT of
width 64, 8 x 64^2 clips, batch 16, no class token) as naive, InTI [1, 2] and InTI [1, 2] + local
temporal modules in every block, on random clips of the digits data set's shape.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` (minus what the other variants hold);
on CPU the training step's activation memory measured exactly with
``torch.autograd.graph.saved_tensors_hooks`` (bytes of the unique storages saved for backward,
parameters excluded) plus the bytes of parameters, gradients and optimizer state.

    python benchmarks/speed.py                       # ViT-S/16, 16 x 224^2, batch 1, CPU
    python benchmarks/speed.py --quick               # ~1-minute smoke run (8 x 112^2)
    python benchmarks/speed.py --preset demo         # the demo model (width 64, 16 clips x 8 x 64^2)
    python benchmarks/speed.py --threads 1           # steadier figures on a CPU shared with other jobs
    python benchmarks/speed.py --device cuda --dtype bf16 --backbone vit_base_patch16_clip_224 --batch 8

``--kernels`` adds the InTI layer's two kernels side by side (``_speed_kernels.py``): the hand-fused CPU
kernel and the plain layer (``InTIConfig.kernel`` = ``fused`` / ``reference``), eager and compiled
(``--compile-backend``), on the first InTI variant, and which one ``kernel="auto"`` runs:

    python benchmarks/speed.py --preset demo --kernels --threads 1

Writes ``benchmarks/results/speed_<device>[_demo][_quick].md`` and a PNG beside it.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import sys
from collections.abc import Callable, Sequence
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
    module_seconds,
    profile_table,
    storage_bytes,
    write_results,
)
from _components import component_gflops, component_times
from _speed_kernels import compare_kernels
from _speed_parts import (
    BREAKDOWN_HOW,
    MIB,
    SETTINGS,
    Target,
    Variant,
    breakdown_table,
    evaluate_targets,
    explain_latency,
    explain_memory,
    fwd_bwd_fn,
    plot_ratios,
    results_table,
)
from torch import nn

import inti_adapters as ia

BASELINE_LAYERS = (4, 6)  # the other frame compressors sit where InTI middle does
DEMO_DEFAULTS = dict(backbone="vit_tiny_patch16_224", frames=8, size=64, batch=16, num_classes=40)
VIT_DEFAULTS = dict(backbone="vit_small_patch16_224", frames=16, size=224, batch=1, num_classes=400)


# -- setup ----------------------------------------------------------------------------------------
def scale_layers(layers: Sequence[int], depth: int) -> tuple[int, ...]:
    """Map 12-block positions to a backbone of ``depth`` blocks (after block i of 12 -> same fraction)."""
    return tuple(sorted({min(depth - 2, max(0, round((i + 1) * depth / 12) - 1)) for i in layers}))


def build_backbone(args: argparse.Namespace, device: str | torch.device) -> nn.Module:
    from inti_adapters.demo import MODEL_KWARGS

    kwargs = {**MODEL_KWARGS, "img_size": args.size} if args.preset == "demo" else {"img_size": args.size}
    torch.manual_seed(args.seed)
    with torch.device(device):
        return timm.create_model(args.backbone, pretrained=False, num_classes=args.num_classes, **kwargs)


def demo_variants() -> list[Variant]:
    """The variants ``make demo`` trains (``inti_adapters.demo.VARIANTS``)."""
    from inti_adapters.demo import VARIANTS

    out = []
    for spec in VARIANTS.values():
        layers, temporal = tuple(spec["layers"]), tuple(spec["temporal"])
        name = "+".join(["inti" if layers else "naive", *(t["name"] for t in temporal)])
        out.append(Variant(name, layers, temporal=temporal, note=f"InTI {list(layers)}" if layers else ""))
    return out


def plan_variants(args: argparse.Namespace, depth: int) -> tuple[list[Variant], list[str]]:
    """The variants to measure and notes on those skipped."""
    notes: list[str] = []
    if args.preset == "demo":
        return demo_variants(), notes
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
    """GFLOPs per clip of the whole model and of its compressors alone (meta device, no compute).

    Also fills ``variant.component_gflops`` (per clip, by component, see ``_components.py``).
    """
    model = variant.inject(meta_backbone)
    try:
        parts = component_gflops(model, meta_video)
    finally:
        model.unload()
    variant.component_gflops = {k: v / args.batch for k, v in parts.items()}
    return sum(parts.values()) / args.batch, parts["compressors"] / args.batch


def match_tome(args: argparse.Namespace, variant: Variant, target: float, meta_backbone: nn.Module,
               meta_video: torch.Tensor) -> str:
    """Bisect tome's ``r`` so its GFLOPs are closest to ``target`` (per clip); returns a note.

    Raises:
        ValueError: If no ``r`` brings tome down to ``target`` (``inti_adapters.r_for_budget``).
    """
    r = ia.r_for_budget(meta_backbone, meta_video, list(variant.layers), target * args.batch)
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


# -- report ---------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", choices=("vit", "demo"), default="vit",
                   help="vit: ViT-S/16 16 x 224^2 batch 1 (default); demo: the make-demo model, 16 clips x 8 x 64^2")
    p.add_argument("--backbone", default=None, help="timm model name, random init (default vit_small_patch16_224)")
    p.add_argument("--frames", type=int, default=None, help="frames per clip (default 16; --quick: 8; demo: 8)")
    p.add_argument("--size", type=int, default=None,
                   help="frame size, passed as img_size (default 224; --quick: 112; demo: 64)")
    p.add_argument("--batch", type=int, default=None, help="clips per batch (default 1; demo: 16)")
    p.add_argument("--repeats", type=int, default=None, help="timed inference rounds (default 5)")
    p.add_argument("--train-repeats", type=int, default=None, help="timed training rounds (default 3)")
    p.add_argument("--breakdown-rounds", type=int, default=None,
                   help="profiled fwd+bwd rounds for the per-component breakdown (default 3; --quick: 1)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds before timing (default 1)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                   help="fp32, or bf16 autocast (weights and optimizer stay fp32)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--num-classes", type=int, default=None, help="default 400; demo: 40")
    p.add_argument("--variants", default=None, help="comma list to measure (naive is always included)")
    p.add_argument("--tome-layers", default="all", help="'all' (every block but the last) or a comma list")
    p.add_argument("--profile", choices=("missed", "always", "never"), default="missed",
                   help="torch.profiler tables for the variants behind missed targets (default), all, or none")
    p.add_argument("--quick", action="store_true", help="~1-minute smoke run: 8 x 112^2 frames (demo: fewer rounds)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--results-name", default=None,
                   help="file name under results/ (default speed_<device>[_demo][_quick])")
    p.add_argument("--note", action="append", default=[], help="a line for the Notes section (repeatable)")
    p.add_argument("--kernels", action="store_true",
                   help="also time the InTI kernels (fused / reference), eager and compiled, on the first InTI variant")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend of --kernels (default inductor)")
    return _defaults(p, p.parse_args(argv))


def _defaults(p: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """Fill the options left unset from the preset (and --quick); check the counts."""
    base = dict(DEMO_DEFAULTS if args.preset == "demo" else VIT_DEFAULTS)
    if args.quick and args.preset == "vit":
        base.update(frames=8, size=112)
    for name, value in base.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.repeats = args.repeats or (3 if args.quick and args.preset == "demo" else 5)
    args.train_repeats = args.train_repeats or 3
    args.breakdown_rounds = args.breakdown_rounds or (1 if args.quick else 3)
    for name in ("frames", "size", "batch", "repeats", "train_repeats", "breakdown_rounds"):
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
            try:
                notes.append(match_tome(args, tome, by_name["inti_middle"].gflops, meta_backbone, meta_video))
                tome.gflops, tome.compressor_gflops = count_gflops(args, tome, meta_backbone, meta_video)
            except ValueError as e:  # too few tokens per frame to merge down to InTI's budget
                notes.append(f"skipped tome: {e}")
                variants.remove(tome)
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
    measure_breakdown(args, variants, video, labels, device)
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


def measure_breakdown(args: argparse.Namespace, variants: list[Variant], video: torch.Tensor, labels: torch.Tensor,
                      device: torch.device) -> None:
    """Profile each variant's fwd+bwd and charge its time to components (rounds interleaved over variants)."""
    log(f"per-component breakdown: {args.breakdown_rounds} profiled fwd+bwd round(s) per variant")
    for r in range(args.breakdown_rounds):
        shift = r % len(variants)
        for v in variants[shift:] + variants[:shift]:
            fn = fwd_bwd_fn(v.model, video, labels, lambda: autocast(device, args.dtype))
            for k, sec in component_times(v.model, fn, device).items():
                v.component_s.setdefault(k, []).append(sec)


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


def setup_text(args: argparse.Namespace, depth: int, device: torch.device) -> str:
    mem_how = ("CUDA: torch.cuda.max_memory_allocated during one step, minus the memory held by the other "
               "variants' models (so it includes this variant's weights, gradients, AdamW state, activations and "
               "workspaces)" if device.type == "cuda" else
               "CPU: exact bytes of the unique tensor storages saved for backward during one training forward "
               "(torch.autograd.graph.saved_tensors_hooks; parameters excluded, autocast weight copies included) "
               "plus the bytes of parameters, gradients and AdamW state. Transient buffers freed during the "
               "forward are not included, so this is the memory held at the start of backward")
    demo = " (the make-demo model, random clips of the digits data's shape)" if args.preset == "demo" else ""
    return (f"{args.backbone}{demo} (random init, {depth} blocks), clip {args.batch} x 3 x {args.frames} x "
            f"{args.size}^2 (batch x C x T x H x W), {args.dtype} on {device}. Inference: eval mode, "
            f"torch.inference_mode; {args.warmup} warm-up + {args.repeats} rounds. Training: full fine-tuning, "
            f"cross-entropy on random labels, AdamW; {max(1, args.warmup)} warm-up + {args.train_repeats} rounds. "
            "Every round visits all variants (round-robin, starting one further each round); figures are medians, "
            "± is (max - min) / median. GFLOPs: inti_adapters.FlopCounter (multiply-adds, paper convention) per "
            f"clip, counted on the meta device. Throughput = batch / median latency.\n\nPeak memory measure: {mem_how}."
            f"\n\nPer-component breakdown: {args.breakdown_rounds} profiled forward + backward round(s) of each "
            "variant's training step (no optimizer step), interleaved over the variants, medians. "
            + BREAKDOWN_HOW)


def detail_sections(variants: list[Variant], targets: list[Target], profiles: dict[tuple[str, str], str],
                    device: torch.device) -> list[tuple[str, str]]:
    """Memory table, explanations of missed targets and the profiler tables."""
    if device.type == "cuda":
        sections = [("Inference peak memory (MiB)", markdown_table(
            ["variant", "peak MiB"], [[v.name, f"{v.memory['infer'] / MIB:.0f}"] for v in variants]))]
    else:
        keys = ("activations", "compressor_activations", "params", "grads", "optimizer", "total")
        sections = [("Training memory breakdown (MiB)", markdown_table(
            ["variant", "activations", "of which in compressors", "params", "grads", "AdamW state", "total"],
            [[v.name] + [f"{v.memory[k] / MIB:.0f}" for k in keys] for v in variants]))]
    why = [f"**{t.goal}** ({t.detail}):\n\n" + "\n\n".join(t.why) for t in targets if t.why]
    if why:
        sections.append(("Why targets were missed", "\n\n".join(why)))
    where = "self CUDA" if device.type == "cuda" else "self CPU"
    for (kind, vname), tab in sorted(profiles.items()):
        what = {"infer": ("inference", "time"), "train": ("training step", "time"),
                "train_memory": ("training step", "memory allocated")}[kind]
        sections.append((f"Profile: {vname}, {what[0]} (top ops by {where} {what[1]})", f"```\n{tab.rstrip()}\n```"))
    return sections


def report(args: argparse.Namespace, variants: list[Variant], targets: list[Target],
           profiles: dict[tuple[str, str], str], notes: list[str], depth: int, device: torch.device,
           info: dict[str, str], extra: Sequence[tuple[str, str]] = ()) -> Path:
    """Print the tables and the targets; write results/<name>.md and the PNG."""
    name = args.results_name or f"speed_{device.type}" + ("_demo" if args.preset == "demo" else "") + (
        "_quick" if args.quick else "")
    headers, rows = results_table(variants, args.batch, device)
    table = markdown_table(headers, rows, align="lll" + "r" * (len(headers) - 3))
    breakdown = breakdown_table(variants)
    status = {True: "MET", False: "MISSED", None: "n/a"}
    target_lines = [f"- **{status[t.met]}** {t.goal}: {t.detail}" for t in targets]
    print(table, breakdown, "\n".join(target_lines), *(text for _, text in extra), sep="\n\n")
    png = RESULTS_DIR / f"{name}.png"
    sections = [("Setup", setup_text(args, depth, device)), ("Results", table),
                ("Picture", f"![ratios to naive]({png.name})"), ("Targets", "\n".join(target_lines)),
                ("Per-component breakdown of the training step (forward + backward)", breakdown)]
    sections += detail_sections(variants, targets, profiles, device)
    sections += extra
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
    targets = evaluate_targets({v.name: v for v in variants}, args.preset)
    profiles = diagnose(args, variants, targets, fns, device)
    extra = [("InTI kernels: fused and plain, eager and compiled", compare_kernels(
        args, variants, build_backbone(args, device), lambda: autocast(device, args.dtype)))] if args.kernels else []
    report(args, variants, targets, profiles, notes, depth, device, info, extra)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
