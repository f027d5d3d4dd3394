"""A few-step client, measured: distilled students against the teacher's full segment and DDIM
with the same number of client calls (docs/results.md, "A few-step client").

Four parts, each printing a table and writing JSON (``--part all`` runs them in order):

* ``samplers`` — no distillation: the teacher's deterministic DDIM and ancestral DDIM at 4 … 128
  levels against its full segment, and the floor (real images against held-out ones): what a
  student that imitates one of these samplers can reach at best.
* ``method`` — progressive vs distribution matching (dmd) vs consistency distillation on one
  client (same number of optimisation steps, same data, same teacher), FD/KD at N = 1, 2, 4, 8: which method the product uses.
* ``quality`` — per cut ratio (one client each) and per seed: distil (``--method``, seeded), then
  FD/KD in classifier feature space against the client's held-out images for the
  teacher's full segment (DDPM, every level), DDIM with N client calls and the distilled N-step
  student, N = 1, 2, 4, 8. The server's levels are the same for every row of a seed (the handoff
  samples are computed once), so rows differ only in the client's part. Mean and 95 % t-interval
  over seeds.
* ``cost`` — per row: client FLOPs per image (counted with torch's FlopCounterMode × calls, and
  as a share of generating fully locally with the same model over all T levels), edge latency per
  image at B = 1 and 16 (exported bundles on onnxruntime's CPU provider, 2 threads, the whole
  client loop of ``collafuse-edge``), bytes on the wire per image; and a sample grid per row
  (docs/img/few_step_grid.png).
* ``grid`` (not in ``all``) — the sample grid alone, for the students in ``--students``, from the
  torch samplers: full segment, DDIM-N and the student per N of ``--steps``.

    python benchmarks/few_step_client.py --run RUN --part all --out docs/data

RUN is a ``collafuse train`` run with one client per cut ratio (e.g. ``--clients 2 --partition
iid --cut-ratio 0.6,0.2``). Sizes (images, iterations, seeds) are flags; the JSON records them
and the machine.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

STEPS = (8, 4, 2, 1)


def _machine() -> dict:
    from collafuse_edge.bench import machine_description

    return machine_description()


def _t_interval(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of a 95 % Student-t interval."""
    v = np.asarray(values, dtype=np.float64)
    if v.size < 2:
        return float(v.mean()), float("nan")
    from scipy import stats

    half = stats.t.ppf(0.975, v.size - 1) * v.std(ddof=1) / math.sqrt(v.size)
    return float(v.mean()), float(half)


class Setup:
    """A run, its feature extractor and per-client data, shared by the parts."""

    def __init__(self, run_dir: str, threads: int):
        import torch

        from collafuse.checkpoint import load_run
        from collafuse.data import load_dataset, partition
        from collafuse.evaluate import EvalConfig, feature_extractor

        torch.set_num_threads(threads)
        self.run = load_run(run_dir)
        self.run_dir = run_dir
        self.extractor, self.feature_info = feature_extractor(self.run, EvalConfig())
        cfg = self.run.config
        self.truths = partition(load_dataset(cfg.data.source, cfg.data.image_size), cfg.data)
        self._real = {}

    def k(self, client: int) -> int:
        return self.run.config.client_levels[client]

    def handoff(self, client: int, n: int, seed: int, server_steps: int):
        """Handoff samples of ``n`` images (labels cycling through the client's classes): the
        server's DDIM over ``server_steps`` levels from initial_noise(seed)."""
        import torch

        from collafuse.evaluate import cycle_labels
        from collafuse.sampling import run_levels
        from collafuse_edge.noise import initial_noise
        from collafuse_edge.schedule import server_timetable

        run, k = self.run, self.k(client)
        labels = cycle_labels(self.truths[client].classes, n)
        x = torch.from_numpy(initial_noise(seed, (n, run.data.channels, run.data.image_size, run.data.image_size)))
        share = run.config.server_conditioning == "label"
        x = run_levels(run.server, run.schedule, x, server_timetable(run.schedule.T, k, server_steps),
                       labels if share else None, sampler="ddim", seed=seed)
        return x, labels

    def finish(self, client: int, x, labels, row: str, seed: int, student=None):
        """The client's part of one row: "full" (DDPM, every level), "ddim-N" or "distilled-N"."""
        from collafuse.distill import student_finish
        from collafuse.sampling import run_levels
        from collafuse_edge.schedule import client_timetable

        run, k = self.run, self.k(client)
        lab = labels if run.config.class_conditional else None
        if row == "full":
            return run_levels(run.clients[client], run.schedule, x, client_timetable(k, None), lab, sampler="ddpm",
                              seed=seed)
        kind, n = row.split("-")
        if kind in ("ddim", "ancestral"):  # ancestral: DDIM with eta = 1 (fresh noise every step)
            return run_levels(run.clients[client], run.schedule, x, client_timetable(k, int(n)), lab, sampler="ddim",
                              eta=1.0 if kind == "ancestral" else 0.0, seed=seed)
        return student_finish(student, run.schedule, x, lab, seed=seed)

    def quality(self, client: int, images, seed: int) -> dict:
        from collafuse.metrics import quality_scores

        truth = self.truths[client]
        if client not in self._real:
            self._real[client] = self.extractor.features(truth.test_images)
        q = quality_scores(images.float().numpy(), truth.test_images, self.extractor, real_features=self._real[client],
                           num_subsets=50, subset_size=min(len(images), len(truth.test_images)), seed=seed)
        return {"fd": q.fd, "kd": q.kd_mean}


