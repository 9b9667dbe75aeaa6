"""fdfo.timestep_fraction: FDFO trains on a drawn subset of each trajectory's stored steps per epoch."""

import random

import pytest
import torch

from fdfo import algorithms
from fdfo.algorithms.fdfo import trained_steps
from fdfo.errors import ConfigError
from fdfo.settings import build_config, with_overrides
from tests.test_train import QUIET, lora_weights, tiny_run


def test_layout_and_range():
    cfg = build_config({"sampling": {"steps": 10}, "train": {"micro_batch_rows": 4},
                        "fdfo": {"pairs_per_epoch": 8, "optimizer_steps_per_epoch": 2, "timestep_fraction": 0.5}})
    assert trained_steps(cfg) == 5
    assert algorithms.get("fdfo").layout_for(cfg, 1).elements_per_rank == 2 * 8 * 5
    assert trained_steps(with_overrides(cfg, {"fdfo": {"timestep_fraction": 0.01}})) == 1  # never zero
    with pytest.raises(ConfigError, match="'fdfo.timestep_fraction' is set .*, but train.algorithm is 'flow_grpo'"):
        build_config({"train": {"algorithm": "flow_grpo"}, "fdfo": {"timestep_fraction": 0.5}})
    for bad in (0.0, 1.5, -0.5):
        with pytest.raises(ConfigError, match="fdfo.timestep_fraction"):
            build_config({"fdfo": {"timestep_fraction": bad}})


def test_subsets_are_uniform_distinct_and_the_same_on_every_rank(tmp_path, tiny_pipeline_dir, digit_reward_dir):
    from fdfo.trainer import Trainer

    steps = random.choice([6, 8])
    cfg = tiny_run(tmp_path / "r", tiny_pipeline_dir, digit_reward_dir, **dict(
        QUIET, sampling={"steps": steps, "micro_batch_pairs": 2},
        train={"epochs": 1, "micro_batch_rows": 4},
        fdfo={"timestep_fraction": 0.5, "pairs_per_epoch": 4, "optimizer_steps_per_epoch": 2}))
    alg = Trainer(cfg).algorithm
    alg.settings = with_overrides(alg.cfg, {"fdfo": {"pairs_per_epoch": 4000}}).fdfo  # (the draw alone, for its statistics)
    table = alg._steps(3)
    K = steps // 2
    assert table.shape == (8000, K)
    assert all(len(set(row)) == K for row in table[:200].tolist())  # without replacement
    assert table.min() >= 0 and table.max() < steps
    counts = torch.bincount(table.flatten(), minlength=steps).double() / 8000
    # Each step is trained with probability K/T; binomial std sqrt(p(1-p)/n) ≈ 0.0056.
    torch.testing.assert_close(counts, torch.full((steps,), K / steps, dtype=torch.float64), rtol=0, atol=0.03)
    assert torch.equal(table, alg._steps(3)) and not torch.equal(table, alg._steps(4))  # seeded by (seed, epoch)


def test_each_element_is_the_full_paths_element_of_its_drawn_step(tmp_path, tiny_pipeline_dir, digit_reward_dir):
    """The subset path trains element (row, j) exactly as the full path trains (row, steps[row, j])."""
    from fdfo.trainer import Trainer

    cfg = tiny_run(tmp_path / "e", tiny_pipeline_dir, digit_reward_dir, **dict(
        QUIET, train={"epochs": 1, "micro_batch_rows": 2}, fdfo={"timestep_fraction": 0.5}))
    t = Trainer(cfg)
    batch = t.algorithm.sample(0)
    R, _ = t.reward(batch.prompts, batch.images)
    with torch.no_grad():  # move the policy off the sampling one: each element's loss then depends on its step
        for p in t.model.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.05)
    table = batch.data["steps"]
    T, K = cfg.sampling.steps, table.shape[1]
    ids = torch.randperm(table.numel())  # the subset path's elements (row, j), in a random order
    rows, j = ids // K, ids % K
    sub = t.algorithm.elements(batch, R, float(R.std()), ids)
    full = t.algorithm.elements(type(batch)(batch.prompts, batch.images, dict(batch.data, steps=None)), R,
                                float(R.std()), rows * T + table[rows, j])
    g = torch.Generator().manual_seed(random.randrange(1000))
    for _ in range(3):
        p = torch.randperm(ids.numel(), generator=g)[:2]
        with torch.no_grad():
            a, _ = sub(p)
            b, _ = full(p)
        assert float(a) == float(b)
    with torch.no_grad():  # (and the mapping matters: another step of the same rows gives another loss)
        assert float(full(torch.arange(2))[0]) != float(t.algorithm.elements(
            type(batch)(batch.prompts, batch.images, dict(batch.data, steps=None)), R, float(R.std()),
            rows[:2] * T + (table[rows[:2], j[:2]] + 1) % T)(torch.arange(2))[0])


def test_an_epoch_trains_on_half_the_steps(tmp_path, tiny_pipeline_dir, digit_reward_dir):
    from fdfo.trainer import Trainer

    cfg = tiny_run(tmp_path / "h", tiny_pipeline_dir, digit_reward_dir,
                   **dict(QUIET, train={"epochs": 1, "micro_batch_rows": 2}, fdfo={"timestep_fraction": 0.5}))
    t = Trainer(cfg)
    assert t.layout.elements_per_rank == 2 * cfg.fdfo.pairs_per_epoch * cfg.sampling.steps // 2
    before = lora_weights(t)
    t.run()
    after = lora_weights(t)
    assert any(not torch.equal(before[k], after[k]) for k in before)
