"""The server's durable queue of disclosed batches (``POST /v1/train``, docs/architecture.md#contracts).

An upload is acknowledged only after :meth:`DisclosureSpool.put` returns, i.e. once its tensor and
its metadata are fsync'ed and renamed into ``pending/``. A batch leaves ``pending/`` only after a
server checkpoint that includes its training is durable (:meth:`forget`); the checkpoint records
the ids it trained, so after a crash at any point a batch is trained exactly once or is still
pending — never lost, never trained twice. Files are ``.npy`` (no pickles) + JSON.

Layout::

    SPOOL/pending/<seq:012d>.<client>.<batch_id>.npy    x_h [B,C,H,W] float32
    SPOOL/pending/<seq:012d>.<client>.<batch_id>.json   {client, batch_id, level, labels, rows, sha256}
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from collections import deque
from dataclasses import dataclass

import numpy as np

from collafuse_edge.protocol import decode_tensor, encode_tensor

from .checkpoint import atomic_write_bytes
from .errors import CollafuseError, InputError

BATCH_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class SpoolFull(CollafuseError):
    """The queue is at its limit; the client should retry later (HTTP 429)."""


@dataclass(frozen=True)
class SpooledBatch:
    seq: int
    client: int
    batch_id: str
    level: int
    rows: int
    labels: tuple[int, ...] | None
    stem: str

    @property
    def key(self) -> str:
        return f"{self.client}/{self.batch_id}"


class DisclosureSpool:
    """A bounded, durable FIFO of disclosed batches, safe to use from several threads."""

    def __init__(self, root: str, max_batches: int = 1024, max_bytes: int = 512 * 2**20,
                 done: set[str] | None = None):
        self.root = root
        self.pending_dir = os.path.join(root, "pending")
        os.makedirs(self.pending_dir, exist_ok=True)
        self.max_batches = max_batches
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._queue: deque[SpooledBatch] = deque()
        self._known: set[str] = set(done or ())  # trained (per the checkpoint) or pending
        self._bytes = 0
        self._seq = 0
        self._recover()

    def _recover(self) -> None:
        for f in os.listdir(self.pending_dir):
            if f.endswith(".tmp") or f.startswith(".tmp-"):
                os.unlink(os.path.join(self.pending_dir, f))  # an upload that was never acknowledged
        metas = sorted(f for f in os.listdir(self.pending_dir) if f.endswith(".json"))
        for f in metas:
            stem = f[:-5]
            with open(os.path.join(self.pending_dir, f), encoding="utf-8") as fh:
                m = json.load(fh)
            b = SpooledBatch(int(stem.split(".")[0]), int(m["client"]), m["batch_id"], int(m["level"]),
                             int(m["rows"]), tuple(m["labels"]) if m["labels"] is not None else None, stem)
            self._seq = max(self._seq, b.seq + 1)
            if b.key in self._known:  # trained before a crash, not yet forgotten
                self._remove_files(stem)
                continue
            self._known.add(b.key)
            self._queue.append(b)
            self._bytes += os.path.getsize(os.path.join(self.pending_dir, stem + ".npy"))
        for f in os.listdir(self.pending_dir):  # tensors whose metadata never landed: not acknowledged
            if f.endswith(".npy") and not os.path.exists(os.path.join(self.pending_dir, f[:-4] + ".json")):
                os.unlink(os.path.join(self.pending_dir, f))

    def __len__(self) -> int:
        with self._lock:
            return len(self._queue)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def seen(self, client: int, batch_id: str) -> bool:
        with self._lock:
            return f"{client}/{batch_id}" in self._known

    def put(self, client: int, batch_id: str, level: int, x: np.ndarray, labels: np.ndarray | None) -> bool:
        """Durably enqueue one batch. Returns False for a replayed ``batch_id`` (nothing is
        stored twice); raises :class:`SpoolFull` when over the limits."""
        if not BATCH_ID.match(batch_id or ""):
            raise InputError(f"batch id {batch_id!r} must be 1-64 characters of [A-Za-z0-9_-]")
        payload = encode_tensor(np.ascontiguousarray(x, dtype=np.float32))
        key = f"{client}/{batch_id}"
        with self._lock:
            if key in self._known:
                return False
            if len(self._queue) >= self.max_batches or self._bytes + len(payload) > self.max_bytes:
                raise SpoolFull(f"the training queue is full ({len(self._queue)} batches, {self._bytes} bytes); "
                                "retry later")
            seq = self._seq
            self._seq += 1
            self._known.add(key)  # reserve: a concurrent replay is refused while we write
        stem = f"{seq:012d}.{client}.{batch_id}"
        meta = {"client": client, "batch_id": batch_id, "level": level, "rows": int(x.shape[0]),
                "labels": None if labels is None else [int(v) for v in labels],
                "sha256": hashlib.sha256(payload).hexdigest()}
        try:
            atomic_write_bytes(os.path.join(self.pending_dir, stem + ".npy"), payload)
            atomic_write_bytes(os.path.join(self.pending_dir, stem + ".json"), json.dumps(meta).encode())
            dfd = os.open(self.pending_dir, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except BaseException:
            with self._lock:
                self._known.discard(key)
            self._remove_files(stem)
            raise
        b = SpooledBatch(seq, client, batch_id, level, int(x.shape[0]), meta["labels"] and tuple(meta["labels"]), stem)
        with self._cond:
            self._queue.append(b)
            self._bytes += len(payload)
            self._cond.notify_all()
        return True

    def take(self, max_rows: int, timeout: float | None = None) -> list[SpooledBatch]:
        """Pop batches (FIFO) up to ``max_rows`` rows (at least one batch); waits up to ``timeout``."""
        with self._cond:
            if not self._queue:
                self._cond.wait(timeout)
            out: list[SpooledBatch] = []
            rows = 0
            while self._queue and (not out or rows + self._queue[0].rows <= max_rows):
                b = self._queue.popleft()
                out.append(b)
                rows += b.rows
            return out

    def load(self, b: SpooledBatch) -> np.ndarray:
        with open(os.path.join(self.pending_dir, b.stem + ".npy"), "rb") as f:
            return decode_tensor(f.read(), max_bytes=2**31, dtype="float32", ndim=4)

    def forget(self, batches: list[SpooledBatch]) -> None:
        """Delete trained batches — call only after the checkpoint that trained them is durable."""
        for b in batches:
            size = self._remove_files(b.stem)
            with self._lock:
                self._bytes -= size

    def _remove_files(self, stem: str) -> int:
        size = 0
        for ext in (".json", ".npy"):
            p = os.path.join(self.pending_dir, stem + ext)
            if os.path.exists(p):
                size += os.path.getsize(p) if ext == ".npy" else 0
                os.unlink(p)
        return size

    def all_pending(self) -> list[SpooledBatch]:
        with self._lock:
            return list(self._queue)
