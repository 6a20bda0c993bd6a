"""Accuracy vs GFLOPs on the built-in moving-digits data set (the Pareto picture of paper Table 2).

Every variant starts from the same image-pretrained ViT (the demo's, cached) and trains with the same
budget of steps, learning rate and seed through the engine; accuracy is measured on the validation
clips (disjoint digit scans), GFLOPs per clip with ``count_gflops``.

    python benchmarks/accuracy.py [--seeds 0 1] [--epochs 2 --steps-per-epoch 250]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_DIR, log, machine_info, markdown_table, write_results  # noqa: E402

from inti_adapters.data import ensure_builtin_dataset  # noqa: E402
from inti_adapters.demo import _cache_root, adapt, pretrain_image_model  # noqa: E402

LOCAL = [{"name": "local_mhra", "blocks": "all"}]
VARIANTS = {
    "naive": dict(layers=[], temporal=[]),
    "InTI [0, 1]": dict(layers=[0, 1], temporal=[]),
    "InTI [1, 2]": dict(layers=[1, 2], temporal=[]),
    "InTI [2, 3]": dict(layers=[2, 3], temporal=[]),
    "linear_pool [1, 2]": dict(layers=[1, 2], temporal=[], compressor="linear_pool"),
    "conv_pool [1, 2]": dict(layers=[1, 2], temporal=[], compressor="conv_pool"),
    "tome r=9 [0, 1, 2]": dict(layers=[0, 1, 2], temporal=[], compressor="tome", compressor_config={"r": 9}),
    "InTI [1, 2] + local temporal": dict(layers=[1, 2], temporal=LOCAL),
}


def _fmt(values: list[float]) -> str:
    m = statistics.mean(values)
    return f"{m:.1%}" + (f" ± {(max(values) - min(values)) / 2:.1%}" if len(values) > 1 else "")


def plot(rows: dict[str, dict], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for name, r in rows.items():
        acc = statistics.mean(r["accuracy"])
        ax.scatter(r["gflops"], acc, s=40)
        ax.annotate(name, (r["gflops"], acc), textcoords="offset points", xytext=(4, 4), fontsize=8)
    pts = sorted((r["gflops"], statistics.mean(r["accuracy"])) for r in rows.values())
    front, best = [], -1.0
    for g, a in pts:  # Pareto front: more accuracy for more GFLOPs
        if a > best:
            front.append((g, a))
            best = a
    ax.plot([g for g, _ in front], [a for _, a in front], "k--", lw=0.8, label="Pareto front")
    ax.set_xlabel("GFLOPs per clip (8 x 64^2)")
    ax.set_ylabel("top-1 (40 classes)")
    ax.set_title("Built-in moving digits: accuracy vs cost")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--steps-per-epoch", type=int, default=250)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--pretrain-steps", type=int, default=600)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--cache", default=None)
    args = ap.parse_args(argv)
    root = _cache_root(args.cache)
    ds = ensure_builtin_dataset(root / "data" / "digits")
    checkpoint = pretrain_image_model(ds, root / "demo", steps=args.pretrain_steps)
    rows: dict[str, dict] = {}
    for seed in args.seeds:
        for name in args.variants:
            log(f"seed {seed}: {name}")
            run = root / "accuracy" / f"seed{seed}" / "".join(c if c.isalnum() else "_" for c in name)
            r = adapt(name, VARIANTS[name], checkpoint=checkpoint, ds=ds, run_dir=run, epochs=args.epochs,
                      steps_per_epoch=args.steps_per_epoch, lr=args.lr, seed=seed)
            row = rows.setdefault(name, {"gflops": r["gflops"], "accuracy": [], "digit": [], "direction": [],
                                         "seconds": []})
            for k in ("accuracy", "digit", "direction", "seconds"):
                row[k].append(r[k])
    naive = rows.get("naive", next(iter(rows.values())))["gflops"]
    table = markdown_table(
        ["variant", "GFLOPs/clip", "vs naive", "top-1", "digit", "direction", "train time (s)"],
        [[n, f"{r['gflops']:.3f}", f"{100 * (r['gflops'] / naive - 1):+.0f}%", _fmt(r["accuracy"]), _fmt(r["digit"]),
          _fmt(r["direction"]), f"{statistics.mean(r['seconds']):.0f}"] for n, r in rows.items()])
    print(table)
    png = RESULTS_DIR / "accuracy.png"
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    plot(rows, png)
    setup = (f"ViT (4 blocks, width 64, patch 8, mean-pooled) pretrained on single frames ({args.pretrain_steps} "
             f"steps), then {args.epochs * args.steps_per_epoch} steps of 16 clips per variant, lr {args.lr}, "
             f"cosine with warm-up, DeepSpeed ZeRO-2 on gloo, seeds {args.seeds}; ± is half the range over seeds. "
             "Chance: top-1 2.5%, direction 25%.")
    write_results("accuracy", "Accuracy vs GFLOPs on the built-in moving digits",
                  [("Setup", setup), ("Results", table), ("Picture", "![accuracy vs GFLOPs](accuracy.png)")],
                  info=machine_info())


if __name__ == "__main__":
    main()
