"""Read a video data set description into a list of ``(path, label)`` items and a class index.

Supported layouts:

- **folder**: ``root/<class name>/**/<video>`` (classes sorted by name).
- **kinetics_csv**: ``label,youtube_id,time_start,time_end,split`` rows; the video of a row is
  ``<youtube_id>_<start:06d>_<end:06d>.mp4``, looked up in ``video_root``, ``video_root/<label>``,
  ``video_root/<split>`` and ``video_root/<split>/<label>`` (labels also with spaces as ``_``).
- **path_csv**: ``path,label`` rows (header optional); integer labels are used as they are,
  names are indexed in sorted order.
- **ssv2_json**: a list of ``{"id": ..., "template": ...}`` (or ``"label"``) entries plus a labels
  JSON ``{class name: index}``; the template's ``[something]`` brackets are dropped, as in the
  official files. Videos are ``<id>.webm`` or ``<id>.mp4``.
- **shards**: existing video shards (a brace pattern, a glob, or a folder of ``.tar`` files; also
  ``http(s)://`` URLs and ``pipe:`` commands, copied first into ``<output>/.inti-shards-source/``,
  removed when the run completes), to convert them to frame shards; one item per sample with a
  video member, labelled by its ``.cls``, with the class names of the ``classes.json`` beside the shards.

Folder trees: hidden folders (``.ipynb_checkpoints``, ...) and class folders without any video
file are left out of the class index, with a warning naming them.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import tarfile
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._io import AtomicFile
from .config import VIDEO_EXTENSIONS, ShardWriterConfig
from .remote import RemoteOptions, ShardUnavailable, fetch_optional
from .tario import expand_shards, is_local, split_member_name

logger = logging.getLogger("inti_adapters.data")

CLASS_INDEX_FILE = "classes.json"
SOURCE_CACHE_DIR = ".inti-shards-source"  # local copies of remote source shards, removed when a run completes


@dataclass(frozen=True)
class VideoItem:
    """One video to write: where it is, its label, and how the annotation named it.

    A video inside a shard has ``member = (offset, size)`` of its bytes in the tar file ``path``
    and ``meta``, the JSON metadata of its sample.
    """

    path: str
    label: int
    source: str
    member: tuple[int, int] | None = None
    meta: str | None = None
    local: str | None = None  # a local copy of the remote shard ``path`` (what is read)


@dataclass
class Annotations:
    items: list[VideoItem]
    class_names: list[str]
    unlabelled: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, why) left out while listing


def _utf8(name: str) -> bool:
    """Whether a file name decoded from the file system is valid UTF-8 (Python keeps bad bytes as surrogates)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _name_bad_files(root: Path, files: list[Path]) -> list[tuple[str, str]]:
    """Warn about (and return) files under ``root`` whose names are not valid UTF-8: they are skipped."""
    bad = [(repr(os.fsencode(f.relative_to(root)))[2:-1], "its file name is not valid UTF-8 (rename it)")
           for f in files]
    for name, why in bad:
        logger.warning("skipped %s under %s: %s", name, root, why)
    return bad


def write_class_index(path: str | Path, class_names: list[str]) -> None:
    """Write ``{class name: index}`` (in index order) as JSON."""
    Path(path).write_text(json.dumps({n: i for i, n in enumerate(class_names)}, indent=1) + "\n")


def load_class_index(path: str | Path) -> list[str]:
    """Class names in index order from a ``{name: index}`` JSON (a ``classes.json`` or an SSv2 labels file)."""
    data = json.loads(Path(path).read_text())
    if isinstance(data, list):
        return [str(n) for n in data]
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object {{class name: index}}, got {type(data).__name__}")
    index = {str(k): int(v) for k, v in data.items()}
    names = sorted(index, key=index.get)
    if sorted(index.values()) != list(range(len(index))):
        raise ValueError(f"{path}: class indices must be 0..{len(index) - 1} without gaps or repeats")
    return names


def _index_labels(labels: Iterable[str], class_names: list[str] | None, where: str) -> tuple[list[str], dict]:
    if class_names is None:
        class_names = sorted(set(labels))
    lookup = {n: i for i, n in enumerate(class_names)}
    unknown = sorted(set(labels) - set(lookup))
    if unknown:
        raise ValueError(f"{where}: labels {unknown[:5]}{' ...' if len(unknown) > 5 else ''} are not in the "
                         f"given class index ({len(class_names)} classes)")
    return class_names, lookup


