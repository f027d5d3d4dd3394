"""Metrics (docs/architecture.md): distances, the classifier feature space, disclosure and reconstruction scores."""
import dataclasses
import json
import math
import os

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist

from collafuse.data import Dataset, load_digits
from collafuse.errors import CheckpointError, ConfigError, DataError
from collafuse.metrics import (FeatureNet, FeatureNetConfig, FeatureStats, TorchScriptFeatures, disclosure_scores,
                               feature_stats, frechet_distance, frechet_distance_from_stats, get_feature_net,
                               kernel_distance, load_feature_extractor, mse, nearest_neighbour_distance,
                               nearest_neighbours, per_sample_mse, per_sample_psnr, psnr, quality_scores,
                               reconstruction_scores, train_feature_classifier)
from collafuse.metrics import extractors as extractors_mod


@pytest.fixture(scope="module")
def digits():
    return load_digits(16)


@pytest.fixture(scope="module")
def net(digits):
    return train_feature_classifier(digits.images, digits.labels, digits.num_classes, seed=0, epochs=4,
                                    progress=False)


def _small_dataset(digits, n=120):
    return Dataset(digits.images[:n], digits.labels[:n], 10, digits.class_names, "digits-small")


# ------------------------------------------------------------------------------ Fréchet distance


def test_fd_of_a_set_against_itself_is_zero():
    rng = np.random.default_rng(0)
    f = rng.standard_normal((400, 32)) @ rng.standard_normal((32, 32)) + 3.0
    assert frechet_distance(f, f) == pytest.approx(0.0, abs=1e-8)
    # fewer samples than dimensions: singular covariances must not break the square root
    g = rng.exponential(size=(20, 64))
    assert frechet_distance(g, g) == pytest.approx(0.0, abs=1e-8)


def test_fd_matches_closed_form_for_diagonal_gaussians():
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    s1, s2 = np.array([1.0, 2.0, 0.5]), np.array([2.0, 2.0, 1.5])
    a = FeatureStats(mu1, np.diag(s1 ** 2), 10)
    b = FeatureStats(mu2, np.diag(s2 ** 2), 10)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((s1 - s2) ** 2)
    assert frechet_distance_from_stats(a, b) == pytest.approx(expected, rel=1e-12)


def test_fd_agrees_with_scipy_sqrtm_formula():
    from scipy.linalg import sqrtm

    rng = np.random.default_rng(1)
    x = rng.standard_normal((300, 8))
    y = rng.standard_normal((300, 8)) * 1.5 + 0.3
    sx, sy = feature_stats(x), feature_stats(y)
    covmean = sqrtm(sx.cov @ sy.cov).real
    ref = np.sum((sx.mean - sy.mean) ** 2) + np.trace(sx.cov) + np.trace(sy.cov) - 2 * np.trace(covmean)
    assert frechet_distance(x, y) == pytest.approx(ref, rel=1e-9)


def test_fd_refuses_bad_features():
    with pytest.raises(DataError, match="features_a"):
        frechet_distance(np.zeros(5), np.zeros((5, 2)))
    with pytest.raises(DataError, match="features_b.*1 rows"):
        frechet_distance(np.zeros((5, 2)), np.zeros((1, 2)))
    with pytest.raises(DataError, match="feature size"):
        frechet_distance(np.zeros((5, 2)), np.zeros((5, 3)))
    with pytest.raises(DataError, match="NaN"):
        frechet_distance(np.full((5, 2), np.nan), np.zeros((5, 2)))


# ------------------------------------------------------------------------------- kernel distance


def test_kd_is_unbiased_for_identical_distributions():
    rng = np.random.default_rng(0)
    values = []
    for i in range(300):
        x = rng.standard_normal((40, 8))
        y = rng.standard_normal((40, 8))
        values.append(kernel_distance(x, y, num_subsets=1, subset_size=40, seed=i).mean)
    values = np.asarray(values)
    sem = values.std() / np.sqrt(len(values))
    assert abs(values.mean()) < 3 * sem
    assert (values < 0).any()  # an unbiased estimator of 0 must dip below it


def test_kd_detects_a_shift_and_reports_subsets():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 8))
    y = rng.standard_normal((300, 8)) + 1.0
    kd = kernel_distance(x, y, num_subsets=20, subset_size=100, seed=0)
    assert kd.mean > 5 * kd.std > 0
    assert (kd.num_subsets, kd.subset_size) == (20, 100)
    assert kernel_distance(x, y, num_subsets=20, subset_size=100, seed=0) == kd  # deterministic
    assert kernel_distance(x, y, num_subsets=3, subset_size=10_000).subset_size == 200
    assert set(kd.to_dict()) == {"mean", "std", "num_subsets", "subset_size"}
    with pytest.raises(ConfigError, match="subset_size"):
        kernel_distance(x, y, subset_size=1)
    with pytest.raises(ConfigError, match="num_subsets"):
        kernel_distance(x, y, num_subsets=0)


