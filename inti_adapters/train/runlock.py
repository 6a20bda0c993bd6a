"""A lock on a run's output folder, so that two runs never write the same checkpoints and metrics.

Global rank 0 of a run holds an exclusive ``flock`` on ``OUTPUT_DIR/.inti-train.lock`` while the
run trains and writes its pid, host and start time into it (:class:`inti_adapters.data._lock.OutputLock`,
the lock ``inti-shards`` holds on its output too). The kernel releases the lock when the process
ends, however it ends, so a lock left by a dead process is stale by construction: the next run takes
it (and says whose it was). A second run on a live run's folder is refused with
:class:`RunLockedError` naming the folder and the running process.
"""

from __future__ import annotations

import os

from ..data._lock import OutputLock

TOOL = "inti-train"
LOCK_NAME = f".{TOOL}.lock"  # the name OutputLock gives it


class RunLockedError(RuntimeError):
    """Another live run holds the output folder."""


class RunLock(OutputLock):
    """``with RunLock(out_dir):`` holds the folder's lock (or raises :class:`RunLockedError`)."""

    error = RunLockedError
    refusal = ("{folder} is in use by another run ({holder}); wait for it to finish, stop it, or use another "
               "train.output_dir")

    def __init__(self, out_dir: str | os.PathLike) -> None:
        super().__init__(out_dir, TOOL)
        self.out_dir = self.folder
