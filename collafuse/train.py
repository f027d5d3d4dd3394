"""Split training in one process: N client models + one shared server model (docs/architecture.md#the-method).

Every step, each client trains its own model on its levels 0 … k-1 with its own images, and
discloses x_h (via :func:`collafuse.objectives.disclose`) for the server, which trains on
levels ≥ k from the disclosures of all clients mixed in one batch.

    collafuse train --out runs/demo --steps 3000
"""
from __future__ import annotations

import json
import math
import os
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from .checkpoint import (
    DataInfo,
    ModelState,
    atomic_write_json,
    latest_checkpoint,
    load_rng,
    model_configs,
    read_config,
    read_state,
    restore_model_state,
    save_checkpoint,
)
from .config import RunConfig
from .data import ClientData, Dataset, load_dataset, partition
from .errors import CheckpointError, ConfigError
from .models import build_unet, denoise
from .objectives import SHARED_NOISE_WARNING, client_loss, disclose, server_batch, server_loss


def apply_update(ms: ModelState, loss: torch.Tensor, grad_clip: float) -> float:
    """backward → clip → AdamW step → EMA step. Returns the gradient norm before clipping."""
    ms.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    gn = torch.nn.utils.clip_grad_norm_(ms.model.parameters(), grad_clip)
    ms.optimizer.step()
    ms.ema.step(ms.model.parameters())
    return float(gn)


def server_update(ms: ModelState, disclosures: list, schedule, cfg: RunConfig, gen: torch.Generator,
                  device, autocast=None) -> float | None:
    """One server optimisation step from client disclosures — the same code in the in-process
    simulation and in the networked server (:mod:`collafuse.server_training`)."""
    batch = server_batch(disclosures, schedule, cfg.objective, gen, cfg.exact_weighting)
    if batch is None:
        return None
    ctx = autocast if autocast is not None else nullcontext()

    def eps_fn(x, t, labels):
        with ctx:
            return denoise(ms.model, x, t, labels)

    loss = server_loss(eps_fn, batch, device)
    apply_update(ms, loss, cfg.train.grad_clip)
    return loss.item()


def new_model_state(name: str, mcfg, tcfg, device) -> ModelState:
    model = build_unet(mcfg).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=tcfg.lr, weight_decay=tcfg.weight_decay)
    # the EMA as foreach ops: diffusers' default walks the parameters in Python, three small
    # kernels each — 13-17 % of a server step on an H200 (benchmarks/train_gpu.py). Fused AdamW
    # measured no faster there, so the optimiser keeps torch's default.
    ema = EMAModel(model.parameters(), decay=tcfg.ema_decay, foreach=True)
    ema.to(device)
    return ModelState(name, model, ema, opt)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise ConfigError(f"device {name!r} is not a torch device name ('auto', 'cpu', 'cuda', 'cuda:0')") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked for, but CUDA is not available here; use --device cpu")
    return dev


@dataclass(frozen=True)
class TrainResult:
    run_dir: str
    step: int
    wall_s: float
    steps_per_s: float
    last: dict


