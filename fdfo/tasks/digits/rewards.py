"""Rewards of the digits task: ``score(prompts, images [B,C,H,W] in [0,1]) -> [B] float32``.

``DigitProbabilityReward`` is the reward the trainer optimises (the CNN's probability of the
prompted digit); ``DigitJudgeAccuracy`` is the held-out evaluation metric (whether a logistic
regression judge reads the prompted digit). Both load the models written by
``fdfo.tasks.digits.reward_models.build_reward_models`` and expect MNIST polarity: white
strokes on black. Batching, devices and broken images are handled as for every frozen
reward model (``fdfo.rewards.base.FrozenRewardModel``).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor

from fdfo.rewards.base import FrozenRewardModel
from fdfo.tasks.digits.data import IMAGE_SIZE, prompt_digits, resize_images
from fdfo.tasks.digits.reward_models import CLASSIFIER_FILE, JUDGE_FILE, load_module


def to_digit_input(images: Tensor, size: int = IMAGE_SIZE) -> Tensor:
    """Map generated images [B,C,H,W] to the reward models' input [B,1,size,size] in [0,1].

    Three channels become grey by their mean; other sizes are area-resampled; values are
    clamped to [0,1] because the models never saw anything outside it.
    """
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images [B,1|3,H,W], got shape {tuple(images.shape)}")
    grey = images.mean(dim=1, keepdim=True) if images.shape[1] == 3 else images  # [B,1,H,W]
    return resize_images(grey, size).clamp(0.0, 1.0)


class DigitReward(FrozenRewardModel):
    """A frozen digit model loaded from ``path/filename``.

    The model runs in float64 (float32 on MPS): it is tiny, and double precision makes the
    scores independent of batch size to far below 1e-6.
    """

    filename: str

    def __init__(self, path: str | os.PathLike, *, device: torch.device | str = "cpu", batch_size: int = 256):
        device = torch.device(device)
        super().__init__(device, torch.float32 if device.type == "mps" else torch.float64, batch_size)
        self.path = Path(path)
        file = self.path / self.filename
        if not file.is_file():
            raise FileNotFoundError(
                f"digit reward model {file} not found; create it with `python -c \"from "
                f"fdfo.tasks.digits.reward_models import build_reward_models; build_reward_models('{self.path}')\"`"
            )
        self.model = self._freeze(load_module(file).to(self.dtype))

    def logits(self, images: Tensor) -> Tensor:
        """Model logits [B,10] for images [B,C,H,W] in [0,1], on the reward's device."""
        return self.model(to_digit_input(images.to(self.device)).to(self.dtype))


class DigitProbabilityReward(DigitReward):
    """Reward = the CNN classifier's softmax probability of the prompted digit, in [0,1].

    The probability, not its log: bounded, so a few hopeless samples cannot dominate the
    advantage estimates.
    """

    name = "digit_probability"
    filename = CLASSIFIER_FILE

    def _score_batch(self, prompts: list[str], images: Tensor) -> Tensor:
        probs = self.logits(images).softmax(dim=-1)  # [b,10]
        return probs.gather(1, prompt_digits(prompts, device=self.device)[:, None]).squeeze(1)  # [b]


class DigitJudgeAccuracy(DigitReward):
    """Metric = 1.0 where the held-out logistic judge's argmax is the prompted digit, else 0.0."""

    name = "digit_judge_accuracy"
    filename = JUDGE_FILE

    def _score_batch(self, prompts: list[str], images: Tensor) -> Tensor:
        return (self.logits(images).argmax(dim=-1) == prompt_digits(prompts, device=self.device)).float()  # [b]
