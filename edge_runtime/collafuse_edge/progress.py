"""Progress of long work on stderr: waiting on the server, the client's levels, a warm-up.

Standard library only (a device install stays small). On a terminal one line is redrawn in
place; elsewhere (a log file, a pipe) a line is printed at most every ``log_interval_s`` and once
at the end, so logs stay short. ``Progress(enabled=False)`` prints nothing (``--quiet``).

Example::

    p = Progress()
    with p.task("client levels", total=20) as t:
        for i in range(20):
            ...; t.advance()
    with p.ticker("waiting on the server"):
        await server.handoff(...)                 # "waiting on the server … 3.0 s" every second
"""
from __future__ import annotations

import sys
import threading
import time
from contextlib import contextmanager
from typing import IO, Iterator


class Task:
    """A counted piece of work; :meth:`advance` is safe from several threads."""

    def __init__(self, progress: "Progress", label: str, total: int | None):
        self.p = progress
        self.label = label
        self.total = total
        self.done = 0
        self.detail = ""
        self.t0 = time.perf_counter()
        self._last = 0.0
        self._lock = threading.Lock()

    def text(self) -> str:
        count = f" {self.done}/{self.total}" if self.total else (f" {self.done}" if self.done else "")
        detail = f" {self.detail}" if self.detail else ""
        return f"{self.label}{count}{detail} … {time.perf_counter() - self.t0:.1f} s"

    def advance(self, n: int = 1, detail: str | None = None) -> None:
        with self._lock:
            self.done += n
            if detail is not None:
                self.detail = detail
            self._maybe_draw()

    def set_detail(self, detail: str) -> None:
        with self._lock:
            self.detail = detail
            self._maybe_draw()

    def _maybe_draw(self, force: bool = False) -> None:
        now = time.perf_counter()
        interval = self.p.tty_interval_s if self.p.tty else self.p.log_interval_s
        if force or now - self._last >= interval:
            self._last = now
            self.p.draw(self.text())

    def finish(self, summary: str | None = None) -> None:
        with self._lock:
            count = f" {self.done}/{self.total}" if self.total else ""
            detail = f" {self.detail}" if self.detail else ""
            self.p.draw(summary or f"{self.label}{count}{detail}: done in {time.perf_counter() - self.t0:.1f} s",
                        final=True)


class Progress:
    """Where progress lines go. ``enabled=False``: nowhere."""

    def __init__(self, enabled: bool = True, stream: IO[str] | None = None, *,
                 log_interval_s: float = 5.0, tty_interval_s: float = 0.2):
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.log_interval_s = log_interval_s
        self.tty_interval_s = tty_interval_s
        self._width = 0
        self._lock = threading.Lock()

    def draw(self, text: str, final: bool = False) -> None:
        if not self.enabled:
            return
        with self._lock:
            if self.tty:
                pad = " " * max(0, self._width - len(text))
                self.stream.write(f"\r{text}{pad}" + ("\n" if final else ""))
                self._width = 0 if final else len(text)
            else:
                self.stream.write(text + "\n")
            self.stream.flush()

    def note(self, text: str) -> None:
        """A one-off line (e.g. a notice before slow work)."""
        self.draw(text, final=True)

    @contextmanager
    def task(self, label: str, total: int | None = None, summary: bool = True) -> Iterator[Task]:
        t = Task(self, label, total)
        t._maybe_draw(force=True)
        try:
            yield t
        finally:
            if summary:
                t.finish()

    @contextmanager
    def ticker(self, label: str, every_s: float = 1.0) -> Iterator[Task]:
        """A task redrawn every ``every_s`` by a daemon thread while the block waits on something."""
        t = Task(self, label, None)
        stop = threading.Event()

        def tick() -> None:
            while not stop.wait(every_s):
                with t._lock:
                    t._maybe_draw()

        th = threading.Thread(target=tick, name="collafuse-edge-progress", daemon=True)
        if self.enabled:
            t._maybe_draw(force=True)
            th.start()
        try:
            yield t
        finally:
            stop.set()
            if th.is_alive():
                th.join()
            t.finish()


QUIET = Progress(enabled=False)

__all__ = ["Progress", "QUIET", "Task"]
