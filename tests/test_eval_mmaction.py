"""Evaluation follows mmaction2: ``average_clips`` 'prob' | 'score', views written frames×clips×crops,
top-1 / top-5 and ``AccMetric``'s mean class accuracy, also when the counts are summed over ranks."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch import nn

from inti_adapters.train import evaluate
from inti_adapters.train.evaluate import EvalResult, mean_class_accuracy

K, V, T, S = 6, 4, 2, 4  # classes, views (2 clips x 2 crops), frames, size


def mmaction2_mean_class_accuracy(scores: np.ndarray, labels: np.ndarray) -> float:
    """mmaction2's ``mean_class_accuracy``, restated: a confusion matrix over the classes found among
    the labels or the predictions (rows: labels); the mean of hits / row count, 0 for an empty row."""
    pred = scores.argmax(axis=1)
    classes = np.unique(np.concatenate([pred, labels]))
    index = {c: i for i, c in enumerate(classes)}
    cm = np.zeros((len(classes), len(classes)))
    for p, y in zip(pred, labels, strict=True):
        cm[index[y], index[p]] += 1
    counts, hits = cm.sum(axis=1), np.diag(cm)
    return float(np.mean([h / c if c else 0.0 for c, h in zip(counts, hits, strict=True)]))


class FixedLogits(nn.Module):
    """Logits read from a table by (sample, view) encoded in the first pixels of each clip."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = table

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids = (x[:, :2, 0, 0, 0] * 255).round().long()
        return self.table[ids[:, 0], ids[:, 1]]


def _loader(samples: list[int], labels: torch.Tensor, batch: int = 3):
    out = []
    for s in range(0, len(samples), batch):
        ids = samples[s:s + batch]
        video = torch.zeros(len(ids), V, 3, T, S, S, dtype=torch.uint8)
        for i, sample in enumerate(ids):
            video[i, :, 0, 0, 0, 0] = sample
            video[i, :, 1, 0, 0, 0] = torch.arange(V, dtype=torch.uint8)
        out.append((video, labels[ids]))
    return out


def _case(n: int = 11, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    table = 2 * torch.randn(n, V, K, generator=g)
    labels = torch.randint(0, K - 1, (n,), generator=g)  # class K-1 never a label: it may still be predicted
    table[0, :, K - 1] += 20  # ... and is predicted for sample 0: mmaction2 counts that class as 0
    return table, labels


@pytest.mark.parametrize("average_clips", ["prob", "score"])
def test_average_clips_and_accuracies_match_mmaction2(average_clips):
    table, labels = _case()
    result = evaluate(FixedLogits(table), _loader(list(range(11)), labels), mean_std=((0, 0, 0), (1, 1, 1)),
                      average_clips=average_clips, num_crops=2)
    if average_clips == "prob":  # mmaction2's BaseHead.average_clip
        scores = table.softmax(-1).mean(1)
        logp = scores.log()
    else:
        scores = table.mean(1)
        logp = scores.log_softmax(-1)
    ref_top = [(scores.topk(k, 1).indices == labels[:, None]).any(1).float().mean().item() * 100 for k in (1, 5)]
    assert (result.top1, result.top5) == pytest.approx(ref_top)
    mca = mmaction2_mean_class_accuracy(scores.numpy(), labels.numpy())
    assert result.mean_class_accuracy == pytest.approx(100 * mca)
    per_class_recall = np.mean([(scores.argmax(1)[labels == c] == c).float().mean().item()
                                for c in labels.unique().tolist()])
    assert mca < per_class_recall  # the class only ever predicted lowers mmaction2's figure
    assert result.loss == pytest.approx(-logp.gather(1, labels[:, None]).mean().item(), rel=1e-6)
    assert result.views == "2×2×2" and result.average_clips == average_clips
    assert "views 2×2×2 frames×clips×crops" in result.summary() and f"average_clips={average_clips}" in result.summary()
    assert result.to_dict()["views"] == "2×2×2"


def test_prob_and_score_differ_and_options_are_checked():
    table, labels = _case(seed=3)
    loader = _loader(list(range(11)), labels)
    prob, score = (evaluate(FixedLogits(table), loader, mean_std=((0, 0, 0), (1, 1, 1)), average_clips=a)
                   for a in ("prob", "score"))
    assert prob.loss != pytest.approx(score.loss)
    assert prob.views == "2×4 views"  # crops not given: only frames×views can be written
    with pytest.raises(ValueError, match=r"average_clips must be one of \['prob', 'score'\]"):
        evaluate(FixedLogits(table), loader, average_clips="mean")
    with pytest.raises(ValueError, match="labels must be in"):
        evaluate(FixedLogits(table), [(loader[0][0], torch.tensor([0, 1, K]))], mean_std=((0, 0, 0), (1, 1, 1)))


def test_mean_class_accuracy_from_counts():
    hits, counts, predicted = torch.tensor([2.0, 0, 1, 0]), torch.tensor([4.0, 2, 1, 0]), torch.tensor([3.0, 0, 2, 1])
    assert mean_class_accuracy(hits, counts, predicted) == pytest.approx((0.5 + 0 + 1 + 0) / 4)
    assert mean_class_accuracy(hits[:0], counts[:0], predicted[:0]) == 0.0
    empty = EvalResult(top1=0, top5=0, loss=0, num_samples=0, num_views=0)
    assert empty.views == "?×0 views"


SCRIPT = textwrap.dedent('''
    import json, sys
    import torch, torch.distributed as dist
    sys.path.insert(0, sys.argv[2])
    from test_eval_mmaction import FixedLogits, _case, _loader
    from inti_adapters.train import evaluate

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    table, labels = _case(seed=5)
    samples = list(range(9)) if rank == 0 else [9, 10]  # uneven shards; rank 1 sees 4 of the 6 classes at most
    for lockstep in (False, True):
        ev = evaluate(FixedLogits(table), _loader(samples, labels, batch=2), mean_std=((0, 0, 0), (1, 1, 1)),
                      num_crops=2, lockstep=lockstep)
        if rank == 0:
            with open(sys.argv[1] + f"_{lockstep}.json", "w") as f:
                json.dump(ev.to_dict(), f)
    dist.destroy_process_group()
''')


def test_counts_are_summed_over_ranks(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "ranks.py"
    script.write_text(SCRIPT)
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, str(script), str(tmp_path / "out"),
                                       os.path.dirname(__file__)], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    table, labels = _case(seed=5)
    alone = evaluate(FixedLogits(table), _loader(list(range(11)), labels), mean_std=((0, 0, 0), (1, 1, 1)),
                     num_crops=2).to_dict()
    for lockstep in (False, True):
        together = json.loads((tmp_path / f"out_{lockstep}.json").read_text())
        assert together == pytest.approx(alone)
