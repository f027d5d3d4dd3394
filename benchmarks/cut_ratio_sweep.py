"""The paper's experiment on our data: quality, disclosure and cost per cut ratio (docs/architecture.md#metrics).

3 clients, by-label non-IID partition of the embedded digits, cut ratios c ∈ {0, .2, .4, .6,
.8, 1}; objectives ``exact`` and ``double-noise`` (they differ only for 0 < c < 1); baselines
purely local (c = 1: every client alone with its own model) and centralised (one model of the
server's size trained on the pooled training images of all clients). Each run is evaluated by
:func:`collafuse.evaluate.evaluate_client` against each client's private held-out images.

Full size (a CPU afternoon on 2 cores; minutes on a GPU):

    python benchmarks/cut_ratio_sweep.py --out runs/sweep-full --steps 3000 \
        --client-model client --server-model server --sample-steps 100 --images 300 --threads 2

CI smoke run (< 2 min):

    python benchmarks/cut_ratio_sweep.py --quick --out runs/sweep-quick

Writes ``OUT/sweep.json``, ``OUT/tables.md``, the plots ``quality_vs_c.png``,
``disclosure_vs_c.png``, ``compute_vs_c.png``, ``samples_vs_c.png`` and ``attack_examples.png``
to ``--plots-dir`` (default ``OUT/plots``). ``--plot-only`` redraws them from ``OUT/sweep.json``.
"""
from __future__ import annotations

import argparse
import os
import sys
import time


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/cut-ratio-sweep", help="folder for runs, JSON and tables")
    p.add_argument("--quick", action="store_true", help="CI-sized smoke run (< 2 min): tiny models, 12 steps")
    p.add_argument("--cuts", default="0,0.2,0.4,0.6,0.8,1.0", help="cut ratios (share of levels on the clients)")
    p.add_argument("--objectives", default="exact,double-noise", help="server objectives to compare")
    p.add_argument("--no-central", action="store_true", help="skip the centralised baseline")
    p.add_argument("--split-local", type=float, default=None, metavar="C",
                   help="ablation: every client alone, but with its chain split at C between two models of its "
                        "own (no sharing) — separates 'collaboration' from 'one model per noise range'")
    p.add_argument("--clients", type=int, default=3)
    p.add_argument("--partition", default="by-label")
    p.add_argument("--steps", type=int, default=300, help="training steps per run")
    p.add_argument("--batch-size", type=int, default=32, help="per client (the centralised model gets clients × this)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--ema-decay", type=float, default=0.99)
    p.add_argument("--timesteps", type=int, default=1000)
    p.add_argument("--client-model", default="tiny", help="model size of the clients: " + ", ".join(SIZES))
    p.add_argument("--server-model", default="tiny", help="model size of the server (and the centralised model)")
    p.add_argument("--sample-steps", type=int, default=50, help="DDIM evaluations per image, split by the cut")
    p.add_argument("--images", type=int, default=100, help="generated images per client")
    p.add_argument("--disclosed", type=int, default=200, help="training images per client drawn for disclosure/attack")
    p.add_argument("--kd-subsets", type=int, default=100)
    p.add_argument("--latency", default="edge", help="edge | torch | none")
    p.add_argument("--threads", type=int, default=1, help="torch / onnxruntime threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--feature-cache", default=None, help="cache of the metric classifier (default ~/.cache/collafuse)")
    p.add_argument("--plots-dir", default=None, help="where the PNGs go (default OUT/plots)")
    p.add_argument("--reuse", action="store_true", help="reuse finished runs found in OUT (same config)")
    p.add_argument("--plot-only", action="store_true", help="redraw plots and tables from OUT/sweep.json")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.batch_size = min(args.steps, 8), 8
        args.client_model = args.server_model = "tiny"
        args.sample_steps, args.images, args.disclosed, args.kd_subsets = 10, 12, 12, 5
        args.latency = "torch"
    return args


# model sizes at 16×16×1 (params / MFLOP per call, class-conditional): tiny 41 k / 7.5,
# small 0.16 M / 30, client 0.65 M / 122, server 6.5 M / 751
SIZES = ("tiny", "small", "client", "server")


def model_config(name: str, image_size: int):
    from collafuse.config import PRESETS, ModelConfig

    if name == "small":
        return ModelConfig(image_size, 1, (16, 32), 1, ("plain", "plain"), False, 8)
    if name not in PRESETS:
        raise SystemExit(f"unknown model size {name!r}; choose one of {', '.join(SIZES)}")
    return PRESETS[name](image_size)