def read_folder(root: str | Path, class_names: list[str] | None = None) -> Annotations:
    """One sub-folder per class; every file with a video extension below it is a sample."""
    root = Path(root)
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise ValueError(f"{root} has no class sub-folders; expected root/<class name>/<video files>")
    found = {folder.name: [f for f in sorted(folder.rglob("*"))
                           if f.is_file() and f.suffix.lower().lstrip(".") in VIDEO_EXTENSIONS] for folder in folders}
    skipped = _name_bad_files(root, [f for files in found.values() for f in files if not _utf8(str(f.relative_to(root)))])
    videos = {name: [f for f in files if _utf8(str(f.relative_to(root)))] for name, files in found.items()}
    folders = [f for f in folders if _utf8(f.name)]
    empty = [name for name, files in videos.items() if not files]
    if empty:
        logger.warning("%d class folder(s) of %s hold no video file (%s)%s", len(empty), root, ", ".join(empty[:10]),
                       " and are left out of the class index" if class_names is None else "")
    if class_names is None:
        folders = [f for f in folders if videos[f.name]]
    names, lookup = _index_labels([p.name for p in folders], class_names, str(root))
    items = [VideoItem(str(f), lookup[folder.name], str(f.relative_to(root))) for folder in folders
             for f in videos[folder.name]]
    if not items:
        raise ValueError(f"no video files ({', '.join(VIDEO_EXTENSIONS)}) under {root}"
                         + (f" with a UTF-8 name ({len(skipped)} skipped)" if skipped else ""))
    return Annotations(items, names, skipped=skipped)


def _shard_videos(path: str) -> Iterable[tuple[str, tuple[int, int] | None, int | None, str | None]]:
    """``(key, (offset, size) of the video, label, json text)`` of every sample of a local shard."""
    samples: dict[str, dict[str, Any]] = {}
    with tarfile.open(path) as tar:
        for m in tar:
            parts = split_member_name(m.name) if m.isreg() else None
            if parts is None:
                continue
            sample = samples.setdefault(parts[0], {})
            if parts[1] in VIDEO_EXTENSIONS:
                sample["video"] = (m.offset_data, m.size)
            elif parts[1] in ("cls", "json"):
                sample[parts[1]] = tar.extractfile(m).read().decode("utf-8", "replace")
    for key, sample in samples.items():
        label = int(sample["cls"].strip()) if sample.get("cls", "").strip().lstrip("-").isdigit() else None
        yield key, sample.get("video"), label, sample.get("json")


def fetch_shard(url: str, folder: Path, index: int, remote: RemoteOptions) -> str:
    """A local copy of a remote shard (``http(s)://`` or ``pipe:``) in ``folder``, made once (atomically).

    Raises:
        ValueError: the shard could not be fetched (naming the URL and the HTTP status or exit status).
    """
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{index:06d}-{url.rsplit('/', 1)[-1].split()[-1][-60:].replace('/', '_')}"
    if path.exists():
        return str(path)
    try:
        with remote.open(url) as stream, AtomicFile(path, "wb") as out:
            for chunk in iter(lambda: stream.read(1 << 20), b""):
                out.file.write(chunk)
            out.commit()
    except ShardUnavailable as exc:
        raise ValueError(f"cannot fetch source shard {exc}") from None
    return str(path)


def _class_names_beside(shard: str, remote: RemoteOptions) -> list[str] | None:
    """The class names of the ``classes.json`` beside a (local or remote) shard, if there is one."""
    folder = shard.rsplit("/", 1)[0] if "/" in shard else "."
    if is_local(shard):
        index = Path(folder) / CLASS_INDEX_FILE
        return load_class_index(index) if index.exists() else None
    raw = None if shard.startswith("pipe:") else fetch_optional(f"{folder}/{CLASS_INDEX_FILE}", remote)
    if raw is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / CLASS_INDEX_FILE).write_bytes(raw)
        return load_class_index(Path(tmp) / CLASS_INDEX_FILE)


