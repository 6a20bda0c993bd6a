"""A lock on a run's output folder, so that two runs never write the same checkpoints and metrics.

Global rank 0 of a run holds an exclusive ``flock`` on ``OUTPUT_DIR/.inti-train.lock`` while the
run trains and writes its pid, host and start time into it. The kernel releases the lock when the
process ends, however it ends, so a lock left by a dead process is stale by construction: the next
run takes it (and says whose it was). A second run on a live run's folder is refused with
:class:`RunLockedError` naming the folder and the running process. (``flock`` on network file
systems: NFSv4 and Lustre honour it across hosts; where a file system does not, the lock only
protects against runs on the same host.)
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

LOCK_NAME = ".inti-train.lock"


class RunLockedError(RuntimeError):
    """Another live run holds the output folder."""


class RunLock:
    """``with RunLock(out_dir):`` holds the folder's lock (or raises :class:`RunLockedError`)."""

    def __init__(self, out_dir: str | os.PathLike) -> None:
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(_read(fd))
            os.close(fd)
            raise RunLockedError(
                f"{self.out_dir} is in use by another run ({holder}); wait for it to finish, stop it, or use "
                f"another train.output_dir") from None
        previous = _read(fd)
        if previous and previous.get("pid") != os.getpid():
            logger.info("%s: taking over the stale lock of a run that ended without releasing it (%s)",
                        self.out_dir, _describe(previous))
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)  # an empty file = released cleanly
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _read(fd: int) -> dict[str, Any] | None:
    try:
        raw = os.pread(fd, 4096, 0)
        value = json.loads(raw.decode()) if raw.strip() else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return value if isinstance(value, dict) else None


def _describe(record: dict[str, Any] | None) -> str:
    if not record:
        return "process unknown: it has not written its pid yet"
    return f"pid {record.get('pid')} on host {record.get('host')}, started {record.get('started')}"
