"""One generation request, start to finish: open the bundle, get handoff samples (a ``.npy`` file,
pure noise for c = 1 bundles, or a collafuse server over HTTP), finish them on this device and
write the images. ``collafuse-edge generate`` is a thin wrapper over :func:`run_generate`.

    from collafuse_edge.generate import GenerateRequest, run_generate
    from collafuse_edge.sampler import SamplerConfig
    from collafuse_edge.session import SessionConfig

    run_generate(GenerateRequest(bundle="bundles/client0", out="img.png", n=16, from_file=None, local=False,
                                 seed=0, labels=None, max_batch=64, sampler=SamplerConfig("ddim", 20),
                                 session=SessionConfig(), server="http://host:8080", server_steps=40))
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

import numpy as np

from .bundle import MANIFEST_NAME
from .errors import InputError
from .images import check_output_path, save_images
from .progress import QUIET, Progress
from .sampler import SamplerConfig
from .session import SessionConfig


@dataclass(frozen=True)
class GenerateRequest:
    bundle: str
    out: str
    n: int | None
    from_file: str | None
    local: bool
    seed: int
    labels: np.ndarray | int | None
    max_batch: int
    sampler: SamplerConfig
    session: SessionConfig
    server: str | None = None  # URL of a collafuse server (the handoff source instead of a file)
    token: str | None = None  # its bearer token; None: $COLLAFUSE_TOKEN
    # with ddim on the server, this many evaluations on its levels (None: every level; clamped to
    # the schedule's T, the most a server accepts)
    server_steps: int | None = None
    # the server's sampler: "ddpm" | "ddim"; None: the same as the client's (``sampler.sampler``)
    server_sampler: str | None = None
    ca_file: str | None = None  # PEM to verify a self-signed server certificate
    trust: tuple[str, ...] | None = None  # public key files the bundle must be signed by (None: $COLLAFUSE_TRUST)
    progress: Progress = QUIET  # where progress goes (the CLI: stderr unless --quiet)


def _read_handoff_file(path: str) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise InputError(f"handoff file {path!r} does not exist")
    except (ValueError, OSError) as e:
        raise InputError(f"handoff file {path!r} is not a readable .npy array ({e})") from e


def handoff_for(req: GenerateRequest, rt):
    """The Handoff a request starts from: a file's rows, or pure noise for ``--local``."""
    from .runtime import Handoff

    if req.local:
        if req.n is None:
            raise InputError("--local needs -n N, the number of images")
        return rt.local_handoff(req.n, req.seed)
    x = _read_handoff_file(req.from_file)
    if x.ndim != 4:
        raise InputError(f"handoff file {req.from_file!r} holds shape {list(x.shape)}; expected [B, C, H, W]")
    if req.n is not None:
        if req.n > x.shape[0]:
            raise InputError(f"-n {req.n} asks for more images than the {x.shape[0]} rows of {req.from_file!r}")
        x = x[: req.n]
    return Handoff(x, rt.bundle.handoff_level, seed=req.seed)


def generate_from_server(req: GenerateRequest, rt) -> np.ndarray:
    """``-n`` images: the bundle is checked against the server, handoff samples come over HTTP
    (chunks of the token's max_n with seeds seed, seed+1, …), this device finishes them."""
    if req.n is None:
        raise InputError("--server needs -n N, the number of images")
    return _from_server(req, rt, rt.labels_for(req.n, req.labels))[0]


def _from_server(req: GenerateRequest, rt, labels) -> tuple[np.ndarray, str]:
    """(images, the server's model version)."""
    import asyncio

    from .http_client import ClientConfig, ServerClient, generate_over_http

    if req.n is None:
        raise InputError("--server needs -n N, the number of images")
    server_sampler = req.server_sampler or req.sampler.sampler
    if server_sampler not in ("ddpm", "ddim"):
        raise InputError(f"server sampler must be ddpm or ddim, got {server_sampler!r}")
    server_steps = None
    if server_sampler == "ddim" and req.server_steps is not None:
        server_steps = min(req.server_steps, rt.bundle.schedule.T)

    async def go() -> tuple[np.ndarray, str]:
        async with ServerClient(ClientConfig(req.server, token=req.token, ca_file=req.ca_file)) as server:
            images = await generate_over_http(rt, server, req.n, labels, seed=req.seed, sampler=req.sampler,
                                              server_sampler=server_sampler, server_steps=server_steps,
                                              progress=req.progress)
            return images, (await server.info()).model_version

    return asyncio.run(go())


def client_steps(bundle, sampler: SamplerConfig) -> int:
    """Model calls per image on this device: the bundle's own timetable for a distilled student,
    else the requested sampler's."""
    return len(bundle.sampler_for(sampler).timetable(bundle.client_levels))


def bundle_hash(bundle) -> str:
    """sha256 of the bundle's manifest.json: it pins every file, so it names the whole bundle."""
    return hashlib.sha256((bundle.path / MANIFEST_NAME).read_bytes()).hexdigest()


def run_generate(req: GenerateRequest) -> dict:
    """Do ``req`` and write its images; returns what was done: images, out, levels, seconds,
    providers, and the provenance the PNG carries too (model_version, seed, labels,
    bundle_sha256, signed_by, sampler)."""
    from .runtime import EdgeRuntime

    check_output_path(req.out)
    if req.n is not None and req.n < 1:
        raise InputError(f"-n must be a positive integer, got {req.n}")
    t0 = time.perf_counter()
    rt = EdgeRuntime.open(req.bundle, req.session, max_batch=req.max_batch, trust=req.trust)
    levels = client_steps(rt.bundle, req.sampler)
    if req.server is not None:
        if req.n is None:
            raise InputError("--server needs -n N, the number of images")
        labels = rt.labels_for(req.n, req.labels)
        images, model_version = _from_server(req, rt, labels)
    else:
        handoff = handoff_for(req, rt)
        labels = rt.labels_for(handoff.samples.shape[0], req.labels)
        with req.progress.task(f"{handoff.samples.shape[0]} images: client levels", total=levels) as t:
            images = rt.finish(handoff, labels, sampler=req.sampler, callback=lambda i, lv, x: t.advance())
        model_version = "local" if req.local else "from-file"
    server_sampler = req.server_sampler or req.sampler.sampler
    meta = {
        "model_version": model_version,
        "seed": req.seed,
        "labels": None if labels is None else [int(v) for v in labels],
        "bundle_sha256": bundle_hash(rt.bundle),
        "signed_by": rt.signed_by,
        "client_sampler": f"{req.sampler.sampler}" + (f" {levels} steps" if req.sampler.sampler == "ddim" else ""),
        "server_sampler": None if req.server is None else server_sampler
        + (f" {min(req.server_steps, rt.bundle.schedule.T)} steps"
           if server_sampler == "ddim" and req.server_steps else ""),
        "collafuse_edge": _edge_version(),
    }
    save_images(req.out, images, metadata=meta)
    return {"images": int(images.shape[0]), "out": req.out, "levels": levels,
            "seconds": time.perf_counter() - t0, "providers": rt.denoiser.providers, **meta}


def _edge_version() -> str:
    from . import __version__

    return __version__


__all__ = ["GenerateRequest", "bundle_hash", "client_steps", "generate_from_server", "handoff_for", "run_generate"]
