"""Run configuration mechanics: typed sections, YAML files and dotted CLI overrides.

A section is a frozen dataclass. Its fields' comments are their documentation
(``field_docs``: ``--help``, ``--print-config`` and docs/configuration.md read
them), and a field's metadata says which values it takes (``choices``,
``check``, ``check_when``). The sections every run has are defined here; an
algorithm, a churn schedule or a model family declares its own section in its
own file, and ``fdfo.settings`` composes them into the run config. This module
imports nothing else from fdfo.

Every unknown key, badly typed or out-of-range value is a ``ConfigError`` that
names the key and says what is valid, so a typo never silently falls back to a
default.

Layers apply in order: defaults, the preset or YAML file, the CLI overrides. A
mapping given whole (``reward: {weights: {pickscore: 1.0}}`` in a file, or
``--reward.weights '{pickscore: 1.0}'``) replaces the mapping below it. A dotted
CLI key that reaches into a mapping changes one entry and keeps the others:
``--reward.weights.vlm_alignment 0.2`` sets that weight, and the value ``null``
(``--reward.weights.vlm_alignment null``) removes the entry.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import functools
import inspect
import io
import json
import math
import textwrap
import tokenize
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml

from fdfo.errors import ConfigError

# --------------------------------------------------------------------------- what a field takes


@dataclass(frozen=True)
class Rule:
    ok: Callable[[Any], bool]
    valid: str  # what is valid, for the message


def above(low: float) -> Rule:
    return Rule(lambda v: v > low, "positive" if low == 0 else f"> {low}")


def at_least(low: float) -> Rule:
    return Rule(lambda v: v >= low, f">= {low}")


def optional(rule: Rule) -> Rule:
    return Rule(lambda v: v is None or rule.ok(v), f"null or {rule.valid}")


BETA = Rule(lambda v: 0 <= v < 1, "in [0, 1)")

AUTO = "auto"  # a size or switch the run chooses for its device (fdfo.tuning)


def positive_or_auto() -> Rule:
    return Rule(lambda v: v == AUTO or (isinstance(v, int) and v > 0), 'a positive integer or "auto"')


def switch_or_auto() -> dict:
    """Field metadata: true, false or "auto" (the run decides for its device)."""
    return choices(True, False, AUTO)


def choices(*options, replaced: Mapping[str, str] | None = None) -> dict:
    """Field metadata: the value is one of ``options``; ``replaced`` maps former values to what replaced them."""
    return {"choices": options, "replaced": dict(replaced or {})}


def check(rule: Rule) -> dict:
    """Field metadata: the value satisfies ``rule``."""
    return {"check": rule}


def check_when(switch: str, rule: Rule) -> dict:
    """Field metadata: the value satisfies ``rule`` while the section's field ``switch`` is true or non-zero."""
    return {"check_when": (switch, rule)}


# --------------------------------------------------------------------------- the shared sections


@dataclass(frozen=True)
class ModelConfig:
    """The base model."""

    # A diffusers pipeline directory or hub id of a supported family (SD3/SD3.5: StableDiffusion3Pipeline,
    # FLUX.1: FluxPipeline), or "builtin:digits" (the CPU default's base model, pretrained and cached on first use).
    path: str = "stabilityai/stable-diffusion-3.5-medium"
    revision: str | None = None  # the hub revision (branch, tag or commit) of model.path
    # Frozen parts' dtype: "auto" = bf16 on GPU, fp32 on CPU.
    dtype: str = field(default="auto", metadata=choices("auto", "float32", "bfloat16", "float16"))
    max_sequence_length: int = field(default=128, metadata=check(at_least(1)))  # T5 tokens
    # Image side in pixels, a multiple of 16 (VAE factor 8 × patch 2).
    resolution: int = field(default=512, metadata=check(Rule(lambda v: v > 0 and v % 16 == 0,
                                                             "a positive multiple of 16 (VAE factor 8 × patch 2)")))
    cache_dir: str | None = None  # where builtin models are kept (default ~/.cache/fdfo)
    # The attention kernel: "native" (PyTorch SDPA picks one) or a PyTorch SDPA kernel forced:
    # "_native_flash", "_native_cudnn", "_native_efficient", "_native_math"; FLUX also takes diffusers'
    # other backends ("flash" for flash-attn, "_flash_3", "sage", "xformers", ...). Checked against the
    # model's family before its weights load.
    attention_backend: str = "native"
    # torch.compile the transformer, once for both phases (sampling, inside its CUDA graph, and training):
    # "auto" = on CUDA; a compilation failure falls back to eager with one line and compiled: false logged.
    compile: bool | str = field(default=AUTO, metadata=switch_or_auto())


