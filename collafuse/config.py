"""Frozen, validated configuration dataclasses. The constructor *is* the config.

A run is fully described by :class:`RunConfig`; it is saved as ``config.json`` in the run
directory and checked again when a run is resumed, sampled or exported.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from collafuse_edge.errors import ScheduleError
from collafuse_edge.schedule import BETA_SCHEDULES, Schedule, client_level_count
from collafuse_edge.validation import check_choice, check_int

from .errors import ConfigError

OBJECTIVES = ("exact", "double-noise", "shared-noise")
EXACT_WEIGHTINGS = ("eps-prime", "eps")
SERVER_CONDITIONING = ("label", "none")
BLOCK_KINDS = ("plain", "attn")


def _choice(name: str, value: Any, allowed: tuple) -> None:
    check_choice(name, value, allowed, error=ConfigError)


def _int(name: str, value: Any, low: int = 1) -> None:
    """An integer field ≥ ``low``, and a Python ``int``: configs are saved with ``json.dumps``,
    which refuses numpy integers."""
    check_int(name, value, low=low, error=ConfigError)
    if not isinstance(value, int):
        raise ConfigError(f"{name} must be a Python int, got {value!r} ({type(value).__name__}); pass int(...)")


def _positive_int(name: str, value: Any) -> None:
    _int(name, value, low=1)


@dataclass(frozen=True)
class ModelConfig:
    """A diffusers ``UNet2DModel`` denoiser. Shapes: input/output ``[B, channels, size, size]``."""

    sample_size: int = 16
    channels: int = 1
    block_out_channels: tuple[int, ...] = (32, 64)
    layers_per_block: int = 1
    # per resolution level, "attn" (AttnDown/UpBlock2D) or "plain" (Down/UpBlock2D)
    blocks: tuple[str, ...] = ("plain", "plain")
    mid_attention: bool = True
    norm_num_groups: int = 8
    num_classes: int | None = None  # class-conditional when set (label embedding)

    def __post_init__(self) -> None:
        object.__setattr__(self, "block_out_channels", tuple(self.block_out_channels))
        object.__setattr__(self, "blocks", tuple(self.blocks))
        _positive_int("sample_size", self.sample_size)
        _positive_int("channels", self.channels)
        _positive_int("layers_per_block", self.layers_per_block)
        if not self.block_out_channels:
            raise ConfigError("block_out_channels must not be empty")
        for c in self.block_out_channels:
            _positive_int("block_out_channels[i]", c)
            if c % self.norm_num_groups:
                raise ConfigError(
                    f"every block_out_channels entry must be divisible by norm_num_groups="
                    f"{self.norm_num_groups}; got {self.block_out_channels}"
                )
        if len(self.blocks) != len(self.block_out_channels):
            raise ConfigError(
                f"blocks ({len(self.blocks)} entries) must match block_out_channels "
                f"({len(self.block_out_channels)} entries)"
            )
        for b in self.blocks:
            _choice("blocks[i]", b, BLOCK_KINDS)
        down = 2 ** (len(self.block_out_channels) - 1)
        if self.sample_size % down:
            raise ConfigError(
                f"sample_size {self.sample_size} must be divisible by {down} for "
                f"{len(self.block_out_channels)} resolution levels"
            )
        if self.num_classes is not None:
            _positive_int("num_classes", self.num_classes)


def client_preset(sample_size: int = 16, channels: int = 1, num_classes: int | None = None) -> ModelConfig:
    """~0.65 M params, ~122 MFLOP per call at 16×16×1."""
    return ModelConfig(sample_size, channels, (32, 64), 1, ("plain", "plain"), True, 8, num_classes)


def server_preset(sample_size: int = 16, channels: int = 1, num_classes: int | None = None) -> ModelConfig:
    """~6.5 M params, ~0.75 GFLOP per call at 16×16×1."""
    return ModelConfig(
        sample_size, channels, (64, 128, 128), 2, ("plain", "plain", "attn"), True, 32, num_classes
    )


def tiny_preset(sample_size: int = 16, channels: int = 1, num_classes: int | None = None) -> ModelConfig:
    """A few thousand params: for tests only."""
    return ModelConfig(sample_size, channels, (8, 16), 1, ("plain", "plain"), False, 4, num_classes)


PRESETS = {"client": client_preset, "server": server_preset, "tiny": tiny_preset}


@dataclass(frozen=True)
class DataConfig:
    """Where images come from and how they are split across clients."""

    source: str = "digits"  # "digits" (embedded), a MedMNIST-style .npz file, or an image folder
    image_size: int = 16
    num_clients: int = 3
    partition: str = "by-label"  # "iid", "by-label", or "dirichlet:ALPHA"
    test_fraction: float = 0.2
    seed: int = 0

    def __post_init__(self) -> None:
        _positive_int("image_size", self.image_size)
        _positive_int("num_clients", self.num_clients)
        if not (0.0 <= self.test_fraction < 1.0):
            raise ConfigError(f"test_fraction must lie in [0, 1), got {self.test_fraction}")
        parse_partition(self.partition)


def parse_partition(text: str) -> tuple[str, float | None]:
    """``"iid"`` / ``"by-label"`` / ``"dirichlet:0.5"`` → (scheme, alpha)."""
    if text in ("iid", "by-label"):
        return text, None
    if isinstance(text, str) and text.startswith("dirichlet:"):
        try:
            alpha = float(text.split(":", 1)[1])
        except ValueError:
            alpha = float("nan")
        if not (alpha > 0) or math.isinf(alpha):
            raise ConfigError(f"dirichlet partition needs a positive alpha, e.g. 'dirichlet:0.5'; got {text!r}")
        return "dirichlet", alpha
    raise ConfigError(
        f"unknown partition scheme {text!r}; choose 'iid', 'by-label' or 'dirichlet:ALPHA'"
    )


@dataclass(frozen=True)
class ScheduleConfig:
    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"
    clip_sample: bool = True

    def __post_init__(self) -> None:
        _int("num_train_timesteps", self.num_train_timesteps, low=2)
        _choice("beta_schedule", self.beta_schedule, BETA_SCHEDULES)

    def build(self) -> Schedule:
        return Schedule.create(self.num_train_timesteps, self.beta_schedule, clip_sample=self.clip_sample)


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 3000
    batch_size: int = 64  # per client
    lr: float = 2e-4
    weight_decay: float = 0.0
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    seed: int = 0
    device: str = "auto"  # "auto" (CUDA when present), "cpu", "cuda", "cuda:N"
    log_every: int = 50
    checkpoint_every: int = 500

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "log_every", "checkpoint_every"):
            _positive_int(name, getattr(self, name))
        if not (self.lr > 0):
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if not (0.0 <= self.ema_decay < 1.0):
            raise ConfigError(f"ema_decay must lie in [0, 1), got {self.ema_decay}")
        if not (self.grad_clip > 0):
            raise ConfigError(f"grad_clip must be > 0, got {self.grad_clip}")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay must be ≥ 0, got {self.weight_decay}")


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines a split-learning run (server model + one model per client)."""

    data: DataConfig = field(default_factory=DataConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    cut_ratios: tuple[float, ...] = (0.6, 0.6, 0.6)  # one per client: share of levels on the client
    client_model: ModelConfig = field(default_factory=client_preset)
    server_model: ModelConfig = field(default_factory=server_preset)
    class_conditional: bool = True  # client models take the label
    server_conditioning: str = "label"  # "label": labels are disclosed to the server; "none"
    objective: str = "exact"
    exact_weighting: str = "eps-prime"
    train: TrainConfig = field(default_factory=TrainConfig)
    disclose: str = "fresh"  # "fresh": a new noise draw per upload; "once": one keyed x_h per image (privacy_once)

    def __post_init__(self) -> None:
        object.__setattr__(self, "cut_ratios", tuple(float(c) if not isinstance(c, bool) else c for c in self.cut_ratios))
        if len(self.cut_ratios) != self.data.num_clients:
            raise ConfigError(
                f"cut_ratios has {len(self.cut_ratios)} entries but num_clients is "
                f"{self.data.num_clients}; give one cut ratio per client"
            )
        for i, c in enumerate(self.cut_ratios):
            try:
                client_level_count(c, self.schedule.num_train_timesteps)
            except ScheduleError as e:
                raise ConfigError(f"cut_ratios[{i}]: {e}") from None
        _choice("objective", self.objective, OBJECTIVES)
        _choice("exact_weighting", self.exact_weighting, EXACT_WEIGHTINGS)
        _choice("server_conditioning", self.server_conditioning, SERVER_CONDITIONING)
        _choice("disclose", self.disclose, ("fresh", "once"))
        if self.disclose == "once" and self.objective == "shared-noise":
            raise ConfigError("disclose 'once' keys the noise of x_h; objective 'shared-noise' sends (x_t, ε, t) "
                              "instead and cannot use it — choose objective 'exact' or disclose 'fresh'")
        for name, m in (("client_model", self.client_model), ("server_model", self.server_model)):
            if m.sample_size != self.data.image_size:
                raise ConfigError(
                    f"{name}.sample_size={m.sample_size} differs from data.image_size={self.data.image_size}"
                )

    @property
    def client_levels(self) -> tuple[int, ...]:
        """k per client: the client runs levels k-1 … 0."""
        T = self.schedule.num_train_timesteps
        return tuple(client_level_count(c, T) for c in self.cut_ratios)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        try:
            return cls(
                data=DataConfig(**d["data"]),
                schedule=ScheduleConfig(**d["schedule"]),
                cut_ratios=tuple(d["cut_ratios"]),
                client_model=ModelConfig(**d["client_model"]),
                server_model=ModelConfig(**d["server_model"]),
                class_conditional=bool(d["class_conditional"]),
                server_conditioning=d["server_conditioning"],
                objective=d["objective"],
                exact_weighting=d.get("exact_weighting", "eps-prime"),
                train=TrainConfig(**d["train"]),
                disclose=d.get("disclose", "fresh"),
            )
        except ConfigError:
            raise
        except (KeyError, TypeError) as e:
            raise ConfigError(f"config is missing a field or has an unknown one: {e}") from e


def replace(cfg: Any, **changes: Any) -> Any:
    """dataclasses.replace that re-runs validation."""
    return dataclasses.replace(cfg, **changes)
