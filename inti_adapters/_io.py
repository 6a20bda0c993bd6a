"""Crash-safe file writes: a file appears under its final name complete, or not at all.

Every writer of the package (adapters, checkpoints, shards, manifests, caches) goes through
:func:`atomic_open` / :func:`atomic_write`: the data goes to a temporary file in the same
directory (``.<name>.<random>.tmp``), is flushed and ``fsync``-ed, then renamed over the final
name with ``os.replace`` (atomic on POSIX and Windows). A crash or an exception at any point
leaves either the old file or the new one, never a half-written file; the temporary is removed
on exceptions, and :func:`remove_stale_temporaries` clears those left by a killed process.

Permissions are those of a plain ``open(path, "w")``: a file that is replaced keeps its mode, a new
file gets ``0o666`` less the process's umask (0644 under umask 022), so that shards and checkpoints
on a shared cluster are group-readable when the umask says so (``mkstemp``'s temporaries are 0600).

Example:
    >>> import json, pathlib, tempfile
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> atomic_write(d / "a.json", json.dumps({"x": 1}))
    >>> (d / "a.json").read_text()
    '{"x": 1}'
    >>> with atomic_open(d / "b.bin", "wb") as f:
    ...     _ = f.write(b"\\x00\\x01")
    >>> sorted(p.name for p in d.iterdir())
    ['a.json', 'b.bin']
"""

from __future__ import annotations

import contextlib
import functools
import os
import stat
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

__all__ = ["AtomicFile", "atomic_open", "atomic_write", "file_mode", "give_default_modes", "pipe_safe", "remove_stale_temporaries",
           "temporary_name_pattern"]


def temporary_name_pattern(name: str) -> str:
    """Glob pattern of the temporaries :func:`atomic_open` creates for a final file ``name``."""
    return f".{name}.*.tmp"


def _process_umask() -> int:
    """The umask, read without changing it where the system says it (Linux), else set and restored."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):  # pragma: no cover - not Linux
        pass
    mask = os.umask(0o022)  # pragma: no cover
    os.umask(mask)  # pragma: no cover
    return mask  # pragma: no cover


def file_mode(path: str | os.PathLike) -> int:
    """The mode a file written to ``path`` gets: the existing file's, else 0o666 less the umask."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return 0o666 & ~_process_umask()


def give_default_modes(folder: str | os.PathLike) -> None:
    """Set every file under ``folder`` to the mode a new file gets (0o666 less the umask): for files
    that a library wrote through its own temporaries (safetensors' are 0600)."""
    mode = 0o666 & ~_process_umask()
    for path in Path(folder).rglob("*"):
        if path.is_file() and not path.is_symlink():
            os.chmod(path, mode)


def _fsync_directory(directory: Path) -> None:
    """Persist a rename (POSIX); a no-op where directories cannot be opened (Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - platform dependent
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


class AtomicFile:
    """A file written under a temporary name beside ``path``; :meth:`commit` gives it its name.

    For writers that stream into an open file over a long time (tar shards). :meth:`abort`
    (or leaving a ``with`` block by an exception, or without committing) removes the temporary.
    """

    def __init__(self, path: str | os.PathLike, mode: str = "wb", *, fsync: bool = True) -> None:
        if mode not in ("wb", "w"):
            raise ValueError(f"atomic files are written anew: mode must be 'wb' or 'w', got {mode!r}")
        self.path = Path(path)
        self.fsync = fsync
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        self.tmp_path = Path(tmp)
        try:
            os.fchmod(fd, file_mode(self.path))  # not mkstemp's 0600: as open() would create it
        except BaseException:
            os.close(fd)
            self.tmp_path.unlink(missing_ok=True)
            raise
        self.file: IO[Any] = os.fdopen(fd, mode, **({"encoding": "utf-8"} if mode == "w" else {}))

    def commit(self) -> None:
        """Flush (and fsync) the data, close the file and rename it to its final name."""
        try:
            self.file.flush()
            if self.fsync:
                os.fsync(self.file.fileno())
            self.file.close()
            os.replace(self.tmp_path, self.path)
        except BaseException:
            self.abort()
            raise
        if self.fsync:
            _fsync_directory(self.path.parent)

    def abort(self) -> None:
        """Close and delete the temporary; the final name is left as it was."""
        if not self.file.closed:
            self.file.close()
        self.tmp_path.unlink(missing_ok=True)

    def __enter__(self) -> AtomicFile:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if self.tmp_path.exists():
            self.abort()


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", *, fsync: bool = True) -> Iterator[IO[Any]]:
    """Open a temporary beside ``path`` for writing; rename it to ``path`` when the block ends.

    Args:
        path: Final file name. Its directory must exist.
        mode: ``"wb"`` or ``"w"`` (text, UTF-8).
        fsync: Flush the data and the directory entry to disk before returning.

    Raises:
        ValueError: For a mode that does not write a new file.
    """
    with AtomicFile(path, mode, fsync=fsync) as f:
        yield f.file
        f.commit()


def atomic_write(path: str | os.PathLike, data: bytes | str | Callable[[str], None], *,
                 fsync: bool = True) -> None:
    """Write ``data`` to ``path`` atomically.

    Args:
        path: Final file name.
        data: Bytes, text, or a function that writes the file given a temporary path (for
            writers that take a file name, e.g. ``safetensors.torch.save_file``).
        fsync: As in :func:`atomic_open`.
    """
    if callable(data):
        final = Path(path)
        fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp")
        os.close(fd)
        try:
            data(tmp)
            os.chmod(tmp, file_mode(final))  # not mkstemp's 0600 (the writer may have made the file anew)
            if fsync:
                with open(tmp, "rb+") as f:
                    os.fsync(f.fileno())
            os.replace(tmp, final)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        if fsync:
            _fsync_directory(final.parent)
        return
    if not isinstance(data, (bytes, bytearray, str)):
        raise TypeError(f"atomic_write takes bytes, str or a writer function, got {type(data).__name__}")
    with atomic_open(path, "w" if isinstance(data, str) else "wb", fsync=fsync) as f:
        f.write(data)


def remove_stale_temporaries(directory: str | os.PathLike, name_glob: str = "*") -> list[Path]:
    """Delete temporaries left in ``directory`` by writers that were killed; returns what was removed.

    Only call this when no other process is writing into ``directory``.
    """
    removed = []
    for p in Path(directory).glob(temporary_name_pattern(name_glob)):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
            removed.append(p)
    return removed


def pipe_safe(main: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a command's entry point so that a reader that stops early (``inti-train --list-recipes |
    head -1``) ends it quietly with status 0, as the standard tools do, instead of a
    ``BrokenPipeError`` traceback. Standard output is flushed inside the wrapper, so that the error
    cannot surface later, during the interpreter's shutdown."""

    @functools.wraps(main)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            result = main(*args, **kwargs)
        except BrokenPipeError:
            result = 0
        finally:  # also after a SystemExit (argparse's --help, a usage error), whose status stays
            try:
                sys.stdout.flush()
            except BrokenPipeError:
                # later writes (and the flush at exit) go nowhere instead of failing again
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return result

    return wrapper
