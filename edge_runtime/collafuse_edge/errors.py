"""Exceptions of collafuse. Every message says what was wrong, the value, and what to do.

:class:`CollafuseError` is the one root of every error any collafuse package raises on purpose
(the core, the exporter and the server derive theirs from it), so ``except CollafuseError``
means "any refusal of ours". Each class carries the process exit code the command-line tools
use for it (see :mod:`collafuse_edge.cli_contract`): 2 for input the caller can fix (a flag, a
file, a bundle, a checkpoint), 1 for an operation that failed (a server that refused or could
not be reached).
"""


class CollafuseError(Exception):
    """Base class of every error collafuse raises on purpose."""

    exit_code = 2  # the caller's input was wrong; fixing it fixes the command


class ScheduleError(CollafuseError, ValueError):
    """A schedule, cut ratio, level or timetable argument is invalid."""


class BundleError(CollafuseError):
    """A bundle directory is missing, tampered, truncated or incompatible."""


class ProtocolError(CollafuseError, ValueError):
    """A wire-format message (tensor bytes or headers) is malformed."""


class ServerRequestError(CollafuseError):
    """A request to a collafuse server was refused (``status``/``code`` set) or could not be made."""

    exit_code = 1

    def __init__(self, message: str, status: int | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.code = code


class InputError(CollafuseError, ValueError):
    """An argument, option or input array is invalid."""


# Deprecated spellings, kept for one release: the edge root was ``CollafuseEdgeError`` and a failed
# request was ``ServerError`` (a name the server package also used for something else).
CollafuseEdgeError = CollafuseError
ServerError = ServerRequestError

__all__ = ["BundleError", "CollafuseError", "InputError", "ProtocolError", "ScheduleError",
           "ServerRequestError"]
