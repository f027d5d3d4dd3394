"""The networked server's trainer: trains the shared model from spooled client disclosures.

A background thread takes batches from the :class:`~collafuse.spool.DisclosureSpool`, runs the
same :func:`collafuse.train.server_update` as the in-process simulation, checkpoints atomically
every ``checkpoint_every`` updates into ``RUN/server_training/`` (recording the batch keys it
trained), and only then forgets those batches. ``on_weights(state_dict, version)`` receives a CPU
copy of the EMA weights after every checkpoint so inference can swap models between steps.

Guarantee: a batch acknowledged by ``POST /v1/train`` is trained exactly once, across crashes
and restarts (see :mod:`collafuse.spool`).
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from .checkpoint import (latest_checkpoint, load_rng, load_tensors, model_configs, read_config, read_data_info,
                         read_state, restore_model_state, save_checkpoint)
from .errors import CheckpointError
from .objectives import Disclosure
from .run_lock import RunLock
from .spool import DisclosureSpool, SpooledBatch
from .train import new_model_state, resolve_device, server_update

WeightsCallback = Callable[[dict, int], None]
CHECKPOINT_RETRY_S = 5.0  # first wait before retrying a refused checkpoint write (doubles, ≤ 300 s)
log = logging.getLogger("collafuse.server_training")


@dataclass(frozen=True)
class ServerTrainingConfig:
    batch_rows: int = 256  # rows per server update (batches are mixed across clients)
    checkpoint_every: int = 50  # updates between checkpoints (and weight publications)
    max_pending_batches: int = 1024
    max_pending_bytes: int = 512 * 2**20
    device: str = "auto"
    seed: int = 0


class ServerTrainer:
    def __init__(self, run_dir: str, tc: ServerTrainingConfig = ServerTrainingConfig(),
                 on_weights: WeightsCallback | None = None, *, owner: bool = True):
        self.run_dir = run_dir
        # One trainer per run: a second one (another port, a restart while the old process still
        # runs) would checkpoint over this one's and forget batches it acknowledged. ``owner=False``:
        # a DDP rank other than 0, which reads the run but never writes it.
        self.lock = RunLock(run_dir, "collafuse serve --train")
        if owner:
            self.lock.acquire()
        try:
            self._open(tc, on_weights)
        except BaseException:
            self.lock.release()
            raise

    def _open(self, tc: ServerTrainingConfig, on_weights: WeightsCallback | None) -> None:
        run_dir = self.run_dir
        self.cfg = read_config(run_dir)
        self.info = read_data_info(run_dir)
        self.tc = tc
        self.schedule = self.cfg.schedule.build()
        self.device = resolve_device(tc.device)
        self.state_dir = os.path.join(run_dir, "server_training")
        os.makedirs(self.state_dir, exist_ok=True)
        _, scfg = model_configs(self.cfg, self.info)
        torch.manual_seed(tc.seed)
        self.ms = new_model_state("server", scfg, self.cfg.train, self.device)
        self.gen = torch.Generator().manual_seed(tc.seed)
        self.step = 0
        self.trained: set[str] = set()
        self.trained_rows = 0
        ckpt = latest_checkpoint(self.state_dir)
        if ckpt is not None:  # resume the networked trainer
            meta = read_state(ckpt)
            restore_model_state(ckpt, meta, self.ms)
            self.gen.set_state(load_rng(ckpt))
            self.step = int(meta["step"])
            self.trained = set(meta["extra"].get("trained", []))
            self.trained_rows = int(meta["extra"].get("trained_rows", 0))  # a running total across restarts
        else:  # start from the run's own server model (raw weights + EMA + optimiser)
            run_ckpt = latest_checkpoint(run_dir)
            if run_ckpt is not None:
                restore_model_state(run_ckpt, read_state(run_ckpt), self.ms)
        self.spool = DisclosureSpool(os.path.join(self.state_dir, "spool"), tc.max_pending_batches,
                                     tc.max_pending_bytes, done=self.trained)
        self.on_weights = on_weights
        self.losses: list[float] = []
        self._since_ckpt: list[SpooledBatch] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self.checkpoint_error: str | None = None  # the last failed checkpoint write (disk full …), until one succeeds
        self._ckpt_retry_at = 0.0
        self._ckpt_backoff = CHECKPOINT_RETRY_S

    @property
    def version(self) -> int:
        return self.step

    def _disclosures(self, batches: list[SpooledBatch]) -> list[Disclosure]:
        out = []
        for b in batches:
            x = torch.from_numpy(self.spool.load(b))
            lab = torch.tensor(b.labels, dtype=torch.long) if b.labels is not None else None
            out.append(Disclosure(b.client, b.level, x, lab))
        return out

    def train_batches(self, batches: list[SpooledBatch]) -> float | None:
        loss = server_update(self.ms, self._disclosures(batches), self.schedule, self.cfg, self.gen, self.device)
        self.step += 1
        self.trained.update(b.key for b in batches)
        self.trained_rows += sum(b.rows for b in batches)
        self._since_ckpt.extend(batches)
        if loss is not None:
            self.losses.append(loss)
        due = self.step % self.tc.checkpoint_every == 0
        if due or (self.checkpoint_error is not None and time.monotonic() >= self._ckpt_retry_at):
            self.try_checkpoint()
        return loss

    def try_checkpoint(self) -> bool:
        """:meth:`checkpoint`, but a refused write (disk full, read-only) does not stop training: the
        batches since the last good checkpoint stay spooled (so a crash now loses nothing) and the
        write is retried with backoff. The error shows in :meth:`progress` and the log."""
        try:
            self.checkpoint()
        except (CheckpointError, OSError) as e:
            self.checkpoint_error = str(e)
            self._ckpt_retry_at = time.monotonic() + self._ckpt_backoff
            log.error("server-training checkpoint at step %d failed (%d trained batches stay spooled; retry in "
                      "%.0f s): %s", self.step, len(self._since_ckpt), self._ckpt_backoff, e)
            self._ckpt_backoff = min(self._ckpt_backoff * 2, 300.0)
            return False
        if self.checkpoint_error is not None:
            log.info("server-training checkpoint at step %d written again after earlier failures", self.step)
        self.checkpoint_error = None
        self._ckpt_backoff = CHECKPOINT_RETRY_S
        return True

    def checkpoint(self) -> None:
        if not self._since_ckpt and latest_checkpoint(self.state_dir) is not None:
            return
        save_checkpoint(self.state_dir, self.step, [self.ms], self.gen.get_state(),
                        extra={"trained": sorted(self.trained), "trained_rows": self.trained_rows})
        self.spool.forget(self._since_ckpt)  # only now: the checkpoint that trained them is durable
        losses = self.losses[-max(1, self.tc.checkpoint_every):]
        self._log_metrics({"step": self.step, "server_loss": sum(losses) / len(losses) if losses else None,
                           "trained_rows": self.trained_rows, "trained_batches": len(self.trained)})
        self._since_ckpt = []
        if self.on_weights is not None:
            self.on_weights(self.ema_state_dict(), self.step)

    def _log_metrics(self, row: dict) -> None:
        """One line per checkpoint in ``RUN/server_training/metrics.jsonl`` (a log: lines of a crash's
        lost steps are written again after the restart, with the same step numbers)."""
        try:
            with open(os.path.join(self.state_dir, "metrics.jsonl"), "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
        except OSError as e:  # a log line is not worth stopping training for
            log.warning("could not append to server_training/metrics.jsonl: %s", e)

    def ema_state_dict(self) -> dict:
        names = [n for n, _ in self.ms.model.named_parameters()]
        sd = {k: v.detach().cpu().clone() for k, v in self.ms.model.state_dict().items()}
        for n, p in zip(names, self.ms.ema.shadow_params):
            sd[n] = p.detach().cpu().clone()
        return sd

    # -- background thread ------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                batches = self.spool.take(self.tc.batch_rows, timeout=0.2)
                if batches:
                    self.train_batches(batches)
                elif self.checkpoint_error is not None and time.monotonic() >= self._ckpt_retry_at:
                    self.try_checkpoint()  # idle, but trained batches still wait for a durable checkpoint
        except BaseException as e:  # surfaced through /readyz and the logs
            self.error = e
            raise

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="collafuse-server-trainer", daemon=True)
        self._thread.start()

    def stop(self, checkpoint: bool = True) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            if checkpoint and self._since_ckpt:
                self.try_checkpoint()  # a failure is logged; the batches stay spooled for the next start
        finally:
            self.lock.release()

    def progress(self) -> dict:
        return {"step": self.step, "trained_batches": len(self.trained), "trained_rows": self.trained_rows,
                "pending_batches": len(self.spool), "last_loss": self.losses[-1] if self.losses else None,
                "running": bool(self._thread and self._thread.is_alive()),
                "error": None if self.error is None else type(self.error).__name__,
                "checkpoint_error": self.checkpoint_error}


def load_server_training_weights(run_dir: str) -> tuple[dict, int] | None:
    """The networked trainer's latest EMA server weights and version, if it has checkpointed."""
    state_dir = os.path.join(run_dir, "server_training")
    ckpt = latest_checkpoint(state_dir) if os.path.isdir(state_dir) else None
    if ckpt is None:
        return None
    meta = read_state(ckpt)
    ema = load_tensors(os.path.join(ckpt, "server.safetensors"))
    raw = load_tensors(os.path.join(ckpt, "server.raw.safetensors"))
    raw.update(ema)
    return raw, int(meta["step"])


__all__ = ["ServerTrainer", "ServerTrainingConfig", "load_server_training_weights", "np"]