class SplitTrainer:
    """Holds the models, optimisers and data of a run; :meth:`run` trains to ``cfg.train.steps``."""

    def __init__(self, cfg: RunConfig, run_dir: str, dataset: Dataset | None = None):
        self.cfg = cfg
        self.run_dir = run_dir
        self.schedule = cfg.schedule.build()
        ds = dataset if dataset is not None else load_dataset(cfg.data.source, cfg.data.image_size)
        if ds.images.shape[-1] != cfg.data.image_size:
            raise ConfigError(f"dataset images are {ds.images.shape[-1]}px but data.image_size={cfg.data.image_size}")
        self.data_info = DataInfo(ds.name, ds.num_classes, ds.channels, cfg.data.image_size)
        self.clients_data: list[ClientData] = partition(ds, cfg.data)
        self.device = resolve_device(cfg.train.device)
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else nullcontext())
        ccfg, scfg = model_configs(cfg, self.data_info)
        torch.manual_seed(cfg.train.seed)  # model init
        self.states: list[ModelState] = [self._state("server", scfg)]
        self.states += [self._state(f"client_{i}", ccfg) for i in range(cfg.data.num_clients)]
        self.gen = torch.Generator().manual_seed(cfg.train.seed)
        self.step = 0
        self._x = [torch.from_numpy(c.train_images) for c in self.clients_data]
        self._y = [torch.from_numpy(c.train_labels) for c in self.clients_data]
        self._once = None
        if cfg.disclose == "once":  # one keyed x_h per image, reused every epoch (collafuse/privacy_once.py)
            from .privacy_once import OnceNoise, load_or_create_secret

            secret = load_or_create_secret(run_dir)
            self._once = [OnceNoise(c.train_images, secret) for c in self.clients_data]

    def _state(self, name: str, mcfg) -> ModelState:
        return new_model_state(name, mcfg, self.cfg.train, self.device)

    @property
    def server(self) -> ModelState:
        return self.states[0]

    def client(self, i: int) -> ModelState:
        return self.states[1 + i]

    # -- one step ---------------------------------------------------------------------------

    def _eps_fn(self, model):
        def fn(x, t, labels):
            with self.autocast:
                return denoise(model, x, t, labels)
        return fn

    def _update(self, ms: ModelState, loss: torch.Tensor) -> float:
        return apply_update(ms, loss, self.cfg.train.grad_clip)

    def train_step(self) -> dict:
        cfg, T = self.cfg, self.schedule.T
        bs = cfg.train.batch_size
        share = cfg.server_conditioning == "label"
        logs: dict = {"step": self.step + 1}
        disclosures = []
        for i, k in enumerate(cfg.client_levels):
            idx = torch.randint(len(self._y[i]), (bs,), generator=self.gen)
            x0, y = self._x[i][idx], self._y[i][idx]
            lab = y if cfg.class_conditional else None
            if k > 0:
                ms = self.client(i)
                loss = client_loss(self._eps_fn(ms.model), x0, lab, k, self.schedule, self.gen, self.device)
                self._update(ms, loss)
                logs[f"client_{i}_loss"] = loss.item()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the shared-noise warning is given once per run
                noise = self._once[i].noise(idx, k - 1) if self._once is not None and 0 < k < T else None
                disclosures.append(disclose(i, x0, y, k, self.schedule, cfg.objective, self.gen, share, noise))
        loss = server_update(self.server, disclosures, self.schedule, cfg, self.gen, self.device, self.autocast)
        if loss is not None:
            logs["server_loss"] = loss
        self.step += 1
        return logs

    # -- persistence ------------------------------------------------------------------------

    def save(self) -> str:
        return save_checkpoint(self.run_dir, self.step, self.states, self.gen.get_state())

    def restore(self) -> None:
        ckpt = latest_checkpoint(self.run_dir)
        if ckpt is None:
            raise CheckpointError(f"nothing to resume in {self.run_dir!r}: it has no checkpoint")
        meta = read_state(ckpt)
        for ms in self.states:
            restore_model_state(ckpt, meta, ms)
        self.gen.set_state(load_rng(ckpt))
        self.step = int(meta["step"])
        _truncate_metrics(os.path.join(self.run_dir, "metrics.jsonl"), self.step)

    def run(self, progress: bool = True) -> TrainResult:
        cfg = self.cfg.train
        path = os.path.join(self.run_dir, "metrics.jsonl")
        t0 = time.perf_counter()
        start = self.step
        logs: dict = {}
        pbar = tqdm(total=cfg.steps, initial=self.step, desc="train", disable=not progress, dynamic_ncols=True)
        with open(path, "a", encoding="utf-8") as mf:
            while self.step < cfg.steps:
                logs = self.train_step()
                pbar.update(1)
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    logs["steps_per_s"] = (self.step - start) / max(time.perf_counter() - t0, 1e-9)
                    mf.write(json.dumps(logs) + "\n")
                    mf.flush()
                    pbar.set_postfix({k: f"{v:.3f}" for k, v in logs.items() if k.endswith("loss")}, refresh=False)
                if self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps:
                    self.save()
        pbar.close()
        wall = time.perf_counter() - t0
        return TrainResult(self.run_dir, self.step, wall, (self.step - start) / max(wall, 1e-9), logs)


