"""Quality cost of "disclose once" against fresh draws per upload (docs/privacy.md).

The cut-ratio experiment's setting (benchmarks/cut_ratio_sweep.py: 3 clients, by-label digits,
T = 1000, the `exact` objective) trained twice per cut — ``--disclose fresh`` and
``--disclose once`` — for each training seed, and evaluated with the same machinery
(:func:`collafuse.evaluate.evaluate_client`: split DDIM sampling, FD/KD in classifier feature
space against each client's held-out images). Reported per cut: the pooled FD (all clients'
generated images against all their held-out images) with a 95 % bootstrap interval over the
generated images, per seed, and the once/fresh ratio of the seed means.

    python benchmarks/privacy_disclose_once.py --out runs/disclose-once --json docs/data/privacy_disclose_once.json

Contenders run side by side in one process on the same machine; the machine is stated in the JSON.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/disclose-once")
    p.add_argument("--json", default=None, help="also write the results here (e.g. docs/data/privacy_disclose_once.json)")
    p.add_argument("--cuts", default="0.2,0.4,0.6")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--model", default="tiny", help="client and server model size (tiny | small | client | server)")
    p.add_argument("--images", type=int, default=100, help="generated images per client")
    p.add_argument("--sample-steps", type=int, default=50)
    p.add_argument("--bootstrap", type=int, default=200)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reuse", action="store_true", help="reuse finished runs in --out")
    p.add_argument("--quick", action="store_true", help="a smoke run: 6 steps, 16 images, one cut and seed")
    return p.parse_args(argv)


def bootstrap_fd(fg, fr, reps: int, seed: int) -> tuple[float, float]:
    import numpy as np

    from collafuse.metrics.distances import frechet_distance

    rng = np.random.default_rng(seed)
    vals = [frechet_distance(fg[rng.integers(0, len(fg), len(fg))], fr) for _ in range(reps)]
    return float(np.percentile(vals, 2.5)), float(np.percentile(vals, 97.5))


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.quick:
        args.cuts, args.seeds, args.steps, args.images, args.sample_steps, args.bootstrap = "0.4", "0", 6, 16, 10, 20
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    from cut_ratio_sweep import run_config, train_or_reuse

    from collafuse.checkpoint import load_run
    from collafuse.data import load_dataset, partition
    from collafuse.evaluate import EvalConfig, evaluate_client, feature_extractor
    from collafuse_edge.bench import machine_description
    from collafuse_edge.files import atomic_write_json

    cuts = [float(c) for c in args.cuts.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    sweep_args = argparse.Namespace(clients=3, partition="by-label", steps=args.steps, batch_size=args.batch_size,
                                    lr=2e-3, ema_decay=0.99, timesteps=1000, client_model=args.model,
                                    server_model=args.model, seed=0, device="cpu")
    ec = EvalConfig(num_images=args.images, sample_steps=args.sample_steps, num_disclosed=50, attack=False,
                    latency="none", threads=args.threads, kd_subsets=20, seed=0, device="cpu")
    t_start = time.perf_counter()
    rows, ext = [], None
    for cut in cuts:
        for seed in seeds:
            for mode in ("fresh", "once"):
                sweep_args.seed = seed
                cfg = run_config(sweep_args, cut, "exact")
                cfg = dataclasses.replace(cfg, disclose=mode)
                run_dir = os.path.join(args.out, f"c{cut:.1f}-seed{seed}-{mode}")
                train_s = train_or_reuse(cfg, run_dir, args.reuse)
                run = load_run(run_dir, device="cpu")
                truths = partition(load_dataset("digits", 16), cfg.data)
                if ext is None:
                    ext = feature_extractor(run, ec)[0]
                evals = [evaluate_client(run, i, t, ec, ext, keep_images=args.images) for i, t in enumerate(truths)]
                fg = ext.features(np.concatenate([e.samples for e in evals]))
                fr = ext.features(np.concatenate([t.test_images for t in truths]))
                from collafuse.metrics.distances import frechet_distance

                fd = frechet_distance(fg, fr)
                lo, hi = bootstrap_fd(fg, fr, args.bootstrap, seed)
                row = {"cut_ratio": cut, "seed": seed, "disclose": mode, "fd_pooled": fd, "fd_ci95": [lo, hi],
                       "fd_sum_clients": float(sum(e.quality.fd for e in evals)),
                       "kd_sum_clients": float(sum(e.quality.kd_mean for e in evals)), "train_wall_s": train_s}
                rows.append(row)
                print(f"c = {cut:.1f} seed {seed} {mode:>5}: pooled FD {fd:7.2f} [{lo:7.2f}, {hi:7.2f}]  "
                      f"summed KD {row['kd_sum_clients']:6.3f}  (train {train_s:4.0f} s)", flush=True)
    summary = []
    print(f"\n{'c':>4} | {'FD fresh (seeds)':>22} | {'FD once (seeds)':>22} | once/fresh")
    for cut in cuts:
        f = [r["fd_pooled"] for r in rows if r["cut_ratio"] == cut and r["disclose"] == "fresh"]
        o = [r["fd_pooled"] for r in rows if r["cut_ratio"] == cut and r["disclose"] == "once"]
        ratio = float(np.mean(o) / np.mean(f))
        summary.append({"cut_ratio": cut, "fd_fresh_mean": float(np.mean(f)), "fd_once_mean": float(np.mean(o)),
                        "fd_fresh": f, "fd_once": o, "ratio_once_over_fresh": ratio})
        print(f"{cut:4.1f} | {', '.join(f'{v:6.2f}' for v in f):>22} | {', '.join(f'{v:6.2f}' for v in o):>22} | "
              f"{ratio:.2f}")
    out = {"meta": {"command": "python benchmarks/privacy_disclose_once.py " + " ".join(sys.argv[1:] if argv is None else argv),
                    "args": vars(args), "machine": machine_description(), "torch": torch.__version__,
                    "wall_s": time.perf_counter() - t_start},
           "runs": rows, "summary": summary}
    os.makedirs(args.out, exist_ok=True)
    atomic_write_json(os.path.join(args.out, "disclose_once.json"), out)
    if args.json:
        atomic_write_json(args.json, out)
    print(f"finished in {out['meta']['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
