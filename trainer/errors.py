"""The error every bad input raises: a file, field, row or name the user gave is wrong.

Each part of the library has its own subclass (a config field, a dataset cache, a source CSV, a
checkpoint...), and every message names what is wrong. Front ends catch :class:`UserError` to
show one line instead of a traceback (``cxr-sweep`` exits with code 2).
"""

from __future__ import annotations

__all__ = ["ConfigError", "UserError"]


class UserError(ValueError):
    """Bad input from the user; the message names the file, field, row or name."""


class ConfigError(UserError):
    """A configuration problem; the message names the file and the field."""
