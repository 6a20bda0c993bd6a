"""Accuracy vs GFLOPs on the built-in moving-digits data set (the Pareto picture of paper Table 2), with error bars.

Every variant starts from the same image-pretrained ViT (the demo's, cached) and trains with the same
budget of steps, learning rate and seed through the engine; accuracy is measured on the validation
clips (disjoint digit scans), GFLOPs per clip with ``count_gflops``. Each variant runs once per seed
(the seed drives the video adaptation: head init, data order, augmentation); the table gives the mean
and the sample standard deviation over seeds, and the plot draws it as error bars.

    python benchmarks/accuracy.py [--seeds 0 1 2] [--epochs 2 --steps-per-epoch 50] [--variants ...]
    python benchmarks/accuracy.py --replot benchmarks/results/accuracy.md   # redraw the picture only
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_DIR, log, machine_info, markdown_table, write_results  # noqa: E402

import inti_adapters as ia  # noqa: E402
from inti_adapters.data import ensure_builtin_dataset  # noqa: E402
from inti_adapters.demo import DATA_OPTIONS, _cache_root, _vit, adapt, pretrained_image_model  # noqa: E402

LOCAL = [{"name": "local_mhra", "blocks": "all"}]
TEMPORAL = " + local temporal"
ALONE = {
    "naive": dict(layers=[], temporal=[]),
    "InTI [0, 1] (early)": dict(layers=[0, 1], temporal=[]),
    "InTI [1, 2] (middle)": dict(layers=[1, 2], temporal=[]),
    "linear_pool [1, 2]": dict(layers=[1, 2], temporal=[], compressor="linear_pool"),
    "conv_pool [1, 2]": dict(layers=[1, 2], temporal=[], compressor="conv_pool"),
    "tome r=9 [0, 1, 2]": dict(layers=[0, 1, 2], temporal=[], compressor="tome", compressor_config={"r": 9}),
}
# The paper's Table 2 compares the compressors *with* UniFormerV2's temporal modules: its ToMe-B and
# LinearPooling-B have 115 M parameters (ViT-B/16's 86 M, as its Native-B, plus UniFormerV2-B's 29 M;
# ToMe adds none), on SSv2 163 M (UniFormerV2-B's there). So each compressor runs here with the local
# temporal module in every block too. ToMe cannot: the local module needs every frame's full token grid.
WITH_TEMPORAL = {f"{name.split(' (')[0]}{TEMPORAL}": {**spec, "temporal": LOCAL} for name, spec in ALONE.items()
                 if name in ("naive", "InTI [1, 2] (middle)", "linear_pool [1, 2]", "conv_pool [1, 2]")}
VARIANTS = {**ALONE, **WITH_TEMPORAL}
# paper Table 2: InTI > LinearPooling > ConvPooling, token methods above temporal downsampling
PAPER_ORDER = ("InTI [1, 2]", "linear_pool [1, 2]", "conv_pool [1, 2]")


def naive_gflops(ds) -> float:
    """GFLOPs per clip of the naive model (nothing injected), for the 'vs naive' column of any run."""
    model = ia.inject(_vit(ds.num_classes), layers=[])
    return ia.count_gflops(model, torch.zeros(1, 3, ds.num_frames, ds.image_size, ds.image_size))


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _fmt(values: list[float]) -> str:
    m, s = mean_std(values)
    return f"{m:.1%} ± {s:.1%}" if len(values) > 1 else f"{m:.1%}"


def _ordering_lines(rows: dict[str, dict], suffix: str) -> list[str]:
    """The paper's orderings among the variants named ``<base><suffix>``, each marked as it came out."""
    alike = [n for n in rows if (n.endswith(suffix) if suffix else TEMPORAL not in n)]
    lines = []
    present = [next(n for n in alike if n.startswith(base)) for base in PAPER_ORDER
               if any(n.startswith(base) for n in alike)]
    for a, b in zip(present, present[1:], strict=False):
        (ma, sa), (mb, sb) = mean_std(rows[a]["accuracy"]), mean_std(rows[b]["accuracy"])
        same = "; within one std" if abs(ma - mb) <= max(sa, sb) else ""
        lines.append(f"- {a} > {b} (paper): {'holds' if ma > mb else 'does NOT hold'} here "
                     f"({ma:.1%} vs {mb:.1%}{same})")
    tokens = [n for n in alike if n.startswith(("InTI", "tome"))]
    pools = [n for n in alike if n.startswith(("linear_pool", "conv_pool"))]
    if tokens and pools:
        best_token = max(tokens, key=lambda n: statistics.mean(rows[n]["accuracy"]))
        best_pool = max(pools, key=lambda n: statistics.mean(rows[n]["accuracy"]))
        mt, mp = statistics.mean(rows[best_token]["accuracy"]), statistics.mean(rows[best_pool]["accuracy"])
        lines.append(f"- token methods above temporal downsampling (paper): best token method {best_token} "
                     f"{mt:.1%} vs best pooling {best_pool} {mp:.1%}: {'holds' if mt > mp else 'does NOT hold'}")
    return lines


