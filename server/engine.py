"""Step-level batching: one engine task serves every handoff request with shared model forwards.

Each request (a :class:`HandoffSpec`) becomes a job holding its own sample ``[n,C,H,W]`` and its
own timetable (levels T-1 … k for its client's k, optionally DDIM-thinned). The engine repeats:

1. admit waiting jobs (FIFO) while the rows fit into ``max_batch_rows``;
2. stack every active job's sample into one batch, each row with its job's current level
   (rows at *different* levels share the forward: the UNet takes a per-row timestep);
3. one model forward, off the event loop, in a single worker thread;
4. per-row DDPM/DDIM step with each job's own keyed noise ``step_noise(seed, level, shape)``;
5. finished jobs get their handoff sample; new jobs join before the next step.

The worker runs several steps per hop off the event loop while nothing changes (no job finished,
none waiting, none cancelled; at most ``MAX_STEPS_PER_HOP`` and ``MAX_HOP_S``), so a lone request
does not pay a thread hop per level. The keyed noise is counter-based (Philox, see
:mod:`collafuse_edge.noise`): the engine computes it on the model's device, for every job that
needs more, a block of levels ahead (≤ ``noise_budget`` bytes) in one vectorised call.

Because a job's noise depends only on its seed, level and shape, and the model treats rows
independently, a job gets the same tensor batched with others as served alone, and the same as
``collafuse.sampling.split_sample`` with that seed (up to float round-off of batched kernels).

With ``batching=False`` the engine runs one job to completion before admitting the next: the
one-at-a-time baseline of the throughput benchmark.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import time
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from collafuse_edge.noise import PURPOSE_INITIAL, PURPOSE_STEP, keyed_normal
from collafuse_edge.schedule import Schedule, needs_noise, server_timetable, step

from .errors import EngineBusy, EngineClosed, ServerError

log = logging.getLogger("collafuse.server")

MAX_STEPS_PER_HOP = 64  # steps the worker runs before it returns to the event loop anyway
MAX_HOP_S = 0.05  # … or after this long, so metrics and cancellations stay fresh
MAX_NOISE_AHEAD = 64  # levels of step noise computed ahead per job


@dataclass(frozen=True)
class HandoffSpec:
    """One request: ``n`` handoff samples for a client that runs levels k-1 … 0."""

    n: int
    seed: int
    client_levels: int  # k; the server runs T-1 … k and returns the sample at level k-1
    labels: np.ndarray | None = None  # [n] int64 when the server model is conditional
    sampler: str = "ddpm"  # "ddpm" (every level) or "ddim"
    steps: int | None = None  # DDIM: server levels to evaluate (both ends kept); None = all
    eta: float = 0.0  # DDIM noise scale


@dataclass(frozen=True)
class HandoffResult:
    samples: np.ndarray  # [n,C,H,W] float32 at level k-1
    level: int
    seed: int
    steps: int  # server levels evaluated
    queued_s: float  # waiting before the first step
    total_s: float


class Metrics(Protocol):
    def observe_step(self, rows: int, requests: int, seconds: float) -> None: ...
    def set_queue(self, waiting: int, active: int) -> None: ...


@dataclass(eq=False)
class _Job:
    spec: HandoffSpec
    shape: tuple[int, int, int, int]
    pairs: list[tuple[int, int]]
    future: asyncio.Future
    created: float
    started: float | None = None
    i: int = 0  # index of the next step in ``pairs``
    x: torch.Tensor | None = None  # current sample on the device
    labels: torch.Tensor | None = None
    result: np.ndarray | None = field(default=None, repr=False)
    noise_levels: list[int] = field(default_factory=list)  # levels still to draw noise for, in order
    noise: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)  # drawn ahead

    @property
    def n(self) -> int:
        return self.spec.n

    @property
    def finished(self) -> bool:
        return self.x is not None and self.i >= len(self.pairs)


class StepEngine:
    """Runs handoff jobs on ``denoise`` (ε̂ = denoise(x [B,C,H,W], t [B], labels [B] | None))."""

    def __init__(
        self,
        denoise,
        schedule: Schedule,
        sample_shape: tuple[int, int, int],
        device: torch.device,
        *,
        conditional: bool,
        batching: bool = True,
        max_batch_rows: int = 256,
        max_queue: int = 1024,
        metrics: Metrics | None = None,
        noise_budget: int = 64 * 2**20,
    ):
        self.denoise = denoise
        self.schedule = schedule
        self.sample_shape = tuple(sample_shape)
        self.device = device
        self.conditional = conditional
        self.batching = batching
        self.max_batch_rows = max_batch_rows
        self.max_queue = max_queue
        self.metrics = metrics
        self.noise_budget = noise_budget
        self._waiting: collections.deque[_Job] = collections.deque()
        self._active: list[_Job] = []
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._accepting = False
        self._task: asyncio.Task | None = None
        # One worker: the model is not thread-safe, and one thread already uses every core torch has.
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="collafuse-engine")
        self.steps_run = 0

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        self._accepting = True
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="collafuse-engine")

    @property
    def accepting(self) -> bool:
        return self._accepting and self._task is not None and not self._task.done()

    async def drain(self, timeout: float) -> bool:
        """Stop taking new jobs and wait until the admitted ones finish. True if all finished."""
        self._accepting = False
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            log.warning("drain timed out after %.1f s with %d active and %d waiting requests",
                        timeout, len(self._active), len(self._waiting))
            return False

    async def close(self) -> None:
        self._accepting = False
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        for j in [*self._active, *self._waiting]:
            if not j.future.done():
                j.future.set_exception(EngineClosed("the server is shutting down; retry on another replica"))
        self._active.clear()
        self._waiting.clear()
        await asyncio.get_running_loop().run_in_executor(None, self._executor.shutdown, True)

    def run_sync(self, fn, *args):
        """Run ``fn`` in the engine's worker thread (e.g. a warm-up); returns a future to await."""
        return asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # -- submitting ----------------------------------------------------------------------------

    def timetable_pairs(self, spec: HandoffSpec) -> list[tuple[int, int]]:
        return server_timetable(self.schedule.T, spec.client_levels, spec.steps).pairs()

    async def submit(self, spec: HandoffSpec) -> HandoffResult:
        if not self.accepting:
            raise EngineClosed("the server is draining or not started; retry shortly or on another replica")
        if len(self._waiting) >= self.max_queue:
            raise EngineBusy(f"the server queue is full ({self.max_queue} requests waiting); retry later")
        if spec.n > self.max_batch_rows:
            raise ServerError(f"n={spec.n} exceeds max_batch_rows {self.max_batch_rows}")
        loop = asyncio.get_running_loop()
        job = _Job(spec, (spec.n, *self.sample_shape), self.timetable_pairs(spec), loop.create_future(),
                   time.perf_counter())
        self._waiting.append(job)
        self._idle.clear()
        self._wake.set()
        self._report_queue()
        samples = await job.future
        done = time.perf_counter()
        return HandoffResult(samples, spec.client_levels - 1, spec.seed, len(job.pairs),
                             (job.started or done) - job.created, done - job.created)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def active(self) -> int:
        return len(self._active)

    # -- the loop ------------------------------------------------------------------------------

    def _report_queue(self) -> None:
        if self.metrics is not None:
            self.metrics.set_queue(len(self._waiting), len(self._active))

    def _admit(self) -> None:
        rows = sum(j.n for j in self._active)
        while self._waiting:
            job = self._waiting[0]
            if job.future.done():  # the caller went away while waiting
                self._waiting.popleft()
                continue
            if self._active and (not self.batching or rows + job.n > self.max_batch_rows):
                break
            self._waiting.popleft()
            job.started = time.perf_counter()
            self._active.append(job)
            rows += job.n

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._admit()
            self._report_queue()
            if not self._active:
                self._idle.set()
                self._wake.clear()
                await self._wake.wait()
                continue
            batch = list(self._active)
            try:
                steps = await loop.run_in_executor(self._executor, self._run_steps, batch)
            except Exception as e:  # a broken model or device: fail this batch, keep serving
                log.exception("engine step failed for %d requests", len(batch))
                for j in batch:
                    if not j.future.done():
                        j.future.set_exception(ServerError(f"the server failed to compute the handoff: {e}"))
                self._active = [j for j in self._active if j not in batch]
                continue
            if self.metrics is not None:
                for rows, requests, seconds in steps:
                    self.metrics.observe_step(rows, requests, seconds)
            keep = []
            for j in self._active:
                if j.future.done():  # cancelled by its caller: drop it
                    continue
                if j.finished:
                    j.future.set_result(j.result)
                else:
                    keep.append(j)
            self._active = keep

    # -- one step (worker thread) --------------------------------------------------------------

    def _run_steps(self, jobs: list[_Job]) -> list[tuple[int, int, float]]:
        """Steps for ``jobs`` until one finishes, a job waits or is cancelled, or the hop's
        budget is spent; returns (rows, requests, seconds) per step."""
        out = []
        t_hop = time.perf_counter()
        while True:
            t0 = time.perf_counter()
            rows = self._step(jobs)
            out.append((rows, len(jobs), time.perf_counter() - t0))
            if (not rows or any(j.finished or j.future.done() for j in jobs)
                    or (self._waiting and self.batching) or len(out) >= MAX_STEPS_PER_HOP
                    or time.perf_counter() - t_hop >= MAX_HOP_S):
                return out

    def _to_device(self, a: np.ndarray) -> torch.Tensor:
        """A host array on the model's device; on an accelerator through pinned memory, so the
        copy does not wait for the kernels already queued."""
        t = torch.from_numpy(np.ascontiguousarray(a))
        if self.device.type == "cpu":
            return t
        return t.pin_memory().to(self.device, non_blocking=True)

    def _start(self, jobs: list[_Job]) -> None:
        """x_{T-1} (the keyed initial noise) for new jobs, computed in one call."""
        numel = int(np.prod(self.sample_shape))
        seeds = np.concatenate([np.full(j.n, j.spec.seed, np.int64) for j in jobs])
        rows = np.concatenate([np.arange(j.n, dtype=np.int64) for j in jobs])
        if self.device.type == "cpu":
            z = torch.from_numpy(keyed_normal(seeds, rows * 0, rows, numel, PURPOSE_INITIAL))
        else:  # the same numbers, computed on the device
            ids = self._to_device(np.stack([seeds, rows]))
            z = keyed_normal(ids[0], ids[1] * 0, ids[1], numel, PURPOSE_INITIAL)
        a = 0
        for j in jobs:
            j.x = z[a:a + j.n].reshape(j.shape)
            a += j.n
            if self.conditional:
                j.labels = self._to_device(np.asarray(j.spec.labels, dtype=np.int64))
            j.noise_levels = [t for t, _ in j.pairs if needs_noise(j.spec.sampler, t, j.spec.eta)]

    @torch.no_grad()
    def _step(self, jobs: list[_Job]) -> int:
        """One forward + one step for every unfinished job; returns the number of rows computed."""
        new = [j for j in jobs if j.x is None]
        if new:
            self._start(new)
        live = [j for j in jobs if j.i < len(j.pairs)]
        if live:
            ns = [j.n for j in live]
            t = np.repeat(np.array([j.pairs[j.i][0] for j in live], dtype=np.int64), ns)
            prev = np.repeat(np.array([j.pairs[j.i][1] for j in live], dtype=np.int64), ns)
            x = live[0].x if len(live) == 1 else torch.cat([j.x for j in live])
            labels = None
            if self.conditional:
                labels = live[0].labels if len(live) == 1 else torch.cat([j.labels for j in live])
            eps = self.denoise(x, self._to_device(t), labels)
            noise = self._noise(live)  # on CUDA this overlaps the forward still running on the GPU
            x = self._apply(live, x, eps.to(x.dtype), t, prev, noise)
            a = 0
            for j in live:
                j.x = x[a:a + j.n]
                j.i += 1
                a += j.n
            self.steps_run += 1
        for j in jobs:
            if j.finished and j.result is None:
                j.result = j.x.float().cpu().numpy()
        return int(sum(j.n for j in live))

    def _noise(self, live: list[_Job]) -> torch.Tensor | None:
        """Each job's keyed step noise, stacked like the batch; None when no row needs noise."""
        levels = [j.pairs[j.i][0] for j in live]
        needed = [bool(j.noise_levels) and j.noise_levels[0] == lv for j, lv in zip(live, levels)]
        if not any(needed):
            return None
        self._draw_ahead([j for j, lv, need in zip(live, levels, needed) if need and lv not in j.noise])
        parts = []
        for j, lv, need in zip(live, levels, needed):
            if need:
                j.noise_levels.pop(0)
                parts.append(j.noise.pop(lv))
            else:
                parts.append(torch.zeros(j.shape, device=self.device))
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _draw_ahead(self, jobs: list[_Job]) -> None:
        """Keyed step noise for the next levels of ``jobs``, in one vectorised call."""
        if not jobs:
            return
        numel = int(np.prod(self.sample_shape))
        rows = sum(j.n for j in jobs)
        ahead = int(max(1, min(MAX_NOISE_AHEAD, self.noise_budget // (rows * numel * 4))))
        seeds, lvs, idx, plan = [], [], [], []
        for j in jobs:
            take = j.noise_levels[:ahead]
            plan.append((j, take))
            for lv in take:
                seeds += [j.spec.seed] * j.n
                lvs += [lv] * j.n
                idx += range(j.n)
        if self.device.type == "cpu":
            z = torch.from_numpy(keyed_normal(np.array(seeds, np.int64), np.array(lvs, np.int64),
                                              np.array(idx, np.int64), numel, PURPOSE_STEP))
        else:
            ids = self._to_device(np.array([seeds, lvs, idx], dtype=np.int64))
            z = keyed_normal(ids[0], ids[1], ids[2], numel, PURPOSE_STEP)
        a = 0
        for j, take in plan:
            for lv in take:
                j.noise[lv] = z[a:a + j.n].reshape(j.shape)
                a += j.n

    def _apply(self, live: list[_Job], x, eps, t, prev, noise):
        """Per-row steps; jobs with different samplers are stepped in groups of rows."""
        kinds = {(j.spec.sampler, float(j.spec.eta)) for j in live}
        if len(kinds) == 1:
            (sampler, eta), = kinds
            return step(sampler, self.schedule, x, eps, t, prev, noise, eta)
        groups: dict[tuple[str, float], list[int]] = {}
        a = 0
        for j in live:
            groups.setdefault((j.spec.sampler, float(j.spec.eta)), []).extend(range(a, a + j.n))
            a += j.n
        out = torch.empty_like(x)
        for (sampler, eta), rows in groups.items():
            idx = torch.as_tensor(rows, device=x.device)
            nz = None if noise is None else noise[idx]
            out[idx] = step(sampler, self.schedule, x[idx], eps[idx], t[rows], prev[rows], nz, eta)
        return out