@dataclass(frozen=True)
class LoraConfig:
    """The LoRA adapter that is trained (or full fine-tuning)."""

    enabled: bool = True  # false = full fine-tuning of the transformer
    rank: int = field(default=32, metadata=check(above(0)))  # the adapter's rank r
    alpha: float = field(default=64.0, metadata=check(above(0)))  # LoRA's alpha: the update is scaled by alpha / rank
    # The adapter's initialisation: "gaussian" (A ~ N(0, 1/r), B = 0, as published) or peft's "default".
    init: str = field(default="gaussian", metadata=choices("gaussian", "default"))
    # The adapted modules (peft names, matched at the end of a module's name); null = the model family's
    # attention projections (fdfo.models: SD3's joint attention as published, FLUX's double and single blocks).
    target_modules: list[str] | None = field(default=None, metadata=check_when("enabled", Rule(
        lambda v: v is None or bool(v), "null (the model family's default) or a non-empty list of module names")))
    # Train on from an adapter instead of a fresh one: a peft adapter directory (adapter_config.json +
    # adapter_model.safetensors: a checkpoint's adapter/, or a published FDFO adapter) or
    # "owner/name/subfolder" on the hub. Its rank, alpha and targets replace the three keys above.
    init_adapter: str | None = None
    # The adapter weights' dtype in the forward: "auto" = the model's dtype (bf16 on GPU: no fp32 upcast of
    # the adapted activations; the optimizer keeps fp32 master weights), or "float32" throughout.
    dtype: str = field(default=AUTO, metadata=choices(AUTO, "float32"))


@dataclass(frozen=True)
class SamplingConfig:
    """How images are sampled (the churn that pairs them is the churn section)."""

    steps: int = field(default=40, metadata=check(above(0)))  # solver steps T
    # 1.0 = no classifier-free guidance; below 1 weakens the prompt.
    guidance_scale: float = field(default=1.0, metadata=check(above(0)))
    # The flow's time shift; null = the scheduler's configured shift (3.0 for SD3.5).
    shift: float | None = field(default=None, metadata=check(optional(above(0))))
    # Pairs per sampling forward (2x rows); "auto" = the most that fit the device's free memory (3 on CPU).
    micro_batch_pairs: int | str = field(default=AUTO, metadata=check(positive_or_auto()))
    negative_prompt: str = ""  # the unconditional prompt of classifier-free guidance
    cuda_graphs: bool = True  # on CUDA: capture one sampling step as a CUDA graph and replay it


@dataclass(frozen=True)
class TrainConfig:
    """The optimizer and what every algorithm's training shares (the algorithm's own keys are its section)."""

    # The RL algorithm, a name of fdfo.algorithms.ALGORITHMS; its settings are the section of that name.
    algorithm: str = "fdfo"
    epochs: int = field(default=100, metadata=check(above(0)))  # epochs to train (a resumed run continues to this)
    # Training elements per forward/backward; "auto" = the largest divisor of an optimizer step's elements
    # that fits the device's free memory (6 on CPU, or the nearest divisor below).
    micro_batch_rows: int | str = field(default=AUTO, metadata=check(positive_or_auto()))
    learning_rate: float = field(default=3e-5, metadata=check(above(0)))  # AdamW's learning rate
    adam_beta1: float = field(default=0.9, metadata=check(BETA))  # AdamW's β1
    adam_beta2: float = field(default=0.999, metadata=check(BETA))  # AdamW's β2
    weight_decay: float = field(default=1e-4, metadata=check(at_least(0)))  # AdamW's decoupled weight decay
    adam_eps: float = field(default=1e-8, metadata=check(above(0)))  # AdamW's ε
    # Max global gradient norm; 0 = no clipping.
    grad_clip: float = field(default=1.0, metadata=check(at_least(0)))
    seed: int = 0  # the run's seed: every random stream derives from it (fdfo.context.SeedStreams)
    # The fused kernels' backend: "auto" = Triton on CUDA, PyTorch elsewhere.
    kernels: str = field(default="auto", metadata=choices("auto", "triton", "torch"))
    # Move the text encoders to pinned CPU memory while training (GPU only); "auto" = only when they do not
    # fit beside the training micro-batch.
    offload_text_encoders: bool | str = field(default=AUTO, metadata=switch_or_auto())
    # Recompute each transformer block's activations in the backward pass instead of keeping them (diffusers'
    # own gradient checkpointing): less memory for 1024² or full fine-tuning, about a third more training compute.
    gradient_checkpointing: bool = False
    # Where the epoch's stored trajectories wait between sampling and training: "device" (the GPU), or
    # "host": pinned CPU memory, copied back one micro-batch ahead of training (fdfo/trajectories.py).
    trajectory_device: str = field(default="device", metadata=choices("device", "host"))


