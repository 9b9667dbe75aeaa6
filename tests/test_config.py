"""Configuration: published defaults, YAML + CLI overrides, and errors that name the problem."""

import dataclasses
import re
import typing
from pathlib import Path

import pytest
import torch
import yaml

from fdfo import algorithms
from fdfo.config import entries, load_yaml, parse_overrides
from fdfo.errors import ConfigError
from fdfo.settings import build_config, migrate, schema, with_overrides
from fdfo.models import SD3FlowModel
from fdfo.tasks.digits import PRESET as DIGITS

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_are_the_published_recipe():
    cfg = build_config()
    assert cfg.train.learning_rate == 3e-5 and cfg.train.weight_decay == 1e-4
    assert (cfg.train.adam_beta1, cfg.train.adam_beta2, cfg.train.adam_eps) == (0.9, 0.999, 1e-8)
    assert cfg.train.grad_clip == 1.0 and cfg.fdfo.clip_range == 0.03 and cfg.fdfo.kl_weight == 0.0
    assert cfg.fdfo.pairs_per_epoch == 432 and cfg.fdfo.optimizer_steps_per_epoch == 4
    assert cfg.sampling.steps == 40 and cfg.churn.raw.weight == 0.0025 and cfg.sampling.guidance_scale == 1.0
    assert cfg.lora.rank == 32 and cfg.lora.alpha == 64 and cfg.lora.init == "gaussian"
    assert cfg.lora.target_modules is None  # the family's default: for SD3, the joint attention only
    assert set(SD3FlowModel.LORA_TARGETS) == {"attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                                              "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"}
    assert cfg.checkpoint.every == 5 and cfg.model.resolution == 512 and cfg.model.max_sequence_length == 128
    assert cfg.reward.weights == {"pickscore": 1.0, "vlm_alignment": 0.1}
    c = cfg.churn  # the published churn schedules' parameters (docs/algorithm.md §1.4)
    assert c.schedule == "raw" and (c.prior.weight, c.prior.weight_sigma) == (0.1, 1.0)
    assert (c.interval.mu, c.interval.sigma, c.interval.weight, c.interval.weight_sigma,
            c.interval.soft_sigma) == (1.0, 1.5, 1.0, 0.0, 0.25)


def test_churn_amounts_are_the_chosen_schedules(monkeypatch):
    """The sampler gets the chosen schedule's parameters, and only those."""
    from fdfo import sampling

    seen = []
    monkeypatch.setattr(sampling, "churn_schedule", lambda name, **kw: seen.append((name, kw)))
    sigmas = torch.linspace(1, 0, 5)
    build_config({"churn": {"raw": {"weight": 0.02}}}).churn.amounts(sigmas, 4)
    build_config({"churn": {"schedule": "prior", "prior": {"weight": 0.3}}}).churn.amounts(sigmas, 4)
    build_config({}, parse_overrides(["--churn.schedule", "interval", "--churn.interval.mu", "-0.5"])).churn.amounts(
        sigmas, 4)
    common = {"sigmas": sigmas, "rows": 4, "generator": None}
    assert seen == [("raw", {**common, "weight": 0.02}), ("prior", {**common, "weight": 0.3, "weight_sigma": 1.0}),
                    ("interval", {**common, "mu": -0.5, "sigma": 1.5, "weight": 1.0, "weight_sigma": 0.0,
                                  "soft_sigma": 0.25})]


@pytest.mark.parametrize("layer, match", [
    ({"churn": {"prior": {"weight": 0.3}}}, r"^config key 'churn\.prior\.weight' is set \(0\.3\), but churn\.schedule "
                                            r"is 'raw', which does not read it: remove it, or set churn\.schedule to "
                                            r"'prior'$"),
    ({"train": {"algorithm": "flow_grpo"}, "fdfo": {"clip_range": 0.9}},
     r"^config key 'fdfo\.clip_range' is set \(0\.9\), but train\.algorithm is 'flow_grpo', which does not read it"),
    ({"flow_grpo": {"clip_range": 0.9}}, r"^config key 'flow_grpo\.clip_range' is set \(0\.9\), but train\.algorithm "
                                         r"is 'fdfo'"),
])
def test_a_key_the_run_does_not_read_is_an_error(layer, match):
    with pytest.raises(ConfigError, match=match):
        build_config(layer)


def test_a_task_default_job_may_hold_settings_of_other_parts():
    """The digits job's FDFO settings stay when a run picks Flow-GRPO on it (they are its defaults), but a
    key set on top of it for the part that is not chosen is refused."""
    cfg = build_config(None, {"train": {"algorithm": "flow_grpo"}}, under=DIGITS)
    assert cfg.fdfo.clip_range == 0.3 and cfg.train.algorithm == "flow_grpo"
    with pytest.raises(ConfigError, match="'fdfo.clip_range' is set"):
        build_config(None, {"train": {"algorithm": "flow_grpo"}, "fdfo": {"clip_range": 0.5}}, under=DIGITS)
    with pytest.raises(ConfigError, match="'fdfo.pairs_per_epoch' is set"):  # as a YAML file, the job is the user's
        build_config(DIGITS, {"train": {"algorithm": "flow_grpo"}})


@pytest.mark.parametrize("old, new", [
    ("train.clip_range", "fdfo.clip_range"), ("train.pairs_per_epoch", "fdfo.pairs_per_epoch"),
    ("sampling.churn_schedule", "churn.schedule"), ("sampling.churn_interval_mu", "churn.interval.mu"),
    ("grpo.group_size", "flow_grpo"), ("model.flux_guidance", "flux.guidance"),
])
def test_moved_keys_say_where_they_went(old, new):
    with pytest.raises(ConfigError, match=rf"^config key '{re.escape(old.split('.')[0] if new == 'flow_grpo' else old)}' "
                                          rf"moved to '{re.escape(new)}'"):
        build_config({}, parse_overrides([f"--{old}", "1"]))


def test_a_saved_config_of_the_former_layout_migrates():
    old = {"train": {"clip_range": 0.3, "learning_rate": 1e-3}, "grpo": {"group_size": 6},
           "sampling": {"steps": 10, "churn_schedule": "interval", "churn_interval_mu": 0.5},
           "model": {"flux_guidance": None}, "reward": {"weights": {"pickscore": 1.0}}}
    assert migrate(old) == {"fdfo": {"clip_range": 0.3}, "train": {"learning_rate": 1e-3},
                            "flow_grpo": {"group_size": 6},
                            "sampling": {"steps": 10}, "churn": {"schedule": "interval", "interval": {"mu": 0.5}},
                            "flux": {"guidance": None}, "reward": {"weights": {"pickscore": 1.0}}}


def test_the_config_is_frozen_and_changes_through_the_checks():
    cfg = build_config(DIGITS)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.epochs = 3
    assert with_overrides(cfg, {"train": {"epochs": 3}}).train.epochs == 3 and cfg.train.epochs == 25
    with pytest.raises(ConfigError, match="'train.epochs' must be positive"):
        with_overrides(cfg, {"train": {"epochs": 0}})


@pytest.mark.parametrize("override, match", [
    (["--churn.schedule", "first"], r"^config key 'churn\.schedule' is 'first', which was "
                                             r"replaced by the published 'prior' schedule .*; valid values: raw, "
                                             r"prior, interval$"),
    (["--churn.schedule", "logit_normal"], r"'logit_normal', which was replaced by the published "
                                                    r"'interval' schedule .*; valid values: raw, prior, interval$"),
    (["--sampling.churn_logit_mean", "0.5"], r"^config key 'sampling\.churn_logit_mean' was removed: .*'interval' "
                                             r"schedule \(churn\.schedule: interval"),
    (["--sampling.churn_logit_std", "1"], r"^config key 'sampling\.churn_logit_std' was removed: .*'interval'"),
])
def test_replaced_churn_names_say_what_replaced_them(override, match):
    with pytest.raises(ConfigError, match=match):
        build_config({}, parse_overrides(override))


def test_overrides_and_yaml(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"train": {"learning_rate": 1e-4, "epochs": 3}, "log": {"wandb": True}}))
    cfg = build_config(load_yaml(path), parse_overrides(["--train.learning_rate", "2e-4", "--sampling.steps=20",
                                                         "--lora.target_modules", "to_q,to_k"]))
    assert cfg.train.learning_rate == 2e-4 and cfg.train.epochs == 3 and cfg.log.wandb is True
    assert cfg.sampling.steps == 20 and cfg.lora.target_modules == ["to_q", "to_k"]
    assert isinstance(build_config({"train": {"learning_rate": 1}}).train.learning_rate, float)