def _distil(run_dir: str, client: int, method: str, iters: int, batch: int, seed: int, out: str, steps: int = 1,
            teacher_steps: int = 64, start_steps: int = 8, args=None):
    from collafuse.distill import DistillConfig, distill

    kw = {}
    if method == "dmd" and args is not None:
        kw = dict(regression_weight=args.regression_weight, fake_lr=args.fake_lr, fake_updates=args.fake_updates,
                  pairs=args.pairs)
    lr = args.lr if args is not None and args.lr else (5e-5 if method == "consistency" else None)  # None: the default
    dc = DistillConfig(client=client, steps=steps, method=method, teacher_steps=teacher_steps,
                       start_steps=start_steps if method == "progressive" else None,
                       iters=iters, batch_size=batch, lr=lr,
                       ema_decay=0.95 if method == "consistency" else 0.99, checkpoint_every=max(iters, 1), seed=seed,
                       **kw)
    t0 = time.perf_counter()
    res = distill(run_dir, dc, out, progress=False)
    return res, time.perf_counter() - t0


def _distil_every_n(setup: "Setup", client: int, args, seed: int, out: str,
                    method: str | None = None) -> tuple[dict, float, int]:
    """The students of ``args.steps`` (N). progressive: N = 8, 4 and 2 each distilled straight from
    the teacher's ``teacher_steps``-level DDIM (one stage each), N = 1 halved from the N = 2 student
    (a second stage); dmd: one run per N. Returns ({N: student json}, wall seconds, optimisation
    steps)."""
    paths, wall, steps = {}, 0.0, 0
    method = method or args.method
    if method == "dmd":
        plan = [(n, n) for n in args.steps]
    else:
        plan = [(n, n) for n in (8, 4) if n in args.steps] + ([(1, 2)] if {1, 2} & set(args.steps) else [])
    for n, start in plan:
        res, w = _distil(setup.run_dir, client, method, args.iters, args.batch, seed,
                         os.path.join(out, f"n{n}"), steps=n, teacher_steps=args.teacher_steps, start_steps=start,
                         args=args)
        paths.update({m: p for m, p in res.students.items() if m in args.steps})
        wall, steps = wall + w, steps + res.step
    return paths, wall, steps


