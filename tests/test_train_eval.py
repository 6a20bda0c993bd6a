"""Multi-view evaluation counts every view once and scores averaged softmax; the synthetic loader."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch import nn

from inti_adapters.train import SyntheticVideoLoader, evaluate, topk_correct

K, V, T, S = 4, 3, 2, 4


def test_topk_on_a_hand_made_example():
    scores = torch.tensor([
        [0.10, 0.50, 0.20, 0.05, 0.10, 0.05],  # label 1 ranked 1st
        [0.30, 0.20, 0.25, 0.10, 0.10, 0.05],  # label 2 ranked 2nd
        [0.05, 0.10, 0.15, 0.20, 0.22, 0.28],  # label 0 ranked 6th
        [0.20, 0.10, 0.30, 0.15, 0.04, 0.21],  # label 3 ranked 4th
        [0.20, 0.10, 0.30, 0.15, 0.04, 0.21],  # label 4 ranked 6th
    ])
    labels = torch.tensor([1, 2, 0, 3, 4])
    assert topk_correct(scores, labels, (1, 2, 5)) == [1, 2, 3]
    assert topk_correct(scores[:, :3], torch.tensor([1, 2, 0, 0, 1]), (1, 5)) == [1, 5]  # k > classes: all
    with pytest.raises(ValueError, match="expected scores"):
        topk_correct(scores, labels[:3])


def _logits(sample: int, view: int) -> torch.Tensor:
    return 3 * torch.randn(K, generator=torch.Generator().manual_seed(100 * sample + view))


class Probe(nn.Module):
    """Reads (sample, view) from the first pixels of each clip, records it, returns fixed logits."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[int, int]] = []
        self.batch_sizes: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.dtype == torch.float32 and x.shape[1:] == (3, T, S, S)
        ids = (x[:, :2, 0, 0, 0] * 255).round().long()
        self.batch_sizes.append(x.shape[0])
        out = []
        for s, v in ids.tolist():
            self.seen.append((s, v))
            out.append(_logits(s, v))
        return torch.stack(out)


def _batches(sizes: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out, s = [], 0
    for b in sizes:
        video = torch.zeros(b, V, 3, T, S, S, dtype=torch.uint8)
        for i in range(b):
            for v in range(V):
                video[i, v, 0, 0, 0, 0] = s + i
                video[i, v, 1, 0, 0, 0] = v
        out.append((video, torch.tensor([(s + i) % K for i in range(b)])))
        s += b
    return out


@pytest.mark.parametrize("clips_per_forward", [None, 4, 1])
@pytest.mark.parametrize("lockstep", [False, True])
def test_every_view_counted_once_and_softmax_averaged(clips_per_forward, lockstep):
    batches = _batches([3, 3, 1])  # uneven last batch
    probe = Probe().train()
    result = evaluate(probe, batches, mean_std=((0, 0, 0), (1, 1, 1)), clips_per_forward=clips_per_forward,
                      lockstep=lockstep)
    assert Counter(probe.seen) == Counter({(s, v): 1 for s in range(7) for v in range(V)})
    assert probe.training  # restored after evaluation
    if clips_per_forward:
        assert max(probe.batch_sizes) <= clips_per_forward
    # expected numbers, by hand: mean over views of softmax, then top-k / NLL of that mean
    labels = torch.tensor([s % K for s in range(7)])
    avg = torch.stack([torch.stack([_logits(s, v).softmax(0) for v in range(V)]).mean(0) for s in range(7)])
    ranks = (avg > avg.gather(1, labels[:, None])).sum(1)  # 0 = label has the top score
    assert result.num_samples == 7 and result.num_views == 7 * V
    assert result.top1 == pytest.approx(100 * (ranks < 1).float().mean().item())
    assert result.top5 == pytest.approx(100.0)  # 4 classes
    assert result.loss == pytest.approx(-avg.gather(1, labels[:, None]).log().mean().item(), rel=1e-6)
    # averaging logits instead of probabilities gives another loss on this data: the test can tell
    logit_avg = torch.stack([torch.stack([_logits(s, v) for v in range(V)]).mean(0).softmax(0) for s in range(7)])
    assert result.loss != pytest.approx(-logit_avg.gather(1, labels[:, None]).log().mean().item(), rel=1e-3)


def test_max_batches_and_single_view_input():
    probe = Probe()
    result = evaluate(probe, _batches([2, 2, 2]), mean_std=((0, 0, 0), (1, 1, 1)), max_batches=2)
    assert result.num_samples == 4 and len(probe.seen) == 4 * V
    probe = Probe()
    single = [(video[:, 1], labels) for video, labels in _batches([2, 1])]  # (B, 3, T, H, W): one view each
    result = evaluate(probe, single, mean_std=((0, 0, 0), (1, 1, 1)))
    assert result.num_samples == 3 and result.num_views == 3 and set(v for _, v in probe.seen) == {1}
    with pytest.raises(ValueError, match="expected eval clips of shape"):
        evaluate(probe, [(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.zeros(2))])


def test_synthetic_loader_interface():
    kw = dict(num_samples=22, num_classes=3, num_frames=T, size=S, batch_size=4)
    ranks = [SyntheticVideoLoader(train=True, rank=r, world_size=2, epoch=1, **kw) for r in range(2)]
    ids = [r.indices() for r in ranks]
    assert not set(ids[0]) & set(ids[1]) and sorted(ids[0] + ids[1]) == list(range(22))
    assert ids[0] != SyntheticVideoLoader(train=True, rank=0, world_size=2, epoch=2, **kw).indices()  # reshuffled
    batches = list(ranks[0])
    assert len(batches) == len(ranks[0]) == 2  # 11 samples -> 2 full batches of 4
    video, label = batches[0]
    assert video.dtype == torch.uint8 and video.shape == (4, 3, T, S, S) and label.dtype == torch.int64
    ranks[0].skip_batches(1)
    resumed = list(ranks[0])
    assert len(resumed) == 1 and torch.equal(resumed[0][0], batches[1][0])
    assert len(list(ranks[0])) == 2  # a skip applies to one iteration
    evals = [SyntheticVideoLoader(train=False, rank=r, world_size=2, num_views=2, **kw) for r in range(2)]
    seen = [int(lab) for e in evals for _, labels in e for lab in labels]
    assert len(seen) == 22 and next(iter(evals[0]))[0].shape == (4, 2, 3, T, S, S)
    # a clip depends on (seed, sample, view) only
    assert torch.equal(evals[0].clip(5, 1), ranks[1].clip(5, 1)) and not torch.equal(evals[0].clip(5, 0),
                                                                                      evals[0].clip(5, 1))
