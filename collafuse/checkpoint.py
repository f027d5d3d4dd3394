"""Run directories and checkpoints: JSON + safetensors only, written atomically.

Layout::

    RUN/config.json                       RunConfig
    RUN/data.json                         dataset facts (classes, channels, name)
    RUN/LATEST                            name of the newest complete checkpoint
    RUN/checkpoints/step_000500/
        state.json                        step, per-file sha256, optimiser hyper-params, EMA scalars
        server.safetensors                EMA weights (what sampling/export use)
        server.raw.safetensors            raw weights (for resuming)
        server.optim.safetensors          AdamW state tensors
        client_0.safetensors …            likewise per client
        rng.safetensors                   the training generator's state
    RUN/metrics.jsonl                     one JSON object per logged step

A checkpoint is written into ``step_N.tmp`` and renamed when complete, then ``LATEST`` is
replaced atomically; a crash or a full disk leaves the previous checkpoint intact. A write that
the OS refuses (ENOSPC, EROFS, EDQUOT, …) raises :class:`CheckpointError` naming the cause and
the checkpoint that is still in force (tests/core/test_faults_checkpoint.py).
"""
from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

# one writer and one hashing helper for every package; atomic_write_bytes/atomic_write_json stay
# importable from here
from collafuse_edge.files import atomic_write_bytes, atomic_write_json, jsonable, sha256_file
from collafuse_edge.schedule import Schedule
from collafuse_edge.validation import is_int

from .config import RunConfig, replace
from .errors import CheckpointError, ConfigError
from .models import build_unet

CHECKPOINT_FORMAT = 1
_CHECKPOINT_NAME = re.compile(r"step_[0-9]{1,12}")
_PLAIN_FILE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
KEEP_CHECKPOINTS = 2


def _write_state_json(path: str, meta: dict) -> None:
    """``state.json``, in :func:`atomic_write_json`'s format, through this module's
    ``atomic_write_bytes`` (the fault tests refuse that call to simulate a full disk)."""
    atomic_write_bytes(path, (json.dumps(jsonable(meta), indent=2, sort_keys=True, allow_nan=False) + "\n").encode())


