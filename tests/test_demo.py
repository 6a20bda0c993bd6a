"""The demo's variants reach the engine config as intended (a silent override slip would mislabel results)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from inti_adapters import demo

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from accuracy import VARIANTS as ACCURACY_VARIANTS  # noqa: E402


@pytest.mark.parametrize("name, spec", list(demo.VARIANTS.items()) + list(ACCURACY_VARIANTS.items()))
def test_variant_config_carries_every_option(name, spec, tmp_path):
    cfg = demo.variant_config(spec, checkpoint=tmp_path / "w.safetensors", data_root=tmp_path, run_dir=tmp_path / "r",
                              epochs=2, steps_per_epoch=7, lr=1e-3, seed=3)
    assert list(cfg.model.layers) == spec["layers"]
    assert cfg.model.compressor == spec.get("compressor", "inti")
    assert dict(cfg.model.compressor_config) == spec.get("compressor_config", {})
    assert [t["name"] for t in cfg.model.temporal] == [t["name"] for t in spec["temporal"]]
    assert (cfg.train.seed, cfg.train.epochs, cfg.train.steps_per_epoch, cfg.optim.lr) == (3, 2, 7, 1e-3)
    assert cfg.model.model_kwargs == demo.MODEL_KWARGS