def ordering(rows: dict[str, dict]) -> list[str]:
    """The paper's orderings, each marked as it came out here (means over seeds, with the stds): among
    the compressors alone, and among the compressors with the local temporal module (the paper's setting)."""
    parts = []
    for suffix, title in (("", "Compressors alone"), (TEMPORAL, "With the local temporal module in every block "
                                                                  "(the paper's setting)")):
        lines = _ordering_lines(rows, suffix)
        if lines:
            parts += [f"{title}:", "", *lines, ""]
    return parts[:-1]


def plot(points: dict[str, tuple[float, float, float]], path: Path) -> None:
    """Top-1 against GFLOPs with error bars: ``points[name] = (gflops, mean, std)``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 4.8))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for name, (gflops, acc, std) in points.items():
        ax.errorbar(gflops, acc, yerr=std, fmt="o", capsize=3, ms=5)
        ax.annotate(name, (gflops, acc), textcoords="offset points", xytext=(4, 4), fontsize=8)
    front, best = [], -1.0
    for g, a in sorted((g, a) for g, a, _ in points.values()):  # Pareto front: more accuracy for more GFLOPs
        if a > best:
            front.append((g, a))
            best = a
    ax.plot([g for g, _ in front], [a for _, a in front], "k--", lw=0.8, label="Pareto front (means)")
    ax.margins(x=0.25, y=0.08)  # room for the labels right of the points
    ax.set_xlabel("GFLOPs per clip (8 x 64^2)")
    ax.set_ylabel("top-1 (40 classes), mean ± std over seeds")
    ax.set_title("Built-in moving digits: accuracy vs cost")
    ax.legend(loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def points_from_results(text: str) -> dict[str, tuple[float, float, float]]:
    """``(gflops, mean, std)`` of each variant in the Results table of a results file this script wrote."""
    points = {}
    for line in text.split("## Results", 1)[-1].split("\n## ", 1)[0].splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 4 or cells[0] == "variant" or set(cells[0]) <= set(":-"):
            continue
        mean, _, std = cells[3].partition("±")
        points[cells[0]] = (float(cells[1]), float(mean.strip(" %")) / 100, float(std.strip(" %") or 0) / 100)
    if not points:
        raise ValueError("no Results table found (expected the markdown this script writes)")
    return points


def _inti_option(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` -> ``(key, value)``, the value parsed as JSON (a bare word stays a string); the key
    must be an InTIConfig field."""
    key, sep, value = text.partition("=")
    fields = {f.name for f in dataclasses.fields(ia.InTIConfig)}
    if not sep or key not in fields:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE with KEY one of {sorted(fields)}, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def variant_spec(name: str, inti_options: dict[str, object]) -> dict:
    """``VARIANTS[name]``, with ``inti_options`` added to the compressor options of an InTI variant."""
    spec = VARIANTS[name]
    if inti_options and spec["layers"] and spec.get("compressor", "inti") == "inti":
        spec = {**spec, "compressor_config": {**spec.get("compressor_config", {}), **inti_options}}
    return spec


def _arguments() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--steps-per-epoch", type=int, default=50)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--cache", default=None)
    ap.add_argument("--added-lr-scale", type=float, default=1.0,
                    help="lr multiplier for the added modules (optim.added_lr_scale; default 1 = the same lr)")
    ap.add_argument("--inti-option", action="append", default=[], type=_inti_option, metavar="KEY=VALUE",
                    help="an InTIConfig option for the InTI variants, the value as JSON (e.g. head_init_std=0.02; "
                         "repeatable)")
    ap.add_argument("--name", default="accuracy", help="results file name under results/ (and its .png)")
    ap.add_argument("--note", action="append", default=[], help="a line for the Notes section (repeatable)")
    ap.add_argument("--replot", metavar="RESULTS_MD", default=None,
                    help="only redraw the picture of a results file from its table (no training), beside it")
    return ap


