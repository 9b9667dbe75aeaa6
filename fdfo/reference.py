"""The configuration reference, written from the config dataclasses themselves: ``train.py --help``,
``--print-config`` (the resolved values with each key's comment) and docs/configuration.md.

    python -m fdfo.reference docs/configuration.md            # write the reference
    python -m fdfo.reference --check docs/configuration.md    # exit 1 if the file is not current
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import textwrap
import typing
from pathlib import Path

import yaml

from fdfo.config import Setting, entries, field_docs, section_doc
from fdfo.settings import RunConfig, schema, unread_sections

INTRO = """\
# Configuration reference

Every setting of a run, with its type, its default and what it means. This file is written from
the config dataclasses by `python -m fdfo.reference docs/configuration.md`, and a test checks that
it is current; `python fdfo/train.py --help` prints the same list.

A run config is a YAML file of these sections (`--config FILE.yaml`), or a built-in task's default
job (`--config builtin:digits`), over the defaults below: the published FDFO recipe for SD3.5
Medium. Any key can be overridden on the command line as `--section.key value`
(`--fdfo.clip_range 0.05`, `--reward.weights.vlm_alignment 0.2`; `null` removes a mapping entry).
`python fdfo/train.py --config FILE.yaml --print-config` prints the resolved config with each key's
meaning, leaving out the sections the run does not read; the output is a config file that loads back.

The `fdfo` and `flow_grpo` sections belong to the algorithm that `train.algorithm` names, the
`churn.<schedule>` subsections to the schedule that `churn.schedule` names, and the `flux` section
to FLUX.1 models: a key of a part that the run does not use, set away from its default, is an
error at start-up.
"""


def _value(value) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()


def _sections(cls: type, prefix: str = ""):
    """(dotted section name, its dataclass) of the run config's sections and subsections, in order."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield f"{prefix}{f.name}", tp
            yield from _sections(tp, f"{prefix}{f.name}.")


def markdown(cls: type | None = None) -> str:
    cls = cls or schema()
    out = [INTRO]
    header = "| key | type | default | meaning |\n|---|---|---|---|"

    def row(s: Setting, key: str) -> str:
        return f"| `{key}` | {s.kind} | `{_value(s.default)}` | {s.doc.replace('|', '/')} |"

    top = [s for s in entries(cls) if "." not in s.key]
    if top:
        out += [f"## Run\n\n{header}", *(row(s, s.key) for s in top), ""]
    for name, section in _sections(cls):
        rows = [s for s in entries(section, f"{name}.") if s.key.count(".") == name.count(".") + 1]
        if rows:
            out += [f"## `{name}`\n\n{section_doc(section)}\n\n{header}",
                    *(row(s, s.key[len(name) + 1:]) for s in rows), ""]
    return "\n".join(out)


def help_text(cls: type | None = None) -> str:
    """Every setting, one line each, for ``--help``."""
    lines = ["settings (--section.key VALUE; docs/configuration.md has the same list):"]
    for s in entries(cls or schema()):
        lines.append(f"  --{s.key}  {s.kind}, default {_value(s.default)}")
        lines += textwrap.wrap(s.doc, width=100, initial_indent=" " * 6, subsequent_indent=" " * 6)
    return "\n".join(lines)


def commented_yaml(cfg: RunConfig) -> str:
    """The resolved config as YAML, each key with its comment; the sections the run does not read (another
    algorithm's, another churn schedule's) are left out, so the text loads back as this config."""
    lines: list[str] = []
    unread = set(unread_sections(cfg))

    def emit(obj, indent: str, prefix: str = "") -> None:
        docs = field_docs(type(obj))
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if prefix + f.name in unread:
                continue
            if dataclasses.is_dataclass(value):
                doc = section_doc(type(value))
                lines.append(f"{indent}{f.name}:" + (f"  # {doc}" if doc else ""))
                emit(value, indent + "  ", f"{prefix}{f.name}.")
            else:
                doc = docs.get(f.name, f.metadata.get("doc"))
                lines.append(f"{indent}{f.name}: {_value(value)}" + (f"  # {doc}" if doc else ""))

    emit(cfg, "")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fdfo.reference", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("file", help="the reference to write (or to check)")
    parser.add_argument("--check", action="store_true", help="only check that FILE is current (exit 1 if not)")
    args = parser.parse_args(argv)
    text, path = markdown(), Path(args.file)
    if args.check:
        if not path.is_file() or path.read_text() != text:
            print(f"{path} is not current; write it with: python -m fdfo.reference {path}", file=sys.stderr)
            return 1
        return 0
    path.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
