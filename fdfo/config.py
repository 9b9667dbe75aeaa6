"""Run configuration: typed dataclasses, a YAML file and dotted CLI overrides.

The dataclass defaults are the published FDFO recipe for SD3.5 Medium
(docs/algorithm.md §4-5). A built-in task's default job is a preset on top of them
(``--config builtin:digits``, ``fdfo.tasks.preset``).

Every unknown key, badly typed or out-of-range value and unknown reward name is a
``ConfigError`` that names the key and says what is valid, so a typo never
silently falls back to a default.

Layers apply in order: defaults, the preset or YAML file, the CLI overrides. A
mapping given whole (``reward: {weights: {pickscore: 1.0}}`` in a file, or
``--reward.weights '{pickscore: 1.0}'``) replaces the mapping below it. A dotted
CLI key that reaches into a mapping changes one entry and keeps the others:
``--reward.weights.vlm_alignment 0.2`` sets that weight, and the value ``null``
(``--reward.weights.vlm_alignment null``) removes the entry.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml


class ConfigError(ValueError):
    """A configuration key or value is wrong; the message says which and how to fix it."""


def _choices(*options: str) -> dict:
    return {"choices": options}


@dataclass
class ModelConfig:
    # A diffusers pipeline directory or hub id of a supported family (SD3/SD3.5: StableDiffusion3Pipeline,
    # FLUX.1: FluxPipeline), or "builtin:digits" (the CPU default's base model, pretrained and cached on first use).
    path: str = "stabilityai/stable-diffusion-3.5-medium"
    revision: str | None = None
    # Frozen parts' dtype: "auto" = bf16 on GPU, fp32 on CPU.
    dtype: str = field(default="auto", metadata=_choices("auto", "float32", "bfloat16", "float16"))
    max_sequence_length: int = 128  # T5 tokens
    resolution: int = 512  # image side in pixels, a multiple of 16 (VAE factor 8 × patch 2)
    cache_dir: str | None = None  # where builtin models are kept (default ~/.cache/fdfo)
    # The attention kernel: "native" (PyTorch SDPA picks one) or a PyTorch SDPA kernel forced:
    # "_native_flash", "_native_cudnn", "_native_efficient", "_native_math"; FLUX also takes diffusers'
    # other backends ("flash" for flash-attn, "_flash_3", "sage", "xformers", ...). Checked against the
    # model's family before its weights load.
    attention_backend: str = "native"
    # FLUX.1 [dev]'s distilled guidance strength, an input of its transformer (null = 3.5, FluxPipeline's
    # default); a FLUX-only key.
    flux_guidance: float | None = None


@dataclass
class LoraConfig:
    enabled: bool = True  # false = full fine-tuning of the transformer
    rank: int = 32
    alpha: float = 64.0
    init: str = field(default="gaussian", metadata=_choices("gaussian", "default"))
    # The adapted modules (peft names, matched at the end of a module's name); null = the model family's
    # attention projections (fdfo.models: SD3's joint attention as published, FLUX's double and single blocks).
    target_modules: list[str] | None = None
    # Train on from an adapter instead of a fresh one: a peft adapter directory (adapter_config.json +
    # adapter_model.safetensors: a checkpoint's adapter/, or a published FDFO adapter) or
    # "owner/name/subfolder" on the hub. Its rank, alpha and targets replace the three keys above.
    init_adapter: str | None = None


@dataclass
class SamplingConfig:
    steps: int = 40  # solver steps T
    guidance_scale: float = 1.0  # 1.0 = no classifier-free guidance; below 1 weakens the prompt
    shift: float | None = None  # None = the scheduler's configured shift (3.0 for SD3.5)
    # Fresh noise ("churn") that makes the two rows of a pair drift apart (docs/algorithm.md §1.4); each key
    # below is read only by the schedule it names, and its default is that schedule's published value.
    #   raw:      γ = churn_weight at the prior and at every step but the last.
    #   prior:    churn at the prior only, γ₀ = exp(w) − 1 with
    #             w = churn_prior_weight·exp(churn_prior_weight_sigma·z), z ~ N(0, 1) drawn per pair.
    #   interval: churn around one time per pair: a logit-normal bump over the σ grid (centre ~ N(churn_interval_mu,
    #             churn_interval_sigma) in logit space, width churn_interval_soft_sigma), scaled so that log(1 + γ)
    #             sums to w = churn_interval_weight·exp(churn_interval_weight_sigma·z) over the grid.
    churn_schedule: str = field(default="raw", metadata={
        **_choices("raw", "prior", "interval"),
        "replaced": {"first": "the published 'prior' schedule (churn at the prior only, sampling.churn_prior_*)",
                     "logit_normal": "the published 'interval' schedule (churn around one random time per pair, "
                                     "sampling.churn_interval_*)"}})
    churn_weight: float = 0.0025  # raw: γ at the prior and every step but the last
    churn_prior_weight: float = 0.1  # prior: median of w (γ₀ = exp(w) − 1)
    churn_prior_weight_sigma: float = 1.0  # prior: spread of log w across pairs; 0 = the same w for every pair
    churn_interval_mu: float = 1.0  # interval: mean of the centre, logit(σ) (1.0: σ ≈ 0.73)
    churn_interval_sigma: float = 1.5  # interval: std of the centre across pairs, in logit space; 0 = fixed centre
    churn_interval_weight: float = 1.0  # interval: median of w, the total log(1 + γ) over the grid
    churn_interval_weight_sigma: float = 0.0  # interval: spread of log w across pairs; 0 = the same w for every pair
    churn_interval_soft_sigma: float = 0.25  # interval: width of the bump, the logit-normal scale
    micro_batch_pairs: int = 3  # pairs per sampling forward (2x rows)
    negative_prompt: str = ""
    cuda_graphs: bool = True  # on CUDA: capture one sampling step as a CUDA graph and replay it
    compile: bool = False  # torch.compile the velocity for sampling

    def churn_parameters(self) -> dict:
        """The selected schedule's parameters: keyword arguments of ``fdfo.sampling.churn_schedule``."""
        if self.churn_schedule == "prior":
            return dict(weight=self.churn_prior_weight, weight_sigma=self.churn_prior_weight_sigma)
        if self.churn_schedule == "interval":
            return dict(weight=self.churn_interval_weight, weight_sigma=self.churn_interval_weight_sigma,
                        mu=self.churn_interval_mu, sigma=self.churn_interval_sigma,
                        soft_sigma=self.churn_interval_soft_sigma)
        return dict(weight=self.churn_weight)


