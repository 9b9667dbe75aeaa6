"""Rewards of the built-in digits task: ``score(prompts, images [B,C,H,W] in [0,1]) -> [B] float32``.

``DigitProbabilityReward`` is the reward the trainer optimises (the CNN's probability of the
prompted digit); ``DigitJudgeAccuracy`` is the held-out evaluation metric (whether a logistic
regression judge reads the prompted digit). Both load the models written by
``fdfo.digits.build_reward_models`` and expect MNIST polarity: white strokes on black.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor, nn

from fdfo.digits import CLASSIFIER_FILE, IMAGE_SIZE, JUDGE_FILE, load_module, prompt_digits, resize_images


def to_digit_input(images: Tensor, size: int = IMAGE_SIZE) -> Tensor:
    """Map generated images [B,C,H,W] to the reward models' input [B,1,size,size] in [0,1].

    Three channels become grey by their mean; other sizes are area-resampled; values are
    clamped to [0,1] because the models never saw anything outside it.
    """
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images [B,1|3,H,W], got shape {tuple(images.shape)}")
    grey = images.mean(dim=1, keepdim=True) if images.shape[1] == 3 else images  # [B,1,H,W]
    return resize_images(grey, size).clamp(0.0, 1.0)


class _DigitReward:
    """Shared plumbing: load a frozen model from ``path/filename``, score on the images' device.

    The model runs in float64 (float32 on MPS): it is tiny, and double precision makes the
    scores independent of batch size to far below 1e-6.
    """

    filename: str

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        file = self.path / self.filename
        if not file.is_file():
            raise FileNotFoundError(
                f"digit reward model {file} not found; create it with "
                f"`python -c \"from fdfo.digits import build_reward_models; build_reward_models('{self.path}')\"`"
            )
        self.model: nn.Module = load_module(file).double()

    def to(self, device: torch.device | str) -> "_DigitReward":
        """Move the model to ``device`` (``score`` also does this on demand)."""
        device = torch.device(device)
        self.model.to(device=device, dtype=torch.float32 if device.type == "mps" else torch.float64)
        return self

    @torch.no_grad()
    def logits(self, images: Tensor) -> Tensor:
        """Model logits [B,10] for images [B,C,H,W] in [0,1], on the images' device."""
        param = next(self.model.parameters())
        if param.device != images.device:
            self.to(images.device)
            param = next(self.model.parameters())
        return self.model(to_digit_input(images).to(param.dtype))

    def _check(self, prompts: list[str], images: Tensor) -> Tensor:
        if len(prompts) != images.shape[0]:
            raise ValueError(f"got {len(prompts)} prompts for {images.shape[0]} images")
        return prompt_digits(list(prompts), device=images.device)  # [B]

    def score(self, prompts: list[str], images: Tensor) -> Tensor:
        raise NotImplementedError

    def __call__(self, prompts: list[str], images: Tensor) -> Tensor:
        return self.score(prompts, images)


class DigitProbabilityReward(_DigitReward):
    """Reward = the CNN classifier's softmax probability of the prompted digit, in [0,1].

    The probability, not its log: bounded, so a few hopeless samples cannot dominate the
    advantage estimates.
    """

    filename = CLASSIFIER_FILE

    @torch.no_grad()
    def score(self, prompts: list[str], images: Tensor) -> Tensor:
        digits = self._check(prompts, images)  # [B]
        probs = self.logits(images).softmax(dim=-1)  # [B,10]
        return probs.gather(1, digits[:, None]).squeeze(1).float()  # [B]


class DigitJudgeAccuracy(_DigitReward):
    """Metric = 1.0 where the held-out logistic judge's argmax is the prompted digit, else 0.0."""

    filename = JUDGE_FILE

    @torch.no_grad()
    def score(self, prompts: list[str], images: Tensor) -> Tensor:
        digits = self._check(prompts, images)  # [B]
        return (self.logits(images).argmax(dim=-1) == digits).float()  # [B]
