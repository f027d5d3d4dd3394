"""Exceptions of the collafuse core. Messages say what was wrong, the value, and what to do.

The root :class:`CollafuseError` lives in the bottom layer (``collafuse_edge.errors``) so that
every package shares it; it is re-exported here.
"""
from collafuse_edge.errors import CollafuseError, InputError, ScheduleError


class ConfigError(CollafuseError, ValueError):
    """A configuration field or command-line flag has an invalid value."""


class DataError(CollafuseError, ValueError):
    """A dataset file or folder is missing or malformed."""


class CheckpointError(CollafuseError):
    """A run directory or checkpoint is missing, corrupted or does not match the config."""


class ServeProcessError(CollafuseError, RuntimeError):
    """A ``collafuse serve`` subprocess exited or did not become ready (its output tail is in the message)."""

    exit_code = 1  # an operation failed, not the caller's input


__all__ = ["CheckpointError", "CollafuseError", "ConfigError", "DataError", "InputError", "ScheduleError",
           "ServeProcessError"]
