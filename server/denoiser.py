"""The server model as one callable ε̂ = denoise(x, t, labels), eager or accelerated.

Every row carries its own level ``t``, so rows of different requests at different levels share
one forward. Accelerated paths (bf16/fp16 autocast, ``torch.compile``, CUDA graphs) need fixed
shapes; they pad the batch up to a bucket size (powers of two up to ``max_rows``). The UNet
treats rows independently (GroupNorm and attention are per sample), so padding rows change
nothing but cost.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch

from collafuse.models import denoise

from .errors import ServerConfigError

log = logging.getLogger("collafuse.server")


def resolve_device(name: str) -> torch.device:
    """The core's device resolution (one place), with the server's error type."""
    from collafuse.errors import ConfigError
    from collafuse.train import resolve_device as core_resolve

    try:
        return core_resolve(name)
    except ConfigError as e:
        raise ServerConfigError(str(e)) from None


def buckets(max_rows: int) -> tuple[int, ...]:
    """1, 2, 4, … up to and including ``max_rows``."""
    out, b = [], 1
    while b < max_rows:
        out.append(b)
        b *= 2
    out.append(max_rows)
    return tuple(out)


@dataclass(frozen=True)
class AccelConfig:
    precision: str = "fp32"  # "fp32" | "bf16" | "fp16" (autocast; fp16 on CUDA only)
    compile: bool = False
    cuda_graphs: bool = False
    # torch.compile mode; on CUDA "max-autotune-no-cudagraphs" tunes kernels per bucket (minutes
    # of warm-up, fastest steps) and leaves graph capture to ``cuda_graphs``; "default" compiles fast.
    compile_mode: str = "max-autotune-no-cudagraphs"

    @property
    def padded(self) -> bool:
        return self.compile or self.cuda_graphs

    def describe(self) -> str:
        parts = [self.precision]
        if self.compile:
            parts.append("compile")
        if self.cuda_graphs:
            parts.append("cuda-graphs")
        return "+".join(parts)


class TorchDenoiser:
    """``__call__(x [B,C,H,W] f32, t [B] i64, labels [B] i64 | None) → ε̂ [B,C,H,W] f32`` on ``device``.

    Not thread-safe: the engine calls it from its single worker thread.
    """

    def __init__(self, model: torch.nn.Module, device: torch.device, accel: AccelConfig, max_rows: int,
                 bucket_sizes: tuple[int, ...] | None = None):
        if accel.cuda_graphs and device.type != "cuda":
            raise ServerConfigError("cuda_graphs needs a CUDA device; drop --cuda-graphs or use --device cuda")
        if accel.precision == "fp16" and device.type != "cuda":
            raise ServerConfigError("precision fp16 needs a CUDA device; on a CPU use fp32 or bf16")
        self.model = model.to(device).eval().requires_grad_(False)
        self.device = device
        self.accel = accel
        self.max_rows = max_rows
        self.conditional = getattr(model.config, "num_class_embeds", None) is not None
        cfg = model.config
        self.sample_shape = (cfg.in_channels, cfg.sample_size, cfg.sample_size)
        if bucket_sizes is not None and (not bucket_sizes or max(bucket_sizes) != max_rows
                                         or any(b < 1 for b in bucket_sizes)):
            raise ServerConfigError(f"bucket sizes {bucket_sizes} must be positive and end at max_rows {max_rows}")
        self.buckets = (tuple(sorted(set(bucket_sizes))) if bucket_sizes else buckets(max_rows)) if accel.padded else ()
        self._forward = self._eager
        if accel.compile:
            # mode "max-autotune-no-cudagraphs": we capture graphs ourselves when asked to.
            self._compiled = torch.compile(self._eager, dynamic=False, mode=accel.compile_mode
                                           if device.type == "cuda" else None)
            self._forward = self._compiled
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]] = {}

    def _autocast(self):
        if self.accel.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.accel.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def _eager(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        with self._autocast():
            return denoise(self.model, x, t, labels).float()

    def bucket_for(self, rows: int) -> int:
        for b in self.buckets:
            if rows <= b:
                return b
        raise ValueError(f"{rows} rows exceed the largest batch bucket {self.buckets[-1]}")

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        rows = x.shape[0]
        if rows > self.max_rows:
            raise ValueError(f"{rows} rows exceed max_batch_rows {self.max_rows}")
        if not self.conditional:
            labels = None
        if not self.accel.padded:
            return self._forward(x, t, labels)
        b = self.bucket_for(rows)
        if self.accel.cuda_graphs:
            return self._replay(b, x, t, labels)
        if b != rows:
            x, t, labels = self._pad(b, x, t, labels)
        return self._forward(x, t, labels)[:rows]

    def _pad(self, b: int, x, t, labels):
        pad = b - x.shape[0]
        x = torch.cat([x, x.new_zeros((pad, *x.shape[1:]))])
        t = torch.cat([t, t.new_zeros(pad)])
        if labels is not None:
            labels = torch.cat([labels, labels.new_zeros(pad)])
        return x, t, labels

    def _replay(self, b: int, x, t, labels) -> torch.Tensor:
        if b not in self._graphs:
            self._capture(b)
        graph, sx, st, sl, out = self._graphs[b]
        rows = x.shape[0]
        sx[:rows].copy_(x)
        sx[rows:].zero_()
        st[:rows].copy_(t)
        st[rows:].zero_()
        if sl is not None:
            sl[:rows].copy_(labels)
            sl[rows:].zero_()
        graph.replay()
        return out[:rows].clone()

    def _capture(self, b: int) -> None:
        sx = torch.zeros((b, *self.sample_shape), device=self.device)
        st = torch.zeros(b, dtype=torch.long, device=self.device)
        sl = torch.zeros(b, dtype=torch.long, device=self.device) if self.conditional else None
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(3):  # warm up allocator and (when compiled) kernels outside the graph
                self._forward(sx, st, sl)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self._forward(sx, st, sl)
        self._graphs[b] = (graph, sx, st, sl, out)

    @torch.no_grad()
    def warmup(self) -> None:
        """Run every bucket once (compiles kernels, captures graphs); eager: one small call."""
        sizes = self.buckets or (1,)
        for b in sizes:
            x = torch.zeros((b, *self.sample_shape), device=self.device)
            t = torch.zeros(b, dtype=torch.long, device=self.device)
            lab = torch.zeros(b, dtype=torch.long, device=self.device) if self.conditional else None
            self(x, t, lab)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        log.info("server model warmed up (%s, buckets %s)", self.accel.describe(), list(sizes))