def _table(rows: list[dict], cols: list[str]) -> str:
    def cell(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    table = [cols] + [[cell(r.get(c, "")) for c in cols] for r in rows]
    w = [max(len(r[i]) for r in table) for i in range(len(cols))]
    return "\n".join("  ".join(v.rjust(x) for v, x in zip(r, w)) for r in table)


# ------------------------------------------------------------------------------------ parts


def part_method(setup: Setup, args, work: str) -> dict:
    """Progressive vs consistency distillation on client ``args.method_client``, one seed, the same
    number of optimisation steps, the same teacher and data."""
    client = args.method_client
    x, lab = setup.handoff(client, args.images, seed=100, server_steps=args.server_steps)
    rows, timing = [], {}
    from collafuse.distill import load_student
    from collafuse.sampling import run_levels
    from collafuse_edge.schedule import distilled_timetable

    # what both methods imitate: the teacher's DDIM over its teacher_steps levels, from the same samples
    k = setup.k(client)
    ref = run_levels(setup.run.clients[client], setup.run.schedule, x, distilled_timetable(k, min(args.teacher_steps, k)),
                     lab if setup.run.config.class_conditional else None, sampler="ddim", seed=100)

    def mse(img) -> float:
        return float(((img - ref) ** 2).mean())

    for method in ("progressive", "dmd", "consistency"):
        if method in ("progressive", "dmd"):  # progressive: N = 8, 4, 2 from the teacher, N = 1 halved from 2
            paths, wall, n_steps = _distil_every_n(setup, client, args, 0, os.path.join(work, f"m_{method}"), method)
        else:  # one consistency model for every N, as many optimisation steps in all
            res, wall = _distil(setup.run_dir, client, method, args.iters * 4, args.batch, 0,
                                os.path.join(work, "m_consistency"), steps=8, teacher_steps=args.teacher_steps)
            paths, n_steps = res.students, res.step
        timing[method] = {"optimisation_steps": n_steps, "wall_s": wall}
        students = {n: load_student(p, setup.run) for n, p in paths.items()}
        for n in args.steps:
            img = setup.finish(client, x, lab, f"distilled-{n}", 100, students[n])
            rows.append({"method": method, "N": n, **setup.quality(client, img, 100), "mse_to_teacher": mse(img)})
        print(f"  {method}: {n_steps} optimisation steps in {wall:.0f} s", flush=True)
    for n in args.steps:
        img = setup.finish(client, x, lab, f"ddim-{n}", 100)
        rows.append({"method": "ddim (no distillation)", "N": n, **setup.quality(client, img, 100),
                     "mse_to_teacher": mse(img)})
    print(_table(rows, ["method", "N", "fd", "kd", "mse_to_teacher"]))
    return {"client": client, "cut_ratio": setup.run.config.cut_ratios[client], "images": args.images,
            "iters_per_stage_progressive": args.iters, "iters_per_n_dmd": args.iters,
            "iters_consistency": args.iters * 4, "batch": args.batch,
            "teacher_steps": args.teacher_steps,
            "timing": timing, "rows": rows}


def part_samplers(setup: Setup, args, work: str) -> dict:
    """The teacher's own samplers against its full segment, no distillation: deterministic DDIM
    (what trajectory distillation imitates) and ancestral DDIM (fresh noise every step) at
    M = 4 … 128 levels, on the same handoff samples, and the floor: real training images of the
    client against its held-out images. Tells what a student that imitates a sampler can reach."""
    client, seed = args.method_client, args.seeds[0]
    x, lab = setup.handoff(client, args.images, seed=seed, server_steps=args.server_steps)
    truth = setup.truths[client]
    rng = np.random.default_rng(seed)
    import torch

    sel = rng.choice(len(truth.train_images), size=min(args.images, len(truth.train_images)), replace=False)
    rows = [{"row": "real training images (floor)", "calls": 0,
             **setup.quality(client, torch.from_numpy(truth.train_images[sel]), seed)}]
    for row in ["full"] + [f"{kind}-{m}" for kind in ("ddim", "ancestral") for m in (4, 8, 16, 32, 64, 128)]:
        if row != "full" and int(row.split("-")[1]) > setup.k(client):
            continue
        t0 = time.perf_counter()
        img = setup.finish(client, x, lab, row, seed)
        rows.append({"row": row, "calls": setup.k(client) if row == "full" else int(row.split("-")[1]),
                     **setup.quality(client, img, seed), "wall_s": time.perf_counter() - t0})
    print(_table(rows, ["row", "calls", "fd", "kd"]))
    return {"client": client, "cut_ratio": setup.run.config.cut_ratios[client], "seed": seed, "images": args.images,
            "server_steps": args.server_steps, "rows": rows}


def part_grid(setup: Setup, args, work: str) -> dict:
    """A sample grid (docs/img/few_step_grid.png) of 16 images per row — full segment, DDIM-N and
    the student of ``--students`` at each N of ``--steps`` — from the same handoff samples."""
    import glob

    from collafuse.distill import load_student

    if args.students is None:
        raise SystemExit("--part grid needs --students (a folder holding student_n{N}.json)")
    paths = {int(os.path.basename(p)[len("student_n"):-len(".json")]): p
             for p in glob.glob(os.path.join(args.students, "**", "student_n*.json"), recursive=True)}
    client, seed = args.cost_client, args.seeds[0]
    x, lab = setup.handoff(client, 16, seed=seed, server_steps=args.server_steps)
    rows = ["full"] + [f"{kind}-{n}" for n in args.steps for kind in ("ddim", "distilled") if kind == "ddim"
                       or n in paths]
    grid = []
    for row in rows:
        st = load_student(paths[int(row.split("-")[1])], setup.run) if row.startswith("distilled") else None
        grid.append(setup.finish(client, x, lab, row, seed, st).numpy())
    return {"client": client, "seed": seed, "rows": rows,
            "students": {n: os.path.abspath(p) for n, p in paths.items()}, "grid": np.stack(grid)}


def _quality_rows(args) -> list[str]:
    """full segment, the teacher's own samplers at its ``teacher_steps`` levels (deterministic DDIM:
    what trajectory distillation imitates; ancestral: the same levels with fresh noise), then DDIM
    and the student at each N."""
    m = args.teacher_steps
    return (["full", f"ddim-{m}", f"ancestral-{m}"]
            + [f"{kind}-{n}" for n in args.steps for kind in ("ddim", "distilled") if not (kind == "ddim" and n == m)])


def part_quality(setup: Setup, args, work: str) -> dict:
    cfg = setup.run.config
    per = []  # one record per (client, seed, row)
    timing = []
    for client in args.clients:
        for seed in args.seeds:
            paths, wall, n_steps = _distil_every_n(setup, client, args, seed, os.path.join(work, f"q_c{client}_s{seed}"))
            timing.append({"client": client, "seed": seed, "distill_wall_s": wall, "optimisation_steps": n_steps})
            from collafuse.distill import load_student

            students = {n: load_student(p, setup.run) for n, p in paths.items()}
            t0 = time.perf_counter()
            x, lab = setup.handoff(client, args.images, seed=seed, server_steps=args.server_steps)
            for row in _quality_rows(args):
                st = students[int(row.split("-")[1])] if row.startswith("distilled") else None
                img = setup.finish(client, x, lab, row, seed, st)
                per.append({"client": client, "cut_ratio": cfg.cut_ratios[client], "seed": seed, "row": row,
                            **setup.quality(client, img, seed)})
            timing[-1]["eval_wall_s"] = time.perf_counter() - t0
            print(f"  client {client} (c = {cfg.cut_ratios[client]}) seed {seed}: distilled in {wall:.0f} s, "
                  f"evaluated in {timing[-1]['eval_wall_s']:.0f} s", flush=True)
    summary = []
    for client in args.clients:
        full_fd = [r["fd"] for r in per if r["client"] == client and r["row"] == "full"]
        for row in _quality_rows(args):
            sel = [r for r in per if r["client"] == client and r["row"] == row]
            fd, fd_ci = _t_interval([r["fd"] for r in sel])
            kd, kd_ci = _t_interval([r["kd"] for r in sel])
            ratio = _t_interval([r["fd"] / f for r, f in zip(sel, full_fd)])
            summary.append({"c": cfg.cut_ratios[client], "row": row, "calls": setup.k(client) if row == "full"
                            else min(int(row.split("-")[1]), setup.k(client)), "fd": fd, "fd_ci95": fd_ci, "kd": kd, "kd_ci95": kd_ci,
                            "fd_vs_full": ratio[0], "fd_vs_full_ci95": ratio[1], "seeds": len(sel)})
    print(_table(summary, ["c", "row", "calls", "fd", "fd_ci95", "fd_vs_full", "kd", "kd_ci95"]))
    return {"clients": args.clients, "seeds": args.seeds, "images": args.images, "iters_per_stage": args.iters,
            "batch": args.batch, "teacher_steps": args.teacher_steps, "server_steps": args.server_steps,
            "method": args.method, "lr": args.lr,
            "students": ("one dmd run per N" if args.method == "dmd" else
                         "N=8, 4, 2 one stage each from the teacher's DDIM; N=1 halved from N=2"),
            **({"regression_weight": args.regression_weight, "fake_lr": args.fake_lr,
                "fake_updates": args.fake_updates, "pairs": args.pairs} if args.method == "dmd" else {}),
            "timing": timing, "per_seed": per,
            "summary": summary}


def part_cost(setup: Setup, args, work: str, students_dir: str | None) -> dict:
    from collafuse.models import count_flops
    from collafuse_edge.bench import time_runs
    from collafuse_edge.noise import initial_noise
    from collafuse_edge.runtime import EdgeRuntime, Handoff
    from collafuse_edge.sampler import SamplerConfig
    from collafuse_edge.session import SessionConfig
    from export.client_export import export_client
    from export.exporter import ExportConfig

    client = args.cost_client
    run, k, T = setup.run, setup.k(client), setup.run.schedule.T
    if students_dir is None:
        paths, _, _ = _distil_every_n(setup, client, args, 0, os.path.join(work, "c_s0"))
    else:  # a folder holding student_n{N}.json, or one sub-folder per run (n8/, n4/, n1/)
        import glob

        paths = {int(os.path.basename(p)[len("student_n"):-len(".json")]): p
                 for p in glob.glob(os.path.join(students_dir, "**", "student_n*.json"), recursive=True)}
    flops_call = count_flops(run.clients[client])
    local = flops_call * T
    pixels = run.data.channels * run.data.image_size ** 2
    wire = 4 * pixels + (8 if run.config.server_conditioning == "label" else 0)
    cfg = ExportConfig(measure_speed=False)

    def bundle(name: str, student: str | None = None):
        out = os.path.join(work, name)
        if os.path.isfile(os.path.join(out, "manifest.json")) and args.reuse_bundles:
            return out
        return export_client(setup.run_dir, client, out, cfg, overwrite=True, student=student).bundle_dir

    teacher_b = bundle("b_teacher")
    sess = SessionConfig(intra_op_threads=2)
    rows, grid, timed = [], [], []
    x_h, lab = setup.handoff(client, 16, seed=0, server_steps=args.server_steps)
    for row in ["full"] + [f"ddim-{n}" for n in args.steps] + [f"distilled-{n}" for n in args.steps]:
        kind = row.split("-")[0]
        if kind == "distilled":
            n = int(row.split("-")[1])
            b = bundle(f"b_{row}", paths[n])
            sampler, calls = SamplerConfig(), n
        else:
            b = teacher_b
            sampler = SamplerConfig("ddpm") if kind == "full" else SamplerConfig("ddim", int(row.split("-")[1]))
            calls = k if kind == "full" else int(row.split("-")[1])
        rt = EdgeRuntime.open(b, sess)
        rec = {"row": row, "calls": calls, "client_mflop_per_image": flops_call * calls / 1e6,
               "share_of_local_pct": 100.0 * flops_call * calls / local, "wire_bytes_per_image": wire}
        for B in (1, 16):
            h = Handoff(initial_noise(0, (B, *rt.bundle.image_shape)), rt.bundle.handoff_level, seed=0)
            lb = rt.labels_for(B)
            timed.append((rec, B, kind, lambda rt=rt, h=h, lb=lb, sampler=sampler: rt.finish(h, lb, sampler=sampler)))
        h = Handoff(x_h.numpy(), rt.bundle.handoff_level, seed=0, labels=lab)
        grid.append(rt.finish(h, sampler=sampler)[:16])
        rows.append(rec)
    # timed round-robin over the rows, so a load change on the shared machine hits every row alike
    secs: dict = {}
    for fn in timed:
        fn[3]()  # warm-up
    for r in range(args.latency_rounds):
        for rec, B, kind, fn in timed:
            if kind == "full" and r >= 3:
                continue  # the full segment takes seconds a run: 3 runs
            secs.setdefault((rec["row"], B), []).extend(time_runs(fn, runs=1, warmup=0).tolist())
    for rec, B, kind, _ in timed:
        v = secs[(rec["row"], B)]
        rec[f"ms_per_image_b{B}"] = float(np.median(v)) * 1e3 / B
        rec[f"runs_b{B}"] = len(v)
    print(_table(rows, ["row", "calls", "client_mflop_per_image", "share_of_local_pct", "ms_per_image_b1",
                        "ms_per_image_b16", "wire_bytes_per_image"]))
    return {"client": client, "cut_ratio": run.config.cut_ratios[client], "client_levels": k, "T": T,
            "flops_per_call": flops_call, "local_flops_per_image": local, "onnxruntime_threads": 2,
            "latency": f"median of {args.latency_rounds} round-robin runs per row (the full segment: 3) of the whole "
                       "collafuse-edge client loop, onnxruntime CPU provider, fp32",
            "rows": rows, "grid": np.stack(grid)}


def write_grid(grid: np.ndarray, rows: list[str], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_rows, n_img = grid.shape[0], grid.shape[1]
    fig, axes = plt.subplots(n_rows, 1, figsize=(n_img * 0.45, n_rows * 0.55))
    for ax, g, name in zip(axes, grid, rows):
        strip = np.concatenate([np.clip((im[0] + 1) / 2, 0, 1) for im in g], axis=1)
        ax.imshow(strip, cmap="gray", vmin=0, vmax=1)
        ax.set_yticks([])
        ax.set_xticks([])
        ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=7)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True)
    p.add_argument("--part", choices=("samplers", "method", "quality", "cost", "grid", "all"), default="all",
                   help="all: samplers, method, quality, cost (grid: a sample grid of --students only)")
    p.add_argument("--out", default="docs/data", help="folder for few_step_client_<part>.json")
    p.add_argument("--img", default="docs/img", help="folder for the sample grid")
    p.add_argument("--work", default=None, help="scratch folder (students, bundles); default a temp dir")
    p.add_argument("--clients", type=lambda s: [int(v) for v in s.split(",")], default=[0, 1])
    p.add_argument("--method-client", type=int, default=0)
    p.add_argument("--cost-client", type=int, default=0)
    p.add_argument("--students", default=None, help="cost: a folder of students to export (default: distil one)")
    p.add_argument("--seeds", type=lambda s: [int(v) for v in s.split(",")], default=[0, 1, 2])
    p.add_argument("--images", type=int, default=200, help="generated images per (client, seed, row)")
    p.add_argument("--iters", type=int, default=150, help="optimisation steps per progressive stage")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--teacher-steps", type=int, default=32, help="DDIM levels of the teacher's sampler")
    p.add_argument("--method", choices=("progressive", "dmd"), default="dmd",
                   help="quality and cost: how the students are distilled")
    p.add_argument("--steps", type=lambda s: [int(v) for v in s.split(",")], default=list(STEPS),
                   help="student calls N to distil and score, e.g. 4 or 8,4,2,1")
    p.add_argument("--lr", type=float, default=None, help="student learning rate (default: the method's)")
    p.add_argument("--regression-weight", type=float, default=0.25, help="dmd")
    p.add_argument("--fake-lr", type=float, default=1e-4, help="dmd")
    p.add_argument("--fake-updates", type=int, default=2, help="dmd")
    p.add_argument("--pairs", type=int, default=1024, help="dmd")
    p.add_argument("--server-steps", type=int, default=20, help="server DDIM levels for the handoff samples")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--latency-rounds", type=int, default=40, help="cost: timed runs per row, round-robin")
    p.add_argument("--reuse-bundles", action="store_true", help="cost: keep bundles already exported in --work")
    args = p.parse_args(argv)
    if not args.steps or any(n not in STEPS for n in args.steps):
        p.error(f"--steps takes values among {STEPS}")
    for name in ("images", "iters", "batch", "server_steps", "threads", "teacher_steps", "latency_rounds"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be ≥ 1")
    from collafuse_edge.files import atomic_write_json, jsonable

    os.makedirs(args.out, exist_ok=True)
    work = args.work or tempfile.mkdtemp(prefix="few_step_")
    os.makedirs(work, exist_ok=True)
    setup = Setup(args.run, args.threads)
    parts = ("samplers", "method", "quality", "cost") if args.part == "all" else (args.part,)
    for part in parts:
        t0 = time.perf_counter()
        print(f"== {part}", flush=True)
        if part == "samplers":
            res = part_samplers(setup, args, work)
        elif part == "method":
            res = part_method(setup, args, work)
        elif part == "quality":
            res = part_quality(setup, args, work)
        elif part == "grid":
            res = part_grid(setup, args, work)
            os.makedirs(args.img, exist_ok=True)
            write_grid(res.pop("grid"), res["rows"], os.path.join(args.img, "few_step_grid.png"))
        else:
            res = part_cost(setup, args, work, args.students)
            os.makedirs(args.img, exist_ok=True)
            write_grid(res.pop("grid"), [r["row"] for r in res["rows"]], os.path.join(args.img, "few_step_grid.png"))
        res.update({"part": part, "run": os.path.abspath(args.run), "run_step": setup.run.step,
                    "feature_net": setup.feature_info, "machine": _machine(), "torch_threads": args.threads,
                    "wall_s": time.perf_counter() - t0})
        path = os.path.join(args.out, f"few_step_client_{part}.json")
        atomic_write_json(path, jsonable(res))
        print(f"wrote {path} ({res['wall_s']:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
