"""Prompt sets: a text file with one prompt per line, a built-in set, or a column of a hub dataset.

    python -m fdfo.prompts build pickscore --from train.txt [--test test.txt] [--out prompts]

writes the published PickScore training and test prompts from Flow-GRPO's ``dataset/pickscore`` files
(``fdfo.pickscore_prompts``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fdfo import hf_prompts, pickscore_prompts, tasks
from fdfo.errors import ConfigError


def load_prompts(spec: str) -> list[str]:
    """Prompts of a built-in task (``builtin:digits``), of a hub dataset's column
    (``hf:DATASET[:SPLIT]:COLUMN``, ``fdfo.hf_prompts``) or of a UTF-8 text file (one per line;
    blank lines and #-comments skipped). A file that is missing is a FileNotFoundError; one that
    is a directory, unreadable, not UTF-8 or holds no prompt is a ConfigError (a ValueError) naming it."""
    if tasks.is_builtin(spec):
        return tasks.prompts(spec)
    if hf_prompts.is_hf(spec):
        return hf_prompts.load(spec)
    path = Path(spec).expanduser()
    if path.is_dir():
        raise ConfigError(f"prompt file '{spec}' is a directory; give a text file with one prompt per line")
    if not path.is_file():
        raise FileNotFoundError(f"prompt file '{spec}' does not exist; give a text file with one prompt per line "
                                f"(data.prompts) or one of {', '.join(tasks.names())}")
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:  # (a permission, an I/O error; the file exists)
        raise ConfigError(f"prompt file '{spec}' cannot be read ({exc.strerror or exc}); check its permissions") \
            from None
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise ConfigError(f"prompt file '{spec}' is not UTF-8 text (bad byte on line {line}); "
                         "save it as UTF-8 with one prompt per line") from exc
    prompts = [line.strip() for line in text.splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise ConfigError(f"prompt file '{spec}' holds no prompts; put one prompt per line")
    return prompts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fdfo.prompts", description="Build a published prompt set.")
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="write a published prompt set's files")
    build.add_argument("set", choices=["pickscore"], help="pickscore: Flow-GRPO's split of the Pick-a-Pic v1 captions")
    build.add_argument("--from", dest="source", required=True, type=Path,
                       help="Flow-GRPO's dataset/pickscore/train.txt")
    build.add_argument("--test", type=Path, help="its test split (default: test.txt beside --from)")
    build.add_argument("--out", type=Path, default=Path("prompts"), help="the directory to write (default: prompts)")
    args = parser.parse_args(argv)
    try:
        *paths, train, test = pickscore_prompts.build(args.source, args.test or args.source.with_name("test.txt"),
                                                      args.out)
    except (OSError, UnicodeDecodeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for path, prompts in zip(paths, (train, test)):
        print(f"{path}: {len(prompts)} prompts")
        if prompts:
            print(f"  first: {prompts[0]}\n  last:  {prompts[-1]}")
        comments = sum(p.startswith("#") for p in prompts)
        if comments:
            print(f"  note: {comments} of them start with '#', which a prompt file reads as a comment")
    return 0


if __name__ == "__main__":
    sys.exit(main())
