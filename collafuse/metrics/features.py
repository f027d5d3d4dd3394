"""The feature extractor behind "FD/KD in classifier feature space" (SPEC §3).

Inception weights cannot be downloaded here, so the default extractor is a small CNN
classifier that the project trains on the dataset itself; its features are the penultimate
(embedding) layer, standardised on the training images. Numbers computed with it are comparable
only between runs that use the same extractor file — report them as "FD/KD in classifier
feature space", never as FID/KID.

A trained net is saved as ``<stem>.safetensors`` (weights) + ``<stem>.json`` (architecture,
training report and the weights' sha256); nothing is unpickled. Caching per dataset and
user-supplied networks (TorchScript) live in :mod:`collafuse.metrics.extractors`.

Typical use::

    from collafuse.data import load_digits
    from collafuse.metrics import get_feature_net
    net = get_feature_net(load_digits(), "runs/.feature_cache")  # trains once, reloads after
    f = net.features(images)                                     # [N, 128] float64
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Iterator, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

from ..errors import CheckpointError, ConfigError, DataError

logger = logging.getLogger(__name__)

FORMAT = "collafuse-feature-net"
FORMAT_VERSION = 1
# Bump when the architecture or the training recipe changes, so that caches retrain.
RECIPE_VERSION = 1
DEFAULT_EPOCHS = 8


def _positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class FeatureNetConfig:
    """Architecture of :class:`FeatureNet`. Input ``[B, *image_shape]``, features ``[B, feature_dim]``."""

    image_shape: tuple[int, int, int] = (1, 16, 16)  # (C, H, W) of the images it accepts
    num_classes: int = 10
    widths: tuple[int, ...] = (16, 32, 64)  # conv channels per stage; max-pool 2× between stages
    feature_dim: int = 128  # size of the embedding layer whose output is the feature vector

    def __post_init__(self) -> None:
        object.__setattr__(self, "image_shape", tuple(self.image_shape))
        object.__setattr__(self, "widths", tuple(self.widths))
        if len(self.image_shape) != 3:
            raise ConfigError(f"image_shape must be (C, H, W), got {self.image_shape!r}")
        for v in self.image_shape:
            _positive_int("image_shape[i]", v)
        _positive_int("num_classes", self.num_classes)
        _positive_int("feature_dim", self.feature_dim)
        if not self.widths:
            raise ConfigError("widths must not be empty")
        for w in self.widths:
            _positive_int("widths[i]", w)
        down = 2 ** (len(self.widths) - 1)
        if min(self.image_shape[1:]) < down:
            raise ConfigError(f"image_shape {self.image_shape} is too small for {len(self.widths)} "
                              f"pooling stages; H and W must be ≥ {down}")


@dataclass(frozen=True)
class TrainingReport:
    """How a feature net was trained and how well it classifies held-out images."""

    test_accuracy: float  # on a stratified held-out split never used for training
    num_train: int
    num_test: int
    epochs: int
    seed: int
    train_seconds: float
    dataset_key: str = ""  # cache key of the training data ("" when not trained via the cache)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@runtime_checkable
class FeatureExtractor(Protocol):
    """Anything that maps images ``[N, C, H, W]`` in [-1, 1] to features ``[N, D]`` float64."""

    def features(self, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
        ...


@contextlib.contextmanager
def _torch_threads(num_threads: int | None) -> Iterator[None]:
    """Cap torch's intra-op CPU threads inside the block (None: leave as is).

    These nets are too small to gain from intra-op threads, and on a busy machine OpenMP
    spin-waiting made 2 threads 3–30× slower than 1 (measured on the 2-core dev box).
    """
    if num_threads is None:
        yield
        return
    _positive_int("num_threads", num_threads)
    previous = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _check_images(images: object, name: str = "images",
                  shape: tuple[int, int, int] | None = None) -> np.ndarray:
    arr = np.asarray(images)
    if arr.ndim != 4:
        raise DataError(f"{name} must be a [N, C, H, W] array, got shape {arr.shape}")
    if arr.dtype.kind not in "fiu":
        raise DataError(f"{name} must be numeric, got dtype {arr.dtype}")
    if shape is not None and tuple(arr.shape[1:]) != tuple(shape):
        raise DataError(f"{name} has image shape {tuple(arr.shape[1:])} but the feature network "
                        f"expects {tuple(shape)}; resize the images or use a matching network")
    arr = arr.astype(np.float32, copy=False)
    if not np.all(np.isfinite(arr)):
        raise DataError(f"{name} contains NaN or infinite values")
    return arr


class FeatureNet(nn.Module):
    """A small CNN classifier; its embedding layer is the feature space.

    ``[B, C, H, W]`` → conv3×3-BN-ReLU per width, max-pool 2× between them → adaptive
    avg-pool to 4×4 → linear to ``feature_dim`` (the embedding) → ReLU → linear to
    ``num_classes`` (the logits). About 0.16 M parameters with the default config.

    The features are the embedding standardised per dimension with the mean and std it had on
    the training images (buffers ``feature_mean``/``feature_std``, saved with the weights).
    That fixes the arbitrary scale of a trained layer, which matters for KD: its kernel
    ``(x·y/d + 1)³`` is not scale-invariant, and unscaled embeddings gave KD values in the
    thousands, dominated by subset noise.
    """

    def __init__(self, config: FeatureNetConfig, report: TrainingReport | None = None) -> None:
        super().__init__()
        self.config = config
        self.report = report
        layers: list[nn.Module] = []
        c_in = config.image_shape[0]
        for i, w in enumerate(config.widths):
            layers += [nn.Conv2d(c_in, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
            if i < len(config.widths) - 1:
                layers.append(nn.MaxPool2d(2))
            c_in = w
        self.trunk = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(4), nn.Flatten())
        self.embed = nn.Linear(c_in * 16, config.feature_dim)
        self.head = nn.Sequential(nn.ReLU(), nn.Dropout(0.2), nn.Linear(config.feature_dim, config.num_classes))
        self.register_buffer("feature_mean", torch.zeros(config.feature_dim))
        self.register_buffer("feature_std", torch.ones(config.feature_dim))

    def embedding(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W]`` → raw embedding ``[B, feature_dim]`` (pre-activation, so full rank)."""
        return self.embed(self.trunk(x))

    def standardized_embedding(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W]`` → the features ``[B, feature_dim]``: the embedding standardised."""
        return (self.embedding(x) - self.feature_mean) / self.feature_std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W]`` → logits ``[B, num_classes]``."""
        return self.head(self.embedding(x))

    @property
    def feature_dim(self) -> int:
        return self.config.feature_dim

    def _device(self) -> torch.device:
        return next(self.parameters()).device

    @torch.no_grad()
    def _batched(self, fn, images: np.ndarray, batch_size: int, num_threads: int | None) -> list[torch.Tensor]:
        _positive_int("batch_size", batch_size)
        x = _check_images(images, "images", self.config.image_shape)
        was_training = self.training
        self.eval()
        try:
            with _torch_threads(num_threads if self._device().type == "cpu" else None):
                return [fn(torch.from_numpy(x[i:i + batch_size]).to(self._device())).cpu()
                        for i in range(0, len(x), batch_size)]
        finally:
            self.train(was_training)

    def features(self, images: np.ndarray, batch_size: int = 256, num_threads: int | None = 1) -> np.ndarray:
        """Images ``[N, C, H, W]`` in [-1, 1] → standardised features ``[N, feature_dim]`` float64.

        ``num_threads`` caps torch's CPU threads meanwhile (see :func:`_torch_threads`).
        """
        out = self._batched(self.standardized_embedding, images, batch_size, num_threads)
        if not out:
            return np.zeros((0, self.feature_dim), np.float64)
        return torch.cat(out).double().numpy()

    def predict(self, images: np.ndarray, batch_size: int = 256, num_threads: int | None = 1) -> np.ndarray:
        """Images ``[N, C, H, W]`` → predicted class ``[N]`` int64."""
        out = self._batched(lambda xb: self(xb).argmax(1), images, batch_size, num_threads)
        return torch.cat(out).numpy() if out else np.zeros((0,), np.int64)

    @torch.no_grad()
    def fit_feature_scale(self, images: np.ndarray, batch_size: int = 256) -> None:
        """Set ``feature_mean``/``feature_std`` from the raw embedding of ``images`` ``[N, C, H, W]``."""
        e = torch.cat(self._batched(self.embedding, images, batch_size, 1)).double()
        if len(e) < 2:
            raise DataError(f"images holds {len(e)} images; need at least 2 to fit the feature scale")
        self.feature_mean.copy_(e.mean(0).to(self.feature_mean))
        # a dead dimension has std 0; leave it unscaled rather than divide by zero
        std = e.std(0)
        self.feature_std.copy_(torch.where(std > 1e-6, std, torch.ones_like(std)).to(self.feature_std))

    def accuracy(self, images: np.ndarray, labels: np.ndarray) -> float:
        """Share of ``images`` ``[N, C, H, W]`` whose predicted class equals ``labels`` ``[N]``."""
        labels = np.asarray(labels)
        if labels.shape != (len(images),):
            raise DataError(f"labels must have shape ({len(images)},), got {labels.shape}")
        return float(np.mean(self.predict(images) == labels)) if len(labels) else float("nan")

    # ----------------------------------------------------------------------------- files

    def save(self, path: str) -> tuple[str, str]:
        """Write ``<stem>.safetensors`` and ``<stem>.json`` atomically; return both paths.

        ``path`` is the stem or either file name. The JSON is written last and carries the
        weights' sha256, so a reader never pairs a new JSON with old weights unnoticed.
        """
        from safetensors.torch import save_file

        weights, meta = _pair_paths(path)
        os.makedirs(os.path.dirname(os.path.abspath(weights)), exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        tmp = _temp_path(weights)
        try:
            save_file(tensors, tmp)
            digest = _sha256_file(tmp)
            os.replace(tmp, weights)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        doc = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "recipe_version": RECIPE_VERSION,
            "weights_file": os.path.basename(weights),
            "weights_sha256": digest,
            "config": {"image_shape": list(self.config.image_shape), "num_classes": self.config.num_classes,
                       "widths": list(self.config.widths), "feature_dim": self.config.feature_dim},
            "report": self.report.to_dict() if self.report is not None else None,
        }
        _atomic_write_text(meta, json.dumps(doc, indent=2) + "\n")
        return weights, meta

    @classmethod
    def load(cls, path: str, device: str | torch.device = "cpu") -> "FeatureNet":
        """Read a pair written by :meth:`save`. Raises :class:`CheckpointError` naming what is wrong."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        weights, meta = _pair_paths(path)
        for p in (weights, meta):
            if not os.path.isfile(p):
                raise CheckpointError(f"feature net file {p!r} does not exist; a feature net is a "
                                      "<stem>.safetensors + <stem>.json pair written by FeatureNet.save")
        try:
            with open(meta, encoding="utf-8") as f:
                doc = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"feature net config {meta!r} is not readable JSON: {e}") from e
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise CheckpointError(f"{meta!r} is not a {FORMAT} config (format="
                                  f"{doc.get('format') if isinstance(doc, dict) else None!r})")
        if doc.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(f"{meta!r} has format_version {doc.get('format_version')!r}; "
                                  f"this collafuse reads version {FORMAT_VERSION}")
        try:
            c = doc["config"]
            config = FeatureNetConfig(tuple(c["image_shape"]), c["num_classes"], tuple(c["widths"]),
                                      c["feature_dim"])
            report = TrainingReport(**doc["report"]) if doc.get("report") is not None else None
            expected_sha = str(doc["weights_sha256"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"feature net config {meta!r} is malformed: {e}") from e
        actual_sha = _sha256_file(weights)
        if actual_sha != expected_sha:
            raise CheckpointError(
                f"feature net weights {weights!r} do not match their config {meta!r} (sha256 "
                f"{actual_sha[:12]}… ≠ {expected_sha[:12]}…): the file is corrupted or from another "
                "net; delete both files to retrain")
        try:
            state = load_file(weights)
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"feature net weights {weights!r} are not a valid safetensors file: {e}") from e
        net = cls(config, report)
        ref = net.state_dict()
        problems = [f"missing {k}" for k in ref if k not in state]
        problems += [f"unexpected {k}" for k in state if k not in ref]
        problems += [f"{k}: shape {tuple(state[k].shape)} ≠ {tuple(v.shape)}, dtype {state[k].dtype} vs {v.dtype}"
                     for k, v in ref.items()
                     if k in state and (state[k].shape != v.shape or state[k].dtype != v.dtype)]
        if problems:
            raise CheckpointError(f"feature net weights {weights!r} do not fit the config in {meta!r}: "
                                  + "; ".join(problems[:8]) + (" …" if len(problems) > 8 else ""))
        net.load_state_dict(state)
        return net.to(device).eval()


# --------------------------------------------------------------------------------- training


def _stratified_split(labels: np.ndarray, test_fraction: float, rng: np.random.Generator
                      ) -> tuple[np.ndarray, np.ndarray]:
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_test = int(round(test_fraction * len(idx))) if len(idx) > 1 else 0
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return rng.permutation(np.concatenate(train)), np.sort(np.concatenate(test))


def _shift(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random translation of each image ``[B, C, H, W]`` by up to one pixel (edges replicated)."""
    b, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="replicate")
    dy = torch.randint(0, 3, (b,), generator=gen)
    dx = torch.randint(0, 3, (b,), generator=gen)
    rows = (dy[:, None] + torch.arange(h)[None])[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w)[None])[:, None, None, :]
    bi = torch.arange(b)[:, None, None, None]
    ci = torch.arange(x.shape[1])[None, :, None, None]
    return padded[bi, ci, rows, cols]


