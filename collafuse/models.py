"""Denoisers: diffusers ``UNet2DModel`` built from a :class:`ModelConfig`, and their cost.

Every model here maps ``(sample [B,C,H,W] float32, timestep [B] int64, class_labels [B] int64 | None)``
to ε̂ ``[B,C,H,W]``.
"""
from __future__ import annotations

import torch
from diffusers import UNet2DModel

from .config import ModelConfig
from .errors import InputError


def build_unet(cfg: ModelConfig) -> UNet2DModel:
    down = tuple("AttnDownBlock2D" if b == "attn" else "DownBlock2D" for b in cfg.blocks)
    up = tuple("AttnUpBlock2D" if b == "attn" else "UpBlock2D" for b in reversed(cfg.blocks))
    return UNet2DModel(
        sample_size=cfg.sample_size,
        in_channels=cfg.channels,
        out_channels=cfg.channels,
        block_out_channels=cfg.block_out_channels,
        layers_per_block=cfg.layers_per_block,
        down_block_types=down,
        up_block_types=up,
        add_attention=cfg.mid_attention,
        norm_num_groups=cfg.norm_num_groups,
        attention_head_dim=None if cfg.mid_attention or "attn" in cfg.blocks else 8,
        num_class_embeds=cfg.num_classes,
    )


def denoise(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """ε̂ = model(x_t, t, label). ``t`` ``[B]`` int64; ``labels`` ``[B]`` int64 or None."""
    if getattr(model.config, "num_class_embeds", None) is None:
        labels = None
    elif labels is None:
        raise InputError("this model is class-conditional: pass class labels")
    return model(x, t, class_labels=labels).sample


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_flops(model: torch.nn.Module, batch: int = 1) -> int:
    """FLOPs of one forward call at batch ``batch``, counted by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg = model.config
    p = next(model.parameters())
    x = torch.zeros(batch, cfg.in_channels, cfg.sample_size, cfg.sample_size, device=p.device)
    t = torch.zeros(batch, dtype=torch.long, device=p.device)
    lab = torch.zeros(batch, dtype=torch.long, device=p.device) if cfg.num_class_embeds else None
    with FlopCounterMode(display=False) as counter:
        denoise(model, x, t, lab)
    return int(counter.get_total_flops())
