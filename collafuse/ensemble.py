"""Train many same-architecture denoisers as one batched ensemble (``torch.func`` + ``vmap``).

An experiment such as ``benchmarks/collaboration_study.py`` trains dozens of tiny models — every
client, server and baseline model of several arms and seeds — that share one architecture. Run one
by one, a training step of a 41 k-parameter UNet at batch 32 is a few hundred small kernels and
is bound by per-op overhead, not by arithmetic (``benchmarks/train_throughput.py`` measures it).
:class:`Ensemble` stacks the members' parameters on a leading member axis
(``torch.func.stack_module_state``) and runs the forward and backward of all members as one
``vmap`` of ``functional_call``: a convolution of E members becomes one grouped convolution E
times wider, and each op is paid once per step instead of once per member.

Each member's update is exactly the one :func:`collafuse.train.apply_update` makes for a lone
model: the mean (or weighted mean) ε-regression loss of its own rows, its gradient clipped to
``grad_clip`` by its *own* norm, AdamW (elementwise, so stacking changes nothing) and the same
diffusers ``EMAModel``. ``tests/core/test_ensemble.py`` checks an ensemble-trained member against
the same model trained alone on the same batches.

    ens = Ensemble([build_unet(cfg) for _ in range(8)], lr=2e-3, ema_decay=0.99)
    losses = ens.step(x_t, t, labels, target)        # [E, B, C, H, W], [E, B], [E, B], [E, B, C, H, W]
    model = ens.member_model(3)                      # member 3 with its EMA weights, eval mode
"""
from __future__ import annotations

import copy
from typing import Sequence

import torch
from diffusers.training_utils import EMAModel
from torch.func import functional_call, stack_module_state, vmap

from collafuse_edge.validation import check_int

from .errors import ConfigError, InputError


