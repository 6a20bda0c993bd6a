"""Reading WebDataset tar shards sample by sample, and noticing when a shard is damaged.

Python's ``tarfile`` stops *silently* at a damaged member header in the middle of an archive
(it treats it as the end), and ``webdataset`` inherits that: the rest of the shard is dropped
without a word. :func:`iter_tar_samples` reads the shard as a stream, groups members into
samples the way webdataset does (``<key>.<ext>``, the key being the name up to the first dot),
and when the archive ends it checks that only zero padding is left; anything else, or an
exception while reading, is reported as :class:`ShardDamage` with the shard's name, the number
of samples read and the byte offset where reading stopped. A shard cut exactly at a member
boundary looks complete here; the reader catches that case by comparing with ``sizes.json``.
"""

from __future__ import annotations

import glob
import os
import tarfile
from collections.abc import Callable, Iterator
from typing import Any

import braceexpand

from .remote import RemoteOptions


def is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def expand_shards(spec: str | list[str] | tuple[str, ...]) -> list[str]:
    """Expand a shard spec: a brace pattern, a glob, a directory (its ``*.tar``), a path, or a list of these.

    Raises:
        ValueError: the spec names no shard.
    """
    if isinstance(spec, (list, tuple)):
        out = [s for part in spec for s in expand_shards(part)]
    elif isinstance(spec, str):
        out = []
        for part in braceexpand.braceexpand(spec):
            if is_local(part) and os.path.isdir(part):
                out.extend(sorted(glob.glob(os.path.join(part, "*.tar"))))
            elif is_local(part) and any(c in part for c in "*?["):
                out.extend(sorted(glob.glob(part)))
            else:
                out.append(part)
    else:
        raise TypeError(f"shards must be a string or a list of strings, got {type(spec).__name__}: {spec!r}")
    if not out:
        raise ValueError(f"the shard spec {spec!r} names no shard (empty directory or glob without matches)")
    missing = [s for s in out if is_local(s) and not os.path.exists(s)]
    if missing:
        raise ValueError(f"{len(missing)} shard(s) of {spec!r} do not exist, e.g. {missing[0]}")
    return out


class ShardDamage(Exception):
    """A shard could not be read to its end: ``samples`` complete samples were read before ``offset``."""

    def __init__(self, url: str, samples: int, offset: int | None, reason: str) -> None:
        self.url, self.samples, self.offset, self.reason = url, samples, offset, reason
        where = f" at byte {offset}" if offset is not None else ""
        super().__init__(f"shard {url} is damaged{where} after {samples} complete samples: {reason}; "
                         "the rest of it cannot be read (rewrite it, e.g. by rerunning inti-shards)")


def split_member_name(name: str) -> tuple[str, str] | None:
    """``('dir/key', 'ext')`` of a member name (the key ends at the first dot of the file name, as in
    webdataset); None for hidden / ``__meta__`` files and names without an extension."""
    folder, base = os.path.split(name)
    if base.startswith((".", "__")) or "." not in base:
        return None
    stem, ext = base.split(".", 1)
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _rest_is_padding(stream: Any, limit: int = 1 << 20) -> bool:
    """Whether what follows the archive's end is zero padding (reads at most ``limit`` bytes)."""
    seen = 0
    while seen < limit:
        chunk = stream.read(min(65536, limit - seen))
        if not chunk:
            return True
        if chunk.count(0) != len(chunk):
            return False
        seen += len(chunk)
    return True


class _Damaged(Exception):
    """A member header that does not parse, or a file that ends early (internal to this module)."""


def _read(stream: Any, n: int) -> bytes:
    """Exactly ``n`` bytes (streams from pipes may return less per read); fewer only at the end."""
    data = stream.read(n)
    if len(data) == n or not data:
        return data
    parts = [data]
    while sum(map(len, parts)) < n:
        more = stream.read(n - sum(map(len, parts)))
        if not more:
            break
        parts.append(more)
    return b"".join(parts)


