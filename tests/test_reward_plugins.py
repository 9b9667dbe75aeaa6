"""Rewards from outside the package (``reward.weights: {"module.path:Name": w}``): built from the spec with
the arguments they name, scored as the built-in reward models are, a clear error for every bad spec; and a
reward of any kind that gives the wrong number of scores is an error naming it."""

from __future__ import annotations

import random

import pytest
import torch

from fdfo.config import parse_overrides
from fdfo.errors import ConfigError
from fdfo.rewards import WeightedReward, build_reward, build_weighted_reward
from fdfo.rewards.base import FrozenRewardModel
from fdfo.settings import build_config
from fdfo.tasks.digits import PRESET as DIGITS
from fdfo.tasks.digits.data import DIGIT_PROMPTS
from tests.test_train import QUIET, tiny_run

SPEC = "tests.test_reward_plugins:Brightness"


class Brightness:
    """A reward defined here: each image's mean brightness, plus 0.01 per prompt character. Records how it
    was built and every chunk it scored (in ``BUILT`` and ``self.scored``)."""

    BUILT: list = []

    def __init__(self, device="cpu", batch_size=None, path=None):
        self.device, self.batch_size, self.path = torch.device(device), batch_size, path
        self.scored: list[tuple[torch.Tensor, torch.Tensor]] = []
        Brightness.BUILT.append(self)

    def __call__(self, prompts, images):
        assert images.device == self.device
        scores = images.double().flatten(1).mean(1) + torch.tensor([len(p) for p in prompts]) / 100  # float64
        self.scored.append((images.detach().cpu().clone(), scores.clone()))
        return scores


def every_option(**options):
    """A factory that takes ``**options``: it is given every argument a reward factory gets."""
    every_option.given = options
    return lambda prompts, images: images.flatten(1).sum(1)


def scoring_function(prompts, images):  # (a scoring function is not a factory: it needs prompts and images)
    return images.flatten(1).sum(1)


class NeedsThreshold:
    def __init__(self, threshold, device="cpu"):
        self.threshold = threshold


def not_a_reward(device="cpu"):
    return 3.0


def wrong_count(batch_size=None):
    return lambda prompts, images: torch.zeros(len(prompts) - 1)


def a_list(batch_size=None):
    return lambda prompts, images: [0.0] * len(prompts)


NOT_CALLABLE = 42


def random_images(n: int, size: int = 16, seed: int | None = None) -> torch.Tensor:
    gen = torch.Generator().manual_seed(random.randrange(2**31) if seed is None else seed)
    return torch.rand(n, 3, size, size, generator=gen)


def random_prompts(n: int) -> list[str]:
    return [random.choice(DIGIT_PROMPTS) for _ in range(n)]


# --------------------------------------------------------------------------- a reward of your own


def test_an_outside_reward_trains_one_epoch(tmp_path, tiny_pipeline_dir):
    """The tiny job trained on a reward defined in this file: built once with the run's device and batch
    size, fed chunks of at most the batch size, and the epoch's logged reward is the mean of its scores."""
    from fdfo.trainer import Trainer

    Brightness.BUILT.clear()
    batch_size = random.choice([2, 3, 5])
    t = Trainer(tiny_run(tmp_path / "run", tiny_pipeline_dir, None, reward={"weights": {SPEC: 1.0}, "paths": {},
                                                                            "batch_size": batch_size},
                         train={"epochs": 1}, sampling={"steps": 2},
                         fdfo={"pairs_per_epoch": 2, "optimizer_steps_per_epoch": 1}, **QUIET))
    (reward,) = Brightness.BUILT
    assert (reward.device, reward.batch_size, reward.path) == (t.device, batch_size, None)
    before = {k: v.clone() for k, v in t.model.lora_state_dict().items()}
    record = t.train_epoch(0)
    assert reward.scored and all(images.shape[0] <= batch_size for images, _ in reward.scored)
    scores = torch.cat([s for _, s in reward.scored]).float()
    assert scores.numel() == t.layout.rows_per_rank
    assert record["reward_mean"] == pytest.approx(float(scores.double().mean()), rel=1e-6)
    assert record[f"reward/{SPEC}"] == pytest.approx(float(scores.mean()), rel=1e-6)
    after = t.model.lora_state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before), "the epoch did not train"