class Ensemble:
    """E models of one architecture (``UNet2DModel``), trained together, each on its own rows.

    ``models``: the members' initial weights (they are copied; the modules are not modified).
    Hyper-parameters are those of :class:`collafuse.config.TrainConfig` and apply to every member.
    ``chunk``: members per vmapped call (None: all at once); smaller chunks bound memory.
    """

    def __init__(self, models: Sequence[torch.nn.Module], *, lr: float = 2e-3, weight_decay: float = 0.0,
                 ema_decay: float = 0.99, grad_clip: float = 1.0, chunk: int | None = None):
        if not models:
            raise InputError("an ensemble needs at least one model")
        cfg0 = dict(models[0].config)
        for i, m in enumerate(models[1:], 1):
            if dict(m.config) != cfg0:
                raise InputError(f"member {i} has another architecture than member 0; an ensemble holds one "
                                 "architecture (build one ensemble per architecture)")
        check_int("chunk (None: all members at once)", chunk, low=1, allow_none=True, error=ConfigError)
        if not (grad_clip > 0):
            raise ConfigError(f"grad_clip must be > 0, got {grad_clip}")
        self.size = len(models)
        self.config = models[0].config
        self.grad_clip = float(grad_clip)
        self.chunk = chunk
        params, buffers = stack_module_state(list(models))
        self.names = list(params)
        self.params = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
        self.buffers = {k: v.detach().clone() for k, v in buffers.items()}
        self._base = copy.deepcopy(models[0]).to("meta")
        self._base.train()
        self.optimizer = torch.optim.AdamW(list(self.params.values()), lr=lr, weight_decay=weight_decay)
        self.ema = EMAModel(list(self.params.values()), decay=ema_decay, foreach=True)
        self.conditional = getattr(self.config, "num_class_embeds", None) is not None
        self.steps = 0

    # -- forward -----------------------------------------------------------------------------

    def _call(self, params: dict, buffers: dict, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None):
        kw = {"class_labels": labels} if self.conditional else {}
        return functional_call(self._base, (params, buffers), (x,), {"timestep": t, **kw}).sample

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None,
                params: dict | None = None) -> torch.Tensor:
        """ε̂ of every member on its own rows: ``x`` ``[E, B, C, H, W]``, ``t``/``labels`` ``[E, B]``.
        ``params``: stacked parameters to use instead of the trained ones (e.g. EMA weights,
        or a gathered selection of members: then E is their count)."""
        params = self.params if params is None else params
        E = next(iter(params.values())).shape[0]
        if x.ndim != 5 or x.shape[0] != E or t.shape != x.shape[:2]:
            raise InputError(f"x must be [E={E}, B, C, H, W] and t [E, B]; got {tuple(x.shape)} and {tuple(t.shape)}")
        if self.conditional and (labels is None or labels.shape != t.shape):
            raise InputError("these models are class-conditional: pass labels of shape [E, B]")
        buffers = {k: v[:1].expand(E, *v.shape[1:]) for k, v in self.buffers.items()} if params is not self.params \
            else self.buffers
        lab = labels if self.conditional else torch.zeros_like(t)

        def one(p, b, xi, ti, li):
            return self._call(p, b, xi, ti, li if self.conditional else None)

        return vmap(one, chunk_size=self.chunk)(params, buffers, x, t, lab)

    # -- training ----------------------------------------------------------------------------

    def losses(self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None, target: torch.Tensor,
               weight: torch.Tensor | None = None) -> torch.Tensor:
        """Per-member loss ``[E]``: Σ_b w_b·mean((ε̂_b − target_b)²) / Σ_b w_b (w = 1: the plain mean,
        :func:`collafuse.objectives.client_loss`; else :func:`collafuse.objectives.server_loss`)."""
        pred = self.forward(x_t, t, labels).float()
        per_row = ((pred - target) ** 2).flatten(2).mean(2)
        if weight is None:
            return per_row.mean(1)
        return (weight * per_row).sum(1) / weight.sum(1)

    @torch.no_grad()
    def _clip_(self) -> torch.Tensor:
        """Clip every member's gradient to ``grad_clip`` by its own norm (as
        ``torch.nn.utils.clip_grad_norm_`` does for a lone model); returns the norms ``[E]``."""
        grads = [p.grad for p in self.params.values() if p.grad is not None]
        sq = torch.stack([torch.linalg.vector_norm(g.flatten(1), dim=1) for g in grads]) ** 2
        norms = sq.sum(0).sqrt()
        coef = torch.clamp(self.grad_clip / (norms + 1e-6), max=1.0)
        for g in grads:
            g.mul_(coef.view(-1, *([1] * (g.ndim - 1))))
        return norms

    def step(self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None, target: torch.Tensor,
             weight: torch.Tensor | None = None) -> torch.Tensor:
        """One optimisation step of every member on its own rows; returns the losses ``[E]`` (detached)."""
        self.optimizer.zero_grad(set_to_none=True)
        losses = self.losses(x_t, t, labels, target, weight)
        losses.sum().backward()  # members share no parameters: each gets the gradient of its own loss
        self._clip_()
        self.optimizer.step()
        self.ema.step(list(self.params.values()))
        self.steps += 1
        return losses.detach()

    # -- members -----------------------------------------------------------------------------

    def stacked(self, ema: bool = True) -> dict[str, torch.Tensor]:
        """The stacked weights ``{name: [E, ...]}`` (EMA or raw), detached."""
        src = self.ema.shadow_params if ema else list(self.params.values())
        return {k: v.detach() for k, v in zip(self.names, src)}

    def member_state(self, i: int, ema: bool = True) -> dict[str, torch.Tensor]:
        check_int("member", i, low=0, high=self.size - 1, error=InputError)
        out = {k: v[i].clone() for k, v in self.stacked(ema).items()}
        out.update({k: v[i].clone() for k, v in self.buffers.items()})
        return out

    def member_model(self, i: int, ema: bool = True) -> torch.nn.Module:
        """Member ``i`` as an ordinary ``UNet2DModel`` (EMA weights by default), eval mode."""
        m = type(self._base).from_config(self.config)
        m.load_state_dict(self.member_state(i, ema))
        return m.eval()

    @torch.no_grad()
    def average_(self, members: Sequence[int], weights: Sequence[float]) -> None:
        """Set the raw weights of ``members`` to their weighted average (federated averaging of
        one group; optimiser and EMA state stay per member). ``weights`` sum to 1."""
        if len(members) != len(weights) or not members:
            raise InputError(f"{len(weights)} weights for {len(members)} members")
        idx = torch.as_tensor(list(members), dtype=torch.long)
        w = torch.as_tensor(list(weights), dtype=torch.float64)
        for p in self.params.values():
            avg = (p.detach()[idx].double() * w.view(-1, *([1] * (p.ndim - 1)))).sum(0).to(p.dtype)
            p.data[idx] = avg


__all__ = ["Ensemble"]
