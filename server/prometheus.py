"""Prometheus metrics of the server: one view across every worker process, training included.

One process (``collafuse serve``): the metrics live in the app's own registry, so several apps in
one process (tests, notebooks) do not clash.

Several worker processes (``collafuse serve --workers N``): prometheus_client's multiprocess mode.
``collafuse serve`` creates a private folder, sets :data:`MULTIPROC_ENV` to it before gunicorn
forks, marks a worker's files dead when it exits and deletes the folder on shutdown. Each worker
writes its values to memory-mapped files there, and ``GET /metrics`` (whichever worker answers)
merges every worker's files: counters and histograms are summed over all workers that ever ran
(a restarted worker does not lose its predecessor's counts), gauges as their
``multiprocess_mode`` says (queue depths summed over live workers). So one scrape target sees the
whole server. The metrics reference is docs/monitoring.md.

Naming follows Prometheus conventions: base units (seconds, bytes), ``_total`` on counters, one
family with a ``direction`` label instead of ``…_in``/``…_out`` families, and no ``_created``
series (:func:`prometheus_client.disable_created_metrics`).
"""
from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

import prometheus_client
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import values as _values

if TYPE_CHECKING:
    from collafuse.server_training import ServerTrainer

__all__ = ["CONTENT_TYPE_LATEST", "LOSS_EMA_WEIGHT", "MULTIPROC_ENV", "ServerMetrics", "multiprocess_enabled"]

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
LOSS_EMA_WEIGHT = 0.1  # collafuse_train_loss_ema: ema ← 0.1·loss + 0.9·ema per server update (≈ the last 10)

# A counter's _created series doubles every family for a timestamp nobody queries.
prometheus_client.disable_created_metrics()

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_STEP_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5)
_ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


def multiprocess_enabled() -> bool:
    """Whether this process writes its metrics for a multiprocess scrape (:data:`MULTIPROC_ENV` set)."""
    return bool(os.environ.get(MULTIPROC_ENV))


