"""The built-in data set: real handwritten digits moving in straight lines ("moving digits").

Each clip (default 8 frames of 64x64) shows one digit scan from scikit-learn's bundled
``load_digits`` (1,797 real 8x8 scans, upscaled) sliding across a dark background with light
per-frame noise. The label joins the digit and its direction of motion::

    label = digit * 4 + direction        direction: 0 right, 1 left, 2 down, 3 up   (40 classes)

A right-moving and a left-moving clip over the same path contain the *same set of frames* in
opposite order, so an order-blind model (per-frame features averaged over time) can tell the
axis of motion but not its sign: it cannot beat ~50% direction accuracy, while a model that
uses frame order can. With ``distractor=True`` a second, unlabelled digit moves in another
direction in the same clip. Train and validation clips use disjoint digit scans (a seeded split
of the 1,797 scans by index).

The clips are encoded as H.264 MP4 (near-lossless) into WebDataset shards on first use, or with
``store='frames'`` as frame shards (every frame a JPEG, see :mod:`inti_adapters.data.frames`;
several times faster to read), and read by the same pipeline as any other data set:

    >>> ds = ensure_builtin_dataset("~/.cache/inti/digits")          # doctest: +SKIP
    >>> loader = build_dataloader(ds.to_data_config(batch_size=16), train=True)   # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .._config import Config, check_choice
from ._processes import worker_pool
from .annotations import CLASS_INDEX_FILE, write_class_index
from .config import STORE_MODES, DataConfig
from .decode import encode_video
from .frames import encode_frames
from .shards import SIZES_FILE, ShardSink, write_json_atomic

DIRECTIONS = ("right", "left", "down", "up")
NUM_DIGITS = 10
NUM_CLASSES = NUM_DIGITS * len(DIRECTIONS)
CACHE_FILE = "digits.json"
FORMAT_VERSION = 1
CLASS_NAMES = [f"{d}-{name}" for d in range(NUM_DIGITS) for name in DIRECTIONS]

# ---------------------------------------------------------------------------------------------------
# labels


def make_label(digit: int, direction: int) -> int:
    """``digit * 4 + direction`` (direction 0 right, 1 left, 2 down, 3 up)."""
    if not 0 <= digit < NUM_DIGITS or not 0 <= direction < len(DIRECTIONS):
        raise ValueError(f"digit must be in 0..9 and direction in 0..3, got digit={digit}, direction={direction}")
    return digit * len(DIRECTIONS) + direction


def decode_label(label: int | torch.Tensor) -> tuple[Any, Any]:
    """``label -> (digit, direction)``; works on ints and on integer tensors (elementwise)."""
    if isinstance(label, torch.Tensor):
        return torch.div(label, len(DIRECTIONS), rounding_mode="floor"), label % len(DIRECTIONS)
    if not 0 <= int(label) < NUM_CLASSES:
        raise ValueError(f"a moving-digits label is in 0..{NUM_CLASSES - 1}, got {label}")
    return int(label) // len(DIRECTIONS), int(label) % len(DIRECTIONS)


def label_accuracies(predicted: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """Accuracy of whole labels and of their parts: digit, direction, and axis (horizontal/vertical).

    An order-blind model gets the axis but guesses the sign, so its direction accuracy stays near
    half its axis accuracy.
    """
    if predicted.shape != target.shape:
        raise ValueError(f"predicted {tuple(predicted.shape)} and target {tuple(target.shape)} differ in shape")
    pd, pr = decode_label(predicted)
    td, tr = decode_label(target)
    return {"accuracy": (predicted == target).float().mean().item(), "digit": (pd == td).float().mean().item(),
            "direction": (pr == tr).float().mean().item(),
            "axis": (torch.div(pr, 2, rounding_mode="floor") == torch.div(tr, 2, rounding_mode="floor"))
            .float().mean().item()}


# ---------------------------------------------------------------------------------------------------
# options


@dataclass
class DigitsOptions(Config):
    """What the generated data set looks like; changing any field regenerates it."""

    num_train: int = field(default=4000, metadata={"help": "Training clips."})
    num_val: int = field(default=800, metadata={"help": "Validation clips."})
    num_frames: int = field(default=8, metadata={"help": "Frames per clip."})
    image_size: int = field(default=64, metadata={"help": "Frame height and width (even)."})
    digit_size: int = field(default=24, metadata={"help": "Side of an upscaled 8x8 digit scan, pixels."})
    speed: tuple[float, float] = field(
        default=(2.0, 4.0), metadata={"help": "Range of the speed, pixels per frame (drawn per clip)."}
    )
    distractor: bool = field(
        default=False,
        metadata={"help": "Add a second, unlabelled digit moving in another direction."},
    )
    noise_std: float = field(default=3.0, metadata={"help": "Per-frame Gaussian noise, 0..255 units."})
    val_fraction: float = field(default=0.2, metadata={"help": "Fraction of the 1,797 scans kept for validation."})
    seed: int = field(default=0, metadata={"help": "Seed of the scan split and of every clip."})
    samples_per_shard: int = field(default=250, metadata={"help": "Clips per shard."})
    fps: float = field(default=8.0, metadata={"help": "Frame rate written in the MP4s."})
    crf: int = field(default=8, metadata={"help": "x264 constant rate factor (low = near-lossless)."})
    store: str = field(
        default="video",
        metadata={"help": "'video' (H.264 MP4 per clip) or 'frames' (every frame a JPEG: frame shards, read "
                          "several times faster)."},
    )
    jpeg_quality: int = field(default=95, metadata={"help": "With store='frames': JPEG quality, 1-100."})

    def __post_init__(self) -> None:
        for name in ("num_train", "num_val", "num_frames", "image_size", "digit_size", "samples_per_shard"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if self.image_size % 2:
            raise ValueError(f"image_size must be even (H.264 yuv420p), got {self.image_size}")
        self.speed = tuple(float(s) for s in self.speed)  # type: ignore[assignment]
        if len(self.speed) != 2 or not 0 < self.speed[0] <= self.speed[1]:
            raise ValueError(f"speed must be a pair 0 < min <= max, got {self.speed!r}")
        travel = self.speed[1] * (self.num_frames - 1)
        if self.digit_size + travel > self.image_size:
            raise ValueError(
                f"a digit of {self.digit_size} px moving up to {self.speed[1]} px/frame for {self.num_frames} frames "
                f"travels {travel:.0f} px and does not fit in {self.image_size} px; lower speed or digit_size"
            )
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        check_choice("store", self.store, STORE_MODES)
        if isinstance(self.jpeg_quality, bool) or not isinstance(self.jpeg_quality, int) or not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be an int in 1..100, got {self.jpeg_quality!r}")
        if self.noise_std < 0 or self.fps <= 0 or not 0 <= self.crf <= 51:
            raise ValueError(f"need noise_std >= 0, fps > 0, 0 <= crf <= 51; got {self.noise_std}, {self.fps}, "
                             f"{self.crf}")


@dataclass
class BuiltinDataset:
    """The generated moving-digits shards and what a training run needs to know about them."""

    root: str
    train_shards: list[str]
    val_shards: list[str]
    options: DigitsOptions
    num_classes: int = NUM_CLASSES
    class_names: list[str] = field(default_factory=lambda: list(CLASS_NAMES))

    @property
    def num_frames(self) -> int:
        return self.options.num_frames

    @property
    def image_size(self) -> int:
        return self.options.image_size

    def to_data_config(self, **overrides: Any) -> DataConfig:
        """A :class:`DataConfig` for these shards (whole-frame crops, no flip, uniform sampling)."""
        base = dict(train_shards=list(self.train_shards), val_shards=list(self.val_shards),
                    num_frames=self.num_frames, sampling="uniform", crop_size=self.image_size,
                    short_side=self.image_size, scale=(0.7, 1.0), hflip=False, train_samples=self.options.num_train,
                    seed=self.options.seed)
        base.update(overrides)
        return DataConfig(**base)


# ---------------------------------------------------------------------------------------------------
# generation


def split_scans(num_scans: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint train / validation scan indices (a seeded permutation of ``range(num_scans)``)."""
    perm = np.random.default_rng([seed, 1797]).permutation(num_scans)
    n_val = max(1, int(round(num_scans * val_fraction)))
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