def run_config(args, cut: float, objective: str, *, kind: str = "sweep"):
    """``kind``: "sweep" (all clients, shared server), "centralised" (one server-sized model on the
    pooled data) or "split-local" (one client alone with a server model of its own)."""
    from collafuse.config import DataConfig, RunConfig, ScheduleConfig, TrainConfig

    server = model_config(args.server_model, 16)
    client = server if kind == "centralised" else model_config(args.client_model, 16)
    n = args.clients if kind == "sweep" else 1
    data = (DataConfig("digits", 16, n, args.partition, 0.2, args.seed) if kind == "sweep"
            else DataConfig("digits", 16, 1, "iid", 0.0, args.seed))  # trained on an in-memory dataset
    bs = args.batch_size * (args.clients if kind == "centralised" else 1)
    return RunConfig(
        data=data, schedule=ScheduleConfig(args.timesteps, "linear"),
        cut_ratios=(1.0 if kind == "centralised" else cut,) * n,
        client_model=client, server_model=server, objective=objective,
        train=TrainConfig(steps=args.steps, batch_size=bs, lr=args.lr, ema_decay=args.ema_decay, seed=args.seed,
                          device=args.device, log_every=max(args.steps // 20, 1), checkpoint_every=args.steps),
    )


def logged_train_seconds(run_dir: str) -> float:
    """Training wall time of a finished run, from the speed its last metrics line logged."""
    import json

    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        last = json.loads(f.readlines()[-1])
    return last["step"] / last["steps_per_s"]


def train_or_reuse(cfg, run_dir: str, reuse: bool, dataset=None) -> float:
    """Train ``cfg`` into ``run_dir``; returns the training wall time (when reused: as logged then)."""
    import shutil

    from collafuse.checkpoint import latest_checkpoint, read_config
    from collafuse.train import train

    if os.path.exists(os.path.join(run_dir, "config.json")):
        if reuse and read_config(run_dir).to_dict() == cfg.to_dict() and latest_checkpoint(run_dir) and \
                latest_checkpoint(run_dir).endswith(f"step_{cfg.train.steps:07d}"):
            return logged_train_seconds(run_dir)
        shutil.rmtree(run_dir)
    return train(cfg, run_dir, progress=False, dataset=dataset).wall_s


def latency_probe(run, args, runs: int):
    """Client latency on collafuse-edge: export the client architecture once (the weights do not
    change the timing) and time the numpy sampler over onnxruntime; torch eager if that fails."""
    from collafuse.cost import LatencyProbe

    if args.latency == "edge":
        try:
            from collafuse.export import ExportConfig, export_bundle

            path = os.path.join(args.out, "latency-bundle")
            export_bundle(run.clients[0], run.schedule, 1.0, path, config=ExportConfig(measure_speed=False),
                          overwrite=True)
            return LatencyProbe(run.clients[0], run.schedule, "edge", bundle=path, threads=args.threads, runs=runs)
        except Exception as e:  # noqa: BLE001 — report it and measure torch instead
            print(f"edge latency unavailable ({type(e).__name__}: {e}); timing torch eager instead", flush=True)
    return LatencyProbe(run.clients[0], run.schedule, "torch" if args.latency == "edge" else args.latency,
                        threads=args.threads, runs=runs)


def pooled_dataset(clients, num_classes: int):
    """The centralised baseline's data: every client's *training* split (their held-out images stay out)."""
    import numpy as np

    from collafuse.data import Dataset

    return Dataset(np.concatenate([c.train_images for c in clients]), np.concatenate([c.train_labels for c in clients]),
                   num_classes, tuple(str(i) for i in range(num_classes)), "digits-pooled-train")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from sweep_report import load_results, make_plots, write_tables

    plots = args.plots_dir or os.path.join(args.out, "plots")
    if args.plot_only:
        res = load_results(os.path.join(args.out, "sweep.json"))
        make_plots(res, plots, os.path.join(args.out, "figures.npz"))
        print(write_tables(res, os.path.join(args.out, "tables.md")))
        return 0

    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    from collafuse.checkpoint import atomic_write_json, load_run
    from collafuse.data import load_dataset, partition
    from collafuse.evaluate import EvalConfig, evaluate_client, feature_extractor, jsonable, pooled_quality
    from collafuse_edge.bench import machine_description

    t_start = time.perf_counter()
    cuts = [float(c) for c in args.cuts.split(",") if c.strip()]
    objectives = args.objectives.split(",")
    ec = EvalConfig(num_images=args.images, sample_steps=args.sample_steps, num_disclosed=args.disclosed,
                    latency=args.latency, threads=args.threads, kd_subsets=args.kd_subsets, seed=args.seed,
                    device=args.device, feature_cache=args.feature_cache, latency_runs=3 if args.quick else 10)
    plan = [(obj, c) for obj in objectives for c in cuts if obj == objectives[0] or 0 < c < 1]
    if not plan and args.no_central and args.split_local is None:
        raise SystemExit("nothing to run: give --cuts, drop --no-central or add --split-local")
    base_cfg = run_config(args, 0.5, objectives[0])  # the partition does not depend on the cut
    truths = partition(load_dataset("digits", 16), base_cfg.data)
    keep = max(args.images, 16)
    ext = probe = None
    results: dict = {"meta": {"command": "python benchmarks/cut_ratio_sweep.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                              "args": vars(args), "machine": machine_description(), "torch": torch.__version__,
                              "torch_threads": args.threads},
                     "runs": []}
    figures: dict[str, np.ndarray] = {}

    def evaluate(name: str, models: list, train_s: float, objective: str, cut: float, kind: str) -> None:
        """``models[i]`` = (LoadedRun, model index) that generates for client i."""
        nonlocal ext, probe
        t0 = time.perf_counter()
        run0 = models[0][0]
        if ext is None:
            ext = feature_extractor(run0, ec)
        if probe is None and args.latency != "none":
            probe = latency_probe(run0, args, ec.latency_runs)
        evals = [evaluate_client(run, j, t, ec, ext[0], probe=None if kind == "centralised" else probe,
                                 keep_images=keep) for (run, j), t in zip(models, truths)]
        pooled = pooled_quality(evals, truths, ext[0], ec)
        for e in evals:
            figures[f"{name}/samples/{e.client}"] = e.samples[:16]
            for key, arr in (e.attack_examples or {}).items():
                figures[f"{name}/attack/{e.client}/{key}"] = arr[:8]
        row = {"name": name, "kind": kind, "objective": objective, "cut_ratio": cut, "central": kind == "centralised",
               "run_dirs": sorted({run.run_dir for run, _ in models}),
               "train_wall_s": train_s, "eval_wall_s": time.perf_counter() - t0,
               "kd_sum": float(sum(e.quality.kd_mean for e in evals)), "fd_sum": float(sum(e.quality.fd for e in evals)),
               "pooled_quality": pooled.to_dict() if pooled else None, "clients": [e.to_dict() for e in evals]}
        results["runs"].append(jsonable(row))
        print(f"{name:>22}: summed KD {row['kd_sum']:8.3f}  summed FD {row['fd_sum']:8.2f}  "
              f"(train {train_s:5.0f} s, eval {row['eval_wall_s']:4.0f} s)", flush=True)

    for objective, cut in plan:
        name = f"{objective}-c{cut:.1f}"
        run_dir = os.path.join(args.out, "runs", name)
        train_s = train_or_reuse(run_config(args, cut, objective), run_dir, args.reuse)
        run = load_run(run_dir, device=args.device)
        evaluate(name, [(run, i) for i in range(len(truths))], train_s, objective, cut, "sweep")
    if not args.no_central:
        run_dir = os.path.join(args.out, "runs", "centralised")
        train_s = train_or_reuse(run_config(args, 1.0, objectives[0], kind="centralised"), run_dir, args.reuse,
                                 dataset=pooled_dataset(truths, 10))
        run = load_run(run_dir, device=args.device)
        evaluate("centralised", [(run, 0)] * len(truths), train_s, "pooled raw data", 0.0, "centralised")
    if args.split_local is not None:
        c, models, train_s = args.split_local, [], 0.0
        for i, t in enumerate(truths):
            run_dir = os.path.join(args.out, "runs", f"split-local-c{c:.1f}-client{i}")
            train_s += train_or_reuse(run_config(args, c, objectives[0], kind="split-local"), run_dir, args.reuse,
                                      dataset=pooled_dataset([t], 10))
            models.append((load_run(run_dir, device=args.device), 0))
        evaluate(f"split-local-c{c:.1f}", models, train_s, objectives[0], c, "split-local")

    results["meta"]["feature_net"] = ext[1] if ext else None
    results["meta"]["latency"] = probe.note if probe else "not measured"
    results["meta"]["wall_s"] = time.perf_counter() - t_start
    atomic_write_json(os.path.join(args.out, "sweep.json"), results)
    np.savez_compressed(os.path.join(args.out, "figures.npz"), **figures)
    if plan:
        make_plots(results, plots, os.path.join(args.out, "figures.npz"))
    print(write_tables(results, os.path.join(args.out, "tables.md")))
    print(f"sweep finished in {results['meta']['wall_s']:.0f} s; plots in {plots}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