# ------------------------------------------------------------------------------- pixel metrics


def test_mse_and_psnr_on_known_pairs():
    a = np.zeros((2, 1, 2, 2), np.float32)
    b = a.copy()
    b[0] += 0.2  # MSE 0.04 → PSNR 10·log10(4 / 0.04) = 20 dB
    b[1] += 0.02  # MSE 4e-4 → 40 dB
    np.testing.assert_allclose(per_sample_mse(a, b), [0.04, 4e-4], rtol=1e-6)
    np.testing.assert_allclose(per_sample_psnr(a, b), [20.0, 40.0], rtol=1e-6)
    assert mse(a, b) == pytest.approx((0.04 + 4e-4) / 2, rel=1e-6)
    assert psnr(a, b) == pytest.approx(10 * math.log10(4 / 0.0202), rel=1e-6)
    assert psnr(a, b, data_range=1.0) == pytest.approx(10 * math.log10(1 / 0.0202), rel=1e-6)
    assert psnr(a, a) == math.inf
    with pytest.raises(DataError, match="same shape"):
        mse(a, b[:1])
    with pytest.raises(ConfigError, match="data_range"):
        psnr(a, b, data_range=0)


def test_nearest_neighbour_on_a_constructed_case():
    refs = np.stack([np.full((1, 2, 2), k, np.float64) for k in range(4)])  # image k is all k
    queries = np.stack([np.full((1, 2, 2), 2.2), np.full((1, 2, 2), -1.0), refs[3]])
    nn = nearest_neighbours(queries, refs)
    np.testing.assert_array_equal(nn.index, [2, 0, 3])
    np.testing.assert_allclose(nn.distance, [0.2 * 2, 1.0 * 2, 0.0], atol=1e-12)  # √4 pixels × offset
    assert nn.distance[2] == 0.0  # an exact copy is exactly 0, not round-off
    np.testing.assert_array_equal(nearest_neighbour_distance(queries, refs), nn.distance)
    with pytest.raises(DataError, match="per-sample shape"):
        nearest_neighbours(queries, refs[:, :, :1])
    with pytest.raises(DataError, match="references is empty"):
        nearest_neighbours(queries, refs[:0])


def test_nearest_neighbour_chunking_matches_brute_force():
    rng = np.random.default_rng(0)
    q = rng.standard_normal((37, 1, 4, 4)).astype(np.float32)
    r = rng.standard_normal((53, 1, 4, 4)).astype(np.float32)
    d = cdist(q.reshape(37, -1).astype(np.float64), r.reshape(53, -1).astype(np.float64))
    nn = nearest_neighbours(q, r, query_chunk=5, reference_chunk=7)
    np.testing.assert_array_equal(nn.index, d.argmin(1))
    np.testing.assert_allclose(nn.distance, d.min(1), rtol=1e-12)


# --------------------------------------------------------------------------- feature classifier


def test_feature_net_accuracy_on_digits(net):
    r = net.report
    print(f"\nfeature net: test accuracy {r.test_accuracy:.4f} on {r.num_test} held-out digits, "
          f"{r.train_seconds:.1f} s for {r.epochs} epochs")
    assert r.num_test > 300 and r.num_train + r.num_test == 1797
    assert r.test_accuracy >= 0.9
    assert sum(p.numel() for p in net.parameters()) < 300_000


def test_features_shape_dtype_and_input_checks(net, digits):
    f = net.features(digits.images[:10], batch_size=3)
    assert f.shape == (10, net.feature_dim) and f.dtype == np.float64
    # the batch size only changes float32 rounding
    np.testing.assert_allclose(f, net.features(digits.images[:10]), rtol=1e-4, atol=1e-4)
    assert net.features(digits.images[:0]).shape == (0, net.feature_dim)
    with pytest.raises(DataError, match="image shape"):
        net.features(np.zeros((2, 1, 8, 8), np.float32))
    with pytest.raises(DataError, match=r"\[N, C, H, W\]"):
        net.features(np.zeros((16, 16), np.float32))


