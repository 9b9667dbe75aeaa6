"""Prompt sets beyond a plain file: the published PickScore split built from Flow-GRPO's files, and a column of a
hub dataset (``hf:DATASET[:SPLIT]:COLUMN``, with ``datasets`` replaced by a stand-in: nothing is downloaded)."""

from __future__ import annotations

import sys
import types

import pytest

from fdfo import hf_prompts
from fdfo.errors import ConfigError
from fdfo.prompts import load_prompts, main

# A stand-in for Flow-GRPO's dataset/pickscore/train.txt: whole captions, a caption that held a line break
# (written as two lines), a repeat, one with trailing spaces, and two captions that are also in test.txt.
TRAIN = ("a red fox sleeping under a tree, oil painting\n"
         "cyberpunk city at night with neon lights and rain\n"
         "portrait of an old sailor, dramatic lighting\n"
         "first half of a caption\n"
         "that was split by a newline in the middle of it\n"
         "a red fox sleeping under a tree, oil painting\n"
         "a castle on a hill above the sea, matte painting   \n"
         "held out caption number one for the test set\n"
         "a bowl of ramen with an egg, studio photo, 4k\n"
         "held out caption number two for the test set\n")
TEST = ("held out caption number one for the test set\n"
        "held out caption number two for the test set\n"
        "a third test caption that train.txt does not hold\n")


def test_pickscore_build_is_flow_grpos_filter_minus_its_test_split(tmp_path, capsys):
    source = tmp_path / "flow_grpo" / "dataset" / "pickscore"
    source.mkdir(parents=True)
    (source / "train.txt").write_text(TRAIN, encoding="utf-8")
    (source / "test.txt").write_text(TEST, encoding="utf-8")
    assert main(["build", "pickscore", "--from", str(source / "train.txt"), "--out", str(tmp_path / "out")]) == 0
    # Worked out by hand: 10 lines; "first half of a caption" has 4 spaces (dropped), the repeated fox once,
    # the castle stripped, the two held-out captions removed.
    expected_train = ["a red fox sleeping under a tree, oil painting",
                      "cyberpunk city at night with neon lights and rain",
                      "portrait of an old sailor, dramatic lighting",
                      "that was split by a newline in the middle of it",
                      "a castle on a hill above the sea, matte painting",
                      "a bowl of ramen with an egg, studio photo, 4k"]
    assert (tmp_path / "out" / "pickscore_train.txt").read_text(encoding="utf-8").splitlines() == expected_train
    assert load_prompts(str(tmp_path / "out" / "pickscore_test.txt")) == TEST.splitlines()
    out = capsys.readouterr().out
    assert "pickscore_train.txt: 6 prompts" in out and "pickscore_test.txt: 3 prompts" in out
    assert "first: a red fox sleeping" in out and "last:  a bowl of ramen" in out


def test_pickscore_build_names_a_missing_file(tmp_path, capsys):
    (tmp_path / "train.txt").write_text(TRAIN, encoding="utf-8")
    assert main(["build", "pickscore", "--from", str(tmp_path / "train.txt"), "--out", str(tmp_path / "o")]) == 1
    assert "test.txt' does not exist; give Flow-GRPO's dataset/pickscore/test.txt" in capsys.readouterr().err


class FakeDataset:
    def __init__(self, columns: dict):
        self.columns = columns
        self.column_names = list(columns)

    def __getitem__(self, name):
        return self.columns[name]


@pytest.fixture
def fake_datasets(monkeypatch):
    """``datasets`` replaced by a module whose load_dataset records its calls and serves one dataset."""
    calls = []

    def load_dataset(name, split=None):
        calls.append((name, split))
        if name != "org/captions":
            raise FileNotFoundError(f"Couldn't find dataset '{name}' on the Hugging Face Hub\nmore detail")
        return FakeDataset({"caption": ["  a cat  ", "", None, "a dog", "a cat"], "id": [1, 2, 3, 4, 5]})

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    return calls


@pytest.mark.parametrize("spec, parsed", [("hf:org/captions:validation:caption", ("org/captions", "validation", "caption")),
                                          ("hf:org/captions:caption", ("org/captions", "train", "caption"))])
def test_hf_spec_parsing(spec, parsed):
    assert hf_prompts.parse(spec) == parsed


@pytest.mark.parametrize("spec", ["hf:", "hf:org/captions", "hf:a:b:c:d", "hf:org/captions::caption"])
def test_a_malformed_hf_spec_is_a_config_error(spec):
    with pytest.raises(ConfigError, match="is not hf:DATASET"):
        load_prompts(spec)


def test_hf_prompts_read_a_column(fake_datasets):
    assert load_prompts("hf:org/captions:test:caption") == ["a cat", "a dog"]
    assert fake_datasets == [("org/captions", "test")]


def test_hf_errors_are_one_line(fake_datasets, monkeypatch):
    with pytest.raises(ConfigError) as err:
        load_prompts("hf:org/captions:train:prompt")
    assert str(err.value).endswith("has no column 'prompt' (it has caption, id)")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError) as err:
        load_prompts("hf:org/missing:caption")
    assert "offline (HF_HUB_OFFLINE=1) and not in the local cache" in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_datasets_package_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # (an import of it raises ImportError)
    with pytest.raises(ConfigError, match=r'needs the datasets package: pip install -e "\.\[prompts\]"'):
        load_prompts("hf:org/captions:caption")
