"""Evaluate a trained run (docs/architecture.md#metrics): quality, disclosure, the reconstruction attack and cost.

Per client, against that client's own private split:

* **quality** — FD/KD in classifier feature space between ``num_images`` split-sampled images
  (labels cycling through the client's classes) and the client's held-out images;
* **disclosure** (the paper's metrics) — KD and pixel MSE between what the server sees and the
  client's training images: in training the disclosed ``x_h`` (drawn through
  :func:`collafuse.objectives.disclose`, exactly what crosses the network), in inference the
  handoff samples. ``noise_floor`` scores pure noise the same way (= nothing disclosed);
* **reconstruction attack** (ours) — the server denoises what it saw with *its own* model:
  ``chain`` runs its model over the client's levels to level 0 with the client's sampler;
  ``tweedie`` is the one-call posterior-mean estimate x̂0(x_h) = (x_h − √(1−ᾱ_h)·ε̂)/√ᾱ_h,
  which is the MSE-optimal guess and so the stronger attack on PSNR. Training: against each
  disclosed image's own source. Inference: the server's completion of the handoff against
  the client's final image, and its nearest-neighbour distance to the client's training set;
* **cost** — counted client/server FLOPs per image, bytes on the wire, client latency on the
  edge runtime when given an exported bundle, else torch (:mod:`collafuse.cost`).

    collafuse evaluate --run runs/demo --out runs/demo/eval
    collafuse export --run runs/demo --client 0 --out bundles/c0 && \
        collafuse evaluate --run runs/demo --bundle bundles/c0      # client latency on collafuse-edge
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from collafuse_edge.files import atomic_write_json, jsonable  # jsonable stays importable from here
from collafuse_edge.noise import initial_noise
from collafuse_edge.schedule import client_timetable, predict_x0
from collafuse_edge.validation import check_choice, check_int

from .checkpoint import LoadedRun, load_run
from .cost import LATENCY_BACKENDS, ImageCost, LatencyProbe, image_cost
from .data import ClientData, load_dataset, partition
from .errors import ConfigError
from .generate import SampleConfig, require_server, sample_client
from .metrics import (DisclosureScores, QualityScores, ReconstructionScores, disclosure_scores, get_feature_net,
                      quality_scores, reconstruction_scores)
from .metrics.features import FeatureExtractor, FeatureNet
from .models import denoise
from .objectives import disclose
from .sampling import run_levels
from .threads import torch_threads


def default_feature_cache() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "collafuse", "feature-nets")


@dataclass(frozen=True)
class EvalConfig:
    num_images: int = 100  # generated per client, for quality and inference disclosure
    sampler: str = "ddim"  # "ddim" or "ddpm" (every level)
    sample_steps: int | None = 50  # DDIM evaluations per image, split between server and client in proportion to their levels
    num_disclosed: int = 200  # training images per client whose x_h is drawn for the disclosure metrics and the attack
    attack: bool = True  # run the reconstruction attack (server model over the client's levels)
    latency: str = "torch"  # "edge" (onnxruntime through collafuse-edge; needs `bundle`), "torch", or "none"
    bundle: str | None = None  # an exported bundle of the client architecture, for edge latency
    latency_runs: int = 5
    threads: int | None = 1  # torch/onnxruntime threads while evaluating (None: leave torch's setting)
    feature_net: str | None = None  # user-supplied feature network file; None: the project's classifier
    feature_cache: str | None = None  # where the project's classifier is cached; None: ~/.cache/collafuse/feature-nets
    student: str | None = None  # a distilled few-step student (student_n{N}.json) replacing its client's model
    kd_subsets: int = 100  # KD is averaged over this many random subsets
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        for name, low in (("num_images", 2), ("num_disclosed", 2), ("latency_runs", 1), ("kd_subsets", 1)):
            check_int(name, getattr(self, name), low=low, error=ConfigError)
        check_choice("sampler", self.sampler, ("ddim", "ddpm"), error=ConfigError)
        check_int("sample_steps (None: every level)", self.sample_steps, low=2, allow_none=True, error=ConfigError)
        check_choice("latency", self.latency, LATENCY_BACKENDS, error=ConfigError)
        if self.bundle is not None and self.latency != "edge":
            raise ConfigError(f"bundle is only used with latency='edge', got latency={self.latency!r}")
        check_int("threads (None: leave torch's setting)", self.threads, low=1, allow_none=True, error=ConfigError)

    def sample_config(self, k: int, T: int) -> SampleConfig:
        s, c = split_steps(self.sample_steps if self.sampler == "ddim" else None, k, T)
        return SampleConfig(n=self.num_images, sampler=self.sampler, server_steps=s, client_steps=c, seed=self.seed)


def split_steps(total: int | None, k: int, T: int) -> tuple[int | None, int | None]:
    """Share ``total`` sampler evaluations between server (levels T-1 … k) and client (k-1 … 0)
    in proportion to their level counts, at least one each side that has levels. None → every
    level. Keeping the step *spacing* equal on both sides makes cost comparable across cuts."""
    if total is None:
        return None, None
    client = 0 if k == 0 else max(1, min(k, round(total * k / T)))
    if 0 < k < T:
        client = min(client, total - 1)  # leave the server at least one evaluation
    server = 0 if k == T else max(1, min(T - k, total - client))
    return max(server, 1), max(client, 1)  # SampleConfig wants ≥ 1; an empty side ignores it


@dataclass(frozen=True)
class ClientEval:
    """Everything measured for one client. ``None`` where nothing crosses the network (c = 1)."""

    client: int
    cut_ratio: float
    handoff_level: int
    classes: tuple[int, ...]
    num_train: int
    num_test: int
    quality: QualityScores  # generated vs the client's held-out images
    disclosure_training: DisclosureScores | None  # disclosed x_h vs their source images (paired)
    disclosure_inference: DisclosureScores | None  # handoff samples vs the client's training images
    noise_floor: DisclosureScores  # pure noise (paired with the images, like x_h) vs the client's training images: "nothing disclosed"
    attack_training_chain: ReconstructionScores | None  # server's own chain from x_h vs the source images
    attack_training_tweedie: ReconstructionScores | None  # server's posterior-mean estimate from x_h
    attack_inference_chain: ReconstructionScores | None  # server's completion of the handoff vs the client's final image
    attack_inference_tweedie: ReconstructionScores | None
    attack_inference_train_nn: ReconstructionScores | None  # server's completion vs the client's training set (unpaired)
    cost: ImageCost
    # images kept for figures, not written to JSON: [N,C,H,W] in the model scale
    samples: np.ndarray | None = field(default=None, repr=False, compare=False)
    attack_examples: dict | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict:
        out = {}
        for f in dataclasses.fields(self):
            if f.name in ("samples", "attack_examples"):
                continue
            v = getattr(self, f.name)
            out[f.name] = v.to_dict() if hasattr(v, "to_dict") else (list(v) if isinstance(v, tuple) else v)
        return out


@dataclass(frozen=True)
class EvalReport:
    run_dir: str
    step: int
    objective: str
    cut_ratios: tuple[float, ...]
    feature_net: dict  # what extractor the FD/KD numbers are in, and its held-out accuracy
    config: EvalConfig
    clients: tuple[ClientEval, ...]
    pooled_quality: QualityScores | None  # all generated vs all held-out images
    wall_s: float

    @property
    def kd_sum(self) -> float:
        """The paper's headline: KD summed over clients."""
        return float(sum(c.quality.kd_mean for c in self.clients))

    @property
    def fd_sum(self) -> float:
        return float(sum(c.quality.fd for c in self.clients))

    def to_dict(self) -> dict:
        return jsonable({
            "run_dir": self.run_dir, "step": self.step, "objective": self.objective,
            "cut_ratios": list(self.cut_ratios), "feature_net": self.feature_net,
            "config": dataclasses.asdict(self.config), "kd_sum": self.kd_sum, "fd_sum": self.fd_sum,
            "pooled_quality": self.pooled_quality.to_dict() if self.pooled_quality else None,
            "clients": [c.to_dict() for c in self.clients], "wall_s": self.wall_s,
        })


