"""Converting shards in place: ``inti-shards --source S --output S --store frames --overwrite``.

Writing the new shards straight into ``S`` would replace (or, with ``--overwrite``, delete) the
source shards before they are read. Instead the whole run goes to a hidden staging folder
``S/.inti-shards-in-place/`` (an ordinary, resumable ``inti-shards`` output), and only when every
new shard is written are the old ones replaced:

1. ``swap.json`` is written in the staging folder: the decision to replace is recorded;
2. ``S/sizes.json`` and ``S/manifest.json`` are removed (they describe the old shards);
3. the new shards are renamed into ``S``, the old shards they do not replace are deleted;
4. ``classes.json``, ``sizes.json`` and last ``manifest.json`` are moved into ``S``, and the staging
   folder is removed.

A run killed during steps 2-4 leaves ``swap.json``; rerunning the same command finishes the
replacement without reading the (partly replaced) source again. At no time does ``S`` hold a
``sizes.json`` that disagrees with its shards, and no source shard is deleted before its
replacement exists.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .._io import _fsync_directory, atomic_write
from .annotations import detect_format
from .config import ShardWriterConfig
from .tario import expand_shards, is_local

logger = logging.getLogger("inti_adapters.data")

STAGING_DIR = ".inti-shards-in-place"
SWAP_FILE = "swap.json"


def source_shards_in(source: str, fmt: str, output: str) -> list[Path]:
    """The source shards that lie in the folder ``output`` (empty unless the source is local shards there)."""
    if fmt == "auto":
        try:
            fmt = detect_format(source)
        except (OSError, ValueError):
            return []
    if fmt != "shards":
        return []
    try:
        shards = [s for s in expand_shards(source) if is_local(s)]
    except ValueError:
        return []
    out = Path(output).resolve()
    return [Path(s).resolve() for s in shards if Path(s).resolve().parent == out]


def pending_swap(output: str | Path) -> dict[str, Any] | None:
    """The recorded replacement of an in-place conversion that was interrupted, if any."""
    path = Path(output) / STAGING_DIR / SWAP_FILE
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path} (the record of an unfinished in-place conversion) cannot be read: {exc}; "
                         f"remove the folder {path.parent} and rerun") from exc
    return data


def record_swap(output: Path, new: list[str], old: list[Path], fingerprint: dict[str, Any],
                summary: dict[str, Any]) -> dict[str, Any]:
    """Step 1: write ``swap.json`` once every new shard is in the staging folder."""
    remove = sorted({p.name for p in old} - set(new))
    data = {"fingerprint": fingerprint, "new": list(new), "remove": remove, "summary": summary}
    atomic_write(output / STAGING_DIR / SWAP_FILE, json.dumps(data, indent=1) + "\n")
    return data


def finish_swap(output: Path, swap: dict[str, Any], meta_files: tuple[str, ...], manifest: str) -> None:
    """Steps 2-4: replace the old shards by the staged ones (idempotent: safe to rerun after a kill)."""
    staging = output / STAGING_DIR
    for name in (*meta_files, manifest):
        if (staging / name).exists():  # still to be moved: the ones in S describe the old shards
            (output / name).unlink(missing_ok=True)
    for name in swap["new"]:
        if (staging / name).exists():
            os.replace(staging / name, output / name)
        elif not (output / name).exists():
            raise ValueError(f"the in-place conversion into {output} lost its new shard {name} (neither in "
                             f"{staging} nor in {output}); remove {staging} and convert again from a copy")
    for name in swap["remove"]:
        (output / name).unlink(missing_ok=True)
    for name in (*meta_files, manifest):  # the manifest last: it marks the output complete
        if (staging / name).exists():
            os.replace(staging / name, output / name)
    _fsync_directory(output)
    shutil.rmtree(staging)
    logger.info("replaced the shards of %s in place (%d new, %d old ones removed)", output, len(swap["new"]),
                len(swap["remove"]))


def refuse_in_place(cfg: ShardWriterConfig) -> None:
    """Raise: converting shards into their own folder replaces them, which needs ``overwrite``."""
    raise ValueError(
        f"the source shards {cfg.source!r} lie in the output folder {cfg.output}: converting them in place replaces "
        "them. Pass overwrite=True (--overwrite) to do so (the new shards are written aside and replace the old ones "
        "only when all are written), or choose another output folder")


def convert_in_place(cfg: ShardWriterConfig, old: list[Path], swap: dict[str, Any] | None,
                     write: Callable[[ShardWriterConfig], dict[str, Any]], meta_files: tuple[str, ...],
                     manifest: str) -> dict[str, Any]:
    """Write the run into the staging folder (``write`` returns its summary's fields), then swap it in; or
    finish an interrupted swap. Returns the summary's fields for the output folder."""
    out = Path(cfg.output)
    if swap is None:
        staged = write(dataclasses.replace(cfg, output=str(out / STAGING_DIR), overwrite=False))
        swap = record_swap(out, [Path(s).name for s in staged["shards"]], old, cfg.fingerprint(), staged)
    elif swap["fingerprint"] != cfg.fingerprint():
        raise ValueError(f"{out} holds an unfinished in-place conversion ({out / STAGING_DIR}) made with other "
                         f"options ({swap['fingerprint']}); rerun the command that started it to finish it")
    finish_swap(out, swap, meta_files, manifest)
    fields = swap["summary"]
    return {**fields, "output": str(out), "shards": [str(out / n) for n in swap["new"]],
            "skipped_videos": [tuple(x) for x in fields["skipped_videos"]]}
