"""Typed, validated configurations of the data side: the reader (``DataConfig``) and the shard writer.

Both are flat dataclasses with a help string per field and checks in ``__post_init__``; both
round-trip through ``to_dict`` / ``from_dict`` (recipes are YAML) and both can be turned into
command-line options with :func:`inti_adapters._config.add_config_arguments`.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from .._config import Config, check_choice, check_int

SAMPLING_MODES = ("uniform", "dense")
DECODERS = ("auto", "pyav", "torchcodec")
CORRUPT_POLICIES = ("skip", "raise")
VIDEO_EXTENSIONS = ("mp4", "webm", "mkv", "avi", "mov", "m4v")
ANNOTATION_FORMATS = ("auto", "folder", "kinetics_csv", "path_csv", "ssv2_json", "shards")
CHECK_MODES = ("probe", "full")
STORE_MODES = ("video", "frames")
INCOMPLETE_POLICIES = ("raise", "warn")
START_METHODS = (None, "fork", "spawn", "forkserver")
FRAME_SHORT_SIDE = 256  # default short side of frame shards


def _check_shards(name: str, value: Any) -> Any:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        if not value:
            raise ValueError(f"{name} is an empty list; give shard paths, a brace pattern, a glob or None")
        return list(value)
    raise TypeError(
        f"{name} must be a brace pattern / glob / directory string, a list of shard paths, or None; "
        f"got {type(value).__name__}: {value!r}"
    )


def _check_pair(name: str, value: Any, low: float, high: float | None) -> tuple[float, float]:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise ValueError(f"{name} must be a pair (min, max), got {value!r}")
    a, b = (float(v) for v in value)
    if not (low < a <= b) or (high is not None and b > high):
        bound = f"<= {high}" if high is not None else ""
        raise ValueError(f"{name} must satisfy {low} < min <= max {bound}, got {value!r}")
    return (a, b)


def _check_decode_device(device: str) -> None:
    """A CUDA decode device must exist on this machine (refused when the config is read, not at every batch)."""
    if device == "cpu":
        return
    if not torch.cuda.is_available():
        raise ValueError(f"decode_device is {device!r} but torch finds no CUDA GPU on this machine "
                         "(torch.cuda.is_available() is False); set decode_device: cpu")
    index = int(device.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        raise ValueError(f"decode_device is {device!r} but this machine has {torch.cuda.device_count()} CUDA GPU(s) "
                         f"(cuda:0 .. cuda:{torch.cuda.device_count() - 1})")


@dataclass
class DataConfig(Config):
    """How video shards are read, sampled, augmented and batched.

    The reader yields uint8 clips; normalisation happens on the device
    (:func:`inti_adapters.normalize_video`).

        >>> cfg = DataConfig(train_shards="shards/train-{000000..000009}.tar", num_frames=16)
    """

    train_shards: str | list[str] | None = field(
        default=None,
        metadata={"help": "Training shards: brace pattern 'dir/train-{000000..000009}.tar', a glob, a "
                          "directory (all *.tar inside), or a list of paths. Remote: http(s):// URLs (brace "
                          "patterns too) and 'pipe:CMD' (a shell command writing the shard to its stdout, e.g. "
                          "'pipe:aws s3 cp s3://bucket/train-000000.tar -'); the sizes.json beside them is read when "
                          "there is one (else set train_samples)."},
    )
    val_shards: str | list[str] | None = field(
        default=None, metadata={"help": "Validation shards, same forms as train_shards."}
    )
    num_frames: int = field(default=8, metadata={"help": "Frames per clip (T)."})
    sampling: str = field(
        default="uniform",
        metadata={"help": "'uniform': one frame per equal segment of the whole video (TSN/SSv2 style); "
                          "'dense': num_frames consecutive frames every frame_stride (Kinetics style)."},
    )
    frame_stride: int = field(default=2, metadata={"help": "Frame step of dense sampling."})
    crop_size: int = field(default=224, metadata={"help": "Output height and width of every clip."})
    short_side: int | None = field(
        default=None,
        metadata={"help": "Resize the short side to this before cropping; None = round(crop_size * 256 / 224). "
                          "For 3-crop testing that covers the whole frame, set it to crop_size."},
    )
    scale: tuple[float, float] = field(
        default=(0.4, 1.0), metadata={"help": "Random resized crop: range of the crop area (fraction)."}
    )
    ratio: tuple[float, float] = field(
        default=(3 / 4, 4 / 3), metadata={"help": "Random resized crop: range of the crop aspect ratio."}
    )
    hflip: bool = field(
        default=False,
        metadata={"help": "Random horizontal flip in training. Off by default: it changes the meaning of "
                          "direction-sensitive labels (SSv2 'left to right', the built-in digits)."},
    )
    num_clips: int = field(default=1, metadata={"help": "Test views: temporal clips per video."})
    num_crops: int = field(
        default=1,
        metadata={"help": "Test views: spatial crops per clip; 1 = centre, 3 = left/centre/right "
                          "(top/centre/bottom for portrait frames)."},
    )
    batch_size: int = field(default=8, metadata={"help": "Clips per training batch (per rank)."})
    eval_batch_size: int | None = field(
        default=None, metadata={"help": "Videos per evaluation batch (each has num_clips*num_crops views); "
                                        "None = batch_size."}
    )
    num_workers: int = field(default=0, metadata={"help": "DataLoader worker processes per rank."})
    shuffle_buffer: int = field(
        default=256, metadata={"help": "Samples held by the training shuffle buffer; 0 or 1 = no sample shuffle."}
    )
    shard_shuffle: bool = field(
        default=True, metadata={"help": "Shuffle the shard order every training epoch."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of every random choice; (seed, epoch) fixes an epoch."})
    resampled: bool = field(
        default=False,
        metadata={"help": "Draw training shards with replacement, independently per worker (infinite "
                          "stream cut into epochs of train_samples); works with any number of shards. "
                          "Evaluation always reads every sample once."},
    )
    train_samples: int | None = field(
        default=None,
        metadata={"help": "Epoch size in samples (all ranks together). None = count the shards "
                          "(sizes.json beside them, else the tar headers of local files)."},
    )
    decoder: str = field(
        default="auto",
        metadata={"help": "Video decoder: 'pyav', 'torchcodec' (needs torchcodec and FFmpeg's shared "
                          "libraries; about as fast here) or 'auto' = PyAV. Frame shards use neither."},
    )
    on_corrupt: str = field(
        default="skip",
        metadata={"help": "A sample that cannot be decoded: 'skip' (log one line, count it) or 'raise'."},
    )
    max_consecutive_failures: int = field(
        default=50,
        metadata={"help": "Stop with an error after this many undecodable samples in a row (a broken data "
                          "set must fail loudly, not spin forever)."},
    )
    video_extensions: tuple[str, ...] = field(
        default=VIDEO_EXTENSIONS, metadata={"help": "Sample members read as the video, first match wins."}
    )
    decode_device: str = field(
        default="cpu",
        metadata={"help": "Where the JPEG frames of frame shards are decoded: 'cpu' (batched in the DataLoader "
                          "workers) or 'cuda' / 'cuda:N' (the workers pass the encoded frames and crop boxes; "
                          "decode, crop and resize run batched on that GPU in the main process, and batches "
                          "arrive there). Video samples are always decoded on the CPU."},
    )
    on_incomplete: str = field(
        default="raise",
        metadata={"help": "Evaluation that read a different number of samples than sizes.json lists (a "
                          "damaged or truncated shard): 'raise' an error or 'warn' loudly."},
    )
    retries: int = field(
        default=5,
        metadata={"help": "Remote shards (http://, https://, pipe:CMD): failures in a row retried before giving up on "
                          "a shard (a dropped connection, a reset, a timeout, HTTP 5xx, a pipe: command exiting "
                          "non-zero); reading continues where it stopped (HTTP Range, else a re-read that drops what "
                          "was delivered). Given up: training warns naming the shard and counts it as damaged; "
                          "evaluation fails."},
    )
    retry_backoff_s: float = field(
        default=1.0, metadata={"help": "Remote shards: seconds before the first retry, doubled for each further one "
                                       "(at most 60)."}
    )
    read_timeout_s: float = field(
        default=60.0, metadata={"help": "Remote shards: seconds without a byte before a read counts as failed "
                                        "(and is retried)."}
    )
    pin_memory: bool = field(default=False, metadata={"help": "DataLoader pin_memory."})
    multiprocessing_context: str | None = field(
        default=None,
        metadata={"help": "DataLoader worker start method: 'fork', 'spawn', 'forkserver', or None = the platform "
                          "default (fork on Linux: the workers only decode and crop, single-threaded, which is "
                          "safe after the parent has run torch on several threads)."},
    )

    def __post_init__(self) -> None:
        self.train_shards = _check_shards("train_shards", self.train_shards)
        self.val_shards = _check_shards("val_shards", self.val_shards)
        check_int("num_frames", self.num_frames, 1)
        check_choice("sampling", self.sampling, SAMPLING_MODES)
        check_int("frame_stride", self.frame_stride, 1)
        check_int("crop_size", self.crop_size, 1)
        check_int("short_side", self.short_side, 1, optional=True)
        if self.short_side is not None and self.short_side < self.crop_size:
            raise ValueError(f"short_side ({self.short_side}) must be >= crop_size ({self.crop_size}) "
                             "so that test crops fit inside the frame")
        self.scale = _check_pair("scale", self.scale, 0.0, 1.0)
        self.ratio = _check_pair("ratio", self.ratio, 0.0, None)
        if not isinstance(self.hflip, bool):
            raise TypeError(f"hflip must be a bool, got {self.hflip!r}")
        check_int("num_clips", self.num_clips, 1)
        if self.num_crops not in (1, 3):
            raise ValueError(f"num_crops must be 1 (centre) or 3 (left/centre/right), got {self.num_crops!r}")
        check_int("batch_size", self.batch_size, 1)
        check_int("eval_batch_size", self.eval_batch_size, 1, optional=True)
        check_int("num_workers", self.num_workers, 0)
        check_int("shuffle_buffer", self.shuffle_buffer, 0)
        check_int("seed", self.seed, 0)
        check_int("train_samples", self.train_samples, 1, optional=True)
        check_choice("decoder", self.decoder, DECODERS)
        check_choice("on_corrupt", self.on_corrupt, CORRUPT_POLICIES)
        check_int("max_consecutive_failures", self.max_consecutive_failures, 1)
        if isinstance(self.video_extensions, str):
            self.video_extensions = (self.video_extensions,)
        self.video_extensions = tuple(e.lstrip(".").lower() for e in self.video_extensions)
        if not self.video_extensions:
            raise ValueError("video_extensions must name at least one member extension such as 'mp4'")
        if not isinstance(self.decode_device, str) or not (
                self.decode_device == "cpu" or re.fullmatch(r"cuda(:\d+)?", self.decode_device)):
            raise ValueError(f"decode_device must be 'cpu', 'cuda' or 'cuda:N', got {self.decode_device!r}")
        _check_decode_device(self.decode_device)
        check_choice("on_incomplete", self.on_incomplete, INCOMPLETE_POLICIES)
        check_int("retries", self.retries, 0)
        for name in ("retry_backoff_s", "read_timeout_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
                raise ValueError(f"{name} must be a finite number of seconds >= 0, got {value!r}")
        if self.read_timeout_s == 0:
            raise ValueError("read_timeout_s must be > 0 (seconds without a byte before a read is retried), got 0")
        check_choice("multiprocessing_context", self.multiprocessing_context, START_METHODS)

    @property
    def resolved_short_side(self) -> int:
        """The short side frames are resized to before cropping."""
        return self.short_side if self.short_side is not None else round(self.crop_size * 256 / 224)

    @property
    def num_views(self) -> int:
        """Test views per video: temporal clips x spatial crops."""
        return self.num_clips * self.num_crops

    def replace(self, **changes: Any) -> DataConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


@dataclass
class ShardWriterConfig(Config):
    """Options of :func:`inti_adapters.data.write_shards` and the ``inti-shards`` command.

    Rerunning the same command on the same output resumes an interrupted run: shards listed in
    ``manifest.json`` are kept, the others are written again (to a temporary name, renamed when
    complete).
    """

    source: str = field(
        default="",
        metadata={"help": "A folder with one sub-folder per class, an annotation file (Kinetics CSV "
                          "label,youtube_id,time_start,time_end,split; a 'path,label' CSV; a Something-Something "
                          "JSON list), or existing video shards to convert (a brace pattern, a glob, or a folder "
                          "of .tar files; also http(s):// URLs and pipe:CMD commands, copied into the output folder "
                          "first) with --store frames."},
    )
    output: str = field(default="", metadata={"help": "Folder the shards are written to."})
    format: str = field(
        default="auto",
        metadata={"help": "Annotation format; 'auto' = folder for a directory (shards for a folder holding only "
                          ".tar files), CSV header sniffing for .csv, ssv2_json for .json, shards for a .tar path "
                          "or pattern."},
    )
    video_root: str | None = field(
        default=None,
        metadata={"help": "Folder holding the videos of an annotation file; None = the annotation file's folder."},
    )
    labels_file: str | None = field(
        default=None, metadata={"help": "Something-Something labels JSON (class name -> index)."}
    )
    classes_from: str | None = field(
        default=None,
        metadata={"help": "Reuse the class index of an earlier run (its classes.json), e.g. the validation "
                          "split reusing the training split's index."},
    )
    split: str | None = field(
        default=None, metadata={"help": "Kinetics CSV: keep only rows whose 'split' column equals this."}
    )
    prefix: str = field(default="shard", metadata={"help": "Shard names are <prefix>-<index:06d>.tar."})
    samples_per_shard: int = field(default=1000, metadata={"help": "Target number of videos per shard."})
    shuffle: bool = field(
        default=True,
        metadata={"help": "Shuffle videos (with seed) before cutting them into shards, so each shard mixes "
                          "classes. The assignment is deterministic, which is what makes resuming safe."},
    )
    seed: int = field(default=0, metadata={"help": "Seed of the video -> shard assignment."})
    store: str = field(
        default="video",
        metadata={"help": "What a sample holds: 'video' (the encoded video, copied or re-encoded) or 'frames' "
                          "(decoded once, frames_per_video frames resized to short_side, as JPEG; read many "
                          "times faster, see inti_adapters.data.frames)."},
    )
    frames_per_video: int = field(
        default=32,
        metadata={"help": "With store=frames: frames kept per video, one per equal segment; 0 = every frame "
                          "(needed for dense sampling with small strides)."},
    )
    jpeg_quality: int = field(default=90, metadata={"help": "With store=frames: JPEG quality, 1-100."})
    reencode: bool = field(
        default=False, metadata={"help": "Re-encode every video with PyAV (H.264 in MP4) instead of copying it."}
    )
    short_side: int | None = field(
        default=None,
        metadata={"help": "With reencode: resize so the short side has this many pixels. With store=frames: "
                          f"bring larger short sides down to this (None = {FRAME_SHORT_SIDE}; smaller frames are "
                          "kept as they are)."},
    )
    fps: float | None = field(
        default=None, metadata={"help": "With reencode: output frame rate (frames are dropped/repeated); None = keep."}
    )
    codec: str = field(default="libx264", metadata={"help": "With reencode: FFmpeg encoder name."})
    crf: int = field(default=18, metadata={"help": "With reencode: constant rate factor (lower = better)."})
    preset: str = field(default="veryfast", metadata={"help": "With reencode: x264 speed preset."})
    check: str = field(
        default="probe",
        metadata={"help": "How copied videos are checked: 'probe' (open and decode the first frame) or "
                          "'full' (decode every frame; slower, catches truncated files)."},
    )
    workers: int = field(default=1, metadata={"help": "Processes that probe/re-encode videos."})
    overwrite: bool = field(
        default=False, metadata={"help": "Delete an earlier run's shards in output instead of resuming."}
    )
    progress: bool = field(default=True, metadata={"help": "Show a tqdm progress bar."})

    def __post_init__(self) -> None:
        for name in ("source", "output"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"{name} must be a non-empty path, got {getattr(self, name)!r}")
        check_choice("format", self.format, ANNOTATION_FORMATS)
        check_int("samples_per_shard", self.samples_per_shard, 1)
        check_int("seed", self.seed, 0)
        check_int("short_side", self.short_side, 2, optional=True)
        check_int("workers", self.workers, 1)
        check_int("crf", self.crf, 0)
        check_choice("check", self.check, CHECK_MODES)
        if self.fps is not None and not self.fps > 0:
            raise ValueError(f"fps must be > 0 or None, got {self.fps!r}")
        check_choice("store", self.store, STORE_MODES)
        check_int("frames_per_video", self.frames_per_video, 0)
        check_int("jpeg_quality", self.jpeg_quality, 1)
        if self.jpeg_quality > 100:
            raise ValueError(f"jpeg_quality must be in 1..100, got {self.jpeg_quality}")
        if self.store == "frames" and (self.reencode or self.fps is not None):
            raise ValueError("store='frames' keeps decoded frames; reencode / fps apply to store='video' only")
        if self.store == "video" and not self.reencode and (self.short_side is not None or self.fps is not None):
            raise ValueError(
                f"short_side={self.short_side!r} / fps={self.fps!r} only apply when re-encoding or with "
                "store='frames'; set reencode=True (--reencode) or --store frames, or leave them unset"
            )
        if self.format == "shards" and self.store != "frames":
            raise ValueError("existing shards (format='shards') can only be converted to frame shards: "
                             "pass store='frames' (--store frames)")
        if "/" in self.prefix or not self.prefix:
            raise ValueError(f"prefix must be a non-empty file-name prefix without '/', got {self.prefix!r}")

    def fingerprint(self) -> dict[str, Any]:
        """The options that decide shard contents; a resumed run must match them."""
        keys = ("samples_per_shard", "shuffle", "seed", "reencode", "short_side", "fps", "codec", "crf",
                "preset", "prefix")
        out = {k: getattr(self, k) for k in keys}
        if self.store != "video":  # older manifests (video only) keep matching
            out.update(store=self.store, frames_per_video=self.frames_per_video, jpeg_quality=self.jpeg_quality)
        return out

    @property
    def frame_short_side(self) -> int:
        """The short side frame shards bring frames down to."""
        return self.short_side if self.short_side is not None else FRAME_SHORT_SIDE
