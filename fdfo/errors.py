"""The errors a user can fix, shared by every part (a leaf module: it imports nothing from fdfo)."""


class ConfigError(ValueError):
    """A configuration key or value is wrong; the message says which and how to fix it."""


class TrainingError(RuntimeError):
    """The run could not go on (every epoch's rewards non-finite, a part it depends on failed, a resumed run
    that jumped); the message says why, what survives and what to do."""


class RewardFailed(RuntimeError):
    """A reward model raised while scoring, or returned a score count other than the image count."""


def first_line(exc: BaseException) -> str:
    """``Type: the first line of its message`` (a traceback or a multi-line message stays in the log)."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
