"""collafuse privacy: the closed-form posterior, the attacks on sets whose answer is known, the
recommendation logic, and the command on the digits, a user .npz and an image folder
(docs/privacy.md)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from collafuse.cli import main
from collafuse.errors import ConfigError
from collafuse.privacy import (Target, auc, bayes_leakage, effective_alpha_bar, kmeans, link_attack, linear_estimate,
                               log_posterior, planned_counts, posterior_attack, recommend, verdict)


def test_log_posterior_is_the_normalised_gaussian_likelihood():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(5, 3))
    y = rng.normal(size=(4, 3))
    a, v = 0.7, 0.4
    lp = log_posterior(y, X, a, v).numpy()
    # direct: Gaussian densities of y around a·x_i, normalised over i
    dens = np.exp(-((y[:, None, :] - a * X[None]) ** 2).sum(-1) / (2 * v))
    assert np.allclose(np.exp(lp), dens / dens.sum(1, keepdims=True), atol=1e-12)
    # per-observation noise levels
    lp2 = log_posterior(y, X, np.array([a, a, 0.5, 0.5]), np.array([v, v, 0.75, 0.75])).numpy()
    assert np.allclose(lp2[:2], lp[:2])
    # stable at the extremes: nearly clean → one-hot on the nearest candidate; pure noise → uniform
    near = log_posterior(X[[2]] + 1e-3, X, 1.0, 1e-10)
    assert torch.isfinite(near).all() and int(near.argmax()) == 2 and float(near.max()) == pytest.approx(0.0)
    assert np.allclose(log_posterior(y, X, 0.0, 1.0).exp().numpy(), 0.2)
    # posterior mean = Σ p_i x_i
    att = posterior_attack(y, X, a, v, chunk=3)
    assert np.allclose(att.mean, np.exp(lp) @ X) and np.array_equal(att.argmax, lp.argmax(1))


def _phi(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def test_auc_counts_ties_half():
    assert auc(np.array([3.0, 4.0]), np.array([1.0, 2.0])) == 1.0
    assert auc(np.array([1.0]), np.array([1.0])) == 0.5
    assert auc(np.array([2.0, 0.0]), np.array([1.0, 1.0])) == 0.5


def test_reidentification_of_two_candidates_matches_the_closed_form():
    """Candidates ±m in one pixel: the Bayes attack picks the right one with probability Φ(√ᾱ·m/√(1-ᾱ))."""
    m, ab = 0.5, 0.2
    X = np.array([[[[m]]], [[[-m]]]])
    r = bayes_leakage(X, X, ab, 1, draws=4000, seed=0)
    exact = _phi(math.sqrt(ab) * m / math.sqrt(1 - ab))
    assert r["reid"] == pytest.approx(exact, abs=0.02) and r["chance"] == 0.5
    # n linked copies act like one disclosure at ᾱ_eff
    r16 = bayes_leakage(X, X, ab, 16, draws=4000, seed=1)
    ab16 = effective_alpha_bar(ab, 16)
    assert r16["reid"] == pytest.approx(_phi(math.sqrt(ab16) * m / math.sqrt(1 - ab16)), abs=0.02)
    assert r16["reid"] > r["reid"] + 0.2


def test_effective_alpha_bar_is_what_averaging_gives():
    ab, n = 0.026, 200
    assert effective_alpha_bar(ab, 1) == pytest.approx(ab)
    assert effective_alpha_bar(ab, n) == pytest.approx(0.842, abs=1e-3)  # c = 0.6, 200 copies: nearly clean
    assert effective_alpha_bar(ab, 0) == 0.0 and effective_alpha_bar(1.0, 3) == 1.0
    g = torch.Generator().manual_seed(0)
    x = 0.8
    ybar = (math.sqrt(ab) * x + math.sqrt(1 - ab) * torch.randn(20000, n, generator=g, dtype=torch.float64)).mean(1)
    e = effective_alpha_bar(ab, n)
    rescaled = ybar * math.sqrt(e / ab)  # = sqrt(ᾱ_eff)·x + sqrt(1-ᾱ_eff)·z
    assert float(rescaled.mean()) == pytest.approx(math.sqrt(e) * x, abs=0.01)
    assert float(rescaled.var()) == pytest.approx(1 - e, rel=0.05)


def test_linear_estimate_is_the_gaussian_posterior_mean():
    y = np.array([[1.0, -2.0]])
    est = linear_estimate(y, 0.5, 0.75, np.array([0.0, 1.0]), np.array([1.0, 4.0]))
    # x ~ N(m, s²), y = a x + √v z → E[x|y] = m + a s²/(a² s² + v)·(y - a m)
    assert np.allclose(est, [[0 + 0.5 / 1.0 * 1.0, 1 + 2.0 / 1.75 * (-2.5)]])


def test_kmeans_recovers_separated_clusters():
    rng = np.random.default_rng(0)
    centres = rng.normal(scale=10, size=(6, 8))
    lab = np.repeat(np.arange(6), 30)
    y = centres[lab] + rng.normal(scale=0.1, size=(180, 8))
    got = kmeans(y, 6, seed=0)
    # a perfect clustering up to renaming: each true cluster maps to one found cluster
    assert all(len(np.unique(got[lab == c])) == 1 for c in range(6)) and len(np.unique(got)) == 6


def test_linking_works_when_copies_are_clean_and_fails_in_noise():
    rng = np.random.default_rng(1)
    X = rng.choice([-1.0, 1.0], size=(24, 1, 4, 4))
    P = rng.choice([-1.0, 1.0], size=(24, 1, 4, 4))
    easy = link_attack(X, P, None, 0.95, 8, 16, seed=0)
    hard = link_attack(X, P, None, 0.002, 8, 16, seed=0)
    assert easy["link_purity"] > 0.95 and easy["reid"] > 0.95
    assert hard["link_purity"] < 0.5 and hard["reid"] < 0.3
    # perfect links are the bound: never worse than the measured linker
    assert hard["oracle"]["reid"] >= hard["reid"] - 0.1
    assert easy["uploads"] == math.ceil(8 * 24 / 16) * 16  # whole batches, as the trainer sends them


def test_planned_counts_are_the_trainers_draws():
    c = planned_counts(100, 30, 8, seed=0)
    assert c.sum() == 240 and c.shape == (100,)
    g = torch.Generator().manual_seed(0)
    ref = torch.bincount(torch.randint(100, (240,), generator=g), minlength=100).numpy()
    assert np.array_equal(c, ref)


def _row(c, reid, psnr):
    return {"cut_ratio": c, "reid": reid, "chance": 0.01, "psnr_site_prior": psnr, "psnr_population_prior": psnr - 1,
            "psnr_linear": psnr - 2}


def test_recommend_takes_the_smallest_cut_that_stays_within_the_target():
    t = Target(2.0, 15.0)
    rows = [_row(0.2, 0.9, 30), _row(0.4, 0.05, 16), _row(0.5, 0.015, 14.9), _row(0.6, 0.01, 14), _row(0.8, 0.01, 13)]
    assert recommend(rows, t) == 0.5
    assert recommend(list(reversed(rows)), t) == 0.5  # order does not matter
    # a lucky pass below a failing cut is not offered
    rows2 = [_row(0.3, 0.01, 14), _row(0.4, 0.05, 16), _row(0.6, 0.01, 14)]
    assert recommend(rows2, t) == 0.6
    assert recommend([_row(0.9, 0.05, 14)], t) is None  # re-identification above 2× chance
    assert recommend([_row(0.9, 0.01, 15.5)], t) is None  # PSNR above the target
    assert Target(2.0).resolve(13.5).max_psnr == 14.5  # default: the no-disclosure PSNR + 1 dB
    assert Target(2.0, 20.0).resolve(13.5).max_psnr == 20.0
    with pytest.raises(AssertionError):
        Target().meets(rows[0])


@pytest.fixture(scope="module")
def digits_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("privacy")
    rc = main(["privacy", "--data", "digits", "--max-images", "400", "--cut-ratios", "0.2,0.6,0.9",
               "--link-cuts", "0.2", "--link-copies", "1,8", "--link-images", "48", "--steps", "200",
               "--batch-size", "16", "--threads", "1", "--out", str(out)])
    assert rc == 0
    return out, json.loads((out / "privacy.json").read_text())


def test_privacy_command_on_the_digits(digits_report, capsys):
    out, rep = digits_report
    assert (out / "privacy_vs_cut.png").stat().st_size > 1000 and (out / "privacy_vs_copies.png").exists()
    rows = {r["cut_ratio"]: r for r in rep["rows"]}
    assert rep["num_train"] == 320 and rep["num_population"] == 80
    # leakage falls with the cut; c = 0.2 is far from safe on the digits
    assert rows[0.2]["single"]["reid"] > 0.5 > rows[0.6]["single"]["reid"]
    # repeated fresh copies, perfectly linked, leak more than one disclosure
    assert rows[0.6]["run"]["reid"] > rows[0.6]["single"]["reid"]
    assert rep["planned_run"]["copies_mean"] == pytest.approx(200 * 16 / 320)
    assert rep["recommended_cut"]["one_disclosure"] in (0.6, 0.9, None)
    assert rep["linking"][0]["cut_ratio"] == 0.2 and rep["linking"][1]["copies"] == 8
    ok, line = verdict(rep, 0.2, planned=False)
    assert not ok and "UNSAFE" in line


def test_privacy_command_on_a_user_npz_and_an_image_folder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, size=(60, 8, 8), dtype=np.uint8)
    np.savez(tmp_path / "site.npz", train_images=imgs, train_labels=rng.integers(0, 3, size=(60, 1)))
    folder = tmp_path / "folder"
    for i, im in enumerate(imgs[:30]):
        (folder / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(im).save(folder / f"c{i % 2}" / f"{i}.png")
    for data in (str(tmp_path / "site.npz"), str(folder)):
        out = tmp_path / ("out_" + data.split("/")[-1])
        rc = main(["privacy", "--data", data, "--image-size", "8", "--cut-ratios", "0.3,0.9", "--link-cuts", "none",
                   "--steps", "10", "--batch-size", "8", "--threads", "1", "--out", str(out)])
        assert rc == 0
        rep = json.loads((out / "privacy.json").read_text())
        assert rep["image_shape"] == [1, 8, 8] and len(rep["rows"]) == 2 and rep["linking"] == []


@pytest.mark.parametrize("flags, words", [
    (["--cut-ratios", "0.2,1.5"], "cut ratio"),
    (["--cut-ratios", "a,b"], "comma-separated"),
    (["--holdout", "0"], "--holdout"),
    (["--steps", "0"], "--steps"),
    (["--max-reid-factor", "0.5"], "--max-reid-factor"),
    (["--max-psnr", "nan"], "--max-psnr"),
    (["--data", "/nonexistent.npz"], "not found|No such|exist"),
])
def test_privacy_command_refuses_bad_input(tmp_path, capsys, flags, words):
    rc = main(["privacy", "--out", str(tmp_path / "o"), "--link-cuts", "none", *flags])
    assert rc == 2
    import re

    assert re.search(words, capsys.readouterr().err)
    assert not (tmp_path / "o").exists()


def test_config_validation_messages():
    from collafuse.privacy import PrivacyConfig

    with pytest.raises(ConfigError, match="--link-images"):
        PrivacyConfig(link_images=0)
    with pytest.raises(ConfigError, match="--disclose"):
        PrivacyConfig(disclose="sometimes")


def test_the_trained_server_attack_does_not_beat_the_bayes_attack(tmp_path):
    """On the same disclosed x_h of the digits, the server's own reconstructions (its DDIM chain
    and its one-call Tweedie estimate, as `collafuse evaluate` runs them) and a naive inversion
    never beat the Bayes-optimal attack with the training images as candidates."""
    from tiny_runs import tiny_run_config

    from collafuse.checkpoint import load_run
    from collafuse.data import load_dataset, partition
    from collafuse.evaluate import server_reconstruction
    from collafuse.metrics.disclosure import bayes_reconstruction_scores, reconstruction_scores
    from collafuse.objectives import disclose
    from collafuse.train import train

    cfg = tiny_run_config(steps=2, cut_ratios=(0.2, 0.4, 0.6), checkpoint_every=2)
    train(cfg, str(tmp_path / "run"), progress=False)
    run = load_run(str(tmp_path / "run"), device="cpu")
    truths = partition(load_dataset("digits", 16), cfg.data)
    gen = torch.Generator().manual_seed(0)
    for client, truth in enumerate(truths):
        x0, y0 = truth.train_images[:60], truth.train_labels[:60]
        k = cfg.client_levels[client]
        d = disclose(client, torch.from_numpy(x0), torch.from_numpy(y0), k, run.schedule, "exact", gen, True)
        ab = float(run.schedule.alpha_bar(np.array([d.level]))[0])
        bayes = bayes_reconstruction_scores(d.x.numpy(), x0, ab)
        chain, tweedie = server_reconstruction(run, d.x, d.level, y0, 4, "ddim", 0)
        naive = np.clip(d.x.numpy() / math.sqrt(ab), -1, 1)
        for rec in (chain.numpy(), tweedie.numpy(), naive):
            s = reconstruction_scores(rec, x0)
            assert bayes.psnr_paired >= s.psnr_paired and bayes.nn_match_rate >= s.nn_match_rate, (client, s, bayes)


def test_disclose_once_makes_the_planned_run_one_disclosure():
    from collafuse.privacy import PrivacyConfig, privacy_report

    rep = privacy_report(PrivacyConfig(max_images=200, cut_ratios=(0.4, 0.7), link_cuts=(), steps=100, batch_size=16,
                                       disclose="once"), progress=False)
    assert rep["planned_run"]["copies_mean"] == 1.0
    for r in rep["rows"]:
        assert r["run"]["reid"] == r["single"]["reid"] and r["run"]["psnr_linear"] == r["single"]["psnr_linear"]
    assert rep["recommended_cut"]["one_disclosure"] == rep["recommended_cut"]["planned_run"]