@dataclass(frozen=True)
class DataConfig:
    """The prompts."""

    # A text file with one prompt per line, or "builtin:digits".
    prompts: str = "builtin:digits"
    eval_prompts: str | None = None  # the evaluation prompts, a file like data.prompts; null = the training prompts


@dataclass(frozen=True)
class RewardConfig:
    """The reward: a weighted sum of reward models."""

    # Name -> weight; the reward is the weighted sum (docs/algorithm.md §2). A name is a built-in reward
    # (fdfo.rewards), "remote" (a reward server, its URL in paths.remote), or module.path:Name for a
    # reward of your own (a class or factory; examples/my_reward.py).
    weights: dict[str, float] = field(
        default_factory=lambda: {"pickscore": 1.0, "vlm_alignment": 0.1},
        metadata=check(Rule(lambda w: any(v != 0 for v in w.values()),
                            "a mapping with at least one non-zero weight, e.g. {pickscore: 1.0}")))
    # Name -> weights path (directory or hub id); "builtin" for the digits task's models; for "remote" the
    # server's URL (http://HOST:PORT); for module.path:Name whatever its factory takes as `path`;
    # absent = the published weights (hub ids of PickScore, Qwen2.5-VL-7B-Instruct, CLIP).
    paths: dict[str, str] = field(default_factory=dict)
    batch_size: int = field(default=8, metadata=check(at_least(1)))  # images per reward-model forward
    device: str | None = None  # e.g. "cuda:1" to keep reward models off the training GPU
    # Decode and score each sampling micro-batch while the next one samples (a worker thread; on CUDA its
    # own stream); false = decode and score the whole batch after sampling. Same rewards either way.
    overlap: bool = True


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation during training, on a fixed deterministic (no churn) image set."""

    every: int = field(default=5, metadata=check(at_least(0)))  # epochs; 0 = never
    num_images: int = field(default=64, metadata=check_when("every", at_least(1)))  # images per evaluation
    seed: int = 1234  # the evaluation set's seed
    # Rewards/metrics averaged over the evaluation set, by name (as in reward.weights, module.path:Name too).
    metrics: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class LogConfig:
    """Where and how a run reports."""

    out_dir: str = "runs/sd35"  # the run directory
    # Epochs between reward-curve and sample-grid PNGs (the last epoch always has them; every evaluation
    # saves its own grid); 0 = no pictures.
    plot_every: int = field(default=5, metadata=check(at_least(0)))
    # Rows of the sample grids: pairs (FDFO), or groups (Flow-GRPO, 8 images of each); an evaluation's
    # grid: prompts, 8 fixed seeds each.
    grid_pairs: int = field(default=8, metadata=check(at_least(0)))
    # Log to Weights & Biases: scalars and sample grids; a resume continues the same wandb run
    # (WANDB_MODE=offline: kept in the run directory's wandb/). Needs pip install -e ".[logging]".
    wandb: bool = False
    wandb_project: str = "fdfo"  # the wandb project
    # Write TensorBoard events (scalars, sample grids) into the run directory's tensorboard/. Needs the
    # logging extra, as wandb.
    tensorboard: bool = False
    progress: bool = True  # progress bars (rank 0)


@dataclass(frozen=True)
class CheckpointConfig:
    """Checkpoints of the run."""

    every: int = field(default=5, metadata=check(at_least(0)))  # epochs; 0 = never
    keep_last: int = field(default=0, metadata=check(at_least(0)))  # 0 = keep all
    # After a resume, the first trained epoch against the five before it: a loss or gradient norm more than
    # this many times theirs, or a clip fraction of 0.4 from at most 0.1, stops the run before it writes
    # anything (fdfo.resume_guard). 0 = no check.
    resume_guard: float = field(default=100.0, metadata=check(Rule(lambda v: v == 0 or v > 1, "0 (off) or above 1")))


@dataclass(frozen=True)
class DeepSpeedConfig:
    """DeepSpeed: ZeRO stage and its options."""

    # ZeRO stage; null = the stage named in `config`, else 0 (replicated, DDP-style).
    zero_stage: int | None = field(default=None, metadata=choices(0, 1, 2, 3))
    # A DeepSpeed JSON (configs/ds/*.json) merged in for ZeRO and offload settings. Batch sizes always come
    # from the run config (train.micro_batch_rows and the epoch layout); a contradicting value there is an error.
    config: str | None = None
    # ZeRO-3: sample from a persistent unpartitioned copy of the transformer (one more copy of its
    # weights per GPU; refreshed in place each epoch, so a CUDA graph over it is captured once per run).
    # false: gather the partitioned weights into the module for each sampling phase instead.
    inference_copy: bool = True


# The sections every run has, in the order a config lists them; the parts' own sections follow.
SHARED_SECTIONS: dict[str, type] = {
    "model": ModelConfig, "lora": LoraConfig, "sampling": SamplingConfig, "train": TrainConfig,
    "data": DataConfig, "reward": RewardConfig, "eval": EvalConfig, "log": LogConfig,
    "checkpoint": CheckpointConfig, "deepspeed": DeepSpeedConfig,
}


# --------------------------------------------------------------------------- documentation


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """field name -> its comment in the class source: the comment lines just above the field, else the
    comment at the end of its statement."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # a class made at run time has no source
        return {}
    lines = source.splitlines()
    comments = {tok.start[0]: tok.string.lstrip("#").strip()
                for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
    docs = {}
    for node in ast.parse(source).body[0].body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        above, line = [], node.lineno - 1
        while line >= 1 and lines[line - 1].lstrip().startswith("#"):
            above.insert(0, comments[line])
            line -= 1
        text = " ".join(above) or comments.get(node.end_lineno, "")
        if text:
            docs[node.target.id] = text
    return docs


def section_doc(cls: type) -> str:
    """A section's description: its docstring's first paragraph, on one line."""
    doc = cls.__doc__ or ""
    if doc.startswith(cls.__name__ + "("):  # the signature dataclasses writes for a class without a docstring
        return ""
    return " ".join(line.strip() for line in doc.strip().split("\n\n")[0].splitlines())


class Setting(typing.NamedTuple):
    key: str  # dotted
    type: Any
    default: Any
    doc: str  # its comment
    metadata: Mapping

    @property
    def kind(self) -> str:
        """Its type for a reader: the type's name, or the values it takes."""
        options = self.metadata.get("choices")
        if options is not None:
            return "one of " + ", ".join(map(str, options)) + (" or null" if self.default is None else "")
        return type_name(self.type)


def entries(cls: type, prefix: str = "") -> typing.Iterator[Setting]:
    """Every setting of a section tree, in declaration order."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    defaults = cls()
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from entries(tp, f"{prefix}{f.name}.")
        else:
            doc = docs.get(f.name, f.metadata.get("doc", ""))
            yield Setting(f"{prefix}{f.name}", tp, getattr(defaults, f.name), doc, f.metadata)


def type_name(tp: Any) -> str:
    if isinstance(tp, type) and not typing.get_args(tp):
        return tp.__name__
    return str(tp).replace("typing.", "").replace(" | None", " or null")


# --------------------------------------------------------------------------- typing


def _check_value(key: str, value: Any, tp: Any, meta: typing.Mapping) -> Any:
    """Coerce ``value`` to the annotated type ``tp`` or raise a ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) > 1:  # e.g. int | str: the first type that takes the value, then the field's own checks
            for tp_i in inner[:-1]:
                try:
                    return _check_value(key, value, tp_i, meta)
                except ConfigError:
                    continue
        return _check_value(key, value, inner[-1], meta)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"config key '{key}' must be an integer, got {value!r}")
    elif tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = float(value)
        else:
            raise ConfigError(f"config key '{key}' must be a number, got {value!r}")
    elif tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}' must be a string, got {value!r}")
    elif origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}' must be a list, got {value!r}")
        return [_check_value(f"{key}[{i}]", v, args[0], {}) for i, v in enumerate(value)]
    elif origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping, got {value!r}")
        return {str(k): _check_value(f"{key}.{k}", v, args[1], {}) for k, v in value.items()}
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"config key '{key}' must be true or false, got {value!r}")
    options = meta.get("choices")
    replaced = meta.get("replaced", {})
    if options is not None and value in replaced:
        raise ConfigError(f"config key '{key}' is {value!r}, which was replaced by {replaced[value]}; "
                          f"valid values: {', '.join(map(str, options))}")
    if options is not None and value not in options:
        raise ConfigError(f"config key '{key}' is {value!r}; valid values: {', '.join(map(str, options))}")
    return value


