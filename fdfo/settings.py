"""The run config: the shared sections and every part's own, resolved in one step (``build_config``).

The shared sections are ``fdfo.config``'s. The parts add theirs: each algorithm of
``fdfo.algorithms.ALGORITHMS`` its ``Settings`` under its name (``fdfo:``,
``flow_grpo:``), the churn schedules theirs under ``churn:`` (``fdfo.sampling``),
and each model family of ``fdfo.models.FAMILIES`` with ``Options`` under its name
(``flux:``). A new algorithm or family therefore brings its section with its
registry line, and nothing here changes.

``build_config`` type-checks every layer, runs the checks that need the registries
(reward names, the algorithm's own), and refuses a setting that the run would not
read: a key of an algorithm or churn schedule that is not chosen, set away from its
default. The model family is known only from the model's files, so its sections are
checked when a command settles the model (``check_family``). The result is frozen;
``with_overrides`` gives a changed copy, through the same checks.

The defaults are the published FDFO recipe for SD3.5 Medium (docs/algorithm.md §4-5).
A built-in task's default job is a preset on top of them (``--config builtin:digits``,
``fdfo.tasks.preset``).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
from dataclasses import field

from fdfo import algorithms, models
from fdfo.config import SHARED_SECTIONS, load
from fdfo.errors import ConfigError
from fdfo.rewards import plugin, reward_factories
from fdfo.sampling import SCHEDULES, ChurnConfig


class RunConfig:
    """A resolved run config (the frozen dataclass ``schema()`` makes); its sections are attributes."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def read_dict(self) -> dict:
        """``to_dict`` without the sections the run does not read (another algorithm's, another churn
        schedule's): a config file that loads back as this config whatever the job it started from."""
        out = self.to_dict()
        for key in unread_sections(self):
            *path, last = key.split(".")
            node = out
            for part in path:
                node = node[part]
            del node[last]
        return out


def parts() -> tuple[tuple[str, type, str], ...]:
    """(section name, dataclass, the shared section it follows) of every part's own section."""
    return (("churn", ChurnConfig, "sampling"),
            *((name, algorithm.Settings, "train") for name, algorithm in algorithms.ALGORITHMS.items()),
            *((family.family, family.Options, "model") for family in models.FAMILIES if family.Options is not None))


def schema() -> type:
    """The run config's dataclass: ``name``, the shared sections, each followed by the parts' that belong to it."""
    return _schema(parts())


@functools.cache
def _schema(own: tuple[tuple[str, type, str], ...]) -> type:
    fields = [("name", str, field(default="sd35-medium-fdfo", metadata={"doc": "the run's name (trackers show it)"}))]
    for shared, cls in SHARED_SECTIONS.items():
        fields.append((shared, cls, field(default_factory=cls)))
        fields += [(name, part, field(default_factory=part)) for name, part, after in own if after == shared]
    return dataclasses.make_dataclass("RunConfig", fields, bases=(RunConfig,), frozen=True)


# Keys that no longer exist -> where they went (a file or command line naming one gets that answer).
_MOVED: dict[str, str] = {
    **{f"train.{key}": f"fdfo.{key}" for key in ("pairs_per_epoch", "optimizer_steps_per_epoch", "clip_range",
                                                  "kl_weight", "timestep_fraction")},
    "grpo": "flow_grpo",
    "sampling.churn_schedule": "churn.schedule",
    "sampling.churn_weight": "churn.raw.weight",
    "sampling.churn_prior_weight": "churn.prior.weight",
    "sampling.churn_prior_weight_sigma": "churn.prior.weight_sigma",
    **{f"sampling.churn_interval_{key}": f"churn.interval.{key}"
       for key in ("mu", "sigma", "weight", "weight_sigma", "soft_sigma")},
    "model.flux_guidance": "flux.guidance",
    "sampling.compile": "model.compile",  # one compiled transformer serves both phases
    "train.compile": "model.compile",
}
_REMOVED: dict[str, str] = {
    f"sampling.churn_logit_{name}": "the 'logit_normal' churn schedule it configured was replaced by the published "
                                    "'interval' schedule (churn.schedule: interval, and churn.interval.*)"
    for name in ("mean", "std")
}
MESSAGES: dict[str, str] = {
    **{old: f"moved to '{new}': write it there" for old, new in _MOVED.items()},
    **{old: f"was removed: {why}" for old, why in _REMOVED.items()},
}


def build_config(base: dict | None = None, *layers: dict, under: dict | None = None) -> RunConfig:
    """Defaults, then ``under`` (a built-in task's default job), ``base`` (a YAML file) and each override layer;
    checked and frozen.

    A key of a part the run does not read is an error only where these layers set it away from what the
    defaults and ``under`` give it: a task's default job may carry its settings for several algorithms."""
    cls = schema()
    cfg = load(cls, (under or {}, base or {}, *layers), moved=MESSAGES)
    reference = load(cls, (under,), moved=MESSAGES) if under else cls()
    _check(cfg, reference)
    return cfg


def with_overrides(cfg: RunConfig, *layers: dict) -> RunConfig:
    """``cfg`` changed by ``layers`` (nested dicts of keys), through the same checks as ``build_config``."""
    return build_config(None, *layers, under=cfg.to_dict())