def read_shards(spec: str, class_names: list[str] | None = None, cache_dir: str | Path | None = None) -> Annotations:
    """Video shards written earlier (``inti-shards --store video`` or any webdataset video shards).

    Remote shards (``http(s)://``, ``pipe:``) are first copied into ``cache_dir`` (with retries).
    """
    shards = expand_shards(spec)
    remote = RemoteOptions()
    items, problems = [], []
    for i, shard in enumerate(shards):
        local = shard if is_local(shard) else fetch_shard(shard, Path(cache_dir or "."), i, remote)
        try:
            for key, video, label, meta in _shard_videos(local):
                if video is None or label is None:
                    problems.append(f"{os.path.basename(shard)}:{key} has no {'video member' if video is None else '.cls label'}")
                    continue
                items.append(VideoItem(shard, label, key, member=video, meta=meta,
                                       local=None if local == shard else local))
        except (tarfile.TarError, OSError) as exc:
            raise ValueError(f"cannot read source shard {shard}: {type(exc).__name__}: {exc}") from exc
    if problems:
        logger.warning("%d samples of %s are left out: %s", len(problems), spec, "; ".join(problems[:5]))
    if not items:
        raise ValueError(f"the shards {spec!r} hold no sample with a video member ({', '.join(VIDEO_EXTENSIONS)}) "
                         "and a .cls label (frame shards cannot be converted again)")
    if class_names is None:
        class_names = _class_names_beside(shards[0], remote) or [str(i) for i in range(max(i.label for i in items) + 1)]
    bad = sorted({i.label for i in items if not 0 <= i.label < len(class_names)})
    if bad:
        raise ValueError(f"labels {bad[:5]} of {spec!r} are outside the class index ({len(class_names)} classes)")
    return Annotations(items, list(class_names))


def _kinetics_path(root: Path, row: dict[str, str], name: str) -> Path:
    label, split = row.get("label", ""), row.get("split", "")
    candidates = [root / name]
    for lab in dict.fromkeys([label, label.replace(" ", "_")]):
        if lab:
            candidates.append(root / lab / name)
            if split:
                candidates.append(root / split / lab / name)
    if split:
        candidates.append(root / split / name)
    for c in candidates:
        if c.exists():
            return c
    return candidates[0]  # missing: the writer skips it and counts it


def read_kinetics_csv(
    path: str | Path,
    video_root: str | Path | None = None,
    *,
    split: str | None = None,
    class_names: list[str] | None = None,
) -> Annotations:
    """Kinetics annotation CSV (``label,youtube_id,time_start,time_end,split``)."""
    path = Path(path)
    root = Path(video_root) if video_root else path.parent
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    need = {"youtube_id", "time_start", "time_end"}
    if not rows or not need <= set(rows[0]):
        raise ValueError(f"{path}: a Kinetics CSV needs the columns label,youtube_id,time_start,time_end[,split]; "
                         f"got {list(rows[0]) if rows else 'no rows'}")
    if split is not None:
        rows = [r for r in rows if r.get("split") == split]
        if not rows:
            raise ValueError(f"{path}: no row has split == {split!r}")
    labelled = [r for r in rows if r.get("label")]
    unlabelled = [r["youtube_id"] for r in rows if not r.get("label")]
    names, lookup = _index_labels([r["label"] for r in labelled], class_names, str(path))
    items = []
    for r in labelled:
        name = f"{r['youtube_id']}_{int(float(r['time_start'])):06d}_{int(float(r['time_end'])):06d}.mp4"
        items.append(VideoItem(str(_kinetics_path(root, r, name)), lookup[r["label"]], name))
    return Annotations(items, names, unlabelled)


def read_path_csv(path: str | Path, video_root: str | Path | None = None, *,
                  class_names: list[str] | None = None) -> Annotations:
    """A ``path,label`` CSV (header optional); relative paths are taken from ``video_root``."""
    path = Path(path)
    root = Path(video_root) if video_root else path.parent
    with open(path, newline="") as f:
        rows = [r for r in csv.reader(f) if r and any(c.strip() for c in r)]
    if rows and [c.strip().lower() for c in rows[0][:2]] == ["path", "label"]:
        rows = rows[1:]
    bad = [r for r in rows if len(r) < 2]
    if not rows or bad:
        raise ValueError(f"{path}: expected 'path,label' rows, got {bad[0] if bad else 'no rows'}")
    labels = [r[1].strip() for r in rows]
    if class_names is None and all(lab.lstrip("-").isdigit() for lab in labels):
        ints = [int(lab) for lab in labels]
        if min(ints) < 0:
            raise ValueError(f"{path}: integer labels must be >= 0, got {min(ints)}")
        names = [str(i) for i in range(max(ints) + 1)]
        lookup = {n: i for i, n in enumerate(names)}
    else:
        names, lookup = _index_labels(labels, class_names, str(path))
    items = [VideoItem(str(root / r[0].strip()), lookup[lab], r[0].strip()) for r, lab in zip(rows, labels, strict=True)]
    return Annotations(items, names)


