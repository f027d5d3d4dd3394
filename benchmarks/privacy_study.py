"""The privacy numbers of docs/results.md: the three attacks per cut ratio on the digits (docs/privacy.md).

1. ``collafuse privacy`` on the embedded digits (80 % the site's training images, 20 % held out
   as the population): the Bayes-optimal attack on one disclosure and on the disclosures of a
   planned 3000-step run at batch 64 (fresh noise; perfectly linked copies), and k-means linking
   of repeated copies at c ∈ {0.2, 0.4, 0.6, 0.8} against copies per image — with the labels the
   server sees by default, and without them.
2. The trained server's attack of the cut-ratio experiment (docs/data/cut_ratio_sweep.json,
   `collafuse evaluate`'s reconstruction) against the Bayes-optimal attack on **the same**
   disclosures: the same 100 training images per client and the same x_h (drawn again exactly as
   `collafuse.evaluate` draws them), scored by the same function.

    python benchmarks/privacy_study.py --json docs/data/privacy_digits.json --plots docs/img

Prints the tables, writes the JSON (with the machine) and ``privacy_vs_cut.png`` /
``privacy_vs_copies.png``.
"""
from __future__ import annotations

import argparse
import os
import sys
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", default="runs/privacy_digits.json")
    p.add_argument("--plots", default="runs/privacy-plots", help="folder for privacy_vs_cut.png / privacy_vs_copies.png")
    p.add_argument("--sweep", default="docs/data/cut_ratio_sweep.json", help="the cut-ratio experiment's results")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--link-copies", default="1,4,16,64,256")
    p.add_argument("--link-images", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="a smoke run (seconds)")
    return p.parse_args(argv)