def main(argv: list[str] | None = None) -> None:
    args = _arguments().parse_args(argv)
    if args.replot:
        md = Path(args.replot)
        plot(points_from_results(md.read_text()), md.with_suffix(".png"))
        log(f"redrew {md.with_suffix('.png')}")
        return
    info = machine_info()  # before the runs: the load at the start, and the tree before the plot is written
    overrides = [f"optim.added_lr_scale={args.added_lr_scale}"]
    inti_options = dict(args.inti_option)
    root = _cache_root(args.cache)
    ds = ensure_builtin_dataset(root / "data" / "digits", **DATA_OPTIONS)
    image = pretrained_image_model(ds, root)
    rows: dict[str, dict] = {}
    for seed in args.seeds:
        for name in args.variants:
            log(f"seed {seed}: {name}")
            run = root / "accuracy" / f"seed{seed}" / "".join(c if c.isalnum() else "_" for c in name)
            r = adapt(name, variant_spec(name, inti_options), checkpoint=image.path, ds=ds, run_dir=run, epochs=args.epochs,
                      steps_per_epoch=args.steps_per_epoch, lr=args.lr, seed=seed, overrides=overrides)
            row = rows.setdefault(name, {"gflops": r["gflops"], "accuracy": [], "digit": [], "direction": [],
                                         "axis": [], "step_ms": []})
            for k in ("accuracy", "digit", "direction", "axis", "step_ms"):
                row[k].append(r[k])
    naive = rows["naive"]["gflops"] if "naive" in rows else naive_gflops(ds)
    table = markdown_table(
        ["variant", "GFLOPs/clip", "vs naive", "top-1", "digit", "direction", "axis", "ms/step (median)"],
        [[n, f"{r['gflops']:.3f}", f"{100 * (r['gflops'] / naive - 1):+.0f}%", _fmt(r["accuracy"]), _fmt(r["digit"]),
          _fmt(r["direction"]), _fmt(r["axis"]), f"{statistics.mean(r['step_ms']):.0f}"] for n, r in rows.items()])
    order = "\n".join(ordering(rows))
    print(table + "\n\n" + order)
    png = RESULTS_DIR / f"{args.name}.png"
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    plot({n: (r["gflops"], *mean_std(r["accuracy"])) for n, r in rows.items()}, png)
    added = f" ({args.added_lr_scale:g} x for the added modules)" if args.added_lr_scale != 1 else ""
    if inti_options:
        added += f"; InTI layers built with {', '.join(f'{k}={v!r}' for k, v in inti_options.items())}"
    setup = (f"ViT (4 blocks, width 64, patch 8, 4 heads, class token) pretrained on single frames (still-frame "
             f"digit accuracy {image.accuracy:.1%} on the held-out scans), then {args.epochs * args.steps_per_epoch} "
             f"steps of 16 clips per variant, lr {args.lr}{added}, cosine with warm-up, DeepSpeed ZeRO-2 on gloo, seeds "
             f"{args.seeds}; ± is the sample standard deviation over seeds. The compressors at layers [1, 2] cost "
             "slightly fewer GFLOPs than InTI there (InTI's weight predictor); ToMe's r is chosen to match InTI "
             "[1, 2]'s GFLOPs. Chance: top-1 2.5%, direction 25%, axis (horizontal / vertical) 50%; a model that knows the "
             "axis but not the sign of the motion has direction = axis / 2. ms/step: median wall time of a training step "
             "(data included), mean over seeds.")
    write_results(args.name, "Accuracy vs GFLOPs on the built-in moving digits",
                  [("Setup", setup), ("Results", table), ("Against the paper's Table 2", order),
                   ("Picture", f"![accuracy vs GFLOPs]({args.name}.png)"),
                   *([("Notes", "\n".join(f"- {n}" for n in args.note))] if args.note else [])],
                  info=info)


if __name__ == "__main__":
    main()
