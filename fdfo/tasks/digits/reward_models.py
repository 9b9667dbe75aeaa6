"""The two reward models of the digits task: how they are built, trained, saved and loaded.

* ``DigitClassifier`` (a small CNN) is the reward the trainer optimises: the probability it
  gives to the prompted digit.
* ``DigitJudge`` (multinomial logistic regression on raw pixels) is a held-out judge from a
  different model family. It is never optimised against; its accuracy on generated images
  tells reward improvement apart from reward hacking of the CNN.

Both read [B,1,16,16] images in [0,1] (``fdfo.tasks.digits.data``) and are trained on the
MNIST training split, deterministically for a given seed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from fdfo import atomic
from fdfo.progress import bar as progress_bar
from fdfo.tasks.digits.data import IMAGE_SIZE, DigitData, load_digits

CLASSIFIER_FILE = "classifier.safetensors"
JUDGE_FILE = "judge.safetensors"
SUMMARY_FILE = "reward_models.json"


# ----------------------------------------------------------------------------- models


class DigitClassifier(nn.Module):
    """Small CNN: [B,1,16,16] in [0,1] -> logits [B,10]. The reward the trainer optimises."""

    def __init__(self, width: int = 32, size: int = IMAGE_SIZE):
        super().__init__()
        self.config = {"width": width, "size": size}
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # [B,w,S/2,S/2]
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # [B,2w,S/4,S/4]
        )
        self.head = nn.Linear(2 * width * (size // 4) ** 2, 10)

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.features(images).flatten(1))  # [B,10]


class DigitJudge(nn.Module):
    """Multinomial logistic regression on the raw pixels: [B,1,S,S] -> logits [B,10].

    A different model family from the CNN, so images that fool the CNN rarely fool it too.
    """

    def __init__(self, size: int = IMAGE_SIZE):
        super().__init__()
        self.config = {"size": size}
        self.linear = nn.Linear(size * size, 10)

    def forward(self, images: Tensor) -> Tensor:
        return self.linear(images.flatten(1))  # [B,10]


_MODEL_CLASSES: dict[str, type[nn.Module]] = {"DigitClassifier": DigitClassifier, "DigitJudge": DigitJudge}


@torch.no_grad()
def accuracy(model: nn.Module, images: Tensor, labels: Tensor, batch: int = 1000) -> float:
    """Fraction of ``images`` [N,1,S,S] whose argmax logit equals ``labels`` [N]."""
    was_training = model.training
    model.eval()
    hits = sum(int((model(x).argmax(1) == y).sum()) for x, y in zip(images.split(batch), labels.split(batch)))
    model.train(was_training)
    return hits / len(labels)


@contextmanager
def _seeded_single_thread(seed: int) -> Iterator[None]:
    """Run a block on one CPU thread with the global RNG seeded, restoring both afterwards.

    One thread makes training bit-reproducible whatever the core count (reduction order
    depends on it) and immune to thread oversubscription when other jobs share the CPU;
    these models are small enough that it costs little.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            yield
    finally:
        torch.set_num_threads(threads)


def random_shift(images: Tensor, max_shift: int, generator: torch.Generator) -> Tensor:
    """Translate each image [B,C,S,S] by its own random offset in [-max_shift, max_shift]^2, zero fill."""
    b, _, s, _ = images.shape
    padded = F.pad(images, (max_shift,) * 4)  # [B,C,S+2m,S+2m]
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, b, 1), generator=generator)  # [B,1] each
    rows = (dy + torch.arange(s))[:, None, :, None]  # [B,1,S,1]
    cols = (dx + torch.arange(s))[:, None, None, :]  # [B,1,1,S]
    return padded[torch.arange(b)[:, None, None, None], torch.arange(images.shape[1])[None, :, None, None], rows, cols]


def train_classifier(
    data: DigitData, steps: int = 1000, seed: int = 0, progress: bool = True,
    batch_size: int = 128, lr: float = 3e-3, max_shift: int = 1,
) -> DigitClassifier:
    """Train the CNN reward with AdamW on random minibatches, each digit shifted by up to ±1 px.

    Deterministic for a given seed: initialisation and batches come from seeded RNGs, it runs
    on one thread, and the caller's global RNG state and thread count are left untouched.
    """
    with _seeded_single_thread(seed):
        return _train_classifier(data, steps, seed, progress, batch_size, lr, max_shift)