def _number(field: bytes) -> int:
    """A tar numeric field: NUL/space-terminated octal, or GNU base-256 (first byte 0x80)."""
    if field[:1] == b"\x80":
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _pax_records(data: bytes) -> dict[str, str]:
    out, i = {}, 0
    while i < len(data) and data[i:i + 1] != b"\0":
        length = int(data[i:data.index(b" ", i)])
        key, _, value = data[data.index(b" ", i) + 1:i + length - 1].partition(b"=")
        out[key.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
        i += length
    return out


def iter_tar_members(stream: Any) -> Iterator[tuple[int, str, bytes]]:
    """``(header offset, name, data)`` of the regular files of an uncompressed tar stream.

    A small ustar/GNU/PAX reader: ``tarfile`` spends far longer per member (a frame shard has ~35
    members per sample) and stops silently at a damaged header. Raises :class:`_Damaged` when a
    header's checksum fails or the stream ends before the end-of-archive block.
    """
    offset, pax, long_name = 0, {}, None
    while True:
        header = _read(stream, 512)
        if len(header) < 512:
            raise _Damaged(offset, "the file ends without the end-of-archive marker (truncated)")
        if header.count(0) == 512:
            if not _rest_is_padding(stream):
                raise _Damaged(offset, "an empty block inside the archive, followed by data")
            return
        try:
            valid = _number(header[148:156]) == sum(header[:148]) + 256 + sum(header[156:])
        except ValueError:
            valid = False
        if not valid:
            raise _Damaged(offset, "a damaged member header (bad checksum)")
        size, kind = pax.get("size") and int(pax["size"]) or _number(header[124:136]), header[156:157]
        name = header[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
        if header[257:262] == b"ustar" and header[345:346] != b"\0":
            name = header[345:500].split(b"\0", 1)[0].decode("utf-8", "replace") + "/" + name
        data = _read(stream, size)
        padding = -size % 512
        if len(data) < size or len(_read(stream, padding)) < padding:
            raise _Damaged(offset, "the file ends inside a member (truncated)")
        if kind == b"x":
            pax = _pax_records(data)
        elif kind == b"L":
            long_name = data.split(b"\0", 1)[0].decode("utf-8", "replace")
        else:
            if kind in (b"0", b"\0", b"7"):
                yield offset, pax.get("path") or long_name or name, data
            pax, long_name = {}, None
        offset += 512 + size + padding


def _guarded(members: Iterator[tuple[int, str, bytes]]) -> Iterator[tuple[Any, Any, Any]]:
    """The members, then ``(None, damage, None)`` instead of raising :class:`_Damaged`."""
    try:
        yield from members
    except _Damaged as exc:
        yield None, exc, None


def iter_tar_samples(url: str, *, opener: Callable[[str], Any] | None = None) -> Iterator[dict[str, Any]]:
    """Samples ``{'__key__', '__url__', ext: bytes, ...}`` of one tar shard, in archive order.

    ``opener`` maps the URL to a file object (default: :class:`~inti_adapters.data.remote.RemoteOptions`,
    which reads local paths, ``http(s)://`` and ``pipe:`` with retries).

    Raises:
        ShardDamage: after yielding every complete sample before the damage.
        ShardUnavailable: a remote shard could not be read (its retries ran out, or a permanent error).
    """
    stream = (opener or RemoteOptions())(url)
    count, offset, damage = 0, None, None
    current: dict[str, Any] | None = None
    seen: set[str] = set()
    try:
        for member_offset, name, data in _guarded(iter_tar_members(stream)):
            offset = member_offset
            if isinstance(name, _Damaged):
                damage = name
                break
            parts = split_member_name(name)
            if parts is None:
                continue
            key, ext = parts
            if current is not None and current["__key__"] != key:  # the previous sample is complete
                count += 1
                yield current
                current = None
            if current is None:
                current = {"__key__": key, "__url__": url}
                if key in seen:
                    current["__error__"] = (f"duplicate sample key {key!r}: an earlier sample of this shard has the "
                                            "same key (keys must be unique)")
                seen.add(key)
            if ext in current:
                current.setdefault("__error__", f"two '.{ext}' members (member {name!r} repeats one); a sample "
                                                "holds each member once")
            current[ext] = data
        if current is not None:  # the last sample (before the end, or before a damaged header: its checks
            count += 1           # in the decoding stage catch a member lost with the header)
            yield current
        if damage is not None:
            raise ShardDamage(url, count, damage.args[0], damage.args[1])
    except OSError as exc:
        raise ShardDamage(url, count, offset, f"{type(exc).__name__}: {exc}") from exc
    finally:
        stream.close()


def count_tar_samples(path: str) -> int:
    """Samples in a local shard (reads its member headers, seeking over the data).

    Raises:
        ValueError: naming the shard, when it is not a readable tar or is damaged.
    """
    keys: set[str] = set()
    try:
        with tarfile.open(path) as tar:
            for member in tar:
                parts = split_member_name(member.name) if member.isreg() else None
                if parts is not None:
                    keys.add(parts[0])
            end = tar.offset
            tar.fileobj.seek(end)
            marker = tar.fileobj.read(tarfile.BLOCKSIZE)
            if len(marker) < tarfile.BLOCKSIZE or marker.count(0) != len(marker) or not _rest_is_padding(tar.fileobj):
                raise ValueError(f"shard {path} is damaged at byte {end} after {len(keys)} samples (a damaged "
                                 "member header, or truncated); rewrite it, or list its size in a sizes.json beside it")
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise ValueError(f"cannot count the samples of shard {path}: {type(exc).__name__}: {exc} (a truncated or "
                         "damaged tar?); rewrite it, or list its size in a sizes.json beside the shards") from exc
    return len(keys)
