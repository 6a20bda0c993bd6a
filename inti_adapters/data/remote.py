"""Reading shards over the network: ``http://``, ``https://`` and ``pipe:CMD``, with retries that continue.

A shard spec may name local paths, HTTP(S) URLs, or ``pipe:`` commands whose standard output is
the shard (``pipe:aws s3 cp s3://bucket/shard-000000.tar -``; the command runs in a shell, like
webdataset's ``pipe:``). :class:`ShardStream` reads one of them as a file object that survives
the network:

- A dropped connection, a reset, a read that times out (``timeout_s`` without a byte), an HTTP
  5xx / 408 / 429 answer, or a ``pipe:`` command that exits non-zero is retried up to ``retries``
  times in a row (a retry that delivers data resets the count), waiting ``backoff_s * 2**k``
  seconds (at most 60) between tries. The stream continues at the byte where it stopped: with
  an HTTP ``Range`` request when the server answers ``206``, otherwise by reading the shard again
  from its start and dropping what was already delivered. The tar reader above never notices,
  so no sample is lost or repeated.
- A permanent answer (HTTP 4xx such as 404) fails at once; running out of retries fails too.
  Both raise :class:`ShardUnavailable`, whose message names the URL and the HTTP status or the
  command and its exit status, and says that the shard itself may be intact.

HTTP is read with :mod:`urllib.request` (proxies from the environment apply), not curl: there is
no hidden retry loop below this one.
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import os
import re
import select
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger("inti_adapters.data")

RETRIED_HTTP = (408, 429)  # besides every 5xx
MAX_WAIT_S = 60.0


def is_remote(url: str) -> bool:
    """Whether ``url`` is read over the network or from a command (``http(s)://``, ``pipe:``)."""
    return url.startswith(("http://", "https://", "pipe:"))


class ShardUnavailable(Exception):
    """A remote shard could not be read: a permanent error, or the retries ran out (the shard may be intact)."""

    def __init__(self, url: str, reason: str, *, permanent: bool = False) -> None:
        self.url, self.reason, self.permanent = url, reason, permanent
        super().__init__(f"{_describe(url)}: {reason}")


class _Transient(Exception):
    """A failure worth another try (internal)."""


def _describe(url: str) -> str:
    return f"command {url[5:]!r} (pipe: shard)" if url.startswith("pipe:") else url


@dataclass(frozen=True)
class RemoteOptions:
    """How remote shards are read: retries in a row, first wait between them, read timeout."""

    retries: int = 5
    backoff_s: float = 1.0
    timeout_s: float = 60.0

    def open(self, url: str) -> Any:
        """A file object reading ``url``: a local file, or a :class:`ShardStream`."""
        return ShardStream(url, self) if is_remote(url) else open(url, "rb")  # noqa: SIM115

    __call__ = open


class ShardStream:
    """A file object over an HTTP(S) URL or a ``pipe:`` command that retries and continues (module docstring)."""

    def __init__(self, url: str, options: RemoteOptions) -> None:
        self.url, self.options = url, options
        self.pos, self.total = 0, None  # bytes delivered; the shard's size when the server tells it
        self.retried = 0  # retries over the whole stream (for reports)
        self._resp: Any = None
        self._proc: subprocess.Popen | None = None
        self._stderr: Any = None
        self._skip = 0  # bytes of a fresh full read to drop (they were delivered before)
        self._failures = 0  # failures in a row, without progress
        self._ended = False  # every byte was delivered: later reads return b''

    # -- public file interface -------------------------------------------------------------------

    def read(self, n: int = -1) -> bytes:
        """Up to ``n`` bytes (all the rest for ``n < 0``); ``b''`` at the end of the shard."""
        if n is None or n < 0:
            return b"".join(iter(lambda: self.read(1 << 20), b""))
        if n == 0 or self._ended:
            return b""
        while True:
            try:
                if self._resp is None and self._proc is None:
                    self._open()
                data = self._read_delivered(n)
            except _Transient as exc:
                self._drop()
                if self.total is not None and self.pos >= self.total:
                    self._ended = True  # every byte was delivered before the connection failed
                    return b""
                self._retry(str(exc))
                continue
            if data:
                self._failures = 0
                self.pos += len(data)
            else:
                self._ended = True
            return data

    def close(self) -> None:
        self._drop()

    def __enter__(self) -> ShardStream:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- internals ---------------------------------------------------------------------------------

    def _read_delivered(self, n: int) -> bytes:
        """Raw bytes past those already delivered; ``b''`` only at the real end of the shard."""
        while self._skip:
            dropped = self._raw(min(self._skip, 1 << 20))
            if not dropped:
                raise _Transient(f"the answer ended at byte {self.pos - self._skip} while reading again up to here")
            self._skip -= len(dropped)
        data = self._raw(n)
        if not data:
            self._check_end()
        return data

    def _raw(self, n: int) -> bytes:
        try:
            if self._proc is not None:
                fd = self._proc.stdout.fileno()
                ready, _, _ = select.select([fd], [], [], self.options.timeout_s)
                if not ready:
                    raise _Transient(f"no data for {self.options.timeout_s:g} s")
                return os.read(fd, n)
            return self._resp.read(n)
        except (OSError, http.client.HTTPException) as exc:  # reset, timeout, IncompleteRead
            raise _Transient(f"{type(exc).__name__}: {exc}") from exc

    def _check_end(self) -> None:
        if self._proc is not None:
            try:
                status = self._proc.wait(timeout=self.options.timeout_s)
            except subprocess.TimeoutExpired as exc:
                raise _Transient(f"the command closed its output but did not exit within "
                                 f"{self.options.timeout_s:g} s") from exc
            if status != 0:
                raise _Transient(f"exited with status {status}{self._stderr_tail()}")
        elif self.total is not None and self.pos < self.total:
            raise _Transient(f"the connection closed before the end ({self.total} bytes)")

    def _stderr_tail(self) -> str:
        if self._stderr is None:
            return ""
        self._stderr.seek(0)
        text = self._stderr.read()[-400:].decode("utf-8", "replace").strip()
        return f" (its stderr: {text})" if text else ""

    def _open(self) -> None:
        if self.url.startswith("pipe:"):
            self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 - closed in _drop
            self._proc = subprocess.Popen(self.url[5:], shell=True, stdout=subprocess.PIPE, stderr=self._stderr,
                                          start_new_session=True)  # its own group: stopped with its children
            self._skip = self.pos
            return
        headers = {"Range": f"bytes={self.pos}-"} if self.pos else {}
        try:
            resp = urllib.request.urlopen(urllib.request.Request(self.url, headers=headers),
                                          timeout=self.options.timeout_s)
        except urllib.error.HTTPError as exc:
            exc.close()
            if exc.code >= 500 or exc.code in RETRIED_HTTP:
                raise _Transient(f"HTTP {exc.code} {exc.reason}") from exc
            raise ShardUnavailable(self.url, f"HTTP {exc.code} {exc.reason}"
                                   + (" (no such file on the server)" if exc.code == 404 else ""),
                                   permanent=True) from exc
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            raise _Transient(f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}") from exc
        self._resp = resp
        self._accept(resp)

    def _accept(self, resp: Any) -> None:
        """Check where the answer starts and that the file did not change between requests."""
        total = None
        match = re.fullmatch(r"bytes (\d+)-\d+/(\d+)", resp.headers.get("Content-Range", "") or "")
        if resp.status == 206 and match and int(match.group(1)) == self.pos:
            total = int(match.group(2))
        elif resp.status == 200:
            self._skip = self.pos  # no range support: read again from the start, dropping what was delivered
            length = resp.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
        else:
            raise _Transient(f"unexpected answer to a range request: HTTP {resp.status}, Content-Range "
                             f"{resp.headers.get('Content-Range')!r}")
        if self.total is not None and total is not None and total != self.total:
            raise ShardUnavailable(self.url, f"its size changed from {self.total} to {total} bytes while it was read",
                                   permanent=True)
        self.total = total if total is not None else self.total

    def _drop(self) -> None:
        if self._resp is not None:
            self._resp.close()
            self._resp = None
        if self._proc is not None:
            if self._proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self._proc.pid, signal.SIGKILL)
            self._proc.wait()
            self._proc.stdout.close()
            self._proc = None
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None

    def _retry(self, reason: str) -> None:
        """Wait before the next try, or give up with :class:`ShardUnavailable`."""
        if self._failures >= self.options.retries:
            tries = f"{self._failures + 1} tries in a row" if self._failures else "one try"
            raise ShardUnavailable(self.url, f"{reason}; {tries} failed at byte {self.pos} (data.retries "
                                   f"{self.options.retries}): the server, the network or the command failed "
                                   "(the data itself may be intact)")
        wait = min(self.options.backoff_s * 2 ** self._failures, MAX_WAIT_S)
        self._failures += 1
        self.retried += 1
        logger.info("%s: %s at byte %d; retry %d of %d in %.1f s", _describe(self.url), reason, self.pos,
                    self._failures, self.options.retries, wait)
        time.sleep(wait)


def fetch_optional(url: str, options: RemoteOptions) -> bytes | None:
    """The bytes of a small remote file, or None when it is not there (HTTP 404/403/410; a ``pipe:``
    command that fails once - it is not retried, as a missing object and a failure look alike).

    Raises:
        ShardUnavailable: any other failure after the retries.
    """
    if url.startswith("pipe:"):
        try:
            done = subprocess.run(url[5:], shell=True, capture_output=True, timeout=options.timeout_s, check=False)
        except subprocess.TimeoutExpired:
            return None
        return done.stdout if done.returncode == 0 else None
    stream = ShardStream(url, options)
    try:
        return stream.read()
    except ShardUnavailable as exc:
        if re.match(r"HTTP (404|403|410)\b", exc.reason):
            return None
        raise
    finally:
        stream.close()
