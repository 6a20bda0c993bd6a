"""Video data: WebDataset shards of videos or of JPEG frames (writer and reader), decoding on the CPU or
the GPU, frame sampling, transforms, built-in data.

    >>> from inti_adapters.data import DataConfig, build_dataloader, ensure_builtin_dataset
    >>> ds = ensure_builtin_dataset("cache/digits")                       # doctest: +SKIP
    >>> loader = build_dataloader(ds.to_data_config(), train=True)        # doctest: +SKIP
    >>> video, label = next(iter(loader))   # uint8 (B, 3, T, H, W), int64 (B,)   # doctest: +SKIP
"""

from .annotations import Annotations, VideoItem, load_class_index, read_annotations, write_class_index
from .config import DataConfig, ShardWriterConfig
from .decode import VideoDecodeError, VideoInfo, encode_video, open_video, probe_video, reencode_video
from .digits import (
    CLASS_NAMES as DIGITS_CLASS_NAMES,
)
from .digits import (
    DIRECTIONS,
    BuiltinDataset,
    DigitsOptions,
    decode_label,
    ensure_builtin_dataset,
    label_accuracies,
    make_label,
)
from .frames import FrameReader, extract_frames, nearest_stored, stored_frame_indices
from .pipeline import ReadReport, VideoLoader, build_dataloader, expand_shards, read_shard_sizes
from .remote import RemoteOptions, ShardUnavailable
from .sampling import dense_indices, sample_indices, uniform_indices
from .shards import ShardSummary, write_shards
from .tario import ShardDamage

__all__ = [
    "DIGITS_CLASS_NAMES",
    "DIRECTIONS",
    "Annotations",
    "BuiltinDataset",
    "DataConfig",
    "DigitsOptions",
    "FrameReader",
    "ReadReport",
    "RemoteOptions",
    "ShardDamage",
    "ShardSummary",
    "ShardUnavailable",
    "ShardWriterConfig",
    "VideoDecodeError",
    "VideoInfo",
    "VideoItem",
    "VideoLoader",
    "build_dataloader",
    "decode_label",
    "dense_indices",
    "encode_video",
    "ensure_builtin_dataset",
    "expand_shards",
    "extract_frames",
    "label_accuracies",
    "load_class_index",
    "make_label",
    "nearest_stored",
    "open_video",
    "probe_video",
    "read_annotations",
    "read_shard_sizes",
    "reencode_video",
    "sample_indices",
    "stored_frame_indices",
    "uniform_indices",
    "write_class_index",
    "write_shards",
]