def trained_vs_bayes(sweep_path: str) -> list[dict]:
    """Per exact-objective cut of the sweep and client: the sweep's trained-server attack next to the
    Bayes attack on the identical disclosures."""
    import json

    import numpy as np
    import torch

    from collafuse.config import DataConfig
    from collafuse.data import load_dataset, partition
    from collafuse.metrics.disclosure import bayes_reconstruction_scores
    from collafuse.objectives import disclose
    from collafuse_edge.schedule import Schedule, client_level_count

    with open(sweep_path, encoding="utf-8") as f:
        sweep = json.load(f)
    a = sweep["meta"]["args"]
    seed, n_disc = int(a["seed"]), int(a["disclosed"])
    truths = partition(load_dataset("digits", 16), DataConfig("digits", 16, int(a["clients"]), a["partition"], 0.2, seed))
    sched = Schedule.create(int(a["timesteps"]), "linear")
    out = []
    for run in sweep["runs"]:
        if run["objective"] != "exact" or not (0 < run["cut_ratio"] < 1):
            continue
        for c in run["clients"]:
            truth = truths[c["client"]]
            k = client_level_count(run["cut_ratio"], sched.T)
            # exactly evaluate_client's choice of images and its draw of x_h
            rng = np.random.default_rng(seed + 1000 * truth.index)
            idx = np.sort(rng.choice(len(truth.train_images), min(n_disc, len(truth.train_images)), replace=False))
            x0, y0 = truth.train_images[idx], truth.train_labels[idx]
            gen = torch.Generator().manual_seed(seed + 17 * truth.index)
            d = disclose(c["client"], torch.from_numpy(x0), torch.from_numpy(y0), k, sched, "exact", gen, True)
            ab = float(sched.alpha_bar(np.array([d.level]))[0])
            b = bayes_reconstruction_scores(d.x.numpy(), x0, ab)
            tw, ch = c["attack_training_tweedie"], c["attack_training_chain"]
            out.append({"cut_ratio": run["cut_ratio"], "client": c["client"], "level": d.level, "alpha_bar": ab,
                        "images": int(len(x0)),
                        "trained_tweedie_psnr": tw["psnr_paired"], "trained_tweedie_nn_match": tw["nn_match_rate"],
                        "trained_chain_psnr": ch["psnr_paired"], "trained_chain_nn_match": ch["nn_match_rate"],
                        "bayes_psnr": b.psnr_paired, "bayes_nn_match": b.nn_match_rate,
                        "bayes_psnr_of_mean_mse": float(10 * np.log10(4.0 / b.mse_paired)) if b.mse_paired > 0 else float("inf")})
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    from collafuse.privacy import (PrivacyConfig, _split, format_table, link_attack, plot_report, privacy_report)
    from collafuse.data import load_dataset
    from collafuse_edge.bench import machine_description
    from collafuse_edge.files import atomic_write_json
    from collafuse_edge.schedule import Schedule, handoff_level

    t0 = time.perf_counter()
    copies = tuple(float(v) for v in args.link_copies.split(","))
    cfg = PrivacyConfig(steps=args.steps, batch_size=args.batch_size, link_copies=copies, link_images=args.link_images)
    if args.quick:
        cfg = PrivacyConfig(steps=50, batch_size=8, cut_ratios=(0.2, 0.6), link_cuts=(0.2,), link_copies=(1, 4),
                            link_images=32, max_images=200)
    report = privacy_report(cfg, progress=False)
    print(format_table(report))
    # the same linking without labels (server_conditioning = none)
    ds = load_dataset(cfg.data, cfg.image_size)
    X, _, P = _split(ds.images, ds.labels, cfg.holdout, cfg.seed, cfg.max_images)
    sub = np.random.default_rng(cfg.seed + 1).permutation(len(X))[:min(cfg.link_images, len(X))]
    sched = Schedule.create(cfg.timesteps, cfg.beta_schedule)
    nolab = []
    for c in cfg.link_cuts:
        ab = float(sched.alpha_bar(np.array([handoff_level(c, sched.T)]))[0])
        for n in cfg.link_copies:
            t1 = time.perf_counter()
            r = link_attack(X[sub], P, None, ab, n, cfg.batch_size, seed=cfg.seed)
            nolab.append({"cut_ratio": c, "copies": n, **r, "wall_s": time.perf_counter() - t1})
    print("\nwithout labels:")
    print(f"{'c':>5} {'copies':>6} {'purity':>7} {'re-id':>7} {'lin PSNR':>8} {'s':>5}")
    for r in nolab:
        print(f"{r['cut_ratio']:5.2f} {r['copies']:6.0f} {r['link_purity']:7.1%} {r['reid']:7.1%} "
              f"{r['psnr_linear']:8.1f} {r['wall_s']:5.1f}")
    versus = [] if args.quick else trained_vs_bayes(args.sweep)
    if versus:
        print("\ntrained server (cut-ratio experiment) vs Bayes-optimal, same disclosures, mean over clients:")
        print(f"{'c':>5} | {'Tweedie PSNR':>12} {'NN-match':>8} | {'chain PSNR':>10} {'NN-match':>8} | "
              f"{'Bayes PSNR':>10} {'(of mean MSE)':>13} {'NN-match':>8}")
        for c in sorted({r["cut_ratio"] for r in versus}):
            rs = [r for r in versus if r["cut_ratio"] == c]
            m = lambda k: float(np.mean([r[k] for r in rs]))  # noqa: E731
            print(f"{c:5.1f} | {m('trained_tweedie_psnr'):12.1f} {m('trained_tweedie_nn_match'):8.2f} | "
                  f"{m('trained_chain_psnr'):10.1f} {m('trained_chain_nn_match'):8.2f} | {m('bayes_psnr'):10.1f} "
                  f"{m('bayes_psnr_of_mean_mse'):13.1f} {m('bayes_nn_match'):8.2f}")
    os.makedirs(args.plots, exist_ok=True)
    plots = plot_report(report, os.path.join(args.plots, "privacy_vs_cut.png"),
                        os.path.join(args.plots, "privacy_vs_copies.png"))
    out = {"meta": {"command": "python benchmarks/privacy_study.py " + " ".join(sys.argv[1:] if argv is None else argv),
                    "machine": machine_description(), "torch": torch.__version__, "threads": args.threads,
                    "wall_s": time.perf_counter() - t0},
           "report": report, "linking_without_labels": nolab, "trained_vs_bayes": versus}
    atomic_write_json(args.json, out)
    print(f"wrote {args.json} and {', '.join(plots)}; {out['meta']['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
