"""Prompts from a dataset on the Hugging Face hub: ``data.prompts: hf:DATASET[:SPLIT]:COLUMN``.

``hf:yuvalkirstain/pickapic_v1:train:caption`` reads the ``caption`` column of that dataset's ``train``
split (``hf:DATASET:COLUMN``: the ``train`` split) through the ``datasets`` library, an optional extra
(``pip install -e ".[prompts]"``). Each value is stripped; empty ones are skipped and repeats kept once,
in dataset order. The whole split is downloaded (once, to the hub cache): for Pick-a-Pic prefer a copy
without the images, such as ``CarperAI/pickapic_v1_no_images_training_sfw``. With ``HF_HUB_OFFLINE=1``, or no network, a dataset not in the local cache is one line
at once.
"""

from __future__ import annotations

import os

from fdfo.errors import ConfigError

PREFIX = "hf:"
EXTRA = 'pip install -e ".[prompts]"'


def is_hf(spec: str) -> bool:
    return spec.startswith(PREFIX)


def parse(spec: str) -> tuple[str, str, str]:
    """(dataset, split, column) of ``hf:DATASET[:SPLIT]:COLUMN``; a malformed spec is a ConfigError."""
    parts = spec[len(PREFIX):].split(":")
    if len(parts) == 2:
        parts.insert(1, "train")
    if len(parts) != 3 or not all(parts):
        raise ConfigError(f"prompt set '{spec}' is not hf:DATASET[:SPLIT]:COLUMN "
                          "(e.g. hf:yuvalkirstain/pickapic_v1:train:caption)")
    return parts[0], parts[1], parts[2]


def load(spec: str) -> list[str]:
    """The prompts of ``spec`` (module docstring); every failure is a ConfigError of one line."""
    dataset, split, column = parse(spec)
    try:
        import datasets
    except ImportError:
        raise ConfigError(f"prompt set '{spec}' needs the datasets package: {EXTRA}") from None
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    try:
        data = datasets.load_dataset(dataset, split=split)
    except Exception as exc:  # no network, offline mode without a cached copy, a wrong name or split
        where = "offline (HF_HUB_OFFLINE=1) and not in the local cache" if offline else "could not be loaded"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"prompt set '{spec}': dataset '{dataset}' split '{split}' {where} ({first})") from None
    if column not in data.column_names:
        raise ConfigError(f"prompt set '{spec}': dataset '{dataset}' has no column '{column}' "
                          f"(it has {', '.join(data.column_names)})")
    prompts = list(dict.fromkeys(str(v).strip() for v in data[column] if v is not None and str(v).strip()))
    if not prompts:
        raise ConfigError(f"prompt set '{spec}': column '{column}' holds no prompts")
    return prompts
