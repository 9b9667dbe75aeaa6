"""A reward of your own, for ``reward.weights: {"examples.my_reward:Contrast": 1.0}``.

A reward is a class (or a function) that takes any of ``path``, ``cache_dir``, ``device`` and
``batch_size`` and gives ``reward(prompts, images) -> Tensor [B]``: images are [B, C, H, W] in
[0, 1] on ``device``, one score per image. This one prefers crisp strokes on a plain background,
as the digits job draws them: the standard deviation of each image's grey values (0 when flat).
"""

import torch


class Contrast:
    def __init__(self, device: str | torch.device = "cpu"):
        self.device = torch.device(device)

    @torch.no_grad()
    def __call__(self, prompts: list[str], images: torch.Tensor) -> torch.Tensor:
        grey = images.to(self.device).mean(dim=1)  # [B, H, W]
        return grey.flatten(1).std(dim=1)  # [B]