def _truncate_metrics(path: str, step: int) -> None:
    """Drop log lines written after the checkpoint we resume from (they will be redone)."""
    if not os.path.exists(path):
        return
    keep = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                if json.loads(line).get("step", 0) <= step:
                    keep.append(line)
            except ValueError:
                continue
    from .checkpoint import atomic_write_bytes

    atomic_write_bytes(path, "".join(keep).encode())


def train(cfg: RunConfig | None, run_dir: str, *, resume: bool = False, steps: int | None = None,
          progress: bool = True, dataset: Dataset | None = None) -> TrainResult:
    """Train a run in ``run_dir`` (new), or continue it (``resume=True``; ``cfg`` may be None,
    ``steps`` may extend the run). Resuming continues bit-for-bit where the checkpoint stopped."""
    if resume:
        saved = read_config(run_dir)
        if cfg is not None and cfg.to_dict() != saved.to_dict():
            raise ConfigError(f"the config given differs from the one saved in {run_dir!r}; "
                              "resume without config flags (only --steps may change)")
        cfg = saved
        if steps is not None:
            from .config import replace

            cfg = replace(cfg, train=replace(cfg.train, steps=steps))
    else:
        if cfg is None:
            raise ConfigError("a config is needed to start a new run")
        if os.path.exists(os.path.join(run_dir, "config.json")):
            raise ConfigError(f"{run_dir!r} already holds a run; pass --resume to continue it or choose a new --out")
    if cfg.objective == "shared-noise":
        warnings.warn(SHARED_NOISE_WARNING, stacklevel=2)
    from .run_lock import RunLock

    os.makedirs(run_dir, exist_ok=True)
    with RunLock(run_dir, "collafuse train"):  # refused while another process writes this run
        trainer = SplitTrainer(cfg, run_dir, dataset)
        if resume:
            trainer.restore()
        atomic_write_json(os.path.join(run_dir, "config.json"), cfg.to_dict())
        atomic_write_json(os.path.join(run_dir, "data.json"), trainer.data_info.to_dict())
        return trainer.run(progress=progress)


def init_run(cfg: RunConfig, run_dir: str, *, data_info: DataInfo | None = None) -> str:
    """Start a run for networked training: ``config.json``, ``data.json`` and a step-0 checkpoint
    of freshly initialised models (seeded by ``cfg.train.seed``), without training anything.

    ``collafuse serve --train`` then trains the server model from the sites' uploads. The server
    needs only the data's shape and classes: ``data_info`` gives them directly (no data on the
    server); without it they are read from ``cfg.data.source``. Returns the checkpoint folder."""
    from .run_lock import RunLock

    if os.path.exists(os.path.join(run_dir, "config.json")):
        raise ConfigError(f"{run_dir!r} already holds a run; choose a new --out")
    if data_info is None:
        ds = load_dataset(cfg.data.source, cfg.data.image_size)
        data_info = DataInfo(ds.name, ds.num_classes, ds.channels, cfg.data.image_size)
    elif data_info.image_size != cfg.data.image_size:
        raise ConfigError(f"data image size {data_info.image_size} differs from the run's {cfg.data.image_size}")
    os.makedirs(run_dir, exist_ok=True)
    with RunLock(run_dir, "collafuse init"):
        device = torch.device("cpu")
        ccfg, scfg = model_configs(cfg, data_info)
        torch.manual_seed(cfg.train.seed)  # model init, as SplitTrainer does
        states = [new_model_state("server", scfg, cfg.train, device)]
        states += [new_model_state(f"client_{i}", ccfg, cfg.train, device) for i in range(cfg.data.num_clients)]
        gen = torch.Generator().manual_seed(cfg.train.seed)
        atomic_write_json(os.path.join(run_dir, "data.json"), data_info.to_dict())
        ckpt = save_checkpoint(run_dir, 0, states, gen.get_state())
        atomic_write_json(os.path.join(run_dir, "config.json"), cfg.to_dict())  # last: a run only once whole
        return ckpt
