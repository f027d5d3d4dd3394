"""CollaFuse against federated learning (FedAvg): quality per client and client cost, side by side.

Per regime (data per client *scarce* or *ample* × partition ``iid`` / ``dirichlet:0.3`` /
``by-label``) and per seed, four arms train on the same client splits of the embedded digits
and are scored on each client's private held-out images (FD/KD in the project classifier's
feature space, :func:`collafuse.metrics.quality_scores`):

* ``fedavg``: :func:`collafuse.fedavg.train_fedavg` — every client trains the full chain of a
  client-size model, averaged by data size every R local steps (FedProx with ``--mu``);
  ``--fedavg-models`` adds FedAvg arms with larger models (the cost of matching quality);
* ``collafuse``: split training at cut ``--cut`` (clients' own small models below the cut, one
  shared server model above it, ``exact`` objective, labels shared);
* ``local``: c = 1, every client alone with its own model;
* ``centralised``: one server-size model on the pooled training splits (the privacy-violating
  reference).

The client's cost per training step and per generated image (counted FLOPs, counted peak memory,
bytes on the wire, measured wall time and latency) comes from :mod:`collafuse.client_cost`.
Each (regime, seed) cell is saved as soon as it is done, so ``--reuse`` resumes an interrupted
run. Summary: mean over seeds of the per-client mean FD and KD with a 95 % t-interval, and the
paired difference FedAvg − CollaFuse per seed.

    python benchmarks/fedavg_vs_collafuse.py --out runs/fedavg --plots-dir docs/img   # default
    python benchmarks/fedavg_vs_collafuse.py --quick --out runs/fedavg-quick           # smoke

Writes ``OUT/fedavg_vs_collafuse.json``, ``OUT/table.md`` and ``fedavg_quality_vs_cost.png``
(``--plots-dir``, default ``OUT``); ``--plot-only`` redraws them from the cells in ``OUT/cells``.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ARMS = ("fedavg", "collafuse", "local", "centralised")
SIZES = ("tiny", "small", "client", "server")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/fedavg-vs-collafuse", help="folder for cells, JSON, table and plot")
    p.add_argument("--quick", action="store_true", help="smoke run: one regime, 2 seeds, a few steps, tiny models")
    p.add_argument("--regimes", default="scarce-iid,scarce-dirichlet:0.3,ample-iid,ample-dirichlet:0.3",
                   help="comma list of SIZE-PARTITION, SIZE ∈ {scarce, ample}, PARTITION ∈ {iid, dirichlet:A, by-label}")
    p.add_argument("--seeds", default="0,1,2", help="comma list of seeds (partition, subsample, init, training, sampling)")
    p.add_argument("--arms", default=",".join(ARMS), help="comma list from " + ", ".join(ARMS))
    p.add_argument("--scarce", type=int, default=60, help="training images per client in the scarce regime")
    p.add_argument("--clients", type=int, default=3)
    p.add_argument("--steps", type=int, default=200, help="training steps (local steps per client for FedAvg)")
    p.add_argument("--batch-size", type=int, default=32, help="per client and step")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--ema-decay", type=float, default=0.99)
    p.add_argument("--timesteps", type=int, default=1000)
    p.add_argument("--local-steps", type=int, default=10, help="FedAvg: local steps R between averagings")
    p.add_argument("--mu", type=float, default=0.0, help="FedProx proximal weight (0 = FedAvg)")
    p.add_argument("--cut", type=float, default=0.6, help="CollaFuse cut ratio c (its best c in the study)")
    p.add_argument("--model", default="tiny", help="client model size (CollaFuse clients, local, FedAvg): " + ", ".join(SIZES))
    p.add_argument("--server-model", default="tiny", help="CollaFuse server and centralised model size")
    p.add_argument("--fedavg-models", default="small",
                   help="extra FedAvg arms with these larger model sizes (the cost of matching quality); '' for none")
    p.add_argument("--count-models", default="client,server",
                   help="also count (no training) FedAvg and CollaFuse client cost for these model sizes")
    p.add_argument("--sample-steps", type=int, default=50, help="DDIM calls per image (split by the cut for CollaFuse)")
    p.add_argument("--images", type=int, default=100, help="generated images per client")
    p.add_argument("--kd-subsets", type=int, default=50)
    p.add_argument("--latency", default="torch", help="client latency backend: edge | torch | none")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--feature-cache", default=None, help="cache of the metric classifier (default ~/.cache/collafuse)")
    p.add_argument("--plots-dir", default=None, help="where the PNG goes (default OUT)")
    p.add_argument("--reuse", action="store_true", help="reuse finished cells found in OUT/cells (same settings)")
    p.add_argument("--plot-only", action="store_true", help="redraw table and plot from OUT/cells")
    args = p.parse_args(argv)
    if args.quick:
        args.regimes, args.seeds = "scarce-iid", "0,1"
        args.steps, args.batch_size, args.local_steps = min(args.steps, 6), 8, 2
        args.model = args.server_model = "tiny"
        args.sample_steps, args.images, args.kd_subsets, args.scarce = 10, 12, 5, 30
        args.fedavg_models = ""
    validate(args, p)
    return args


def validate(args: argparse.Namespace, p: argparse.ArgumentParser) -> None:
    from collafuse.config import parse_partition
    from collafuse.errors import ConfigError

    def bad(msg: str) -> None:
        p.error(msg)

    for name in ("scarce", "clients", "steps", "batch_size", "local_steps", "timesteps", "sample_steps", "threads",
                 "kd_subsets"):
        if getattr(args, name) < 1:
            bad(f"--{name.replace('_', '-')} must be ≥ 1, got {getattr(args, name)}")
    if args.images < 2:
        bad(f"--images must be ≥ 2 (FD needs two images), got {args.images}")
    if not (0 < args.cut < 1):
        bad(f"--cut must lie strictly between 0 and 1 (0 and 1 are not split learning), got {args.cut}")
    if not (args.mu >= 0 and math.isfinite(args.mu)):
        bad(f"--mu must be a finite number ≥ 0, got {args.mu}")
    for name in ("model", "server_model"):
        if getattr(args, name) not in SIZES:
            bad(f"--{name.replace('_', '-')} {getattr(args, name)!r} is not a model size; choose one of {', '.join(SIZES)}")
    args.fedavg_model_list = [s for s in args.fedavg_models.split(",") if s.strip()]
    for s in args.fedavg_model_list:
        if s not in SIZES:
            bad(f"--fedavg-models: {s!r} is not a model size; choose from {', '.join(SIZES)}")
    args.count_model_list = [s for s in args.count_models.split(",") if s.strip()]
    for s in args.count_model_list:
        if s not in SIZES:
            bad(f"--count-models: {s!r} is not a model size; choose from {', '.join(SIZES)}")
    args.arm_list = [a for a in args.arms.split(",") if a.strip()]
    for a in args.arm_list:
        if a not in ARMS:
            bad(f"--arms: unknown arm {a!r}; choose from {', '.join(ARMS)}")
    try:
        args.seed_list = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        bad(f"--seeds must be comma-separated integers, got {args.seeds!r}")
    if not args.seed_list or any(s < 0 for s in args.seed_list):
        bad(f"--seeds needs at least one seed ≥ 0, got {args.seeds!r}")
    args.regime_list = []
    for r in [r for r in args.regimes.split(",") if r.strip()]:
        size, _, part = r.partition("-")
        if size not in ("scarce", "ample") or not part:
            bad(f"--regimes: {r!r} is not SIZE-PARTITION (e.g. scarce-iid, ample-dirichlet:0.3)")
        try:
            parse_partition(part)
        except ConfigError as e:
            bad(f"--regimes: {r!r}: {e}")
        args.regime_list.append((r, size, part))
    if not args.regime_list:
        bad("--regimes needs at least one regime")


# ------------------------------------------------------------------------------------------ data


def regime_data(ds, size: str, part: str, seed: int, clients: int, scarce: int):
    """The clients' splits of one (regime, seed): the partition of the digits (seed), held-out
    20 % per client; scarce keeps ``scarce`` random training images per client (the held-out
    images stay as they are)."""
    import numpy as np

    from collafuse.config import DataConfig
    from collafuse.data import ClientData, partition

    parts = partition(ds, DataConfig("digits", 16, clients, part, 0.2, seed))
    if size == "ample":
        return parts
    out = []
    for c in parts:
        rng = np.random.default_rng(10_000 + 100 * seed + c.index)
        keep = np.sort(rng.choice(len(c.train_labels), min(scarce, len(c.train_labels)), replace=False))
        out.append(ClientData(c.index, c.train_images[keep], c.train_labels[keep], c.test_images, c.test_labels))
    return out


# ------------------------------------------------------------------------------------------ arms


def model_config(name: str):
    sys.path.insert(0, HERE)
    from cut_ratio_sweep import model_config as sweep_model_config

    return sweep_model_config(name, 16)


def _ema_copy(ms):
    m = copy.deepcopy(ms.model)
    ms.ema.copy_to(m.parameters())
    return m.eval()


def split_training(args, ds, parts, seed: int, cut: float, *, centralised: bool = False):
    """Train a split (or local, c = 1) run in memory on the given client splits; returns the
    :class:`LoadedRun` of its EMA models and the training wall time. ``centralised``: one
    server-size model on the pooled training splits, batch clients × batch size."""
    import numpy as np
    import torch

    from collafuse.checkpoint import LoadedRun
    from collafuse.config import DataConfig, RunConfig, ScheduleConfig, TrainConfig
    from collafuse.data import ClientData
    from collafuse.train import SplitTrainer

    n = 1 if centralised else len(parts)
    server = model_config(args.server_model)
    client = server if centralised else model_config(args.model)
    bs = args.batch_size * (len(parts) if centralised else 1)
    cfg = RunConfig(data=DataConfig("digits", 16, n, "iid", 0.2, seed), schedule=ScheduleConfig(args.timesteps, "linear"),
                    cut_ratios=(1.0 if centralised else cut,) * n, client_model=client, server_model=server,
                    objective="exact", train=TrainConfig(steps=args.steps, batch_size=bs, lr=args.lr,
                                                         ema_decay=args.ema_decay, seed=seed, device="cpu"))
    trainer = SplitTrainer(cfg, os.path.join(args.out, "unused"), dataset=ds)
    if centralised:
        parts = [ClientData(0, np.concatenate([c.train_images for c in parts]),
                            np.concatenate([c.train_labels for c in parts]), parts[0].test_images, parts[0].test_labels)]
    # the trainer partitions the dataset by its config; the study's splits replace that partition
    trainer.clients_data = list(parts)
    trainer._x = [torch.from_numpy(c.train_images) for c in parts]
    trainer._y = [torch.from_numpy(c.train_labels) for c in parts]
    t0 = time.perf_counter()
    for _ in range(args.steps):
        trainer.train_step()
    wall = time.perf_counter() - t0
    run = LoadedRun("in-memory", cfg, trainer.data_info, trainer.schedule, _ema_copy(trainer.server),
                    [_ema_copy(trainer.client(i)) for i in range(n)], args.steps)
    return run, wall


def fedavg_training(args, parts, seed: int, size: str):
    """FedAvg on the client splits, wrapped as a c = 1 :class:`LoadedRun` (every client holds the
    global EMA model); returns (run, wall seconds, FedAvgResult)."""
    from collafuse.checkpoint import DataInfo, LoadedRun
    from collafuse.config import DataConfig, RunConfig, ScheduleConfig, TrainConfig, replace
    from collafuse.fedavg import FedAvgConfig, train_fedavg

    mcfg = replace(model_config(size), num_classes=10)
    sched = ScheduleConfig(args.timesteps, "linear")
    fc = FedAvgConfig(steps=args.steps, local_steps=args.local_steps, batch_size=args.batch_size, lr=args.lr,
                      ema_decay=args.ema_decay, mu=args.mu, seed=seed)
    t0 = time.perf_counter()
    res = train_fedavg(parts, mcfg, sched.build(), config=fc)
    wall = time.perf_counter() - t0
    n = len(parts)
    cfg = RunConfig(data=DataConfig("digits", 16, n, "iid", 0.2, seed), schedule=sched, cut_ratios=(1.0,) * n,
                    client_model=model_config(size), server_model=model_config(size),
                    train=TrainConfig(steps=args.steps, batch_size=args.batch_size, seed=seed, device="cpu"))
    run = LoadedRun("in-memory", cfg, DataInfo("digits", 10, 1, 16), sched.build(), res.models[0], res.models, args.steps)
    return run, wall, res


def quality(run, model_index: int, truth, args, ext, seed: int) -> dict:
    """FD/KD of ``args.images`` images of model ``model_index`` of ``run`` (labels cycling through
    the client's classes) against the client's held-out images."""
    from collafuse.evaluate import EvalConfig, cycle_labels
    from collafuse.generate import sample_client
    from collafuse.metrics import quality_scores

    ec = EvalConfig(num_images=args.images, sample_steps=args.sample_steps, seed=seed)
    k = run.config.client_levels[model_index]
    labels = cycle_labels(truth.classes, args.images)
    s = sample_client(run, model_index, ec.sample_config(k, run.schedule.T), labels)
    images = s.images.detach().float().cpu().numpy()
    q = quality_scores(images, truth.test_images, ext, num_subsets=args.kd_subsets, seed=seed)
    return {"fd": q.fd, "kd": q.kd_mean, "kd_std": q.kd_std}


def arm_plan(args) -> list[tuple[str, str | None]]:
    """(arm name, FedAvg model size or None) in run order."""
    plan: list[tuple[str, str | None]] = []
    for arm in args.arm_list:
        if arm == "fedavg":
            plan += [("fedavg", args.model)] + [(f"fedavg-{s}", s) for s in args.fedavg_model_list]
        else:
            plan.append((arm, None))
    return plan


def run_cell(args, ds, regime: str, size: str, part: str, seed: int, ext, done: dict | None = None,
             save=None) -> dict:
    """Train and score every arm of one (regime, seed); arms already in ``done`` (a cell saved
    with the same settings) are kept; ``save(cell)`` is called after each arm."""
    import torch

    parts = regime_data(ds, size, part, seed, args.clients, args.scarce)
    cell = {"regime": regime, "seed": seed, "train_images": [len(c.train_labels) for c in parts],
            "test_images": [len(c.test_labels) for c in parts], "arms": dict((done or {}).get("arms", {}))}
    for name, size_ in arm_plan(args):
        if name in cell["arms"]:
            continue
        torch.manual_seed(seed)
        t0 = time.perf_counter()
        extra = {}
        if name.startswith("fedavg"):
            run, wall, res = fedavg_training(args, parts, seed, size_)
            extra = {"fedavg_cost": res.cost.to_dict(), "last_round": res.history[-1]}
            idx = list(range(len(parts)))
        elif name == "centralised":
            run, wall = split_training(args, ds, parts, seed, 1.0, centralised=True)
            idx = [0] * len(parts)
        else:
            run, wall = split_training(args, ds, parts, seed, args.cut if name == "collafuse" else 1.0)
            idx = list(range(len(parts)))
        q = [quality(run, j, truth, args, ext, seed) for j, truth in zip(idx, parts)]
        cell["arms"][name] = {"train_wall_s": wall, "eval_wall_s": time.perf_counter() - t0 - wall,
                              "clients": q, "fd_mean": sum(x["fd"] for x in q) / len(q),
                              "kd_mean": sum(x["kd"] for x in q) / len(q), **extra}
        print(f"  {regime:>22} seed {seed} {name:>12}: mean FD {cell['arms'][name]['fd_mean']:8.2f}  mean KD "
              f"{cell['arms'][name]['kd_mean']:7.3f}  (train {wall:5.0f} s)", flush=True)
        if save is not None:
            save(cell)
    return cell


# ------------------------------------------------------------------------------------------ cost


def step_wall_s(size: str, batch: int, timesteps: int, reps: int = 15) -> float:
    """Median wall seconds of one client training step (forward + backward + AdamW) of this
    model size at ``batch`` — the same step under FedAvg, CollaFuse and local training."""
    import statistics

    import torch

    from collafuse.config import ScheduleConfig, replace
    from collafuse.models import build_unet, denoise
    from collafuse.objectives import client_loss

    sched = ScheduleConfig(timesteps).build()
    torch.manual_seed(0)
    m = build_unet(replace(model_config(size), num_classes=10)).train()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    x = torch.zeros(batch, 1, 16, 16)
    y = torch.zeros(batch, dtype=torch.long)
    times = []
    for i in range(reps + 3):
        t0 = time.perf_counter()
        loss = client_loss(lambda a, b, c: denoise(m, a, b, c), x, y, sched.T, sched, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i >= 3:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def costs(args) -> dict:
    """Per-client cost of each arm: counted FLOPs/bytes/memory, measured step time and latency."""
    from collafuse.client_cost import collafuse_client_cost, fedavg_client_cost
    from collafuse.config import ScheduleConfig, replace
    from collafuse.models import build_unet
    from collafuse_edge.schedule import client_level_count

    sched = ScheduleConfig(args.timesteps).build()
    T = sched.T
    out = {}
    sizes = {args.model, *args.fedavg_model_list}
    for size in sorted(sizes):
        m = build_unet(replace(model_config(size), num_classes=10)).eval()
        probe = None if args.latency == "none" else latency_probe(m, sched, args)
        wall = step_wall_s(size, args.batch_size, args.timesteps, reps=3 if args.quick else 15)
        kw = dict(batch=args.batch_size, steps=args.steps, sample_steps=args.sample_steps, wall_s_per_step=wall,
                  probe=probe)
        name = "fedavg" if size == args.model else f"fedavg-{size}"
        out[name] = fedavg_client_cost(m, sched, local_steps=args.local_steps, mu=args.mu, **kw).to_dict()
        out[name]["model"] = size
        if size == args.model:
            k = client_level_count(args.cut, T)
            out["collafuse"] = collafuse_client_cost(m, sched, k, share_labels=True, **kw).to_dict()
            out["local"] = collafuse_client_cost(m, sched, T, share_labels=False, **kw).to_dict()
            out["collafuse"]["model"] = out["local"]["model"] = size
    return out


def counted_costs(args) -> dict:
    """FedAvg vs CollaFuse client cost for other model sizes, counted only (nothing trained or
    timed): how FedAvg's bytes grow with the model while CollaFuse's follow batch × image size."""
    from collafuse.client_cost import collafuse_client_cost, fedavg_client_cost
    from collafuse.config import ScheduleConfig, replace
    from collafuse.models import build_unet
    from collafuse_edge.schedule import client_level_count

    sched = ScheduleConfig(args.timesteps).build()
    k = client_level_count(args.cut, sched.T)
    out = {}
    for size in args.count_model_list:
        m = build_unet(replace(model_config(size), num_classes=10)).eval()
        kw = dict(batch=args.batch_size, steps=args.steps, sample_steps=args.sample_steps)
        out[size] = {"fedavg": fedavg_client_cost(m, sched, local_steps=args.local_steps, mu=args.mu, **kw).to_dict(),
                     "collafuse": collafuse_client_cost(m, sched, k, share_labels=True, **kw).to_dict()}
    return out


def latency_probe(model, schedule, args):
    """The client's sampler latency: collafuse-edge over an ONNX export (``--latency edge``;
    torch eager if the export fails) or torch eager."""
    from collafuse.cost import LatencyProbe

    runs = 2 if args.quick else 10
    if args.latency == "edge":
        try:
            from collafuse.export import ExportConfig, export_bundle

            path = os.path.join(args.out, f"latency-bundle-{model.config.block_out_channels[0]}")
            export_bundle(model, schedule, 1.0, path, config=ExportConfig(measure_speed=False), overwrite=True)
            return LatencyProbe(model, schedule, "edge", bundle=path, threads=args.threads, runs=runs)
        except Exception as e:  # noqa: BLE001 — say so and time torch instead
            print(f"edge latency unavailable ({type(e).__name__}: {e}); timing torch eager instead", flush=True)
    return LatencyProbe(model, schedule, "torch", threads=args.threads, runs=runs)


# ------------------------------------------------------------------------------------------ summary


def interval(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95 % t-interval (nan with one value)."""
    import numpy as np
    from scipy import stats

    v = np.asarray(values, dtype=float)
    if len(v) < 2:
        return float(v.mean()), float("nan")
    return float(v.mean()), float(stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))