@functools.lru_cache(maxsize=2)
def _load_scans(size: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.float32) / 16.0)[:, None]
    big = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    return big[:, 0].clamp_(0, 1).numpy(), digits.target.astype(np.int64)


def _path(opts: DigitsOptions, direction: int, rng: np.random.Generator) -> np.ndarray:
    """``(T, 2)`` top-left (y, x) positions of a straight-line path in ``direction``.

    The path's extent is placed uniformly, then walked forwards or backwards, so the two
    directions of an axis produce the same distribution of frame sets.
    """
    t = np.arange(opts.num_frames)
    speed = rng.uniform(*opts.speed)
    travel = speed * (opts.num_frames - 1)
    low = rng.uniform(0, opts.image_size - opts.digit_size - travel)
    forward = direction in (0, 2)  # right and down walk towards larger coordinates
    along = low + speed * t if forward else low + travel - speed * t
    across = np.full(opts.num_frames, rng.uniform(0, opts.image_size - opts.digit_size))
    y, x = (along, across) if direction >= 2 else (across, along)
    return np.rint(np.stack([y, x], 1)).astype(np.int64)


def render_clip(opts: DigitsOptions, scans: np.ndarray, scan: int, direction: int, rng: np.random.Generator,
                distractor_scan: int | None = None) -> np.ndarray:
    """uint8 ``(T, H, W, 3)`` frames of one moving digit (plus an optional distractor)."""
    frames = np.zeros((opts.num_frames, opts.image_size, opts.image_size), np.float32)
    movers = [(scan, direction)]
    if distractor_scan is not None:
        other = [d for d in range(len(DIRECTIONS)) if d != direction]
        movers.append((distractor_scan, int(rng.choice(other))))
    s = opts.digit_size
    for which, d in movers:
        img = scans[which] * rng.uniform(0.75, 1.0)
        for ti, (y, x) in enumerate(_path(opts, d, rng)):
            np.maximum(frames[ti, y:y + s, x:x + s], img, out=frames[ti, y:y + s, x:x + s])
    frames = frames * 255.0 + rng.normal(0.0, opts.noise_std, frames.shape)
    gray = np.clip(np.rint(frames), 0, 255).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=-1)


