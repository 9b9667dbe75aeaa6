"""The PickScore prompt set as published: Flow-GRPO's split of the Pick-a-Pic v1 captions.

Flow-GRPO made ``dataset/pickscore/`` once with a script that took the unique captions of Pick-a-Pic v1's
train split (``yuvalkirstain/pickapic_v1``), kept those with at least five spaces, shuffled them
without a seed and wrote the first 2,048 to ``test.txt`` and the rest to ``train.txt``, one caption per
line. Its training code reads a file line by line, stripping each line. The shuffle had no seed, so the
split exists only as those two files: the test split is the lines of ``test.txt``.

The published training set is ``train.txt`` after that filtering, minus the test split: each line
stripped as Flow-GRPO reads it, kept when it has at least five spaces, once (its first occurrence, in file
order), and dropped when it is also a line of ``test.txt``. On the files Flow-GRPO wrote the filter and the
subtraction change nothing unless a caption held a line break (written as two lines) or repeats.
"""

from __future__ import annotations

from pathlib import Path

MIN_SPACES = 5  # Flow-GRPO's filter: captions with at least five spaces (about six words or more)
TRAIN_FILE, TEST_FILE = "pickscore_train.txt", "pickscore_test.txt"


def read_lines(path: Path) -> list[str]:
    """The lines of a text file as Flow-GRPO's training code reads them (universal newlines), unstripped."""
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f]


def filtered(lines: list[str]) -> list[str]:
    """Flow-GRPO's filter on raw lines (at least ``MIN_SPACES`` spaces), each stripped, first occurrences only."""
    return list(dict.fromkeys(line.strip() for line in lines if line.count(" ") >= MIN_SPACES and line.strip()))


def split(train_lines: list[str], test_lines: list[str]) -> tuple[list[str], list[str]]:
    """(training prompts, test prompts) from the lines of Flow-GRPO's train.txt and test.txt."""
    test = filtered(test_lines)
    held_out = set(test)
    return [p for p in filtered(train_lines) if p not in held_out], test


def build(train_file: Path, test_file: Path, out_dir: Path) -> tuple[Path, Path, list[str], list[str]]:
    """Write ``pickscore_train.txt`` and ``pickscore_test.txt`` into ``out_dir``; returns their paths and
    prompts. A missing input is a FileNotFoundError naming it."""
    for path, what in ((train_file, "train.txt"), (test_file, "test.txt")):
        if not path.is_file():
            raise FileNotFoundError(f"'{path}' does not exist; give Flow-GRPO's dataset/pickscore/{what}")
    train, test = split(read_lines(train_file), read_lines(test_file))
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = out_dir / TRAIN_FILE, out_dir / TEST_FILE
    for path, prompts in zip(paths, (train, test)):
        path.write_text("".join(p + "\n" for p in prompts), encoding="utf-8")
    return *paths, train, test
