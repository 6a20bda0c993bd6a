"""Sample keys in batches, labels checked against num_classes, and ``exclude_keys``: resuming an epoch on
another world size / worker count reads every sample not yet trained exactly once, evenly spread."""

from __future__ import annotations

import io
import itertools
import logging
import tarfile
from collections import Counter

import pytest
from test_data_pipeline import _cfg, make_shards

from inti_adapters.data import build_dataloader
from inti_adapters.data.stages import plan_batches

N = 30  # samples: 5 shards of 6; label i <-> key k{i:05d}


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[str]:
    return make_shards(tmp_path_factory.mktemp("keyed"), [6] * 5)


def _key(label: int) -> str:
    return f"k{label:05d}"


@pytest.mark.parametrize("train", [True, False])
def test_keys_name_the_samples_of_the_batch(shards, train):
    loader = build_dataloader(_cfg(shards, batch_size=4), train=train, with_keys=True)
    batches = list(loader)
    assert batches and all(len(b) == 3 for b in batches)
    for video, labels, keys in batches:
        assert keys == [_key(int(y)) for y in labels] and len(keys) == video.shape[0]
    if not train:  # evaluation: every sample once, in order
        assert [k for _, _, ks in batches for k in ks] == [_key(i) for i in range(N)]
    plain = next(iter(build_dataloader(_cfg(shards, batch_size=4), train=train)))
    assert len(plain) == 2 and all(v.equal(w) for v, w in zip(plain, batches[0][:2], strict=True))


@pytest.mark.parametrize(("train", "workers"), [(True, 0), (False, 0), (True, 1)])
def test_labels_outside_the_class_range_are_refused_naming_shard_and_key(shards, train, workers):
    loader = build_dataloader(_cfg(shards, batch_size=4, num_workers=workers, shuffle_buffer=0, shard_shuffle=False),
                              train=train, num_classes=3)
    with pytest.raises(ValueError, match=r"sample 'k00003' of .*part-000000\.tar: label 3 is outside \[0, 3\)"):
        list(loader)
    assert len(list(build_dataloader(_cfg(shards), train=train, num_classes=N))) > 0  # all in range: fine