def scan_split(opts: DigitsOptions, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The digit images of one split (``'train'`` / ``'val'``: the same disjoint scans as the clips),
    upscaled to ``digit_size`` exactly as the clips draw them: float in [0, 1] of shape
    ``(N, 1, digit_size, digit_size)``, and their digits ``(N,)``."""
    check_choice("split", split, ("train", "val"))
    scans, targets = _load_scans(opts.digit_size)
    ids = split_scans(len(scans), opts.val_fraction, opts.seed)[0 if split == "train" else 1]
    return torch.from_numpy(scans[ids])[:, None], torch.from_numpy(targets[ids])


def render_digit_images(opts: DigitsOptions, scans: torch.Tensor, count: int, *, generator: torch.Generator,
                        image_size: int | None = None, scale_jitter: float = 0.0,
                        rotation: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Still frames like those of the clips, for image pre-training: uint8 ``(count, 3, H, W)`` and the
    index into ``scans`` (of :func:`scan_split`) of each frame's digit.

    Without augmentation a frame is drawn as :func:`render_clip` draws one: the upscaled scan at an
    integer position (uniform, inside the frame), the clips' brightness range and noise. Augmentation:
    the digit's size is multiplied by ``1 ± scale_jitter`` and it is rotated by up to ``± rotation``
    degrees (uniform, bilinear resampling). ``image_size`` (default the clips') may be as small as
    the digit: a crop of a frame around it.
    """
    side = opts.image_size if image_size is None else int(image_size)
    n, s = count, scans.shape[-1]
    rand = functools.partial(torch.rand, generator=generator)
    idx = torch.randint(len(scans), (n,), generator=generator)
    size = s * (1 + scale_jitter * (2 * rand(n) - 1))
    angle = torch.deg2rad(rotation * (2 * rand(n) - 1))
    corner = torch.floor(rand(n, 2) * (side - size[:, None]).clamp(min=0) + 0.5)  # integer (x, y) of the top-left
    # affine_grid maps output coordinates in [-1, 1] (of the frame) to input coordinates in [-1, 1] (of the scan)
    zoom, cos, sin = side / size, torch.cos(angle), torch.sin(angle)
    offset = (side / 2 - corner - size[:, None] / 2) / (size[:, None] / 2)
    theta = torch.stack([torch.stack([zoom * cos, -zoom * sin, cos * offset[:, 0] - sin * offset[:, 1]], 1),
                         torch.stack([zoom * sin, zoom * cos, sin * offset[:, 0] + cos * offset[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, [n, 1, side, side], align_corners=False)
    img = F.grid_sample(scans[idx], grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    img = img * (0.75 + 0.25 * rand(n, 1, 1, 1)) * 255.0
    img = img + opts.noise_std * torch.randn(img.shape, generator=generator)
    return img.round_().clamp_(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).contiguous(), idx


def _write_shard(job: tuple[DigitsOptions, str, int, str, np.ndarray]) -> tuple[str, int]:
    opts, split, shard, path, scan_ids = job
    scans, targets = _load_scans(opts.digit_size)
    total = opts.num_train if split == "train" else opts.num_val
    first = shard * opts.samples_per_shard
    with ShardSink(path) as sink:
        for i in range(first, min(total, first + opts.samples_per_shard)):
            rng = np.random.default_rng([opts.seed, 0 if split == "train" else 1, i])
            scan = int(rng.choice(scan_ids))
            direction = int(rng.integers(len(DIRECTIONS)))
            other = int(rng.choice(scan_ids)) if opts.distractor else None
            frames = render_clip(opts, scans, scan, direction, rng, other)
            digit = int(targets[scan])
            label = make_label(digit, direction)
            meta = {"digit": digit, "direction": DIRECTIONS[direction], "scan": scan, "label": label,
                    "num_frames": opts.num_frames, "fps": opts.fps, "size": [opts.image_size] * 2}
            if opts.store == "frames":
                members, info = encode_frames(frames, fps=opts.fps, quality=opts.jpeg_quality)
                meta = {**info, **meta}
            else:
                members = {"mp4": encode_video(frames, opts.fps, crf=opts.crf)}
            sink.add(f"{split}_{i:07d}", {**members, "cls": str(label).encode(), "json": json.dumps(meta).encode()})
        count = sink.count
        sink.commit()
    return path, count


def _generate(root: Path, opts: DigitsOptions, workers: int) -> dict[str, list[str]]:
    train_ids, val_ids = split_scans(1797, opts.val_fraction, opts.seed)
    jobs, names = [], {}
    for split, total, ids in (("train", opts.num_train, train_ids), ("val", opts.num_val, val_ids)):
        folder = root / split
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        n = -(-total // opts.samples_per_shard)
        names[split] = [f"digits-{split}-{s:06d}.tar" for s in range(n)]
        jobs += [(opts, split, s, str(folder / names[split][s]), ids) for s in range(n)]
    if workers > 1:
        with worker_pool(workers) as pool:  # safe after torch work in this process (see _processes)
            results = pool.map(_write_shard, jobs, chunksize=1)
    else:
        results = [_write_shard(j) for j in jobs]
    counts = dict(results)
    for split in ("train", "val"):
        folder = root / split
        write_json_atomic(folder / SIZES_FILE, {n: counts[str(folder / n)] for n in names[split]})
        write_class_index(folder / CLASS_INDEX_FILE, CLASS_NAMES)
    return {split: [f"{split}/{n}" for n in names[split]] for split in ("train", "val")}


@contextlib.contextmanager
def _locked(root: Path):
    """An exclusive lock on ``root`` (several ranks may ask for the data set at once)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no cross-process lock
        yield
        return
    with open(root / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _cached(root: Path, opts: DigitsOptions) -> dict[str, list[str]] | None:
    path = root / CACHE_FILE
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    try:  # options recorded before a field existed take its default
        recorded = DigitsOptions.from_dict(data.get("options") or {}).to_dict()
    except (TypeError, ValueError):
        return None
    if data.get("version") != FORMAT_VERSION or recorded != opts.to_dict():
        return None
    shards = data.get("shards", {})
    if not all((root / s).exists() for split in ("train", "val") for s in shards.get(split, [None])):
        return None
    return shards


def ensure_builtin_dataset(root: str | Path, *, workers: int | None = None, **options: Any) -> BuiltinDataset:
    """Generate the moving-digits shards under ``root`` on first use and describe them.

    ``options`` are :class:`DigitsOptions` fields. The shards are regenerated only when the
    options (or the format version) differ from those recorded in ``root/digits.json``.
    ``workers`` processes encode shards in parallel (default: up to 2; results do not depend on it).
    """
    opts = DigitsOptions(**options)
    root = Path(root).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root):
        shards = _cached(root, opts)
        if shards is None:
            (root / CACHE_FILE).unlink(missing_ok=True)
            n_workers = workers if workers is not None else min(2, os.cpu_count() or 1)
            shards = _generate(root, opts, max(1, n_workers))
            write_json_atomic(root / CACHE_FILE, {"version": FORMAT_VERSION, "options": opts.to_dict(),
                                                  "shards": shards})
    return BuiltinDataset(root=str(root), train_shards=[str(root / s) for s in shards["train"]],
                          val_shards=[str(root / s) for s in shards["val"]], options=opts)


# re-exported for callers that only need the options' field names
DIGITS_OPTION_NAMES = tuple(f.name for f in dataclasses.fields(DigitsOptions))
