"""Privacy a site can check before it discloses anything (docs/privacy.md).

Run locally on the site's own images; nothing leaves the machine. For each cut ratio c the site
would disclose ``x_h = sqrt(ᾱ_h)·x0 + sqrt(1-ᾱ_h)·ε`` (h = round(c·T) - 1). Three attacks:

* **One disclosure, Bayes-optimal.** An attacker who knows the schedule and holds the site's
  training set as candidates (the worst case: "is this patient's scan in there, and which
  upload is it?") computes the exact posterior
  ``p(i | y) ∝ exp(-‖y - sqrt(ᾱ)·x_i‖² / (2(1-ᾱ)))`` over the N candidates, in log space with
  logsumexp. Re-identification = the posterior argmax is the source (chance 1/N); the posterior
  mean is the best reconstruction under that prior (PSNR). The same disclosures attacked with a
  **held-out population** as the prior (an attacker with similar public data, not the site's)
  give the PSNR of what is *reconstructable* without knowing the images, and the posterior's
  confidence on held-out versus member disclosures gives a membership AUC (*recognisable*).
* **Repeated disclosure, perfect linking (the bound).** Training sends a fresh copy of an image
  every time it is drawn. n copies averaged are one disclosure at
  ``ᾱ_eff = ᾱ·n/(ᾱ·n + 1-ᾱ)``; a planned run's per-image counts are simulated exactly as the
  trainer draws its batches (``torch.randint`` per step, with replacement).
* **Repeated disclosure, measured linking.** The attacker sees the uploads of the site (batches
  as the trainer sends them, fresh noise per copy), knows the schedule, that the uploads are
  noisy copies of a fixed set of N images drawn with replacement, and N itself (and with label
  sharing, each upload's class and the count per class); it does not know the images. It links
  copies by k-means (k-means++ seeding, Lloyd; K = N, per class when labels are shared), averages each
  cluster and attacks the average as above with the cluster's size as n.

A cut meets the **target** when re-identification ≤ ``reid_factor`` × chance and the
reconstruction PSNR (the largest of the site-prior, population-prior and linear ones) ≤
``max_psnr`` dB (default: the no-disclosure guess — the mean image — plus 1 dB). The
recommended cut is the smallest in the grid that meets it, together with every larger cut.

    collafuse privacy --data digits --steps 3000 --batch-size 64 --out privacy-report
"""
from __future__ import annotations

import argparse
import math
import os
import time
from dataclasses import dataclass

import numpy as np
import torch

from collafuse_edge.files import atomic_write_json
from collafuse_edge.schedule import Schedule, handoff_level
from collafuse_edge.validation import check_number

from .errors import ConfigError, DataError
from .metrics.disclosure import PosteriorAttack, effective_alpha_bar, log_posterior, posterior_attack  # noqa: F401
from .privacy_once import DISCLOSE_MODES, check_disclose_mode

DEFAULT_CUTS = tuple(round(0.05 * i, 2) for i in range(1, 20))  # 0.05 … 0.95
DEFAULT_LINK_CUTS = (0.2, 0.4, 0.6, 0.8)
DEFAULT_LINK_COPIES = (1, 4, 16, 64, 256)
DEFAULT_REID_FACTOR = 2.0
DEFAULT_PSNR_MARGIN_DB = 1.0  # default PSNR target: the no-disclosure guess + this
DATA_RANGE = 2.0  # images in [-1, 1]
_MIN_VAR = 1e-12  # as in metrics.disclosure: a vanishing noise variance (c = 0)


# ------------------------------------------------------------------------------ posterior maths


def psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-pair PSNR in dB on the [-1, 1] scale (``inf`` for an exact match)."""
    mse = np.mean((np.asarray(a, np.float64).reshape(len(a), -1) - np.asarray(b, np.float64).reshape(len(b), -1)) ** 2, 1)
    with np.errstate(divide="ignore"):
        return 10.0 * np.log10(DATA_RANGE ** 2 / mse)


def _mean_psnr(a, b) -> float:
    """PSNR of the mean squared error over all pairs (dB), at most 100 dB (every pair exact)."""
    a = np.asarray(a, np.float64).reshape(len(a), -1)
    mse = float(np.mean((a - np.asarray(b, np.float64).reshape(len(a), -1)) ** 2))
    return min(100.0, 10.0 * math.log10(DATA_RANGE ** 2 / mse)) if mse > 0 else 100.0


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return 0.0, 1.0
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return max(0.0, c - h), min(1.0, c + h)


def linear_estimate(y, scale, var, mean: np.ndarray, pixel_var: np.ndarray) -> np.ndarray:
    """The per-pixel Wiener estimate of x from ``y = scale·x + sqrt(var)·z`` under a diagonal
    Gaussian prior (``mean``, ``pixel_var`` per pixel, e.g. of a population sample)."""
    yf = np.asarray(y, np.float64).reshape(len(y), -1)
    a = np.broadcast_to(np.asarray(scale, np.float64).reshape(-1), (len(yf),))[:, None]
    v = np.broadcast_to(np.asarray(var, np.float64).reshape(-1), (len(yf),))[:, None]
    m, s2 = mean.reshape(1, -1), pixel_var.reshape(1, -1)
    return m + (a * s2 / (a * a * s2 + np.maximum(v, _MIN_VAR))) * (yf - a * m)


def auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(score of a positive > score of a negative), ties counted half (Mann–Whitney)."""
    s = np.concatenate([np.asarray(pos, np.float64), np.asarray(neg, np.float64)])
    order = np.argsort(s, kind="mergesort")
    _, inv, counts = np.unique(s[order], return_inverse=True, return_counts=True)
    r = np.empty(len(s))
    r[order] = (np.cumsum(counts) - (counts - 1) / 2.0)[inv]  # average 1-based ranks of ties
    n1, n0 = len(pos), len(neg)
    return float((r[:n1].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


# ------------------------------------------------------------------------------ the attacks


def disclose_copies(images: np.ndarray, alpha_bar: float, copies, gen: torch.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The average of ``copies[i]`` fresh disclosures of each image, rescaled to one observation at
    ᾱ_eff: returns (y, scale = sqrt(ᾱ_eff), var = 1-ᾱ_eff), per image."""
    x = torch.as_tensor(images, dtype=torch.float64)
    n = np.broadcast_to(np.asarray(copies, dtype=np.float64), (len(x),))
    ab_eff = effective_alpha_bar(alpha_bar, n)
    z = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    a = torch.from_numpy(np.sqrt(ab_eff)).view(-1, *([1] * (x.dim() - 1)))
    s = torch.from_numpy(np.sqrt(1.0 - ab_eff)).view_as(a)
    return (a * x + s * z).numpy(), np.sqrt(ab_eff), 1.0 - ab_eff


def bayes_leakage(train: np.ndarray, population: np.ndarray, alpha_bar: float, copies=1, *,
                  draws: int = 1, seed: int = 0) -> dict:
    """The Bayes-optimal attack on each training image observed at ``alpha_bar`` (``copies[i]``
    perfectly linked copies of image i; 1 = one disclosure), ``draws`` noise draws each.

    Returns re-identification (rate, 95 % Wilson interval, chance), the posterior-mean PSNR with
    the site's training set as the prior and with the held-out ``population`` as the prior, the
    no-disclosure PSNR (the mean image), and the membership AUC (posterior confidence on the
    training images' disclosures against held-out images' disclosures)."""
    gen = torch.Generator().manual_seed(int(seed))
    X, P = np.asarray(train, np.float64), np.asarray(population, np.float64)
    N = len(X)
    n = np.broadcast_to(np.asarray(copies, dtype=np.float64), (N,))
    pm, pv = P.reshape(len(P), -1).mean(0), P.reshape(len(P), -1).var(0)
    # all draws in one batch of observations: image i's d-th draw is row d·N + i
    y, a, v = disclose_copies(np.concatenate([X] * draws), alpha_bar, np.tile(n, draws), gen)
    truth = np.tile(np.arange(N), draws)
    site = posterior_attack(y, X, a, v)
    Xd = X[truth]
    hits = int(np.sum(site.argmax == truth))
    ps_site = _mean_psnr(site.mean, Xd)
    ps_pop = _mean_psnr(posterior_attack(y, P, a, v).mean, Xd)
    ps_lin = _mean_psnr(linear_estimate(y, a, v, pm, pv), Xd)
    conf_in = site.max_prob
    nmean = float(np.mean(n))
    yp, ap, vp = disclose_copies(P, alpha_bar, max(nmean, 0.0), gen)
    conf_out = posterior_attack(yp, X, ap, vp).max_prob
    lo, hi = wilson_interval(hits, N * draws)
    return {
        "alpha_bar": float(alpha_bar),
        "copies_mean": nmean,
        "alpha_bar_eff": float(effective_alpha_bar(alpha_bar, nmean)),
        "reid": hits / (N * draws), "reid_ci95": [lo, hi], "chance": 1.0 / N,
        "psnr_site_prior": ps_site, "psnr_population_prior": ps_pop, "psnr_linear": ps_lin,
        "psnr_no_disclosure": _mean_psnr(np.broadcast_to(X.mean(0), X.shape), X),
        "membership_auc": auc(conf_in, conf_out),
        "num_train": N, "num_population": int(len(P)), "draws": int(draws),
    }


def planned_counts(num_images: int, steps: int, batch_size: int, seed: int = 0) -> np.ndarray:
    """How often each image is disclosed in a run of ``steps`` × ``batch_size`` uploads drawn the
    way the trainers draw them (``torch.randint`` per step, with replacement)."""
    gen = torch.Generator().manual_seed(int(seed))
    counts = torch.zeros(num_images, dtype=torch.long)
    per = max(1, 2**22 // max(batch_size, 1))  # steps per vectorised chunk
    done = 0
    while done < steps:
        s = min(per, steps - done)
        idx = torch.randint(num_images, (s * batch_size,), generator=gen)
        counts += torch.bincount(idx, minlength=num_images)
        done += s
    return counts.numpy()


def simulate_uploads(num_images: int, copies: float, batch_size: int, gen: torch.Generator) -> np.ndarray:
    """Source index of every upload of a run sending ``copies`` × N disclosures on average, in
    batches of ``batch_size`` drawn as the trainer draws them."""
    steps = max(1, math.ceil(copies * num_images / batch_size))
    return torch.cat([torch.randint(num_images, (batch_size,), generator=gen) for _ in range(steps)]).numpy()


def kmeans(y: np.ndarray, k: int, seed: int = 0, max_iter: int = 30) -> np.ndarray:
    """Cluster labels ``[M]`` of rows ``y`` ``[M, D]`` into ``k`` clusters: k-means++ seeding, then
    Lloyd iterations until no label changes (or ``max_iter``), in torch float32 with distances as
    one matmul per iteration. (scikit-learn's KMeans gives the same clustering but its greedy
    k-means++ took 82 s for 16 k uploads × 256 clusters on 2 cores; this takes a few.)"""
    if k >= len(y):
        return np.arange(len(y))
    g = torch.Generator().manual_seed(int(seed))
    x = torch.as_tensor(np.asarray(y, np.float32))
    sq = (x * x).sum(1)
    first = int(torch.randint(len(x), (1,), generator=g))
    centres = [first]
    d2 = (sq - 2 * x @ x[first] + sq[first]).clamp_min(0)
    for _ in range(1, k):
        nxt = int(torch.multinomial(d2 / d2.sum() if float(d2.sum()) > 0 else torch.ones_like(d2), 1, generator=g))
        centres.append(nxt)
        d2 = torch.minimum(d2, (sq - 2 * x @ x[nxt] + sq[nxt]).clamp_min(0))
    c = x[centres].clone()
    labels = None
    for _ in range(max_iter):
        dist = (c * c).sum(1)[None, :] - 2 * x @ c.T
        new = dist.argmin(1)
        if labels is not None and torch.equal(new, labels):
            break
        labels = new
        cnt = torch.bincount(labels, minlength=k).to(x.dtype)
        s = torch.zeros_like(c).index_add_(0, labels, x)
        keep = cnt > 0
        c[keep] = s[keep] / cnt[keep, None]
    return labels.numpy()


def link_attack(train: np.ndarray, population: np.ndarray, labels: np.ndarray | None, alpha_bar: float,
                copies: float, batch_size: int, *, seed: int = 0, max_iter: int = 30) -> dict:
    """The measured repeated-disclosure attack on a site holding ``train`` (module docstring).

    Uploads are simulated as the trainer sends them; k-means links them (within each class when
    ``labels`` are given, i.e. the server sees labels); each cluster's mean is attacked as
    ``size`` linked copies. Scores: link purity (share of uploads whose cluster's majority source
    is their own), and per upload the re-identification and the PSNR of its cluster's
    reconstruction against its source, next to the same uploads with perfect links."""
    gen = torch.Generator().manual_seed(int(seed))
    X = np.asarray(train, np.float64).reshape(len(train), -1)
    P = np.asarray(population, np.float64).reshape(len(population), -1)
    N = len(X)
    src = simulate_uploads(N, copies, batch_size, gen)
    z = torch.randn((len(src), X.shape[1]), generator=gen, dtype=torch.float64).numpy()
    y = math.sqrt(alpha_bar) * X[src] + math.sqrt(1.0 - alpha_bar) * z
    cluster = np.empty(len(src), dtype=np.int64)
    groups = [np.arange(len(src))] if labels is None else [np.flatnonzero(labels[src] == c) for c in np.unique(labels)]
    off = 0
    for g in groups:
        if len(g) == 0:
            continue
        k = N if labels is None else int(np.sum(labels == labels[src[g[0]]]))
        cluster[g] = off + kmeans(y[g], k, seed, max_iter)
        off += k
    ids, cluster = np.unique(cluster, return_inverse=True)
    C = len(ids)
    size = np.bincount(cluster, minlength=C).astype(np.float64)
    ybar = np.zeros((C, X.shape[1]))
    np.add.at(ybar, cluster, y)
    ybar /= size[:, None]
    # the cluster's mean of `size` copies, rescaled to one observation at ᾱ_eff(size)
    ab_eff = effective_alpha_bar(alpha_bar, size)
    obs = ybar * (np.sqrt(ab_eff) / math.sqrt(alpha_bar))[:, None]
    site = posterior_attack(obs, X, np.sqrt(ab_eff), 1.0 - ab_eff)
    pop = posterior_attack(obs, P, np.sqrt(ab_eff), 1.0 - ab_eff)
    # majority source of each cluster; purity over uploads
    pair = cluster * N + src
    cnt = np.bincount(pair, minlength=C * N).reshape(C, N)
    majority = cnt.argmax(1)
    purity = float(np.mean(majority[cluster] == src))
    # scored per upload (the attacker's claim for each upload against its true source): choosing,
    # per image, the cluster that happens to hold most of its copies would use the ground truth
    recon_lin = linear_estimate(obs, np.sqrt(ab_eff), 1.0 - ab_eff, P.mean(0), P.var(0))
    reid = float(np.mean(site.argmax[cluster] == src))
    psnr_site = _mean_psnr(site.mean[cluster], X[src])
    psnr_pop = _mean_psnr(pop.mean[cluster], X[src])
    psnr_lin = _mean_psnr(recon_lin[cluster], X[src])
    # the same uploads with perfect links: image i observed as counts[i] averaged copies
    counts = np.bincount(src, minlength=N)
    yo, ao, vo = disclose_copies(X, alpha_bar, counts, gen)
    site_o = posterior_attack(yo, X, ao, vo)
    oracle = {"alpha_bar_eff": float(effective_alpha_bar(alpha_bar, float(np.mean(counts)))),
              "reid": float(np.mean(site_o.argmax[src] == src)),
              "psnr_site_prior": _mean_psnr(site_o.mean[src], X[src]),
              "psnr_population_prior": _mean_psnr(posterior_attack(yo, P, ao, vo).mean[src], X[src]),
              "psnr_linear": _mean_psnr(linear_estimate(yo, ao, vo, P.mean(0), P.var(0))[src], X[src]),
              "psnr_no_disclosure": _mean_psnr(np.broadcast_to(X.mean(0), X.shape), X)}
    return {
        "alpha_bar": float(alpha_bar), "copies_mean": float(len(src) / N), "uploads": int(len(src)),
        "num_images": N, "labels_known": labels is not None,
        "link_purity": purity, "clusters": int(C),
        "reid": reid, "chance": 1.0 / N,
        "psnr_site_prior": psnr_site, "psnr_population_prior": psnr_pop, "psnr_linear": psnr_lin,
        "images_sent": int(np.sum(counts > 0)), "oracle": oracle,
    }


# ------------------------------------------------------------------------------ the report


def worst_psnr_of(row: dict) -> float:
    """The best reconstruction any of the attacks made (dB)."""
    return max(row["psnr_site_prior"], row["psnr_population_prior"], row["psnr_linear"])


@dataclass(frozen=True)
class Target:
    """What a site accepts: re-identification ≤ ``reid_factor`` × chance and PSNR ≤ ``max_psnr`` dB."""

    reid_factor: float = DEFAULT_REID_FACTOR
    max_psnr: float | None = None  # None: the no-disclosure PSNR + DEFAULT_PSNR_MARGIN_DB

    def resolve(self, psnr_no_disclosure: float) -> "Target":
        if self.max_psnr is not None:
            return self
        return Target(self.reid_factor, round(psnr_no_disclosure + DEFAULT_PSNR_MARGIN_DB, 2))

    def meets(self, row: dict) -> bool:
        assert self.max_psnr is not None, "resolve() the target first"
        worst_psnr = worst_psnr_of(row)
        return row["reid"] <= self.reid_factor * row["chance"] and worst_psnr <= self.max_psnr


def recommend(rows: list[dict], target: Target) -> float | None:
    """The smallest cut ratio whose row — and every row at a larger cut — meets ``target``
    (a cut that passes only by the luck of the noise draw below a failing one is not offered).
    None when even the largest cut in the grid fails."""
    ordered = sorted(rows, key=lambda r: r["cut_ratio"])
    best = None
    for r in reversed(ordered):
        if not target.meets(r):
            break
        best = r["cut_ratio"]
    return best


@dataclass(frozen=True)
class PrivacyConfig:
    data: str = "digits"
    image_size: int = 16
    holdout: float = 0.2  # share of the site's images held out as the "population"
    max_images: int | None = None
    cut_ratios: tuple[float, ...] = DEFAULT_CUTS
    timesteps: int = 1000
    beta_schedule: str = "linear"
    steps: int = 3000  # the planned run
    batch_size: int = 64  # disclosures per step (train --batch-size / client-train --upload-batch)
    disclose: str = "fresh"
    target: Target = Target()
    draws: int = 2
    link_cuts: tuple[float, ...] = DEFAULT_LINK_CUTS
    link_copies: tuple[float, ...] = DEFAULT_LINK_COPIES
    link_images: int = 256
    labels_shared: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        from collafuse_edge.validation import check_int

        for flag, cuts in (("--cut-ratios", self.cut_ratios), ("--link-cuts", self.link_cuts)):
            for c in cuts:
                check_number(f"{flag}: a cut ratio", c, low=0.0, high=1.0, error=ConfigError)
        if not self.cut_ratios:
            raise ConfigError("--cut-ratios needs at least one value in [0, 1]")
        if not (0.0 < self.holdout < 1.0):
            raise ConfigError(f"--holdout must lie in (0, 1), got {self.holdout}; the held-out images are the "
                              "population the attacks are compared against")
        for name in ("steps", "batch_size", "draws", "link_images", "timesteps", "image_size"):
            check_int(f"--{name.replace('_', '-')}", getattr(self, name), low=1, error=ConfigError)
        if self.max_images is not None:
            check_int("--max-images", self.max_images, low=4, error=ConfigError)
        for n in self.link_copies:
            check_number("--link-copies", n, low=1.0, error=ConfigError)
        check_number("--max-reid-factor", self.target.reid_factor, low=1.0, error=ConfigError)
        check_disclose_mode(self.disclose)


def _split(images: np.ndarray, labels: np.ndarray, holdout: float, seed: int, max_images: int | None):
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(images))
    if max_images is not None:
        order = order[:max_images]
    n_out = max(1, int(round(holdout * len(order))))
    if len(order) - n_out < 2:
        raise DataError(f"{len(order)} images leave fewer than 2 training images after holding out {n_out}; "
                        "use more images or a smaller --holdout")
    out, tr = order[:n_out], order[n_out:]
    return images[tr], labels[tr], images[out]


def privacy_report(cfg: PrivacyConfig, progress: bool = True) -> dict:
    """Every attack for every cut in ``cfg``; a JSON-ready dict (see docs/privacy.md)."""
    from tqdm.auto import tqdm

    from .data import load_dataset

    t0 = time.perf_counter()
    ds = load_dataset(cfg.data, cfg.image_size)
    X, y_lab, P = _split(ds.images, ds.labels, cfg.holdout, cfg.seed, cfg.max_images)
    sched = Schedule.create(cfg.timesteps, cfg.beta_schedule)
    T = sched.T
    counts = planned_counts(len(X), cfg.steps, cfg.batch_size, cfg.seed)
    run_counts = np.minimum(counts, 1) if cfg.disclose == "once" else counts
    rows = []
    for c in tqdm(sorted(set(cfg.cut_ratios)), desc="privacy: cuts", disable=not progress):
        h = handoff_level(c, T)
        row: dict = {"cut_ratio": float(c), "level": h}
        if h >= T - 1:  # c = 1: nothing is disclosed
            nothing = bayes_leakage(X, P, 0.0, 0, draws=1, seed=cfg.seed)
            row["single"] = nothing
            row["run"] = nothing
        else:
            ab = float(sched.alpha_bar(np.array([h]))[0])
            row["single"] = bayes_leakage(X, P, ab, 1, draws=cfg.draws, seed=cfg.seed)
            # the same noise draws as the single disclosure (common random numbers): with --disclose once
            # every image sent is observed exactly as in the row above
            row["run"] = bayes_leakage(X, P, ab, run_counts, draws=cfg.draws, seed=cfg.seed)
        rows.append(row)
    target = cfg.target.resolve(rows[0]["single"]["psnr_no_disclosure"])
    rec_single = recommend([{"cut_ratio": r["cut_ratio"], **r["single"]} for r in rows], target)
    rec_run = recommend([{"cut_ratio": r["cut_ratio"], **r["run"]} for r in rows], target)
    link = []
    n_link = min(cfg.link_images, len(X))
    sub = np.random.default_rng(cfg.seed + 1).permutation(len(X))[:n_link]
    jobs = [(c, n) for c in cfg.link_cuts for n in cfg.link_copies if handoff_level(c, T) < T - 1]
    for c, n in tqdm(jobs, desc="privacy: linking", disable=not progress):
        ab = float(sched.alpha_bar(np.array([handoff_level(c, T)]))[0])
        t1 = time.perf_counter()
        r = link_attack(X[sub], P, y_lab[sub] if cfg.labels_shared else None, ab, n, cfg.batch_size, seed=cfg.seed)
        link.append({"cut_ratio": float(c), "copies": float(n), **r, "wall_s": time.perf_counter() - t1})
    return {
        "data": ds.name, "image_shape": list(ds.images.shape[1:]), "num_train": int(len(X)),
        "num_population": int(len(P)),
        "schedule": {"num_train_timesteps": T, "beta_schedule": cfg.beta_schedule},
        "planned_run": {"steps": cfg.steps, "batch_size": cfg.batch_size, "disclose": cfg.disclose,
                        "copies_mean": float(np.mean(run_counts)), "copies_max": int(np.max(run_counts)),
                        "never_sent": int(np.sum(run_counts == 0))},
        "target": {"reid_factor": target.reid_factor, "max_psnr": target.max_psnr,
                   "max_reid": target.reid_factor / len(X)},
        "recommended_cut": {"one_disclosure": rec_single, "planned_run": rec_run},
        "rows": rows, "linking": link, "labels_shared": cfg.labels_shared,
        "wall_s": time.perf_counter() - t0,
    }


def verdict(report: dict, cut_ratio: float, planned: bool = True) -> tuple[bool, str]:
    """(safe, one line) for ``cut_ratio`` from a saved report: the row at that cut (or the nearest
    smaller one in the grid, the conservative side) against the report's target."""
    rows = sorted(report["rows"], key=lambda r: r["cut_ratio"])
    below = [r for r in rows if r["cut_ratio"] <= cut_ratio + 1e-9]
    row = below[-1] if below else rows[0]
    which = "run" if planned else "single"
    t = Target(report["target"]["reid_factor"], report["target"]["max_psnr"])
    r = {"cut_ratio": row["cut_ratio"], **row[which]}
    ok = t.meets(r)
    return ok, (f"cut {cut_ratio:g} ({'planned run' if planned else 'one disclosure'}, row c = {row['cut_ratio']:g}): "
                f"re-identification {r['reid']:.1%} (chance {r['chance']:.2%}), posterior-mean PSNR "
                f"{worst_psnr_of(r):.1f} dB (target ≤ {t.max_psnr:.1f}): "
                f"{'meets the target' if ok else 'UNSAFE'}")


# ------------------------------------------------------------------------------ guard rails (train, client-train)


def load_report(path: str) -> dict:
    """The report ``collafuse privacy`` wrote: ``privacy.json`` or the folder holding it
    (ConfigError, one line, when it is missing or not such a report)."""
    import json

    p = os.path.join(path, "privacy.json") if os.path.isdir(path) else path
    try:
        with open(p, encoding="utf-8") as f:
            doc = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"--privacy-report {path!r}: no such file; write one with `collafuse privacy --out DIR` "
                          "and pass DIR/privacy.json") from None
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise ConfigError(f"--privacy-report {path!r} is not a readable privacy.json ({type(e).__name__}); "
                          "write it again with `collafuse privacy`") from None
    try:
        rows = doc["rows"]
        if not rows or not isinstance(doc["target"]["max_psnr"], (int, float)):
            raise ValueError
        for r in rows:
            float(r["cut_ratio"]), r["run"]["reid"], r["single"]["reid"]
        int(doc["schedule"]["num_train_timesteps"]), doc["planned_run"]["steps"]
    except (KeyError, TypeError, ValueError, IndexError):
        raise ConfigError(f"--privacy-report {path!r} is not a report of `collafuse privacy` (no rows/target/"
                          "schedule/planned_run); write it with `collafuse privacy`") from None
    return doc


def privacy_hint(cut_ratio: float, data: str, steps: int, batch_size: int, disclose: str) -> str:
    """The one line train/client-train print when no report is given."""
    return (f"privacy: no --privacy-report given, so cut {cut_ratio:g} is not checked; see what it discloses "
            f"first with `collafuse privacy --data {data} --cut-ratios {cut_ratio:g} --steps {steps} "
            f"--batch-size {batch_size} --disclose {disclose} --out privacy-report` (seconds to a minute, "
            "nothing leaves the machine), then pass --privacy-report privacy-report/privacy.json")


def guard_verdict(report: dict, cut_ratio: float, *, timesteps: int, beta_schedule: str, steps: int,
                  batch_size: int, disclose: str) -> tuple[bool, str]:
    """(safe, one line) for a run about to disclose at ``cut_ratio``: :func:`verdict` for the planned
    run, and unsafe ("not covered") when the report cannot speak for this run — another noise
    schedule (other levels), or more disclosures than the report's planned run (more steps × batch,
    or fresh noise where the report planned ``once``)."""
    if cut_ratio >= 1.0:
        return True, f"privacy: cut {cut_ratio:g} runs every level on the site: nothing is disclosed"
    sd, pr = report["schedule"], report["planned_run"]
    def name(b) -> str:
        return "cosine" if str(b) == "squaredcos_cap_v2" else str(b)

    if int(sd["num_train_timesteps"]) != int(timesteps) or name(sd["beta_schedule"]) != name(beta_schedule):
        return False, (f"privacy: NOT COVERED: the report was made for a {sd['num_train_timesteps']}-level "
                       f"{sd['beta_schedule']} schedule, this run uses {timesteps}-level {beta_schedule} "
                       f"(other handoff levels); rerun collafuse privacy with --timesteps {timesteps} "
                       f"--beta-schedule {beta_schedule}")
    lowest = min(float(r["cut_ratio"]) for r in report["rows"])
    if cut_ratio < lowest - 1e-9:
        return False, (f"privacy: NOT COVERED: the report's smallest cut is {lowest:g}, below it nothing was "
                       f"measured; rerun collafuse privacy with --cut-ratios {cut_ratio:g}")
    planned = int(pr["steps"]) * int(pr["batch_size"])
    # with disclose once every image is sent at most once, however long the run
    more = disclose == "fresh" and (steps * batch_size > planned or pr.get("disclose") == "once")
    if more:
        return False, (f"privacy: NOT COVERED: this run sends {steps} × {batch_size} disclosures with {disclose} "
                       f"noise, more than the report's planned run ({pr['steps']} × {pr['batch_size']}, "
                       f"{pr.get('disclose', 'fresh')} noise); rerun collafuse privacy with --steps {steps} "
                       f"--batch-size {batch_size} --disclose {disclose}")
    ok, line = verdict(report, cut_ratio, planned=True)
    rec = report.get("recommended_cut", {}).get("planned_run")
    tail = "" if ok else (f"; the report recommends c ≥ {rec:g}" if rec is not None
                          else "; no cut in the report meets its target for this run (try --disclose once)")
    return ok, f"privacy: {line}{tail}"


def check_disclosure(prog: str, cut_ratios, *, report_path: str | None, accept: bool, data: str, timesteps: int,
                     beta_schedule: str, steps: int, batch_size: int, disclose: str) -> bool:
    """Print the verdict for each distinct cut a run is about to disclose at (one line each; a
    pointer to ``collafuse privacy`` without a report) and raise ConfigError (exit 2) for a cut the
    report marks unsafe or does not cover, unless ``accept``. True when every cut was found safe."""
    cuts = sorted({float(c) for c in cut_ratios})
    if report_path is None:
        for c in cuts:
            print(privacy_hint(c, data, steps, batch_size, disclose), flush=True)
        return False
    report = load_report(report_path)
    unsafe = []
    for c in cuts:
        ok, line = guard_verdict(report, c, timesteps=timesteps, beta_schedule=beta_schedule, steps=steps,
                                 batch_size=batch_size, disclose=disclose)
        print(line, flush=True)
        if not ok:
            unsafe.append(c)
    if unsafe and not accept:
        which = ", ".join(f"{c:g}" for c in unsafe)
        raise ConfigError(f"refusing to disclose at cut {which}: the privacy report {report_path!r} marks it unsafe "
                          "or does not cover this run (see above); choose a larger cut ratio or "
                          "--disclose once, rerun collafuse privacy for this run, or pass --accept-disclosure to "
                          "send anyway")
    if unsafe:
        print(f"{prog}: --accept-disclosure: disclosing at cut {', '.join(f'{c:g}' for c in unsafe)} although the "
              "report marks it unsafe", flush=True)
    return not unsafe


def add_guard_args(p: argparse.ArgumentParser) -> None:
    """``--privacy-report`` and ``--accept-disclosure`` of train and client-train."""
    p.add_argument("--privacy-report", default=None, metavar="PATH",
                   help="privacy.json (or its folder) from collafuse privacy on this site's data: print its "
                        "verdict for the cut and refuse a cut it marks unsafe")
    p.add_argument("--accept-disclosure", action="store_true",
                   help="train even at a cut the --privacy-report marks unsafe (or does not cover)")


# ------------------------------------------------------------------------------ output


def format_table(report: dict) -> str:
    pr = report["planned_run"]
    lines = [f"{report['data']}: {report['num_train']} training images, {report['num_population']} held out; "
             f"planned run {pr['steps']} steps × {pr['batch_size']} = {pr['copies_mean']:.1f} disclosures per image "
             f"({pr['disclose']} noise)",
             "PSNR (dB) of the reconstruction with the site's images as prior / the population as prior / "
             "the linear estimate; AUC: membership",
             f"{'c':>5} {'level':>5} {'ᾱ_h':>7} | {'re-id':>7} {'CI95':>15} {'site':>5} {'pop':>5} {'lin':>5} "
             f"{'AUC':>5} | {'ᾱ_eff':>6} {'re-id':>7} {'site':>5} {'pop':>5} {'lin':>5} | ok",
             f"{'':>19} | {'one disclosure':^47} | {'planned run, copies perfectly linked':^33} |"]
    t = report["target"]
    tgt = Target(t["reid_factor"], t["max_psnr"])
    for r in report["rows"]:
        s, p = r["single"], r["run"]
        ok = ("1" if tgt.meets({"cut_ratio": r["cut_ratio"], **s}) else "-") + \
             ("R" if tgt.meets({"cut_ratio": r["cut_ratio"], **p}) else "-")
        lines.append(f"{r['cut_ratio']:5.2f} {r['level']:5d} {s['alpha_bar']:7.4f} | {s['reid']:7.2%} "
                     f"[{s['reid_ci95'][0]:6.2%},{s['reid_ci95'][1]:6.2%}] {s['psnr_site_prior']:5.1f} "
                     f"{s['psnr_population_prior']:5.1f} {s['psnr_linear']:5.1f} {s['membership_auc']:5.2f} | "
                     f"{p['alpha_bar_eff']:6.3f} {p['reid']:7.2%} {p['psnr_site_prior']:5.1f} "
                     f"{p['psnr_population_prior']:5.1f} {p['psnr_linear']:5.1f} | {ok}")
    s0 = report["rows"][0]["single"]
    rc = report["recommended_cut"]
    lines.append(f"chance re-identification {s0['chance']:.3%}; no-disclosure PSNR (the mean image) "
                 f"{s0['psnr_no_disclosure']:.1f} dB; ok: 1 = one disclosure meets the target, R = the planned run")
    lines.append(f"target: re-identification ≤ {t['reid_factor']:g}× chance ({t['max_reid']:.3%}) and every "
                 f"reconstruction PSNR ≤ {t['max_psnr']:.1f} dB")
    fmt = lambda v: "none in the grid" if v is None else f"c = {v:g}"  # noqa: E731
    lines.append(f"recommended smallest cut: one disclosure {fmt(rc['one_disclosure'])}; "
                 f"planned run {fmt(rc['planned_run'])}")
    if report["linking"]:
        lines.append("")
        lines.append(f"repeated disclosure, copies linked by k-means{' within each class' if report['labels_shared'] else ''} "
                     f"({report['linking'][0]['num_images']} images; re-id per upload, chance "
                     f"{report['linking'][0]['chance']:.2%}):")
        lines.append(f"{'c':>5} {'copies':>6} {'purity':>7} {'re-id':>7} {'site':>5} {'pop':>5} {'lin':>5} | "
                     f"{'perfect links: re-id':>20} {'site':>5} {'lin':>5}")
        for r in report["linking"]:
            o = r["oracle"]
            lines.append(f"{r['cut_ratio']:5.2f} {r['copies']:6.0f} {r['link_purity']:7.1%} {r['reid']:7.1%} "
                         f"{r['psnr_site_prior']:5.1f} {r['psnr_population_prior']:5.1f} {r['psnr_linear']:5.1f} | "
                         f"{o['reid']:20.1%} {o['psnr_site_prior']:5.1f} {o['psnr_linear']:5.1f}")
    return "\n".join(lines)


def plot_report(report: dict, path_cut: str, path_copies: str | None = None) -> list[str]:
    """re-identification and PSNR against the cut ratio (one disclosure, the planned run) and,
    when linking was simulated, against copies per image for each linked cut."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    rows = report["rows"]
    c = [r["cut_ratio"] for r in rows]
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.8))
    chance = rows[0]["single"]["chance"]
    for key, lab in (("single", "one disclosure"), ("run", f"planned run ({report['planned_run']['disclose']})")):
        ax[0].plot(c, [max(r[key]["reid"], chance / 10) for r in rows], "o-", ms=3, label=lab)
        line, = ax[1].plot(c, [min(r[key]["psnr_site_prior"], 50.0) for r in rows], "o-", ms=3, label=f"{lab}, site prior")
        ax[1].plot(c, [r[key]["psnr_linear"] for r in rows], "s--", ms=3, color=line.get_color(),
                   label=f"{lab}, linear (no candidates)")
    ax[0].axhline(chance, color="gray", lw=0.8, label="chance")
    ax[0].axhline(report["target"]["max_reid"], color="red", lw=0.8, ls=":", label="target")
    ax[0].set_yscale("log")
    ax[0].set_xlabel("cut ratio c")
    ax[0].set_ylabel("re-identification rate")
    ax[1].axhline(report["target"]["max_psnr"], color="red", lw=0.8, ls=":", label="target")
    ax[1].set_xlabel("cut ratio c")
    ax[1].set_ylabel("reconstruction PSNR (dB, shown ≤ 50)")
    for a in ax:
        a.legend(fontsize=7)
        a.grid(alpha=0.3)
    fig.suptitle(f"Bayes-optimal attacks on {report['data']} ({report['num_train']} images)", fontsize=10)
    fig.tight_layout()
    _save_fig(fig, path_cut)
    plt.close(fig)
    written.append(path_cut)
    if path_copies and report["linking"]:
        fig, ax = plt.subplots(1, 2, figsize=(10, 3.8))
        for cut in sorted({r["cut_ratio"] for r in report["linking"]}):
            rs = sorted((r for r in report["linking"] if r["cut_ratio"] == cut), key=lambda r: r["copies"])
            n = [r["copies"] for r in rs]
            line, = ax[0].plot(n, [r["reid"] for r in rs], "o-", ms=3, label=f"c = {cut:g}, k-means links")
            ax[0].plot(n, [r["oracle"]["reid"] for r in rs], "--", color=line.get_color(), label=f"c = {cut:g}, perfect links")
            ax[1].plot(n, [r["psnr_linear"] for r in rs], "o-", ms=3, color=line.get_color(),
                       label=f"c = {cut:g}, k-means links")
            ax[1].plot(n, [r["oracle"]["psnr_linear"] for r in rs], "--", color=line.get_color(),
                       label=f"c = {cut:g}, perfect links")
        ax[0].axhline(report["linking"][0]["chance"], color="gray", lw=0.8, label="chance")
        for a, lab in zip(ax, ("re-identification rate (per upload)", "PSNR, linear estimate (dB)")):
            a.set_xscale("log")
            a.set_xlabel("disclosures per image")
            a.set_ylabel(lab)
            a.grid(alpha=0.3)
        ax[0].legend(fontsize=6, ncol=2)
        fig.suptitle(f"Repeated disclosure: copies linked and averaged ({report['linking'][0]['num_images']} images)",
                     fontsize=10)
        fig.tight_layout()
        _save_fig(fig, path_copies)
        plt.close(fig)
        written.append(path_copies)
    return written


def _save_fig(fig, path: str) -> None:
    import io

    from collafuse_edge.files import atomic_write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    atomic_write_bytes(path, buf.getvalue())


# ------------------------------------------------------------------------------ command line


def _floats(flag: str, text: str) -> tuple[float, ...]:
    try:
        vals = tuple(float(v) for v in str(text).split(",") if v.strip())
    except ValueError:
        raise ConfigError(f"{flag} must be comma-separated numbers, e.g. 0.2,0.4; got {text!r}") from None
    if not vals:
        raise ConfigError(f"{flag} needs at least one number")
    return vals


def add_privacy_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "privacy", help="what the server could learn from your disclosures, per cut ratio, before you send any",
        description="Run locally on the site's own images, before any training; nothing leaves the machine. "
                    "Attacks each cut ratio's disclosures with the Bayes-optimal re-identification and "
                    "reconstruction attack (exact posterior over your images), for one disclosure and for the "
                    "disclosures a planned run sends (copies linked and averaged), and recommends the smallest "
                    "cut that meets a target.")
    p.add_argument("--data", default="digits", help="'digits' (embedded), a MedMNIST-style .npz, or an image folder")
    p.add_argument("--image-size", type=int, default=16)
    p.add_argument("--holdout", type=float, default=0.2,
                   help="share of the images held out as the population for the comparison attacks (default 0.2)")
    p.add_argument("--max-images", type=int, default=None, help="use at most this many images (a random subset)")
    p.add_argument("--cut-ratios", default=",".join(f"{c:g}" for c in DEFAULT_CUTS),
                   help="cut ratios to check, comma-separated (default 0.05 … 0.95)")
    p.add_argument("--timesteps", type=int, default=1000)
    p.add_argument("--beta-schedule", default="linear", help="linear | cosine")
    p.add_argument("--steps", type=int, default=3000, help="the planned run's training steps (default 3000)")
    p.add_argument("--batch-size", type=int, default=64,
                   help="disclosures per step of the planned run (train --batch-size, client-train --upload-batch)")
    p.add_argument("--disclose", default="fresh", choices=DISCLOSE_MODES,
                   help="the planned run's disclosure mode: fresh noise per upload, or once per image")
    p.add_argument("--max-reid-factor", type=float, default=DEFAULT_REID_FACTOR,
                   help="target: re-identification at most this many times chance (default 2)")
    p.add_argument("--max-psnr", type=float, default=None, metavar="DB",
                   help="target: posterior-mean PSNR at most this (default: the mean image's PSNR + 1 dB)")
    p.add_argument("--draws", type=int, default=2, help="noise draws per image for the attacks (default 2)")
    p.add_argument("--link-cuts", default=",".join(f"{c:g}" for c in DEFAULT_LINK_CUTS),
                   help="cut ratios at which linking of repeated copies is simulated ('none' to skip)")
    p.add_argument("--link-copies", default=",".join(str(n) for n in DEFAULT_LINK_COPIES),
                   help="disclosures per image to simulate linking at (default 1,4,16,64,256)")
    p.add_argument("--link-images", type=int, default=256, help="images in the linking simulation (default 256)")
    p.add_argument("--no-labels", action="store_true",
                   help="the server does not see labels (server_conditioning none): link without them")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    p.add_argument("--out", default="privacy-report", metavar="DIR",
                   help="folder for privacy.json and the plots (default privacy-report)")
    p.set_defaults(func=cmd_privacy)
    return p


def config_from_args(args: argparse.Namespace) -> PrivacyConfig:
    no_link = str(args.link_cuts).strip().lower() in ("", "none")
    for flag, v in (("--max-psnr", args.max_psnr), ("--max-reid-factor", args.max_reid_factor)):
        if v is not None and not math.isfinite(v):
            raise ConfigError(f"{flag} must be a finite number, got {v}")
    return PrivacyConfig(
        data=args.data, image_size=args.image_size, holdout=args.holdout, max_images=args.max_images,
        cut_ratios=_floats("--cut-ratios", args.cut_ratios), timesteps=args.timesteps,
        beta_schedule=args.beta_schedule, steps=args.steps, batch_size=args.batch_size, disclose=args.disclose,
        target=Target(args.max_reid_factor, args.max_psnr), draws=args.draws,
        link_cuts=() if no_link else _floats("--link-cuts", args.link_cuts),
        link_copies=_floats("--link-copies", args.link_copies), link_images=args.link_images,
        labels_shared=not args.no_labels, seed=args.seed)


def cmd_privacy(args: argparse.Namespace) -> int:
    from .threads import torch_threads

    cfg = config_from_args(args)
    if args.beta_schedule not in ("linear", "cosine"):
        raise ConfigError(f"--beta-schedule must be 'linear' or 'cosine', got {args.beta_schedule!r}")
    with torch_threads(args.threads):
        report = privacy_report(cfg)
    os.makedirs(args.out, exist_ok=True)
    atomic_write_json(os.path.join(args.out, "privacy.json"), report)
    plots = plot_report(report, os.path.join(args.out, "privacy_vs_cut.png"),
                        os.path.join(args.out, "privacy_vs_copies.png"))
    print(format_table(report))
    print(f"wrote {os.path.join(args.out, 'privacy.json')} and {', '.join(plots)} in {report['wall_s']:.1f} s")
    return 0
