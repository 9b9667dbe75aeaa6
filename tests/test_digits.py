"""Tests of the digits task: data, prompts, reward-model training, save/load and the rewards."""

from __future__ import annotations

import json
import secrets

import pytest
import torch

from fdfo.tasks.digits.data import DIGIT_PROMPTS, DIGIT_WORDS, DigitData, digit_prompt, load_digits, parse_digit
from fdfo.tasks.digits.reward_models import (
    DigitClassifier, DigitJudge, accuracy, build_reward_models, load_module, save_module, train_classifier, train_judge,
)
from fdfo.tasks.digits.rewards import DigitJudgeAccuracy, DigitProbabilityReward

QUICK_STEPS = 250  # enough for ~95% test accuracy in a few seconds


@pytest.fixture(scope="module")
def data() -> DigitData:
    return load_digits(16)


@pytest.fixture(scope="module")
def classifier(data: DigitData) -> DigitClassifier:
    return train_classifier(data, steps=QUICK_STEPS, seed=0, progress=False)


@pytest.fixture(scope="module")
def judge(data: DigitData) -> DigitJudge:
    return train_judge(data, seed=0)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("digit_rewards")
    build_reward_models(out, seed=0, progress=False, classifier_steps=QUICK_STEPS)
    return out


@pytest.fixture()
def rng() -> torch.Generator:
    """Fresh random sample choices on every run (the seed is printed on failure)."""
    seed = secrets.randbelow(2**31)  # torch's global RNG starts from a fixed seed
    print(f"sample seed {seed}")
    return torch.Generator().manual_seed(seed)


def test_data_shapes_ranges_and_labels(data: DigitData) -> None:
    assert data.train_images.shape == (4000, 1, 16, 16) and data.test_images.shape == (1000, 1, 16, 16)
    assert data.train_images.dtype == torch.float32 and data.train_labels.dtype == torch.int64
    for images in (data.train_images, data.test_images):
        assert images.min() >= 0.0 and images.max() <= 1.0 and images.max() > 0.99
        assert 0.05 < images.mean() < 0.3  # mostly black background, white strokes
    assert torch.bincount(data.train_labels, minlength=10).tolist() == [400] * 10
    assert torch.bincount(data.test_labels, minlength=10).tolist() == [100] * 10
    assert load_digits(8).test_images.shape == (1000, 1, 8, 8)


def test_prompts_and_parse_digit() -> None:
    assert len(DIGIT_PROMPTS) == 10 and digit_prompt(7) == "a handwritten digit seven"
    assert [parse_digit(p) for p in DIGIT_PROMPTS] == list(range(10))
    assert parse_digit("A drawing of the number NINE.") == 9
    assert parse_digit("one, just one") == 1  # the same word twice is unambiguous
    assert parse_digit("someone wrote a three") == 3  # whole words only
    for bad in ("a handwritten digit", "someone", "a seven or a one", "7"):
        with pytest.raises(ValueError, match="zero, one, two") as err:
            parse_digit(bad)
        assert repr(bad) in str(err.value)
    with pytest.raises(ValueError):
        digit_prompt(10)
    assert DIGIT_WORDS[parse_digit(digit_prompt(4))] == "four"


def test_classifier_accuracy(data: DigitData, classifier: DigitClassifier) -> None:
    assert classifier(data.test_images[:3]).shape == (3, 10)
    assert accuracy(classifier, data.test_images, data.test_labels) >= 0.90


