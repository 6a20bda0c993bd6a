"""An exclusive lock on an output folder, so that two writers never write the same files at once.

The writer holds a ``flock`` on ``<folder>/.<tool>.lock`` (with its pid, host and start time in
it) while it writes. The kernel drops the lock when the process ends, however it ends, so a lock
left by a dead process never blocks. A second writer is refused with a message naming the folder
and the live writer.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Any


class OutputLock:
    """``with OutputLock(folder, "inti-shards"):`` holds the folder's lock or raises ``ValueError``."""

    def __init__(self, folder: str | os.PathLike, tool: str) -> None:
        self.folder, self.tool = Path(folder), tool
        self.path = self.folder / f".{tool}.lock"
        self._fd: int | None = None

    def __enter__(self) -> OutputLock:
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise ValueError(f"{self.folder} is being written by another {self.tool} run ({holder}); wait for it to "
                             "finish, or choose another output folder") from None
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except ValueError:
        info = {}
    if not info:
        return "a process that is starting"
    return f"pid {info.get('pid')} on host {info.get('host')}, started {info.get('started')}"
