""""Disclose once": one keyed x_h per training image, reused every time the image is drawn.

With fresh draws (the default) every training step sends a new noisy copy
``x_h = sqrt(ᾱ_h)·x0 + sqrt(1-ᾱ_h)·ε`` of the same image; a server that links n copies and
averages them sees the image as if it were disclosed once at ᾱ_eff = ᾱ_h·n/(ᾱ_h·n + 1-ᾱ_h)
(docs/privacy.md). In ``once`` mode the noise ε of an image is a function of the image's bytes,
the handoff level and a **site secret** that never leaves the site, so the server receives the
same x_h every epoch and averaging gains it nothing.

The noise is the project's counter-based Philox generator (:func:`collafuse_edge.noise.keyed_normal`)
keyed by the first 63 bits of HMAC-SHA256(secret, image bytes): the same image at the same level
always gets the same draw, a different level gets an independent one (two disclosures of one image
at two levels with the *same* ε would let the server solve for x0 exactly), and without the secret
the draw is unpredictable. Over the secret the draw is N(0, I), so the disclosed x_h has exactly
the distribution of a fresh one and the ``exact`` objective stays unbiased
(``tests/core/test_privacy_once.py``).

The secret is 32 random bytes, hex, in ``<run dir>/disclose_secret`` (mode 0600, written
atomically); keep it with the run so a resumed run keeps sending the same x_h.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import secrets

import numpy as np
import torch

from collafuse_edge.files import atomic_write_text
from collafuse_edge.noise import keyed_normal

from .errors import ConfigError

DISCLOSE_MODES = ("fresh", "once")
SECRET_FILE = "disclose_secret"
SECRET_BYTES = 32
PURPOSE_DISCLOSE = 2  # the keyed generator's purpose word for disclose-once noise (0, 1: sampling)


def check_disclose_mode(mode: str) -> str:
    if mode not in DISCLOSE_MODES:
        raise ConfigError(f"--disclose must be 'fresh' (a new noise draw per upload) or 'once' (one keyed draw "
                          f"per image, reused every epoch); got {mode!r}")
    return mode


def load_or_create_secret(run_dir: str) -> bytes:
    """The site's disclose-once secret from ``run_dir``, created (0600, atomically) on first use."""
    path = os.path.join(run_dir, SECRET_FILE)
    if os.path.exists(path):
        with open(path, encoding="ascii") as f:
            text = f.read().strip()
        try:
            key = bytes.fromhex(text)
        except ValueError:
            key = b""
        if len(key) != SECRET_BYTES:
            raise ConfigError(f"{path!r} is not a disclose-once secret ({SECRET_BYTES} bytes as hex); restore it "
                              "from a backup — a new secret would send every image again with new noise")
        return key
    key = secrets.token_bytes(SECRET_BYTES)
    atomic_write_text(path, key.hex() + "\n", mode=0o600)
    return key


def image_seeds(images: np.ndarray, secret: bytes) -> np.ndarray:
    """int64 ``[N]``: the noise key of each image ``[N, ...]`` (HMAC-SHA256 of its float32 bytes)."""
    if len(secret) < 16:
        raise ConfigError("the disclose-once secret must be at least 16 bytes")
    x = np.ascontiguousarray(np.asarray(images, dtype=np.float32))
    out = np.empty(len(x), dtype=np.int64)
    for i in range(len(x)):
        d = hmac.new(secret, x[i].tobytes(), hashlib.sha256).digest()
        out[i] = int.from_bytes(d[:8], "little") & (2**63 - 1)
    return out


class OnceNoise:
    """The fixed disclosure noise of a site's training images (index → ε at a level)."""

    def __init__(self, images: np.ndarray, secret: bytes):
        self.seeds = torch.from_numpy(image_seeds(images, secret))
        self.shape = tuple(int(s) for s in np.asarray(images).shape[1:])

    def noise(self, index: torch.Tensor, level: int) -> torch.Tensor:
        """float32 ``[B, *shape]``: the ε of images ``index`` at handoff ``level`` (same every call)."""
        idx = torch.as_tensor(index, dtype=torch.long)
        seeds = self.seeds[idx]
        numel = int(np.prod(self.shape))
        z = keyed_normal(seeds, torch.full_like(seeds, int(level)), torch.zeros_like(seeds), numel, PURPOSE_DISCLOSE)
        return z.reshape(len(idx), *self.shape)
