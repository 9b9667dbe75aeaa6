"""Every run config shipped in configs/ loads the way `fdfo/train.py --config` loads it, passes its model
family's option checks, divides into a valid epoch layout on the GPU counts a user would run it on, and
names a DeepSpeed JSON the engine accepts. The models themselves are hub ids: nothing is downloaded."""

from __future__ import annotations

from pathlib import Path

import pytest

from fdfo import algorithms
from fdfo.config import load_yaml
from fdfo.settings import build_config, check_family, with_overrides
from fdfo.engine import deepspeed_config, zero_stage
from fdfo.models import FAMILIES

ROOT = Path(__file__).resolve().parents[1]
# config file -> the family of its model.path (hub ids: their model_index.json is not read offline).
FAMILY = {"sd35_medium.yaml": "sd3", "sd35_large.yaml": "sd3", "flux1_dev.yaml": "flux"}
WORLD_SIZES = (1, 2, 4, 8, 16)
SHIPPED = sorted(p.name for p in (ROOT / "configs").glob("*.yaml"))


def test_every_shipped_config_is_listed_here():
    assert SHIPPED and set(SHIPPED) == set(FAMILY), "add the new config's model family to FAMILY"


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_config_builds_checks_and_divides(name, monkeypatch, capsys):
    from fdfo.train import main

    monkeypatch.chdir(ROOT)  # the configs name their DeepSpeed JSON relative to the repository
    path = f"configs/{name}"
    assert main(["--config", path, "--print-config"]) == 0, capsys.readouterr().err
    cfg = build_config(load_yaml(path))
    family = next(f for f in FAMILIES if f.family == FAMILY[name])
    check_family(cfg, family)  # no other family's keys, a backend the family applies
    algorithm = algorithms.get(cfg.train.algorithm)
    for world in WORLD_SIZES:
        layout = algorithm.layout_for(cfg, world)
        ds = deepspeed_config(cfg, layout, world)
        assert ds["train_batch_size"] == layout.micro_batch_rows * layout.grad_accum * world
        assert layout.elements_per_step % layout.micro_batch_rows == 0
    if cfg.deepspeed.config:
        assert Path(cfg.deepspeed.config).is_file()
    assert cfg.lora.enabled and cfg.lora.target_modules is None  # the family's own targets


def test_large_model_configs():
    """FLUX.1 [dev] and SD3.5 Large: ZeRO-3, gradient checkpointing, real CFG off; FLUX's distilled
    guidance is set where FLUX reads it, and the offload variant the SD3.5 Large config names exists."""
    flux = build_config(load_yaml(ROOT / "configs/flux1_dev.yaml"))
    assert flux.model.path == "black-forest-labs/FLUX.1-dev"
    assert (flux.model.resolution, flux.flux.guidance, flux.sampling.guidance_scale) == (512, 3.5, 1.0)
    assert flux.model.max_sequence_length <= 512  # FLUX's T5 limit
    large = build_config(load_yaml(ROOT / "configs/sd35_large.yaml"))
    assert large.model.path == "stabilityai/stable-diffusion-3.5-large" and large.flux.guidance == 3.5
    for cfg in (flux, large):
        assert cfg.deepspeed.config == "configs/ds/zero3.json" and cfg.train.gradient_checkpointing
        assert zero_stage(with_overrides(cfg, {"deepspeed": {"config": str(ROOT / cfg.deepspeed.config)}})) == 3
    assert "configs/ds/zero3_offload.json" in (ROOT / "configs/sd35_large.yaml").read_text()
    large = with_overrides(large, {"deepspeed": {"config": str(ROOT / "configs/ds/zero3_offload.json")}})
    ds = deepspeed_config(large, algorithms.get("fdfo").layout_for(large, 8), 8)
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"