def train_feature_classifier(
    images: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    *,
    seed: int = 0,
    epochs: int = DEFAULT_EPOCHS,
    batch_size: int = 64,
    lr: float = 3e-3,
    test_fraction: float = 0.2,
    config: FeatureNetConfig | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
    num_threads: int | None = 1,
    dataset_key: str = "",
) -> FeatureNet:
    """Train a :class:`FeatureNet` on ``images`` ``[N, C, H, W]`` in [-1, 1] and ``labels`` ``[N]``.

    A stratified ``test_fraction`` of the images is held out; the returned net's
    ``report.test_accuracy`` is measured on it. Deterministic given ``seed`` on a CPU.
    On the 16×16 digits (1797 images) the default recipe takes a few seconds on 2 cores.

    ``num_threads`` caps torch's CPU threads while training (restored afterwards; None keeps
    the current setting); see :func:`_torch_threads` for why the default is 1.
    """
    x = _check_images(images)
    y = np.asarray(labels)
    _positive_int("num_classes", num_classes)
    _positive_int("epochs", epochs)
    _positive_int("batch_size", batch_size)
    if y.shape != (len(x),) or y.dtype.kind not in "iu":
        raise DataError(f"labels must be integers of shape ({len(x)},), got {y.dtype} {y.shape}")
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise DataError(f"labels must lie in [0, {num_classes}), found {y.min()}…{y.max()}")
    if not (0.0 < test_fraction < 1.0):
        raise ConfigError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    if len(x) < 10:
        raise DataError(f"images holds {len(x)} images; training a feature net needs at least 10")
    if config is None:
        config = FeatureNetConfig(tuple(x.shape[1:]), num_classes)
    elif tuple(config.image_shape) != tuple(x.shape[1:]) or config.num_classes != num_classes:
        raise ConfigError(f"config (image_shape={config.image_shape}, num_classes={config.num_classes}) "
                          f"does not fit the data ({tuple(x.shape[1:])}, {num_classes} classes)")

    with _torch_threads(num_threads):
        return _train(x, y, config, seed=seed, epochs=epochs, batch_size=batch_size, lr=lr,
                      test_fraction=test_fraction, device=device, progress=progress, dataset_key=dataset_key)


