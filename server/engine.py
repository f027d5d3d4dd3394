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
:mod:`collafuse_edge.noise`): the engine computes the noise of every row for all of a hop's
steps (≤ ``noise_budget`` bytes) in one vectorised call on the model's device.

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

from .errors import EngineBusy, EngineClosed, ServerAppError

log = logging.getLogger("collafuse.server")

MAX_STEPS_PER_HOP = 64  # steps the worker runs before it returns to the event loop anyway
MAX_HOP_S = 0.05  # … or after this long, so metrics and cancellations stay fresh


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
    pairs: np.ndarray  # [L, 2] int64: (t, prev) of each step
    future: asyncio.Future
    created: float
    started: float | None = None
    i: int = 0  # index of the next step in ``pairs``
    x: torch.Tensor | None = None  # current sample on the device
    labels: torch.Tensor | None = None
    result: np.ndarray | None = field(default=None, repr=False)
    noisy: np.ndarray = field(init=False, repr=False)  # [L] bool: the step draws noise

    def __post_init__(self) -> None:
        sp = self.spec
        self.noisy = np.array([needs_noise(sp.sampler, int(t), sp.eta) for t in self.pairs[:, 0]], bool)

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
        self._step_s = 0.0  # running mean of one step's time, to size hops to MAX_HOP_S
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
            raise ServerAppError(f"n={spec.n} exceeds max_batch_rows {self.max_batch_rows}")
        loop = asyncio.get_running_loop()
        pairs = np.array(self.timetable_pairs(spec), dtype=np.int64).reshape(-1, 2)
        job = _Job(spec, (spec.n, *self.sample_shape), pairs, loop.create_future(), time.perf_counter())
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
                        j.future.set_exception(ServerAppError(f"the server failed to compute the handoff: {e}"))
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

    def _to_device(self, a: np.ndarray) -> torch.Tensor:
        """A host array on the model's device; on an accelerator through pinned memory, so the
        copy does not wait for the kernels already queued."""
        t = torch.from_numpy(np.ascontiguousarray(a))
        if self.device.type == "cpu":
            return t
        return t.pin_memory().to(self.device, non_blocking=True)

    def _keyed(self, seeds: np.ndarray, levels: np.ndarray, rows: np.ndarray, purpose: int) -> torch.Tensor:
        """Keyed normals ``[R, C·H·W]`` on the model's device (numpy on a CPU, torch elsewhere:
        the same numbers)."""
        numel = int(np.prod(self.sample_shape))
        if self.device.type == "cpu":
            return torch.from_numpy(keyed_normal(seeds, levels, rows, numel, purpose))
        ids = self._to_device(np.stack([seeds, levels, rows]).astype(np.int64))
        return keyed_normal(ids[0], ids[1], ids[2], numel, purpose)

    @staticmethod
    def _row_keys(jobs: list[_Job]) -> tuple[np.ndarray, np.ndarray]:
        """Each batch row's request seed and its row index within the request."""
        seeds = np.concatenate([np.full(j.n, j.spec.seed, np.int64) for j in jobs])
        rows = np.concatenate([np.arange(j.n, dtype=np.int64) for j in jobs])
        return seeds, rows

    def _start(self, jobs: list[_Job]) -> None:
        """x_{T-1} (the keyed initial noise) of new jobs, in one call."""
        seeds, rows = self._row_keys(jobs)
        z = self._keyed(seeds, rows * 0, rows, PURPOSE_INITIAL)
        a = 0
        for j in jobs:
            j.x = z[a:a + j.n].reshape(j.shape)
            a += j.n
            if self.conditional:
                j.labels = self._to_device(np.asarray(j.spec.labels, dtype=np.int64))

    @torch.no_grad()
    def _run_steps(self, jobs: list[_Job]) -> list[tuple[int, int, float]]:
        """Up to S steps for ``jobs`` as one batch, S = the fewest steps any job has left (≤
        ``MAX_STEPS_PER_HOP``, and within the noise budget): the batch is stacked once, the
        levels and the keyed noise of all S steps are computed in one go. Stops early when a job
        waits to join or the hop's time is spent. Returns (rows, requests, seconds) per step."""
        new = [j for j in jobs if j.x is None]
        if new:
            self._start(new)
        live = [j for j in jobs if j.i < len(j.pairs)]
        out: list[tuple[int, int, float]] = []
        if live:
            out = self._hop(live)
        for j in jobs:
            if j.finished and j.result is None:
                j.result = j.x.float().cpu().numpy()
        return out

    def _hop(self, live: list[_Job]) -> list[tuple[int, int, float]]:
        t_hop = time.perf_counter()
        R = sum(j.n for j in live)
        numel = int(np.prod(self.sample_shape))
        S = min(min(len(j.pairs) - j.i for j in live), MAX_STEPS_PER_HOP,
                max(1, self.noise_budget // (R * numel * 4)))
        if self._step_s > 0:  # no more steps than fit in the hop's time: their noise would be wasted
            S = min(S, max(1, int(MAX_HOP_S / self._step_s)))
        # [S, R] levels of every row at each step of the hop, and which (step, row) draw noise
        t_tab = np.concatenate([np.repeat(j.pairs[j.i:j.i + S, :1], j.n, 1) for j in live], 1)
        p_tab = np.concatenate([np.repeat(j.pairs[j.i:j.i + S, 1:], j.n, 1) for j in live], 1)
        noisy = np.concatenate([np.repeat(j.noisy[j.i:j.i + S, None], j.n, 1) for j in live], 1)
        noise = None
        if noisy.any():
            seeds, rows = self._row_keys(live)
            si, ri = np.nonzero(noisy)
            z = self._keyed(seeds[ri], t_tab[si, ri], rows[ri], PURPOSE_STEP)
            if noisy.all():
                noise = z.reshape(S, R, *self.sample_shape)
            else:
                noise = torch.zeros((S * R, numel), device=self.device, dtype=z.dtype)
                noise[self._to_device(si * R + ri)] = z
                noise = noise.reshape(S, R, *self.sample_shape)
        t_dev = self._to_device(t_tab)
        x = live[0].x if len(live) == 1 else torch.cat([j.x for j in live])
        labels = None
        if self.conditional:
            labels = live[0].labels if len(live) == 1 else torch.cat([j.labels for j in live])
        out = []
        done = 0
        while done < S:
            t0 = time.perf_counter()
            eps = self.denoise(x, t_dev[done], labels)
            nz = None if noise is None or not noisy[done].any() else noise[done]
            x = self._apply(live, x, eps.to(x.dtype), t_tab[done], p_tab[done], nz)
            done += 1
            self.steps_run += 1
            dt = time.perf_counter() - t0
            self._step_s = dt if self._step_s == 0 else 0.8 * self._step_s + 0.2 * dt
            out.append((R, len(live), dt))
            if (self._waiting and self.batching) or time.perf_counter() - t_hop >= MAX_HOP_S \
                    or any(j.future.done() for j in live):
                break
        a = 0
        for j in live:
            j.x = x[a:a + j.n]
            j.i += done
            a += j.n
        return out

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
