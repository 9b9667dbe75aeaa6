"""Prompt sets: a text file with one prompt per line, or a built-in set."""

from __future__ import annotations

from pathlib import Path

from fdfo import tasks
from fdfo.errors import ConfigError


def load_prompts(spec: str) -> list[str]:
    """Prompts of a built-in task (``builtin:digits``) or of a UTF-8 text file (one per line;
    blank lines and #-comments skipped). A file that is missing is a FileNotFoundError; one that
    is a directory, unreadable, not UTF-8 or holds no prompt is a ConfigError (a ValueError) naming it."""
    if tasks.is_builtin(spec):
        return tasks.prompts(spec)
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
