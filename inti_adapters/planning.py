"""``plan``: which ``layers`` fit a GFLOPs budget, without computing block costs by hand.

The cost of a video forward is affine in the frames each block sees, so counted forward passes
of the naive model (at ``num_frames`` and at one frame) give a cost model:

    GFLOPs(layers) = stem(T) + sum_i block_i * frames_i + sum_l compressor(frames_in_l)
                     + pool * frames_last + head

Everything is counted under ``FakeTensorMode`` (shapes only, no arithmetic), so planning for
ViT-L at 16x224^2 takes seconds. The figures equal ``count_gflops`` of the injected model (tested).
Frame compressors only (``inti``, ``linear_pool``, ``conv_pool``); the frames after each one come
from its ``output_frames``. For token merging, :func:`r_for_budget` finds the ``r`` that meets a
budget.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from .compressors import build_compressor
from .flops import FlopCounter, count_gflops
from .model import InTIModel, inject
from .surgery import probe
from .tokens import TokenLayout, frame_schedule

__all__ = ["CostModel", "PlanEntry", "cost_model", "format_plan", "plan", "r_for_budget"]


@dataclass(frozen=True)
class PlanEntry:
    """One choice of ``layers`` and what it costs for one clip."""

    layers: tuple[int, ...]
    gflops: float
    fraction: float  # of the naive model's GFLOPs
    frames: tuple[int, ...]  # frames seen by each block


@dataclass
class CostModel:
    """Per-clip costs (GMACs) of one backbone at one frame count and image size."""

    num_frames: int
    stem: float  # before the first block, for num_frames frames
    block_per_frame: list[float]
    pool_per_frame: float
    head: float
    compressor: dict[int, float]  # input frames -> cost of one compressor
    output_frames: Callable[[int], int]  # the compressor's frames out for frames in

    def schedule(self, layers: tuple[int, ...]) -> list[int]:
        return frame_schedule(self.num_frames, len(self.block_per_frame), dict.fromkeys(layers, self.output_frames))

    def total(self, layers: tuple[int, ...]) -> float:
        frames = self.schedule(layers)
        cost = self.stem + sum(b * f for b, f in zip(self.block_per_frame, frames, strict=False))
        cost += sum(self.compressor[frames[i]] for i in layers)
        last = self.output_frames(frames[-1]) if len(frames) - 1 in layers else frames[-1]
        return cost + self.pool_per_frame * last + self.head


def _count_naive(model: Any, video: torch.Tensor) -> tuple[float, list[float], float]:
    """(stem, per-block costs, after-blocks cost) of one naive forward, in GMACs."""
    counter = FlopCounter()
    marks: dict[tuple[int, str], float] = {}
    index = {id(b): i for i, b in enumerate(model.host.blocks)}

    def before(m: nn.Module, args: tuple, kwargs: dict) -> None:
        marks[(index[id(m)], "in")] = counter.gflops

    def after(m: nn.Module, out: Any) -> None:
        marks[(index[id(m)], "out")] = counter.gflops

    with probe(model.host.blocks, before=before, after=after), model.disable_adapters(), torch.no_grad(), counter:
        model(video)
    depth = len(model.host.blocks)
    blocks = [marks[(i, "out")] - marks[(i, "in")] for i in range(depth)]
    return marks[(0, "in")], blocks, counter.gflops - marks[(depth - 1, "out")]


def cost_model(model: nn.Module, num_frames: int = 16, image_size: int | tuple[int, int] | None = None,
               *, compressor: str | None = None, **compressor_options: Any) -> CostModel:
    """Measure the per-block costs of ``model`` (a backbone or an ``InTIModel``).

    ``compressor``/``compressor_options`` default to the InTIModel's own, else InTI's defaults.
    """
    video_model = model if isinstance(model, InTIModel) else inject(model, layers=[])
    try:
        host = video_model.host
        if image_size is None:
            image_size = host.image_size
            if image_size is None:
                raise ValueError("pass image_size: the backbone does not say which size it was built for")
        h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
        if compressor is None:
            compressor = video_model.config.compressor
            compressor_options = {**video_model.config.compressor_config, **compressor_options}
        comp = build_compressor(compressor, host.embed_dim, compressor_options)  # real (small) weights
        with FakeTensorMode(allow_non_fake_inputs=True):
            video = torch.empty(1, host.in_chans, num_frames, h, w)
            stem, blocks, post_t = _count_naive(video_model, video)
            _, _, post_1 = _count_naive(video_model, video[:, :, :1])
            layout = TokenLayout(host.num_prefix_tokens, host.cls_index, host.grid_size(h, w))
            grid = layout.grid or (0, 0)
            n = layout.num_prefix_tokens + grid[0] * grid[1]
            costs = {}
            t = num_frames
            while True:
                counter = FlopCounter()
                with torch.no_grad(), counter:
                    y = comp(torch.empty(1, t, n, host.embed_dim), layout)
                if y.shape[2] != n:
                    raise ValueError(f"plan supports frame compressors only; {compressor!r} changes the token count")
                costs[t] = counter.gflops
                if t == 1 or comp.output_frames(t) == t:
                    break
                t = comp.output_frames(t)
    finally:
        if video_model is not model:
            video_model.unload()
    pool = (post_t - post_1) / (num_frames - 1) if num_frames > 1 else 0.0
    return CostModel(num_frames, stem, [b / num_frames for b in blocks], pool, post_1 - pool, costs, comp.output_frames)


def plan(
    model: nn.Module,
    num_frames: int = 16,
    budget: float | None = None,
    *,
    fraction: float | None = None,
    max_layers: int = 2,
    image_size: int | tuple[int, int] | None = None,
    compressor: str | None = None,
    **compressor_options: Any,
) -> list[PlanEntry]:
    """List the ``layers`` choices whose GFLOPs per clip fit a budget, most expensive first.

    Args:
        model: A backbone (e.g. a timm ViT) or an ``InTIModel`` (its compressor options are used).
        num_frames: Frames per clip.
        budget: Absolute budget in GFLOPs (paper convention) per clip, or
        fraction: the budget as a fraction of the naive model's GFLOPs (e.g. 0.65).
        max_layers: Consider 1..max_layers compressors (the paper uses 2).
        image_size: Frame size; defaults to the size the backbone was built for.
        compressor, **compressor_options: The compressor to cost (default: the model's, else ``inti``).

    Returns:
        A list of :class:`PlanEntry` (``layers``, ``gflops`` per clip, ``fraction`` of the naive
        model's GFLOPs, ``frames`` each block sees), one per choice of 1..``max_layers`` layers
        within the budget, the most expensive (closest to the budget) first; empty when none fits.

    Example:
        >>> for e in ia.plan(vit, 16, fraction=0.65)[:3]:   # doctest: +SKIP
        ...     print(e.layers, round(e.gflops, 1), f"{e.fraction:.0%}")
    """
    if (budget is None) == (fraction is None):
        raise ValueError(f"give exactly one of budget (GFLOPs) or fraction (of naive); got budget={budget}, "
                         f"fraction={fraction}")
    if fraction is not None and not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if max_layers < 1:
        raise ValueError(f"max_layers must be >= 1, got {max_layers}")
    costs = cost_model(model, num_frames, image_size, compressor=compressor, **compressor_options)
    naive = costs.total(())
    limit = budget if budget is not None else fraction * naive
    depth = len(costs.block_per_frame)
    entries = []
    for k in range(1, max_layers + 1):
        for layers in itertools.combinations(range(depth), k):
            g = costs.total(layers)
            if g <= limit:
                entries.append(PlanEntry(layers, g, g / naive, tuple(costs.schedule(layers))))
    entries.sort(key=lambda e: (-e.gflops, e.layers))
    return entries


def format_plan(entries: list[PlanEntry], top: int = 10) -> str:
    """A small table of the first ``top`` entries."""
    lines = [f"{'layers':<12} {'GFLOPs':>9} {'of naive':>9}"]
    lines += [f"{str(list(e.layers)):<12} {e.gflops:9.1f} {e.fraction:9.1%}" for e in entries[:top]]
    return "\n".join(lines)


def _largest_feasible(cost: Callable[[int], float | None], lo: int, hi: int) -> int:
    """Largest ``r`` in ``[lo, hi)`` whose cost is not None (``cost(lo)`` is feasible or ``lo == 0``)."""
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if cost(mid) is None:
            hi = mid
        else:
            lo = mid
    return lo


def r_for_budget(
    backbone: nn.Module, video: torch.Tensor, layers: Sequence[int], target_gflops: float, **options: Any
) -> int:
    """The smallest ``r`` (the same at every merging layer) whose clip cost is at most ``target_gflops``.

    Injects ``tome`` into ``backbone`` for each candidate, counts with
    :func:`inti_adapters.count_gflops` and unloads again (the backbone is left as it was). Works on
    the ``meta`` device for large models.

    Args:
        backbone: A host not already injected.
        video: An input of the size to budget for, ``(B, 3, T, H, W)``.
        layers: Merging block indices, as for ``inject``.
        target_gflops: Budget for the whole ``video`` batch.
        **options: Other ``tome`` options (``metric``, ``prop_attn``).

    Raises:
        ValueError: If even the largest feasible ``r`` exceeds the budget.
    """
    if "r" in options:
        raise TypeError("r_for_budget chooses r itself; do not pass r")

    def cost(r: int) -> float | None:
        model = inject(backbone, layers, compressor="tome", r=r, **options)
        try:
            return count_gflops(model, video)
        except ValueError as e:  # r larger than the tokens allow is infeasible; any other error is real
            if r == 0 or "can be merged" not in str(e):
                raise
            return None
        finally:
            model.unload()

    if cost(0) <= target_gflops:
        return 0
    lo, hi = 1, 1  # find the feasible range, then bisect (cost falls as r grows)
    while (c := cost(hi)) is not None and c > target_gflops:
        lo, hi = hi + 1, hi * 2
    if c is None:  # hi is infeasible: the largest feasible r bounds the search
        top = _largest_feasible(cost, lo - 1, hi)
        best = cost(top) if top >= 1 else None
        if best is None or best > target_gflops:
            raise ValueError(f"no r reaches {target_gflops} GFLOPs with layers {list(layers)}: the largest "
                             f"feasible r={top} costs {best} GFLOPs")
        hi = top
    while lo < hi:
        mid = (lo + hi) // 2
        c = cost(mid)
        lo, hi = (lo, mid) if c is not None and c <= target_gflops else (mid + 1, hi)
    return lo