@dataclass
class TrainConfig:
    algorithm: str = "fdfo"  # a name of fdfo.algorithms.ALGORITHMS (checked with the config)
    epochs: int = 100
    pairs_per_epoch: int = 432  # over all ranks
    optimizer_steps_per_epoch: int = 4
    micro_batch_rows: int = 6  # training elements per forward/backward
    learning_rate: float = 3e-5
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    weight_decay: float = 1e-4
    adam_eps: float = 1e-8
    grad_clip: float = 1.0  # max global gradient norm; 0 = no clipping
    clip_range: float = 0.03
    kl_weight: float = 0.0
    # FDFO: the fraction of each trajectory's stored steps trained on per epoch (1.0 = all, as published);
    # each row's steps are drawn uniformly without replacement per epoch (an unbiased estimate of the loss).
    timestep_fraction: float = 1.0
    seed: int = 0
    kernels: str = field(default="auto", metadata=_choices("auto", "triton", "torch"))
    offload_text_encoders: bool = True  # move text encoders to CPU while training (GPU only)
    # torch.compile the trained transformer through DeepSpeed's engine.compile (in place: the calls
    # that sample from the module itself run compiled too). The first epoch pays the compilation.
    compile: bool = False
    # Recompute each transformer block's activations in the backward pass instead of keeping them (diffusers'
    # own gradient checkpointing): less memory for 1024² or full fine-tuning, about a third more training compute.
    gradient_checkpointing: bool = False
    # Where the epoch's stored trajectories wait between sampling and training: "device" (the GPU), or
    # "host": pinned CPU memory, copied back one micro-batch ahead of training (fdfo/trajectories.py).
    trajectory_device: str = field(default="device", metadata=_choices("device", "host"))


