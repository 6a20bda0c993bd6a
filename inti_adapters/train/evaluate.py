"""Multi-view evaluation: softmax scores averaged over temporal clips x spatial crops, top-1/top-5.

Every view of every sample goes through the model exactly once; the loader guarantees that
every sample is on exactly one rank, and the counts are summed over ranks at the end.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from ..video import normalize_video
from .distributed import all_reduce_max, all_reduce_sum

logger = logging.getLogger("inti_adapters.train")


@dataclass
class EvalResult:
    """Accuracies in percent, mean negative log-likelihood of the averaged scores, counts."""

    top1: float
    top5: float
    loss: float
    num_samples: int
    num_views: int
    gflops_per_view: float | None = None
    expected_samples: int | None = None  # what sizes.json lists (all ranks); None when unknown
    read_samples: int | None = None  # what was read from the shards (including undecodable ones)

    def summary(self) -> str:
        views = self.num_views // max(self.num_samples, 1)
        text = (f"top-1 {self.top1:.2f}  top-5 {self.top5:.2f}  loss {self.loss:.4f}  "
                f"({self.num_samples} videos x {views} views)")
        if self.expected_samples is not None:
            text += f"  [{self.read_samples} of {self.expected_samples} listed samples read]"
        if self.gflops_per_view is not None:
            text += f"  {self.gflops_per_view:.2f} GFLOPs/view"
        return text


def topk_correct(scores: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> list[int]:
    """How many rows have their label among the ``k`` highest scores, for each ``k``.

    ``k`` larger than the class count counts every row (the label is always among all classes).
    """
    if scores.dim() != 2 or labels.shape != scores.shape[:1]:
        raise ValueError(f"expected scores (N, K) and labels (N,), got {tuple(scores.shape)} and {tuple(labels.shape)}")
    kmax = min(max(ks), scores.shape[1])
    hits = scores.topk(kmax, dim=1).indices == labels[:, None]
    return [int(hits[:, : min(k, kmax)].any(dim=1).sum()) for k in ks]


def _views(video: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """``(B, V, 3, T, H, W)`` (or a single-view ``(B, 3, T, H, W)``) -> flat clips, B, V."""
    if video.dim() == 6:
        b, v = video.shape[:2]
        return video.flatten(0, 1), b, v
    if video.dim() == 5:
        return video, video.shape[0], 1
    raise ValueError(f"expected eval clips of shape (B, V, 3, T, H, W) or (B, 3, T, H, W), got {tuple(video.shape)}")


@torch.no_grad()
def evaluate(
    model: Callable[[torch.Tensor], torch.Tensor],
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    device: torch.device | str = "cpu",
    mean_std: Any = "clip",
    dtype: torch.dtype = torch.float32,
    clips_per_forward: int | None = None,
    max_batches: int | None = None,
    lockstep: bool = False,
) -> EvalResult:
    """Average the softmax scores of all views of each video and score the averages.

    Args:
        model: Anything mapping a float ``(N, 3, T, H, W)`` batch to logits ``(N, K)`` (an
            ``InTIModel`` or a DeepSpeed engine around one).
        loader: Yields ``(uint8 clips (B, V, 3, T, H, W), labels (B,))``.
        mean_std: Normalisation for :func:`inti_adapters.normalize_video`.
        clips_per_forward: Views per forward pass; None = all views of a batch at once.
        max_batches: Stop after this many batches (on every rank).
        lockstep: Keep all ranks doing the same number of forward passes (padding with
            throw-away passes) - required when forward passes are collective, as under ZeRO-3.
    """
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    device = torch.device(device)
    counts = [0.0, 0.0, 0.0, 0.0, 0.0]  # samples, views, top1 hits, top5 hits, summed nll
    it = iter(loader)
    batches = 0
    try:
        while max_batches is None or batches < max_batches:
            batch = next(it, None)
            clips = labels = None
            if batch is not None:
                clips, b, v = _views(batch[0])
                labels = batch[1].reshape(-1).to(device)
                if labels.numel() != b:
                    raise ValueError(f"{b} videos but {labels.numel()} labels in an eval batch")
            chunk = clips_per_forward or (clips.shape[0] if clips is not None else 1)
            passes = math.ceil(clips.shape[0] / chunk) if clips is not None else 0
            if lockstep:
                shape = list(clips.shape[1:]) if clips is not None else [0, 0, 0, 0]
                agreed = all_reduce_max([passes, *shape])
                if agreed[0] == 0:
                    break
                for _ in range(agreed[0] - passes):  # this rank ran out: keep the collectives matched
                    model(torch.zeros(1, *agreed[1:], device=device, dtype=dtype))
            elif clips is None:
                break
            batches += 1
            if clips is None:
                continue
            probs = [model(normalize_video(clips[s:s + chunk].to(device, non_blocking=True), mean_std,
                                           dtype=dtype)).float().softmax(dim=-1)
                     for s in range(0, clips.shape[0], chunk)]
            scores = torch.cat(probs).view(b, v, -1).mean(dim=1)
            top1, top5 = topk_correct(scores, labels)
            nll = -scores.gather(1, labels[:, None]).clamp_min(1e-12).log().sum()
            counts = [counts[0] + b, counts[1] + b * v, counts[2] + top1, counts[3] + top5, counts[4] + float(nll)]
    finally:
        if was_training and hasattr(model, "train"):
            model.train()
    report = getattr(loader, "read_report", None) if max_batches is None or batches < max_batches else None
    known = report is not None and report.expected is not None
    n, views, c1, c5, nll, expected, read, unknown = all_reduce_sum(
        [*counts, report.expected if known else 0, report.read if known else 0, 0 if known else 1])
    result = EvalResult(top1=100.0 * c1 / max(n, 1), top5=100.0 * c5 / max(n, 1), loss=nll / max(n, 1),
                        num_samples=int(n), num_views=int(views))
    if unknown == 0:
        result.expected_samples, result.read_samples = int(expected), int(read)
        _check_complete(result, getattr(loader, "on_incomplete", "raise"))
    return result


def _check_complete(result: EvalResult, policy: str) -> None:
    """Fail (or warn loudly) when the shards held another number of samples than ``sizes.json`` lists."""
    if result.read_samples == result.expected_samples:
        return
    msg = (f"evaluation read {result.read_samples} samples but sizes.json lists {result.expected_samples}: a shard is "
           f"damaged or truncated (the loader's warnings name it); the accuracy ({result.top1:.2f} top-1 on "
           f"{result.num_samples} videos) is not that of the whole set")
    if policy == "raise":
        raise RuntimeError(msg + " (set data.on_incomplete: warn to report it anyway)")
    logger.warning("WARNING: %s", msg)
