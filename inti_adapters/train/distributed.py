"""Process-group setup that works under ``deepspeed``, ``torchrun`` and as a lone process."""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

TORCH_EXTENSIONS_DIR = os.path.join("~", ".cache", "inti_adapters", "torch_extensions")
_MPI_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MV2_COMM_WORLD_SIZE")


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def set_env_defaults() -> None:
    """Fill in what a launcher would set, for a single process started without one.

    Also points ``TORCH_EXTENSIONS_DIR`` at a persistent cache, so that a DeepSpeed op that is
    compiled on first use (JIT) is compiled once and reused by later runs. The cache is kept per host
    (``.../torch_extensions/HOSTNAME``): nodes sharing a home directory never build into the same folder
    (torch's build lock is a file that a node killed mid-build leaves behind, and hosts may differ in
    CPU or compiler). Set ``TORCH_EXTENSIONS_DIR`` to choose another place.
    """
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(os.path.expanduser(TORCH_EXTENSIONS_DIR),
                                                               socket.gethostname() or "host"))
    if any(k in os.environ for k in _MPI_VARS):
        return  # an MPI launch: deepspeed.init_distributed discovers ranks and the master itself
    if "RANK" not in os.environ and "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    os.environ.setdefault("LOCAL_RANK", "0")


def skip_unused_cpu_comm_op() -> bool:
    """Keep DeepSpeed from compiling its shared-memory CPU communication op, which training never uses.

    On a CPU accelerator, DeepSpeed's communication backend (created by ``deepspeed.init_distributed``
    and again by ``deepspeed.initialize``) JIT-compiles the C++ op ``deepspeed_shm_comm`` whenever
    DeepSpeed reports it compatible: 1-2.5 minutes of a 2-core machine on a cold
    ``TORCH_EXTENSIONS_DIR``, every time that cache is empty. The op serves only
    ``inference_all_reduce`` (DeepSpeed's tensor-parallel inference, ``module_inject``), which does
    nothing at world size 1; training collectives (ZeRO's reduce-scatter / all-gather, our metric
    reductions) go through ``torch.distributed`` on gloo either way. So the op is marked unavailable
    in DeepSpeed's table of compatible ops (a dict DeepSpeed documents as persisting edits) before
    the backend is created. ``INTI_DS_SHM_COMM=1`` keeps DeepSpeed's own behaviour.

    Returns True when the op was marked unavailable.
    """
    if os.environ.get("INTI_DS_SHM_COMM", "0") == "1":
        return False
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != "cpu":
        return False
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return True


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def setup_distributed(backend: str | None = None, *, use_deepspeed: bool = True,
                      timeout_s: float | None = None) -> DistInfo:
    """Initialise ``torch.distributed`` once (reused if already initialised) and pick the device.

    Args:
        backend: ``nccl`` / ``gloo`` / ...; None picks nccl with CUDA, gloo without.
        use_deepspeed: Initialise through ``deepspeed.init_distributed`` (also discovers MPI
            launches); otherwise plain ``torch.distributed.init_process_group``.
        timeout_s: How long a collective or the rendezvous waits for the other ranks (None = torch's
            default, 30 min). It also applies to the data-parallel group DeepSpeed's ZeRO reduces over:
            that group (DeepSpeed's copy of the world group, otherwise created with torch's default) is
            created here with the same timeout.
    """
    set_env_defaults()
    backend = backend or default_backend()
    timeout = timedelta(seconds=timeout_s) if timeout_s is not None else None
    if use_deepspeed:  # before DeepSpeed creates its backend (here, or in deepspeed.initialize)
        skip_unused_cpu_comm_op()
    if not dist.is_initialized():
        if use_deepspeed:
            import deepspeed

            kwargs = {"timeout": timeout} if timeout is not None else {}
            deepspeed.init_distributed(dist_backend=backend, **kwargs)
        else:
            dist.init_process_group(backend=backend, timeout=timeout)
    if use_deepspeed and timeout is not None:
        _deepspeed_world_group(timeout)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)


def _deepspeed_world_group(timeout: timedelta) -> None:
    """Create DeepSpeed's clone of the world group (its data-parallel group without a model-parallel unit,
    used by ZeRO's gradient reduction) with ``timeout``; ``dist.new_group`` would otherwise give it torch's
    30-minute default, and a cut link would block a ZeRO reduce that long."""
    from deepspeed.utils import groups

    if getattr(groups, "_WORLD_GROUP", "missing") is None:
        groups._WORLD_GROUP = dist.new_group(ranks=list(range(dist.get_world_size())), timeout=timeout)


def _distributed() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def _comm_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(values: list[float]) -> list[float]:
    """Sum a few numbers over all ranks (float64)."""
    if not _distributed():
        return [float(v) for v in values]
    t = torch.tensor(values, dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return t.tolist()


def all_reduce_max(values: list[int]) -> list[int]:
    """Element-wise maximum of a few integers over all ranks."""
    if not _distributed():
        return [int(v) for v in values]
    t = torch.tensor(values, dtype=torch.int64, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [int(v) for v in t.tolist()]


def barrier() -> None:
    if _distributed():
        dist.barrier()
