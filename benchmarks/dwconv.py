"""Depth-wise 3x3x3 convolution on channels-last video tokens: which formulation is fastest.

The InTI layer's cube context (and the temporal adapters' depth-wise convolutions) convolve
tokens laid out as ``(B, T, H, W, C)``. This script times, forward and forward + backward
(gradients of input, weight and bias), the formulations below at the demo model's scale (width 64,
16 clips x 8 frames x 8x8 grid) and ViT-S/16's (width 384, 1 clip x 16 frames x 14x14), each
checked against ``nn.Conv3d`` first. Rounds are interleaved (round-robin, starting one further each
round) and the figures are medians; ``x conv3d`` is the fwd+bwd time over the first row's.

- ``conv3d``: ``nn.Conv3d(C, C, 3, padding=1, groups=C)`` on a contiguous NCTHW copy (the old code).
- ``conv3d_cl``: the same on the channels-last-3d view of the tokens (no copy).
- ``taps2d``: :func:`inti_adapters.ops.depthwise_conv3d` with ``formulation="taps"`` (the library's
  choice off the CPU): one depth-wise ``conv2d`` per temporal tap over all frames (channels-last),
  then shifted adds over time. Fast kernels for it exist on every backend (cuDNN, oneDNN).
- ``conv3d_fn``: ``formulation="conv3d"`` (the library's choice on the CPU): ``conv3d_cl``'s forward
  (oneDNN has a fast depth-wise 3-D forward) with a hand-written backward (input gradient = the
  convolution with the flipped kernel, weight gradient = one ``conv2d`` weight gradient per
  temporal tap). Not the choice on GPUs: cuDNN has no depth-wise 3-D algorithm.
- ``taps2d_x3``: one depth-wise ``conv2d`` with 3 outputs per channel (one per tap), shifted adds.
- ``shift27``: 27 shifted slices of the zero-padded tokens, each times its per-channel weight.

    python benchmarks/dwconv.py                  # both scales, 1 thread, 15 rounds
    python benchmarks/dwconv.py --clock cpu      # thread CPU time: steadier on a shared machine
    python benchmarks/dwconv.py --device cuda    # on a GPU

Writes ``benchmarks/results/dwconv_<device>.md``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from _common import interleaved_timings, log, machine_info, markdown_table, median, spread, write_results

from inti_adapters.ops import depthwise_conv3d

SCALES = {"demo (C=64, 16x8x8x8)": (16, 8, 8, 8, 64), "ViT-S (C=384, 1x16x14x14)": (1, 16, 14, 14, 384)}
Conv = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def conv3d(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    vol = x.permute(0, 4, 1, 2, 3).contiguous()
    return F.conv3d(vol, w, b, padding=1, groups=x.shape[-1]).permute(0, 2, 3, 4, 1)


def conv3d_cl(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.conv3d(x.permute(0, 4, 1, 2, 3), w, b, padding=1, groups=x.shape[-1]).permute(0, 2, 3, 4, 1)


def _time_shift(y: torch.Tensor, s: int) -> torch.Tensor:
    pad = [0] * (2 * (y.dim() - 2))
    return F.pad(y[:, s:], [*pad, 0, s]) if s > 0 else F.pad(y[:, :s], [*pad, -s, 0])


def taps2d_x3(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    bsz, t, h, wd, c = x.shape
    frames = x.reshape(bsz * t, h, wd, c).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
    y = F.conv2d(frames, w.transpose(1, 2).reshape(3 * c, 1, 3, 3), padding=1, groups=c)  # channel c*3 + tap
    y = y.permute(0, 2, 3, 1).reshape(bsz, t, h, wd, c, 3)
    out = y[..., 1] + b
    return out if t == 1 else out + _time_shift(y[..., 0], -1) + _time_shift(y[..., 2], 1)


def shift27(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    _, t, h, wd, c = x.shape
    xp = F.pad(x, (0, 0, 1, 1, 1, 1, 1, 1))
    taps = w.reshape(c, 27).t()
    out = x.new_zeros(()) + b
    for k in range(27):
        i, j, m = k // 9, k // 3 % 3, k % 3
        out = out + xp[:, i:i + t, j:j + h, m:m + wd] * taps[k]
    return out


def taps2d(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return depthwise_conv3d(x, w, b, formulation="taps")


def conv3d_fn(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return depthwise_conv3d(x, w, b, formulation="conv3d")


CANDIDATES: dict[str, Conv] = {"conv3d": conv3d, "conv3d_cl": conv3d_cl, "taps2d": taps2d, "conv3d_fn": conv3d_fn,
                               "taps2d_x3": taps2d_x3, "shift27": shift27}


def _check(fns: dict[str, Conv], shape: tuple[int, ...], device: str) -> None:
    """Every candidate's output and gradients equal ``conv3d``'s (float64)."""
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(*shape, generator=g, device=device, dtype=torch.float64)
    w = torch.randn(shape[-1], 1, 3, 3, 3, generator=g, device=device, dtype=torch.float64)
    b = torch.randn(shape[-1], generator=g, device=device, dtype=torch.float64)
    out_grad = torch.randn(*shape, generator=g, device=device, dtype=torch.float64)
    ref = None
    for name, fn in fns.items():
        leaves = [v.clone().requires_grad_() for v in (x, w, b)]
        y = fn(*leaves)
        got = [y, *torch.autograd.grad(y, leaves, out_grad)]
        ref = ref or got
        for a, r in zip(got, ref, strict=True):
            torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-9, msg=f"{name} differs from conv3d")


def _runner(fn: Conv, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, backward: bool) -> Callable[[], None]:
    out_grad = torch.randn_like(x)

    def run() -> None:
        if backward:
            leaves = [x.detach().requires_grad_(), w.detach().requires_grad_(), b.detach().requires_grad_()]
            torch.autograd.grad(fn(*leaves), leaves, out_grad)
        else:
            with torch.no_grad():
                fn(x, w, b)

    return run


def measure(args: argparse.Namespace) -> dict[str, dict[str, list[float]]]:
    """``{scale: {"candidate fwd" | "candidate fwd+bwd": seconds per round}}``."""
    fns = dict(CANDIDATES)
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    out = {}
    for scale, shape in SCALES.items():
        if args.scales and not any(s in scale for s in args.scales):
            continue
        _check(fns, shape[:-1] + (8,), args.device)
        g = torch.Generator(device=args.device).manual_seed(1)
        x = torch.randn(*shape, generator=g, device=args.device)
        w = torch.randn(shape[-1], 1, 3, 3, 3, generator=g, device=args.device)
        b = torch.randn(shape[-1], generator=g, device=args.device)
        runs = {f"{k} {mode}": _runner(f, x, w, b, mode == "fwd+bwd") for k, f in fns.items()
                for mode in ("fwd", "fwd+bwd")}
        log(f"{scale}: {args.warmup} warm-up + {args.rounds} interleaved rounds of {len(runs)} functions")
        out[scale] = interleaved_timings(runs, repeats=args.rounds, warmup=args.warmup, device=args.device,
                                         clock=clock)
    return out


def table(results: dict[str, dict[str, list[float]]]) -> str:
    names = list(dict.fromkeys(k.rsplit(" ", 1)[0] for r in results.values() for k in r))
    headers = ["formulation"]
    for scale in results:
        headers += [f"{scale} fwd ms", "fwd+bwd ms", "x conv3d"]
    rows = []
    for n in names:
        row = [n]
        for r in results.values():
            fb = r[f"{n} fwd+bwd"]
            row += [f"{1e3 * median(r[f'{n} fwd']):.2f}", f"{1e3 * median(fb):.2f} ±{100 * spread(fb):.0f}%",
                    f"{median(fb) / median(r['conv3d fwd+bwd']):.2f}"]
        rows.append(row)
    return markdown_table(headers, rows)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall time, or this thread's CPU time (CPU only; steadier when other jobs share the cores)")
    p.add_argument("--scales", nargs="*", default=None, help="substrings of the scales to run (default: all)")
    p.add_argument("--note", action="append", default=[], help="a line for the Notes section (repeatable)")
    args = p.parse_args(argv)
    if args.clock == "cpu" and args.device != "cpu":
        p.error("--clock cpu measures CPU time; use the wall clock on a GPU")
    torch.set_num_threads(args.threads)
    info = machine_info(args.device)
    text = table(measure(args))
    print(text)
    how = (f"{args.warmup} warm-up + {args.rounds} interleaved rounds, medians, ± = (max - min) / median; "
           f"clock: {'thread CPU time' if args.clock == 'cpu' else 'wall time'}; float32; every candidate "
           "checked against conv3d (outputs, input/weight/bias gradients, float64) first.")
    sections = [("Setup", how), ("Results", text), ("Notes", "\n".join(f"- {n}" for n in args.note) or "- none")]
    path = write_results(f"dwconv_{torch.device(args.device).type}", "Depth-wise 3x3x3 convolution formulations",
                         sections, info=info)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
