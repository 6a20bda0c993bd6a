"""Worker processes that are safe to start from any process, including one that already ran torch.

``fork`` copies the parent with only the calling thread. A parent that has run torch on several
threads (one forward + backward is enough) keeps an OpenMP thread pool; a forked child that
runs a parallel torch op (a resize, a JPEG encode in torch) then waits forever on a futex for
pool threads that do not exist in it. A process cannot tell reliably whether it is in that
state (``import torch`` alone already starts a thread), so the shard writer and the built-in
data generation always ``spawn`` fresh interpreters: a few seconds more to start a pool, never
a hang. (DataLoader workers are different: torch makes them single-threaded before they run
anything, so ``fork`` stays safe and fast there.)
"""

from __future__ import annotations

import multiprocessing
from multiprocessing.context import BaseContext

START_METHOD = "spawn"


def worker_context() -> BaseContext:
    """The multiprocessing context of the package's worker pools (``spawn``)."""
    return multiprocessing.get_context(START_METHOD)