class Entries(dict):
    """A mapping reached by a dotted CLI key (``--reward.weights.NAME``): its entries update the
    mapping the lower layers built (``None`` removes one) instead of replacing it."""


def _merge_entries(key: str, current: dict, new: Entries, tp: Any) -> dict:
    merged = dict(current)
    for name, value in new.items():
        if value is not None:
            merged[name] = value
        elif name in merged:
            del merged[name]
        else:
            raise ConfigError(f"config key '{key}.{name}' is null (remove the entry), but '{key}' has no entry "
                              f"'{name}'; its entries: {', '.join(map(str, merged)) or 'none'}")
    return _check_value(key, merged, tp, {})


def _tree(obj: Any) -> dict:
    """A section tree's values as nested dicts (mutable, for the layers to update)."""
    return {f.name: _tree(v) if dataclasses.is_dataclass(v := getattr(obj, f.name)) else copy.deepcopy(v)
            for f in dataclasses.fields(obj)}


def _apply(cls: type, tree: dict, updates: dict, moved: Mapping[str, str], prefix: str = "") -> None:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in updates.items():
        full = f"{prefix}{key}"
        if full in moved:
            raise ConfigError(f"config key '{full}' {moved[full]}")
        if key not in fields:
            raise ConfigError(
                f"unknown config key '{full}'; valid keys{' in ' + prefix[:-1] if prefix else ''}: "
                f"{', '.join(sorted(fields))}"
            )
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{full}' is a section; give a mapping of its keys "
                                  f"({', '.join(f.name for f in dataclasses.fields(tp))})")
            _apply(tp, tree[key], value, moved, prefix=f"{full}.")
        elif isinstance(value, Entries) and typing.get_origin(tp) is dict:
            tree[key] = _merge_entries(full, tree[key], value, tp)
        else:
            tree[key] = _check_value(full, value, tp, fields[key].metadata)