def test_unknown_key_names_it_and_lists_valid_keys():
    with pytest.raises(ConfigError, match=r"unknown config key 'train\.learning_rte'.*learning_rate"):
        build_config({}, parse_overrides(["--train.learning_rte", "1e-4"]))
    with pytest.raises(ConfigError, match=r"unknown config key 'trian'.*train"):
        build_config({"trian": {}})


@pytest.mark.parametrize("override, match", [
    (["--train.epochs", "ten"], r"'train.epochs' must be an integer"),
    (["--train.learning_rate", "fast"], r"'train.learning_rate' must be a number"),
    (["--churn.schedule", "cosine"], r"'churn.schedule' is 'cosine'; valid values: raw, prior, "
                                              r"interval$"),
    (["--log.wandb", "maybe"], r"'log.wandb' must be true or false"),
    (["--train.learning_rate", "-1"], r"'train.learning_rate' must be positive"),
    (["--train", "3"], r"'train' is a section"),
    (["--train.epochs"], r"has no value"),
])
def test_bad_values_are_named(override, match):
    with pytest.raises(ConfigError, match=match):
        build_config({}, parse_overrides(override))


def test_epoch_layout_divisibility():
    cfg = build_config(DIGITS)
    fdfo = algorithms.get("fdfo")
    layout = fdfo.layout_for(cfg, world_size=1)
    assert layout.elements_per_rank == 2 * 64 * 10 and layout.grad_accum * 80 * 4 == 1280
    assert fdfo.layout_for(cfg, world_size=2).elements_per_rank == 2 * 32 * 10
    bad = build_config(DIGITS, {"train": {"micro_batch_rows": 7}})
    with pytest.raises(ConfigError, match=r"micro_batch_rows=7 must divide the 320 elements.*nearest to 7: "
                                          r"\[1, 2, 4, 5, 8, 10, 16, 20\]"):
        fdfo.layout_for(bad, 1)
    # The list reaches the large valid values a GPU config uses (SD3.5's 8,640 elements per step: 80 is one).
    assert "80" in str(pytest.raises(ConfigError, fdfo.layout_for,
                                     build_config(DIGITS, {"train": {"micro_batch_rows": 81}}), 1).value)
    with pytest.raises(ConfigError, match="divisible by the world size 3"):
        fdfo.layout_for(cfg, 3)
    grpo = build_config(None, {"train": {"algorithm": "flow_grpo", "micro_batch_rows": 6},
                               "flow_grpo": {"groups_per_epoch": 4, "group_size": 6, "optimizer_steps_per_epoch": 2}},
                        under=DIGITS)
    # Per rank of 2: 2 groups x 6 images = 12 rows; x 9 trained steps (all but the last of 10) = 108
    # elements, in 2 optimizer steps of 54 = 9 micro-batches of 6.
    layout = algorithms.get("flow_grpo").layout_for(grpo, world_size=2)
    assert (layout.rows_per_rank, layout.elements_per_rank, layout.elements_per_step, layout.grad_accum) == \
        (12, 108, 54, 9)
    grpo = with_overrides(grpo, {"train": {"micro_batch_rows": 12}})
    with pytest.raises(ConfigError, match="micro_batch_rows=12 must divide the 54 Flow-GRPO training elements.*"
                                          r"\[1, 2, 3, 6, 9, 18, 27, 54\]"):
        algorithms.get("flow_grpo").layout_for(grpo, world_size=2)
    grpo = with_overrides(grpo, {"flow_grpo": {"optimizer_steps_per_epoch": 5}})
    with pytest.raises(ConfigError, match="108 Flow-GRPO training elements .* into flow_grpo.optimizer_steps_per_epoch=5"):
        algorithms.get("flow_grpo").layout_for(grpo, world_size=2)


