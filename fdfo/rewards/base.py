"""What every pretrained reward model shares: loading, batching, devices, non-finite handling.

A reward model is frozen (``eval()``, no gradients), scores images in chunks of
``batch_size``, runs on its own ``device`` (which may differ from the images'
device: a second GPU, say) in ``dtype`` (bf16 on GPU, fp32 on CPU by default),
and returns float32 scores [B] on the images' device. An image with a NaN/inf
pixel gets a NaN score, so that the trainer skips the batch instead of scoring
a quantised garbage image.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import Tensor

from fdfo import hub
from fdfo.images import quantize


class RewardUnavailable(FileNotFoundError):
    """A reward whose weights were not given (e.g. HPSv2 without a path): reported, not faked."""


def resolve_source(path: str | None, default: str | None, name: str) -> str:
    """A local directory or a hub id for reward ``name``; a clear error for a missing local path."""
    source = path if path not in (None, "", "default") else default
    if source is None:
        raise RewardUnavailable(f"reward '{name}' has no default weights; give reward.paths.{name} "
                                "(a local directory or a hub id)")
    local = Path(source).expanduser()
    if local.exists():
        if not local.is_dir():
            raise FileNotFoundError(f"reward.paths.{name} '{source}' is a file; give the directory that "
                                    "save_pretrained wrote (config.json, weights, tokenizer, preprocessor)")
        return str(local)
    if source.startswith((".", "/", "~")) or source.count("/") != 1:
        raise FileNotFoundError(f"reward.paths.{name} '{source}' does not exist; give a local directory "
                                f"or a hub id such as '{default or 'owner/name'}'")
    return source


def load_pretrained(loader, source: str, name: str, **kwargs):
    """``loader(source)`` (a ``from_pretrained``), turning hub/network failures into a clear FileNotFoundError;
    a hub id is answered from the cache, or refused at once, when the hub is off or out of reach (fdfo.hub)."""
    if not Path(source).is_dir():
        source = hub.resolve(source, f"reward '{name}'", f"download it where there is network (huggingface-cli "
                             f"download {source} --local-dir DIR) and set reward.paths.{name}: DIR",
                             cache_dir=kwargs.get("cache_dir"))
    try:
        return loader(source, **kwargs)
    except OSError as exc:
        if Path(source).is_dir():
            raise FileNotFoundError(
                f"reward '{name}': '{source}' is not a complete model directory ({exc}); it needs the model "
                "and its tokenizer and image processor, each written with save_pretrained") from exc
        raise FileNotFoundError(
            f"reward '{name}': could not load '{source}' from the hub ({exc}); download it first "
            f"(huggingface-cli download {source} --local-dir DIR) and set reward.paths.{name}: DIR") from exc


def dtype_kwargs(dtype: torch.dtype) -> dict:
    """The dtype argument of ``from_pretrained``: ``dtype`` in transformers 5, ``torch_dtype`` before."""
    import transformers

    major = int(transformers.__version__.split(".")[0])
    return {"dtype": dtype} if major >= 5 else {"torch_dtype": dtype}


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def to_uint8(images: Tensor) -> Tensor:
    """[B, C, H, W] in [0, 1] -> uint8 [B, 3, H, W] on the CPU (grey images are repeated to RGB).

    The processors of the reward models were built for 8-bit images (PickScore and
    the VLM read PNGs), so generated images are quantised exactly as saving them would.
    """
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images [B, 1|3, H, W] in [0, 1], got shape {tuple(images.shape)}")
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    return quantize(images).cpu()


class FrozenRewardModel:
    """Base of the pretrained rewards: ``score(prompts, images)`` over chunks of ``batch_size``."""

    name = "reward"

    def __init__(self, device: torch.device | str, dtype: torch.dtype | str | None, batch_size: int):
        if isinstance(dtype, str):
            dtype = None if dtype == "auto" else getattr(torch, dtype)
        if batch_size < 1:
            raise ValueError(f"reward '{self.name}': batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        self.dtype = dtype or default_dtype(self.device)
        self.batch_size = batch_size

    def _freeze(self, module: torch.nn.Module) -> torch.nn.Module:
        return module.to(self.device).eval().requires_grad_(False)

    def _score_batch(self, prompts: list[str], images: Tensor) -> Tensor:  # [b] float
        raise NotImplementedError

    @torch.no_grad()
    def score(self, prompts: list[str], images: Tensor) -> Tensor:
        if len(prompts) != images.shape[0]:
            raise ValueError(f"reward '{self.name}': got {len(prompts)} prompts for {images.shape[0]} images")
        out = torch.empty(len(prompts), dtype=torch.float32)
        for i in range(0, len(prompts), self.batch_size):
            chunk = prompts[i:i + self.batch_size]
            scores = self._score_batch(chunk, images[i:i + self.batch_size])
            out[i:i + self.batch_size] = checked_scores(self.name, scores, len(chunk)).float().cpu()
        bad = ~torch.isfinite(images.detach()).flatten(1).all(1).cpu()
        out[bad] = float("nan")  # never score a broken image as if it were fine
        return out.to(images.device)

    def __call__(self, prompts: list[str], images: Tensor) -> Tensor:
        return self.score(prompts, images)


def checked_scores(name: str, scores, n: int) -> Tensor:
    """``scores`` if it is a tensor [n] (one score per image), else a one-line error naming reward ``name``."""
    if not isinstance(scores, Tensor):
        raise TypeError(f"reward '{name}' returned a {type(scores).__name__}; a reward returns a tensor [B] "
                        f"of scores, one per image")
    if tuple(scores.shape) != (n,):
        raise ValueError(f"reward '{name}' returned scores of shape {tuple(scores.shape)} for {n} images; a "
                         f"reward returns a tensor [B] of scores, one per image")
    return scores


def report_nonfinite(name: str, prompts: list[str], scores: Tensor) -> int:
    """Warn, naming the reward and the prompts, when some scores are NaN/inf; returns how many."""
    bad = (~torch.isfinite(scores.detach())).nonzero().flatten().tolist()
    if bad:
        shown = "; ".join(f"#{i} {prompts[i]!r} -> {float(scores[i])}" for i in bad[:5])
        more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
        warnings.warn(f"non-finite reward '{name}' for {len(bad)} of {len(prompts)} image(s): {shown}{more}",
                      stacklevel=2)
    return len(bad)


def mean_pairwise_distance(embeddings: Tensor) -> Tensor:
    """Diversity of a set of unit vectors [R, D]: mean over pairs i<j of (1 − cos); NaN when R < 2."""
    r = embeddings.shape[0]
    if r < 2:
        return torch.tensor(float("nan"))
    cos = embeddings.float() @ embeddings.float().T
    iu = torch.triu_indices(r, r, offset=1)
    return (1.0 - cos[iu[0], iu[1]]).mean()
