"""Datasets and their partition across clients (docs/architecture.md#default-data).

Images are float32 ``[N, C, H, W]`` in [-1, 1]; labels int64 ``[N]``. Sources: the embedded
default (scikit-learn's handwritten digits, 8×8 → ``image_size``), a MedMNIST-style ``.npz``
(``train_images``/``train_labels``, optionally ``val_*``/``test_*``; loaded without pickles) and
an image folder with one subfolder per class.
"""
from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass

import numpy as np

from .config import DataConfig, parse_partition
from .errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
MAX_IMAGES = 2_000_000
MAX_CLASSES = 100_000  # labels are class ids 0 … max: one name string per class is made
MAX_NPZ_ARRAY_BYTES = 8 * 2**30  # one array of a .npz, uncompressed


@dataclass(frozen=True)
class Dataset:
    images: np.ndarray  # [N, C, H, W] float32 in [-1, 1]
    labels: np.ndarray  # [N] int64 in [0, num_classes)
    num_classes: int
    class_names: tuple[str, ...]
    name: str

    @property
    def channels(self) -> int:
        return int(self.images.shape[1])


@dataclass(frozen=True)
class ClientData:
    """One client's private split."""

    index: int
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray

    @property
    def classes(self) -> tuple[int, ...]:
        return tuple(int(c) for c in np.unique(self.train_labels))


def _resize(images: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of ``[N, C, h, w]`` float32 to ``[N, C, size, size]``."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images.astype(np.float32)
    import torch
    import torch.nn.functional as F

    with torch.no_grad():
        out = F.interpolate(torch.from_numpy(images.astype(np.float32)), size=(size, size),
                            mode="bilinear", align_corners=False, antialias=images.shape[-1] > size)
    return out.numpy()


def load_digits(image_size: int = 16) -> Dataset:
    """scikit-learn's bundled digits (1797 images, 10 classes), resized, in [-1, 1]."""
    from sklearn.datasets import load_digits as _load

    d = _load()
    x = (d.images.astype(np.float32) / 16.0)[:, None]  # [N,1,8,8] in [0,1]
    x = np.clip(_resize(x, image_size), 0.0, 1.0) * 2.0 - 1.0
    return Dataset(x.astype(np.float32), d.target.astype(np.int64), 10,
                   tuple(str(i) for i in range(10)), "digits")


def _uint8_to_unit(images: np.ndarray, where: str) -> np.ndarray:
    if images.dtype == np.uint8:
        return images.astype(np.float32) / 255.0
    if images.dtype.kind == "f":
        if images.size == 0:
            return images.astype(np.float32)
        lo, hi = float(np.nanmin(images)), float(np.nanmax(images))
        if not np.all(np.isfinite(images)) or lo < 0.0 or hi > 1.0:
            raise DataError(f"{where}: float images must be finite and in [0, 1] (found {lo}…{hi}); "
                            "or store uint8")
        return images.astype(np.float32)
    raise DataError(f"{where}: images must be uint8 or float in [0, 1], got dtype {images.dtype}")


def _npz_member(z, key: str, path: str) -> np.ndarray:
    """One array of an open ``.npz``, after checking its ``.npy`` header against the member's real
    size: numpy allocates whatever a header declares before reading, so a few bytes declaring
    10^12 elements would otherwise cost a MemoryError or gigabytes of address space."""
    import zipfile
    import zlib

    names = z.zip.namelist()
    name = key + ".npy" if key + ".npy" in names else key
    try:
        info = z.zip.getinfo(name)
        with z.zip.open(info) as f:
            head = io.BytesIO(f.read(min(info.file_size, 2**16 + 16)))
        version = np.lib.format.read_magic(head)
        if version not in ((1, 0), (2, 0)):
            raise DataError(f"{path!r}: {name} is .npy format {version}; expected 1.0 or 2.0")
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read_header(head)
        if dtype.hasobject:
            raise DataError(f"{path!r}: {name} holds Python objects (needs pickles); store numeric arrays")
        declared = math.prod(shape) * dtype.itemsize
        held = info.file_size - head.tell()
        if declared != held:
            raise DataError(f"{path!r}: {name} declares shape {shape} {dtype} ({declared} bytes) but holds "
                            f"{held} bytes; the file is truncated or corrupted")
        if declared > MAX_NPZ_ARRAY_BYTES:
            raise DataError(f"{path!r}: {name} declares {declared} bytes; the limit is {MAX_NPZ_ARRAY_BYTES}")
        return z[key]
    except DataError:
        raise
    except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile, zlib.error,
            NotImplementedError, RuntimeError) as e:  # zipfile: unknown compression method, "encrypted"
        raise DataError(f"{path!r}: cannot read {name} (without pickles): {e}") from e