def test_kl_term_without_lora_is_a_startup_error():
    with pytest.raises(ConfigError, match="fdfo.kl_weight.*needs LoRA"):
        build_config(DIGITS, {"lora": {"enabled": False}, "fdfo": {"kl_weight": 0.1}})
    with pytest.raises(ConfigError, match="flow_grpo.kl_beta.*needs LoRA"):
        build_config(None, {"lora": {"enabled": False}, "train": {"algorithm": "flow_grpo"}}, under=DIGITS)
    build_config(None, {"lora": {"enabled": False}, "train": {"algorithm": "flow_grpo"}, "flow_grpo": {"kl_beta": 0.0}},
                 under=DIGITS)


def test_yaml_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_yaml(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_yaml(bad)


def test_shipped_configs_load_and_builtin_digits_is_the_preset():
    from fdfo import tasks

    configs = sorted((ROOT / "configs").glob("*.yaml"))
    assert configs
    for path in configs:
        build_config(load_yaml(path))
    preset = tasks.preset("builtin:digits")
    assert preset == DIGITS and preset is not DIGITS
    preset["train"]["epochs"] = 1  # a copy: changing it leaves the task's default job alone
    assert DIGITS["train"]["epochs"] == 25
    cfg = build_config(tasks.preset("builtin:digits"))
    assert cfg == build_config(DIGITS)
    # The default job the README describes.
    assert cfg.model.path == cfg.data.prompts == "builtin:digits" and cfg.model.resolution == 16
    assert (cfg.train.epochs, cfg.fdfo.pairs_per_epoch, cfg.sampling.steps, cfg.lora.rank) == (25, 64, 10, 16)
    assert cfg.train.learning_rate == 3e-4 and cfg.fdfo.clip_range == 0.3
    assert cfg.churn.schedule == "interval" and cfg.churn.interval == schema()().churn.interval
    assert cfg.reward.weights == {"digit_probability": 1.0} and cfg.eval.every == 5 and cfg.eval.num_images == 200
    with pytest.raises(FileNotFoundError, match="unknown built-in 'builtin:mnist'; valid: builtin:digits"):
        tasks.preset("builtin:mnist")


# --------------------------------------------------------------------------- mapping overrides


def test_dotted_override_updates_one_mapping_entry(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"reward": {"weights": {"clip_score": 0.7, "pickscore": 1.5},
                                               "paths": {"pickscore": "weights/pick"}}}))
    cli = parse_overrides(["--reward.weights.vlm_alignment", "0.2", "--reward.weights.clip_score=0.35",
                           "--reward.paths.vlm_alignment", "weights/qwen", "--train.learning_rate", "2e-5"])
    cfg = build_config(load_yaml(path), cli)
    assert cfg.reward.weights == {"clip_score": 0.35, "pickscore": 1.5, "vlm_alignment": 0.2}
    assert cfg.reward.paths == {"pickscore": "weights/pick", "vlm_alignment": "weights/qwen"}
    assert cfg.train.learning_rate == 2e-5 and cfg.train.epochs == schema()().train.epochs
    # Onto the preset too; a bad value is named by its entry.
    assert build_config(DIGITS, parse_overrides(["--reward.weights.clip_score", "3"])).reward.weights == \
        {"digit_probability": 1.0, "clip_score": 3.0}
    with pytest.raises(ConfigError, match=r"'reward\.weights\.hpsv2' must be a number, got 'lots'"):
        build_config(load_yaml(path), parse_overrides(["--reward.weights.hpsv2", "lots"]))


