"""What one generated image costs each side (docs/architecture.md#metrics, "client cost"): counted FLOPs, bytes on
the wire and the client's latency on the edge runtime.

FLOPs are counted with torch's ``FlopCounterMode`` on the real models (one forward call at
batch 1, times the number of calls the sampler's timetable makes); training FLOPs are one
counted forward + backward per example. Latency runs the client's half of the chain at batch
1 on one thread, through ``collafuse-edge`` (onnxruntime, given an exported bundle) or through
torch eager — :class:`LatencyProbe` records which.

    probe = LatencyProbe(run.clients[0], run.schedule, backend="edge", bundle="bundles/client0")
    cost = image_cost(run.clients[0], run.server, run.schedule, k=600, server_steps=20, client_steps=30,
                      share_labels=True, probe=probe)
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import numpy as np
import torch

from collafuse_edge.noise import initial_noise
from collafuse_edge.schedule import Schedule, client_timetable, server_timetable
from collafuse_edge.validation import check_choice, check_int

from .errors import ConfigError
from .models import count_flops, count_params, denoise
from .threads import torch_threads

LATENCY_BACKENDS = ("edge", "torch", "none")


def train_flops(model: torch.nn.Module) -> int:
    """Counted FLOPs of one training example: forward + backward at batch 1 (a copy of the model,
    so the caller's gradients are untouched)."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg = model.config
    m = type(model).from_config(cfg)
    p = next(model.parameters())
    m.to(p.device).train()
    x = torch.zeros(1, cfg.in_channels, cfg.sample_size, cfg.sample_size, device=p.device)
    t = torch.zeros(1, dtype=torch.long, device=p.device)
    lab = torch.zeros(1, dtype=torch.long, device=p.device) if cfg.num_class_embeds else None
    with FlopCounterMode(display=False) as counter:
        denoise(m, x, t, lab).square().mean().backward()
    return int(counter.get_total_flops())


class _FlopCache:
    """Counting FLOPs runs the model under a tracer: do it once per architecture."""

    def __init__(self) -> None:
        self._fwd: dict[str, int] = {}
        self._train: dict[str, int] = {}

    @staticmethod
    def _key(model: torch.nn.Module) -> str:
        return repr(sorted(dict(model.config).items()))

    def forward(self, model: torch.nn.Module) -> int:
        k = self._key(model)
        if k not in self._fwd:
            self._fwd[k] = count_flops(model, batch=1)
        return self._fwd[k]

    def train(self, model: torch.nn.Module) -> int:
        k = self._key(model)
        if k not in self._train:
            self._train[k] = train_flops(model)
        return self._train[k]


FLOPS = _FlopCache()


class LatencyProbe:
    """Times the client's levels for one image (batch 1) with one client architecture.

    ``backend="edge"`` runs the collafuse-edge numpy sampler over an onnxruntime session of an
    exported bundle of this architecture — exactly what a device runs. Give the bundle
    directory (``collafuse export --run RUN --client 0 --out BUNDLE``) or an already opened
    ``edge_denoiser`` (a :data:`collafuse_edge.sampler.DenoiseFn`). The core never exports by
    itself (export sits above it). The weights do not change the timing, so one probe serves
    every client and cut ratio of that architecture. ``"torch"`` times torch eager instead.
    """

    def __init__(self, model: torch.nn.Module, schedule: Schedule, backend: str = "torch", *,
                 bundle: str | None = None, edge_denoiser=None, threads: int = 1, runs: int = 5) -> None:
        check_choice("latency backend", backend, LATENCY_BACKENDS, error=ConfigError)
        check_int("latency runs", runs, low=1, error=ConfigError)
        self.model = model
        self.schedule = schedule
        self.threads = threads
        self.runs = runs
        self.backend = backend
        self._onnx = None
        if backend == "edge":
            if edge_denoiser is None and bundle is None:
                raise ConfigError("edge latency needs an exported bundle of the client model: run `collafuse export "
                                  "--run RUN --client 0 --out BUNDLE` and pass it (--bundle BUNDLE), or use torch")
            self._onnx = edge_denoiser if edge_denoiser is not None else self._open(bundle, model, threads)
            self.note = f"onnxruntime via collafuse-edge, batch 1, {threads} thread(s), best of {runs}"
        elif backend == "torch":
            self.note = f"torch eager, batch 1, {threads} thread(s), best of {runs}"
        else:
            self.note = "not measured"

    @staticmethod
    def _open(path: str, model: torch.nn.Module, threads: int):
        from collafuse_edge.bundle import load_bundle
        from collafuse_edge.session import OnnxDenoiser, SessionConfig

        b = load_bundle(path)
        cfg = model.config
        want = (cfg.in_channels, cfg.sample_size, cfg.sample_size)
        if tuple(b.image_shape) != want or bool(b.num_classes) != bool(cfg.num_class_embeds):
            raise ConfigError(f"bundle {path!r} (image shape {tuple(b.image_shape)}, "
                              f"{'conditional' if b.num_classes else 'unconditional'}) is not an export of this "
                              f"run's client model (image shape {want}, "
                              f"{'conditional' if cfg.num_class_embeds else 'unconditional'})")
        return OnnxDenoiser(b, SessionConfig(intra_op_threads=threads))

    def ms_per_image(self, k: int, steps: int | None, sampler: str = "ddim", label: int | None = 0) -> float | None:
        """Wall ms to run the client levels k-1 … 0 (``steps`` of them) for one image: the best of
        ``runs`` timed runs after a warm-up (on a shared CPU the minimum is the stable statistic;
        other processes only ever add time)."""
        if self.backend == "none":
            return None
        tt = client_timetable(k, steps)
        if len(tt) == 0:
            return 0.0
        shape = (1, self.model.config.in_channels, self.model.config.sample_size, self.model.config.sample_size)
        x = initial_noise(0, shape)
        conditional = bool(self.model.config.num_class_embeds)
        lab = np.array([label or 0], dtype=np.int64) if conditional else None
        if self._onnx is not None:
            from collafuse_edge.sampler import run_levels as edge_levels

            def once() -> None:
                edge_levels(self._onnx, self.schedule, x, tt, lab, sampler=sampler)
        else:
            from .sampling import run_levels

            xt = torch.from_numpy(x)

            def once() -> None:
                run_levels(self.model, self.schedule, xt, tt, lab, sampler=sampler)

        with torch_threads(self.threads):
            once()  # warm-up
            times = []
            for _ in range(self.runs):
                t0 = time.perf_counter()
                once()
                times.append(time.perf_counter() - t0)
        return float(np.min(times) * 1e3)


@dataclass(frozen=True)
class ImageCost:
    """Cost of one generated image for one client (and the server's share of it)."""

    client_levels: int  # k: the client runs levels k-1 … 0
    client_calls: int  # denoiser evaluations on the client per image (the sampler's timetable)
    server_calls: int
    client_flops_per_call: int
    server_flops_per_call: int | None  # None: the server model is not here (a site's run, evaluated over HTTP)
    client_flops_per_image: int
    server_flops_per_image: int | None
    local_flops_per_image: int  # the same number of sampler steps, all on the client model (c = 1)
    client_train_flops_per_example: int  # counted fwd + bwd; 0 when the client model does not train (c = 0)
    server_train_flops_per_example: int | None  # 0 when the server does not train (c = 1)
    client_params: int
    server_params: int | None
    handoff_bytes_per_image: int  # server → client at inference: the float32 sample (+ int64 label); 0 at c = 1
    disclosure_bytes_per_example: int  # client → server per training example (x_h + label); 0 at c = 1
    latency_ms_per_image: float | None  # client levels, batch 1, best of N runs; None when not measured
    latency_backend: str
    latency_note: str

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def image_cost(client_model: torch.nn.Module, server_model: torch.nn.Module | None, schedule: Schedule, k: int,
               server_steps: int | None, client_steps: int | None, *, share_labels: bool,
               probe: LatencyProbe | None = None, sampler: str = "ddim") -> ImageCost:
    """Counted cost per image when the client runs k levels and the sampler thins each side to
    ``server_steps`` / ``client_steps`` evaluations (None = every level). Without ``server_model``
    (a site's run: the server's weights stay on the server) the server's columns are None."""
    T = schedule.T
    n_client = len(client_timetable(k, client_steps))
    n_server = len(server_timetable(T, k, server_steps))
    fc = FLOPS.forward(client_model)
    fs = FLOPS.forward(server_model) if server_model is not None else None
    cfg = client_model.config
    pixels = int(cfg.in_channels * cfg.sample_size * cfg.sample_size)
    label_bytes = 8 if share_labels else 0
    wire = 4 * pixels + label_bytes if k < T else 0
    if probe is not None:
        lat, backend, note = probe.ms_per_image(k, client_steps, sampler), probe.backend, probe.note
    else:
        lat, backend, note = None, "none", "not measured"
    return ImageCost(
        client_levels=k, client_calls=n_client, server_calls=n_server,
        client_flops_per_call=fc, server_flops_per_call=fs,
        client_flops_per_image=fc * n_client, server_flops_per_image=None if fs is None else fs * n_server,
        local_flops_per_image=fc * (n_client + n_server),
        client_train_flops_per_example=FLOPS.train(client_model) if k > 0 else 0,
        server_train_flops_per_example=(0 if k >= T else None if server_model is None else FLOPS.train(server_model)),
        client_params=count_params(client_model),
        server_params=None if server_model is None else count_params(server_model),
        handoff_bytes_per_image=wire, disclosure_bytes_per_example=wire,
        latency_ms_per_image=lat, latency_backend=backend, latency_note=note,
    )
