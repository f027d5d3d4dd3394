"""``collafuse evaluate``: quality, disclosure, reconstruction attack and cost of a trained run.

    collafuse evaluate --run runs/demo --out runs/demo/eval -n 100 --sample-steps 50
    collafuse evaluate --run runs/demo --bundle bundles/client0   # client latency on collafuse-edge
    collafuse evaluate --run site0 --server https://host:8443      # a site's run: server levels over HTTP

Prints one row per client and writes ``report.json`` plus sample and attack grids to ``--out``
(default ``RUN/eval``). ``--sampler`` is the shared flag (default ddim); ``--sample-steps`` is one
per-image budget of DDIM evaluations that each client shares with the server in proportion to
their levels, so clients with different cuts are compared at equal cost (``--steps`` is its old,
deprecated name). Exit codes (:mod:`collafuse_edge.cli_contract`): 0 ok, 1 an operation failed,
2 bad input, 130 interrupted.
"""
from __future__ import annotations

import argparse
import json
import os

from collafuse_edge.cli_contract import add_deprecated_alias, add_sampler_args, command, positive_int


def add_evaluate_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "evaluate", help="quality (FD/KD), disclosure, reconstruction attack and cost of a trained run",
        description="Evaluate each client of a run against its own private split: FD/KD in the feature space "
                    "of a classifier trained on the dataset (not FID/KID), the paper's disclosure metrics "
                    "(KD and pixel MSE of what the server sees), a reconstruction attack with the server's "
                    "own model, and counted FLOPs / bytes / client latency per image.",
    )
    p.add_argument("--run", required=True, metavar="DIR", help="a trained run directory, or a site's client-train run")
    from ..cli import add_remote_args

    add_remote_args(p)
    p.add_argument("--out", default=None, metavar="DIR", help="where to write report.json and grids (default RUN/eval)")
    p.add_argument("-n", "--num-images", type=int, default=100, help="images generated per client (default 100)")
    g = add_sampler_args(p, total_steps=50)
    add_deprecated_alias(g, "--steps", "--sample-steps", dest="sample_steps", type=positive_int)
    p.add_argument("--disclosed", type=int, default=200,
                   help="training images per client whose disclosure x_h is drawn and attacked (default 200)")
    p.add_argument("--no-attack", action="store_true", help="skip the reconstruction attack")
    p.add_argument("--latency", default=None,
                   help="edge (onnxruntime via collafuse-edge; needs --bundle) | torch | none "
                        "(default: edge with --bundle, else torch)")
    p.add_argument("--bundle", default=None, metavar="DIR",
                   help="a bundle exported from this run's client model (`collafuse export`), to time the "
                        "client's levels on the edge runtime")
    p.add_argument("--threads", type=int, default=1, help="CPU threads for evaluation and latency (default 1)")
    p.add_argument("--feature-net", default=None, metavar="FILE",
                   help="a feature network file (collafuse .safetensors/.json pair or TorchScript) "
                        "instead of the project's classifier")
    p.add_argument("--feature-cache", default=None, metavar="DIR",
                   help="cache of the project's classifier (default ~/.cache/collafuse/feature-nets)")
    p.add_argument("--kd-subsets", type=int, default=100)
    p.add_argument("--student", default=None, metavar="JSON",
                   help="a distilled few-step student (student_n{N}.json from `collafuse distill`): its client is "
                        "evaluated with the student and its N-step timetable instead of the client model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true", help="print the whole report as JSON instead of a table")
    p.set_defaults(func=cmd_evaluate)
    return p


@command("collafuse evaluate")
def cmd_evaluate(args: argparse.Namespace) -> int:
    from ..evaluate import EvalConfig, evaluate_run, format_rows, summary_rows
    from ..train import resolve_device

    ec = EvalConfig(num_images=args.num_images, sampler=args.sampler,
                    sample_steps=args.sample_steps if args.sampler == "ddim" else None,
                    num_disclosed=args.disclosed, attack=not args.no_attack,
                    latency=args.latency or ("edge" if args.bundle else "torch"), bundle=args.bundle,
                    threads=args.threads, feature_net=args.feature_net, feature_cache=args.feature_cache,
                    kd_subsets=args.kd_subsets, seed=args.seed, device=str(resolve_device(args.device)),
                    student=args.student)
    out = args.out or os.path.join(args.run, "eval")
    from ..cli import remote_from

    remote = remote_from(args)
    try:
        if remote is not None and not args.json:
            print(f"server levels from {args.server} (model {remote.model_version}); the reconstruction attack "
                  "needs the server's weights and runs only where they are")
        report = evaluate_run(args.run, ec, out_dir=out, progress=not args.json, remote=remote)
    finally:
        if remote is not None:
            remote.close()
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
        return 0
    fn = report.feature_net
    acc = fn.get("test_accuracy")
    print(f"run {report.run_dir} at step {report.step}, objective {report.objective}; metrics in {fn['kind']}"
          + (f", classifier held-out accuracy {acc:.3f}" if acc is not None else ""))
    print(format_rows(summary_rows(report)))
    pooled = report.pooled_quality
    print(f"summed KD {report.kd_sum:.4g}, summed FD {report.fd_sum:.4g}"
          + (f"; pooled KD {pooled.kd_mean:.4g}, FD {pooled.fd:.4g}" if pooled else ""))
    lat = report.clients[0].cost.latency_note
    print(f"latency: {lat}; disclosure KD/MSE higher = less disclosed, attack PSNR higher = more disclosed")
    print(f"wrote {os.path.join(out, 'report.json')} ({report.wall_s:.0f} s)")
    return 0
