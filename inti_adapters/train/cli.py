"""``inti-train`` and ``inti-eval``.

    inti-train --config k400_vitb16_inti [section.key=value ...] [--smoke]   (a built-in name or a YAML path)
    inti-eval  --config k400_vitb16_inti [--checkpoint runs/k400_vitb16_inti/final]
    inti-train --list-recipes

Options and ``section.key=value`` overrides go in any order. ``--smoke`` writes to
``<train.output_dir>.smoke``, never to the recipe's own output folder. A checkpoint whose folder
holds the backbone's weights is evaluated without downloading the pretrained ones.

``inti-train`` exits 0 when done, 75 when preempted by one of ``train.checkpoint_signals`` after a
complete checkpoint (run the same command again to resume; ``OUTPUT_DIR/PREEMPTED`` says which
checkpoint), 1 with one line for a run that cannot go on (a lost peer, a non-finite loss, another
run holding the output folder, a checkpoint that cannot be written or loaded) and 2 for a bad recipe.

Launch on GPUs with ``deepspeed --module inti_adapters.train --config ...`` (``--hostfile`` for
several nodes) or ``torchrun --nproc_per_node 8 -m inti_adapters.train --config ...``; on a CPU
machine ``inti-train`` alone runs a single gloo process.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

import torch

from .._io import pipe_safe
from ..flops import count_gflops
from ..recipes import describe_recipes
from .build import BackboneDownloadError, build_model, load_saved_model, mean_std_of
from .checkpoint import CheckpointError
from .config import ConfigError, data_with_defaults, help_text, load_config
from .distributed import setup_distributed
from .elastic import WorldSizeChangeError
from .engine import Trainer, data_value, deepspeed_config, real_data
from .evaluate import evaluate
from .failures import CheckpointWriteError, NonFiniteLossError, PeerLostError
from .runlock import RunLockedError
from .smoke import smoke_config, smoke_loader_factory

# what a training run can end in that says everything in its message: one line and exit status 1, no
# traceback (a preempted run leaves with its own status, 75, through SystemExit)
RUN_ERRORS = (PeerLostError, NonFiniteLossError, RunLockedError, CheckpointWriteError, CheckpointError,
              WorldSizeChangeError)


def _parser(prog: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--config", help="recipe: a built-in name (see --list-recipes) or a YAML file")
    p.add_argument("--list-recipes", action="store_true", help="list the built-in recipes and exit")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="override recipe values, e.g. optim.lr=1e-5 train.output_dir=runs/x")
    p.add_argument("--smoke", action="store_true",
                   help="tiny backbone of the same family + synthetic data, one step: checks a recipe runs")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--help-config", action="store_true", help="list every config key with its help and exit")
    # the deepspeed launcher appends --local_rank=N; the rank is read from the environment instead
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def _setup_logging() -> None:
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank {rank}] %(name)s: %(message)s", datefmt="%H:%M:%S")


_PACKAGE = Path(__file__).resolve().parents[1]


def raised_here(error: BaseException) -> bool:
    """True when ``error`` was raised by inti_adapters' own code (whose messages are written for the
    user: the file, the key, what to do), not inside torch or another library."""
    tb = error.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and Path(tb.tb_frame.f_code.co_filename).resolve().is_relative_to(_PACKAGE)


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Options and ``section.key=value`` overrides in any order (``--config R a.b=1 --json x c.d=2``)."""
    return parser.parse_intermixed_args(argv)


def _load(parser: argparse.ArgumentParser, args: argparse.Namespace):
    if args.help_config or args.list_recipes:
        print(help_text() if args.help_config else describe_recipes())
        raise SystemExit(0)
    if args.config is None:
        parser.error("--config is required (a built-in recipe such as digits_cpu, see --list-recipes, or a YAML file)")
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        parser.error(str(e))
    return smoke_config(cfg) if args.smoke else cfg


def _print_config(parser: argparse.ArgumentParser, cfg) -> int:
    """``--print-config``: the resolved recipe as YAML (the DeepSpeed JSON read now, so that its errors show)."""
    import yaml

    try:
        deepspeed_config(cfg.train, int(cfg.data.get("batch_size", 1)), cfg.train.grad_accum)
    except ConfigError as e:
        parser.error(str(e))
    print(yaml.safe_dump({**cfg.to_dict(), "data": data_with_defaults(cfg)}, sort_keys=False))  # data: defaults too
    return 0


