"""The errors a user can fix, shared by every part (a leaf module: it imports nothing from fdfo)."""


class ConfigError(ValueError):
    """A configuration key or value is wrong; the message says which and how to fix it."""
