"""Training at scale: typed recipes, the DeepSpeed engine, checkpoints, multi-view evaluation.

    >>> from inti_adapters.train import load_config, train
    >>> cfg = load_config("digits_cpu", ["train.epochs=1"])   # a built-in recipe by name  # doctest: +SKIP
    >>> result = train(cfg)                                                # doctest: +SKIP

Command line: ``inti-train`` / ``inti-eval`` (see :mod:`inti_adapters.train.cli`). DeepSpeed is
imported only when training starts. A run stopped by a checkpoint signal (``train.checkpoint_signals``)
exits with :data:`PREEMPTED_EXIT_CODE` (75) after a complete checkpoint: run the same command again.
"""

from .build import build_model, create_backbone, load_backbone_weights, read_state_dict
from .checkpoint import CheckpointManager, consolidated_state_dict, export_adapter
from .config import (
    Config,
    ConfigError,
    EvalConfig,
    ModelConfig,
    OptimConfig,
    TrainLoopConfig,
    load_config,
)
from .engine import Trainer, TrainResult, deepspeed_config, train
from .evaluate import EvalResult, evaluate, topk_correct
from .failures import CheckpointWriteError, NonFiniteLossError, PeerLostError
from .optim import WarmupCosine, build_optimizer, build_scheduler, param_groups
from .preemption import PREEMPTED_EXIT_CODE, Preempted
from .runlock import RunLockedError
from .synthetic import SyntheticVideoLoader

__all__ = [
    "PREEMPTED_EXIT_CODE",
    "CheckpointManager",
    "CheckpointWriteError",
    "Config",
    "ConfigError",
    "EvalConfig",
    "EvalResult",
    "ModelConfig",
    "NonFiniteLossError",
    "OptimConfig",
    "PeerLostError",
    "Preempted",
    "RunLockedError",
    "SyntheticVideoLoader",
    "TrainLoopConfig",
    "TrainResult",
    "Trainer",
    "WarmupCosine",
    "build_model",
    "build_optimizer",
    "build_scheduler",
    "consolidated_state_dict",
    "create_backbone",
    "deepspeed_config",
    "evaluate",
    "export_adapter",
    "load_backbone_weights",
    "load_config",
    "param_groups",
    "read_state_dict",
    "topk_correct",
    "train",
]
