"""How many samples each shard holds: the ``sizes.json`` beside the shards (local, ``http(s)://`` or
``pipe:``), else the tar headers of local shards."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from .remote import RemoteOptions, ShardUnavailable, fetch_optional
from .tario import count_tar_samples, is_local

SIZES_FILE = "sizes.json"


def sizes_location(shard: str) -> tuple[str | None, str]:
    """Where the ``sizes.json`` beside a shard is, and the shard's name in it.

    Local paths and ``http(s)://`` URLs: the same folder. ``pipe:`` commands: the command with the
    shard's file name (the last word ending in ``.tar``) replaced by ``sizes.json``; None when the
    command names no ``.tar``.
    """
    if not shard.startswith("pipe:"):
        folder, name = shard.rsplit("/", 1) if "/" in shard else ("", shard)
        return (f"{folder}/{SIZES_FILE}" if folder else SIZES_FILE), name
    words = list(re.finditer(r"[^\s'\"]+\.tar\b", shard))
    if not words:
        return None, shard
    word = words[-1]
    folder, _, name = word.group(0).rpartition("/")
    return shard[:word.start()] + (f"{folder}/" if folder else "") + SIZES_FILE + shard[word.end():], name


def load_sizes(where: str, remote: RemoteOptions) -> dict[str, int] | None:
    """A ``sizes.json`` (shard name -> samples) from a path or URL; None when there is none.

    Raises:
        ValueError: naming the file, when it is not a JSON object of non-negative integers.
    """
    if is_local(where):
        if not os.path.exists(where):
            return None
        raw: bytes | None = Path(where).read_bytes()
    else:
        try:
            raw = fetch_optional(where, remote)
        except ShardUnavailable as exc:
            raise RuntimeError(f"cannot read {where} (the sample counts of the shards beside it): {exc.reason}") from None
        if raw is None:
            return None
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise ValueError(f"{where} is not valid JSON ({exc}); it should map shard file names to sample counts, "
                         "as inti-shards writes it; rewrite or remove it") from None
    if not isinstance(data, dict) or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                                             for v in data.values()):
        raise ValueError(f"{where} must be a JSON object mapping shard file names to sample counts (integers >= 0), "
                         f"got {str(data)[:120]}")
    return data


def read_shard_sizes(shards: list[str], remote: RemoteOptions | None = None) -> list[int] | None:
    """Samples per shard, from the ``sizes.json`` beside the shards (local or remote) or by reading local tar headers.

    Returns None when some shard is remote and no ``sizes.json`` is beside it.

    Raises:
        ValueError: a ``sizes.json`` that is not valid, or one beside remote shards that does not list one of them.
    """
    remote = remote or RemoteOptions()
    listings: dict[str | None, dict[str, int] | None] = {}
    sizes = []
    for s in shards:
        where, name = sizes_location(s)
        if where not in listings:
            listings[where] = load_sizes(where, remote) if where is not None else None
        listing = listings[where]
        if listing is not None and name in listing:
            sizes.append(listing[name])
        elif is_local(s):
            sizes.append(count_tar_samples(s))
        elif listing is not None:
            raise ValueError(f"{where} does not list the shard {name} ({len(listing)} shards listed, e.g. "
                             f"{sorted(listing)[:3]}): it does not belong to these shards; rewrite it, or remove it "
                             "and set data.train_samples")
        else:
            return None
    return sizes