def _ssv2_class(entry: dict) -> str | None:
    if entry.get("template"):
        return str(entry["template"]).replace("[", "").replace("]", "")
    if entry.get("label"):
        return str(entry["label"])
    return None


def read_ssv2_json(path: str | Path, video_root: str | Path | None = None, *,
                   class_names: list[str]) -> Annotations:
    """Something-Something list of ``{"id", "template" | "label"}`` entries."""
    path = Path(path)
    root = Path(video_root) if video_root else path.parent
    entries = json.loads(path.read_text())
    if not isinstance(entries, list) or not all(isinstance(e, dict) and "id" in e for e in entries):
        raise ValueError(f"{path}: expected a JSON list of objects with an 'id' (Something-Something layout)")
    lookup = {n: i for i, n in enumerate(class_names)}
    items, unlabelled, unknown = [], [], set()
    for e in entries:
        vid, cls = str(e["id"]), _ssv2_class(e)
        if cls is None:
            unlabelled.append(vid)
            continue
        if cls not in lookup:
            unknown.add(cls)
            continue
        video = root / f"{vid}.webm"
        if not video.exists() and (root / f"{vid}.mp4").exists():
            video = root / f"{vid}.mp4"
        items.append(VideoItem(str(video), lookup[cls], vid))
    if unknown:
        u = sorted(unknown)
        raise ValueError(f"{path}: classes {u[:5]}{' ...' if len(u) > 5 else ''} are not in the labels file")
    return Annotations(items, list(class_names), unlabelled)


def detect_format(source: str | Path) -> str:
    """Guess the layout of ``source`` (folder, kinetics_csv, path_csv, ssv2_json or shards)."""
    p = Path(source)
    if p.is_dir():
        has_tars = any(p.glob("*.tar"))
        # hidden folders (an in-place conversion's staging folder, .ipynb_checkpoints) do not count
        subfolders = any(c.is_dir() and not c.name.startswith(".") for c in p.iterdir())
        return "shards" if has_tars and not subfolders else "folder"
    if str(source).endswith(".tar") or (".tar" in str(source) and any(c in str(source) for c in "{*?[")):
        return "shards"
    if not p.exists():
        raise FileNotFoundError(f"source {p} does not exist")
    if p.suffix.lower() == ".csv":
        with open(p, newline="") as f:
            header = next(csv.reader(f), [])
        return "kinetics_csv" if "youtube_id" in [h.strip() for h in header] else "path_csv"
    if p.suffix.lower() == ".json":
        return "ssv2_json"
    raise ValueError(f"cannot tell the layout of {p}: expected a folder, a .csv or a .json; set format explicitly")


def read_annotations(cfg: ShardWriterConfig) -> Annotations:
    """Parse ``cfg.source`` in ``cfg.format`` (or the detected one)."""
    fmt = detect_format(cfg.source) if cfg.format == "auto" else cfg.format
    classes = load_class_index(cfg.classes_from) if cfg.classes_from else None
    if fmt == "folder":
        ann = read_folder(cfg.source, classes)
    elif fmt == "kinetics_csv":
        ann = read_kinetics_csv(cfg.source, cfg.video_root, split=cfg.split, class_names=classes)
    elif fmt == "path_csv":
        ann = read_path_csv(cfg.source, cfg.video_root, class_names=classes)
    elif fmt == "shards":
        ann = read_shards(cfg.source, classes, cache_dir=Path(cfg.output) / SOURCE_CACHE_DIR)
    else:
        if classes is None and cfg.labels_file is None:
            raise ValueError("Something-Something JSON needs labels_file (its labels JSON, class name -> index) "
                             "or classes_from")
        ann = read_ssv2_json(cfg.source, cfg.video_root,
                             class_names=classes if classes is not None else load_class_index(cfg.labels_file))
    if ann.unlabelled:
        logger.warning("%d entries of %s have no label and are left out (e.g. %s)", len(ann.unlabelled),
                       cfg.source, ann.unlabelled[0])
    return ann
