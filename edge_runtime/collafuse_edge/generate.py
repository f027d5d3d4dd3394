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

import time
from dataclasses import dataclass

import numpy as np

from .errors import InputError
from .images import check_output_path, save_images
from .sampler import SamplerConfig
from .schedule import client_timetable
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
    # the server's half runs the same sampler as the client's; with ddim, this many evaluations on
    # its levels (None: every level; clamped to the schedule's T, the most a server accepts)
    server_steps: int | None = None


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
    import asyncio

    from .http_client import ClientConfig, ServerClient, generate_over_http

    if req.n is None:
        raise InputError("--server needs -n N, the number of images")
    server_sampler = req.sampler.sampler
    server_steps = None
    if server_sampler == "ddim" and req.server_steps is not None:
        server_steps = min(req.server_steps, rt.bundle.schedule.T)

    async def go() -> np.ndarray:
        async with ServerClient(ClientConfig(req.server, token=req.token)) as server:
            return await generate_over_http(rt, server, req.n, req.labels, seed=req.seed, sampler=req.sampler,
                                            server_sampler=server_sampler, server_steps=server_steps)

    return asyncio.run(go())


def run_generate(req: GenerateRequest) -> dict:
    """Do ``req`` and write its images; returns what was done (images, out, levels, seconds, providers)."""
    from .runtime import EdgeRuntime

    check_output_path(req.out)
    if req.n is not None and req.n < 1:
        raise InputError(f"-n must be a positive integer, got {req.n}")
    t0 = time.perf_counter()
    rt = EdgeRuntime.open(req.bundle, req.session, max_batch=req.max_batch)
    if req.server is not None:
        images = generate_from_server(req, rt)
    else:
        images = rt.finish(handoff_for(req, rt), req.labels, sampler=req.sampler)
    save_images(req.out, images)
    return {"images": int(images.shape[0]), "out": req.out,
            "levels": len(client_timetable(rt.bundle.client_levels, req.sampler.steps)),
            "seconds": time.perf_counter() - t0, "providers": rt.denoiser.providers}


__all__ = ["GenerateRequest", "generate_from_server", "handoff_for", "run_generate"]
