"""What one client pays, per training step and per generated image, under FedAvg, CollaFuse and
purely local training (docs/results.md, "CollaFuse against federated learning").

One source of truth for the counts: FLOPs come from :data:`collafuse.cost.FLOPS` (torch's
``FlopCounterMode`` on the real model), sampler calls from the same timetables the samplers run
(:func:`collafuse.evaluate.split_steps`, ``collafuse_edge.schedule``), and bytes on the wire from
the real encodings of the wire protocol (``collafuse_edge.protocol.encode_tensor`` for the
``.npy`` bodies, the label header, the JSON request body). HTTP headers and TLS framing are not
counted; they are the same few hundred bytes per request for every arm.

* **FedAvg**: the client trains the full chain (one forward + backward per example at any
  level), downloads the global float32 weights and uploads its own once per round of R local
  steps (amortised per step: 2 · 4 · params / R); it generates alone with every sampler call on
  its model and sends nothing.
* **CollaFuse** at cut c (k = round(c·T) client levels): the client trains its own model on
  levels < k, uploads the disclosed x_h of its batch (+ labels when shared) each step and
  downloads nothing; per generated image it sends the JSON request and receives the handoff
  sample (``.npy`` float32), then runs its share of the sampler calls.
* **local** (c = 1): the client trains and generates alone; nothing on the wire.

Peak memory of a training step is counted, not sampled from the process: float32 weights,
gradients and AdamW's two moments (plus FedProx's copy of the global weights), plus the bytes
of every tensor autograd saves for the backward pass of one step at the given batch (recorded
with ``torch.autograd.graph.saved_tensors_hooks``, each storage once, parameters excluded).
On a shared machine this is stable where RSS is not; it omits the allocator's slack and
torch's own ~0.3 GB runtime, which every arm pays alike.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import numpy as np
import torch

from collafuse_edge.protocol import encode_tensor
from collafuse_edge.schedule import Schedule, client_timetable
from collafuse_edge.validation import check_choice, check_int

from .cost import FLOPS, LatencyProbe
from .errors import ConfigError
from .models import count_params, denoise

ARMS = ("fedavg", "collafuse", "local")


@dataclass(frozen=True)
class ClientCost:
    """One client's cost under one arm. Bytes: ``up`` = client → server, ``down`` = server → client."""

    arm: str
    client_levels: int  # k: levels the client's model covers (T for FedAvg and local)
    params: int
    train_flops_per_example: int
    train_flops_per_step: int  # batch × per example
    train_steps: int
    train_flops_total: int
    train_peak_bytes: int  # counted (see the module docstring)
    train_wall_s_per_step: float | None  # measured by the caller, or None
    gen_calls_per_image: int
    gen_flops_per_image: int
    gen_latency_ms: float | None  # the client's sampler calls for one image, batch 1 (see LatencyProbe)
    gen_latency_note: str
    wire_up_bytes_per_step: float
    wire_down_bytes_per_step: float
    wire_up_bytes_per_image: int
    wire_down_bytes_per_image: int

    @property
    def wire_bytes_per_step(self) -> float:
        return self.wire_up_bytes_per_step + self.wire_down_bytes_per_step

    @property
    def wire_bytes_per_image(self) -> int:
        return self.wire_up_bytes_per_image + self.wire_down_bytes_per_image

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["wire_bytes_per_step"] = self.wire_bytes_per_step
        d["wire_bytes_per_image"] = self.wire_bytes_per_image
        return d


