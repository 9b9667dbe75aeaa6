"""Evaluation protocols: which prompt sets, which metrics on each, how many images, and the row to beat.

A protocol is plain data. ``python -m fdfo.evaluate --protocol NAME`` (``fdfo.evaluate_protocol``)
runs one: it samples every prompt of every set ``repeats`` times with each model (the base and
each checkpoint), scores the images with the set's metrics and writes one table.

    published   the paper's protocol (SD3.5 Medium): PickScore and the VLM score on the first
                4,096 training prompts; HPSv2, CLIP-H/14, CLIP-L/14 and DreamSim diversity on the
                3,200 HPDv2 benchmark prompts; 4 images per prompt; reference row: the combined-
                reward, no-CFG FDFO run at epoch 100
    digits      the same shape for the built-in digits task (CPU, minutes): its training reward on
                its training prompts, its held-out judge and CLIP diversity on a second set

The sampler is not part of a protocol: it is the deterministic Euler sampler with the settings
``fdfo.inference.sampling_defaults`` gives (the checkpoint's run config, else the published ones).
A task defines its own protocol beside its other parts (``fdfo.tasks.digits.PROTOCOL``).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field


@dataclass(frozen=True)
class PromptSet:
    """Prompts sampled ``repeats`` times by every model and scored by ``metrics``."""

    name: str  # the flag --prompts-NAME gives its file; its images go to images/NAME/
    title: str  # what the prompts are, for the table
    default: str  # the prompt file (or builtin:NAME) when --prompts-NAME is not given
    size: int | None  # the first `size` prompts of the file (None: all of them)
    metrics: tuple[str, ...]
    how_to_get: str = ""  # how to produce the file: the error for a missing one says it


@dataclass(frozen=True)
class Protocol:
    name: str
    title: str
    prompt_sets: tuple[PromptSet, ...]
    repeats: int  # images per prompt, seeds seed, seed + 1, ...
    reference: dict[str, float] = field(default_factory=dict)  # metric -> published value: the row to beat
    reference_label: str = ""
    model: str | None = None  # the base model when neither --model nor a checkpoint's run config names one

    def __post_init__(self):
        seen: dict[str, str] = {}
        for s in self.prompt_sets:
            for m in s.metrics:
                if m in seen:  # one column per metric: its set is part of what the column means
                    raise ValueError(f"protocol '{self.name}': metric '{m}' is on sets '{seen[m]}' and '{s.name}'")
                seen[m] = s.name
        unknown = set(self.reference) - set(seen)
        if unknown:
            raise ValueError(f"protocol '{self.name}': reference values of metrics it lacks: {sorted(unknown)}")

    @property
    def metrics(self) -> list[str]:
        """Every metric, in table order."""
        return [m for s in self.prompt_sets for m in s.metrics]

    def set_of(self, metric: str) -> PromptSet:
        return next(s for s in self.prompt_sets if metric in s.metrics)


# metric -> (column title, decimals in the table)
COLUMNS: dict[str, tuple[str, int]] = {
    "pickscore": ("PickScore", 2),
    "vlm_alignment": ("VLM", 2),
    "hpsv2": ("HPSv2", 2),
    "clip_score_h14": ("CLIP-H/14", 2),
    "clip_score": ("CLIP-L/14", 2),
    "dreamsim_diversity": ("DreamSim diversity", 3),
    "clip_diversity": ("CLIP diversity (not DreamSim)", 3),
    "digit_probability": ("digit probability", 3),
    "digit_judge_accuracy": ("judge accuracy", 3),
}


def column(metric: str) -> tuple[str, int]:
    return COLUMNS.get(metric, (metric, 4))


# The README's "Prompt sets" section gives the same recipes.
PICKSCORE_TRAIN_HOW = (
    "write the Pick-a-Pic v1 training captions into it, one per line (README, 'Prompt sets': "
    "load_dataset('carperai/pickapic_v1_no_images_training_sfw') on a machine with network)")
HPDV2_HOW = (
    "write the 3,200 HPDv2 benchmark prompts into it, one per line: the lists in benchmark/"
    "{anime,concept-art,paintings,photo}.json of the zhwang/HPDv2 dataset, or hpsv2.benchmark_prompts('all') "
    "(README, 'Prompt sets')")

# The paper's evaluation: PickScore and the VLM score (the training rewards) on the first 4,096 training
# prompts, the held-out HPSv2, CLIP-H/14, CLIP-L/14 and DreamSim diversity on the 3,200 HPDv2 benchmark
# prompts, 4 images per prompt. Its sampler settings are not here: see the module docstring.
PUBLISHED = Protocol(
    name="published",
    title="the published FDFO evaluation protocol",
    prompt_sets=(
        PromptSet("train", "PickScore training prompts (Pick-a-Pic v1 captions)", "prompts/pickscore_train.txt",
                  4096, ("pickscore", "vlm_alignment"), PICKSCORE_TRAIN_HOW),
        PromptSet("hpd", "HPDv2 benchmark prompts (anime, concept-art, paintings, photo)", "prompts/hpdv2_all.txt",
                  3200, ("hpsv2", "clip_score_h14", "clip_score", "dreamsim_diversity", "clip_diversity"), HPDV2_HOW),
    ),
    repeats=4,
    # The paper's figures for the combined reward (PickScore + 0.1 VLM) without CFG, at epoch 100.
    # clip_diversity has none: it is this project's offline stand-in for DreamSim, another embedding.
    reference={"pickscore": 22.47, "vlm_alignment": 61.72, "hpsv2": 28.29, "clip_score_h14": 35.77,
               "clip_score": 28.19, "dreamsim_diversity": 0.455},
    reference_label="published FDFO, epoch 100 (combined reward, no CFG)",
)

# name -> (module, attribute) of its Protocol, imported when asked for (a task's with the task).
PROTOCOLS: dict[str, tuple[str, str]] = {
    "published": ("fdfo.protocol", "PUBLISHED"),
    "digits": ("fdfo.tasks.digits", "PROTOCOL"),
}


def get(name: str) -> Protocol:
    """The protocol called ``name``; an unknown name lists the known ones."""
    if name not in PROTOCOLS:
        raise ValueError(f"unknown protocol '{name}'; available protocols: {', '.join(PROTOCOLS)}")
    module, attr = PROTOCOLS[name]
    return getattr(importlib.import_module(module), attr)


__all__ = ["COLUMNS", "PROTOCOLS", "PUBLISHED", "PromptSet", "Protocol", "column", "get"]