def summarise(cells: list[dict]) -> dict:
    regimes: dict = {}
    for c in cells:
        regimes.setdefault(c["regime"], []).append(c)
    out = {}
    for r, cs in regimes.items():
        arms = sorted({a for c in cs for a in c["arms"]}, key=lambda a: (not a.startswith("fedavg"), a))
        row = {"seeds": sorted(c["seed"] for c in cs), "arms": {}}
        for a in arms:
            fd = [c["arms"][a]["fd_mean"] for c in cs if a in c["arms"]]
            kd = [c["arms"][a]["kd_mean"] for c in cs if a in c["arms"]]
            row["arms"][a] = {"fd": interval(fd), "kd": interval(kd), "n": len(fd)}
        paired = [c for c in cs if "fedavg" in c["arms"] and "collafuse" in c["arms"]]
        if paired:
            row["fedavg_minus_collafuse"] = {
                "fd": interval([c["arms"]["fedavg"]["fd_mean"] - c["arms"]["collafuse"]["fd_mean"] for c in paired]),
                "kd": interval([c["arms"]["fedavg"]["kd_mean"] - c["arms"]["collafuse"]["kd_mean"] for c in paired]),
                "n": len(paired)}
            # FD spans orders of magnitude across seeds: the ratio on a log scale (geometric mean, 95 % interval)
            logs = {q: [math.log(c["arms"]["fedavg"][f"{q}_mean"] / c["arms"]["collafuse"][f"{q}_mean"]) for c in paired]
                    for q in ("fd", "kd")}
            row["fedavg_over_collafuse"] = {
                q: {"geo_mean": math.exp(interval(v)[0]),
                    "low": math.exp(interval(v)[0] - interval(v)[1]) if len(v) > 1 else float("nan"),
                    "high": math.exp(interval(v)[0] + interval(v)[1]) if len(v) > 1 else float("nan"),
                    "collafuse_better": sum(x > 0 for x in v)} for q, v in logs.items()}
            row["fedavg_over_collafuse"]["n"] = len(paired)
        out[r] = row
    return out