@dataclass
class GRPOConfig:
    """Flow-GRPO baseline (train.algorithm: flow_grpo), as its public code configures it."""

    noise_level: float = 0.7  # a in σ_t = a·sqrt(σ/(1−σ))
    group_size: int = 24  # images per prompt
    groups_per_epoch: int = 48  # over all ranks
    clip_range: float = 1e-4  # PPO clip
    kl_beta: float = 0.01  # β·‖μ_θ − μ_ref‖²/(2σ_t²); 0 = no KL
    adv_clip: float = 5.0
    train_steps: int | None = None  # leading SDE steps trained per trajectory; None = all but the last
    optimizer_steps_per_epoch: int = 2


@dataclass
class DataConfig:
    # A text file with one prompt per line, or "builtin:digits".
    prompts: str = "builtin:digits"
    eval_prompts: str | None = None  # default: the training prompts


@dataclass
class RewardConfig:
    # name -> weight; the reward is the weighted sum (docs/algorithm.md §2).
    weights: dict[str, float] = field(default_factory=lambda: {"pickscore": 1.0, "vlm_alignment": 0.1})
    # name -> weights path (directory or hub id); "builtin" for the digits task's models;
    # absent = the published weights (hub ids of PickScore, Qwen2.5-VL-7B-Instruct, CLIP).
    paths: dict[str, str] = field(default_factory=dict)
    batch_size: int = 8  # images per reward-model forward
    device: str | None = None  # e.g. "cuda:1" to keep reward models off the training GPU


@dataclass
class EvalConfig:
    every: int = 5  # epochs; 0 = never
    num_images: int = 64
    seed: int = 1234
    # Rewards/metrics averaged over a fixed, deterministic (no churn) evaluation set.
    metrics: list[str] = field(default_factory=list)


@dataclass
class LogConfig:
    out_dir: str = "runs/sd35"
    plot_every: int = 5  # epochs between reward-curve and sample-grid PNGs; 0 = never
    grid_pairs: int = 8  # rows of the sample grid: pairs (FDFO), or groups (Flow-GRPO, 8 images of each)
    wandb: bool = False
    wandb_project: str = "fdfo"
    tensorboard: bool = False
    progress: bool = True


@dataclass
class CheckpointConfig:
    every: int = 5  # epochs; 0 = never
    keep_last: int = 0  # 0 = keep all


@dataclass
class DeepSpeedConfig:
    # ZeRO stage; None = the stage named in `config`, else 0 (replicated, DDP-style).
    zero_stage: int | None = field(default=None, metadata=_choices(0, 1, 2, 3))
    # A DeepSpeed JSON (configs/ds/*.json) merged in for ZeRO and offload settings. Batch sizes always come
    # from the run config (train.micro_batch_rows and the epoch layout); a contradicting value there is an error.
    config: str | None = None
    # ZeRO-3: sample from a persistent unpartitioned copy of the transformer (one more copy of its
    # weights per GPU; refreshed in place each epoch, so a CUDA graph over it is captured once per run).
    # false: gather the partitioned weights into the module for each sampling phase instead.
    inference_copy: bool = True


