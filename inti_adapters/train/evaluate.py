"""Multi-view evaluation with mmaction2's conventions: clip scores averaged per video, top-1/top-5
and mean class accuracy.

- ``average_clips='prob'`` (default, as mmaction2's recognisers) averages the softmax of every
  view; ``'score'`` averages the raw scores (logits). The loss is the negative log-likelihood of
  the label under the averaged prediction (the softmax of the averaged scores for ``'score'``).
- Views are written as mmaction2 does, ``frames×clips×crops`` (``16×4×3``: 16-frame clips, 4
  temporal clips, 3 spatial crops), in every summary and results file.
- ``mean_class_accuracy`` is mmaction2's ``AccMetric`` one: the mean over classes of the fraction
  of each class's videos predicted right (top-1), over the classes that occur among the labels
  or the predictions (a class only ever predicted counts 0, as in mmaction2).

Every view of every sample goes through the model exactly once; the loader guarantees that
every sample is on exactly one rank, and the counts (per class too) are summed over ranks. An
evaluation that saw no sample at all is an error, not a top-1 of 0.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from ..video import normalize_video
from .distributed import all_reduce_max, all_reduce_sum

AVERAGE_CLIPS = ("prob", "score")
logger = logging.getLogger("inti_adapters.train")


@dataclass
class EvalResult:
    """Accuracies in percent, mean negative log-likelihood of the averaged scores, counts, views."""

    top1: float
    top5: float
    loss: float
    num_samples: int
    num_views: int
    gflops_per_view: float | None = None
    mean_class_accuracy: float = 0.0
    num_frames: int | None = None
    num_clips: int | None = None
    num_crops: int | None = None
    average_clips: str = "prob"
    expected_samples: int | None = None  # what sizes.json lists (all ranks); None when unknown
    read_samples: int | None = None  # what was read from the shards (including undecodable ones)

    @property
    def views(self) -> str:
        """The views of each video in mmaction2's notation, frames×clips×crops (``16×4×3``)."""
        frames = self.num_frames if self.num_frames is not None else "?"
        if self.num_clips is None or self.num_crops is None:
            return f"{frames}×{self.num_views // max(self.num_samples, 1)} views"
        return f"{frames}×{self.num_clips}×{self.num_crops}"

    def summary(self) -> str:
        text = (f"top-1 {self.top1:.2f}  top-5 {self.top5:.2f}  mean class acc {self.mean_class_accuracy:.2f}  "
                f"loss {self.loss:.4f}  ({self.num_samples} videos, views {self.views} frames×clips×crops, "
                f"average_clips={self.average_clips})")
        if self.expected_samples is not None:
            text += f"  [{self.read_samples} of {self.expected_samples} listed samples read]"
        if self.gflops_per_view is not None:
            text += f"  {self.gflops_per_view:.2f} GFLOPs/view"
        return text

    def to_dict(self) -> dict[str, Any]:
        """Every field plus ``views`` (for results files)."""
        return {**dataclasses.asdict(self), "views": self.views}


