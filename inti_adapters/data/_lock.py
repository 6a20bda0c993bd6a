"""An exclusive lock on an output folder, so that two writers never write the same files at once.

The writer holds a ``flock`` on ``<folder>/.<tool>.lock`` (with its pid, host and start time in
it) while it writes. The kernel drops the lock when the process ends, however it ends, so a lock
left by a dead process never blocks: the next writer takes it over (and logs whose it was). A
second writer is refused with a message naming the folder and the live writer. ``inti-shards``
uses it as is, ``inti-train`` through :class:`inti_adapters.train.runlock.RunLock`. (``flock`` on
network file systems: NFSv4 and Lustre honour it across hosts; where a file system does not, the
lock only protects against writers on the same host.)
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


class OutputLock:
    """``with OutputLock(folder, "inti-shards"):`` holds the folder's lock or raises ``error`` (``ValueError``).

    ``refusal`` is the message, formatted with ``folder``, ``tool`` and ``holder`` (who holds the lock).
    """

    error: type[Exception] = ValueError
    refusal = ("{folder} is being written by another {tool} run ({holder}); wait for it to finish, or choose another "
               "output folder")

    def __init__(self, folder: str | os.PathLike, tool: str) -> None:
        self.folder, self.tool = Path(folder), tool
        self.path = self.folder / f".{tool}.lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = describe(_read(fd))
            os.close(fd)
            raise self.error(self.refusal.format(folder=self.folder, tool=self.tool, holder=holder)) from None
        previous = _read(fd)
        if previous and previous.get("pid") != os.getpid():
            logger.info("%s: taking over the stale lock of a %s run that ended without releasing it (%s)",
                        self.folder, self.tool, describe(previous))
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

    def __enter__(self) -> OutputLock:
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


def describe(record: dict[str, Any] | None) -> str:
    """Who holds a lock, from the record in its file."""
    if not record:
        return "process unknown: it has not written its pid yet"
    return f"pid {record.get('pid')} on host {record.get('host')}, started {record.get('started')}"