def saved_activation_bytes(model: torch.nn.Module, batch: int) -> int:
    """Bytes autograd keeps for the backward pass of one training forward at ``batch`` (each
    storage counted once; the parameters themselves are not counted). Runs on a copy's inputs
    only; the model's gradients are left as they were."""
    check_int("batch", batch, low=1, error=ConfigError)
    cfg = model.config
    p = next(model.parameters())
    params = {q.untyped_storage().data_ptr() for q in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        s = t.untyped_storage()
        ptr = s.data_ptr()
        if ptr not in params:
            seen[ptr] = max(seen.get(ptr, 0), s.nbytes())
        return t

    x = torch.zeros(batch, cfg.in_channels, cfg.sample_size, cfg.sample_size, device=p.device)
    t = torch.zeros(batch, dtype=torch.long, device=p.device)
    lab = torch.zeros(batch, dtype=torch.long, device=p.device) if cfg.num_class_embeds else None
    was_training = model.training
    model.train()
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = denoise(model, x, t, lab)
        del out
    finally:
        model.train(was_training)
    return int(sum(seen.values()))


def training_peak_bytes(model: torch.nn.Module, batch: int, *, extra_weight_copies: int = 0) -> int:
    """Counted peak of one AdamW training step: 4 float32 copies of the weights (weights,
    gradients, two moments) + ``extra_weight_copies`` (FedProx's global anchor: 1) + the saved
    activations of one forward at ``batch``."""
    weight_bytes = sum(q.numel() * q.element_size() for q in model.parameters())
    return int((4 + extra_weight_copies) * weight_bytes + saved_activation_bytes(model, batch))


def label_header_bytes(labels) -> int:
    """Bytes of the labels header value (comma-separated class ids) for one upload."""
    return len(",".join(str(int(v)) for v in labels).encode())


def _image_shape(model: torch.nn.Module) -> tuple[int, int, int]:
    cfg = model.config
    return int(cfg.in_channels), int(cfg.sample_size), int(cfg.sample_size)


def _calls(k: int, T: int, sample_steps: int | None) -> int:
    from .evaluate import split_steps

    _, c = split_steps(sample_steps, k, T)
    return len(client_timetable(k, c if sample_steps is not None else None))


def _latency(probe: LatencyProbe | None, k: int, T: int, sample_steps: int | None) -> tuple[float | None, str]:
    if probe is None:
        return None, "not measured"
    from .evaluate import split_steps

    _, c = split_steps(sample_steps, k, T)
    return probe.ms_per_image(k, c if sample_steps is not None else None), probe.note


def fedavg_client_cost(model: torch.nn.Module, schedule: Schedule, *, batch: int, steps: int, local_steps: int,
                       sample_steps: int | None, mu: float = 0.0, wall_s_per_step: float | None = None,
                       probe: LatencyProbe | None = None) -> ClientCost:
    """A FedAvg client: full-chain training, weights both ways once per round, generation alone."""
    for name, v in (("batch", batch), ("steps", steps), ("local_steps", local_steps)):
        check_int(name, v, low=1, error=ConfigError)
    T = schedule.T
    fe = FLOPS.train(model)
    weights = 4 * sum(v.numel() for v in model.state_dict().values() if v.is_floating_point())
    rounds = -(-steps // local_steps)
    per_step = weights * rounds / steps
    calls = _calls(T, T, sample_steps)
    lat, note = _latency(probe, T, T, sample_steps)
    return ClientCost(
        arm="fedavg", client_levels=T, params=count_params(model), train_flops_per_example=fe,
        train_flops_per_step=fe * batch, train_steps=steps, train_flops_total=fe * batch * steps,
        train_peak_bytes=training_peak_bytes(model, batch, extra_weight_copies=1 if mu > 0 else 0),
        train_wall_s_per_step=wall_s_per_step, gen_calls_per_image=calls,
        gen_flops_per_image=calls * FLOPS.forward(model), gen_latency_ms=lat, gen_latency_note=note,
        wire_up_bytes_per_step=per_step, wire_down_bytes_per_step=per_step,
        wire_up_bytes_per_image=0, wire_down_bytes_per_image=0,
    )


def collafuse_client_cost(model: torch.nn.Module, schedule: Schedule, k: int, *, batch: int, steps: int,
                          sample_steps: int | None, share_labels: bool, wall_s_per_step: float | None = None,
                          probe: LatencyProbe | None = None, label: int = 7) -> ClientCost:
    """A CollaFuse client with k levels (k = T: purely local, nothing on the wire). ``label``
    stands for a typical class id in the size of the label header/JSON (one digit here)."""
    T = schedule.T
    check_int("k (client levels)", k, low=0, high=T, error=ConfigError)
    for name, v in (("batch", batch), ("steps", steps)):
        check_int(name, v, low=1, error=ConfigError)
    shape = _image_shape(model)
    fe = FLOPS.train(model) if k > 0 else 0
    up_step = down_image = up_image = 0
    if k < T:
        up_step = len(encode_tensor(np.zeros((batch, *shape), np.float32)))
        if share_labels:
            up_step += label_header_bytes([label] * batch)
        down_image = len(encode_tensor(np.zeros((1, *shape), np.float32)))
        body = {"n": 1, "labels": [label]} if share_labels else {"n": 1}
        up_image = len(json.dumps(body).encode())
    calls = _calls(k, T, sample_steps) if k > 0 else 0
    lat, note = _latency(probe, k, T, sample_steps) if k > 0 else (0.0, "no client levels")
    return ClientCost(
        arm="local" if k == T else "collafuse", client_levels=k, params=count_params(model),
        train_flops_per_example=fe, train_flops_per_step=fe * batch, train_steps=steps,
        train_flops_total=fe * batch * steps, train_peak_bytes=training_peak_bytes(model, batch) if k > 0 else 0,
        train_wall_s_per_step=wall_s_per_step, gen_calls_per_image=calls,
        gen_flops_per_image=calls * FLOPS.forward(model), gen_latency_ms=lat, gen_latency_note=note,
        wire_up_bytes_per_step=float(up_step), wire_down_bytes_per_step=0.0,
        wire_up_bytes_per_image=up_image, wire_down_bytes_per_image=down_image,
    )


def ratios(a: ClientCost, b: ClientCost) -> dict:
    """a / b for every cost (None where b is 0 or unmeasured): how many times more ``a`` costs."""
    def r(x, y):
        return None if x is None or y in (None, 0) else x / y

    return {
        "train_flops_per_step": r(a.train_flops_per_step, b.train_flops_per_step),
        "train_peak_bytes": r(a.train_peak_bytes, b.train_peak_bytes),
        "train_wall_s_per_step": r(a.train_wall_s_per_step, b.train_wall_s_per_step),
        "gen_flops_per_image": r(a.gen_flops_per_image, b.gen_flops_per_image),
        "gen_latency_ms": r(a.gen_latency_ms, b.gen_latency_ms),
        "wire_bytes_per_step": r(a.wire_bytes_per_step, b.wire_bytes_per_step),
        "wire_bytes_per_image": r(a.wire_bytes_per_image, b.wire_bytes_per_image),
    }


def client_cost(arm: str, model: torch.nn.Module, schedule: Schedule, **kw) -> ClientCost:
    """Dispatch by arm name: ``fedavg`` → :func:`fedavg_client_cost`; ``collafuse`` (needs
    ``k``) and ``local`` → :func:`collafuse_client_cost`."""
    check_choice("arm", arm, ARMS, error=ConfigError)
    if arm == "fedavg":
        return fedavg_client_cost(model, schedule, **kw)
    if arm == "local":
        kw["k"] = schedule.T
        kw.setdefault("share_labels", False)
    return collafuse_client_cost(model, schedule, **kw)


__all__ = ["ARMS", "ClientCost", "client_cost", "collafuse_client_cost", "fedavg_client_cost", "label_header_bytes",
           "ratios", "saved_activation_bytes", "training_peak_bytes"]