def _pm(mi: tuple[float, float], fmt: str = "{:.3g}") -> str:
    m, h = mi
    return fmt.format(m) + ("" if math.isnan(h) else " ± " + fmt.format(h))


def tables(summary: dict, cost: dict, counted: dict | None = None) -> str:
    lines = ["### Quality per client (mean over clients; mean ± 95 % interval over seeds; lower is better)", "",
             "| regime | arm | FD | KD | seeds |", "|---|---|---|---|---|"]
    for r, row in summary.items():
        for a, v in row["arms"].items():
            lines.append(f"| {r} | {a} | {_pm(v['fd'])} | {_pm(v['kd'])} | {v['n']} |")
        if "fedavg_minus_collafuse" in row:
            d = row["fedavg_minus_collafuse"]
            lines.append(f"| {r} | **FedAvg − CollaFuse** (paired) | {_pm(d['fd'])} | {_pm(d['kd'])} | {d['n']} |")
            q = row["fedavg_over_collafuse"]

            def ratio(v: dict) -> str:
                span = "" if math.isnan(v["low"]) else f" [{v['low']:.2g}, {v['high']:.2g}]"
                return f"{v['geo_mean']:.2g}×{span}, CollaFuse lower in {v['collafuse_better']}/{q['n']}"

            lines.append(f"| {r} | **FedAvg / CollaFuse** (paired, geometric mean [95 %]) | {ratio(q['fd'])} | "
                         f"{ratio(q['kd'])} | {q['n']} |")
    lines += ["", "### Client cost (per client)", "",
              "| arm | model | params | train MFLOP/step | train peak MB | train ms/step | gen MFLOP/image | gen calls "
              "| gen ms/image | wire kB/step (up+down) | wire B/image |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for a, c in cost.items():
        lat = "—" if c["gen_latency_ms"] is None else f"{c['gen_latency_ms']:.1f}"
        lines.append(f"| {a} | {c['model']} | {c['params']:,} | {c['train_flops_per_step'] / 1e6:.0f} | "
                     f"{c['train_peak_bytes'] / 2**20:.1f} | {c['train_wall_s_per_step'] * 1e3:.0f} | "
                     f"{c['gen_flops_per_image'] / 1e6:.0f} | {c['gen_calls_per_image']} | {lat} | "
                     f"{c['wire_bytes_per_step'] / 1e3:.1f} | {c['wire_bytes_per_image']:,} |")
    if counted:
        lines += ["", "### Counted client cost by model size (FedAvg | CollaFuse; nothing trained)", "",
                  "| model | params | train MFLOP/step | train peak MB | gen MFLOP/image | wire kB/step | wire B/image |",
                  "|---|---|---|---|---|---|---|"]
        for size, d in counted.items():
            f, c = d["fedavg"], d["collafuse"]
            lines.append(f"| {size} | {f['params']:,} | {f['train_flops_per_step'] / 1e6:,.0f} | "
                         f"{f['train_peak_bytes'] / 2**20:.1f} | {f['gen_flops_per_image'] / 1e6:,.0f} \\| "
                         f"{c['gen_flops_per_image'] / 1e6:,.0f} | {f['wire_bytes_per_step'] / 1e3:,.1f} \\| "
                         f"{c['wire_bytes_per_step'] / 1e3:,.1f} | 0 \\| {c['wire_bytes_per_image']:,} |")
    return "\n".join(lines) + "\n"


def plot(summary: dict, cost: dict, cells: list[dict], path: str) -> None:
    """One column per regime. Top: FD per client against the client's FLOPs per generated image;
    bottom: against bytes on the wire per training step. Mean over seeds with its 95 % interval
    (clipped at the axis floor), each seed as a faint dot; the centralised reference (pooled raw
    data, no client cost) as a dashed line. Arms at the same cost are nudged apart."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    regs = list(summary)
    fig, axes = plt.subplots(2, len(regs), figsize=(4.2 * len(regs), 7.0), squeeze=False)
    colours = {"fedavg": "tab:red", "collafuse": "tab:blue", "local": "tab:grey", "centralised": "tab:green"}
    nudge = {"fedavg": 0.97, "local": 1.03}
    for col, r in enumerate(regs):
        seeds = [c for c in cells if c["regime"] == r]
        for row, (key, scale, label) in enumerate((("gen_flops_per_image", 1e6, "client MFLOP per generated image"),
                                                   ("wire_bytes_per_step", 1e3, "client kB on the wire per step"))):
            ax = axes[row][col]
            for a, v in summary[r]["arms"].items():
                colour = colours.get(a, "tab:orange")
                m, h = v["fd"]
                if a == "centralised":
                    ax.axhline(m, color=colour, ls="--", lw=1, label="centralised (pooled raw data)")
                    continue
                c = cost.get(a)
                if c is None:
                    continue
                x = c[key] / scale * nudge.get(a, 1.0)
                if key == "wire_bytes_per_step" and x == 0:
                    x = 0.3  # local training sends nothing; drawn at the left edge of the log axis
                pts = [s["arms"][a]["fd_mean"] for s in seeds if a in s["arms"]]
                ax.scatter([x] * len(pts), pts, color=colour, alpha=0.3, s=14)
                lo = None if math.isnan(h) else [[min(h, m * 0.95)], [h]]
                ax.errorbar([x], [m], yerr=lo, fmt="o", color=colour, capsize=4, ms=8, label=a)
            if row == 0:
                ax.set_xlim(0, 1.2 * max(ax.get_xlim()[1], 1.0))
            else:
                ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel(label + (" (local 0: at 0.3)" if row else ""), fontsize=8)
            ax.set_ylabel("FD per client (lower is better)")
            ax.grid(alpha=0.3, which="both")
            if row == 0:
                ax.set_title(f"{r} ({len(seeds)} seeds)")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Quality vs client cost: mean ± 95 % interval over seeds, dots = seeds", fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------ main


CELL_KEYS = ("scarce", "clients", "steps", "batch_size", "lr", "ema_decay", "timesteps", "local_steps", "mu", "cut",
             "model", "server_model", "sample_steps", "images", "kd_subsets")


def _settings(args) -> dict:
    return {k: getattr(args, k) for k in CELL_KEYS}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    torch.set_num_threads(args.threads)
    from collafuse_edge.bench import machine_description
    from collafuse_edge.files import atomic_write_json, atomic_write_text

    cells_dir = os.path.join(args.out, "cells")
    os.makedirs(cells_dir, exist_ok=True)
    plots = args.plots_dir or args.out
    t_start = time.perf_counter()
    settings = _settings(args)
    cells = []
    if not args.plot_only:
        from collafuse.data import load_dataset
        from collafuse.evaluate import default_feature_cache
        from collafuse.metrics import get_feature_net

        ds = load_dataset("digits", 16)
        ext = get_feature_net(ds, args.feature_cache or default_feature_cache(), seed=0, progress=False)
    for regime, size, part in args.regime_list:
        for seed in args.seed_list:
            path = os.path.join(cells_dir, f"{regime.replace(':', '_')}-s{seed}.json")
            done = None
            if os.path.exists(path) and (args.reuse or args.plot_only):
                with open(path, encoding="utf-8") as f:
                    done = json.load(f)
                if done.get("settings") != settings:
                    print(f"cell {path} was made with other settings; {'skipped' if args.plot_only else 'redone'}",
                          flush=True)
                    done = None
            if args.plot_only:
                if done is not None:
                    cells.append(done)
                continue
            t0 = time.perf_counter()
            spent = (done or {}).get("wall_s", 0.0)

            def save(cell, path=path, t0=t0, spent=spent):
                cell["settings"], cell["wall_s"] = settings, spent + time.perf_counter() - t0
                atomic_write_json(path, cell)

            cell = run_cell(args, ds, regime, size, part, seed, ext, done, save)
            save(cell)
            cells.append(cell)
    if not cells:
        raise SystemExit(f"no finished cells in {cells_dir}; run without --plot-only first")
    cost_path = os.path.join(args.out, "client_cost.json")
    if args.plot_only and os.path.exists(cost_path):
        with open(cost_path, encoding="utf-8") as f:
            cost = json.load(f)
        if "counted_by_size" not in cost:  # counting needs no training: add it to an older run's costs
            cost["counted_by_size"] = counted_costs(args)
            atomic_write_json(cost_path, cost)
    else:
        cost = costs(args)
        cost["counted_by_size"] = counted_costs(args)
        atomic_write_json(cost_path, cost)
    counted = cost.pop("counted_by_size", {})
    summary = summarise(cells)
    res = {"meta": {"command": "python benchmarks/fedavg_vs_collafuse.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                    "settings": settings, "machine": machine_description(), "torch": torch.__version__,
                    "torch_threads": args.threads, "wall_s": time.perf_counter() - t_start,
                    "cell_wall_s": {f"{c['regime']}/s{c['seed']}": c.get("wall_s") for c in cells}},
           "summary": summary, "client_cost": cost, "counted_cost_by_size": counted, "cells": cells}
    atomic_write_json(os.path.join(args.out, "fedavg_vs_collafuse.json"), res)
    text = tables(summary, cost, counted)
    atomic_write_text(os.path.join(args.out, "table.md"), text)
    plot(summary, cost, cells, os.path.join(plots, "fedavg_quality_vs_cost.png"))
    print(text)
    print(f"machine: {res['meta']['machine']}; finished in {res['meta']['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
