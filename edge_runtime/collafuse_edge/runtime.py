"""The edge client's Python API: a bundle, its onnxruntime denoiser and the numpy sampler.

Sync and async entry points share one code path; the async ones run the (blocking) sampler in
a worker thread so an event loop stays responsive.

Example::

    rt = EdgeRuntime.open("bundle/", SessionConfig(intra_op_threads=2))
    images = rt.finish(Handoff(x_h, level=rt.bundle.handoff_level, seed=7), labels=[3, 3])
    images = rt.generate_local(16, seed=0)                       # c = 1 bundles only
    images = await rt.agenerate(16, get_handoff=server.handoff)  # any async HandoffSource
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Awaitable, Callable, Optional, Sequence

import numpy as np

from .bundle import Bundle, load_bundle
from .errors import BundleError, InputError
from .noise import initial_noise
from .sampler import DenoiseFn, SamplerConfig, StepCallback, finish
from .session import OnnxDenoiser, SessionConfig
from .validation import check_int, is_int

CLIENT_CLASSES = "client_classes"  # optional manifest section: the classes this client trained on


def client_classes(bundle: Bundle) -> tuple[int, ...] | None:
    """The classes the bundle's client knows (the optional ``client_classes`` manifest section,
    written by ``collafuse export``), or None when the bundle does not record them."""
    raw = bundle.manifest.get(CLIENT_CLASSES)
    if raw is None:
        return None
    nc = bundle.num_classes
    ok = (nc is not None and isinstance(raw, list) and raw and len(raw) <= nc
          and all(is_int(c) and 0 <= c < nc for c in raw) and len(set(raw)) == len(raw))
    if not ok:
        raise BundleError(f"bundle {bundle.path}: {CLIENT_CLASSES} must be a non-empty list of distinct class "
                          f"ids in [0, {(nc or 1) - 1}] (a conditional bundle only), got {str(raw)[:80]}; "
                          f"re-export the bundle")
    return tuple(int(c) for c in raw)


@dataclass(frozen=True)
class Handoff:
    """Samples at the handoff level, as the server (or a file) delivers them."""

    samples: np.ndarray  # [B, C, H, W] float32, the sample at ``level``
    level: int  # must equal the bundle's handoff level k-1
    seed: int = 0  # the request seed; the client draws its step noise with the same seed
    labels: Optional[np.ndarray] = None  # [B] int64, the labels the server conditioned on


# How the runtime gets handoff samples from elsewhere: (n, labels or None, seed) → Handoff.
# The HTTP client of the collafuse server provides one; tests and files provide others.
HandoffSource = Callable[[int, Optional[np.ndarray], int], Awaitable[Handoff]]
SyncHandoffSource = Callable[[int, Optional[np.ndarray], int], Handoff]

LabelsLike = Optional[Sequence[int] | np.ndarray | int]


def chunked(denoise: DenoiseFn, max_batch: int) -> DenoiseFn:
    """Evaluate ``denoise`` in slices of at most ``max_batch`` rows (bounds activation memory).

    Only the model calls are split: the steps and their noise still see the whole batch, so the
    result does not depend on ``max_batch``.
    """

    def run(x: np.ndarray, t: np.ndarray, labels: np.ndarray | None) -> np.ndarray:
        if x.shape[0] <= max_batch:
            return denoise(x, t, labels)
        parts = [
            denoise(x[a:a + max_batch], t[a:a + max_batch], None if labels is None else labels[a:a + max_batch])
            for a in range(0, x.shape[0], max_batch)
        ]
        return np.concatenate(parts, axis=0)

    return run


class EdgeRuntime:
    """Runs a bundle's client levels. ``denoiser`` defaults to an onnxruntime session."""

    def __init__(
        self,
        bundle: Bundle,
        denoiser: DenoiseFn | None = None,
        session: SessionConfig | None = None,
        *,
        max_batch: int = 64,
    ):
        check_int("max_batch", max_batch, low=1)
        self.bundle = bundle
        self.classes = client_classes(bundle)
        self.denoiser = denoiser if denoiser is not None else OnnxDenoiser(bundle, session)
        self.max_batch = max_batch
        self.signed_by: str | None = None  # the trusted key that signed the bundle (EdgeRuntime.open with trust)
        self._denoise = chunked(self.denoiser, max_batch)

    @classmethod
    def open(
        cls, path: str | os.PathLike, session: SessionConfig | None = None, *,
        verify_hashes: bool = True, max_batch: int = 64, trust: Sequence[str | os.PathLike] | None = None,
    ) -> "EdgeRuntime":
        """Open the bundle at ``path``. ``trust``: public key files; when given (or set in
        ``$COLLAFUSE_TRUST``) the bundle must carry a valid signature by one of them
        (:mod:`collafuse_edge.signing`); ``signed_by`` then holds the key id."""
        if trust is None and not os.environ.get("COLLAFUSE_TRUST"):
            bundle, kid = load_bundle(path, verify_hashes=verify_hashes), None
        else:  # the signature check needs the optional cryptography package: imported only here
            from .signing import load_verified_bundle

            bundle, kid = load_verified_bundle(path, trust, verify_hashes=verify_hashes)
        rt = cls(bundle, session=session, max_batch=max_batch)
        rt.signed_by = kid
        return rt

    # -- inputs ----------------------------------------------------------------------------

    def labels_for(self, n: int, labels: LabelsLike = None) -> np.ndarray | None:
        """Class labels ``[n]`` int64 for a conditional bundle (None → cycling through the classes
        the client knows, when the bundle records them, else 0, 1, 2, …; an int → that class for
        every image); None for an unconditional one."""
        nc = self.bundle.num_classes
        if nc is None:
            if labels is not None:
                raise InputError("this bundle's model is unconditional: do not pass class labels")
            return None
        if labels is None:
            known = np.asarray(self.classes if self.classes is not None else range(nc), dtype=np.int64)
            return known[np.arange(n) % len(known)]
        arr = np.asarray(labels)
        if arr.dtype.kind not in "iu":
            raise InputError(f"class labels must be integers, got dtype {arr.dtype}")
        arr = np.full(n, int(arr), dtype=np.int64) if arr.ndim == 0 else arr.astype(np.int64)
        if arr.shape != (n,):
            raise InputError(f"class labels must be one per image ({n}), got shape {list(arr.shape)}")
        if n and (arr.min() < 0 or arr.max() >= nc):
            raise InputError(f"class labels must lie in [0, {nc - 1}], got {arr.min()}…{arr.max()}")
        return arr

    def check_handoff(self, handoff: Handoff) -> np.ndarray:
        """The handoff samples as float32 ``[B,C,H,W]``, after checking level, shape and values."""
        x = handoff.samples
        if not isinstance(x, np.ndarray):
            raise InputError(f"handoff samples must be a numpy array, got {type(x).__name__}")
        if handoff.level != self.bundle.handoff_level:
            raise InputError(
                f"handoff samples are at level {handoff.level} but this bundle's client starts at "
                f"level {self.bundle.handoff_level} (cut ratio {self.bundle.cut_ratio}); ask the "
                f"server for this client's handoff level"
            )
        if x.ndim != 4 or tuple(x.shape[1:]) != self.bundle.image_shape:
            raise InputError(f"handoff samples must have shape [B, {', '.join(map(str, self.bundle.image_shape))}], "
                             f"got {list(x.shape)}")
        if x.dtype.kind != "f":
            raise InputError(f"handoff samples must be floating point, got dtype {x.dtype}")
        x = np.ascontiguousarray(x, dtype=np.float32)
        if not np.all(np.isfinite(x)):
            raise InputError("handoff samples contain NaN or Inf")
        return x

    # -- sync API --------------------------------------------------------------------------

    def finish(
        self,
        handoff: Handoff,
        labels: LabelsLike = None,
        *,
        sampler: SamplerConfig = SamplerConfig(),
        callback: StepCallback | None = None,
    ) -> np.ndarray:
        """Run the client levels k-1 … 0 on ``handoff``; returns images ``[B,C,H,W]`` in [-1, 1].

        ``labels`` default to ``handoff.labels``; the step noise uses ``handoff.seed``.
        """
        x = self.check_handoff(handoff)
        lab = self.labels_for(x.shape[0], handoff.labels if labels is None else labels)
        # a distilled bundle runs its own few-step timetable whatever the caller's sampler says
        return finish(self._denoise, self.bundle.schedule, x, self.bundle.client_levels, lab,
                      self.bundle.sampler_for(sampler), seed=handoff.seed, callback=callback)

    def local_handoff(self, n: int, seed: int = 0) -> Handoff:
        """For a c = 1 bundle: the pure noise x_{T-1} a purely local chain starts from."""
        if not self.bundle.local_only:
            b = self.bundle
            raise InputError(
                f"bundle {b.path} has cut ratio {b.cut_ratio}: its model runs levels "
                f"{b.handoff_level}…0 only, and levels {b.schedule.T - 1}…{b.client_levels} need the "
                f"server; generate with a server (or from handoff samples), or export with cut ratio 1"
            )
        _check_n(n)
        return Handoff(initial_noise(seed, (n, *self.bundle.image_shape)), self.bundle.handoff_level, seed)

    def generate_local(
        self, n: int, labels: LabelsLike = None, *, sampler: SamplerConfig = SamplerConfig(), seed: int = 0,
    ) -> np.ndarray:
        """``n`` images from pure noise, entirely on the device (c = 1 bundles)."""
        return self.finish(self.local_handoff(n, seed), labels, sampler=sampler)

    def generate(
        self, n: int, get_handoff: SyncHandoffSource, labels: LabelsLike = None, *,
        sampler: SamplerConfig = SamplerConfig(), seed: int = 0,
    ) -> np.ndarray:
        """``n`` images: handoff samples from ``get_handoff(n, labels, seed)``, finished here."""
        _check_n(n)
        lab = self.labels_for(n, labels)
        handoff = get_handoff(n, lab, seed)
        _check_rows(handoff, n)
        return self.finish(handoff, lab, sampler=sampler)

    # -- async API -------------------------------------------------------------------------

    async def afinish(
        self, handoff: Handoff, labels: LabelsLike = None, *, sampler: SamplerConfig = SamplerConfig(),
        callback: StepCallback | None = None,
    ) -> np.ndarray:
        """:meth:`finish` in a worker thread."""
        import asyncio  # here, not at the top: the CLI's start-up time matters on a device

        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, functools.partial(self.finish, handoff, labels, sampler=sampler,
                                                                  callback=callback))

    async def agenerate(
        self, n: int, get_handoff: HandoffSource | None = None, labels: LabelsLike = None, *,
        sampler: SamplerConfig = SamplerConfig(), seed: int = 0, callback: StepCallback | None = None,
    ) -> np.ndarray:
        """``n`` images; handoff samples from ``await get_handoff(n, labels, seed)``, or, when
        ``get_handoff`` is None, from pure noise on the device (c = 1 bundles)."""
        _check_n(n)
        lab = self.labels_for(n, labels)
        if get_handoff is None:
            handoff = self.local_handoff(n, seed)
        else:
            handoff = await get_handoff(n, lab, seed)
            _check_rows(handoff, n)
        return await self.afinish(handoff, lab, sampler=sampler, callback=callback)


def _check_n(n: int) -> None:
    check_int("the number of images", n, low=1)


def _check_rows(handoff: Handoff, n: int) -> None:
    if not isinstance(handoff, Handoff):
        raise InputError(f"a handoff source must return a Handoff, got {type(handoff).__name__}")
    if handoff.samples.shape[0] != n:
        raise InputError(f"asked for {n} handoff samples, got {handoff.samples.shape[0]}")
