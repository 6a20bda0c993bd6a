"""Two hosts as network namespaces, each running ``torchrun`` (c10d rendezvous or the static form),
training on frame shards that nginx serves from a third namespace (issue 25).

Checked: every sample exactly once per epoch across the ranks (sample log) and the same step losses
as one host with 2 processes; ``kill -9`` of one host and a cut link end the other host's run
within ``train.dist_timeout_s`` plus a margin with the lost-peer error, and relaunching resumes
exactly (keys and losses of an uninterrupted run); an unreachable rendezvous fails in bounded time.
Skipped, with the reason, where namespaces or nginx cannot be had (``make cluster-deps``).
"""

from __future__ import annotations

import itertools
import re
import subprocess
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
from _cluster import (
    DIST_TIMEOUT_S,
    EPOCHS,
    PEER_LOST,
    SAMPLES,
    SHARDS,
    STEPS_PER_EPOCH,
    digits_root,
    explain,
    final_keys,
    last_step,
    launcher,
    step_losses,
    train_env,
    wait_exit,
    write_recipe,
)
from _netns import Host, Network, Nginx, netns_unavailable, nginx_unavailable, wait_for

pytest.importorskip("deepspeed")
pytestmark = pytest.mark.slow

RUN_TIMEOUT = 240  # seconds a whole launch may take on a loaded 2-core machine
EXIT_MARGIN = 30  # seconds beyond dist_timeout_s for the survivor's ranks and launcher to exit
_ports = itertools.count(29500)


@dataclass
class Cluster:
    net: Network
    a: Host
    b: Host
    nginx: Nginx
    base: Path

    def recipe(self, name: str, slow: bool = False, num_workers: int = 1) -> Path:
        url = f"{self.nginx.url}/{'slow/' if slow else ''}{SHARDS}"
        return write_recipe(self.base / f"{name}.yaml", url, num_workers=num_workers)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = netns_unavailable() or nginx_unavailable()
    if reason:
        pytest.skip(reason)
    base = tmp_path_factory.mktemp("multinode")
    root = digits_root(tmp_path_factory.getbasetemp())
    net = Network()
    try:
        a, b, s = net.add_host("a"), net.add_host("b"), net.add_host("s")
        server = Nginx(s, root, base / "nginx")
        try:
            yield Cluster(net, a, b, server, base)
        finally:
            server.stop()
    finally:
        net.close()


def start_node(c: Cluster, host: Host, how: list[str], recipe: Path, out: Path, tag: str) -> subprocess.Popen:
    """``torchrun`` with 1 process on ``host``, its output in ``base/TAG_HOST.log``."""
    cmd = [*launcher(), "--nproc-per-node=1", *how, "-m", "inti_adapters.train", "--config", recipe,
           f"train.output_dir={out}"]
    with open(c.base / f"{tag}_{host.name}.log", "w") as log:
        return host.popen(cmd, env=train_env(), stdout=log, stderr=subprocess.STDOUT)


def start_nodes(c: Cluster, recipe: Path, out: Path, tag: str, form: str = "c10d") -> list[subprocess.Popen]:
    """One ``torchrun`` per host: ``form`` 'c10d' (rendezvous on node-a) or 'static' (node ranks, master)."""
    port = next(_ports)
    procs = []
    for rank, host in enumerate((c.a, c.b)):
        if form == "c10d":
            how = ["--rdzv-backend=c10d", f"--rdzv-endpoint={c.a.hostname}:{port}", f"--rdzv-id={tag}"]
        else:
            how = [f"--node-rank={rank}", f"--master-addr={c.a.hostname}", f"--master-port={port}"]
        procs.append(start_node(c, host, ["--nnodes=2", *how], recipe, out, tag))
    return procs


def log_of(c: Cluster, tag: str, host: Host) -> str:
    return (c.base / f"{tag}_{host.name}.log").read_text(errors="replace")


def tails(c: Cluster, tag: str) -> str:
    return "\n".join(f"--- {tag} on {h.name}:\n{explain(log_of(c, tag, h))}" for h in (c.a, c.b))


def finish(c: Cluster, procs, tag: str) -> None:
    try:
        wait_exit(procs, RUN_TIMEOUT)
    finally:
        for host in (c.a, c.b):
            host.kill_all()
    codes = [p.returncode for p in procs]
    assert codes == [0, 0], f"exit statuses {codes}\n{tails(c, tag)}"