def test_fd_grows_monotonically_with_added_noise(net, digits):
    rng = np.random.default_rng(0)
    real, other = digits.images[:800], digits.images[800:1600]
    real_f = net.features(real)
    fds = []
    for sigma in (0.0, 0.1, 0.2, 0.4, 0.8):
        noisy = other + sigma * rng.standard_normal(other.shape).astype(np.float32)
        fds.append(frechet_distance(net.features(noisy), real_f))
    assert all(a < b for a, b in zip(fds, fds[1:])), fds


def test_quality_scores(net, digits):
    real = digits.images[:600]
    same = quality_scores(digits.images[600:1200], real, net, num_subsets=10, subset_size=300)
    noisy = quality_scores(digits.images[600:1200] + 0.5 * np.random.default_rng(0).standard_normal((600, 1, 16, 16)),
                           real, net, real_features=net.features(real), num_subsets=10, subset_size=300)
    assert noisy.fd > same.fd and noisy.kd_mean > same.kd_mean
    assert abs(same.kd_mean) < noisy.kd_mean / 10
    assert same.to_dict()["num_real"] == 600


def test_save_load_round_trip(net, digits, tmp_path):
    weights, meta = net.save(str(tmp_path / "fn"))
    assert weights.endswith(".safetensors") and meta.endswith(".json")
    assert sorted(os.listdir(tmp_path)) == ["fn.json", "fn.safetensors"]  # no temp files left behind
    loaded = FeatureNet.load(str(tmp_path / "fn.safetensors"))
    assert loaded.config == net.config and loaded.report == net.report
    np.testing.assert_array_equal(loaded.features(digits.images[:50]), net.features(digits.images[:50]))
    assert isinstance(load_feature_extractor(str(tmp_path / "fn")), FeatureNet)


def test_load_refuses_corrupted_or_mismatched_files(net, tmp_path):
    weights, meta = net.save(str(tmp_path / "fn"))
    raw = bytearray(open(weights, "rb").read())
    raw[-5] ^= 0xFF
    open(weights, "wb").write(bytes(raw))
    with pytest.raises(CheckpointError, match="corrupted"):
        FeatureNet.load(weights)

    net.save(str(tmp_path / "fn"))
    doc = json.load(open(meta))
    doc["config"]["feature_dim"] = 64
    json.dump(doc, open(meta, "w"))
    with pytest.raises(CheckpointError, match="shape"):
        FeatureNet.load(weights)

    open(meta, "w").write("{not json")
    with pytest.raises(CheckpointError, match="not readable JSON"):
        FeatureNet.load(weights)
    with pytest.raises(CheckpointError, match="does not exist"):
        FeatureNet.load(str(tmp_path / "missing"))
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    with pytest.raises(CheckpointError, match="neither"):
        load_feature_extractor(str(tmp_path / "junk.pt"))


def test_feature_net_config_validation():
    with pytest.raises(ConfigError, match="image_shape"):
        FeatureNetConfig(image_shape=(1, 16))
    with pytest.raises(ConfigError, match="too small"):
        FeatureNetConfig(image_shape=(1, 2, 2))
    with pytest.raises(ConfigError, match="num_classes"):
        FeatureNetConfig(num_classes=0)


def test_training_refuses_bad_labels(digits):
    with pytest.raises(DataError, match="labels must lie in"):
        train_feature_classifier(digits.images[:20], digits.labels[:20] + 10, 10, progress=False)
    with pytest.raises(DataError, match="labels must be integers of shape"):
        train_feature_classifier(digits.images[:20], digits.labels[:19], 10, progress=False)


def test_cache_trains_once_then_reloads(digits, tmp_path, monkeypatch):
    ds = _small_dataset(digits)
    first = get_feature_net(ds, str(tmp_path), epochs=1, progress=False)
    assert first.report.dataset_key.startswith("digits-small-1x16x16-n120-")
    assert len(list(tmp_path.glob("*.safetensors"))) == 1

    def no_training(*a, **k):
        raise AssertionError("the cached feature net should have been reused")

    monkeypatch.setattr(extractors_mod, "train_feature_classifier", no_training)
    again = get_feature_net(ds, str(tmp_path), epochs=1, progress=False)
    np.testing.assert_array_equal(again.features(ds.images), first.features(ds.images))

    # different content → different key → trains again
    other = dataclasses.replace(ds, images=ds.images[::-1].copy())
    with pytest.raises(AssertionError, match="reused"):
        get_feature_net(other, str(tmp_path), epochs=1, progress=False)


