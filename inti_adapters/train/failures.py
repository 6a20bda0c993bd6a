"""How a training run stops when something outside the model goes wrong: a lost peer, a non-finite
loss, a full disk. Each is an exception whose message is one line saying what happened, where
(step, collective, file) and what to do."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import torch.distributed as dist


class PeerLostError(RuntimeError):
    """Another rank stopped answering: a collective failed or timed out (``train.dist_timeout_s``)."""


class NonFiniteLossError(RuntimeError):
    """The loss or the gradient norm became NaN / infinite (more often than ``train.max_nonfinite_steps``)."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, read-only, ...); the previous one stays the latest."""


# words of the errors gloo / NCCL / the TCP store raise when a peer dies or a link is cut
_COMM_WORDS = ("gloo", "nccl", "connection reset", "connection closed", "connection refused", "broken pipe",
               "timed out", "timeout", "socket", "peer", "store", "unreachable", "ecconnreset", "transport")


def is_comm_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective's failure (a lost peer or a timeout) rather than a local error."""
    if isinstance(exc, PeerLostError):
        return True
    kinds = tuple(k for k in (getattr(dist, "DistError", None), getattr(dist, "DistBackendError", None),
                              getattr(dist, "DistNetworkError", None), getattr(dist, "DistStoreError", None))
                  if k is not None)
    if kinds and isinstance(exc, kinds):
        return True
    if isinstance(exc, (RuntimeError, ConnectionError, TimeoutError)):
        text = str(exc).lower()
        return any(w in text for w in _COMM_WORDS)
    return False


def peer_lost(exc: BaseException, *, what: str, step: int, timeout_s: float, rank: int, world: int) -> PeerLostError:
    """The one-line error for a collective that failed during ``what`` at optimizer step ``step``."""
    first = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
    return PeerLostError(
        f"rank {rank} of {world}: a peer was lost during {what} at step {step} (train.dist_timeout_s="
        f"{timeout_s:g} s): {first[:300]}. No checkpoint was written for this step; the last complete one "
        f"stays the latest: relaunch every node with the same command to resume (train.resume=auto)")


def checkpoint_write_error(exc: OSError, where: str | os.PathLike) -> CheckpointWriteError | OSError:
    """A clear error for a failed checkpoint write; ENOSPC says 'no space left on DEVICE while writing FILE'."""
    filename = getattr(exc, "filename", None) or where
    text = str(exc).lower()
    if exc.errno == errno.ENOSPC or "no space left" in text:
        device = _device_of(Path(filename))
        return CheckpointWriteError(
            errno.ENOSPC, f"no space left on {device} while writing {filename}: the checkpoint was not completed, "
                          f"the previous complete checkpoint stays the latest; free space (or lower train.keep_last) "
                          f"and relaunch to resume")
    return exc


def _device_of(path: Path) -> str:
    """The mount point (and its device name when known) holding ``path``."""
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    probe = probe.resolve()
    mount = probe
    while not os.path.ismount(mount) and mount != mount.parent:
        mount = mount.parent
    try:
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) > 1 and parts[1] == str(mount):
                    return f"{parts[0]} (mounted on {mount})"
    except OSError:
        pass
    return f"the file system mounted on {mount}"
