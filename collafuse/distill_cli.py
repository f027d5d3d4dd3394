"""``collafuse distill``: distil one client's segment into a few-step student (:mod:`collafuse.distill`).

    collafuse distill --run runs/demo --client 0 --steps 4
    collafuse distill --run runs/demo --client 0 --steps 4 --resume      # continue after an interruption
    collafuse distill --run site_run --client 1 --steps 2                  # a site's client-train run

Writes ``student_n{N}.json`` + ``.safetensors`` for every stage into ``--out`` (default
``RUN/distill/client_K``); ``collafuse export --student …/student_nN.json`` turns one into a
bundle, and ``collafuse evaluate --student …`` scores it. Exit codes
(:mod:`collafuse_edge.cli_contract`): 0 ok, 1 an operation failed, 2 bad input, 130 interrupted.
"""
from __future__ import annotations

import argparse

from collafuse_edge.cli_contract import command, non_negative_int, positive_int

STEP_CHOICES = (1, 2, 4, 8)  # mirrors collafuse.distill.STUDENT_STEPS (building the parser imports no torch)
METHOD_CHOICES = ("progressive", "consistency", "dmd")  # mirrors collafuse.distill.DISTILL_METHODS


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}") from None
    if not (v > 0 and v < float("inf")):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return v


def _non_negative_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number ≥ 0, got {text!r}") from None
    if not (v >= 0 and v < float("inf")):
        raise argparse.ArgumentTypeError(f"must be a number ≥ 0, got {text!r}")
    return v


def _ema_decay(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1), got {text!r}") from None
    if not (0.0 <= v < 1.0):
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1), got {text!r}")
    return v


def add_distill_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "distill", help="distil a client's segment into a few-step (1-8 call) student on its own data",
        description="Distil client K's low-noise segment (handoff level → clean image) into a student that needs "
                    "N model calls per image. Trained on the client's own images only (noised to its levels; no "
                    "server needed); the teacher is the client's EMA model with a multi-step DDIM sampler. Works "
                    "on a `collafuse train` run and on a site's `collafuse client-train` run.",
    )
    p.add_argument("--run", required=True, metavar="DIR", help="a trained run (or a site's client-train run)")
    p.add_argument("--client", required=True, type=non_negative_int, metavar="K", help="client index (0-based)")
    p.add_argument("--steps", required=True, type=int, choices=STEP_CHOICES, metavar="N",
                   help="model calls per image of the student: 1, 2, 4 or 8")
    p.add_argument("--method", choices=METHOD_CHOICES, default="dmd",
                   help="dmd (default; distribution matching: the student learns the distribution of the teacher's "
                        "full stochastic segment), progressive (imitates the teacher's deterministic DDIM; halving "
                        "stages, every stage's student kept) or consistency")
    p.add_argument("--out", default=None, metavar="DIR", help="where students and checkpoints go "
                                                              "(default RUN/distill/client_K)")
    p.add_argument("--teacher-steps", type=positive_int, default=32, metavar="M",
                   help="DDIM levels of the teacher's sampler over the segment (default 32)")
    p.add_argument("--start-steps", type=positive_int, default=None, metavar="S",
                   help="progressive: the first stage's student steps, N times a power of two; each later stage "
                        "halves them (default N, and 2 for N = 1)")
    p.add_argument("--iters", type=positive_int, default=300, help="optimisation steps per stage (default 300)")
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--lr", type=_positive_float, default=None,
                   help="the student's learning rate (default 2e-5 for dmd, 1e-4 otherwise)")
    p.add_argument("--ema-decay", type=_ema_decay, default=0.99)
    p.add_argument("--regression-weight", type=_non_negative_float, default=0.25, metavar="W",
                   help="dmd: weight of the regression onto the teacher's DDIM outputs (default 0.25)")
    p.add_argument("--fake-lr", type=_positive_float, default=1e-4, metavar="LR",
                   help="dmd: learning rate of the denoiser that follows the student's images (default 1e-4)")
    p.add_argument("--fake-updates", type=positive_int, default=2, metavar="U",
                   help="dmd: updates of that denoiser per student step (default 2)")
    p.add_argument("--pairs", type=positive_int, default=1024,
                   help="dmd: (handoff sample, teacher output) pairs for the regression (default 1024)")
    p.add_argument("--checkpoint-every", type=positive_int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.set_defaults(func=cmd_distill)
    return p


@command("collafuse distill")
def cmd_distill(args: argparse.Namespace) -> int:
    from .distill import DistillConfig, distill
    from .errors import ConfigError
    from .train import resolve_device

    if args.start_steps is not None and args.method != "progressive":
        raise ConfigError(f"--start-steps only applies to --method progressive (this is --method {args.method}); "
                          "drop it, or add --method progressive")

    dc = DistillConfig(client=args.client, steps=args.steps, method=args.method, teacher_steps=args.teacher_steps,
                       start_steps=args.start_steps, iters=args.iters,
                       batch_size=args.batch_size, lr=args.lr, ema_decay=args.ema_decay,
                       checkpoint_every=args.checkpoint_every, seed=args.seed,
                       regression_weight=args.regression_weight, fake_lr=args.fake_lr,
                       fake_updates=args.fake_updates, pairs=args.pairs,
                       device=str(resolve_device(args.device)))
    res = distill(args.run, dc, args.out, resume=args.resume, progress=True)
    print(f"distilled client {args.client} ({args.method}) to step {res.step} in {res.wall_s:.1f} s; students:")
    for n, path in sorted(res.students.items(), reverse=True):
        print(f"  N={n}: {path}")
    print(f"export one with: collafuse export --run {args.run} --client {args.client} "
          f"--student {res.students.get(args.steps, '<student_nN.json>')} --out BUNDLE")
    return 0


__all__ = ["add_distill_parser", "cmd_distill"]
