"""Exceptions of the collafuse core. Messages say what was wrong, the value, and what to do."""
from collafuse_edge.errors import CollafuseEdgeError, ScheduleError


class CollafuseError(CollafuseEdgeError):
    """Base class of every error the core raises on purpose."""


class ConfigError(CollafuseError, ValueError):
    """A configuration field has an invalid value."""


class DataError(CollafuseError, ValueError):
    """A dataset file or folder is missing or malformed."""


class CheckpointError(CollafuseError):
    """A run directory or checkpoint is missing, corrupted or does not match the config."""


__all__ = ["CheckpointError", "CollafuseError", "ConfigError", "DataError", "ScheduleError"]