def _trained_keys(shards, world: int, batches: int) -> set[str]:
    """What ``world`` ranks (2 workers each) trained in the first ``batches`` batches of epoch 1."""
    keys = set()
    for rank in range(world):
        loader = build_dataloader(_cfg(shards, num_workers=2), train=True, rank=rank, world_size=world, epoch=1,
                                  with_keys=True)
        for w in range(2):
            for _, _, ks in itertools.islice(loader.iter_worker(w), batches // 2):
                keys.update(ks)
    return keys


@pytest.mark.parametrize(("world", "workers"), [(1, 1), (1, 2), (2, 1), (2, 2), (3, 1), (3, 2)])
def test_exclude_keys_reads_the_rest_exactly_once_on_any_world_size(shards, world, workers):
    done = _trained_keys(shards, world=2, batches=2)  # 2 ranks x 2 batches of 4
    assert len(done) == 16
    per_slot, per_rank = [], []
    for rank in range(world):
        loader = build_dataloader(_cfg(shards, num_workers=workers), train=True, rank=rank, world_size=world,
                                  with_keys=True)
        loader.set_epoch(1)
        loader.exclude_keys(done)
        batches = 0
        for w in range(workers):
            got = [b for b in loader.iter_worker(w)]
            assert all(0 < len(ks) <= 4 and [_key(int(y)) for y in labels] == ks for _, labels, ks in got)
            per_slot.append([k for _, _, ks in got for k in ks])
            batches += len(got)
        per_rank.append((batches, len(loader)))
    seen = Counter(k for keys in per_slot for k in keys)
    assert set(seen) == {_key(i) for i in range(N)} - done and set(seen.values()) == {1}  # the complement, once
    assert max(map(len, per_slot)) - min(map(len, per_slot)) <= 1  # evenly spread over the reader slots
    assert len({b for b, _ in per_rank}) == 1 and all(b == n for b, n in per_rank)  # same batch count everywhere


def test_exclude_keys_with_real_workers_and_then_a_normal_epoch(shards):
    done = _trained_keys(shards, world=1, batches=2)
    loader = build_dataloader(_cfg(shards, num_workers=2), train=True, with_keys=True)
    loader.set_epoch(1)
    loader.exclude_keys(done)
    got = [ks for _, _, ks in loader]
    assert len(got) == len(loader) and sorted(k for ks in got for k in ks) == sorted(
        {_key(i) for i in range(N)} - done)
    loader.set_epoch(2)  # the exclusion ends with its epoch
    assert len(loader) == N // 4 // 2 * 2 and len(list(loader)) == len(loader)


def test_exclude_keys_refusals(shards):
    loader = build_dataloader(_cfg(shards), train=True, with_keys=True)
    loader.exclude_keys({"nope", _key(0)})  # a key that is not in the shards: the pass fails at its end
    with pytest.raises(RuntimeError, match="the shards hold 30 samples of which 1 have one of the 2 excluded keys"):
        list(loader)
    with pytest.raises(ValueError, match="skip_batches cannot follow exclude_keys"):
        loader.skip_batches(1)
    with pytest.raises(ValueError, match="training loaders"):
        build_dataloader(_cfg(shards), train=False).exclude_keys([])
    with pytest.raises(ValueError, match="one pass over the shards: the shards hold 30 samples .* the epoch is 20"):
        build_dataloader(_cfg(shards, train_samples=20), train=True).exclude_keys([])
    with pytest.raises(ValueError, match="too few for 3 ranks"):
        build_dataloader(_cfg(shards), train=True, world_size=3).exclude_keys({_key(i) for i in range(29)})


@pytest.mark.parametrize(("remaining", "world", "workers", "batch"), [(13, 2, 2, 4), (9, 3, 1, 4), (40, 2, 3, 5),
                                                                       (5, 1, 2, 4), (0, 2, 2, 4)])
def test_batch_plans_cover_every_sample_with_equal_batch_counts(remaining, world, workers, batch):
    plans = plan_batches(remaining, world, workers, batch)
    slots = world * workers
    for r, rank in enumerate(plans):
        assert [sum(p) for p in rank] == [len(range(r * workers + w, remaining, slots)) for w in range(workers)]
        assert all(0 < b <= batch for p in rank for b in p)
    assert len({sum(len(p) for p in rank) for rank in plans}) == 1


def test_exclude_keys_with_a_truncated_shard_keeps_the_batch_counts(tmp_path, caplog):
    shards = make_shards(tmp_path / "s", [6] * 5)
    with tarfile.open(shards[2]) as tar:  # drop the shard's last sample (k00017): cut at a sample boundary
        kept = [(m, tar.extractfile(m).read()) for m in tar.getmembers() if not m.name.startswith("k00017")]
    with tarfile.open(shards[2], "w", format=tarfile.PAX_FORMAT) as tar:
        for m, data in kept:
            tar.addfile(m, io.BytesIO(data))
    done = {_key(i) for i in range(0, 30, 3)}  # 10 trained
    got, counts = [], []
    for rank in range(2):
        loader = build_dataloader(_cfg(shards, num_workers=2), train=True, rank=rank, world_size=2, with_keys=True)
        loader.set_epoch(0)
        loader.exclude_keys(done)
        with caplog.at_level(logging.WARNING, logger="inti_adapters.data"):
            batches = [ks for w in range(2) for _, _, ks in loader.iter_worker(w)]
        got += [k for ks in batches for k in ks]
        counts.append((len(batches), len(loader)))
    assert sorted(got) == sorted({_key(i) for i in range(30)} - done - {_key(17)})  # each once, but the lost one
    assert counts[0] == counts[1] and counts[0][0] == counts[0][1]
    assert "1 samples of damaged or unreadable shards are missing" in caplog.text