def test_whole_mapping_replaces_it(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"reward": {"weights": {"clip_score_h14": 2.0, "hpsv2": 0.25}}}))
    # A file's mapping replaces the defaults' ...
    assert build_config(load_yaml(path)).reward.weights == {"clip_score_h14": 2.0, "hpsv2": 0.25}
    # ... and a whole mapping on the command line replaces the file's, whichever order it comes in.
    cfg = build_config(load_yaml(path), parse_overrides(["--reward.weights", "{pickscore: 0.5}"]))
    assert cfg.reward.weights == {"pickscore": 0.5}
    cfg = build_config(load_yaml(path), parse_overrides(["--reward.weights.hpsv2", "9",
                                                         "--reward.weights", "{clip_score: 4}"]))
    assert cfg.reward.weights == {"clip_score": 4.0}
    cfg = build_config(load_yaml(path), parse_overrides(["--reward.weights", "{clip_score: 4}",
                                                         "--reward.weights.hpsv2", "9"]))
    assert cfg.reward.weights == {"clip_score": 4.0, "hpsv2": 9.0}


def test_null_removes_one_mapping_entry(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"reward": {"weights": {"clip_score": 0.6, "hpsv2": 1.25},
                                               "paths": {"hpsv2": "weights/hps", "clip_score": "weights/clip"}}}))
    cfg = build_config(load_yaml(path), parse_overrides(["--reward.weights.hpsv2", "null",
                                                         "--reward.paths.hpsv2=null"]))
    assert cfg.reward.weights == {"clip_score": 0.6} and cfg.reward.paths == {"clip_score": "weights/clip"}
    with pytest.raises(ConfigError, match=r"'reward\.weights\.pick' is null.*no entry 'pick'.*clip_score, hpsv2"):
        build_config(load_yaml(path), parse_overrides(["--reward.weights.pick", "null"]))
    with pytest.raises(ConfigError, match=r"'reward\.weights' must be a mapping with at least one non-zero weight"):
        build_config(load_yaml(path), parse_overrides(["--reward.weights.hpsv2", "null",
                                                       "--reward.weights.clip_score", "~"]))