def load_npz(path: str, image_size: int = 16) -> Dataset:
    """A MedMNIST-style ``.npz``: ``{split}_images`` ``[N,H,W]`` or ``[N,H,W,C]`` and ``{split}_labels``."""
    if not os.path.isfile(path):
        raise DataError(f"dataset file {path!r} does not exist; pass a .npz path, an image folder or 'digits'")
    try:
        z = np.load(path, allow_pickle=False)
        keys = set(z.files)
    except Exception as e:  # zipfile/ValueError on junk
        raise DataError(f"{path!r} is not a readable .npz archive: {e}") from e
    with z:
        return _load_npz(z, keys, path, image_size)


def _load_npz(z, keys: set[str], path: str, image_size: int) -> Dataset:
    splits = [s for s in ("train", "val", "test") if f"{s}_images" in keys]
    if not splits:
        raise DataError(f"{path!r} has no '<split>_images' arrays (found {sorted(keys)}); "
                        "expected MedMNIST keys such as train_images/train_labels")
    xs, ys = [], []
    for s in splits:
        if f"{s}_labels" not in keys:
            raise DataError(f"{path!r} has {s}_images but no {s}_labels")
        x, y = _npz_member(z, f"{s}_images", path), _npz_member(z, f"{s}_labels", path)
        if x.ndim == 3:
            x = x[..., None]
        if x.ndim != 4 or x.shape[-1] not in (1, 3) or 0 in x.shape[1:3]:
            raise DataError(f"{path!r}: {s}_images must be [N,H,W] or [N,H,W,1|3], got {x.shape}")
        if y.ndim == 0 or y.shape[0] != x.shape[0] or math.prod(y.shape[1:]) != 1:
            raise DataError(f"{path!r}: {s}_labels must have one label per image, got {y.shape} for {x.shape[0]} images")
        y = y.reshape(-1, 1)
        if y.dtype.kind not in "iu":
            raise DataError(f"{path!r}: {s}_labels must be integers, got {y.dtype}")
        xs.append(_uint8_to_unit(x, f"{path}:{s}_images"))
        ys.append(y[:, 0].astype(np.int64))
    if len({a.shape[1:] for a in xs}) > 1:
        raise DataError(f"{path!r}: the splits hold images of different shapes {[a.shape[1:] for a in xs]}")
    x = np.concatenate(xs)
    y = np.concatenate(ys)
    if len(x) > MAX_IMAGES or len(x) == 0:
        raise DataError(f"{path!r}: {len(x)} images; expected between 1 and {MAX_IMAGES}")
    if y.min() < 0:
        raise DataError(f"{path!r}: labels must be ≥ 0, found {y.min()}")
    if y.max() >= MAX_CLASSES:
        raise DataError(f"{path!r}: labels are class ids 0 … {MAX_CLASSES - 1}, found {y.max()}")
    n_cls = int(y.max()) + 1
    x = np.transpose(x, (0, 3, 1, 2))
    x = np.clip(_resize(x, image_size), 0, 1) * 2 - 1
    name = os.path.splitext(os.path.basename(path))[0]
    return Dataset(x.astype(np.float32), y, n_cls, tuple(str(i) for i in range(n_cls)), name)


