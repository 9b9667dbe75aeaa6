"""Plain flow-matching pretraining of the digits task's base model.

The CPU default job needs a base text-to-image model that already follows
its prompts often but not always, so that RL has room to improve it. This
module builds a small SD3-architecture pipeline in pixel space (16×16 grey
digits, no VAE) and trains it with the ordinary flow-matching loss on the
MNIST training digits. Every ``eval_every`` (100) steps it samples 20 images
per digit and stops at the first evaluation where at least ``target_accuracy``
(50%) of them show the prompted digit under the reward classifier (the CNN).
The result is saved as a diffusers pipeline directory and cached.

    python -m fdfo.tasks.digits.pretrain [--out CACHE_ROOT] [--force]
    # or implicitly, on first use of model.path: builtin:digits
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import torch

from fdfo import atomic, tasks
from fdfo.progress import bar as progress_bar
from fdfo.context import global_rng
from fdfo.models.tiny import build_tiny_sd3_pipeline
from fdfo.sampling import sample_deterministic
from fdfo.tasks.digits.data import BASE_DIR_NAME, DIGIT_PROMPTS, IMAGE_SIZE, digit_prompt, load_digits, prompt_digits
from fdfo.tasks.digits.reward_models import CLASSIFIER_FILE, load_module

MAX_TEXT_TOKENS = 12  # CLIP tokens: "a handwritten digit seven" is 7 with its start and end tokens
T5_TOKENS = 4  # no T5 encoder: SD3 pads the joint sequence with this many zero tokens


def digits_pipeline(seed: int = 0):
    """The base architecture: SD3 transformer on 16×16×1 pixels with two tiny CLIP text encoders.

    Like SD3.5 run without its T5 encoder, the T5 part of the text sequence is zeros: the
    default job stays fast on two CPU cores (the T5 path is covered by the tests' pipelines).
    """
    return build_tiny_sd3_pipeline(
        sample_size=IMAGE_SIZE, in_channels=1, patch_size=2, num_layers=4, num_attention_heads=2,
        attention_head_dim=32, clip_hidden=32, t5_dim=64, max_text_tokens=MAX_TEXT_TOKENS, with_vae=False,
        with_t5=False, shift=1.0, seed=seed,
    )


@torch.no_grad()
def euler_samples(pipe, prompts: list[str], steps: int, seed: int) -> torch.Tensor:
    """Deterministic Euler samples in [0, 1] for a list of prompts (evaluation during pretraining)."""
    embeds, _, pooled, _ = pipe.encode_prompt(prompts, None, None, do_classifier_free_guidance=False,
                                               max_sequence_length=T5_TOKENS, device=torch.device("cpu"))
    pipe.scheduler.set_timesteps(steps, device="cpu")
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(len(prompts), 1, IMAGE_SIZE, IMAGE_SIZE, generator=g)

    def velocity(x, t):
        return pipe.transformer(hidden_states=x, timestep=t * 1000, encoder_hidden_states=embeds,
                                pooled_projections=pooled, return_dict=False)[0]

    x = sample_deterministic(velocity, latents, pipe.scheduler.sigmas.float())
    return (x / 2 + 0.5).clamp(0, 1)


def pretrain_digits_base(out_dir: Path, reward_dir: Path, *, seed: int = 0, max_steps: int = 3000,
                         batch_size: int = 128, lr: float = 1e-3, target_accuracy: float = 0.5,
                         eval_every: int = 100, eval_per_digit: int = 20, sample_steps: int = 10,
                         progress: bool = True) -> dict:
    """Trains the base with flow matching until the classifier accuracy of its samples ≥ target."""
    with global_rng(seed):
        pipe = digits_pipeline(seed)
        data = load_digits()
        images = data.train_images * 2 - 1  # [N, 1, 16, 16] in [-1, 1]
        labels = data.train_labels
        with torch.no_grad():
            embeds, _, pooled, _ = pipe.encode_prompt(list(DIGIT_PROMPTS), None, None,
                                                       do_classifier_free_guidance=False,
                                                       max_sequence_length=T5_TOKENS, device=torch.device("cpu"))
        net = pipe.transformer.train()
        opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
        scorer = DigitClassifierAccuracy(reward_dir)
        eval_prompts = [digit_prompt(k) for k in range(10) for _ in range(eval_per_digit)]
        g = torch.Generator().manual_seed(seed)
        history, acc, step = [], 0.0, 0
        start = time.time()
        bar = progress_bar(range(1, max_steps + 1), desc="pretrain digits base", unit="steps", enabled=progress,
                       leave=True)
        for step in bar:
            idx = torch.randint(len(images), (batch_size,), generator=g)
            x0, y = images[idx], labels[idx]
            eps = torch.randn(x0.shape, generator=g)
            sigma = torch.sigmoid(torch.randn(batch_size, generator=g))  # logit-normal σ, as SD3 trains
            s = sigma.view(-1, 1, 1, 1)
            x = (1 - s) * x0 + s * eps
            v = net(hidden_states=x, timestep=sigma * 1000, encoder_hidden_states=embeds[y],
                    pooled_projections=pooled[y], return_dict=False)[0]
            loss = (v - (eps - x0)).pow(2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()
            if step % eval_every == 0:
                net.eval()
                samples = euler_samples(pipe, eval_prompts, sample_steps, seed + 1)
                acc = float(scorer(eval_prompts, samples).mean())
                net.train()
                history.append({"step": step, "loss": float(loss.detach()), "accuracy": acc,
                                "seconds": round(time.time() - start, 1)})
                bar.set_postfix(loss=f"{float(loss.detach()):.3f}", acc=f"{acc:.2f}")
                if acc >= target_accuracy:
                    break
        net.eval()
        info = {"steps": step, "classifier_accuracy": acc, "target_accuracy": target_accuracy, "seed": seed,
                "seconds": round(time.time() - start, 1), "history": history}
        _save_pipeline_atomically(pipe, out_dir, info)
        return info


class DigitClassifierAccuracy:
    """Accuracy of samples under the reward classifier (argmax equals the prompted digit)."""

    def __init__(self, reward_dir: Path):
        self.classifier = load_module(Path(reward_dir) / CLASSIFIER_FILE)

    def __call__(self, prompts: list[str], images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            logits = self.classifier(images)
        return (logits.argmax(1) == prompt_digits(prompts)).float()


def _save_pipeline_atomically(pipe, out_dir: Path, info: dict) -> None:
    from diffusers.utils import logging as diffusers_logging

    tmp = out_dir.with_name(out_dir.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # the absent VAE and T5 are intended: no "cannot be saved" noise
    try:
        pipe.save_pretrained(tmp)
    finally:
        diffusers_logging.set_verbosity(level)
    (tmp / "pretrain.json").write_text(json.dumps(info, indent=1))
    atomic.replace_dir(tmp, out_dir)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="cache root (default: ~/.cache/fdfo or $FDFO_CACHE)")
    parser.add_argument("--force", action="store_true", help="retrain even if a cached base exists")
    args = parser.parse_args(argv)
    root = tasks.cache_root(str(args.out) if args.out else None)
    if args.force:
        shutil.rmtree(root / BASE_DIR_NAME, ignore_errors=True)
    print(tasks.get("builtin:digits").model_path(root, True))  # (through the registry: this module is its builder)


if __name__ == "__main__":
    main()