def _train(x: np.ndarray, y: np.ndarray, config: FeatureNetConfig, *, seed: int, epochs: int,
           batch_size: int, lr: float, test_fraction: float, device: str | torch.device,
           progress: bool, dataset_key: str) -> FeatureNet:
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    tr, te = _stratified_split(y.astype(np.int64), test_fraction, rng)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    net = FeatureNet(config).to(device)
    xt = torch.from_numpy(x[tr])
    yt = torch.from_numpy(y[tr].astype(np.int64))
    steps_per_epoch = -(-len(tr) // batch_size)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch,
                                                pct_start=0.25)
    from tqdm.auto import tqdm

    net.train()
    bar = tqdm(range(epochs), desc="feature net", unit="epoch", disable=not progress, leave=False)
    for _ in bar:
        order = torch.randperm(len(tr), generator=gen)
        total = 0.0
        for i in range(0, len(tr), batch_size):
            b = order[i:i + batch_size]
            if len(b) < 2:  # BatchNorm needs two samples
                continue
            xb = _shift(xt[b], gen).to(device)
            loss = nn.functional.cross_entropy(net(xb), yt[b].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(b)
        bar.set_postfix(loss=f"{total / len(tr):.3f}")
    net.eval()
    net.fit_feature_scale(x[tr])
    acc = net.accuracy(x[te], y[te]) if len(te) else float("nan")
    net.report = TrainingReport(acc, int(len(tr)), int(len(te)), epochs, seed,
                                round(time.perf_counter() - t0, 3), dataset_key)
    logger.info("feature net: test accuracy %.4f on %d held-out images, %.1f s", acc, len(te),
                net.report.train_seconds)
    return net


# ------------------------------------------------------------------------------------ files


def _pair_paths(path: str) -> tuple[str, str]:
    path = os.fspath(path)
    for ext in (".safetensors", ".json"):
        if path.endswith(ext):
            path = path[: -len(ext)]
    return path + ".safetensors", path + ".json"


def _temp_path(target: str) -> str:
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(target) + ".", suffix=".tmp",
                               dir=os.path.dirname(os.path.abspath(target)))
    os.close(fd)
    os.chmod(tmp, 0o644)  # mkstemp makes 0600; these files are meant to be shared read-only
    return tmp


def _atomic_write_text(path: str, text: str) -> None:
    tmp = _temp_path(path)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except OSError as e:
        raise CheckpointError(f"cannot read {path!r}: {e}") from e
    return h.hexdigest()
