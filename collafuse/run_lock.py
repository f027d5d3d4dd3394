"""One writer per run directory: an advisory lock that a second trainer meets before it does anything.

Whatever writes checkpoints into a run (``collafuse train``, ``collafuse serve --train``,
``collafuse client-train``) holds ``RUN/.lock`` for its whole life::

    with RunLock(run_dir, "collafuse serve --train"):
        ...  # train, checkpoint

The lock is ``fcntl.flock`` on that file, so the kernel drops it when the holder exits or is
killed: a lock left by a dead process is recovered by simply taking it again. The file's content
(pid, host, command, start time) is only there to name the holder in the refusal.

Limits: ``flock`` is per machine. On NFS, Linux emulates it with POSIX byte-range locks (NFSv4, or
v3 with a running lock manager); two writers on different machines are then refused as well, but a
filesystem mounted with ``nolock`` or a non-POSIX network share gives no protection. Keep a run
directory on a local disk, or on NFSv4.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import time

from .errors import CheckpointError

LOCK_NAME = ".lock"
# flock belongs to an open file, so a second open in the same process would refuse its own holder:
# holders in one process share the descriptor (realpath → [fd, count]).
_HELD: dict[str, list[int]] = {}


class RunLocked(CheckpointError):
    """Another live process holds the run directory's lock."""


class RunLock:
    """Exclusive, non-blocking lock of the existing folder ``run_dir``; holders in one process share it."""

    def __init__(self, run_dir: str, command: str = ""):
        self.run_dir = run_dir
        self.path = os.path.join(run_dir, LOCK_NAME)
        self.command = command or " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))
        self._fd: int | None = None

    def holder(self) -> dict:
        """What the lock file says of its holder (may be stale if nobody holds the lock)."""
        try:
            with open(self.path, encoding="utf-8") as f:
                return json.load(f)
        except (OSError, ValueError):
            return {}

    def acquire(self) -> "RunLock":
        import fcntl

        if self._fd is not None:
            return self
        if not os.path.isdir(self.run_dir):
            raise CheckpointError(f"run directory {self.run_dir!r} does not exist")
        key = os.path.realpath(self.path)
        if key in _HELD:
            _HELD[key][1] += 1
            self._fd = _HELD[key][0]
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            h = self.holder()
            who = (f"pid {h.get('pid', '?')} on {h.get('host', '?')} ({h.get('command', '?')}, since "
                   f"{h.get('started', '?')})") if h else "another process"
            raise RunLocked(f"run directory {self.run_dir!r} is in use by {who}; only one process may write to a "
                            "run. Stop that process first, or use another directory") from None
        except OSError as e:
            os.close(fd)
            raise CheckpointError(f"cannot lock run directory {self.run_dir!r} ({e}); the filesystem may not "
                                  "support locks (NFS mounted with nolock?). Use a local disk") from e
        info = {"pid": os.getpid(), "host": socket.gethostname(), "command": self.command,
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        self._fd = fd
        _HELD[key] = [fd, 1]
        return self

    def release(self) -> None:
        import fcntl

        if self._fd is None:
            return
        key = os.path.realpath(self.path)
        entry = _HELD.get(key)
        if entry is not None and entry[1] > 1:
            entry[1] -= 1
            self._fd = None
            return
        _HELD.pop(key, None)
        try:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            os.close(self._fd)
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


__all__ = ["LOCK_NAME", "RunLock", "RunLocked"]