# --------------------------------------------------------------------------- ranges


def _types() -> dict:
    """Every setting's type, by its dotted key."""
    return {s.key: s.type for s in entries(schema())}


def _float_keys() -> list[str]:
    """Every float and optional float field, by its dotted key."""
    return [key for key, tp in _types().items() if float in (tp, *typing.get_args(tp)) and typing.get_origin(tp) is not dict]


def test_float_keys_are_walked():
    keys = _float_keys()
    assert {"train.learning_rate", "train.adam_eps", "sampling.shift", "lora.alpha", "flow_grpo.noise_level",
            "churn.interval.soft_sigma", "flux.guidance"} <= set(keys)
    assert "reward.weights" not in keys and "train.epochs" not in keys


@pytest.mark.parametrize("key", _float_keys())
def test_every_float_must_be_finite(key):
    for raw in ("nan", "-.inf", "inf"):
        with pytest.raises(ConfigError, match=rf"^config key '{key}' must be a finite number, got -?(nan|inf)$"):
            build_config({}, parse_overrides([f"--{key}", raw]))


@pytest.mark.parametrize("key", ["reward.weights.vlm_alignment", "reward.weights.clip_score"])
def test_mapping_floats_must_be_finite(key):
    with pytest.raises(ConfigError, match=rf"config key '{key}' must be a finite number, got nan"):
        build_config({}, parse_overrides([f"--{key}", ".nan"]))


@pytest.mark.parametrize("key, raw, valid", [
    ("train.learning_rate", "0", "positive"),
    ("train.adam_beta1", "1.0", r"in \[0, 1\)"),
    ("train.adam_beta1", "-0.1", r"in \[0, 1\)"),
    ("train.adam_beta2", "1.5", r"in \[0, 1\)"),
    ("train.adam_eps", "0", "positive"),
    ("train.weight_decay", "-3e-4", ">= 0"),
    ("train.grad_clip", "-0.5", ">= 0"),
    ("fdfo.clip_range", "-0.01", "positive"),
    ("fdfo.kl_weight", "-2", ">= 0"),
    ("churn.raw.weight", "-0.001", ">= 0"),
    ("sampling.guidance_scale", "0", "positive"),
    ("sampling.guidance_scale", "-4.5", "positive"),
    ("sampling.shift", "0", "null or positive"),
    ("churn.prior.weight", "-0.1", ">= 0"),
    ("churn.prior.weight_sigma", "-1", ">= 0"),
    ("churn.interval.sigma", "-1.5", ">= 0"),
    ("churn.interval.weight", "-1", ">= 0"),
    ("churn.interval.weight_sigma", "-0.5", ">= 0"),
    ("churn.interval.soft_sigma", "0", "positive"),
    ("churn.interval.soft_sigma", "-0.25", "positive"),
    ("lora.alpha", "-16", "positive"),
    ("lora.rank", "0", "positive"),
    ("eval.every", "-1", ">= 0"),
    ("checkpoint.every", "-5", ">= 0"),
    ("checkpoint.keep_last", "-2", ">= 0"),
    ("log.plot_every", "-3", ">= 0"),
    ("log.grid_pairs", "-1", ">= 0"),
    ("reward.batch_size", "0", ">= 1"),
    ("model.resolution", "0", "a positive multiple of 16"),
    ("model.resolution", "500", "a positive multiple of 16"),
    ("model.resolution", "-512", "a positive multiple of 16"),
    ("model.max_sequence_length", "0", ">= 1"),
    ("flow_grpo.noise_level", "0", "positive"),
    ("flow_grpo.group_size", "1", ">= 2"),
    ("flow_grpo.groups_per_epoch", "0", ">= 1"),
    ("flow_grpo.clip_range", "0", "positive"),
    ("flow_grpo.kl_beta", "-0.01", ">= 0"),
    ("flow_grpo.adv_clip", "0", "positive"),
    ("flow_grpo.train_steps", "0", "null or >= 1"),
    ("flow_grpo.optimizer_steps_per_epoch", "0", ">= 1"),
])
def test_values_out_of_range_are_named(key, raw, valid):
    tp = _types()[key]
    value = yaml.safe_load(raw)
    got = re.escape(repr(float(value) if float in (tp, *typing.get_args(tp)) else value))
    with pytest.raises(ConfigError, match=rf"^config key '{key}' must be {valid}.*, got {got}$"):
        build_config({}, parse_overrides([f"--{key}", raw]))