@pytest.fixture(scope="module")
def reference(cluster):
    """One host, 2 processes, the same global batch: the run the two-host runs must equal."""
    out = cluster.base / "one_host"
    cmd = [*launcher(), "--standalone", "--nproc-per-node=2", "-m", "inti_adapters.train", "--config",
           cluster.recipe("one_host"), f"train.output_dir={out}"]
    proc = cluster.a.run(cmd, env=train_env(), timeout=RUN_TIMEOUT)
    cluster.a.kill_all()
    assert proc.returncode == 0, explain(proc.stdout + proc.stderr)
    return out


def assert_each_sample_once_per_epoch(keys: dict[tuple[int, int, int], list[str]], ranks: int) -> None:
    assert {r for r, _, _ in keys} == set(range(ranks))
    for epoch in range(EPOCHS):
        seen = Counter(k for (_, e, _), ks in keys.items() if e == epoch for k in ks)
        assert len(seen) == SAMPLES and set(seen.values()) == {1}, f"epoch {epoch}: {seen}"


def assert_same_run(out: Path, ref: Path) -> None:
    """Keys of every (rank, epoch, step) and every step loss equal the reference's."""
    keys, ref_keys = final_keys(out), final_keys(ref)
    assert keys == ref_keys
    losses, ref_losses = step_losses(out), step_losses(ref)
    assert sorted(losses) == list(range(1, EPOCHS * STEPS_PER_EPOCH + 1))
    assert losses == pytest.approx(ref_losses, abs=1e-5)


def test_one_host_reference_reads_each_sample_once(reference):
    assert_each_sample_once_per_epoch(final_keys(reference), ranks=2)
    assert (reference / "final" / "adapter_model.safetensors").is_file()


def test_two_hosts_train_like_one_host(cluster, reference):
    """c10d rendezvous on node-a's hostname, shards over HTTP: the same samples and losses as one host."""
    out = cluster.base / "two_hosts"
    finish(cluster, start_nodes(cluster, cluster.recipe("two_hosts"), out, "two_hosts"), "two_hosts")
    assert_each_sample_once_per_epoch(final_keys(out), ranks=2)
    assert_same_run(out, reference)
    assert (out / "final" / "adapter_model.safetensors").is_file()
    # metrics and the export come from global rank 0 only
    assert "adapter saved to" in log_of(cluster, "two_hosts", cluster.a)
    assert "adapter saved to" not in log_of(cluster, "two_hosts", cluster.b)


def interrupt(c: Cluster, procs, tag: str, out: Path, at_step: int, how: str) -> None:
    """At ``at_step``, kill -9 node-b or cut its link; node-a must exit in time with the lost-peer error."""
    try:
        wait_for(lambda: last_step(out) >= at_step or any(p.poll() is not None for p in procs), RUN_TIMEOUT,
                 f"step {at_step} in {out}/samples")
        assert all(p.poll() is None for p in procs), f"a node exited before step {at_step}\n{tails(c, tag)}"
        if how == "kill":
            c.b.kill_all()
        else:
            c.b.cut()
        start = time.monotonic()
        try:
            procs[0].wait(timeout=DIST_TIMEOUT_S + EXIT_MARGIN)
        except subprocess.TimeoutExpired:
            pytest.fail(f"node-a still running {DIST_TIMEOUT_S + EXIT_MARGIN} s after node-b was lost ({how})\n"
                        f"{tails(c, tag)}")
        took = time.monotonic() - start
    finally:
        for host in (c.a, c.b):
            host.kill_all()
        wait_exit(procs, 30)
        c.b.reconnect()
    text = log_of(c, tag, c.a)
    assert procs[0].returncode != 0
    assert any(p in text for p in PEER_LOST), f"no lost-peer error from node-a ({how}, {took:.1f} s)\n{explain(text)}"


