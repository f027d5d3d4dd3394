"""Exceptions of the server. Messages say what was wrong, the value, and what to do.

:class:`ApiError` is what a view raises for a caller's mistake; the error middleware turns it
into ``{"error": {"code", "message"}}`` with its HTTP status. Messages never contain a token.
"""
from __future__ import annotations

from collafuse.errors import CollafuseError


class ServerAppError(CollafuseError):
    """Base class of every error the server application raises on purpose.

    Not to be confused with :class:`collafuse_edge.errors.ServerRequestError`, which a client
    raises when a request to a server fails."""


class ServerConfigError(ServerAppError, ValueError):
    """The server's configuration (flags, config file, token entries) is invalid."""


class EngineClosed(ServerAppError):
    """The batching engine is draining or stopped and takes no new work."""


class EngineBusy(ServerAppError):
    """The engine's queue is full."""


class ApiError(ServerAppError):
    """A request the server refuses: HTTP ``status``, a stable machine-readable ``code``."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


def bad_request(message: str, code: str = "bad_request") -> ApiError:
    return ApiError(400, code, message)
