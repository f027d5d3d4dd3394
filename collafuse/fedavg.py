"""Federated averaging, the baseline CollaFuse is measured against (docs/results.md, "CollaFuse against federated learning").

Plain in-process FedAvg (McMahan et al., "Communication-Efficient Learning of Deep Networks from
Decentralized Data", 2017), optionally with FedProx's proximal term (Li et al., 2020):

* every client trains the **full** denoising chain (levels 0 … T-1, ordinary DDPM ε-loss) of a
  model of the same class as a CollaFuse client model (:func:`collafuse.models.build_unet` of a
  :class:`~collafuse.config.ModelConfig`) on its own images — nothing but weights leaves it;
* after every ``local_steps`` (R) local steps the server averages the clients' weights,
  weighted by their number of training images (uniform on request), and sends the average back;
* FedProx adds μ/2·‖w − w_global‖² to each client's loss (μ = 0: plain FedAvg);
* the deployed model is an EMA of the global model kept by the server, one update per round with
  decay ``ema_decay**R`` (diffusers' ``EMAModel``), so its horizon in local steps matches the
  per-step EMA of the other training modes; with R = 1 it is exactly that EMA.

Each client keeps its own AdamW state across rounds (only weights cross the wire). All
randomness comes from one CPU ``torch.Generator`` seeded with ``seed``; clients draw from it in
order, so a run is deterministic, and one client with any R is bit-for-bit the purely local
training of :class:`collafuse.train.SplitTrainer` at c = 1 (tested).

    from collafuse.fedavg import train_fedavg
    res = train_fedavg([c0, c1, c2], model_config, schedule, steps=600, local_steps=10, seed=0)
    res.models[0]           # the model client 0 generates with (the global EMA model)
    res.cost.to_dict()      # FLOPs, bytes on the wire and wall time per client (memory: collafuse.client_cost)

Why not Flower: ``flwr[simulation]`` 1.42 resolves to 61 packages (ray, grpcio, protobuf,
cryptography, fastapi, uvicorn, SQLAlchemy, …) and runs every client as a Ray actor process. On
a 2-core CPU the actor processes and the serialisation of every round's weights would cost more
than the tiny models' local steps, and the in-process loop is one page that runs on the same
code (losses, models, schedule, data splits) as the CollaFuse arms, which is what makes the
comparison fair. Nothing here depends on being in one process: only weights cross between a
client and the server, once per round each way, as :class:`FedAvgCost` counts.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from collafuse_edge.schedule import Schedule
from collafuse_edge.validation import check_choice, check_int, is_number

from .config import ModelConfig
from .data import ClientData
from .errors import ConfigError, InputError
from .models import build_unet, count_params, denoise
from .objectives import client_loss

WEIGHTINGS = ("data-size", "uniform")


@dataclass(frozen=True)
class FedAvgConfig:
    """Hyper-parameters of a FedAvg run; the defaults are those of the benchmarks' tiny runs."""

    steps: int  # local steps per client, in total
    local_steps: int = 10  # R: local steps between two averagings (the last round may be shorter)
    batch_size: int = 32  # per client and step
    lr: float = 2e-3
    weight_decay: float = 0.0
    ema_decay: float = 0.99  # per local step; the global EMA uses ema_decay**R per round
    grad_clip: float = 1.0
    mu: float = 0.0  # FedProx proximal weight; 0 = FedAvg
    weighting: str = "data-size"  # "data-size" (McMahan et al.) or "uniform"
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        for name in ("steps", "local_steps", "batch_size"):
            check_int(name, getattr(self, name), low=1, error=ConfigError)
        check_int("seed", self.seed, low=0, error=ConfigError)
        for name, low, strict in (("lr", 0.0, True), ("weight_decay", 0.0, False), ("grad_clip", 0.0, True),
                                  ("mu", 0.0, False), ("ema_decay", 0.0, False)):
            v = getattr(self, name)
            if not is_number(v) or not math.isfinite(v) or (v <= low if strict else v < low):
                raise ConfigError(f"{name} must be a finite number {'>' if strict else '≥'} {low}, got {v!r}")
        if self.ema_decay >= 1:
            raise ConfigError(f"ema_decay must lie in [0, 1), got {self.ema_decay}")
        check_choice("weighting", self.weighting, WEIGHTINGS, error=ConfigError)

    @property
    def rounds(self) -> int:
        return -(-self.steps // self.local_steps)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class FedAvgCost:
    """What FedAvg costs one client, counted and measured (the same for every client except
    ``examples`` and ``wall_s``). FLOPs: torch's FlopCounterMode (one source: :data:`collafuse.cost.FLOPS`)."""

    params: int
    steps: int  # local steps per client
    rounds: int
    batch_size: int
    train_flops_per_example: int  # one forward + backward of the full-chain model
    train_flops_per_step: int  # batch_size × the above (the FedProx term, 3 FLOPs/param, is not counted)
    train_flops_total: int  # per client, whole run
    bytes_down_per_round: int  # the global float32 weights to the client
    bytes_up_per_round: int  # the client's float32 weights to the server
    bytes_per_step: float  # both ways, amortised over the R local steps of a round
    bytes_total: int  # per client, whole run, both ways
    examples: tuple[int, ...]  # training images per client
    weights: tuple[float, ...]  # each client's share in the average
    wall_s: tuple[float, ...]  # per client: time in its own local steps (forward, backward, optimiser)
    aggregate_wall_s: float  # the server's averaging, whole run
    wall_s_total: float

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class FedAvgResult:
    """``models[i]``: the model client i generates with — every client holds the global EMA model
    at the end of FedAvg (separate copies, eval mode). ``global_raw``: the last average of the raw
    weights. ``history``: one dict per round (mean client loss, drift from the average)."""

    config: FedAvgConfig
    model_config: ModelConfig
    models: list[torch.nn.Module]
    global_raw: torch.nn.Module
    cost: FedAvgCost
    history: list[dict]


def average_state(states: Sequence[dict[str, torch.Tensor]], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """Σ_i w_i · state_i per tensor, accumulated in float64 and cast back to each tensor's dtype
    (integer tensors must agree across clients and are copied). ``weights`` must sum to 1."""
    if not states:
        raise InputError("nothing to average: no client states")
    if len(weights) != len(states):
        raise InputError(f"{len(weights)} weights for {len(states)} client states")
    if any((not is_number(w)) or w < 0 for w in weights) or abs(sum(weights) - 1.0) > 1e-9:
        raise InputError(f"averaging weights must be ≥ 0 and sum to 1, got {list(weights)}")
    keys = list(states[0])
    for i, s in enumerate(states[1:], 1):
        if list(s) != keys:
            raise InputError(f"client state {i} has different tensors than client state 0")
    out = {}
    for key in keys:
        ref = states[0][key]
        if not ref.is_floating_point():
            if any(not torch.equal(s[key], ref) for s in states[1:]):
                raise InputError(f"integer tensor {key!r} differs between clients; it cannot be averaged")
            out[key] = ref.clone()
            continue
        acc = torch.zeros(ref.shape, dtype=torch.float64, device=ref.device)
        for s, w in zip(states, weights):
            acc.add_(s[key].to(torch.float64), alpha=float(w))
        out[key] = acc.to(ref.dtype)
    return out


def client_weights(examples: Sequence[int], weighting: str = "data-size") -> list[float]:
    """Each client's share in the average: n_i / Σ n (``data-size``) or 1/N (``uniform``)."""
    check_choice("weighting", weighting, WEIGHTINGS, error=ConfigError)
    if weighting == "uniform":
        return [1.0 / len(examples)] * len(examples)
    total = sum(examples)
    return [n / total for n in examples]


def proximal_grad_(model: torch.nn.Module, anchor: Sequence[torch.Tensor], mu: float) -> None:
    """Add FedProx's ∇(μ/2·‖w − w_global‖²) = μ·(w − w_global) to the gradients in place."""
    for p, a in zip(model.parameters(), anchor):
        if p.grad is not None:
            p.grad.add_(p.detach() - a, alpha=mu)


def _as_arrays(d) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(d, ClientData):
        x, y = d.train_images, d.train_labels
    elif isinstance(d, (tuple, list)) and len(d) == 2:
        x, y = d
    else:
        raise InputError("each client's data must be a ClientData or an (images, labels) pair")
    x, y = torch.as_tensor(x), torch.as_tensor(y)
    if x.ndim != 4 or y.ndim != 1 or len(x) != len(y) or len(x) == 0:
        raise InputError(f"client data must be images [N,C,H,W] and labels [N] with N ≥ 1; got {tuple(x.shape)} "
                         f"and {tuple(y.shape)}")
    return x.float(), y.long()


def train_fedavg(datasets: Sequence, model_config: ModelConfig, schedule: Schedule, steps: int | None = None,
                 local_steps: int | None = None, seed: int | None = None, mu: float | None = None, *,
                 config: FedAvgConfig | None = None, init: dict[str, torch.Tensor] | None = None,
                 progress: bool = False, on_round: Callable[[int, torch.nn.Module], None] | None = None
                 ) -> FedAvgResult:
    """Train one model per client by FedAvg (FedProx when ``mu`` > 0) on ``datasets`` (one
    :class:`~collafuse.data.ClientData` — its training split — or ``(images, labels)`` pair per
    client; images float32 [N,C,H,W] in [-1, 1]).

    ``model_config``: the denoiser every client trains over all T levels of ``schedule``; it is
    class-conditional when ``model_config.num_classes`` is set. ``steps``/``local_steps``/``seed``/
    ``mu`` override the matching fields of ``config`` (default :class:`FedAvgConfig`). ``init``:
    the global model's starting weights (default: a fresh model after ``torch.manual_seed(seed)``).
    ``on_round(round, global_ema_model)`` is called after each averaging (training curves).
    """
    if config is None:
        if steps is None:
            raise ConfigError("give steps (local steps per client) or a FedAvgConfig")
        config = FedAvgConfig(steps=steps)
    over = {k: v for k, v in (("steps", steps), ("local_steps", local_steps), ("seed", seed), ("mu", mu))
            if v is not None}
    cfg = dataclasses.replace(config, **over) if over else config
    if not datasets:
        raise InputError("FedAvg needs at least one client's data")
    data = [_as_arrays(d) for d in datasets]
    shape = (model_config.channels, model_config.sample_size, model_config.sample_size)
    for i, (x, _) in enumerate(data):
        if tuple(x.shape[1:]) != shape:
            raise InputError(f"client {i}'s images are {tuple(x.shape[1:])}, the model takes {shape}")
    conditional = model_config.num_classes is not None
    device = torch.device(cfg.device)
    T = schedule.T

    torch.manual_seed(cfg.seed)
    global_model = build_unet(model_config).to(device).train()
    if init is not None:
        global_model.load_state_dict(init)
    clients = [copy.deepcopy(global_model) for _ in data]
    opts = [torch.optim.AdamW(m.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay) for m in clients]
    ema = EMAModel(global_model.parameters(), decay=cfg.ema_decay ** cfg.local_steps, foreach=True)
    gen = torch.Generator().manual_seed(cfg.seed)
    examples = [len(y) for _, y in data]
    weights = client_weights(examples, cfg.weighting)
    wall = [0.0] * len(data)
    agg_wall = 0.0
    history: list[dict] = []
    t_start = time.perf_counter()
    done = 0
    bar = tqdm(total=cfg.steps, desc="fedavg", disable=not progress, dynamic_ncols=True)

    def eps_fn(model):
        return lambda x, t, labels: denoise(model, x, t, labels)

    for rnd in range(cfg.rounds):
        r = min(cfg.local_steps, cfg.steps - done)
        anchor = [p.detach().clone() for p in global_model.parameters()] if cfg.mu > 0 else None
        losses = []
        for _ in range(r):
            for i, ((x, y), m, opt) in enumerate(zip(data, clients, opts)):
                t0 = time.perf_counter()
                idx = torch.randint(len(y), (cfg.batch_size,), generator=gen)
                loss = client_loss(eps_fn(m), x[idx], y[idx] if conditional else None, T, schedule, gen, device)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if anchor is not None:
                    proximal_grad_(m, anchor, cfg.mu)
                torch.nn.utils.clip_grad_norm_(m.parameters(), cfg.grad_clip)
                opt.step()
                wall[i] += time.perf_counter() - t0
                losses.append(loss.item())
        done += r
        t0 = time.perf_counter()
        states = [m.state_dict() for m in clients]
        avg = average_state(states, weights)
        drift = math.sqrt(sum(w * sum(float(((s[k].double() - avg[k].double()) ** 2).sum()) for k in avg)
                              for s, w in zip(states, weights)))
        global_model.load_state_dict(avg)
        for m in clients:
            m.load_state_dict(avg)
        ema.decay = cfg.ema_decay ** r
        ema.step(global_model.parameters())
        agg_wall += time.perf_counter() - t0
        history.append({"round": rnd + 1, "step": done, "loss": sum(losses) / len(losses), "drift": drift})
        bar.update(r)
        if on_round is not None:
            on_round(rnd + 1, _ema_model(global_model, ema))
    bar.close()

    final = _ema_model(global_model, ema)
    from .cost import FLOPS

    n_params = count_params(global_model)
    per_round = 4 * sum(v.numel() for v in global_model.state_dict().values() if v.is_floating_point())
    fe = FLOPS.train(global_model)
    cost = FedAvgCost(
        params=n_params, steps=cfg.steps, rounds=cfg.rounds, batch_size=cfg.batch_size,
        train_flops_per_example=fe, train_flops_per_step=fe * cfg.batch_size,
        train_flops_total=fe * cfg.batch_size * cfg.steps,
        bytes_down_per_round=per_round, bytes_up_per_round=per_round,
        bytes_per_step=2 * per_round * cfg.rounds / cfg.steps, bytes_total=2 * per_round * cfg.rounds,
        examples=tuple(examples), weights=tuple(weights), wall_s=tuple(wall), aggregate_wall_s=agg_wall,
        wall_s_total=time.perf_counter() - t_start,
    )
    models = [copy.deepcopy(final) for _ in data]
    global_model.eval()
    return FedAvgResult(cfg, model_config, models, global_model, cost, history)


def _ema_model(model: torch.nn.Module, ema: EMAModel) -> torch.nn.Module:
    """A copy of ``model`` holding the EMA weights, in eval mode."""
    m = copy.deepcopy(model)
    ema.copy_to(m.parameters())
    return m.eval()


__all__ = ["FedAvgConfig", "FedAvgCost", "FedAvgResult", "WEIGHTINGS", "average_state", "client_weights",
           "proximal_grad_", "train_fedavg"]
