"""A client's side of networked training: train the private low-noise model on local data and
upload only disclosures (x_h at the handoff level the server assigned to this token).

    collafuse client-train --data digits --client-index 0 --server https://host:8443 --token … --out client0/

x0 and the noise that produced x_h never leave this process: the only thing sent is the output
of :func:`collafuse.objectives.disclose` (x_h, and labels when the server shares them), as
``.npy`` bytes. Resumable: the client model, optimiser, EMA and generator are checkpointed every
``checkpoint_every`` steps; batch ids are ``<step>`` so an upload repeated after a crash is
recognised by the server (409 ``duplicate_batch``) and not trained twice.
"""
from __future__ import annotations

import asyncio
import json
import os
import time
from dataclasses import dataclass
from typing import Awaitable, Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from collafuse_edge.errors import ServerRequestError
from collafuse_edge.protocol import H_BATCH_ID, H_LABELS, H_LEVEL, NPY_CONTENT_TYPE, encode_tensor

from .checkpoint import (atomic_write_json, latest_checkpoint, load_rng, read_state, restore_model_state,
                         save_checkpoint)
from .config import ConfigError, ModelConfig, TrainConfig, client_preset, replace
from .data import load_dataset, partition
from .config import DataConfig
from .objectives import client_loss, disclose
from .train import apply_update, new_model_state, resolve_device
from .models import denoise

# (method, path, headers, body) -> (status, json document)
Transport = Callable[[str, str, dict, bytes | None], Awaitable[tuple[int, dict]]]


@dataclass(frozen=True)
class ClientTrainConfig:
    out: str
    server: str
    token: str
    data: DataConfig = DataConfig()
    client_index: int = 0  # which share of a partitioned dataset is "ours" (simulating a site)
    model: ModelConfig = client_preset()
    train: TrainConfig = TrainConfig()
    upload_every: int = 1  # upload one disclosure batch every N local steps
    upload_batch: int = 64  # rows per uploaded batch
    timeout_s: float = 30.0
    retry_for_s: float = 600.0  # keep retrying an unreachable/overloaded server this long (capped back-off)
    ca_file: str | None = None  # PEM bundle to verify a server certificate from a private CA
    disclose: str = "fresh"  # "once": one keyed x_h per image, reused every upload (collafuse/privacy_once.py)

    def __post_init__(self) -> None:
        from urllib.parse import urlsplit

        u = urlsplit(self.server)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ConfigError(f"--server must be a URL like https://host:8443, got {self.server!r}")
        if self.ca_file is not None and not os.path.isfile(self.ca_file):
            raise ConfigError(f"--ca-file {self.ca_file!r} is not a file; pass the PEM bundle of the server's CA")
        if not (self.retry_for_s >= 0):
            raise ConfigError(f"--retry-for must be seconds ≥ 0, got {self.retry_for_s!r}")
        if not (0 <= self.client_index < self.data.num_clients):
            raise ConfigError(f"client_index must be in [0, {self.data.num_clients - 1}], got {self.client_index}")
        if self.upload_every < 1 or self.upload_batch < 1:
            raise ConfigError("upload_every and upload_batch must be positive")
        if not self.token:
            raise ConfigError("a bearer token is required: pass --token or set COLLAFUSE_TOKEN")
        from .privacy_once import check_disclose_mode

        check_disclose_mode(self.disclose)


def aiohttp_transport(base_url: str, token: str, timeout_s: float, retry_for_s: float,
                      ca_file: str | None = None) -> Transport:
    """POST/GET with bearer auth. Connection errors, 5xx and 429 are retried with capped exponential
    back-off and full jitter (0.2 s doubling to 30 s) for up to ``retry_for_s`` seconds, so a site
    rides out a server restart or a long outage; each wait is printed once it exceeds a few seconds."""
    import random
    import ssl

    import aiohttp

    sslctx = ssl.create_default_context(cafile=ca_file) if ca_file else None

    async def call(method: str, path: str, headers: dict, body: bytes | None) -> tuple[int, dict]:
        hdrs = {"Authorization": f"Bearer {token}", **headers}
        cap = 0.2
        deadline = time.monotonic() + retry_for_s
        attempts = 0
        while True:
            attempts += 1
            try:
                async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as s:
                    async with s.request(method, base_url.rstrip("/") + path, headers=hdrs, data=body,
                                         ssl=sslctx if sslctx is not None else True) as r:
                        try:
                            doc = await r.json(content_type=None)
                        except (ValueError, aiohttp.ContentTypeError):
                            doc = {}
                        if r.status == 429 or r.status >= 500:
                            last: object = f"HTTP {r.status}"
                        else:
                            return r.status, doc
            except aiohttp.ClientConnectorCertificateError as e:
                raise ServerRequestError(f"{method} {path}: the server's certificate is not trusted ({e}); "
                                         "pass --ca-file PEM with your CA's certificate") from None
            except (aiohttp.ClientConnectionError, asyncio.TimeoutError) as e:
                last = e or type(e).__name__
            left = deadline - time.monotonic()
            if left <= 0:
                raise ServerRequestError(f"{method} {path} failed after {attempts} attempts over "
                                         f"{retry_for_s:.0f} s: {last}; raise --retry-for to wait longer")
            delay = min(random.uniform(0, cap), left)
            if cap >= 5:
                print(f"client-train: {method} {path}: {last}; retrying in {delay:.1f} s "
                      f"({left:.0f} s of --retry-for left)", flush=True)
            await asyncio.sleep(delay)
            cap = min(cap * 2, 30.0)

    return call


