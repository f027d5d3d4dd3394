"""Datasets and partitions (docs/architecture.md#default-data)."""
import numpy as np
import pytest

from collafuse.config import DataConfig
from collafuse.data import load_dataset, load_digits, load_image_folder, load_npz, partition
from collafuse.errors import DataError


def test_digits_default():
    ds = load_digits(16)
    assert ds.images.shape == (1797, 1, 16, 16) and ds.images.dtype == np.float32
    assert ds.images.min() >= -1 and ds.images.max() <= 1 and ds.num_classes == 10


@pytest.mark.parametrize("scheme", ["iid", "by-label", "dirichlet:0.5"])
def test_partition_is_disjoint_reproducible_and_complete(scheme):
    ds = load_digits(16)
    cfg = DataConfig(partition=scheme, num_clients=3, seed=1)
    a, b = partition(ds, cfg), partition(ds, cfg)
    total = sum(len(c.train_labels) + len(c.test_labels) for c in a)
    assert total == len(ds.labels)
    for ca, cb in zip(a, b):
        assert np.array_equal(ca.train_images, cb.train_images)
        assert len(ca.test_labels) > 0
    if scheme == "by-label":
        sets = [set(c.classes) for c in a]
        assert not (sets[0] & sets[1]) and not (sets[1] & sets[2]) and not (sets[0] & sets[2])
    other = partition(ds, DataConfig(partition=scheme, num_clients=3, seed=2))
    assert not np.array_equal(other[0].train_labels, a[0].train_labels)


def test_by_label_needs_enough_classes():
    ds = load_digits(16)
    with pytest.raises(DataError, match="at least 11 classes"):
        partition(ds, DataConfig(partition="by-label", num_clients=11))


def test_npz_roundtrip(tmp_path):
    rng = np.random.default_rng(0)
    p = tmp_path / "toy.npz"
    np.savez(p, train_images=rng.integers(0, 255, (20, 28, 28), dtype=np.uint8),
             train_labels=rng.integers(0, 3, (20, 1)), test_images=rng.integers(0, 255, (5, 28, 28), dtype=np.uint8),
             test_labels=rng.integers(0, 3, (5, 1)))
    ds = load_npz(str(p), 16)
    assert ds.images.shape == (25, 1, 16, 16) and ds.images.min() >= -1 and ds.images.max() <= 1
    assert load_dataset(str(p), 16).images.shape == ds.images.shape


@pytest.mark.parametrize("content,msg", [
    (b"not a zip", "not a readable .npz"),
    (None, "no '<split>_images'"),
])
def test_bad_npz(tmp_path, content, msg):
    p = tmp_path / "bad.npz"
    if content is None:
        np.savez(p, something=np.zeros(3))
    else:
        p.write_bytes(content)
    with pytest.raises(DataError, match=msg):
        load_npz(str(p))


def test_npz_object_arrays_are_refused(tmp_path):
    p = tmp_path / "pickle.npz"
    np.savez(p, train_images=np.array([object()], dtype=object), train_labels=np.zeros((1, 1)))
    with pytest.raises(DataError, match="pickle"):
        load_npz(str(p))


def test_image_folder(tmp_path):
    from PIL import Image

    for c in ("cat", "dog"):
        (tmp_path / c).mkdir()
        for i in range(3):
            Image.fromarray(np.full((10, 10), 40 * i, np.uint8)).save(tmp_path / c / f"{i}.png")
    (tmp_path / "dog" / "notes.txt").write_text("ignored")
    ds = load_image_folder(str(tmp_path), 16)
    assert ds.images.shape == (6, 1, 16, 16) and ds.class_names == ("cat", "dog")
    (tmp_path / "dog" / "broken.png").write_bytes(b"junk")
    with pytest.raises(DataError, match="cannot read image"):
        load_image_folder(str(tmp_path), 16)


def test_unknown_source():
    with pytest.raises(DataError, match="not found"):
        load_dataset("/nowhere/images")
