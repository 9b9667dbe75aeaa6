"""The configuration reference comes from the config dataclasses: every setting has a meaning, --help
lists them all, --print-config keeps the meanings as comments and reads back as the same config, and
docs/configuration.md is current."""

from __future__ import annotations

import random
from pathlib import Path

import yaml

from fdfo.config import entries
from fdfo.reference import commented_yaml, help_text, main, markdown
from fdfo.settings import build_config, schema
from fdfo.tasks.digits import PRESET as DIGITS

ROOT = Path(__file__).resolve().parents[1]


def test_every_setting_has_a_meaning():
    settings = list(entries(schema()))
    assert len(settings) > 80
    assert [s.key for s in settings if not s.doc] == []


def test_help_lists_every_setting(capsys):
    from fdfo.train import parse_args

    try:
        parse_args(["--help"])
    except SystemExit as exc:
        assert exc.code == 0
    text = capsys.readouterr().out
    for s in entries(schema()):
        assert f"--{s.key}  {s.kind}" in text, s.key
    assert text.endswith(help_text() + "\n")


def test_print_config_keeps_the_comments_and_reads_back(capsys):
    from fdfo.train import main as train

    lr = random.choice([1e-4, 3e-4, 2e-3])
    assert train(["--print-config", "--train.learning_rate", str(lr), "--churn.interval.mu", "0.5"]) == 0
    text = capsys.readouterr().out
    assert "  learning_rate: " in text and "# AdamW's learning rate" in text
    assert "fdfo:  # FDFO's own settings" in text
    again = build_config(yaml.safe_load(text))
    assert again == build_config(None, {"train": {"learning_rate": lr}, "churn": {"interval": {"mu": 0.5}}},
                                 under=DIGITS)
    assert commented_yaml(again) == text


def test_the_configuration_reference_is_current(tmp_path):
    """docs/configuration.md is what `python -m fdfo.reference docs/configuration.md` writes."""
    assert (ROOT / "docs" / "configuration.md").read_text() == markdown()
    assert main(["--check", str(ROOT / "docs" / "configuration.md")]) == 0
    stale = tmp_path / "configuration.md"
    stale.write_text(markdown().replace("| `rank` | int | `32` |", "| `rank` | int | `16` |"))
    assert main(["--check", str(stale)]) == 1
    assert main([str(stale)]) == 0 and stale.read_text() == markdown()


def test_a_config_that_picks_another_part_prints_and_saves_without_the_unread_sections(capsys):
    """Flow-GRPO on the digits job: the job's FDFO settings and the unchosen churn schedules are not read,
    so --print-config and read_dict leave them out, and both load back as the same config."""
    from fdfo.train import main as train

    assert train(["--print-config", "--algorithm", "flow_grpo", "--flow_grpo.group_size", "4"]) == 0
    text = capsys.readouterr().out
    assert "\nfdfo:" not in text and "flow_grpo:" in text and "  raw:" not in text and "  interval:" in text
    cfg = build_config(None, {"train": {"algorithm": "flow_grpo"}, "flow_grpo": {"group_size": 4}}, under=DIGITS)
    assert build_config(yaml.safe_load(text)).flow_grpo == cfg.flow_grpo
    again = build_config(cfg.read_dict())
    assert "fdfo" not in cfg.read_dict() and again.flow_grpo == cfg.flow_grpo and again.churn == cfg.churn