def migrate(saved: dict) -> dict:
    """A run config saved by an earlier version (a checkpoint's), with every moved key in its new place."""
    out = copy.deepcopy(saved)
    for old, new in _MOVED.items():
        *path, last = old.split(".")
        parent = functools.reduce(lambda node, part: node.get(part) or {}, path, out)
        if last in parent:
            *to, name = new.split(".")
            functools.reduce(lambda node, part: node.setdefault(part, {}), to, out)[name] = parent.pop(last)
            if path and not parent:  # a section the move emptied
                del out[path[0]]
    return out


# --------------------------------------------------------------------------- checks


def _check(cfg: RunConfig, reference: RunConfig) -> None:
    """The checks that need the registries, or more than one section; ``reference``: the config the unread
    parts' sections may keep (the defaults, or a task's default job)."""
    _check_reward_names(cfg)
    if cfg.lora.init_adapter and not cfg.lora.enabled:
        raise ConfigError("config key 'lora.init_adapter' needs lora.enabled true (a starting adapter is a LoRA "
                          "adapter); remove it or enable LoRA")
    algorithms.get(cfg.train.algorithm).check(cfg)
    stray = sorted(set(cfg.reward.paths) - set(cfg.reward.weights) - set(cfg.eval.metrics))
    if stray:
        raise ConfigError(f"config key 'reward.paths' names {stray}, which is neither in reward.weights nor in "
                          f"eval.metrics ({', '.join(sorted(set(cfg.reward.weights) | set(cfg.eval.metrics)))})")
    unread(cfg, reference, "train.algorithm", {name: name for name in algorithms.ALGORITHMS})
    unread(cfg, reference, "churn.schedule", {name: f"churn.{name}" for name in SCHEDULES})


def _check_reward_names(cfg: RunConfig) -> None:
    valid = sorted(reward_factories())
    for key, names in (("reward.weights", cfg.reward.weights), ("eval.metrics", cfg.eval.metrics)):
        for name in names:
            if plugin.is_spec(name):
                try:
                    plugin.resolve(name)
                except ConfigError as exc:
                    raise ConfigError(f"config key '{key}' names {exc}") from None
            elif name not in valid:
                close = difflib.get_close_matches(name, valid, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise ConfigError(f"config key '{key}' names unknown reward '{name}'{hint}; "
                                  f"valid rewards: {', '.join(valid)}")


def _get(cfg, key: str):
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def unread_sections(cfg: RunConfig) -> list[str]:
    """The dotted names of the sections of the algorithms and churn schedules that ``cfg`` does not choose."""
    return ([name for name in algorithms.ALGORITHMS if name != cfg.train.algorithm]
            + [f"churn.{name}" for name in SCHEDULES if name != cfg.churn.schedule])


def _first_change(section, reference) -> tuple[str, object] | None:
    """(field, value) of the first field of ``section`` that differs from ``reference``'s, or None."""
    return next(((f.name, getattr(section, f.name)) for f in dataclasses.fields(section)
                 if getattr(section, f.name) != getattr(reference, f.name)), None)


def unread(cfg: RunConfig, reference: RunConfig, selector: str, sections: dict[str, str]) -> None:
    """A ConfigError for a key of a section that the choice ``selector`` leaves unread (``sections``: each
    option -> its section), set away from its value in ``reference``."""
    chosen = _get(cfg, selector)
    for option, key in sections.items():
        if option == chosen:
            continue
        change = _first_change(_get(cfg, key), _get(reference, key))
        if change is not None:
            name, value = change
            raise ConfigError(f"config key '{key}.{name}' is set ({value!r}), but {selector} is {chosen!r}, "
                              f"which does not read it: remove it, or set {selector} to {option!r}")


def check_family(cfg: RunConfig, family: type) -> None:
    """The model family's checks, once it is known: its attention backend, and no key of another family's
    section set away from its default."""
    family.check_settings(cfg.model)
    for other in models.FAMILIES:
        if other is family or other.Options is None:
            continue
        change = _first_change(getattr(cfg, other.family), other.Options())
        if change is not None:
            raise ConfigError(f"config key '{other.family}.{change[0]}' is a {other.family} setting, but model.path "
                              f"'{cfg.model.path}' is a {family.family} model: remove it")


def family_settings(run_config: dict) -> dict[str, dict]:
    """family name -> its own settings in a run config (a dict, of any version) that differ from their
    defaults: a run at the defaults samples like a bare adapter, and records the same settings."""
    run_config = migrate(run_config)
    out = {}
    for family in models.FAMILIES:
        if family.Options is None:
            continue
        default = dataclasses.asdict(family.Options())
        changed = {key: value for key, value in (run_config.get(family.family) or {}).items()
                   if value is not None and value != default.get(key)}  # (null: the default, as earlier runs wrote it)
        if changed:
            out[family.family] = changed
    return out


def family_options(cfg: RunConfig, family: type):
    """The family's own section of ``cfg`` (None for a family without one)."""
    return getattr(cfg, family.family) if family.Options is not None else None