def topk_correct(scores: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> list[int]:
    """How many rows have their label among the ``k`` highest scores, for each ``k``.

    ``k`` larger than the class count counts every row (the label is always among all classes).
    """
    if scores.dim() != 2 or labels.shape != scores.shape[:1]:
        raise ValueError(f"expected scores (N, K) and labels (N,), got {tuple(scores.shape)} and {tuple(labels.shape)}")
    kmax = min(max(ks), scores.shape[1])
    hits = scores.topk(kmax, dim=1).indices == labels[:, None]
    return [int(hits[:, : min(k, kmax)].any(dim=1).sum()) for k in ks]


def mean_class_accuracy(class_hits: torch.Tensor, class_counts: torch.Tensor, predicted: torch.Tensor) -> float:
    """mmaction2's mean class accuracy (a fraction) from per-class counts: top-1 hits and videos
    per label, and how often each class was predicted."""
    present = (class_counts > 0) | (predicted > 0)
    recall = class_hits[present] / class_counts[present].clamp_min(1)
    return float(recall.mean()) if recall.numel() else 0.0


def _views(video: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """``(B, V, 3, T, H, W)`` (or a single-view ``(B, 3, T, H, W)``) -> flat clips, B, V."""
    if video.dim() == 6:
        b, v = video.shape[:2]
        return video.flatten(0, 1), b, v
    if video.dim() == 5:
        return video, video.shape[0], 1
    raise ValueError(f"expected eval clips of shape (B, V, 3, T, H, W) or (B, 3, T, H, W), got {tuple(video.shape)}")


def _video_scores(model: Callable[[torch.Tensor], torch.Tensor], clips: torch.Tensor, bv: tuple[int, int],
                  chunk: int, device: torch.device, mean_std: Any, dtype: torch.dtype,
                  average_clips: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores of every view, ``chunk`` views per forward, averaged per video: ``(B, K)`` scores and log-probs."""
    logits = torch.cat([model(normalize_video(clips[s:s + chunk].to(device, non_blocking=True), mean_std,
                                              dtype=dtype)).float() for s in range(0, clips.shape[0], chunk)])
    logits = logits.view(*bv, -1)
    if average_clips == "prob":
        probs = logits.softmax(dim=-1).mean(dim=1)
        return probs, probs.clamp_min(1e-12).log()
    scores = logits.mean(dim=1)
    return scores, scores.log_softmax(dim=-1)


@dataclass
class _Tally:
    """What one rank counted; :meth:`result` sums it over ranks."""

    counts: list[float] = field(default_factory=lambda: [0.0] * 5)  # samples, views, top1, top5, nll
    per_class: torch.Tensor = field(default_factory=lambda: torch.zeros(3, 0, dtype=torch.float64))
    frames: int = 0

    def add(self, scores: torch.Tensor, logp: torch.Tensor, labels: torch.Tensor, views: int, frames: int) -> None:
        b, k = scores.shape
        if labels.numel() and not 0 <= int(labels.min()) <= int(labels.max()) < k:
            raise ValueError(f"labels must be in [0, {k}) for a model with {k} outputs, got {labels.tolist()}")
        top1, top5 = topk_correct(scores, labels)
        nll = -float(logp.gather(1, labels[:, None]).sum())
        self.counts = [c + d for c, d in zip(self.counts, (b, b * views, top1, top5, nll), strict=True)]
        labels, pred = labels.cpu(), scores.argmax(dim=1).cpu()
        per_class = torch.stack([torch.bincount(labels[pred == labels], minlength=k),
                                 torch.bincount(labels, minlength=k), torch.bincount(pred, minlength=k)]).double()
        self.per_class = per_class if not self.per_class.numel() else self.per_class + per_class
        self.frames = frames

    def result(self, average_clips: str, num_crops: int | None) -> EvalResult:
        k, frames = all_reduce_max([self.per_class.shape[1], self.frames])  # a rank may have seen no batch
        local = torch.zeros(3, k, dtype=torch.float64)
        local[:, : self.per_class.shape[1]] = self.per_class
        total = all_reduce_sum(self.counts + local.flatten().tolist())
        (n, views, c1, c5, nll), per_class = total[:5], torch.tensor(total[5:], dtype=torch.float64).view(3, k)
        per_video = int(views) // max(int(n), 1)
        clips = per_video // num_crops if num_crops and per_video % num_crops == 0 else None
        return EvalResult(top1=100.0 * c1 / max(n, 1), top5=100.0 * c5 / max(n, 1), loss=nll / max(n, 1),
                          num_samples=int(n), num_views=int(views), average_clips=average_clips,
                          mean_class_accuracy=100.0 * mean_class_accuracy(*per_class), num_frames=frames or None,
                          num_clips=clips, num_crops=num_crops if clips is not None else None)


def _batches(loader: Iterable[Any], device: torch.device, max_batches: int | None) -> Iterator[Any]:
    """``(clips, b, v, labels)`` per batch, then ``None`` forever (ranks that ran out in lockstep)."""
    it, seen = iter(loader), 0
    while max_batches is None or seen < max_batches:
        batch = next(it, None)
        if batch is None:
            break
        clips, b, v = _views(batch[0])
        labels = batch[1].reshape(-1).to(device)
        if labels.numel() != b:
            raise ValueError(f"{b} videos but {labels.numel()} labels in an eval batch")
        seen += 1
        yield clips, b, v, labels
    while True:
        yield None


def _agree_on_passes(model: Callable, clips: torch.Tensor | None, passes: int, device: torch.device,
                     dtype: torch.dtype) -> bool:
    """Lockstep: all ranks run as many forward passes; False once every rank is done."""
    shape = list(clips.shape[1:]) if clips is not None else [0, 0, 0, 0]
    agreed = all_reduce_max([passes, *shape])
    if agreed[0] == 0:
        return False
    for _ in range(agreed[0] - passes):  # this rank ran out: keep the collectives matched
        model(torch.zeros(1, *agreed[1:], device=device, dtype=dtype))
    return True


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
    average_clips: str = "prob",
    num_crops: int | None = None,
) -> EvalResult:
    """Average the scores of all views of each video (mmaction2's ``average_clips``) and score the averages.

    Args:
        model: Anything mapping a float ``(N, 3, T, H, W)`` batch to logits ``(N, K)`` (an
            ``InTIModel`` or a DeepSpeed engine around one).
        loader: Yields ``(uint8 clips (B, V, 3, T, H, W), labels (B,))``, ``V = clips x crops``.
        mean_std: Normalisation for :func:`inti_adapters.normalize_video`.
        clips_per_forward: Views per forward pass; None = all views of a batch at once.
        max_batches: Stop after this many batches (on every rank).
        lockstep: Keep all ranks doing the same number of forward passes (padding with
            throw-away passes) - required when forward passes are collective, as under ZeRO-3.
        average_clips: ``'prob'`` (mean of the softmax of the views, mmaction2's default) or
            ``'score'`` (mean of the raw scores).
        num_crops: Spatial crops per clip, to write the views as frames×clips×crops.

    Raises:
        RuntimeError: no sample at all was evaluated (on any rank), or the shards held another number of
            samples than their ``sizes.json`` lists (``data.on_incomplete: raise``).
    """
    if average_clips not in AVERAGE_CLIPS:
        raise ValueError(f"average_clips must be one of {list(AVERAGE_CLIPS)} (as in mmaction2), got {average_clips!r}")
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    device, tally, batches = torch.device(device), _Tally(), 0
    try:
        for batch in _batches(loader, device, max_batches):
            clips, b, v, labels = batch if batch is not None else (None, 0, 0, None)
            chunk = clips_per_forward or (clips.shape[0] if clips is not None else 1)
            passes = math.ceil(clips.shape[0] / chunk) if clips is not None else 0
            if (lockstep and not _agree_on_passes(model, clips, passes, device, dtype)) or (not lockstep and not passes):
                break
            batches += 1
            if clips is not None:
                scores, logp = _video_scores(model, clips, (b, v), chunk, device, mean_std, dtype, average_clips)
                tally.add(scores, logp, labels, v, clips.shape[2])
    finally:
        if was_training and hasattr(model, "train"):
            model.train()
    result = tally.result(average_clips, num_crops)
    _read_report(result, loader, complete=max_batches is None or batches < max_batches)
    if result.num_samples == 0:
        raise RuntimeError(f"evaluation saw no sample (0 videos on every rank) from {_describe(loader)}: the shards "
                           "are empty, every sample was undecodable, or max_batches is 0; an accuracy of nothing is "
                           "not reported")
    return result


def _describe(loader: Any) -> str:
    """The shards a loader reads, for messages (its type name when it is not a shard loader)."""
    shards = getattr(loader, "shards", None)
    if isinstance(shards, list) and shards:
        return f"{len(shards)} shard(s) ({shards[0]}{' ...' if len(shards) > 1 else ''})"
    return f"the loader {type(loader).__name__}"


def _read_report(result: EvalResult, loader: Any, complete: bool) -> None:
    """How many samples ``sizes.json`` listed and how many were read (all ranks); fail or warn on a gap."""
    report = getattr(loader, "read_report", None) if complete else None
    known = report is not None and report.expected is not None
    expected, read, unknown = all_reduce_sum([report.expected if known else 0, report.read if known else 0,
                                              0 if known else 1])
    if unknown == 0:
        result.expected_samples, result.read_samples = int(expected), int(read)
        _check_complete(result, getattr(loader, "on_incomplete", "raise"))


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