# --------------------------------------------------------------------------------- pieces


def feature_extractor(run: LoadedRun, ec: EvalConfig) -> tuple[FeatureExtractor, dict]:
    """The extractor for the run's dataset and a description of it for the report."""
    ds = load_dataset(run.config.data.source, run.config.data.image_size)
    ext = get_feature_net(ds, ec.feature_cache or default_feature_cache(), user_file=ec.feature_net,
                          seed=0, progress=False)
    if isinstance(ext, FeatureNet):
        rep = ext.report
        info = {"kind": "project classifier (FD/KD in classifier feature space)",
                "test_accuracy": rep.test_accuracy if rep else None, "dataset_key": rep.dataset_key if rep else "",
                "file": ec.feature_net}
    else:
        info = {"kind": "user-supplied TorchScript network", "test_accuracy": None, "file": ec.feature_net}
    return ext, info


def cycle_labels(classes: tuple[int, ...], n: int) -> np.ndarray:
    return np.array([classes[i % len(classes)] for i in range(n)], dtype=np.int64)


@torch.no_grad()
def server_reconstruction(run: LoadedRun, x: torch.Tensor, level: int, labels: np.ndarray | None,
                          client_steps: int | None, sampler: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The server's attack on samples ``x`` ``[B,C,H,W]`` at ``level``: (chain to level 0 with its
    own model over the client's timetable, one-call Tweedie estimate of x0)."""
    if level < 0:  # it saw clean images
        return x.clone(), x.clone()
    lab = labels if run.config.server_conditioning == "label" else None
    chain = run_levels(run.server, run.schedule, x, client_timetable(level + 1, client_steps), lab,
                       sampler=sampler, seed=seed)
    t = torch.full((x.shape[0],), level, dtype=torch.long, device=x.device)
    lt = None if lab is None else torch.as_tensor(lab, dtype=torch.long, device=x.device)
    eps = denoise(run.server, x, t, lt)
    return chain, predict_x0(run.schedule, x, eps, level)


def _np(x: torch.Tensor) -> np.ndarray:
    return x.detach().float().cpu().numpy()


def evaluate_client(run: LoadedRun, client: int, truth: ClientData, ec: EvalConfig, extractor: FeatureExtractor,
                    *, probe: LatencyProbe | None = None, keep_images: int = 0, remote=None) -> ClientEval:
    """Evaluate model ``client`` of ``run`` (its cut ratio and client model) against ``truth``.

    ``truth`` is usually the run's own partition of that client; a centralised baseline passes
    the data of the client it is compared with. ``keep_images`` > 0 keeps that many samples and
    attack examples on the result for figures. ``remote`` (:class:`collafuse.remote.RemoteServer`)
    runs the server's levels over HTTP; without a local server model (a site's run) the
    reconstruction attack, which needs the server's weights, is skipped.
    """
    cfg, sched = run.config, run.schedule
    T, k = sched.T, cfg.client_levels[client]
    share = cfg.server_conditioning == "label"
    sc = ec.sample_config(k, T)
    distilled = getattr(run.clients[client], "distilled_steps", None)
    if distilled is not None:  # a few-step student: N calls on its own timetable (cost and latency count those)
        sc = dataclasses.replace(sc, client_steps=distilled)
    if len(truth.test_images) < 2:
        raise ConfigError(f"client {truth.index} has {len(truth.test_images)} held-out images; need ≥ 2 for quality "
                          "metrics (use a larger test_fraction)")
    dev = next(run.clients[client].parameters()).device
    attack = ec.attack and run.server is not None

    # quality: split-sampled images vs the client's held-out images
    labels = cycle_labels(truth.classes, ec.num_images)
    s = sample_client(run, client, sc, labels, remote=remote)
    images, handoff = _np(s.images), _np(s.handoff)
    quality = quality_scores(images, truth.test_images, extractor, num_subsets=ec.kd_subsets, seed=ec.seed)

    # the training images whose disclosure we score
    rng = np.random.default_rng(ec.seed + 1000 * truth.index)
    n_disc = min(ec.num_disclosed, len(truth.train_images))
    idx = np.sort(rng.choice(len(truth.train_images), n_disc, replace=False))
    x0, y0 = truth.train_images[idx], truth.train_labels[idx]
    f0 = extractor.features(x0)
    kd_kw = dict(num_subsets=ec.kd_subsets, seed=ec.seed, client_features=f0)
    noise = initial_noise(ec.seed + 7, x0.shape)
    noise_floor = disclosure_scores(noise, x0, extractor, paired=True, **kd_kw)

    gen = torch.Generator().manual_seed(ec.seed + 17 * truth.index)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # shared-noise warns on every call; the run config says it
        d = disclose(client, torch.from_numpy(x0), torch.from_numpy(y0), k, sched, cfg.objective, gen, share)
    disc_train = disc_inf = None
    at_chain = at_tw = ai_chain = ai_tw = ai_nn = None
    examples = None
    if d is not None:
        seen = _np(d.x)
        disc_train = disclosure_scores(seen, x0, extractor, paired=True, **kd_kw)
        disc_inf = disclosure_scores(handoff, x0, extractor, **kd_kw)
        if attack:
            c_steps = sc.client_steps if ec.sampler == "ddim" else None
            if d.eps is not None:  # shared-noise: the server inverts x_t exactly
                exact = predict_x0(sched, d.x, d.eps, d.t, clip=False)
                chain_t, tw_t = exact, exact
            else:
                chain_t, tw_t = server_reconstruction(run, d.x.to(dev), d.level, y0 if share else None, c_steps,
                                                      ec.sampler, ec.seed)
            at_chain = reconstruction_scores(_np(chain_t), x0, paired=True)
            at_tw = reconstruction_scores(_np(tw_t), x0, paired=True)
            comp, comp_tw = server_reconstruction(run, s.handoff.to(dev), s.handoff_level, labels if share else None,
                                                  c_steps, ec.sampler, ec.seed)
            ai_chain = reconstruction_scores(_np(comp), images, paired=True)
            ai_tw = reconstruction_scores(_np(comp_tw), images, paired=True)
            ai_nn = reconstruction_scores(_np(comp), truth.train_images, paired=False)
            if keep_images:
                m = min(keep_images, n_disc)
                examples = {"true": x0[:m], "seen": seen[:m], "chain": _np(chain_t)[:m], "tweedie": _np(tw_t)[:m]}

    cost = image_cost(run.clients[client], run.server, sched, k, sc.server_steps, sc.client_steps,
                      share_labels=share, probe=probe, sampler=ec.sampler)
    return ClientEval(
        client=truth.index, cut_ratio=float(cfg.cut_ratios[client]), handoff_level=k - 1, classes=truth.classes,
        num_train=int(len(truth.train_images)), num_test=int(len(truth.test_images)),
        quality=quality, disclosure_training=disc_train, disclosure_inference=disc_inf, noise_floor=noise_floor,
        attack_training_chain=at_chain, attack_training_tweedie=at_tw, attack_inference_chain=ai_chain,
        attack_inference_tweedie=ai_tw, attack_inference_train_nn=ai_nn, cost=cost,
        samples=images[:keep_images] if keep_images else None, attack_examples=examples,
    )


def pooled_quality(evals: list[ClientEval], truths: list[ClientData], extractor: FeatureExtractor,
                   ec: EvalConfig) -> QualityScores | None:
    """All clients' generated images vs all their held-out images (needs ``keep_images`` ≥ num_images)."""
    if any(e.samples is None for e in evals):
        return None
    gen = np.concatenate([e.samples for e in evals])
    real = np.concatenate([t.test_images for t in truths])
    return quality_scores(gen, real, extractor, num_subsets=ec.kd_subsets, seed=ec.seed)


def evaluate_run(run: str | LoadedRun, ec: EvalConfig = EvalConfig(), *, out_dir: str | None = None,
                 extractor: tuple[FeatureExtractor, dict] | None = None, probe: LatencyProbe | None = None,
                 progress: bool = False, remote=None, clients: list[int] | None = None) -> EvalReport:
    """Evaluate the clients of ``run`` (``clients``: default every model the run holds — a site's
    run holds one) against their own private splits; with ``out_dir``, write ``report.json``,
    ``samples_client{i}.png`` and ``attack_client{i}.png`` there. ``remote`` runs the server's
    levels over HTTP (:class:`collafuse.remote.RemoteServer`; needed for a site's run)."""
    t0 = time.perf_counter()
    with torch_threads(ec.threads):
        if isinstance(run, str):
            run = load_run(run, device=ec.device)
        if ec.student is not None:  # the student replaces its client's model (and runs its own timetable)
            from .distill import load_student

            st = load_student(ec.student, run, device=ec.device)
            run = dataclasses.replace(run, clients=[st.model if i == st.client else m for i, m in enumerate(run.clients)])
        require_server(run, remote)
        held = [i for i, m in enumerate(run.clients) if m is not None]
        if clients is None:  # a token is one client: with a remote server, evaluate that one
            clients = [remote.info.client] if remote is not None and run.site is None else held
        if not clients or any(c not in held for c in clients):
            raise ConfigError(f"clients {clients} are not all in {run.run_dir!r} (it holds {held})")
        ext, info = extractor if extractor is not None else feature_extractor(run, ec)
        cfg = run.config
        truths = partition(load_dataset(cfg.data.source, cfg.data.image_size), cfg.data)
        if probe is None and ec.latency != "none" and any(cfg.client_levels[c] > 0 for c in clients):
            probe = LatencyProbe(run.clients[clients[0]], run.schedule, ec.latency, bundle=ec.bundle,
                                 threads=ec.threads or 1, runs=ec.latency_runs)
        evals = []
        for i in clients:
            if progress:
                print(f"  evaluating client {i} (c = {cfg.cut_ratios[i]}) …", flush=True)
            evals.append(evaluate_client(run, i, truths[i], ec, ext, probe=probe, keep_images=ec.num_images,
                                         remote=remote))
        pooled = pooled_quality(evals, [truths[i] for i in clients], ext, ec)
    report = EvalReport(run.run_dir, run.step, cfg.objective, tuple(cfg.cut_ratios), info, ec, tuple(evals), pooled,
                        time.perf_counter() - t0)
    if out_dir is not None:
        write_outputs(report, out_dir)
    return report


def write_outputs(report: EvalReport, out_dir: str) -> None:
    from collafuse_edge.images import write_png

    os.makedirs(out_dir, exist_ok=True)
    atomic_write_json(os.path.join(out_dir, "report.json"), report.to_dict())
    for e in report.clients:
        if e.samples is not None:
            write_png(os.path.join(out_dir, f"samples_client{e.client}.png"), e.samples[:64], nrow=8)
        if e.attack_examples:
            ex = e.attack_examples
            m = min(12, len(ex["true"]))
            rows = np.concatenate([ex[r][:m] for r in ("true", "seen", "chain", "tweedie")])
            write_png(os.path.join(out_dir, f"attack_client{e.client}.png"), rows, nrow=m)


# ------------------------------------------------------------------------------------ tables


# The table and the demo report are views of the one canonical projection, ClientEval.to_dict():
# each field is a path into it, optionally ending in a divisor (FLOPs → MFLOP). A nested spec is
# a section that is None when its source section is (nothing crossed the network at c = 1).
MEGA = 1e6

SUMMARY_COLUMNS = {
    "client": ("client",), "c": ("cut_ratio",), "KD": ("quality", "kd_mean"), "FD": ("quality", "fd"),
    "disc_KD_train": ("disclosure_training", "kd_mean"), "disc_MSE_train": ("disclosure_training", "mse"),
    "disc_KD_infer": ("disclosure_inference", "kd_mean"),
    "attack_PSNR_train": ("attack_training_tweedie", "psnr_paired"),
    "attack_PSNR_infer": ("attack_inference_chain", "psnr_paired"),
    "client_MFLOP/img": ("cost", "client_flops_per_image", MEGA),
    "server_MFLOP/img": ("cost", "server_flops_per_image", MEGA),
    "client_ms/img": ("cost", "latency_ms_per_image"),
}

DEMO_CLIENT_FIELDS = {
    "client": ("client",), "cut_ratio": ("cut_ratio",), "classes": ("classes",),
    "kd": ("quality", "kd_mean"), "fd": ("quality", "fd"),
    "disclosure_training": {"kd": ("disclosure_training", "kd_mean"), "mse": ("disclosure_training", "mse")},
    "disclosure_inference": {"kd": ("disclosure_inference", "kd_mean"),
                             "nn_mse": ("disclosure_inference", "nn_mse")},
    "disclosure_noise_floor_kd": ("noise_floor", "kd_mean"),
    "attack_training_psnr_db": ("attack_training_tweedie", "psnr_paired"),
    "attack_inference_psnr_db": ("attack_inference_chain", "psnr_paired"),
    "client_mflop_per_image": ("cost", "client_flops_per_image", MEGA),
    "server_mflop_per_image": ("cost", "server_flops_per_image", MEGA),
    "local_mflop_per_image": ("cost", "local_flops_per_image", MEGA),
    "client_ms_per_image": ("cost", "latency_ms_per_image"), "latency_backend": ("cost", "latency_note"),
    "handoff_bytes_per_image": ("cost", "handoff_bytes_per_image"),
}


def _pick(d: dict, path: tuple):
    """``d[path[0]][path[1]]…`` (divided by a trailing number); None when a section on the way is None."""
    *keys, last = path
    scale = None
    if not isinstance(last, str):
        scale = last
    else:
        keys.append(last)
    for key in keys:
        if d is None:
            return None
        d = d[key]
    return d / scale if scale is not None and d is not None else d


def project(d: dict, spec: dict) -> dict:
    """A view of ``d`` (a :meth:`ClientEval.to_dict`) laid out as ``spec`` says."""
    out = {}
    for name, how in spec.items():
        if isinstance(how, dict):
            source = next(iter(how.values()))[0]
            out[name] = None if d.get(source) is None else project(d, how)
        else:
            out[name] = _pick(d, how)
    return out


def summary_rows(report: EvalReport) -> list[dict]:
    """One flat row per client (what the CLI prints)."""
    return [project(e.to_dict(), SUMMARY_COLUMNS) for e in report.clients]


def format_rows(rows: list[dict]) -> str:
    if not rows:
        return ""
    cols = list(rows[0])

    def cell(v) -> str:
        if v is None:
            return "—"
        if isinstance(v, float):
            if math.isinf(v):
                return "inf"
            return f"{v:.4g}"
        return str(v)

    table = [cols] + [[cell(r[c]) for c in cols] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
    return "\n".join("  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in table)


# ------------------------------------------------------------------------------------ demo


DEMO_EVAL = EvalConfig(num_images=32, sample_steps=25, num_disclosed=48, latency="torch", latency_runs=3,
                       kd_subsets=20)


def demo_report(run_dir: str, ec: EvalConfig = DEMO_EVAL, out_dir: str | None = None) -> dict:
    """A short metrics report for ``collafuse demo``'s run (well under a minute on one core for
    3 clients with 0.65 M-parameter models): per-client quality, disclosure, attack and cost, plus
    the summed KD. With ``out_dir`` also writes the full report and figures there."""
    rep = evaluate_run(run_dir, ec, out_dir=out_dir)
    clients = [project(e.to_dict(), DEMO_CLIENT_FIELDS) for e in rep.clients]
    return jsonable({
        "metric_space": rep.feature_net["kind"], "feature_net_test_accuracy": rep.feature_net.get("test_accuracy"),
        "kd_sum": rep.kd_sum, "fd_sum": rep.fd_sum,
        "pooled_kd": rep.pooled_quality.kd_mean if rep.pooled_quality else None,
        "num_images_per_client": ec.num_images, "sampler": f"{ec.sampler}, {ec.sample_steps} evaluations per image",
        "clients": clients, "wall_s": rep.wall_s,
        "note": "higher disclosure KD/MSE = less disclosed; higher attack PSNR = more disclosed",
    })