class ServerMetrics:
    """The server's metric families. ``registry`` is what ``GET /metrics`` renders (and what tests
    read with ``registry.get_sample_value``): the app's own registry in one process, or one that
    merges every worker's files in multiprocess mode."""

    def __init__(self, training: bool = False) -> None:
        """``training``: the server trains from uploads (``--train``); only then do the
        ``collafuse_train_*`` families exist (a server that does not train has nothing to say there)."""
        self.multiprocess = multiprocess_enabled()
        self.training = training
        if self.multiprocess:
            from prometheus_client import multiprocess

            if not getattr(_values.ValueClass, "_multiprocess", False):
                # prometheus_client picks its value class at import; the variable was set later
                _values.ValueClass = _values.MultiProcessValue()
            own = CollectorRegistry()  # the families register here; the files are what gets rendered
            self.registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(self.registry)
        else:
            own = self.registry = CollectorRegistry()
        r = own
        # HTTP
        self.requests = Counter("collafuse_requests", "HTTP requests by route template, method and status",
                                ["route", "method", "status"], registry=r)
        self.http_bytes = Counter("collafuse_http_bytes", "HTTP body bytes, received (in) and sent (out)",
                                  ["direction"], registry=r)
        self.bytes_in = self.http_bytes.labels("in")
        self.bytes_out = self.http_bytes.labels("out")
        # handoff engine
        self.queue_waiting = Gauge("collafuse_queue_waiting", "handoff requests waiting to be admitted",
                                   registry=r, multiprocess_mode="livesum")
        self.queue_active = Gauge("collafuse_queue_active", "handoff requests in the running batch",
                                  registry=r, multiprocess_mode="livesum")
        self.batch_rows = Histogram("collafuse_batch_rows", "rows (images) per model forward",
                                    buckets=_ROW_BUCKETS, registry=r)
        self.batch_requests = Histogram("collafuse_batch_requests", "requests per model forward",
                                        buckets=_ROW_BUCKETS, registry=r)
        self.step_seconds = Histogram("collafuse_step_seconds", "one engine step: forward + per-row steps",
                                      buckets=_STEP_BUCKETS, registry=r)
        self.handoff_seconds = Histogram("collafuse_handoff_seconds", "POST /v1/handoff latency, queue included",
                                         buckets=_LATENCY_BUCKETS, registry=r)
        self.images = Counter("collafuse_handoff_images", "handoff samples returned, by token name",
                              ["client"], registry=r)
        # the model and the token table
        self.model_info = Gauge("collafuse_model_info", "1 for the model version a live worker serves (0: served "
                                "before)", ["version"], registry=r, multiprocess_mode="livemax")
        self.token_reloads = Counter("collafuse_token_reloads", "token table reloads (SIGHUP or config file change) "
                                     "by result: ok (validated and in force) or failed (old tokens stay)",
                                     ["result"], registry=r)
        # training from client uploads (serve --train)
        if training:
            self._training_families(r)
        self._model_version: str | None = None
        self._trainer_seen: tuple[int, int] | None = None  # (trained batches, rows) last counted
        self._loss_seen = 0
        self._loss_ema = float("nan")
        self._ckpt_time: float | None = None

    def _training_families(self, r: CollectorRegistry) -> None:
        self.train_uploads = Counter("collafuse_train_uploads", "POST /v1/train answers by status and error code "
                                     "(accepted: queued for training)", ["status", "code"], registry=r)
        self.train_spool_batches = Gauge("collafuse_train_spool_pending_batches",
                                         "uploaded batches queued for training", registry=r,
                                         multiprocess_mode="livemax")
        self.train_spool_bytes = Gauge("collafuse_train_spool_pending_bytes", "bytes the upload spool holds on disk: "
                                       "queued uploads and trained ones not yet in a checkpoint (429 beyond its "
                                       "limit)", registry=r, multiprocess_mode="livemax")
        self.train_batches = Counter("collafuse_train_batches", "uploaded batches trained by this process",
                                     registry=r)
        self.train_rows = Counter("collafuse_train_rows", "uploaded rows (images) trained by this process",
                                  registry=r)
        self.train_step = Gauge("collafuse_train_step", "server updates of the networked trainer (across restarts)",
                                registry=r, multiprocess_mode="livemax")
        self.train_loss_ema = Gauge("collafuse_train_loss_ema", f"exponential moving average of the server "
                                    f"training loss (weight {LOSS_EMA_WEIGHT} per update; NaN before the first)",
                                    registry=r, multiprocess_mode="livemax")
        self.train_ckpt_time = Gauge("collafuse_train_last_checkpoint_timestamp_seconds",
                                     "Unix time of the trainer's newest durable checkpoint (0: none yet)",
                                     registry=r, multiprocess_mode="livemax")
        self.train_ckpt_age = Gauge("collafuse_train_last_checkpoint_age_seconds",
                                    "seconds since the trainer's newest durable checkpoint (NaN: none yet)",
                                    registry=r, multiprocess_mode="livemax")
        self.train_ckpt_failing = Gauge("collafuse_train_checkpoint_failing",
                                        "1 while checkpoint writes fail (trained batches stay spooled)", registry=r,
                                        multiprocess_mode="livemax")

    # engine hooks
    def observe_step(self, rows: int, requests: int, seconds: float) -> None:
        self.batch_rows.observe(rows)
        self.batch_requests.observe(requests)
        self.step_seconds.observe(seconds)

    def set_queue(self, waiting: int, active: int) -> None:
        self.queue_waiting.set(waiting)
        self.queue_active.set(active)

    def set_model_version(self, version: str) -> None:
        """``collafuse_model_info{version=…}`` 1 for ``version``, 0 for the one served before."""
        if version == self._model_version:
            return
        if self._model_version is not None:
            self.model_info.labels(self._model_version).set(0)
        self.model_info.labels(version).set(1)
        self._model_version = version

    # training
    def watch_trainer(self, trainer: ServerTrainer, checkpoint_time: float | None) -> None:
        """Start counting ``trainer`` (its totals so far are not this process's work)."""
        self._trainer_seen = (len(trainer.trained), trainer.trained_rows)
        self._loss_seen = len(trainer.losses)
        self._ckpt_time = checkpoint_time

    def checkpoint_written(self, when: float | None = None) -> None:
        self._ckpt_time = time.time() if when is None else when

    def observe_trainer(self, trainer: ServerTrainer) -> None:
        """Bring the training metrics up to date (called on every scrape)."""
        if self._trainer_seen is None:
            self.watch_trainer(trainer, None)
        batches, rows = len(trainer.trained), trainer.trained_rows
        seen_batches, seen_rows = self._trainer_seen
        if batches > seen_batches:
            self.train_batches.inc(batches - seen_batches)
        if rows > seen_rows:
            self.train_rows.inc(rows - seen_rows)
        self._trainer_seen = (max(batches, seen_batches), max(rows, seen_rows))
        losses = trainer.losses[self._loss_seen:]  # appended by the trainer thread; a slice is a snapshot
        self._loss_seen += len(losses)
        for loss in losses:
            ema = self._loss_ema
            self._loss_ema = loss if ema != ema else LOSS_EMA_WEIGHT * loss + (1 - LOSS_EMA_WEIGHT) * ema
        self.train_loss_ema.set(self._loss_ema)
        self.train_step.set(trainer.step)
        self.train_spool_batches.set(len(trainer.spool))
        self.train_spool_bytes.set(trainer.spool.nbytes)
        self.train_ckpt_failing.set(1 if trainer.checkpoint_error is not None else 0)
        if self._ckpt_time is None:
            self.train_ckpt_time.set(0)
            self.train_ckpt_age.set(float("nan"))
        else:
            self.train_ckpt_time.set(self._ckpt_time)
            self.train_ckpt_age.set(max(0.0, time.time() - self._ckpt_time))

    def render(self) -> bytes:
        return generate_latest(self.registry)