def _train_classifier(data: DigitData, steps: int, seed: int, progress: bool,
                      batch_size: int, lr: float, max_shift: int) -> DigitClassifier:
    gen = torch.Generator().manual_seed(seed)
    model = DigitClassifier(size=data.size)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    model.train()
    bar = progress_bar(range(steps), desc="digit classifier", unit="steps", enabled=progress)
    for _ in bar:
        idx = torch.randint(0, len(data.train_labels), (batch_size,), generator=gen)
        x = random_shift(data.train_images[idx], max_shift, gen)  # [B,1,S,S]
        loss = F.cross_entropy(model(x), data.train_labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    return model.eval()


def train_judge(data: DigitData, seed: int = 0, l2: float = 1e-3, iters: int = 100) -> DigitJudge:
    """Fit the logistic-regression judge by full-batch L-BFGS on cross-entropy + ``l2``·|W|².

    The L2 term keeps the problem strictly convex, so the fit barely depends on the seed.
    """
    with _seeded_single_thread(seed):
        return _train_judge(data, l2, iters)


def _train_judge(data: DigitData, l2: float, iters: int) -> DigitJudge:
    model = DigitJudge(size=data.size)
    x, y = data.train_images, data.train_labels
    opt = torch.optim.LBFGS(model.parameters(), lr=1.0, max_iter=iters, history_size=20,
                            line_search_fn="strong_wolfe", tolerance_grad=1e-6, tolerance_change=1e-9)

    def closure() -> Tensor:
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y) + l2 * model.linear.weight.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    return model.eval()


# ----------------------------------------------------------------------------- save / load


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    atomic.write_text(path, json.dumps(obj, indent=2) + "\n")


def save_module(module: nn.Module, path: str | os.PathLike, meta: dict[str, Any] | None = None) -> None:
    """Save a DigitClassifier/DigitJudge to ``path`` (safetensors) plus ``<stem>.json`` beside it.

    The safetensors header records the class and config, so ``load_module`` needs nothing else;
    the JSON repeats them with ``meta`` (e.g. the measured test accuracy) for people to read.
    """
    path = Path(path)
    info = {"class": type(module).__name__, "config": module.config, **(meta or {})}
    tensors = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    header = {"class": info["class"], "config": json.dumps(module.config)}
    atomic.write_file(path, lambda tmp: save_file(tensors, tmp, metadata=header))
    write_json(path.with_suffix(".json"), info)


def load_module(path: str | os.PathLike) -> nn.Module:
    """Rebuild the module saved by ``save_module`` at ``path``, frozen and in eval mode."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"reward model file {path} not found; create it with `python -c \"from "
            f"fdfo.tasks.digits.reward_models import build_reward_models; build_reward_models('{path.parent}')\"`"
        )
    with safe_open(str(path), framework="pt") as f:
        header = f.metadata() or {}
    if header.get("class") not in _MODEL_CLASSES:
        raise ValueError(f"{path} does not hold a digit reward model (header {header})")
    module = _MODEL_CLASSES[header["class"]](**json.loads(header["config"]))
    module.load_state_dict(load_file(str(path)))
    return module.eval().requires_grad_(False)


def build_reward_models(out_dir: str | os.PathLike, seed: int = 0, progress: bool = True,
                        classifier_steps: int = 1000) -> dict[str, Any]:
    """Train the CNN reward and the logistic judge, write them to ``out_dir``, return the summary.

    Writes ``classifier.safetensors``, ``judge.safetensors`` (each with a JSON beside it) and
    ``reward_models.json`` holding seed and held-out test accuracies. Takes well under a minute
    on two CPU cores.
    """
    out = Path(out_dir)
    data = load_digits(IMAGE_SIZE)
    classifier = train_classifier(data, steps=classifier_steps, seed=seed, progress=progress)
    judge = train_judge(data, seed=seed)
    summary = {
        "seed": seed,
        "image_size": IMAGE_SIZE,
        "classifier_steps": classifier_steps,
        "train_size": len(data.train_labels),
        "test_size": len(data.test_labels),
        "classifier_test_accuracy": accuracy(classifier, data.test_images, data.test_labels),
        "judge_test_accuracy": accuracy(judge, data.test_images, data.test_labels),
    }
    common = {"seed": seed, "train_size": summary["train_size"], "test_size": summary["test_size"]}
    save_module(classifier, out / CLASSIFIER_FILE, {**common, "test_accuracy": summary["classifier_test_accuracy"]})
    save_module(judge, out / JUDGE_FILE, {**common, "test_accuracy": summary["judge_test_accuracy"]})
    write_json(out / SUMMARY_FILE, summary)
    if progress:
        print(f"[fdfo] digit reward models in {out}: classifier test acc "
              f"{summary['classifier_test_accuracy']:.3f}, judge test acc {summary['judge_test_accuracy']:.3f}")
    return summary


def ensure_reward_models(out_dir: str | os.PathLike, seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """``build_reward_models`` unless ``out_dir`` already holds all three files for ``seed``."""
    out = Path(out_dir)
    if all((out / name).is_file() for name in (CLASSIFIER_FILE, JUDGE_FILE, SUMMARY_FILE)):
        summary = json.loads((out / SUMMARY_FILE).read_text())
        if summary.get("seed") == seed:
            return summary
    return build_reward_models(out, seed=seed, progress=progress)