def test_ranges_that_depend_on_another_key():
    with pytest.raises(ConfigError, match=r"'eval\.num_images' must be >= 1 while eval\.every is 3, got 0"):
        build_config(DIGITS, parse_overrides(["--eval.every", "3", "--eval.num_images", "0"]))
    assert build_config(DIGITS, parse_overrides(["--eval.every", "0", "--eval.num_images", "0"])).eval.num_images == 0
    with pytest.raises(ConfigError, match=r"'lora\.target_modules' must be null \(the model family's default\) "
                                          r"or a non-empty list.*lora\.enabled is true"):
        build_config(DIGITS, parse_overrides(["--lora.target_modules", "[]"]))
    build_config(DIGITS, parse_overrides(["--lora.enabled", "false", "--lora.target_modules", "[]"]))


@pytest.mark.parametrize("weights", ["{pickscore: 0}", "{clip_score: 0.0, hpsv2: -0.0}", "{}"])
def test_reward_weights_need_a_non_zero_weight(weights):
    with pytest.raises(ConfigError, match=r"^config key 'reward\.weights' must be a mapping with at least one "
                                          r"non-zero weight.*, got \{"):
        build_config({}, parse_overrides(["--reward.weights", weights]))


def test_edge_values_that_runs_use_are_valid():
    cfg = build_config(DIGITS, parse_overrides([
        "--train.grad_clip", "0", "--train.weight_decay", "0", "--train.adam_beta1", "0", "--churn.schedule", "raw",
        "--churn.raw.weight", "0", "--sampling.guidance_scale", "0.5", "--sampling.shift", "1.5",
        "--checkpoint.every", "0", "--eval.every", "0", "--log.plot_every", "0", "--log.grid_pairs", "0",
        "--reward.weights.digit_probability", "-1", "--model.resolution", "32"]))
    assert cfg.train.grad_clip == 0 and cfg.sampling.shift == 1.5 and cfg.model.resolution == 32
    grpo = build_config(None, parse_overrides(["--train.algorithm", "flow_grpo", "--flow_grpo.train_steps", "1",
                                               "--flow_grpo.group_size", "2"]), under=DIGITS)
    assert (grpo.flow_grpo.train_steps, grpo.flow_grpo.group_size) == (1, 2)


# --------------------------------------------------------------------------- reward names


def test_unknown_reward_names_are_config_errors():
    with pytest.raises(ConfigError, match=r"^config key 'reward\.weights' names unknown reward 'digit_probabilty' "
                                          r"\(did you mean 'digit_probability'\?\); valid rewards: clip_score, "):
        build_config(DIGITS, parse_overrides(["--reward.weights", "{digit_probabilty: 1}"]))
    with pytest.raises(ConfigError, match=r"'eval\.metrics' names unknown reward 'clip_scor' \(did you mean "
                                          r"'clip_score'\?\).*digit_judge_accuracy"):
        build_config(DIGITS, parse_overrides(["--eval.metrics", "digit_probability,clip_scor"]))
    with pytest.raises(ConfigError, match=r"names unknown reward 'aesthetic'; valid rewards: .*vlm_alignment$"):
        build_config({}, parse_overrides(["--reward.weights.aesthetic", "0.5"]))
