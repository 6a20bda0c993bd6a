"""``inti-export``: a saved adapter (a folder or a Hub id) as a ``torch.export`` program or ONNX.

    inti-export --config k400_vitb16_inti --checkpoint runs/k400_vitb16_inti/final --out k400.onnx
    inti-export --config digits_cpu --checkpoint org/inti-digits --revision v2 --out digits.pt2 model.num_classes=40

The recipe gives the backbone (created as ``inti-eval`` does) and the input: ``data.num_frames``
frames of ``data.crop_size``. The suffix of ``--out`` picks the format: ``.pt2``
(``torch.export.save``; load it with ``inti_adapters.load_program``, which checks each video's shape
first, or ``torch.export.load``) or ``.onnx``. The batch size stays dynamic; LoRA is merged into the
weights; the result is checked against the eager model (``--no-check`` skips it). Either file appears
at ``--out`` only once it is completely written.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from .._io import pipe_safe
from ..export import ExportError, export_onnx, export_program
from .build import BackboneDownloadError, load_saved_model
from .config import ConfigError, load_config


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="inti-export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="recipe: a built-in name (inti-train --list-recipes) or a YAML file")
    p.add_argument("--checkpoint", required=True, help="folder written by save_pretrained, or a Hub id 'org/name'")
    p.add_argument("--revision", help="Hub revision (branch, tag or commit) of --checkpoint")
    p.add_argument("--out", required=True, help="output file: .pt2 (torch.export) or .onnx")
    p.add_argument("--batch", type=int, default=2, help="batch size of the example input (the batch stays dynamic)")
    p.add_argument("--static-batch", action="store_true", help="fix the batch size to --batch")
    p.add_argument("--no-check", action="store_true", help="skip the comparison with the eager model")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="override recipe values")
    return p


def _model_and_video(args: argparse.Namespace) -> tuple[torch.nn.Module, torch.Tensor]:
    cfg = load_config(args.config, args.overrides)
    if not cfg.model.num_classes:
        raise ConfigError("model.num_classes is needed to create the backbone: add model.num_classes=K")
    missing = [k for k in ("num_frames", "crop_size") if k not in cfg.data]
    if missing:
        raise ConfigError(f"the recipe has no data.{missing[0]}: add data.{missing[0]}=N (the example input)")
    # a checkpoint that holds the backbone's weights (full fine-tuning) builds it without downloading
    model, _ = load_saved_model(cfg.model, cfg.model.num_classes, args.checkpoint, revision=args.revision)
    size = int(cfg.data["crop_size"])
    return model, torch.randn(args.batch, 3, int(cfg.data["num_frames"]), size, size)


@pipe_safe
def export_main(argv: list[str] | None = None) -> int:
    """Entry point of ``inti-export``."""
    parser = _parser()
    args = parser.parse_intermixed_args(argv)  # options and key=value overrides in any order
    out = Path(args.out)
    if out.suffix not in (".pt2", ".onnx"):
        parser.error(f"--out must end in .pt2 (torch.export) or .onnx, got {out.name!r}")
    try:
        model, video = _model_and_video(args)
        program = export_program(model, video, dynamic_batch=not args.static_batch, check=not args.no_check)
        if out.suffix == ".onnx":
            export_onnx(program, video, out, check=not args.no_check)
        else:
            out.parent.mkdir(parents=True, exist_ok=True)
            staged = out.with_name(f".{out.stem}.{os.getpid()}.partial.pt2")  # an interrupted save leaves no .pt2
            try:
                torch.export.save(program, str(staged))
                os.replace(staged, out)
            finally:
                staged.unlink(missing_ok=True)
    except BackboneDownloadError as e:  # one line: what was asked for and how to point at local weights
        parser.exit(1, f"inti-export: error: {e}\n")
    except (ConfigError, FileNotFoundError, ExportError, ImportError) as e:
        parser.error(str(e))
    except ValueError as e:  # a damaged or mismatched checkpoint: one line naming the file
        parser.exit(1, f"inti-export: error: {e}\n")
    batch = "static" if args.static_batch else "dynamic"
    checked = "" if args.no_check else ", checked against the eager model"
    print(f"inti-export: wrote {out} (input {tuple(video.shape[1:])} per video, {batch} batch{checked})")
    if out.suffix == ".pt2":  # torch.export.load reads it too; this loader checks each video's shape first
        print(f"inti-export: load it with inti_adapters.load_program({str(out)!r})")
    return 0
