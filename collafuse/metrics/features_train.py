"""Training the feature net: a stratified held-out split, one-pixel shifts, AdamW + one-cycle."""
from __future__ import annotations

import logging
import time

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError, DataError
from ..threads import torch_threads
from .features_model import FeatureNet, FeatureNetConfig, TrainingReport, _check_images, _positive_int

logger = logging.getLogger("collafuse.metrics.features")  # the name the training log always had

DEFAULT_EPOCHS = 8


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
    the current setting); see :func:`collafuse.threads.torch_threads` for why the default is 1.
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

    with torch_threads(num_threads):
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
    pbar = tqdm(range(epochs), desc="feature net", unit="epoch", disable=not progress, leave=False)
    for _ in pbar:
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
        pbar.set_postfix(loss=f"{total / len(tr):.3f}")
    net.eval()
    net.fit_feature_scale(x[tr])
    acc = net.accuracy(x[te], y[te]) if len(te) else float("nan")
    net.report = TrainingReport(acc, int(len(tr)), int(len(te)), epochs, seed,
                                round(time.perf_counter() - t0, 3), dataset_key)
    logger.info("feature net: test accuracy %.4f on %d held-out images, %.1f s", acc, len(te),
                net.report.train_seconds)
    return net
