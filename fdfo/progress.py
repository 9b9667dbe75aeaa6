"""Progress a person can read, in a terminal and in a log file.

``bar(...)`` is tqdm's bar (counts, rate, time left) when stderr is a terminal. When it is not (a
log file, a pipe, a batch system's output) a bar would write a carriage-return frame per refresh
into one endless line; there ``bar`` prints whole lines instead, one every ``every_s`` seconds and
one when done (with ``leave``):

    generate: 40/128 images (31%), 12 s, about 27 s left

``eta(elapsed, done, total)`` is the same estimate for a loop that prints its own lines (the
trainer's epoch line). ``FDFO_PROGRESS=lines`` or ``=bar`` overrides the terminal check.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Iterable, TextIO

from tqdm.auto import tqdm

EVERY_S = 30.0  # seconds between two lines when stderr is not a terminal


def duration(seconds: float) -> str:
    """``45 s``, ``12 min 30 s``, ``2 h 05 min``."""
    s = int(round(max(seconds, 0.0)))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def eta(elapsed: float, done: float, total: float) -> str | None:
    """The time left at the rate so far, or None before anything is done."""
    if done <= 0 or total <= done:
        return None if done <= 0 else duration(0)
    return duration(elapsed / done * (total - done))


def as_lines(stream: TextIO | None = None) -> bool:
    """Whether progress goes out as whole lines (not a terminal, or ``FDFO_PROGRESS=lines``)."""
    mode = os.environ.get("FDFO_PROGRESS", "")
    if mode in ("lines", "bar"):
        return mode == "lines"
    stream = stream or sys.stderr
    return not (hasattr(stream, "isatty") and stream.isatty())


class Lines:
    """A progress counter that prints whole lines (see the module docstring); tqdm's ``update``,
    ``close``, iteration and context-manager use."""

    def __init__(self, iterable: Iterable | None, total: int | None, desc: str, unit: str, leave: bool,
                 every_s: float, stream: TextIO):
        self.iterable, self.total, self.desc, self.unit, self.leave = iterable, total, desc, unit, leave
        self.every_s, self.stream = every_s, stream
        self.n, self.postfix = 0, ""
        self.start = self.last = time.monotonic()
        self.closed = False

    def _line(self) -> str:
        elapsed = time.monotonic() - self.start
        unit = f" {self.unit}" if self.unit else ""
        if not self.total:
            return f"{self.desc}: {self.n}{unit}, {duration(elapsed)}{self.postfix}"
        text = f"{self.desc}: {self.n}/{self.total}{unit} ({100 * self.n / self.total:.0f}%), {duration(elapsed)}"
        left = eta(elapsed, self.n, self.total)
        text += f", about {left} left" if left and self.n < self.total else ""
        return text + self.postfix

    def _print(self) -> None:
        self.stream.write(self._line() + "\n")
        self.stream.flush()
        self.last = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.n += n
        if time.monotonic() - self.last >= self.every_s:
            self._print()

    def set_postfix(self, refresh: bool = True, **values) -> None:
        """Values shown after the counts (as tqdm's ``set_postfix``; the next line shows them)."""
        self.postfix = "".join(f", {k}={v}" for k, v in values.items())

    def close(self) -> None:
        if not self.closed and self.leave:
            self._print()
        self.closed = True

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def __enter__(self) -> "Lines":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def quiet_libraries(stream: TextIO | None = None) -> None:
    """When progress goes out as lines, turn off the loading bars of transformers, diffusers and
    huggingface_hub (tqdm frames of their own); on a terminal they stay."""
    if not as_lines(stream):
        return
    import diffusers.utils.logging
    import huggingface_hub.utils
    import transformers.utils.logging

    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.disable_progress_bar()
    huggingface_hub.utils.disable_progress_bars()


def bar(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "", unit: str = "",
        enabled: bool = True, leave: bool = False, every_s: float | None = None, stream: TextIO | None = None):
    """A tqdm bar on a terminal, ``Lines`` otherwise (a line every ``every_s`` seconds, default ``EVERY_S``),
    nothing shown when not ``enabled`` (it still counts and iterates). ``total`` defaults to ``len(iterable)``."""
    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)
    if not enabled:
        return tqdm(iterable, total=total, disable=True)
    if as_lines(stream):
        return Lines(iterable, total, desc, unit, leave, EVERY_S if every_s is None else every_s,
                     stream or sys.stderr)
    return tqdm(iterable, total=total, desc=desc, unit=unit or "it", leave=leave, file=stream)
