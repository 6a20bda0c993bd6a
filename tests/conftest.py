"""Shared fixtures: tiny real timm models of every supported host variant; the grouping of tests for
``pytest -n 2`` (pytest-xdist, ``--dist loadgroup``; what ``make test`` runs)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from timm.models.beit import Beit
from timm.models.deit import VisionTransformerDistilled
from timm.models.eva import Eva
from timm.models.vision_transformer import VisionTransformer

IMG = 32
TINY = dict(img_size=IMG, patch_size=8, embed_dim=32, depth=4, num_heads=2, num_classes=5)

# every timm host variant the core issue names; each is (constructor, kwargs)
VARIANTS = {
    "cls": (VisionTransformer, {}),
    "distilled": (VisionTransformerDistilled, {}),
    "registers": (VisionTransformer, dict(reg_tokens=4)),
    "no_cls_avg": (VisionTransformer, dict(class_token=False, global_pool="avg")),
    "no_cls_avg_registers": (VisionTransformer, dict(class_token=False, global_pool="avg", reg_tokens=2)),
    "map": (VisionTransformer, dict(global_pool="map")),
    "no_embed_class": (VisionTransformer, dict(no_embed_class=True)),
    "dynamic_img_size": (VisionTransformer, dict(dynamic_img_size=True)),
    "deit3": (VisionTransformer, dict(no_embed_class=True, init_values=1e-6)),
    "clip_style": (VisionTransformer, dict(pre_norm=True, norm_layer=None)),
    "eva": (Eva, dict(use_rot_pos_emb=True, ref_feat_shape=(4, 4))),
    "beit": (Beit, dict(use_rel_pos_bias=True, use_abs_pos_emb=False)),
}


def make_vit(variant: str = "cls", seed: int = 0, **overrides) -> torch.nn.Module:
    """A tiny, randomly initialised timm model of the given variant, in eval mode."""
    cls, extra = VARIANTS[variant]
    kwargs = {**TINY, **extra, **overrides}
    if kwargs.get("norm_layer", 1) is None:
        kwargs.pop("norm_layer")
    torch.manual_seed(seed)
    model = cls(**kwargs).eval()
    # random heads/biases so that nothing is trivially zero
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1 and torch.count_nonzero(p) == 0:
                p.normal_(0, 0.02)
    return model


def static_video(batch: int = 2, frames: int = 4, size: int = IMG, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """A (B, 3, T, H, W) video whose frames are all equal, and the frame itself."""
    g = torch.Generator().manual_seed(seed)
    frame = torch.randn(batch, 3, size, size, generator=g)
    return frame[:, :, None].expand(-1, -1, frames, -1, -1).contiguous(), frame


@pytest.fixture
def vit():
    return make_vit("cls")


def read_tar_samples(shards: list[str]) -> list[dict]:
    """Every sample of the shards as ``{ext: bytes, "__key__": key}``, in order (tarfile, no webdataset)."""
    import tarfile

    out = []
    for path in shards:
        with tarfile.open(path) as tar:
            members: dict[str, dict] = {}
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                members.setdefault(key, {})[ext] = tar.extractfile(m).read()
            out += [dict(v, __key__=k) for k, v in members.items()]
    return out


# Modules whose tests launch several processes and bound how long a peer may take run one after another in
# two groups: the network-namespace hosts (one bridge and address range) and the torchrun ones on this host.
PROCESS_GROUPS = {"test_cluster_multinode": "namespaces", "test_cluster_slurm": "namespaces",
                  "test_train_resilience": "torchrun", "test_faults": "torchrun", "test_train_distributed": "torchrun",
                  "test_eval_mmaction": "torchrun"}

if os.environ.get("PYTEST_XDIST_WORKER"):  # a worker of `pytest -n 2`: one core each, as the CPU has two
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # what launched processes inherit
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")  # no pool of compile processes per worker


def pytest_collection_modifyitems(config, items):
    """Under ``pytest -n N --dist loadgroup`` each module runs whole on one worker (its module fixtures are built
    once), and the multi-process modules share their group; without xdist the marks do nothing."""
    for item in items:
        module = Path(str(item.fspath)).stem
        item.add_marker(pytest.mark.xdist_group(PROCESS_GROUPS.get(module, module)))
