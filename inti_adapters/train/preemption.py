"""Preemption: a scheduler's signal ends in a complete checkpoint and a resumable exit.

``train.checkpoint_signals`` (default ``SIGTERM``, ``SIGUSR1``: what Slurm sends on preemption and
before a time limit, what torchrun forwards to its workers) are caught while the run trains. The
handler only records the signal; the training loop agrees on it across ranks at the next micro-batch
(the all-reduce it does anyway), every rank finishes its optimizer step, a checkpoint is written
(complete only when every rank has written), rank 0 writes ``OUTPUT_DIR/PREEMPTED`` and every rank
leaves with :class:`Preempted`, a ``SystemExit`` with status :data:`PREEMPTED_EXIT_CODE` (75,
``EX_TEMPFAIL``: "try again"). A signal during a checkpoint save, or a second signal, is only
recorded: the save finishes and the pointer to the newest checkpoint moves only after it.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .._io import atomic_write

logger = logging.getLogger(__name__)

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: preempted, resumable by running the same command again
MARKER = "PREEMPTED"


class Preempted(SystemExit):
    """Raised on every rank after the preemption checkpoint; exits the process with status 75."""

    def __init__(self, step: int, signame: str, checkpoint: str | os.PathLike) -> None:
        super().__init__(PREEMPTED_EXIT_CODE)
        self.step, self.signame, self.checkpoint = step, signame, Path(checkpoint)

    def __str__(self) -> str:
        return (f"preempted by {self.signame}: checkpoint {self.checkpoint} written at step {self.step}; "
                f"run the same command again to resume (exit status {PREEMPTED_EXIT_CODE})")


class SignalWatch:
    """Records the first of ``names`` received while active (a context manager); restores the handlers."""

    def __init__(self, names: list[str] | tuple[str, ...]) -> None:
        self.names = list(names)
        self.received: str | None = None
        self.count = 0
        self._old: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        self.count += 1
        if self.received is None:
            self.received = signal.Signals(signum).name
            logger.warning("received %s: finishing this optimizer step, then a checkpoint and exit %d",
                           self.received, PREEMPTED_EXIT_CODE)
        else:
            logger.warning("received %s again: the checkpoint is on its way", signal.Signals(signum).name)

    def __enter__(self) -> SignalWatch:
        if threading.current_thread() is not threading.main_thread():
            if self.names:
                logger.warning("not in the main thread: train.checkpoint_signals %s are not caught", self.names)
            return self
        for name in self.names:
            num = getattr(signal, name)
            self._old[num] = signal.signal(num, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for num, old in self._old.items():
            signal.signal(num, old if old is not None else signal.SIG_DFL)
        self._old.clear()

    @property
    def requested(self) -> bool:
        return self.received is not None


@contextmanager
def blocked_in_children(names: list[str] | tuple[str, ...]) -> Iterator[list[Any]]:
    """Block ``names`` in this thread while loader workers are forked, so the workers start with them blocked.

    A scheduler signals every process of a job (Slurm at the time limit, ``scancel``, a ``kill`` of the process
    group), DataLoader workers included; torch's workers die of ``SIGTERM`` from anyone but their parent, and
    the main process then fails with "DataLoader worker ... is killed by signal: Terminated" instead of
    checkpointing. Workers forked inside this block inherit the blocked mask and never see the signal (they
    stop with their parent as usual); in the main process a signal that came meanwhile is delivered on exit.

    Yields a list that holds, after the block, the ``multiprocessing`` children forked inside it: give it to
    :func:`stop_children` when the run ends in an error.
    """
    forked: list[Any] = []
    before = {p.pid for p in multiprocessing.active_children()}
    nums = {getattr(signal, n) for n in names}
    main = threading.current_thread() is threading.main_thread()
    old = signal.pthread_sigmask(signal.SIG_BLOCK, nums) if nums and main else None
    try:
        yield forked
    finally:
        if old is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
        forked.extend(p for p in multiprocessing.active_children() if p.pid not in before)


def stop_children(procs: list[Any], timeout_s: float = 5.0) -> None:
    """Kill (``SIGKILL``) the children of :func:`blocked_in_children` that are still alive, and reap them.

    They cannot be stopped by ``terminate()``: its ``SIGTERM`` is blocked in them. torch's DataLoader shutdown
    and multiprocessing's exit handler rely on it for a worker that does not take its stop message (one
    blocked writing a batch that nobody reads after an error), so without this a rank that fails (a lost
    peer) or is preempted could hang at exit, joining its worker forever.
    """
    alive = [p for p in procs if p.is_alive()]
    if not alive:
        return
    # torch's DataLoader SIGCHLD handler would raise "DataLoader worker ... is killed by signal" for these (a
    # preempted rank would exit 1 instead of 75): set aside while they are killed and reaped; it ignores reaped pids
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGCHLD, signal.SIG_DFL) if main else None
    try:
        for p in alive:
            p.kill()
        for p in alive:
            p.join(timeout=timeout_s)
    finally:
        if main:
            signal.signal(signal.SIGCHLD, previous)


def write_marker(out_dir: Path, *, step: int, signame: str, checkpoint: str) -> Path:
    """``OUTPUT_DIR/PREEMPTED`` (JSON: step, signal, checkpoint, time, host, exit status), atomically."""
    path = out_dir / MARKER
    record = {"step": step, "signal": signame, "checkpoint": checkpoint, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "host": socket.gethostname(), "exit_status": PREEMPTED_EXIT_CODE}
    atomic_write(path, json.dumps(record, indent=1) + "\n")
    return path


def clear_marker(out_dir: Path) -> None:
    """A run that starts (resumes) removes the marker of the preempted run before it."""
    try:
        (out_dir / MARKER).unlink()
    except FileNotFoundError:
        pass
