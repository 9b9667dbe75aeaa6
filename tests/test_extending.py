"""A new algorithm is its own file plus one registry line: a stand-in algorithm, written here and
registered from this file alone, gets its config section, its checks, its --help lines and a trained
epoch through the unchanged trainer. And an algorithm runs without any process group."""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass, field

import pytest
import torch

from fdfo import algorithms
from fdfo.algorithms.fdfo import FDFO
from fdfo.config import above, check
from fdfo.errors import ConfigError
from fdfo.reference import help_text, markdown
from fdfo.settings import build_config
from tests.test_train import QUIET, lora_weights, tiny_run


@dataclass(frozen=True)
class StandInSettings:
    """A stand-in algorithm's settings."""

    pairs_per_epoch: int = field(default=6, metadata=check(above(0)))  # pairs per epoch
    optimizer_steps_per_epoch: int = 2  # optimizer steps per epoch
    clip_range: float = 0.5  # the trust region
    kl_weight: float = 0.0  # no KL term
    timestep_fraction: float = 1.0  # every stored step
    marker: str = "stand-in"  # a key no other part has


class StandIn(FDFO):
    """FDFO's maths under another name, reading its own section: the trainer is told nothing."""

    name = "stand_in"
    Settings = StandInSettings


@pytest.fixture
def stand_in(monkeypatch):
    monkeypatch.setitem(algorithms.ALGORITHMS, StandIn.name, StandIn)  # the one registry line
    return StandIn


def test_a_registered_algorithm_brings_its_section_and_checks(stand_in):
    cfg = build_config({"train": {"algorithm": "stand_in", "micro_batch_rows": 4},
                        "stand_in": {"marker": "mine", "pairs_per_epoch": 4}})
    assert cfg.stand_in == StandInSettings(pairs_per_epoch=4, marker="mine")
    assert stand_in.layout_for(cfg, 2).rows_per_rank == 4  # its own pairs_per_epoch, not fdfo's 432
    with pytest.raises(ConfigError, match=r"'stand_in\.pairs_per_epoch' must be positive, got 0"):
        build_config({"train": {"algorithm": "stand_in"}, "stand_in": {"pairs_per_epoch": 0}})
    with pytest.raises(ConfigError, match=r"'stand_in\.marker' is set \('mine'\), but train\.algorithm is 'fdfo'"):
        build_config({"stand_in": {"marker": "mine"}})
    with pytest.raises(ConfigError, match=r"'fdfo\.clip_range' is set \(0\.1\), but train\.algorithm is 'stand_in'"):
        build_config({"train": {"algorithm": "stand_in"}, "fdfo": {"clip_range": 0.1}})
    assert "--stand_in.marker  str, default stand-in" in help_text() and "## `stand_in`" in markdown()


def test_without_the_registry_line_the_section_is_unknown():
    with pytest.raises(ConfigError, match=r"unknown config key 'stand_in'"):
        build_config({"stand_in": {"marker": "mine"}})
    with pytest.raises(ConfigError, match=r"'train\.algorithm' is 'stand_in'; valid values: fdfo, flow_grpo"):
        build_config({"train": {"algorithm": "stand_in"}})


def test_the_unchanged_trainer_trains_the_stand_in(stand_in, tmp_path, tiny_pipeline_dir, digit_reward_dir):
    from fdfo.trainer import Trainer

    pairs = random.choice([2, 4])
    cfg = tiny_run(tmp_path / "s", tiny_pipeline_dir, digit_reward_dir, train={"algorithm": "stand_in", "epochs": 1},
                   stand_in={"pairs_per_epoch": pairs, "optimizer_steps_per_epoch": 2}, **QUIET)
    t = Trainer(cfg)
    assert type(t.algorithm) is StandIn and t.layout.rows_per_rank == 2 * pairs
    before = lora_weights(t)
    record = t.train_epoch(0)
    assert record["images_sampled"] == 2 * pairs and record["grad_norm"] > 0
    assert any(not torch.equal(before[k], v) for k, v in lora_weights(t).items())


def test_an_algorithm_samples_without_a_process_group(tiny_pipeline_dir, monkeypatch):
    """The run context replaces every question to the process group: FDFO samples with a local context
    (fdfo.distributed is never asked for a rank), and its samples follow the context's seed."""
    from fdfo import distributed
    from fdfo.algorithms.base import Policy
    from fdfo.context import RunContext
    from fdfo.models import load_flow_model

    cfg = build_config({"model": {"path": str(tiny_pipeline_dir), "resolution": 16, "max_sequence_length": 16},
                        "sampling": {"steps": 3, "micro_batch_pairs": 2},
                        "fdfo": {"pairs_per_epoch": 2, "optimizer_steps_per_epoch": 1},
                        "train": {"micro_batch_rows": 4}, "reward": {"weights": {"digit_probability": 1.0}},
                        "eval": {"every": 0}})
    model = load_flow_model(cfg.model, torch.device("cpu"), progress=False)

    class NoEngine:  # the policy samples from the model itself
        inference_weights = staticmethod(contextlib.nullcontext)

    def images(seed: int) -> torch.Tensor:
        policy = Policy(cfg, model, NoEngine(), RunContext.local(seed=seed))
        return FDFO(cfg, policy, ["a digit"], FDFO.layout_for(cfg, 1)).sample(0).images

    def asked(*args, **kwargs):
        raise AssertionError("an algorithm asked the process group instead of its run context")

    for name in ("rank", "world_size", "init"):
        monkeypatch.setattr(distributed, name, asked)
    seed = random.randrange(1000)
    first = images(seed)
    assert first.shape[0] == 4 and torch.equal(images(seed), first)
    assert not torch.equal(images(seed + 1), first)
