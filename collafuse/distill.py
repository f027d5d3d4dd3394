"""A few-step client: distil one site's low-noise segment (handoff level k-1 → clean image) into a
student that needs N ∈ {1, 2, 4, 8} model calls, on the site's own images only.

    collafuse distill --run runs/demo --client 0 --steps 4          # → runs/demo/distill/client_0/
    collafuse export --run runs/demo --client 0 --student runs/demo/distill/client_0/student_n4.json --out b4

**Inputs.** x_t ~ q(x_t | x0) of the site's own training images at the student's levels (the
handoff level k-1 included); no server is needed, nothing leaves the site. **Teacher.** The
site's EMA client model. **Student.** The same architecture, initialised from the teacher,
predicting ε; it samples with deterministic DDIM steps (eta = 0, x̂0 unclipped) over the
``N``-level timetable :func:`collafuse_edge.schedule.distilled_timetable`, which the bundle records
(sampler ``"distilled"``), so the torch sampler, ``collafuse evaluate`` and the numpy edge sampler
run the same steps.

Three methods, chosen by measurement (``benchmarks/few_step_client.py``, docs/results.md). The
measurement that decides: the teacher's full segment (DDPM, fresh noise at every level) is much
better than its own deterministic DDIM at any number of levels (FD 3.6 vs 5.6–6.6 on the digits at
c = 0.6; ancestral DDIM at 32 levels: 3.8), so a student that imitates a deterministic sampler
stops at that sampler's quality, 1.5× the full segment's FD.

* ``dmd`` (default; distribution matching distillation, Yin et al.): the student's N steps are
  unrolled with gradients from a handoff sample x_{k-1} to an image; the image is noised to a
  random level t of the segment and denoised by the teacher and by a "fake" denoiser that is
  trained online (``fake_updates`` steps per student step, denoising loss) on the student's own
  images; their x̂0 difference, normalised per image, is the gradient of the KL divergence from
  the teacher's distribution to the student's (:func:`dmd_direction`). Because the teacher's
  denoiser at every level defines the distribution its full stochastic segment samples, the
  student is pulled towards the full segment's distribution, not towards one sampler's outputs. A
  regression onto the teacher's ``teacher_steps``-level DDIM outputs from ``pairs`` fixed handoff
  samples (weight ``regression_weight``) keeps every mode covered. One stage per N.
* ``progressive`` (Salimans & Ho): stages of n = start_steps, start_steps/2, …, N student
  steps. In the first stage the teacher covers each student step with teacher_steps/start_steps
  DDIM steps of the EMA model; after that each stage's teacher is the previous stage's student,
  two of its steps per student step. The student's one DDIM step must land where the teacher's
  steps land: the target x̃0 solves DDIM(x_t, x̃0 → level s) = teacher(x_t → s), and the loss is
  w·‖x̂0_θ − x̃0‖² with w = (α_s − σ_s/σ_t·α_t)², the squared error of where the step lands
  (``weighting="landing"``; the paper's max(SNR_t, 1) is ``"truncated-snr"``: it amplifies the
  high-noise steps ~100× on a 1000-level linear schedule). Every stage's student is kept. By
  default (measured best on short budgets) there is one stage straight from the teacher
  (start_steps = N), and N = 1 is halved from a 2-step stage: a student that starts as the
  teacher's own N-step DDIM and is pushed through extra halving stages only loses accuracy.
* ``consistency`` (Song et al., consistency distillation): one student f_θ(x_t, t) = x̂0 over the
  teacher's fine timetable; the target of f_θ(x_{t_j}) is f_θ⁻(x_{t_{j+1}}), x_{t_{j+1}} one teacher
  DDIM step from x_{t_j}, θ⁻ an EMA of θ; at the last level the target is the teacher's clean image.
  The student then runs at any N with the same deterministic steps.

Distillation is resumable (``--resume``) from checkpoints written like training's
(``OUT/checkpoints/step_N``, safetensors + sha256, atomic), with a tqdm progress bar. A student is
written as ``OUT/student_n{N}.safetensors`` (EMA weights) + ``OUT/student_n{N}.json`` (its
timetable, method, teacher and run), both atomically.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from collafuse_edge.files import atomic_write_json, sha256_file
from collafuse_edge.schedule import Schedule, Timetable, ddim_step, distilled_timetable
from collafuse_edge.validation import check_choice, check_int, check_number

from .checkpoint import (LoadedRun, ModelState, latest_checkpoint, load_rng, load_run, load_weights, read_state,
                         restore_model_state, save_checkpoint)
from .errors import CheckpointError, ConfigError
from .models import build_unet, denoise

DISTILL_METHODS = ("progressive", "consistency", "dmd")
WEIGHTINGS = ("landing", "truncated-snr")
STUDENT_STEPS = (1, 2, 4, 8)
STUDENT_FORMAT = "collafuse-distilled-student"
STUDENT_FORMAT_VERSION = 1
CONFIG_NAME = "distill.json"


@dataclass(frozen=True)
class DistillConfig:
    """How to distil client ``client`` of a run into an N-step student."""

    client: int = 0
    steps: int = 4  # N: model calls per image of the final student (1, 2, 4 or 8)
    method: str = "dmd"
    teacher_steps: int = 32  # DDIM levels of the teacher's sampler over the segment
    # progressive: the first stage's student steps, a power-of-two multiple of N. None: N, and 2 for
    # N = 1 (measured best: one stage straight from the teacher; 1 step halved from 2)
    start_steps: int | None = None
    iters: int = 300  # optimisation steps per stage (progressive) or in all (consistency)
    batch_size: int = 64
    lr: float | None = None  # None: 2e-5 for dmd, 1e-4 for progressive and consistency
    ema_decay: float = 0.99  # the student's EMA (the weights written); consistency: also the target θ⁻
    grad_clip: float = 1.0
    # progressive: "landing" weighs each row's x̂0 error by (α_s − σ_s/σ_t·α_t)², i.e. the squared
    # error of where the student's step lands; "truncated-snr" is the paper's max(SNR_t, 1)
    weighting: str = "landing"
    checkpoint_every: int = 100
    seed: int = 0
    device: str = "cpu"
    # dmd: the weight of the regression onto the teacher's DDIM outputs (keeps every mode), the
    # online ("fake") denoiser's learning rate and updates per student step, and how many
    # (handoff sample, teacher output) pairs the regression draws from
    regression_weight: float = 0.25
    fake_lr: float = 1e-4
    fake_updates: int = 2
    pairs: int = 1024

    def __post_init__(self) -> None:
        check_int("client", self.client, low=0, error=ConfigError)
        check_choice("steps (model calls per image)", self.steps, STUDENT_STEPS, error=ConfigError)
        if self.start_steps is None:
            object.__setattr__(self, "start_steps", max(self.steps, 2))
        if self.lr is None:
            object.__setattr__(self, "lr", 2e-5 if self.method == "dmd" else 1e-4)
        check_choice("method", self.method, DISTILL_METHODS, error=ConfigError)
        check_choice("weighting", self.weighting, WEIGHTINGS, error=ConfigError)
        for name in ("teacher_steps", "start_steps", "iters", "batch_size", "checkpoint_every", "fake_updates", "pairs"):
            check_int(name, getattr(self, name), low=1, error=ConfigError)
        check_number("lr", self.lr, low=0, error=ConfigError)
        if not (0.0 <= self.ema_decay < 1.0):
            raise ConfigError(f"ema_decay must lie in [0, 1), got {self.ema_decay}")
        check_number("grad_clip", self.grad_clip, low=0, error=ConfigError)
        check_number("regression_weight", self.regression_weight, low=0, error=ConfigError)
        check_number("fake_lr", self.fake_lr, low=0, error=ConfigError)
        if self.method == "progressive":
            ratio = self.start_steps / self.steps
            if self.start_steps < self.steps or ratio != int(ratio) or int(ratio) & (int(ratio) - 1):
                raise ConfigError(f"start_steps ({self.start_steps}) must be N ({self.steps}) times a power of two "
                                  "(progressive distillation halves the steps each stage)")
            r = self.teacher_steps / self.start_steps
            if r != int(r) or r < 2:
                raise ConfigError(f"teacher_steps ({self.teacher_steps}) must be a multiple ≥ 2× of start_steps "
                                  f"({self.start_steps}): the teacher covers each first-stage step with whole steps")
        elif self.teacher_steps < 2:
            raise ConfigError(f"{self.method} distillation needs teacher_steps ≥ 2")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Stage:
    """One distillation stage: the student runs ``student_steps`` steps; the teacher covers each
    with ``substeps`` steps (its timetable has student_steps·substeps levels)."""

    student_steps: int
    substeps: int
    teacher: str  # "model" (the site's EMA client model) or "student_n{2n}" (the previous stage)


def stages(dc: DistillConfig, k: int) -> list[Stage]:
    """The stages of ``dc`` for a client segment of ``k`` levels (timetables capped at k levels)."""
    if dc.method == "consistency":
        return [Stage(0, min(dc.teacher_steps, k), "model")]
    if dc.method == "dmd":  # one stage: the N-step student, the teacher's fine DDIM for the regression pairs
        return [Stage(dc.steps, min(dc.teacher_steps, k), "model")]
    out = []
    n = dc.start_steps
    first = min(dc.teacher_steps, k) // n  # teacher DDIM steps per first-stage student step
    out.append(Stage(n, max(first, 1), "model"))
    while n > dc.steps:
        n //= 2
        out.append(Stage(n, 2, f"student_n{2 * n}"))
    for s in out:
        if s.student_steps * s.substeps > k:
            raise ConfigError(f"a client of {k} levels cannot be distilled with {s.student_steps}×{s.substeps} "
                              "teacher steps; lower start_steps/teacher_steps")
    return out


# ------------------------------------------------------------------------------------ maths


def _ab(schedule: Schedule, levels: torch.Tensor) -> torch.Tensor:
    """ᾱ at integer levels (-1 → 1) as float32 ``[B,1,1,1]``."""
    ab = torch.from_numpy(schedule.alpha_bar(levels.cpu().numpy())).to(torch.float32)
    return ab.view(-1, 1, 1, 1).to(levels.device)


def x0_from_eps(schedule: Schedule, x: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x̂0 = (x_t − √(1−ᾱ_t)·ε̂)/√ᾱ_t, unclipped (the student's prediction in training)."""
    ab = _ab(schedule, t)
    return (x - (1 - ab).sqrt() * eps) / ab.sqrt()


