"""``collafuse serve`` as a subprocess: a free loopback port, start, wait for ``/readyz``, stop.

The demo, the server benchmarks and the process-level server tests all start a real server
this way. The core does not import the server package: it spawns the command line
(``python -m collafuse.cli serve …``).

    with ServeProcess(run_dir, "server.json", "--no-warmup", env={"OMP_NUM_THREADS": "1"}) as srv:
        ...  # srv.url is ready
    print(srv.output())  # what the server wrote (stdout and stderr)

The server's output goes to a file (``log_path``, or an anonymous temporary file): a pipe nobody
reads would fill up and stall the server under a long run of logged requests.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import IO, Mapping

from .errors import ServeProcessError

OUTPUT_TAIL_CHARS = 4000


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on ``host`` a moment ago (the OS picks it)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ServeProcess:
    """A ``collafuse serve --run RUN --config CONFIG`` process on loopback.

    The constructor starts it; :meth:`wait_ready` (or ``with``) waits until ``/readyz`` answers
    200. ``extra``: more command-line flags. ``port`` None picks a free one (a restart may pass
    the old one). ``threads`` adds ``--threads N``. ``env``: variables set on top of this
    process's environment. ``log_path``: where the server's output goes (default: a temporary
    file, read back by :meth:`output`). ``timeout``: the default of :meth:`wait_ready`, seconds.
    """

    def __init__(self, run_dir: str, config: str, *extra: str, port: int | None = None, host: str = "127.0.0.1",
                 threads: int | None = None, log_level: str = "warning", env: Mapping[str, str] | None = None,
                 log_path: str | None = None, timeout: float = 120.0) -> None:
        self.port = port if port is not None else free_port(host)
        self.url = f"http://{host}:{self.port}"
        self.log_path = log_path
        self.timeout = timeout
        self.start_s: float | None = None  # seconds from start to ready, once ready
        self.cmd = [sys.executable, "-m", "collafuse.cli", "serve", "--run", run_dir, "--config", config,
                    "--port", str(self.port), "--log-level", log_level,
                    *(["--threads", str(threads)] if threads is not None else []), *extra]
        self._log: IO[bytes] = open(log_path, "w+b") if log_path is not None else tempfile.TemporaryFile()
        self._final_output = ""  # a temporary file's content, kept when it is closed
        self._t0 = time.monotonic()
        try:
            self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                         env={**os.environ, **(env or {})})
        except BaseException:
            self._log.close()
            raise
        self.pid = self.proc.pid

    # --------------------------------------------------------------------------- state

    def ready(self, timeout: float = 2.0) -> bool:
        """Whether ``/readyz`` answers 200 now."""
        try:
            with urllib.request.urlopen(self.url + "/readyz", timeout=timeout) as r:
                return r.status == 200
        except OSError:  # refused, reset, timed out, or an HTTP error status (not ready yet)
            return False

    def wait_ready(self, timeout: float | None = None, poll: float = 0.1) -> "ServeProcess":
        """Block until ready. Raises :class:`ServeProcessError` with the tail of the server's
        output if it exits first or is not ready within ``timeout`` seconds (it is then stopped)."""
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise ServeProcessError(f"collafuse serve exited with {self.proc.returncode} before it was ready"
                                        f"{self._where()}:\n{self.output_tail()}")
            if self.ready():
                self.start_s = time.monotonic() - self._t0
                return self
            if time.monotonic() > deadline:
                self._terminate()
                raise ServeProcessError(f"collafuse serve did not become ready in {timeout:.0f} s"
                                        f"{self._where()}:\n{self.output_tail()}")
            time.sleep(poll)

    def output(self) -> str:
        """Everything the server wrote so far (stdout and stderr)."""
        if self._log.closed:
            if self.log_path is None:
                return self._final_output
            with open(self.log_path, "rb") as f:
                return f.read().decode("utf-8", "replace")
        self._log.flush()
        fd = self._log.fileno()
        return os.pread(fd, os.fstat(fd).st_size, 0).decode("utf-8", "replace")  # the child's offset stays put

    def output_tail(self, chars: int = OUTPUT_TAIL_CHARS) -> str:
        out = self.output()
        return out if len(out) <= chars else "…" + out[-chars:]

    def _where(self) -> str:
        return f" (output in {self.log_path})" if self.log_path else ""

    # --------------------------------------------------------------------------- stopping

    def kill(self) -> None:
        """SIGKILL: no graceful shutdown, whatever is in flight is lost on the server's side."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM (graceful drain), SIGKILL after ``timeout`` seconds; returns the exit code."""
        return self._terminate(timeout)

    def _terminate(self, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    def close(self) -> int:
        """Stop, and release the output file (a temporary one is deleted; :meth:`output` still
        returns what it held)."""
        rc = self._terminate()
        if not self._log.closed:
            if self.log_path is None:
                self._final_output = self.output()
            self._log.close()
        return rc

    def __enter__(self) -> "ServeProcess":
        try:
            return self.wait_ready()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = ["ServeProcess", "free_port"]