def test_the_example_reward_scores_the_digits_job():
    """examples/my_reward.py passes the digits job's config checks and scores the standard deviation of each
    image's grey values (the formula written out here), in chunks, float32, NaN for a broken image."""
    spec = "examples.my_reward:Contrast"
    cfg = build_config(DIGITS, parse_overrides(["--reward.weights", f'{{"{spec}": 1.0}}']))
    assert cfg.reward.weights == {spec: 1.0}
    n = random.randint(5, 13)
    images = random_images(n)
    images[n // 2, 1, 3, 4] = float("nan")
    reward = build_reward(spec, None, "cpu", batch_size=random.randint(1, 4))
    got = reward(random_prompts(n), images)
    want = images.mean(dim=1).flatten(1).std(dim=1)
    assert got.dtype == torch.float32 and got.shape == (n,)
    assert torch.isnan(got[n // 2])
    keep = torch.arange(n) != n // 2
    torch.testing.assert_close(got[keep], want[keep], rtol=1e-6, atol=1e-7)
    assert float(got[keep].min()) > 0.1  # uniform noise: the grey values (means of 3) have std 1/6


def test_an_outside_reward_is_chunked_and_given_the_arguments_it_names():
    Brightness.BUILT.clear()
    n, batch_size = random.randint(6, 15), random.randint(1, 5)
    prompts, images = random_prompts(n), random_images(n)
    reward = build_reward(SPEC, "some/dir", "cpu", batch_size=batch_size)
    got = reward(prompts, images)
    (built,) = Brightness.BUILT
    assert (built.path, built.batch_size) == ("some/dir", batch_size)
    assert [im.shape[0] for im, _ in built.scored] == [min(batch_size, n - i) for i in range(0, n, batch_size)]
    want = images.double().flatten(1).mean(1) + torch.tensor([len(p) for p in prompts]) / 100
    assert torch.equal(got, want.float())

    build_reward("tests.test_reward_plugins:every_option", "p", "cpu", "cache", batch_size=batch_size)
    assert every_option.given == {"path": "p", "cache_dir": "cache", "device": "cpu", "batch_size": batch_size}


@pytest.mark.parametrize("spec, match", [
    ("no_such_module_for_fdfo:Reward", r"module 'no_such_module_for_fdfo' does not import .*PYTHONPATH"),
    ("tests.test_reward_plugins:Missing", r"'tests\.test_reward_plugins' has no 'Missing'"),
    ("tests.test_reward_plugins:NOT_CALLABLE", r"is not a class or factory but a int"),
    ("tests.test_reward_plugins:NeedsThreshold", r"needs argument 'threshold'.*give it a default"),
    ("tests.test_reward_plugins:scoring_function", r"needs argument 'prompts'"),
    ("tests/test_reward_plugins.py:Brightness", r"must look like module\.path:Name"),
])
def test_a_bad_spec_is_a_one_line_config_error(spec, match):
    for key, override in (("reward.weights", ["--reward.weights", f'{{"{spec}": 1.0}}']),
                          ("eval.metrics", ["--eval.metrics", f'["{spec}"]'])):
        with pytest.raises(ConfigError, match=rf"^config key '{key}' names reward '{spec}'.*{match}") as info:
            build_config(DIGITS, parse_overrides(override))
        assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match=match):
        build_reward(spec, None, "cpu", batch_size=2)


def test_a_factory_that_gives_no_reward_is_a_config_error():
    with pytest.raises(ConfigError, match=r"reward 'tests\.test_reward_plugins:not_a_reward' returned a float, "
                                          r"which is not a reward"):
        build_reward("tests.test_reward_plugins:not_a_reward", None, "cpu", batch_size=2)


# --------------------------------------------------------------------------- one score per image, or an error


@pytest.mark.parametrize("spec, error, match", [
    ("tests.test_reward_plugins:wrong_count", ValueError, r"returned scores of shape \((\d+),\) for (\d+) images"),
    ("tests.test_reward_plugins:a_list", TypeError, r"returned a list; a reward returns a tensor \[B\]"),
])
def test_an_outside_reward_with_the_wrong_scores_is_an_error_naming_it(spec, error, match):
    n = random.randint(3, 9)
    reward = build_weighted_reward({spec: 1.0}, {}, torch.device("cpu"), options={spec: {"batch_size": n}})
    with pytest.raises(error, match=rf"^reward '{spec}' {match}"):
        reward(random_prompts(n), random_images(n))


def test_a_built_in_reward_or_a_registry_one_with_the_wrong_count_is_an_error_naming_it():
    class Broken(FrozenRewardModel):
        name = "broken_model"

        def _score_batch(self, prompts, images):
            return torch.zeros(1)  # (would broadcast into the chunk's scores without the check)

    n = random.randint(2, 7)
    with pytest.raises(ValueError, match=rf"^reward 'broken_model' returned scores of shape \(1,\) for {n} images"):
        Broken("cpu", None, n)(random_prompts(n), random_images(n))
    weighted = WeightedReward({"fine": (1.0, lambda p, im: torch.ones(len(p))),
                               "scalar": (0.5, lambda p, im: torch.tensor(1.0))})
    with pytest.raises(ValueError, match=rf"^reward 'scalar' returned scores of shape \(\) for {n} images"):
        weighted(random_prompts(n), random_images(n))