def _error_text(doc: dict) -> str:
    err = doc.get("error", {}) if isinstance(doc, dict) else {}
    return f"{err.get('code', 'error')}: {err.get('message', doc)}"


class ClientTrainer:
    def __init__(self, cc: ClientTrainConfig, transport: Transport | None = None):
        self.cc = cc
        self.transport = transport or aiohttp_transport(cc.server, cc.token, cc.timeout_s, cc.retry_for_s,
                                                          cc.ca_file)
        self.loop = asyncio.new_event_loop()
        info_status, info = self._call("GET", "/v1/info", {}, None)
        if info_status != 200:
            raise ServerRequestError(f"GET /v1/info: HTTP {info_status} ({_error_text(info)})", info_status)
        self.info = info
        from collafuse_edge.schedule import Schedule

        self.schedule = Schedule.from_dict(info["schedule"])
        you = info["you"]
        self.k = int(you["client_levels"])
        self.level = int(you["handoff_level"])
        self.share_labels = info.get("server_conditioning") == "label"
        ds = self._adopt_contract(info)
        mine = partition(ds, cc.data)[cc.client_index]
        self.x = torch.from_numpy(mine.train_images)
        self.y = torch.from_numpy(mine.train_labels)
        self.device = resolve_device(cc.train.device)
        mcfg = replace(self.cc.model, sample_size=self.cc.data.image_size, channels=ds.channels, num_classes=ds.num_classes)
        torch.manual_seed(cc.train.seed)
        self.ms = new_model_state("client", mcfg, cc.train, self.device)
        self.gen = torch.Generator().manual_seed(cc.train.seed)
        self.step = 0
        self.uploaded = 0
        self.duplicates = 0
        self.bytes_sent = 0
        os.makedirs(cc.out, exist_ok=True)
        from .run_lock import RunLock

        self.lock = RunLock(cc.out, "collafuse client-train").acquire()  # one process per site run
        self.once = None
        if cc.disclose == "once":  # the secret stays in the site's run directory, never sent
            from .privacy_once import OnceNoise, load_or_create_secret

            self.once = OnceNoise(mine.train_images, load_or_create_secret(cc.out))
        ck = latest_checkpoint(cc.out)
        if ck is not None:
            meta = read_state(ck)
            restore_model_state(ck, meta, self.ms)
            self.gen.set_state(load_rng(ck))
            self.step = int(meta["step"])
            self.uploaded = int(meta["extra"].get("uploaded", 0))
        self._write_site_config(info, ds)

    def _write_site_config(self, info: dict, ds) -> None:
        """``config.json``/``data.json``: the site's output is a run of its own (export, evaluate and
        sample read it), recording the server's schedule, image shape and cut as taken from
        ``/v1/info``. A resume whose flags change what was trained is refused."""
        from .config import RunConfig, ScheduleConfig

        cc = self.cc
        sd = info["schedule"]
        model = replace(cc.model, sample_size=cc.data.image_size)
        cfg = RunConfig(data=cc.data,
                        schedule=ScheduleConfig(int(sd["num_train_timesteps"]), str(sd["beta_schedule"]),
                                                bool(sd.get("clip_sample", True))),
                        cut_ratios=(float(info["you"]["cut_ratio"]),) * cc.data.num_clients,
                        client_model=model, server_model=model,  # the server's model stays on the server
                        class_conditional=True, server_conditioning=str(info.get("server_conditioning", "label")),
                        train=cc.train, disclose=cc.disclose)
        doc = cfg.to_dict() | {"site": {"client_index": cc.client_index, "server": cc.server,
                                        "server_model_version": info.get("model_version", ""),
                                        "handoff_level": self.level, "client_levels": self.k}}
        path = os.path.join(cc.out, "config.json")
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                old = json.load(f)
            for key in ("data", "client_model", "cut_ratios", "schedule"):
                if old.get(key) != json.loads(json.dumps(doc[key])):
                    raise ConfigError(f"{cc.out!r} holds a site run trained with different {key} ({old.get(key)}); "
                                      f"resume it with the flags it used, or choose a new --out")
            if old.get("site", {}).get("client_index") != cc.client_index:
                raise ConfigError(f"{cc.out!r} is the run of client index {old['site'].get('client_index')}; "
                                  "resume it with that --client-index, or choose a new --out")
        atomic_write_json(path, doc)
        atomic_write_json(os.path.join(cc.out, "data.json"),
                          {"name": cc.data.source, "num_classes": ds.num_classes, "channels": ds.channels,
                           "image_size": cc.data.image_size})

    def _adopt_contract(self, info: dict):
        """Load the site's data in the server's image shape and check channels and classes, before any
        training: a mismatch found at the first upload would waste the whole local run."""
        cc = self.cc
        try:
            c, h, w = (int(v) for v in info["image_shape"])
            classes = int(info["num_classes"])
        except (KeyError, TypeError, ValueError):
            raise ServerRequestError(f"GET /v1/info of {cc.server} has no valid image_shape/num_classes; is it a "
                                     "collafuse server?") from None
        if h != w:
            raise ConfigError(f"the server's images are {h}×{w}; only square images are supported")
        if cc.data.image_size != h:
            print(f"client-train: the server works on {c}×{h}×{w} images; resizing the site's data to {h}×{w} "
                  f"(--image-size {cc.data.image_size} ignored)", flush=True)
            self.cc = cc = replace(cc, data=replace(cc.data, image_size=h))
        ds = load_dataset(cc.data.source, h)
        if ds.channels != c:
            raise ConfigError(f"the site's data have {ds.channels} channel(s) but the server's model takes {c}; "
                              f"convert the images ({'to grayscale' if c == 1 else 'to RGB'}) or join a server "
                              "trained on your kind of images")
        if ds.num_classes > classes:
            raise ConfigError(f"the site's data have {ds.num_classes} classes but the server knows {classes}; "
                              "relabel to the server's classes or use a server trained with as many")
        return ds

    def _call(self, method, path, headers, body):
        return self.loop.run_until_complete(self.transport(method, path, headers, body))

    def upload(self, x_h: torch.Tensor, labels: torch.Tensor | None, batch_id: str) -> bool:
        """Send one disclosure batch; True if newly accepted, False if the server had it already."""
        body = encode_tensor(x_h.numpy().astype(np.float32))
        headers = {"Content-Type": NPY_CONTENT_TYPE, H_BATCH_ID: batch_id, H_LEVEL: str(self.level)}
        if labels is not None:
            headers[H_LABELS] = ",".join(str(int(v)) for v in labels)
        status, doc = self._call("POST", "/v1/train", headers, body)
        self.bytes_sent += len(body)
        if status == 200:
            return True
        if status == 409 and doc.get("error", {}).get("code") == "duplicate_batch":
            return False
        raise ServerRequestError(f"upload of batch {batch_id} refused: HTTP {status} ({_error_text(doc)})", status)

    def train_step(self) -> dict:
        cc = self.cc
        logs: dict = {"step": self.step + 1}
        idx = torch.randint(len(self.y), (cc.train.batch_size,), generator=self.gen)
        x0, y = self.x[idx], self.y[idx]
        if self.k > 0:
            def eps_fn(x, t, lab):
                return denoise(self.ms.model, x, t, lab)

            loss = client_loss(eps_fn, x0, y, self.k, self.schedule, self.gen, self.device)
            apply_update(self.ms, loss, cc.train.grad_clip)
            logs["client_loss"] = loss.item()
        if (self.step + 1) % cc.upload_every == 0 and self.k < self.schedule.T:
            uidx = torch.randint(len(self.y), (cc.upload_batch,), generator=self.gen)
            noise = self.once.noise(uidx, self.level) if self.once is not None and self.level >= 0 else None
            d = disclose(0, self.x[uidx], self.y[uidx], self.k, self.schedule, "exact", self.gen, self.share_labels,
                         noise)
            new = self.upload(d.x, d.labels, f"step-{self.step + 1}")
            self.uploaded += 1
            self.duplicates += 0 if new else 1
        self.step += 1
        return logs

    def save(self) -> None:
        save_checkpoint(self.cc.out, self.step, [self.ms], self.gen.get_state(), extra={"uploaded": self.uploaded})

    def run(self, progress: bool = True) -> dict:
        t = self.cc.train
        t0 = time.perf_counter()
        logs: dict = {}
        with open(os.path.join(self.cc.out, "metrics.jsonl"), "a", encoding="utf-8") as mf:
            for _ in tqdm(range(self.step, t.steps), desc="client-train", disable=not progress):
                logs = self.train_step()
                if self.step % t.log_every == 0:
                    mf.write(json.dumps(logs) + "\n")
                if self.step % t.checkpoint_every == 0 or self.step == t.steps:
                    self.save()
        return {"step": self.step, "uploaded": self.uploaded, "duplicates": self.duplicates,
                "bytes_sent": self.bytes_sent, "wall_s": time.perf_counter() - t0, "last": logs}

    def close(self) -> None:
        self.loop.close()
        if getattr(self, "lock", None) is not None:
            self.lock.release()