def _read_json(path: str, what: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{what} {path!r} is missing") from None
    except (OSError, ValueError, RecursionError) as e:  # ValueError: bad UTF-8 and JSON too
        raise CheckpointError(f"{what} {path!r} is not valid JSON ({str(e)[:200]}); the run directory is damaged") from e


@dataclass(frozen=True)
class DataInfo:
    name: str
    num_classes: int
    channels: int
    image_size: int

    def to_dict(self) -> dict:
        return {"name": self.name, "num_classes": self.num_classes, "channels": self.channels,
                "image_size": self.image_size}


def model_configs(cfg: RunConfig, info: DataInfo):
    """The client and server ModelConfigs of a run, completed with data facts."""
    client = replace(cfg.client_model, channels=info.channels,
                     num_classes=info.num_classes if cfg.class_conditional else None)
    server = replace(cfg.server_model, channels=info.channels,
                     num_classes=info.num_classes if cfg.server_conditioning == "label" else None)
    return client, server


# ---------------------------------------------------------------------------------------------
# writing


def _optim_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for pid, st in sd["state"].items():
        for name, v in st.items():
            key = f"{pid}.{name}"
            if torch.is_tensor(v):
                tensors[key] = v.detach().cpu().contiguous()
            else:
                scalars[key] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optim_from(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    for key, v in meta["scalars"].items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    return {"state": state, "param_groups": meta["param_groups"]}


@dataclass
class ModelState:
    """What a checkpoint stores per model (the trainer hands these over)."""

    name: str  # "server" or "client_i"
    model: torch.nn.Module  # raw (trained) weights
    ema: Any  # diffusers EMAModel over model.parameters()
    optimizer: torch.optim.Optimizer


def _ema_state_dict(ms: ModelState) -> dict[str, torch.Tensor]:
    names = [n for n, _ in ms.model.named_parameters()]
    return {n: p.detach().cpu().contiguous() for n, p in zip(names, ms.ema.shadow_params)}


def save_checkpoint(run_dir: str, step: int, models: list[ModelState], rng_state: torch.Tensor,
                    extra: dict | None = None) -> str:
    """Write checkpoint ``step`` atomically and point LATEST at it. Returns its directory."""
    root = os.path.join(run_dir, "checkpoints")
    name = f"step_{step:07d}"
    final = os.path.join(root, name)
    tmp = final + ".tmp"
    old = final + ".old"
    files: dict[str, str] = {}
    meta: dict[str, Any] = {"format": CHECKPOINT_FORMAT, "step": step, "models": {}, "extra": extra or {}}
    moved_aside = False
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        for ms in models:
            raw = {k: v.detach().cpu().contiguous() for k, v in ms.model.state_dict().items()}
            save_file(raw, os.path.join(tmp, f"{ms.name}.raw.safetensors"))
            save_file(_ema_state_dict(ms), os.path.join(tmp, f"{ms.name}.safetensors"))
            ot, om = _optim_tensors(ms.optimizer)
            save_file(ot, os.path.join(tmp, f"{ms.name}.optim.safetensors"))
            ema_scalars = {k: v for k, v in ms.ema.state_dict().items() if k != "shadow_params"}
            meta["models"][ms.name] = {"optimizer": om, "ema": ema_scalars}
        save_file({"generator": rng_state.cpu()}, os.path.join(tmp, "rng.safetensors"))
        for f in sorted(os.listdir(tmp)):
            files[f] = sha256_file(os.path.join(tmp, f))
        meta["files"] = files
        _write_state_json(os.path.join(tmp, "state.json"), meta)
        for f in os.listdir(tmp):  # make the file contents durable before the rename
            with open(os.path.join(tmp, f), "rb") as fh:
                os.fsync(fh.fileno())
        if os.path.exists(final):  # the same step again: keep the old one until LATEST moved on
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            moved_aside = True
        os.replace(tmp, final)
        atomic_write_bytes(os.path.join(run_dir, "LATEST"), (name + "\n").encode())
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if moved_aside and not os.path.exists(final):
            os.replace(old, final)
        if isinstance(e, OSError):  # disk full, read-only, quota: say so, and that nothing was lost
            prev = _latest_name(run_dir)
            raise CheckpointError(
                f"cannot write checkpoint {name} in {root!r}: {e.strerror or e} "
                f"({type(e).__name__}, errno {e.errno}); "
                + (f"the previous checkpoint {prev} is intact and LATEST still points at it"
                   if prev else "no earlier checkpoint exists") + "; free space or fix permissions and retry"
            ) from e
        raise
    if moved_aside:
        shutil.rmtree(old, ignore_errors=True)
    _prune(root, keep=KEEP_CHECKPOINTS, current=name)
    return final


def _latest_name(run_dir: str) -> str | None:
    try:
        with open(os.path.join(run_dir, "LATEST"), encoding="utf-8") as f:
            return f.read().strip() or None
    except OSError:
        return None


def _prune(root: str, keep: int, current: str) -> None:
    done = sorted(d for d in os.listdir(root) if d.startswith("step_") and not d.endswith((".tmp", ".old")))
    for d in done[:-keep]:
        if d != current:
            shutil.rmtree(os.path.join(root, d), ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# reading


def read_config(run_dir: str) -> RunConfig:
    if not os.path.isdir(run_dir):
        raise CheckpointError(f"run directory {run_dir!r} does not exist; train one with `collafuse train --out DIR`")
    d = _read_json(os.path.join(run_dir, "config.json"), "run config")
    try:
        return RunConfig.from_dict(d)
    except ConfigError as e:
        raise CheckpointError(f"run config in {run_dir!r} is invalid: {e}") from e


def read_data_info(run_dir: str) -> DataInfo:
    d = _read_json(os.path.join(run_dir, "data.json"), "data description")
    try:
        return DataInfo(str(d["name"]), int(d["num_classes"]), int(d["channels"]), int(d["image_size"]))
    except (KeyError, TypeError, ValueError, OverflowError) as e:
        raise CheckpointError(f"data.json in {run_dir!r} is malformed: {str(e)[:200]}") from e


def latest_checkpoint(run_dir: str) -> str | None:
    p = os.path.join(run_dir, "LATEST")
    if not os.path.exists(p):
        return None
    with open(p, "rb") as f:
        name = f.read(256).decode("utf-8", "replace").strip()
    d = os.path.join(run_dir, "checkpoints", name)
    if not _CHECKPOINT_NAME.fullmatch(name) or not os.path.isdir(d):
        raise CheckpointError(f"{p} points at {name!r:.80}, which is not a checkpoint in {run_dir!r}")
    return d


def read_state(ckpt_dir: str, verify: bool = True) -> dict:
    meta = _read_json(os.path.join(ckpt_dir, "state.json"), "checkpoint state")
    if not isinstance(meta, dict):
        raise CheckpointError(f"checkpoint state in {ckpt_dir!r} must be a JSON object, got {type(meta).__name__}")
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"checkpoint {ckpt_dir!r} has format {meta.get('format')!r:.40}; "
                              f"this collafuse reads format {CHECKPOINT_FORMAT}")
    step, files = meta.get("step"), meta.get("files", {})
    if not is_int(step) or step < 0:
        raise CheckpointError(f"checkpoint state in {ckpt_dir!r} has step {step!r:.40}; expected an integer ≥ 0")
    if not isinstance(files, dict) or not all(
            isinstance(f, str) and _PLAIN_FILE.fullmatch(f) and isinstance(v, str) for f, v in files.items()):
        # a name like "/dev/zero" or "../x" would make the hash check read outside the checkpoint
        raise CheckpointError(f"checkpoint state in {ckpt_dir!r} has a malformed 'files' table; "
                              "expected {file name in the checkpoint: sha256}")
    if verify:
        for f, digest in files.items():
            p = os.path.join(ckpt_dir, f)
            if not os.path.exists(p):
                raise CheckpointError(f"checkpoint file {p!r} is missing")
            if sha256_file(p) != digest:
                raise CheckpointError(f"checkpoint file {p!r} is corrupted (sha256 mismatch); "
                                      "restore it or resume from an earlier checkpoint")
    return meta


def load_tensors(path: str) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; refuses a file holding NaN or ±Inf (a diverged run or a
    damaged file would otherwise load silently and sample garbage)."""
    try:
        sd = load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"cannot read weights {path!r}: {e}") from e
    bad = [k for k, v in sd.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(f"weights {path!r} hold NaN or Inf values in {len(bad)} tensor(s) (e.g. {bad[0]}): "
                              "the run diverged or the file is damaged; resume from an earlier checkpoint")
    return sd


def load_weights(model: torch.nn.Module, path: str) -> None:
    """Load safetensors into ``model`` after checking every name and shape."""
    sd = load_tensors(path)
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    bad = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
           for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or bad:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if bad:
            parts.append(f"{len(bad)} with wrong shape (e.g. {bad[0]})")
        raise CheckpointError(f"weights {path!r} do not match the model config: " + "; ".join(parts))
    model.load_state_dict(sd)


@dataclass
class LoadedRun:
    """A trained run ready for sampling/export: EMA weights, eval mode."""

    run_dir: str
    config: RunConfig
    data: DataInfo
    schedule: Schedule
    server: torch.nn.Module
    clients: list[torch.nn.Module]
    step: int
    model_version: str = ""  # of the server weights loaded: run@step:sha256[:12]
    site: dict | None = None  # a site's client-train run: {client_index, server, handoff_level, …}; no server model

    @property
    def num_classes(self) -> int:
        return self.data.num_classes


def site_info(run_dir: str) -> dict | None:
    """The ``site`` record of a client-train run's config (None for a run of ``collafuse train``)."""
    site = _read_json(os.path.join(run_dir, "config.json"), "run config").get("site")
    return site if isinstance(site, dict) else None


SERVER_TRAINING_DIR = "server_training"  # the networked trainer's checkpoints inside a run
SERVER_CHECKPOINT_CHOICES = ("latest", "run")


def server_checkpoint(run_dir: str, which: str = "latest") -> str:
    """The checkpoint folder whose server weights a run serves, samples and evaluates with.

    ``latest`` (default): the networked trainer's newest checkpoint (``RUN/server_training``) when
    there is one — what the server learned from the sites' uploads — else the run's own newest;
    ``run``: the run's own newest, ignoring networked training; any other value: a checkpoint folder
    (``…/checkpoints/step_N``) holding ``server.safetensors``."""
    if which in SERVER_CHECKPOINT_CHOICES:
        trained_dir = os.path.join(run_dir, SERVER_TRAINING_DIR)
        trained = latest_checkpoint(trained_dir) if which == "latest" and os.path.isdir(trained_dir) else None
        ckpt = trained or latest_checkpoint(run_dir)
        if ckpt is None:
            raise CheckpointError(f"run {run_dir!r} has no checkpoint yet (no LATEST file); train it first")
        return ckpt
    if not os.path.isfile(os.path.join(which, "server.safetensors")) or \
            not os.path.isfile(os.path.join(which, "state.json")):
        raise CheckpointError(f"server checkpoint {which!r} is not a checkpoint folder with server.safetensors; "
                              f"pass latest, run, or a RUN/[server_training/]checkpoints/step_N folder")
    return which


def model_version(run_dir: str, ckpt: str) -> tuple[str, int]:
    """``"<run name>@<step>:<sha256[:12] of the server weights>"`` of ``ckpt``, and its step: the one
    name of a served model, identical in every process that serves the same weights."""
    meta = read_state(ckpt, verify=False)
    digest = meta.get("files", {}).get("server.safetensors", "unknown")
    name = os.path.basename(os.path.abspath(run_dir))
    return f"{name}@{int(meta['step'])}:{digest[:12]}", int(meta["step"])


def load_run(run_dir: str, device: str | torch.device = "cpu", server_weights: str = "latest") -> LoadedRun:
    """The run's EMA models: clients from the run's newest checkpoint, the server from
    :func:`server_checkpoint` (``server_weights``: latest | run | a checkpoint folder)."""
    cfg = read_config(run_dir)
    info = read_data_info(run_dir)
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise CheckpointError(f"run {run_dir!r} has no checkpoint yet (no LATEST file); train it first")
    meta = read_state(ckpt)
    site = site_info(run_dir)
    if site is not None:  # a client-train output: this site's client model only
        ccfg, _ = model_configs(cfg, info)
        m = build_unet(ccfg)
        load_weights(m, os.path.join(ckpt, "client.safetensors"))
        clients = [None] * cfg.data.num_clients
        clients[int(site["client_index"])] = m.to(device).eval()
        return LoadedRun(run_dir, cfg, info, cfg.schedule.build(), None, clients, int(meta["step"]),
                         str(site.get("server_model_version", "")), site)
    sckpt = server_checkpoint(run_dir, server_weights)
    if sckpt != ckpt:
        read_state(sckpt)  # verifies the server checkpoint's hashes
    ccfg, scfg = model_configs(cfg, info)
    server = build_unet(scfg)
    load_weights(server, os.path.join(sckpt, "server.safetensors"))
    clients = []
    for i in range(cfg.data.num_clients):
        m = build_unet(ccfg)
        load_weights(m, os.path.join(ckpt, f"client_{i}.safetensors"))
        clients.append(m.to(device).eval())
    version, _ = model_version(run_dir, sckpt)
    return LoadedRun(run_dir, cfg, info, cfg.schedule.build(), server.to(device).eval(), clients, int(meta["step"]),
                     version)


def restore_model_state(ckpt_dir: str, meta: dict, ms: ModelState) -> None:
    """Load raw weights, EMA shadow and optimiser state of one model for resuming."""
    load_weights(ms.model, os.path.join(ckpt_dir, f"{ms.name}.raw.safetensors"))
    ema_sd = load_tensors(os.path.join(ckpt_dir, f"{ms.name}.safetensors"))
    names = [n for n, _ in ms.model.named_parameters()]
    if set(ema_sd) != set(names):
        raise CheckpointError(f"EMA weights of {ms.name} in {ckpt_dir!r} do not match the model")
    info = meta["models"].get(ms.name)
    if info is None:
        raise CheckpointError(f"checkpoint {ckpt_dir!r} has no state for {ms.name}")
    dev = next(ms.model.parameters()).device
    ms.ema.load_state_dict({**info["ema"], "shadow_params": [ema_sd[n].to(dev) for n in names]})
    ot = load_tensors(os.path.join(ckpt_dir, f"{ms.name}.optim.safetensors"))
    ms.optimizer.load_state_dict(_optim_from({k: v.to(dev) if not k.endswith(".step") else v for k, v in ot.items()},
                                             info["optimizer"]))


def load_rng(ckpt_dir: str) -> torch.Tensor:
    return load_tensors(os.path.join(ckpt_dir, "rng.safetensors"))["generator"]