@pipe_safe
def train_main(argv: list[str] | None = None) -> int:
    """Entry point of ``inti-train``."""
    parser = _parser("inti-train", "Train a video model with InTI / temporal adapters / LoRA under DeepSpeed.")
    args = parse_args(parser, argv)
    cfg = _load(parser, args)
    if args.print_config:
        return _print_config(parser, cfg)
    factory = smoke_loader_factory(cfg) if args.smoke else None
    _setup_logging()
    try:
        result = Trainer(cfg, loader_factory=factory).fit()
    except (BackboneDownloadError, *RUN_ERRORS) as e:  # one line: what went wrong, what to do
        parser.exit(1, f"inti-train: error: {e}\n")
    except ConfigError as e:
        parser.error(str(e))
    if int(os.environ.get("RANK", "0")) == 0:
        last = f", loss {result.history[-1][1]:.4f}" if result.history else ""
        val = f", val {result.eval.summary()}" if result.eval else ""
        print(f"inti-train: done at step {result.step}{last}{val}; adapter saved to {result.export_dir}")
    return 0


def _eval_model(cfg, num_classes: int, checkpoint: str | None, smoke: bool):
    """The model ``inti-eval`` scores: the saved adapter (+ backbone) or, with ``--smoke``, a fresh one."""
    if smoke:  # nothing was trained: a fresh tiny model checks the pipeline, seeded so that its figures repeat
        torch.manual_seed(cfg.train.seed)
        return build_model(cfg.model, num_classes)
    ckpt = checkpoint or cfg.eval.checkpoint or str(Path(cfg.train.output_dir).expanduser() / "final")
    model, backbone = load_saved_model(cfg.model, num_classes, ckpt)  # downloads nothing when ckpt holds the backbone
    return model, mean_std_of(cfg.model, backbone)


@pipe_safe
def eval_main(argv: list[str] | None = None) -> int:
    """Entry point of ``inti-eval``: multi-view top-1 / top-5 and GFLOPs per view."""
    parser = _parser("inti-eval", "Multi-view evaluation (frames×clips×crops views averaged as mmaction2's average_clips) of a saved adapter.")
    parser.add_argument("--checkpoint", help="directory written by save_pretrained (default: eval.checkpoint, "
                                             "else <train.output_dir>/final)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parse_args(parser, argv)
    cfg = _load(parser, args)
    if args.print_config:
        return _print_config(parser, cfg)
    _setup_logging()
    factory, data_cfg, num_classes = None, None, cfg.model.num_classes
    if args.smoke:
        factory = smoke_loader_factory(cfg)
    info = setup_distributed(cfg.train.backend, use_deepspeed=False)
    try:
        if factory is None:
            data = real_data(cfg, info)
            factory, data_cfg, num_classes = data.factory, data.data_config, num_classes or data.num_classes
        if not num_classes:
            raise ConfigError("model.num_classes is null and no built-in data set gives it; set model.num_classes")
        model, mean_std = _eval_model(cfg, num_classes, args.checkpoint, args.smoke)
        frames, size = data_value(cfg, data_cfg, "num_frames"), data_value(cfg, data_cfg, "crop_size")
    except BackboneDownloadError as e:  # one line: what was asked for and how to point at local weights
        parser.exit(1, f"inti-eval: error: {e}\n")
    except (ConfigError, FileNotFoundError) as e:
        parser.error(str(e))
    except ValueError as e:  # a damaged or mismatched checkpoint: one line naming the file
        parser.exit(1, f"inti-eval: error: {e}\n")
    model = model.to(info.device).eval()
    loader = factory(False, info.rank, info.world_size, 0)
    if loader is None:
        parser.error("the recipe has no evaluation data (data.val_shards)")
    bf16 = cfg.train.bf16 and info.device.type == "cuda"
    try:
        with torch.autocast(info.device.type, dtype=torch.bfloat16, enabled=bf16):
            view = torch.zeros(1, 3, frames, size, size, device=info.device)
            gflops = count_gflops(model, view) if cfg.eval.flops else None
            result = evaluate(model, loader, device=info.device, mean_std=mean_std,
                              clips_per_forward=cfg.eval.clips_per_forward, max_batches=cfg.eval.max_batches,
                              average_clips=cfg.eval.average_clips, num_crops=data_value(cfg, data_cfg, "num_crops", 1))
    except (RuntimeError, ValueError, OSError) as e:
        if not raised_here(e):  # a bug or a library's failure: its traceback is what helps
            raise
        parser.exit(1, f"inti-eval: error: {e}\n")  # e.g. a damaged shard: the message says which and what to do
    result.gflops_per_view = gflops
    if info.is_main:
        print(f"inti-eval: {result.summary()}")
        if args.json:  # views as frames×clips×crops, as mmaction2 writes them
            Path(args.json).write_text(json.dumps(result.to_dict(), indent=2, ensure_ascii=False) + "\n")
    return 0
