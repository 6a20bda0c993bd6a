"""Worker pools that are safe to start from any process, including one that already ran torch.

``fork`` copies the parent with only the calling thread. A parent that has run torch on several
threads (one forward + backward is enough) keeps an OpenMP thread pool; a forked child that
then runs a parallel torch op (a resize, an interpolation) waits forever on a futex for pool
threads that do not exist in it. This is what made ``ensure_builtin_dataset`` hang in a
notebook after a training step.

The fix is the one torch's DataLoader uses for its workers: every pool worker makes torch
single-threaded (:func:`single_threaded`) before it runs anything, so no parallel region ever
looks for the parent's pool. Forking keeps pools fast to start (``spawn`` re-imports torch in
every worker, 10-30 s here) and works in scripts without an ``if __name__ == "__main__"``
guard. Where ``fork`` does not exist (macOS, Windows defaults aside) ``spawn`` is used.
"""

from __future__ import annotations

import multiprocessing
from multiprocessing.context import BaseContext
from multiprocessing.pool import Pool

import torch


def single_threaded() -> None:
    """Pool initializer: one intra-op thread in this worker (parallelism comes from the pool)."""
    torch.set_num_threads(1)


def worker_context() -> BaseContext:
    """``fork`` where available, else ``spawn``."""
    return multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")


def worker_pool(processes: int) -> Pool:
    """A pool whose workers are single-threaded in torch (safe after torch work in this process)."""
    return worker_context().Pool(processes, initializer=single_threaded)