def test_cache_retrains_a_corrupted_entry(digits, tmp_path):
    ds = _small_dataset(digits)
    get_feature_net(ds, str(tmp_path), epochs=1, progress=False)
    (weights,) = tmp_path.glob("*.safetensors")
    weights.write_bytes(b"garbage")
    net = get_feature_net(ds, str(tmp_path), epochs=1, progress=False)
    assert isinstance(net, FeatureNet)
    assert FeatureNet.load(str(weights)).report == net.report  # the entry was rewritten


class _PixelFeatures(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)[:, :10] * 2.0


def test_user_supplied_torchscript_network(digits, tmp_path):
    path = str(tmp_path / "features.pt")
    torch.jit.save(torch.jit.script(_PixelFeatures()), path)
    ext = get_feature_net(_small_dataset(digits), str(tmp_path / "cache"), user_file=path)
    assert isinstance(ext, TorchScriptFeatures)
    f = ext.features(digits.images[:5], batch_size=2)
    np.testing.assert_allclose(f, digits.images[:5].reshape(5, -1)[:, :10] * 2.0, rtol=1e-6)
    assert not os.path.exists(tmp_path / "cache")  # nothing was trained

    class Bad(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    bad = str(tmp_path / "bad.pt")
    torch.jit.save(torch.jit.script(Bad()), bad)
    with pytest.raises(CheckpointError, match=r"\[B, D\]"):
        get_feature_net(_small_dataset(digits), str(tmp_path), user_file=bad)


def test_user_supplied_feature_net_must_fit_the_images(net, tmp_path):
    net.save(str(tmp_path / "fn"))
    ds = Dataset(np.zeros((4, 1, 8, 8), np.float32), np.zeros(4, np.int64), 10, tuple("0123456789"), "small")
    with pytest.raises(CheckpointError, match="expects images of shape"):
        get_feature_net(ds, str(tmp_path), user_file=str(tmp_path / "fn.json"))


# -------------------------------------------------------------------------------- disclosure


def test_disclosure_falls_as_more_noise_hides_the_images(net, digits):
    rng = np.random.default_rng(0)
    client = digits.images[:400]
    client_f = net.features(client)
    scores = []
    for sigma in (0.0, 0.3, 1.0):
        seen = client + sigma * rng.standard_normal(client.shape).astype(np.float32)
        scores.append(disclosure_scores(seen, client, net, paired=True, client_features=client_f,
                                        num_subsets=10, subset_size=200))
    full = scores[0]
    assert full.paired_mse == 0.0 and full.nn_mse == 0.0 and full.fd == pytest.approx(0.0, abs=1e-6)
    # subsets of one set share points, so KD(set, itself) dips below 0 — still the minimum
    for a, b in zip(scores, scores[1:]):
        assert b.kd_mean > a.kd_mean and b.paired_mse > a.paired_mse and b.nn_mse > a.nn_mse
    assert scores[1].paired_mse == pytest.approx(0.09, rel=0.05)
    d = scores[1].to_dict()
    assert d["mse"] == d["paired_mse"] and d["num_seen"] == 400

    unpaired = disclosure_scores(client[:100] + 0.3, client[100:], net, num_subsets=5)
    assert unpaired.paired_mse is None and unpaired.mse == unpaired.nn_mse > 0
    with pytest.raises(DataError, match="paired=True"):
        disclosure_scores(client[:10], client[:20], net, paired=True)
    with pytest.raises(DataError, match="image shape"):
        disclosure_scores(client[:10], np.zeros((10, 1, 8, 8)), net)


def test_reconstruction_scores(digits):
    true = digits.images[:50]
    exact = reconstruction_scores(true.copy(), true)
    assert exact.psnr_paired == math.inf and exact.nn_distance_mean == 0.0 and exact.nn_match_rate == 1.0

    recon = true + 0.1  # every pixel off by 0.1 → MSE 0.01 → 10·log10(4/0.01) dB
    s = reconstruction_scores(recon, true)
    assert s.mse_paired == pytest.approx(0.01, rel=1e-5)
    assert s.psnr_paired == pytest.approx(10 * math.log10(400), rel=1e-5)
    assert s.nn_distance_mean <= 0.1 * 16 + 1e-6  # the own source is at distance 0.1·√256
    assert 0 <= s.nn_match_rate <= 1
    assert set(s.to_dict()) >= {"psnr_paired", "nn_distance_mean", "nn_match_rate"}

    unpaired = reconstruction_scores(recon[:10], true, paired=False)
    assert unpaired.psnr_paired is None and unpaired.nn_match_rate is None and unpaired.num_true == 50
    with pytest.raises(DataError, match="paired=True"):
        reconstruction_scores(recon[:10], true)
    with pytest.raises(ConfigError, match="data_range"):
        reconstruction_scores(recon, true, data_range=-1)
