"""Two ranks on CPU: ``torchrun --nproc_per_node 2`` + DeepSpeed ZeRO-2 over gloo."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from collections import Counter

import pytest

pytest.importorskip("deepspeed")

SCRIPT = textwrap.dedent('''
    import json, sys
    import torch
    import torch.distributed as dist
    from inti_adapters.train import SyntheticVideoLoader, Trainer, evaluate, load_config

    out = sys.argv[1]
    SEEN = {"train": [], "eval": []}

    class Recording(SyntheticVideoLoader):
        def clip(self, sample, view=0):
            SEEN["train" if self.train else "eval"].append((self.epoch, sample, view))
            return super().clip(sample, view)

    def factory(train, rank, world_size, epoch):
        return Recording(num_samples=32 if train else 9, num_classes=4, num_frames=4, size=32, batch_size=2,
                         train=train, rank=rank, world_size=world_size, num_views=2, epoch=epoch)

    kw = '{"img_size": 32, "patch_size": 8, "embed_dim": 32, "num_heads": 2, "depth": 4}'
    cfg = load_config(None, [
        "model.name=vit_base_patch16_clip_224", "model.model_kwargs=" + kw, "model.layers=[1, 2]",
        "model.num_classes=4", "train.output_dir=" + out, "train.epochs=3", "train.zero_stage=2",
        "train.global_batch_size=8", "train.progress=false", "train.tensorboard=false", "train.log_every=1",
        "train.eval_every_epochs=0", "train.save_every=0", "optim.lr=3e-3", "optim.warmup_steps=1"])
    trainer = Trainer(cfg, loader_factory=factory)
    result = trainer.fit()
    rank = dist.get_rank()
    ev = evaluate(trainer.engine, factory(False, rank, dist.get_world_size(), 0), mean_std=trainer.mean_std,
                  lockstep=True)
    checksum = sum(float(p.double().sum()) for p in trainer.engine.module.parameters())
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump({"seen": SEEN, "history": result.history, "eval": vars(ev), "checksum": checksum,
                   "world": dist.get_world_size(), "grad_accum": trainer.grad_accum,
                   "zero_stage": trainer.engine.zero_optimization_stage(),
                   "optimizer": type(trainer.engine.optimizer).__name__}, f)
    dist.destroy_process_group()  # no gloo thread teardown abort at exit after the work is done
''')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_torchrun_two_ranks_zero2(tmp_path):
    script = tmp_path / "train2.py"
    script.write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    env.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/inti_adapters/torch_extensions"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(script), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(r["world"] == 2 and r["zero_stage"] == 2 for r in ranks)
    assert ranks[0]["optimizer"] == "DeepSpeedZeroOptimizer"
    assert ranks[0]["grad_accum"] == 2  # global batch 8 = 2 clips x 2 ranks x 2 micro-batches
    # the ranks read disjoint data that together cover each epoch
    for epoch in range(3):
        seen = [{s for e, s, _ in r["seen"]["train"] if e == epoch} for r in ranks]
        assert not seen[0] & seen[1]
        assert seen[0] | seen[1] == set(range(32))
    # one loss curve (averaged over ranks), and it goes down
    assert ranks[0]["history"] == ranks[1]["history"]
    losses = [loss for _, loss in ranks[0]["history"]]
    assert len(losses) == 12 and sum(losses[-3:]) < sum(losses[:3])
    # identical weights on both ranks after ZeRO-2 steps
    assert ranks[0]["checksum"] == pytest.approx(ranks[1]["checksum"], rel=1e-12)
    # evaluation: 9 videos over 2 ranks (uneven: 3 and 2 batches), every view exactly once
    views = Counter(tuple(v[1:]) for r in ranks for v in r["seen"]["eval"])
    assert views == Counter({(s, v): 1 for s in range(9) for v in range(2)})
    assert all(r["eval"]["num_samples"] == 9 and r["eval"]["num_views"] == 18 for r in ranks)
    assert (tmp_path / "final" / "adapter_model.safetensors").is_file()


def test_unused_cpu_comm_op_is_not_compiled(monkeypatch):
    """On a CPU, DeepSpeed's shared-memory op (1-2.5 min of JIT compile on a cold cache) is marked unavailable,
    unless INTI_DS_SHM_COMM=1 asks for DeepSpeed's own behaviour."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    from inti_adapters.train.distributed import skip_unused_cpu_comm_op

    if get_accelerator().device_name() != "cpu":
        pytest.skip("DeepSpeed's accelerator is not the CPU here")
    monkeypatch.setitem(deepspeed.ops.__compatible_ops__, "deepspeed_shm_comm", True)
    monkeypatch.setenv("INTI_DS_SHM_COMM", "1")
    assert skip_unused_cpu_comm_op() is False and deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] is True
    monkeypatch.delenv("INTI_DS_SHM_COMM")
    assert skip_unused_cpu_comm_op() is True and deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] is False


def test_dist_timeout_reaches_deepspeeds_data_parallel_group(tmp_path):
    """train.dist_timeout_s applies to the world group and to the group ZeRO reduces gradients over (DeepSpeed's
    clone of the world group, which torch would otherwise create with its 30-minute default)."""
    code = textwrap.dedent('''
        import torch, torch.distributed as dist
        from deepspeed.utils import groups
        from inti_adapters.train.distributed import setup_distributed
        setup_distributed("gloo", timeout_s=7)
        for pg in (dist.group.WORLD, groups._get_data_parallel_group()):
            print("timeout", pg._get_backend(torch.device("cpu")).options._timeout.total_seconds())
        dist.destroy_process_group()
    ''')
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [line for line in proc.stdout.splitlines() if line.startswith("timeout")] == ["timeout 7.0"] * 2