@dataclass
class RunConfig:
    name: str = "sd35-medium-fdfo"
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    data: DataConfig = field(default_factory=DataConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- typing


def _check_value(key: str, value: Any, tp: Any, meta: typing.Mapping) -> Any:
    """Coerce ``value`` to the annotated type ``tp`` or raise a ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _check_value(key, value, inner[0], meta)
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
    choices = meta.get("choices")
    replaced = meta.get("replaced", {})
    if choices is not None and value in replaced:
        raise ConfigError(f"config key '{key}' is {value!r}, which was replaced by {replaced[value]}; "
                          f"valid values: {', '.join(map(str, choices))}")
    if choices is not None and value not in choices:
        raise ConfigError(f"config key '{key}' is {value!r}; valid values: {', '.join(map(str, choices))}")
    return value


class Entries(dict):
    """A mapping reached by a dotted CLI key (``--reward.weights.NAME``): its entries update the
    mapping the lower layers built (``None`` removes one) instead of replacing it."""


def _merge_entries(key: str, current: dict, entries: Entries, tp: Any) -> dict:
    merged = dict(current)
    for name, value in entries.items():
        if value is not None:
            merged[name] = value
        elif name in merged:
            del merged[name]
        else:
            raise ConfigError(f"config key '{key}.{name}' is null (remove the entry), but '{key}' has no entry "
                              f"'{name}'; its entries: {', '.join(map(str, merged)) or 'none'}")
    return _check_value(key, merged, tp, {})


# Keys that no longer exist -> what replaced them.
_REMOVED: dict[str, str] = {
    f"sampling.churn_logit_{name}": "the 'logit_normal' churn schedule it configured was replaced by the published "
                                    "'interval' schedule (sampling.churn_interval_mu, churn_interval_sigma, "
                                    "churn_interval_weight, churn_interval_weight_sigma, churn_interval_soft_sigma)"
    for name in ("mean", "std")
}


def _apply(obj: Any, updates: dict, prefix: str = "") -> None:
    hints = typing.get_type_hints(type(obj))
    fields = {f.name: f for f in dataclasses.fields(obj)}
    for key, value in updates.items():
        full = f"{prefix}{key}"
        if full in _REMOVED:
            raise ConfigError(f"config key '{full}' was removed: {_REMOVED[full]}")
        if key not in fields:
            raise ConfigError(
                f"unknown config key '{full}'; valid keys{' in ' + prefix[:-1] if prefix else ''}: "
                f"{', '.join(sorted(fields))}"
            )
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{full}' is a section; give a mapping of its keys "
                                  f"({', '.join(f.name for f in dataclasses.fields(current))})")
            _apply(current, value, prefix=f"{full}.")
        elif isinstance(value, Entries) and typing.get_origin(hints[key]) is dict:
            setattr(obj, key, _merge_entries(full, current, value, hints[key]))
        else:
            setattr(obj, key, _check_value(full, value, hints[key], fields[key].metadata))


@dataclass(frozen=True)
class _Range:
    ok: Callable[[Any], bool]
    valid: str  # what is valid, for the message


def _above(low: float) -> _Range:
    return _Range(lambda v: v > low, "positive" if low == 0 else f"> {low}")


def _at_least(low: float) -> _Range:
    return _Range(lambda v: v >= low, f">= {low}")


def _optional(rule: _Range) -> _Range:
    return _Range(lambda v: v is None or rule.ok(v), f"null or {rule.valid}")


_BETA = _Range(lambda v: 0 <= v < 1, "in [0, 1)")

# key -> the values a run can use.
_RANGES: dict[str, _Range] = {
    "model.resolution": _Range(lambda v: v > 0 and v % 16 == 0,
                               "a positive multiple of 16 (VAE factor 8 × patch 2)"),
    "model.flux_guidance": _optional(_above(0)),
    "model.max_sequence_length": _at_least(1),
    "lora.rank": _above(0),
    "lora.alpha": _above(0),
    "sampling.steps": _above(0),
    "sampling.guidance_scale": _above(0),
    "sampling.shift": _optional(_above(0)),
    "sampling.churn_weight": _at_least(0),
    "sampling.churn_prior_weight": _at_least(0),
    "sampling.churn_prior_weight_sigma": _at_least(0),
    "sampling.churn_interval_sigma": _at_least(0),
    "sampling.churn_interval_weight": _at_least(0),
    "sampling.churn_interval_weight_sigma": _at_least(0),
    "sampling.churn_interval_soft_sigma": _above(0),
    "sampling.micro_batch_pairs": _above(0),
    "train.epochs": _above(0),
    "train.pairs_per_epoch": _above(0),
    "train.optimizer_steps_per_epoch": _above(0),
    "train.micro_batch_rows": _above(0),
    "train.learning_rate": _above(0),
    "train.adam_beta1": _BETA,
    "train.adam_beta2": _BETA,
    "train.adam_eps": _above(0),
    "train.weight_decay": _at_least(0),
    "train.grad_clip": _at_least(0),
    "train.clip_range": _above(0),
    "train.timestep_fraction": _Range(lambda v: 0 < v <= 1, "in (0, 1]"),
    "train.kl_weight": _at_least(0),
    "grpo.noise_level": _above(0),
    "grpo.group_size": _at_least(2),
    "grpo.groups_per_epoch": _at_least(1),
    "grpo.clip_range": _above(0),
    "grpo.kl_beta": _at_least(0),
    "grpo.adv_clip": _above(0),
    "grpo.train_steps": _optional(_at_least(1)),
    "grpo.optimizer_steps_per_epoch": _at_least(1),
    "reward.weights": _Range(lambda w: any(v != 0 for v in w.values()),
                             "a mapping with at least one non-zero weight, e.g. {pickscore: 1.0}"),
    "reward.batch_size": _at_least(1),
    "eval.every": _at_least(0),
    "log.plot_every": _at_least(0),
    "log.grid_pairs": _at_least(0),
    "checkpoint.every": _at_least(0),
    "checkpoint.keep_last": _at_least(0),
}
# key -> (the key that switches it on, its range while that key is non-zero or true).
_RANGES_WHEN: dict[str, tuple[str, _Range]] = {
    "eval.num_images": ("eval.every", _at_least(1)),
    "lora.target_modules": ("lora.enabled", _Range(lambda v: v is None or bool(v),
                                                   "null (the model family's default) or a non-empty list of "
                                                   "module names")),
}


def _get(cfg: RunConfig, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


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


def _check_reward_names(cfg: RunConfig) -> None:
    from fdfo.rewards import reward_factories  # (imported here: it imports torch)

    valid = sorted(reward_factories())
    for key, names in (("reward.weights", cfg.reward.weights), ("eval.metrics", cfg.eval.metrics)):
        for name in names:
            if name not in valid:
                close = difflib.get_close_matches(name, valid, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise ConfigError(f"config key '{key}' names unknown reward '{name}'{hint}; "
                                  f"valid rewards: {', '.join(valid)}")


def _validate(cfg: RunConfig) -> None:
    """Start-up checks: finite floats, every value in its range, known reward names, and the algorithm's own checks.

    The epoch layout (whether the batch sizes divide) depends on the number of ranks and
    is checked when the trainer starts (``Algorithm.layout_for``)."""
    for key, value in _floats(cfg):
        if not math.isfinite(value):
            raise ConfigError(f"config key '{key}' must be a finite number, got {value!r}")
    for key, rule in _RANGES.items():
        value = _get(cfg, key)
        if not rule.ok(value):
            raise ConfigError(f"config key '{key}' must be {rule.valid}, got {value!r}")
    for key, (switch, rule) in _RANGES_WHEN.items():
        value, on = _get(cfg, key), _get(cfg, switch)
        if on and not rule.ok(value):
            raise ConfigError(f"config key '{key}' must be {rule.valid} while {switch} is {json.dumps(on)}, "
                              f"got {value!r}")
    _check_reward_names(cfg)
    if cfg.lora.init_adapter and not cfg.lora.enabled:
        raise ConfigError("config key 'lora.init_adapter' needs lora.enabled true (a starting adapter is a LoRA "
                          "adapter); remove it or enable LoRA")
    from fdfo import algorithms  # (imported here: the algorithms import this module)

    algorithms.get(cfg.train.algorithm).check(cfg)
    stray = sorted(set(cfg.reward.paths) - set(cfg.reward.weights) - set(cfg.eval.metrics))
    if stray:
        raise ConfigError(f"config key 'reward.paths' names {stray}, which is neither in reward.weights nor in "
                          f"eval.metrics ({', '.join(sorted(set(cfg.reward.weights) | set(cfg.eval.metrics)))})")


# --------------------------------------------------------------------------- loading


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


def build_config(base: dict | None = None, *layers: dict) -> RunConfig:
    """Defaults, then ``base`` (a preset or YAML file), then each override layer; validated."""
    cfg = RunConfig()
    for layer in (base or {}), *layers:
        _apply(cfg, layer)
    _validate(cfg)
    return cfg
