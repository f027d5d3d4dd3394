"""``collafuse-edge``: inspect, benchmark and run an exported client bundle (no torch).

    collafuse-edge info --bundle BUNDLE
    collafuse-edge bench --bundle BUNDLE --batch 1,16 --threads 2
    collafuse-edge generate --bundle BUNDLE --from handoff.npy --out images.png
    collafuse-edge generate --bundle BUNDLE --local -n 16 --out images.npy     # c = 1 bundles
    collafuse-edge generate --bundle BUNDLE --server http://HOST:8080 -n 16 --out images.png  # token: $COLLAFUSE_TOKEN

Sampling flags (every command that samples, as in ``collafuse sample``): ``--sampler {ddpm,ddim}``
(default ddim), ``--client-steps N`` (DDIM evaluations on this device's levels; ``--steps`` is its
old, deprecated name) and, for ``generate --server``, ``--server-steps N`` (the server's half).

Exit codes (:mod:`collafuse_edge.cli_contract`): 0 success; 1 an operation failed (a server refused
or could not be reached, a dependency is missing); 2 bad input (a flag, file or bundle: the message
says which); 130 interrupted.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from . import __version__
from .bundle import load_bundle
from .cli_contract import add_deprecated_alias, add_sampler_args, command, positive_int, run_command
from .generate import GenerateRequest, generate_from_server, handoff_for, run_generate  # noqa: F401 (were here)
from .sampler import SamplerConfig
from .session import GRAPH_OPTIMIZATIONS, SessionConfig

PROG = "collafuse-edge"


# ---------------------------------------------------------------------------------------------
# parsing helpers


def _int_list(text: str) -> tuple[int, ...]:
    try:
        out = tuple(int(p) for p in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    if not out or any(v < 1 for v in out):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return out


def _labels(text: str) -> np.ndarray | int:
    """"3" → 3 (every image), "1,2,3" → one per image."""
    try:
        out = [int(p) for p in text.split(",")]
        return out[0] if len(out) == 1 else np.array(out, dtype=np.int64)
    except ValueError:
        raise argparse.ArgumentTypeError(f"labels must be an integer or comma-separated integers, got {text!r}")


def _add_session_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("onnxruntime session")
    g.add_argument("--provider", action="append", metavar="NAME",
                   help="execution provider, repeatable, in order of preference: tensorrt, cuda, cpu "
                        "(default: every available one of TensorRT → CUDA → CPU)")
    g.add_argument("--threads", type=int, default=0, help="intra-op threads (default 0: all cores)")
    g.add_argument("--graph-optimization", choices=GRAPH_OPTIMIZATIONS, default="all")
    g.add_argument("--trt-cache", metavar="DIR", help="TensorRT engine/timing cache directory")
    g.add_argument("--trt-fp16", action="store_true", help="let TensorRT build fp16 kernels")
    g.add_argument("--cuda-tf32", action="store_true",
                   help="let the CUDA provider use TF32 maths (faster at large batches, ~1e-3 error)")
    g.add_argument("--cuda-graph", action="store_true",
                   help="CUDA provider: capture and replay each batch size's call as a CUDA graph (faster)")
    g.add_argument("--graph-cache", metavar="DIR|auto|off", default="auto",
                   help="keep the CPU-optimised graph between runs for faster starts: 'auto' (per-user "
                        "cache dir, default), 'off', or a directory")


def _session_config(args: argparse.Namespace) -> SessionConfig:
    return SessionConfig(
        providers=tuple(args.provider) if args.provider else None,
        intra_op_threads=args.threads,
        graph_optimization=args.graph_optimization,
        trt_cache_dir=args.trt_cache,
        trt_fp16=args.trt_fp16,
        cuda_tf32=args.cuda_tf32,
        cuda_graph=args.cuda_graph,
        graph_cache=args.graph_cache,
    )


def _add_sampler_args(p: argparse.ArgumentParser, *, server: bool) -> None:
    g = add_sampler_args(p, server=server)
    add_deprecated_alias(g, "--steps", "--client-steps", dest="client_steps", type=positive_int)
    g.add_argument("--eta", type=float, default=0.0, help="DDIM noise scale (0 = deterministic)")


def _sampler_config(args: argparse.Namespace) -> SamplerConfig:
    """The client's half: DDIM thins its levels to ``--client-steps``; DDPM runs every level."""
    return SamplerConfig(args.sampler, args.client_steps if args.sampler == "ddim" else None, args.eta)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Run exported collafuse client bundles (no torch).")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="check a bundle (schema, hashes) and describe it")
    p.add_argument("--bundle", required=True, metavar="DIR")
    p.add_argument("--json", action="store_true", help="print the description as JSON")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("bench", help="time one denoiser call and one client loop on this device")
    p.add_argument("--bundle", required=True, metavar="DIR")
    p.add_argument("--batch", type=_int_list, default=(1, 16), metavar="B[,B…]", help="default 1,16")
    p.add_argument("--runs", type=int, default=200, help="timed calls per batch size (default 200)")
    p.add_argument("--loop-runs", type=int, default=3, help="timed client loops per batch size (default 3)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    _add_sampler_args(p, server=False)
    _add_session_args(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("generate", help="finish handoff samples (or generate locally) and write images")
    p.add_argument("--bundle", required=True, metavar="DIR")
    src = p.add_argument_group("handoff source (exactly one)").add_mutually_exclusive_group(required=True)
    src.add_argument("--from", dest="from_file", metavar="FILE.npy",
                     help="handoff samples [B,C,H,W] at the bundle's handoff level (e.g. saved from the server)")
    src.add_argument("--local", action="store_true", help="start from pure noise (c = 1 bundles only)")
    src.add_argument("--server", metavar="URL",
                     help="a collafuse server (collafuse serve): it runs the high-noise levels, this device the rest")
    p.add_argument("--token", default=None, help="bearer token for --server (default: $COLLAFUSE_TOKEN)")
    p.add_argument("-n", type=int, default=None,
                   help="number of images (default: every row of --from; required with --local)")
    p.add_argument("--out", required=True, metavar="FILE", help=".png (a grid; needs Pillow) or .npy")
    p.add_argument("--seed", type=int, default=0, help="request seed: initial and step noise (default 0)")
    p.add_argument("--labels", type=_labels, default=None, metavar="L[,L…]",
                   help="class labels: one for every image, or one per image (default: 0, 1, 2, … cycling)")
    p.add_argument("--max-batch", type=int, default=64, help="largest batch per denoiser call (default 64)")
    _add_sampler_args(p, server=True)
    _add_session_args(p)
    p.set_defaults(func=cmd_generate)
    return parser


# ---------------------------------------------------------------------------------------------
# commands


@command(PROG)
def cmd_info(args: argparse.Namespace) -> int:
    desc = load_bundle(args.bundle).describe()
    if args.json:
        print(json.dumps(desc, indent=2))
        return 0
    print(f"bundle         {desc['bundle']}  (format {desc['format_version']}, sha256 verified)")
    print(f"model          {desc['model_file']}  {desc['model_bytes'] / 1e6:.2f} MB  {desc['precision']}"
          f"  ({desc['exporter']}, opset {desc['opset']})")
    print(f"image          {'×'.join(map(str, desc['image_shape']))}  classes: {desc['num_classes'] or 'unconditional'}")
    print(f"schedule       T={desc['num_train_timesteps']} {desc['beta_schedule']}")
    print(f"cut            c={desc['cut_ratio']}: client levels {desc['handoff_level']}…0 "
          f"({desc['client_levels']} levels){'  — local, no server needed' if desc['local_only'] else ''}")
    for s in desc["inputs"] + desc["outputs"]:
        print(f"  {s['name']:<13}{s['dtype']:<9}{s['shape']}")
    if desc.get("quality_gate"):
        gate = desc["quality_gate"]
        print(f"quality gate   vs fp32: ε rel-RMS {gate.get('eps_rel_rms', float('nan')):.3g}, sample mean |Δ| "
              f"{gate.get('sample_mean_abs', float('nan')):.3g} (max {gate.get('sample_max_abs', float('nan')):.3g}), "
              f"PSNR {float(gate.get('sample_psnr_db') or 'nan'):.1f} dB  ({'passed' if gate.get('passed') else 'FAILED'})")
    if desc.get("speed"):
        sp = desc["speed"]
        print(f"speed          {sp.get('summary', '')}")
    return 0


@command(PROG)
def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import bench_runtime, format_table, machine_description
    from .runtime import EdgeRuntime

    rt = EdgeRuntime.open(args.bundle, _session_config(args))
    rows = [r.to_dict() for r in bench_runtime(rt, args.batch, call_runs=args.runs,
                                               loop_runs=args.loop_runs, sampler=_sampler_config(args))]
    machine = machine_description()
    print(f"{rt.bundle.path}: {rt.bundle.precision}, {rt.bundle.client_levels} client levels, "
          f"providers {', '.join(rt.denoiser.providers)}, threads {args.threads or 'default'}")
    print(f"machine: {machine['cpu']}, {machine['cores']} cores")
    print(format_table(rows, ["what", "batch", "levels", "runs", "median_ms", "p90_ms", "per_image_ms"]))
    if args.json:
        Path(args.json).write_text(json.dumps({"bundle": rt.bundle.describe(), "machine": machine,
                                               "providers": rt.denoiser.providers,
                                               "provider_notes": rt.denoiser.provider_notes,
                                               "cuda_graph": rt.denoiser.config.cuda_graph, "rows": rows}, indent=2))
    return 0


@command(PROG)
def cmd_generate(args: argparse.Namespace) -> int:
    req = GenerateRequest(
        bundle=args.bundle, out=args.out, n=args.n, from_file=args.from_file, local=args.local,
        seed=args.seed, labels=args.labels, max_batch=args.max_batch,
        sampler=_sampler_config(args), session=_session_config(args), server=args.server, token=args.token,
        server_steps=args.server_steps,
    )
    r = run_generate(req)
    print(f"wrote {r['images']} images to {r['out']} ({r['levels']} client levels, "
          f"{r['seconds']:.2f} s, {', '.join(r['providers'])})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return run_command(PROG, args.func, args)


if __name__ == "__main__":
    sys.exit(main())