def test_lost_host_and_cut_link_then_exact_resume(cluster, reference):
    """kill -9 of node-b mid-epoch 0, relaunch (static form); node-b's link cut mid-epoch 1, relaunch (c10d):
    the finished run has the reference's keys and losses."""
    out = cluster.base / "interrupted"
    slow = cluster.recipe("interrupted_slow", slow=True)  # nginx paces the shards: a step takes ~1 s
    interrupt(cluster, start_nodes(cluster, slow, out, "run1"), "run1", out, at_step=3, how="kill")
    steps = last_step(out)
    assert 3 <= steps < STEPS_PER_EPOCH
    interrupt(cluster, start_nodes(cluster, slow, out, "run2", form="static"), "run2", out,
              at_step=STEPS_PER_EPOCH + 2, how="cut")
    assert "resum" in log_of(cluster, "run2", cluster.a).lower()
    assert last_step(out) < EPOCHS * STEPS_PER_EPOCH
    finish(cluster, start_nodes(cluster, slow, out, "run3"), "run3")  # the same recipe: resume refuses a new URL
    assert_same_run(out, reference)


def test_elastic_torchrun_goes_on_with_the_surviving_host(cluster):
    """``--nnodes=1:2 --max-restarts=1``: node-b killed mid-epoch 0, node-a restarts alone from the last checkpoint
    (written by 2 ranks) and trains the rest of the epoch, each remaining sample once, then epoch 1 whole."""
    out = cluster.base / "elastic"
    recipe = cluster.recipe("elastic", slow=True)
    port = next(_ports)
    how = ["--nnodes=1:2", "--max-restarts=1", "--rdzv-backend=c10d", f"--rdzv-endpoint={cluster.a.hostname}:{port}",
           "--rdzv-id=elastic", "--rdzv-conf=last_call_timeout=5"]
    # node-b first: it waits for node-a's store, so both join the first round together
    procs = [start_node(cluster, cluster.b, how, recipe, out, "elastic")]
    procs.insert(0, start_node(cluster, cluster.a, how, recipe, out, "elastic"))
    try:
        wait_for(lambda: last_step(out) >= 3 or any(p.poll() is not None for p in procs), RUN_TIMEOUT, "step 3")
        assert all(p.poll() is None for p in procs), tails(cluster, "elastic")
        cluster.b.kill_all()
        procs[0].wait(timeout=RUN_TIMEOUT)
    finally:
        for host in (cluster.a, cluster.b):
            host.kill_all()
        wait_exit(procs, 30)
    text = log_of(cluster, "elastic", cluster.a)
    assert procs[0].returncode == 0, tails(cluster, "elastic")
    resumed = re.findall(r"resumed from \S+: step (\d+)", text)
    assert len(resumed) == 1, explain(text)
    ckpt = int(resumed[0])
    assert 2 <= ckpt < STEPS_PER_EPOCH
    keys = final_keys(out)
    # epoch 0: both ranks' steps up to the checkpoint, then node-a alone (8 clips a step: the same global batch)
    after = {s: ks for (r, e, s), ks in keys.items() if r == 0 and e == 0 and s > ckpt}
    assert sorted(after) == list(range(ckpt + 1, STEPS_PER_EPOCH + 1)) and {len(k) for k in after.values()} == {8}
    epoch0 = [k for (r, e, s), ks in keys.items() if e == 0 and (s <= ckpt or r == 0) for k in ks]
    assert len(epoch0) == SAMPLES and len(set(epoch0)) == SAMPLES
    epoch1 = [k for (r, e, s), ks in keys.items() if e == 1 for k in ks]
    assert {r for r, e, _ in keys if e == 1} == {0} and sorted(epoch1) == sorted(set(epoch0))
    assert max(step_losses(out)) == EPOCHS * STEPS_PER_EPOCH  # the schedule's step count, whatever the world size
    assert (out / "final" / "adapter_model.safetensors").is_file()


def test_unreachable_rendezvous_fails_in_bounded_time(cluster):
    """Nothing listens at the endpoint: torchrun's own RendezvousConnectionError names it within read_timeout."""
    port = next(_ports)
    cmd = [*launcher(), "--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d",
           f"--rdzv-endpoint={cluster.b.hostname}:{port}", "--rdzv-conf=read_timeout=5", "-m", "inti_adapters.train",
           "--config", cluster.recipe("unreachable"), f"train.output_dir={cluster.base / 'unreachable'}"]
    start = time.monotonic()
    proc = cluster.a.run(cmd, env=train_env(), timeout=120)
    took = time.monotonic() - start
    cluster.a.kill_all()
    assert proc.returncode != 0
    assert "RendezvousConnectionError" in proc.stderr and f"{cluster.b.hostname}, {port}" in proc.stderr, \
        explain(proc.stderr)
    assert took < 60
