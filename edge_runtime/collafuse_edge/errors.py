"""Exceptions of the edge runtime. Every message says what was wrong, the value, and what to do."""


class CollafuseEdgeError(Exception):
    """Base class of every error the edge runtime raises on purpose."""


class ScheduleError(CollafuseEdgeError, ValueError):
    """A schedule, cut ratio, level or timetable argument is invalid."""


class BundleError(CollafuseEdgeError):
    """A bundle directory is missing, tampered, truncated or incompatible."""


class ProtocolError(CollafuseEdgeError, ValueError):
    """A wire-format message (tensor bytes or headers) is malformed."""


class ServerError(CollafuseEdgeError):
    """The collafuse server refused a request or could not be reached."""

    def __init__(self, message: str, status: int | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.code = code


class InputError(CollafuseEdgeError, ValueError):
    """An argument, option or input array given to the edge runtime is invalid."""