def load_image_folder(path: str, image_size: int = 16) -> Dataset:
    """``path/<class>/<image>``; grayscale when every image is, else RGB."""
    from PIL import Image, UnidentifiedImageError

    if not os.path.isdir(path):
        raise DataError(f"image folder {path!r} does not exist")
    classes = sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)))
    if not classes:
        raise DataError(f"image folder {path!r} has no class subfolders; expected {path}/<class>/<image>.png")
    pil, labels = [], []
    for ci, c in enumerate(classes):
        for f in sorted(os.listdir(os.path.join(path, c))):
            if not f.lower().endswith(IMAGE_SUFFIXES):
                continue
            fp = os.path.join(path, c, f)
            try:
                with Image.open(fp) as im:
                    im.load()
                    pil.append(im.copy())
            except (UnidentifiedImageError, OSError) as e:
                raise DataError(f"cannot read image {fp!r}: {e}") from e
            labels.append(ci)
            if len(pil) > MAX_IMAGES:
                raise DataError(f"image folder {path!r} has more than {MAX_IMAGES} images")
    if not pil:
        raise DataError(f"image folder {path!r} contains no images ({', '.join(IMAGE_SUFFIXES)})")
    gray = all(im.mode in ("1", "L", "I", "I;16", "F") for im in pil)
    mode = "L" if gray else "RGB"
    arr = np.stack([np.asarray(im.convert(mode).resize((image_size, image_size), Image.BILINEAR),
                               dtype=np.float32) / 255.0 for im in pil])
    if gray:
        arr = arr[..., None]
    x = np.transpose(arr, (0, 3, 1, 2)) * 2 - 1
    return Dataset(x.astype(np.float32), np.asarray(labels, np.int64), len(classes), tuple(classes),
                   os.path.basename(os.path.normpath(path)))


def load_dataset(source: str, image_size: int = 16) -> Dataset:
    """'digits', a ``.npz`` path or an image folder."""
    if source == "digits":
        return load_digits(image_size)
    if source.endswith(".npz"):
        return load_npz(source, image_size)
    if os.path.isdir(source):
        return load_image_folder(source, image_size)
    raise DataError(
        f"dataset {source!r} not found: pass 'digits' (embedded), a MedMNIST-style .npz file, "
        "or a folder with one subfolder of images per class"
    )


def partition(ds: Dataset, cfg: DataConfig) -> list[ClientData]:
    """Split ``ds`` across ``cfg.num_clients`` clients, then hold out ``test_fraction`` of each.

    ``iid``: uniform random shares; ``by-label``: disjoint class sets (classes shuffled, split
    as evenly as possible); ``dirichlet:α``: per class, client shares ~ Dirichlet(α).
    Deterministic given ``cfg.seed``.
    """
    scheme, alpha = parse_partition(cfg.partition)
    n = cfg.num_clients
    rng = np.random.default_rng(cfg.seed)
    N = len(ds.labels)
    if scheme == "iid":
        parts = np.array_split(rng.permutation(N), n)
    elif scheme == "by-label":
        present = np.unique(ds.labels)
        if len(present) < n:
            raise DataError(f"by-label partition needs at least {n} classes, the data has {len(present)}; "
                            "use fewer clients or 'iid'")
        groups = np.array_split(rng.permutation(present), n)
        parts = [rng.permutation(np.flatnonzero(np.isin(ds.labels, g))) for g in groups]
    else:
        buckets: list[list[int]] = [[] for _ in range(n)]
        for c in np.unique(ds.labels):
            idx = rng.permutation(np.flatnonzero(ds.labels == c))
            shares = rng.dirichlet(np.full(n, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
            for k, chunk in enumerate(np.split(idx, cuts)):
                buckets[k].extend(chunk.tolist())
        parts = [rng.permutation(np.asarray(b, dtype=np.int64)) for b in buckets]
    clients = []
    for k, idx in enumerate(parts):
        if len(idx) < 2:
            raise DataError(f"client {k} received {len(idx)} images under partition {cfg.partition!r}; "
                            "use a larger alpha, fewer clients or more data")
        n_test = int(round(cfg.test_fraction * len(idx)))
        n_test = min(n_test, len(idx) - 1)
        te, tr = idx[:n_test], idx[n_test:]
        clients.append(ClientData(k, ds.images[tr], ds.labels[tr], ds.images[te], ds.labels[te]))
    return clients