def _construct(cls: type, tree: dict) -> Any:
    hints = typing.get_type_hints(cls)
    return cls(**{name: _construct(hints[name], value) if dataclasses.is_dataclass(hints[name]) else value
                  for name, value in tree.items()})


def _floats(obj: Any, prefix: str = ""):
    """(key, value) of every float in the config: float fields, and the floats of lists and mappings."""
    for f in dataclasses.fields(obj):
        value, key = getattr(obj, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            yield from _floats(value, f"{key}.")
        elif isinstance(value, float):
            yield key, value
        elif isinstance(value, dict):
            yield from ((f"{key}.{k}", v) for k, v in value.items() if isinstance(v, float))
        elif isinstance(value, list):
            yield from ((f"{key}[{i}]", v) for i, v in enumerate(value) if isinstance(v, float))


def _check_ranges(obj: Any, prefix: str = "") -> None:
    for f in dataclasses.fields(obj):
        value, key = getattr(obj, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            _check_ranges(value, f"{key}.")
            continue
        rule = f.metadata.get("check")
        if rule is not None and not rule.ok(value):
            raise ConfigError(f"config key '{key}' must be {rule.valid}, got {value!r}")
        if "check_when" in f.metadata:
            switch, rule = f.metadata["check_when"]
            on = getattr(obj, switch)
            if on and not rule.ok(value):
                raise ConfigError(f"config key '{key}' must be {rule.valid} while {prefix}{switch} is "
                                  f"{json.dumps(on)}, got {value!r}")


def load(cls: type, layers: typing.Iterable[dict], moved: Mapping[str, str] | None = None) -> Any:
    """The section tree ``cls`` built from its defaults and then each layer, type- and range-checked.

    ``moved`` maps keys that no longer exist to what the message says about them (where they went)."""
    tree = _tree(cls())
    for layer in layers:
        _apply(cls, tree, layer or {}, moved or {})
    cfg = _construct(cls, tree)
    for key, value in _floats(cfg):
        if not math.isfinite(value):
            raise ConfigError(f"config key '{key}' must be a finite number, got {value!r}")
    _check_ranges(cfg)
    return cfg


# --------------------------------------------------------------------------- files and command lines


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist; see configs/ for examples")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file '{path}' is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping of sections, got {type(data).__name__}")
    return data


def parse_overrides(args: list[str]) -> dict:
    """``['--train.learning_rate', '1e-4', '--log.wandb=true']`` -> nested dict.

    The dicts a dotted key creates are ``Entries``: reaching into a mapping field, they update it."""
    out: dict = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError(f"unexpected argument '{arg}'; overrides look like --section.key value")
        key, eq, raw = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args):
                raise ConfigError(f"override '--{key}' has no value")
            raw = args[i + 1]
            i += 1
        i += 1
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, Entries())
            if not isinstance(node, dict):
                raise ConfigError(f"override '--{key}' conflicts with another override")
        node[parts[-1]] = value
    return out