def ddim_target_x0(schedule: Schedule, x_t: torch.Tensor, x_s: torch.Tensor, t: torch.Tensor,
                   s: torch.Tensor) -> torch.Tensor:
    """The x̃0 with which one deterministic DDIM step from x_t (level t) lands exactly on x_s
    (level s < t): x_s = α_s·x̃0 + σ_s·(x_t − α_t·x̃0)/σ_t, solved for x̃0 (s = -1: x̃0 = x_s)."""
    ab_t, ab_s = _ab(schedule, t), _ab(schedule, s)
    a_t, sg_t, a_s, sg_s = ab_t.sqrt(), (1 - ab_t).sqrt(), ab_s.sqrt(), (1 - ab_s).sqrt()
    r = sg_s / sg_t
    return (x_s - r * x_t) / (a_s - r * a_t)


def landing_weight(schedule: Schedule, t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """(α_s − σ_s/σ_t·α_t)²: how an x̂0 error of one DDIM step t → s moves the sample it lands on
    (1 for the last step, s = -1)."""
    ab_t, ab_s = _ab(schedule, t), _ab(schedule, s)
    return (ab_s.sqrt() - ((1 - ab_s) / (1 - ab_t)).sqrt() * ab_t.sqrt()) ** 2


def snr_weight(schedule: Schedule, t: torch.Tensor) -> torch.Tensor:
    """max(SNR_t, 1): the truncated-SNR weighting of the x̂0 loss."""
    ab = _ab(schedule, t)
    return torch.clamp(ab / (1 - ab), min=1.0)


def unroll_student(model: torch.nn.Module, schedule: Schedule, x: torch.Tensor, levels: np.ndarray,
                   labels: torch.Tensor | None) -> torch.Tensor:
    """The student's N deterministic DDIM steps over ``levels`` (ending at clean), differentiable:
    the shared :func:`ddim_step` with x̂0 unclipped. Returns the final image, unclipped — the
    distilled sampler (:func:`collafuse.sampling.run_distilled`, the edge's ``"distilled"``) is
    this followed by clipping the image."""
    import dataclasses

    free = dataclasses.replace(schedule, clip_sample=False)
    lv = [int(v) for v in levels] + [-1]
    B = x.shape[0]
    for t, s in zip(lv[:-1], lv[1:]):
        tt = torch.full((B,), t, dtype=torch.long, device=x.device)
        x = ddim_step(free, x, denoise(model, x, tt, labels), t, s)
    return x


def dmd_direction(teacher: torch.nn.Module, fake: torch.nn.Module, schedule: Schedule, x0: torch.Tensor,
                  t: torch.Tensor, noise: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """Distribution matching (Yin et al.): the direction in which the student's images x0 should
    *not* move. x0 is noised to level t; the teacher's x̂0 points towards the distribution its
    denoiser learnt (its full segment's), the fake denoiser's towards the one the student makes
    now; their difference, normalised per image by the mean |x0 − teacher x̂0|, is the gradient of
    the KL divergence between the two at level t (up to a per-level weight)."""
    with torch.no_grad():
        x_t = schedule.add_noise(x0, noise, t.cpu().numpy())
        real = x0_from_eps(schedule, x_t, denoise(teacher, x_t, t, labels), t)
        fake_x0 = x0_from_eps(schedule, x_t, denoise(fake, x_t, t, labels), t)
        w = (x0 - real).abs().mean(dim=(1, 2, 3), keepdim=True).clamp_min(1e-4)
        return (fake_x0 - real) / w


@torch.no_grad()
def teacher_steps_from(model: torch.nn.Module, schedule: Schedule, x: torch.Tensor, levels: np.ndarray,
                       start: torch.Tensor, count: int, labels: torch.Tensor | None,
                       *, student: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``count`` deterministic DDIM steps of ``model`` from x at per-row timetable index
    ``start`` (over ``levels``, ending at -1). Returns (sample, its per-row level). The site's model
    steps as its DDIM sampler does (x̂0 clipped); a ``student`` teacher as the distilled sampler
    does (x̂0 unclipped, the clean image clipped)."""
    import dataclasses

    free = dataclasses.replace(schedule, clip_sample=False) if student else schedule
    lv = torch.from_numpy(np.append(levels, -1)).to(x.device)
    idx = start.clone()
    for _ in range(count):
        t, prev = lv[idx], lv[idx + 1]
        eps = denoise(model, x, t, labels)
        x = ddim_step(free, x, eps, t.cpu().numpy(), prev.cpu().numpy())
        idx = idx + 1
    if student and schedule.clip_sample:
        done = (lv[idx] < 0).view(-1, 1, 1, 1)
        r = schedule.clip_sample_range
        x = torch.where(done, x.clamp(-r, r), x)
    return x, lv[idx]


# ------------------------------------------------------------------------------------ students


@dataclass
class Student:
    """A distilled student: its model (eval mode) and what it was trained for."""

    model: torch.nn.Module
    steps: int
    timetable: Timetable
    meta: dict = field(repr=False)

    @property
    def client(self) -> int:
        return int(self.meta["client"])

    @property
    def client_levels(self) -> int:
        return int(self.meta["client_levels"])


def student_paths(out_dir: str, steps: int) -> tuple[str, str]:
    return (os.path.join(out_dir, f"student_n{steps}.json"), os.path.join(out_dir, f"student_n{steps}.safetensors"))


def _write_student(out_dir: str, steps: int, model: torch.nn.Module, meta: dict) -> str:
    meta_path, weights = student_paths(out_dir, steps)
    tmp = weights + ".tmp"
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, tmp)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, weights)
    doc = {**meta, "format": STUDENT_FORMAT, "format_version": STUDENT_FORMAT_VERSION, "steps": steps,
           "levels": [int(v) for v in distilled_timetable(meta["client_levels"], steps).levels],
           "weights": os.path.basename(weights), "weights_sha256": sha256_file(weights)}
    atomic_write_json(meta_path, doc)
    return meta_path


def load_student(path: str, run: LoadedRun | None = None, device: str | torch.device = "cpu") -> Student:
    """Read ``student_n{N}.json`` (and its safetensors next to it), checking format, hash and — with
    ``run`` — that it was distilled for this run's client (same cut, schedule and architecture)."""
    if not os.path.isfile(path):
        raise ConfigError(f"student {path!r} does not exist; pass the student_n{{N}}.json that `collafuse distill` "
                          "wrote")
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"student {path!r} is not valid JSON ({str(e)[:200]})") from e
    if not isinstance(meta, dict) or meta.get("format") != STUDENT_FORMAT:
        raise ConfigError(f"{path!r} is not a distilled student description (format {STUDENT_FORMAT!r}); "
                          "pass the student_n{N}.json that `collafuse distill` wrote")
    if meta.get("format_version") != STUDENT_FORMAT_VERSION:
        raise ConfigError(f"student {path!r} has format_version {meta.get('format_version')!r:.20}; this collafuse "
                          f"reads {STUDENT_FORMAT_VERSION}")
    try:
        steps, k, client = int(meta["steps"]), int(meta["client_levels"]), int(meta["client"])
        model_cfg, weights_name, digest = meta["model_config"], str(meta["weights"]), str(meta["weights_sha256"])
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"student {path!r} is missing or has a malformed field ({e})") from e
    tt = distilled_timetable(k, steps)
    if [int(v) for v in meta.get("levels", [])] != tt.levels.tolist():
        raise ConfigError(f"student {path!r} lists levels {meta.get('levels')!r:.80} that are not the {steps}-step "
                          f"timetable of a {k}-level client")
    weights = os.path.join(os.path.dirname(os.path.abspath(path)), os.path.basename(weights_name))
    if not os.path.isfile(weights):
        raise ConfigError(f"student weights {weights!r} are missing; copy the .json and .safetensors together")
    if sha256_file(weights) != digest:
        raise ConfigError(f"student weights {weights!r} do not match the sha256 in {path!r}: modified or damaged")
    if run is not None:
        cfg = run.config
        if not (0 <= client < cfg.data.num_clients) or cfg.client_levels[client] != k:
            raise ConfigError(f"student {path!r} was distilled for client {client} with {k} levels; run "
                              f"{run.run_dir!r} gives that client {cfg.client_levels[client] if 0 <= client < cfg.data.num_clients else 'no'} levels")
        if int(meta.get("num_train_timesteps", -1)) != run.schedule.T:
            raise ConfigError(f"student {path!r} was distilled for T={meta.get('num_train_timesteps')}, "
                              f"the run has T={run.schedule.T}")
    from .config import ModelConfig

    try:
        mc = ModelConfig(**model_cfg)
    except (TypeError, ValueError, ConfigError) as e:
        raise ConfigError(f"student {path!r} has an invalid model_config ({e})") from e
    model = build_unet(mc)
    load_weights(model, weights)
    model.distilled_timetable = tt  # collafuse.sampling.split_sample runs the student over exactly these levels
    model.distilled_steps = steps
    return Student(model.to(device).eval(), steps, tt, meta)


# ------------------------------------------------------------------------------------ the run


@dataclass(frozen=True)
class DistillResult:
    out_dir: str
    students: dict  # N → path of student_n{N}.json
    step: int
    wall_s: float
    last_loss: float | None


def _site_data(run: LoadedRun, client: int):
    """The client's own training images and labels (a site run: its own share)."""
    from .data import load_dataset, partition

    cfg = run.config
    ds = load_dataset(cfg.data.source, cfg.data.image_size)
    part = partition(ds, cfg.data)[client]
    return torch.from_numpy(part.train_images), torch.from_numpy(part.train_labels)


def _model_config(run: LoadedRun):
    from .checkpoint import model_configs

    ccfg, _ = model_configs(run.config, run.data)
    return ccfg


class Distiller:
    """Holds the teacher, the current stage's student and the site's data; :meth:`run` distils."""

    def __init__(self, run_dir: str, dc: DistillConfig, out_dir: str | None = None):
        self.dc = dc
        self.run_dir = run_dir
        self.device = torch.device(dc.device)
        self.loaded = load_run(run_dir, device=self.device)
        n_clients = len(self.loaded.clients)
        if dc.client >= n_clients or self.loaded.clients[dc.client] is None:
            mine = self.loaded.site["client_index"] if self.loaded.site else None
            raise ConfigError(f"run {run_dir!r} holds no client model {dc.client}"
                              + (f"; it is the site run of client {mine}: pass --client {mine}" if mine is not None
                                 else f"; choose a client in [0, {n_clients - 1}]"))
        self.schedule = self.loaded.schedule
        self.k = self.loaded.config.client_levels[dc.client]
        if self.k < 1:
            raise ConfigError(f"client {dc.client} has cut ratio 0 and no levels to distil")
        if dc.steps > self.k:
            raise ConfigError(f"client {dc.client} runs {self.k} levels; a student of {dc.steps} steps would not be "
                              "fewer")
        self.stages = stages(dc, self.k)
        self.out_dir = out_dir or os.path.join(run_dir, "distill", f"client_{dc.client}")
        self.teacher = self.loaded.clients[dc.client]
        self.teacher.requires_grad_(False)
        self.mcfg = _model_config(self.loaded)
        self.x, self.y = _site_data(self.loaded, dc.client)
        self.conditional = self.loaded.config.class_conditional
        self.gen = torch.Generator().manual_seed(dc.seed)
        self.step = 0
        self.ms: ModelState | None = None
        self.stage_teacher: torch.nn.Module | None = None
        self._stage_index = -1
        self.fake: ModelState | None = None  # dmd: the online denoiser of the student's images
        self.pairs = None  # dmd: (handoff samples, labels, the teacher's DDIM outputs)

    # -- bookkeeping ------------------------------------------------------------------------

    @property
    def total_steps(self) -> int:
        return self.dc.iters * len(self.stages)

    def _meta(self, stage: Stage) -> dict:
        cfg = self.loaded.config
        teacher_ckpt = latest_checkpoint(self.run_dir)
        return {"client": self.dc.client, "cut_ratio": float(cfg.cut_ratios[self.dc.client]),
                "client_levels": self.k, "handoff_level": self.k - 1, "num_train_timesteps": self.schedule.T,
                "method": self.dc.method, "model_config": asdict(self.mcfg),
                "teacher": {"run": os.path.abspath(self.run_dir), "step": self.loaded.step,
                            "checkpoint": os.path.basename(teacher_ckpt) if teacher_ckpt else None,
                            "sampler": (f"its denoiser at every level (distribution matching); regression onto ddim, "
                                        f"{min(self.dc.teacher_steps, self.k)} levels, eta 0"
                                        if self.dc.method == "dmd" else
                                        f"ddim, {min(self.dc.teacher_steps, self.k)} levels, eta 0"),
                            "site": self.loaded.site},
                "distill": {**self.dc.to_dict(), "stage_teacher": stage.teacher,
                            "stage_substeps": stage.substeps}}

    def _new_state(self, init: torch.nn.Module, name: str = "student", lr: float | None = None) -> ModelState:
        from diffusers.training_utils import EMAModel

        model = build_unet(self.mcfg).to(self.device)
        model.load_state_dict(init.state_dict())
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=self.dc.lr if lr is None else lr, weight_decay=0.0)
        ema = EMAModel(model.parameters(), decay=self.dc.ema_decay, foreach=True)
        ema.to(self.device)
        return ModelState(name, model, ema, opt)

    @torch.no_grad()
    def _regression_pairs(self, st: Stage) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """dmd: ``pairs`` handoff samples x_{k-1} ~ q(·|x0) of the site's images and the teacher's
        DDIM output from each (``st.substeps`` levels, the site's own sampler), drawn from a
        generator of their own so that a resumed run rebuilds the same pairs."""
        from .sampling import run_levels

        g = torch.Generator().manual_seed(self.dc.seed + 1)
        fine = distilled_timetable(self.k, st.substeps)
        xs, labs, ys = [], [], []
        chunk = 256
        for lo in range(0, self.dc.pairs, chunk):
            n = min(chunk, self.dc.pairs - lo)
            idx = torch.randint(len(self.y), (n,), generator=g)
            x0 = self.x[idx].to(self.device)
            lab = self.y[idx].to(self.device) if self.conditional else None
            eps = torch.randn(x0.shape, generator=g).to(self.device)
            x_h = self.schedule.add_noise(x0, eps, np.full(n, self.k - 1))
            ys.append(run_levels(self.teacher, self.schedule, x_h, fine, lab, sampler="ddim"))
            xs.append(x_h)
            labs.append(lab)
        return torch.cat(xs), (torch.cat(labs) if self.conditional else None), torch.cat(ys)

    def _load_student_model(self, steps: int) -> torch.nn.Module:
        return load_student(student_paths(self.out_dir, steps)[0], self.loaded, self.device).model

    def _enter_stage(self, i: int) -> None:
        """Set up stage ``i``: its teacher and a student initialised from that teacher."""
        st = self.stages[i]
        teacher = self.teacher if st.teacher == "model" else self._load_student_model(2 * st.student_steps)
        teacher.requires_grad_(False)
        self.stage_teacher = teacher.eval()
        self.ms = self._new_state(self.teacher if self.dc.method == "consistency" else teacher)
        if self.dc.method == "dmd":
            self.fake = self._new_state(self.teacher, name="fake", lr=self.dc.fake_lr)
            self.pairs = self._regression_pairs(st)
        self._stage_index = i

    def _ema_model(self) -> torch.nn.Module:
        m = build_unet(self.mcfg).to(self.device)
        self.ms.ema.copy_to(m.parameters())
        return m.eval()

    # -- persistence ------------------------------------------------------------------------

    def save(self) -> str:
        states = [self.ms] + ([self.fake] if self.dc.method == "dmd" else [])
        return save_checkpoint(self.out_dir, self.step, states, self.gen.get_state(),
                               extra={"stage": self._stage_index, "config": self.dc.to_dict()})

    def restore(self) -> None:
        ckpt = latest_checkpoint(self.out_dir)
        if ckpt is None:
            raise CheckpointError(f"nothing to resume in {self.out_dir!r}: it has no checkpoint")
        meta = read_state(ckpt)
        self.step = int(meta["step"])
        self.gen.set_state(load_rng(ckpt))
        i = min(self.step // self.dc.iters, len(self.stages) - 1)
        self._enter_stage(i)
        if self.step % self.dc.iters or self.step == self.total_steps:  # mid-stage (or done): its student
            restore_model_state(ckpt, meta, self.ms)
            if self.dc.method == "dmd":
                restore_model_state(ckpt, meta, self.fake)

    def _write_config(self, resume: bool) -> None:
        path = os.path.join(self.out_dir, CONFIG_NAME)
        doc = {"run": os.path.abspath(self.run_dir), "config": self.dc.to_dict()}
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                old = json.load(f)
            if old.get("config") != json.loads(json.dumps(doc["config"])):
                if resume:
                    raise ConfigError(f"{self.out_dir!r} was distilled with other settings ({old.get('config')}); "
                                      "resume with the same flags or choose a new --out")
        elif resume:
            raise CheckpointError(f"nothing to resume in {self.out_dir!r}: no {CONFIG_NAME}")
        atomic_write_json(path, doc)

    # -- one optimisation step --------------------------------------------------------------

    def _batch(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        idx = torch.randint(len(self.y), (self.dc.batch_size,), generator=self.gen)
        x0 = self.x[idx].to(self.device)
        lab = self.y[idx].to(self.device) if self.conditional else None
        return x0, lab

    def _noised(self, x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        eps = torch.randn(x0.shape, generator=self.gen).to(self.device)
        return self.schedule.add_noise(x0, eps, t.cpu().numpy())

    def _loss(self) -> torch.Tensor:
        st = self.stages[self._stage_index]
        x0, lab = self._batch()
        B = x0.shape[0]
        model = self.ms.model
        if self.dc.method == "progressive":
            n, m = st.student_steps, st.substeps
            fine = distilled_timetable(self.k, n * m).levels
            i = torch.randint(n, (B,), generator=self.gen).to(self.device)
            t = torch.from_numpy(fine).to(self.device)[i * m]
            x_t = self._noised(x0, t)
            x_s, s = teacher_steps_from(self.stage_teacher, self.schedule, x_t, fine, i * m, m, lab,
                                        student=st.teacher != "model")
            target = ddim_target_x0(self.schedule, x_t, x_s, t, s)
            pred = x0_from_eps(self.schedule, x_t, denoise(model, x_t, t, lab), t)
            w = landing_weight(self.schedule, t, s) if self.dc.weighting == "landing" else snr_weight(self.schedule, t)
            return (w * (pred - target) ** 2).mean()
        # consistency distillation over the teacher's fine timetable
        fine = distilled_timetable(self.k, st.substeps).levels
        j = torch.randint(len(fine), (B,), generator=self.gen).to(self.device)
        t = torch.from_numpy(fine).to(self.device)[j]
        x_t = self._noised(x0, t)
        x_s, s = teacher_steps_from(self.stage_teacher, self.schedule, x_t, fine, j, 1, lab)
        with torch.no_grad():
            target_model = self._ema_model()
            inner = s >= 0
            target = x_s.clone()  # s = -1: the teacher's clean image (the boundary condition)
            if bool(inner.any()):
                si = s[inner]
                li = lab[inner] if lab is not None else None
                target[inner] = x0_from_eps(self.schedule, x_s[inner], denoise(target_model, x_s[inner], si, li), si)
        pred = x0_from_eps(self.schedule, x_t, denoise(model, x_t, t, lab), t)
        return ((pred - target) ** 2).mean()

    def _dmd_step(self) -> torch.Tensor:
        """dmd: one student step (distribution matching + the regression onto the teacher's DDIM
        outputs), then ``fake_updates`` steps of the fake denoiser on the student's images."""
        dc, sch, k = self.dc, self.schedule, self.k
        levels = distilled_timetable(k, dc.steps).levels
        x0, lab = self._batch()
        B = x0.shape[0]
        x_h = self._noised(x0, torch.full((B,), k - 1, dtype=torch.long, device=self.device))
        images = unroll_student(self.ms.model, sch, x_h, levels, lab)
        lo = max(1, round(0.02 * k))  # as in the method: the lowest 2 % of levels carry no signal
        t = torch.randint(lo, k, (B,), generator=self.gen).to(self.device) if k > lo else \
            torch.full((B,), k - 1, dtype=torch.long, device=self.device)
        noise = torch.randn(x0.shape, generator=self.gen).to(self.device)
        self.fake.model.eval()
        direction = dmd_direction(self.teacher, self.fake.model, sch, images.detach(), t, noise, lab)
        self.fake.model.train()
        loss = 0.5 * ((images - (images.detach() - direction)) ** 2).mean()
        if dc.regression_weight > 0:
            px, pl, py = self.pairs
            j = torch.randint(len(px), (max(B // 2, 1),), generator=self.gen).to(self.device)
            out = unroll_student(self.ms.model, sch, px[j], levels, pl[j] if pl is not None else None)
            loss = loss + dc.regression_weight * ((out - py[j]) ** 2).mean()
        r = sch.clip_sample_range if sch.clip_sample else None
        fake_in = images.detach().clamp(-r, r) if r is not None else images.detach()
        for _ in range(dc.fake_updates):
            tf = torch.randint(k, (B,), generator=self.gen).to(self.device)
            e = torch.randn(x0.shape, generator=self.gen).to(self.device)
            x_t = sch.add_noise(fake_in, e, tf.cpu().numpy())
            lf = ((denoise(self.fake.model, x_t, tf, lab) - e) ** 2).mean()
            fo = self.fake.optimizer
            fo.zero_grad(set_to_none=True)
            lf.backward()
            torch.nn.utils.clip_grad_norm_(self.fake.model.parameters(), dc.grad_clip)
            fo.step()
        return loss

    def train_step(self) -> float:
        i = self.step // self.dc.iters
        if i != self._stage_index:
            self._enter_stage(i)
        loss = self._dmd_step() if self.dc.method == "dmd" else self._loss()
        ms = self.ms
        ms.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ms.model.parameters(), self.dc.grad_clip)
        ms.optimizer.step()
        ms.ema.step(ms.model.parameters())
        self.step += 1
        return float(loss.item())

    def _finish_stage(self) -> list[int]:
        """Write the student(s) of the stage just completed; returns their step counts."""
        st = self.stages[self._stage_index]
        model = self._ema_model()
        if self.dc.method in ("progressive", "dmd"):
            written = [st.student_steps]
        else:  # one consistency model serves every N up to the one asked for
            written = [n for n in STUDENT_STEPS if n <= max(self.dc.steps, 1) and n <= self.k]
        for n in written:
            _write_student(self.out_dir, n, model, self._meta(st))
        return written

    def run(self, *, resume: bool = False, progress: bool = True) -> DistillResult:
        from .run_lock import RunLock

        os.makedirs(self.out_dir, exist_ok=True)
        with RunLock(self.out_dir, "collafuse distill"):
            self._write_config(resume)
            if resume:
                self.restore()
            t0 = time.perf_counter()
            loss = None
            bar = tqdm(total=self.total_steps, initial=self.step, desc=f"distil client {self.dc.client}",
                       disable=not progress, dynamic_ncols=True)
            log = os.path.join(self.out_dir, "metrics.jsonl")
            with open(log, "a", encoding="utf-8") as mf:
                while self.step < self.total_steps:
                    loss = self.train_step()
                    bar.update(1)
                    if not math.isfinite(loss):
                        raise CheckpointError(f"distillation diverged at step {self.step} (loss {loss}); lower --lr "
                                              "and resume from the last checkpoint")
                    mf.write(json.dumps({"step": self.step, "stage": self._stage_index, "loss": loss}) + "\n")
                    end_of_stage = self.step % self.dc.iters == 0
                    if end_of_stage:
                        self._finish_stage()
                    if end_of_stage or self.step % self.dc.checkpoint_every == 0:
                        self.save()
                    bar.set_postfix(stage=self._stage_index, loss=f"{loss:.4f}", refresh=False)
            bar.close()
            students = {n: student_paths(self.out_dir, n)[0] for n in STUDENT_STEPS
                        if os.path.isfile(student_paths(self.out_dir, n)[0])}
            return DistillResult(self.out_dir, students, self.step, time.perf_counter() - t0, loss)


def distill(run_dir: str, dc: DistillConfig, out_dir: str | None = None, *, resume: bool = False,
            progress: bool = True) -> DistillResult:
    """Distil client ``dc.client`` of ``run_dir`` (a trained run or a site's client-train run)."""
    torch.manual_seed(dc.seed)
    return Distiller(run_dir, dc, out_dir).run(resume=resume, progress=progress)


# ------------------------------------------------------------------------------------ sampling


@torch.no_grad()
def student_finish(student: Student, schedule: Schedule, handoff: torch.Tensor, labels=None,
                   *, seed: int = 0) -> torch.Tensor:
    """The student's N deterministic DDIM steps from handoff samples (level k-1) to images
    (:func:`collafuse.sampling.run_distilled`): the torch twin of the edge sampler
    ``SamplerConfig("distilled", N)``."""
    from .sampling import run_distilled

    return run_distilled(student.model, schedule, handoff, student.timetable, labels, seed=seed)


__all__ = ["DISTILL_METHODS", "STUDENT_STEPS", "DistillConfig", "DistillResult", "Distiller", "Stage", "Student",
           "ddim_target_x0", "distill", "dmd_direction", "load_student", "stages", "student_finish", "student_paths",
           "unroll_student", "x0_from_eps"]