def test_classifier_training_is_deterministic(data: DigitData) -> None:
    threads, rng_state = torch.get_num_threads(), torch.get_rng_state()
    a, b = (train_classifier(data, steps=5, seed=3, progress=False) for _ in range(2))
    c = train_classifier(data, steps=5, seed=4, progress=False)
    for (name, pa), pb, pc in zip(a.state_dict().items(), b.state_dict().values(), c.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert not all(torch.equal(pa, pc) for pa, pc in zip(a.state_dict().values(), c.state_dict().values()))
    assert torch.get_num_threads() == threads and torch.equal(torch.get_rng_state(), rng_state)


def test_judge_accuracy(data: DigitData, judge: DigitJudge) -> None:
    acc = accuracy(judge, data.test_images, data.test_labels)
    assert 0.80 <= acc <= 0.97
    assert torch.equal(train_judge(data, seed=0).linear.weight, judge.linear.weight)


def test_save_load_round_trip(tmp_path, data: DigitData, classifier: DigitClassifier, judge: DigitJudge) -> None:
    x = data.test_images[:32]
    for name, model in (("c.safetensors", classifier), ("j.safetensors", judge)):
        save_module(model, tmp_path / name, {"test_accuracy": 0.5})
        loaded = load_module(tmp_path / name)
        assert type(loaded) is type(model) and not loaded.training
        assert not any(p.requires_grad for p in loaded.parameters())
        assert torch.equal(loaded(x), model(x).detach())
        assert json.loads((tmp_path / name).with_suffix(".json").read_text())["test_accuracy"] == 0.5
    assert not list(tmp_path.glob("*.tmp"))


def test_build_reward_models_writes_summary(model_dir) -> None:
    summary = json.loads((model_dir / "reward_models.json").read_text())
    assert summary["seed"] == 0
    assert summary["classifier_test_accuracy"] >= 0.90 and summary["judge_test_accuracy"] >= 0.80
    assert {p.name for p in model_dir.iterdir()} == {
        "classifier.safetensors", "classifier.json", "judge.safetensors", "judge.json", "reward_models.json"}


def _sample(data: DigitData, rng: torch.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    idx = torch.randperm(len(data.test_labels), generator=rng)[:n]
    return data.test_images[idx], data.test_labels[idx]


def test_probability_reward_on_real_digits(model_dir, data: DigitData, rng: torch.Generator) -> None:
    reward = DigitProbabilityReward(model_dir)
    images, labels = _sample(data, rng, 200)
    right = reward.score([digit_prompt(int(k)) for k in labels], images)
    wrong = reward.score([digit_prompt((int(k) + 1 + int(torch.randint(0, 9, (), generator=rng))) % 10)
                          for k in labels], images)
    for s in (right, wrong):
        assert s.shape == (200,) and s.dtype == torch.float32 and s.min() >= 0.0 and s.max() <= 1.0
    assert right.mean() > 0.8 and wrong.mean() < 0.2
    # All ten prompts together sum to one per image: it is a probability.
    total = sum(reward.score([p] * 8, images[:8]) for p in DIGIT_PROMPTS)
    torch.testing.assert_close(total, torch.ones(8), atol=1e-5, rtol=0)


def test_rewards_accept_rgb_and_other_sizes(model_dir, data: DigitData, rng: torch.Generator) -> None:
    reward = DigitProbabilityReward(model_dir)
    images, labels = _sample(data, rng, 16)
    prompts = [digit_prompt(int(k)) for k in labels]
    base = reward.score(prompts, images)
    torch.testing.assert_close(reward.score(prompts, images.expand(-1, 3, -1, -1)), base)
    upsampled = images.repeat_interleave(2, dim=-1).repeat_interleave(2, dim=-2)  # [B,1,32,32]
    torch.testing.assert_close(reward.score(prompts, upsampled), base)  # area pooling undoes it exactly
    with pytest.raises(ValueError, match="prompts"):
        reward.score(prompts[:-1], images)


@pytest.mark.parametrize("cls", [DigitProbabilityReward, DigitJudgeAccuracy])
def test_rewards_are_batch_invariant(model_dir, data: DigitData, rng: torch.Generator, cls) -> None:
    reward = cls(model_dir)
    images, labels = _sample(data, rng, 4)
    images = (images + 0.3 * torch.rand(images.shape, generator=rng)).clamp(0, 1)  # off the data manifold too
    prompts = [DIGIT_PROMPTS[int(k)] for k in torch.randint(0, 10, (4,), generator=rng)]
    batched = reward.score(prompts, images)
    single = torch.cat([reward.score([p], x[None]) for p, x in zip(prompts, images)])
    torch.testing.assert_close(batched, single, atol=1e-6, rtol=0)


def test_judge_reward_matches_judge_accuracy(model_dir, data: DigitData) -> None:
    reward = DigitJudgeAccuracy(model_dir)
    scores = reward.score([digit_prompt(int(k)) for k in data.test_labels], data.test_images)
    assert set(scores.unique().tolist()) <= {0.0, 1.0}
    expected = json.loads((model_dir / "reward_models.json").read_text())["judge_test_accuracy"]
    assert abs(scores.mean().item() - expected) < 1e-3


def test_missing_reward_models_raise(tmp_path) -> None:
    for cls in (DigitProbabilityReward, DigitJudgeAccuracy):
        with pytest.raises(FileNotFoundError, match="build_reward_models") as err:
            cls(tmp_path / "nowhere")
        assert "nowhere" in str(err.value)


@pytest.mark.parametrize("cls", [DigitProbabilityReward, DigitJudgeAccuracy])
def test_rewards_score_in_batches_of_batch_size(model_dir, data: DigitData, rng: torch.Generator, cls) -> None:
    reward = cls(model_dir, batch_size=3)
    seen = []
    reward.model.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[0]))
    images, labels = _sample(data, rng, 10)
    prompts = [digit_prompt(int(k)) for k in labels]
    scores = reward(prompts, images)
    assert seen == [3, 3, 3, 1]
    torch.testing.assert_close(scores, cls(model_dir, batch_size=256)(prompts, images), atol=1e-6, rtol=0)


def test_broken_image_scores_nan_and_leaves_the_others(model_dir, data: DigitData) -> None:
    images = data.test_images[:4].clone()
    prompts = [digit_prompt(int(k)) for k in data.test_labels[:4]]
    images[1, 0, 5, 5] = float("inf")  # clamping would have hidden it
    images[2, 0, 0, 0] = float("nan")
    for cls in (DigitProbabilityReward, DigitJudgeAccuracy):
        reward = cls(model_dir)
        scores = reward(prompts, images)
        assert torch.isnan(scores[1:3]).all()
        torch.testing.assert_close(scores[[0, 3]], reward(prompts, data.test_images[:4])[[0, 3]])


def test_registry_builds_digit_rewards_from_a_path_or_the_task_cache(model_dir, tmp_path) -> None:
    import shutil

    from fdfo.rewards import build_reward
    from fdfo.tasks.digits import REWARD_DIR_NAME

    reward = build_reward("digit_judge_accuracy", str(model_dir), torch.device("cpu"), batch_size=2)
    assert isinstance(reward, DigitJudgeAccuracy) and reward.batch_size == 2 and reward.path == model_dir
    shutil.copytree(model_dir, tmp_path / REWARD_DIR_NAME)  # seed 0, as the task builds them: no retraining
    for path in (None, "builtin"):
        reward = build_reward("digit_probability", path, torch.device("cpu"), str(tmp_path))
        assert isinstance(reward, DigitProbabilityReward) and reward.path == tmp_path / REWARD_DIR_NAME
