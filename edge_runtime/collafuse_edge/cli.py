"""``collafuse-edge``: inspect, benchmark and run an exported client bundle (no torch).

    collafuse-edge doctor [--bundle BUNDLE]                  # versions, providers, caches: paste into bug reports
    collafuse-edge info --bundle BUNDLE
    collafuse-edge warmup --bundle BUNDLE --batch 1,16       # optimised graph / TensorRT engines, ahead of time
    collafuse-edge bench --bundle BUNDLE --batch 1,16 --threads 2
    collafuse-edge generate --bundle BUNDLE --from handoff.npy --out images.png
    collafuse-edge generate --bundle BUNDLE --local -n 16 --out images.npy     # c = 1 bundles
    collafuse-edge generate --bundle BUNDLE --server https://HOST:8080 -n 16 --out images.png --ca-file ca.pem
    collafuse-edge keygen --out keys/export                  # an Ed25519 key pair for signed bundles

Sampling flags (every command that samples, as in ``collafuse sample``): ``--sampler {ddpm,ddim}``
(default ddim), ``--client-steps N`` (DDIM evaluations on this device's levels; ``--steps`` is its
old, deprecated name) and, for ``generate --server``, ``--server-sampler`` (default: the same as
``--sampler``) and ``--server-steps N`` (the server's half).

Long work reports progress on stderr (``--quiet``: none); results go to stdout. ``--trust FILE``
(or ``$COLLAFUSE_TRUST``) accepts only bundles signed by those public keys.

Exit codes (:mod:`collafuse_edge.cli_contract`): 0 success; 1 an operation failed (a server refused
or could not be reached, a dependency is missing); 2 bad input (a flag, file or bundle: the message
says which); 130 interrupted.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

import numpy as np

from . import __version__
from .bundle import load_bundle
from .cli_contract import SAMPLER_CHOICES, add_deprecated_alias, add_sampler_args, command, positive_int, run_command
from .generate import GenerateRequest, generate_from_server, handoff_for, run_generate  # noqa: F401 (were here)
from .progress import Progress
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
    # TensorRT's optimisation profile covers batches 1 … --max-batch, so warmup and generate with
    # the same --max-batch share one engine
    extra = {"trt_max_batch": args.max_batch} if getattr(args, "max_batch", None) else {}
    return SessionConfig(
        **extra,
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
    if server:
        g.add_argument("--server-sampler", choices=SAMPLER_CHOICES, default=None,
                       help="the sampler of the server's levels (default: the same as --sampler); "
                            "--server-steps applies to ddim")


def _sampler_config(args: argparse.Namespace) -> SamplerConfig:
    """The client's half: DDIM thins its levels to ``--client-steps``; DDPM runs every level."""
    return SamplerConfig(args.sampler, args.client_steps if args.sampler == "ddim" else None, args.eta)


def _add_trust_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trust", action="append", metavar="PUBKEY",
                   help="accept only a bundle signed by a key in this PEM public key file (repeatable; "
                        "default: the files in $COLLAFUSE_TRUST; none: unsigned bundles are accepted)")


def _add_quiet_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("-q", "--quiet", action="store_true", help="no progress or notices on stderr (errors still)")


def _progress(args: argparse.Namespace) -> Progress:
    return Progress(enabled=not getattr(args, "quiet", False))


def _open_runtime(args: argparse.Namespace, **kw):
    from .runtime import EdgeRuntime

    return EdgeRuntime.open(args.bundle, _session_config(args), trust=args.trust, **kw)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Run exported collafuse client bundles (no torch).")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("doctor", help="what this device can run: versions, numpy ABI, providers, caches, machine")
    p.add_argument("--bundle", metavar="DIR", help="also check this bundle and start a session on each provider")
    p.add_argument("--trt-cache", metavar="DIR", help="the TensorRT engine cache you pass to generate, if any")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("info", help="check a bundle (schema, hashes, signature) and describe it")
    p.add_argument("--bundle", required=True, metavar="DIR")
    p.add_argument("--json", action="store_true", help="print the description as JSON")
    _add_trust_arg(p)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("warmup", help="build the optimised graph / TensorRT engines ahead of the first generate")
    p.add_argument("--bundle", required=True, metavar="DIR")
    p.add_argument("--batch", type=_int_list, default=(1,), metavar="B[,B…]",
                   help="the batch sizes the device will use (default 1); each is called once")
    p.add_argument("--max-batch", type=positive_int, default=64,
                   help="largest batch per model call, as in generate (default 64; TensorRT's profile covers 1 … it)")
    p.add_argument("--json", metavar="FILE", help="also write the timings as JSON")
    _add_trust_arg(p)
    _add_quiet_arg(p)
    _add_session_args(p)
    p.set_defaults(func=cmd_warmup)

    p = sub.add_parser("keygen", help="make an Ed25519 key pair for signing bundles (collafuse export --sign-key)")
    p.add_argument("--out", required=True, metavar="PREFIX", help="writes PREFIX.key (private, mode 0600) and PREFIX.pub")
    p.add_argument("--overwrite", action="store_true", help="replace an existing key pair at PREFIX")
    p.set_defaults(func=cmd_keygen)

    p = sub.add_parser("bench", help="time one denoiser call and one client loop on this device")
    p.add_argument("--bundle", required=True, metavar="DIR")
    p.add_argument("--batch", type=_int_list, default=(1, 16), metavar="B[,B…]", help="default 1,16")
    p.add_argument("--runs", type=int, default=200, help="timed calls per batch size (default 200)")
    p.add_argument("--loop-runs", type=int, default=3, help="timed client loops per batch size (default 3)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    _add_trust_arg(p)
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
    p.add_argument("--ca-file", metavar="PEM",
                   help="CA (or self-signed server) certificate to verify an https:// --server with")
    p.add_argument("-n", type=int, default=None,
                   help="number of images (default: every row of --from; required with --local)")
    p.add_argument("--out", required=True, metavar="FILE", help=".png (a grid; needs Pillow) or .npy")
    p.add_argument("--seed", type=int, default=0, help="request seed: initial and step noise (default 0)")
    p.add_argument("--labels", type=_labels, default=None, metavar="L[,L…]",
                   help="class labels: one for every image, or one per image (default: cycling through the "
                        "classes this client knows, as recorded in the bundle; else 0, 1, 2, …)")
    p.add_argument("--max-batch", type=positive_int, default=64,
                   help="largest batch per denoiser call (default 64; TensorRT's engines cover batches 1 … it, "
                        "so give warmup the same value)")
    _add_trust_arg(p)
    _add_quiet_arg(p)
    _add_sampler_args(p, server=True)
    _add_session_args(p)
    p.set_defaults(func=cmd_generate)
    return parser


# ---------------------------------------------------------------------------------------------
# commands


@command(PROG)
def cmd_info(args: argparse.Namespace) -> int:
    from .generate import bundle_hash
    from .runtime import client_classes
    from .signing import SIGNATURE_NAME, load_verified_bundle, signature_summary

    if args.trust is None and not os.environ.get("COLLAFUSE_TRUST"):
        bundle, kid = load_bundle(args.bundle), None
    else:
        bundle, kid = load_verified_bundle(args.bundle, args.trust)
    desc = bundle.describe()
    desc["bundle_sha256"] = bundle_hash(bundle)
    desc["client_classes"] = None if client_classes(bundle) is None else list(client_classes(bundle))
    desc["signature"] = (f"verified: signed by trusted key {kid}" if kid else
                         signature_summary(bundle.path) + (" (not checked: no --trust)"
                                                           if (bundle.path / SIGNATURE_NAME).exists() else ""))
    if args.json:
        print(json.dumps(desc, indent=2))
        return 0
    print(f"bundle         {desc['bundle']}  (format {desc['format_version']}, sha256 verified)")
    print(f"bundle sha256  {desc['bundle_sha256']}  ({desc['signature']})")
    print(f"model          {desc['model_file']}  {desc['model_bytes'] / 1e6:.2f} MB  {desc['precision']}"
          f"  ({desc['exporter']}, opset {desc['opset']})")
    print(f"image          {'×'.join(map(str, desc['image_shape']))}  classes: {desc['num_classes'] or 'unconditional'}"
          + (f"  (this client knows {', '.join(map(str, desc['client_classes']))})" if desc["client_classes"] else ""))
    print(f"schedule       T={desc['num_train_timesteps']} {desc['beta_schedule']}")
    print(f"cut            c={desc['cut_ratio']}: client levels {desc['handoff_level']}…0 "
          f"({desc['client_levels']} levels){'  — local, no server needed' if desc['local_only'] else ''}")
    if bundle.sampler is not None:
        print(f"sampler        distilled: {bundle.sampler.steps} model calls per image (its own timetable; "
              "--sampler/--client-steps do not apply)")
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

    rt = _open_runtime(args)
    rows = [r.to_dict() for r in bench_runtime(rt, args.batch, call_runs=args.runs,
                                               loop_runs=args.loop_runs, sampler=_sampler_config(args))]
    machine = machine_description()
    levels = (f"a distilled student: {rt.bundle.sampler.steps} calls over {rt.bundle.client_levels} client levels"
              if rt.bundle.sampler is not None else f"{rt.bundle.client_levels} client levels")
    print(f"{rt.bundle.path}: {rt.bundle.precision}, {levels}, "
          f"providers {', '.join(rt.denoiser.providers)}, threads {args.threads or 'default'}")
    print(f"machine: {machine['cpu']}, {machine['cores']} cores")
    print(format_table(rows, ["what", "batch", "levels", "runs", "median_ms", "p90_ms", "per_image_ms"]))
    if args.json:
        from .files import atomic_write_json

        atomic_write_json(args.json, {"bundle": rt.bundle.describe(), "machine": machine,
                                      "providers": rt.denoiser.providers, "provider_notes": rt.denoiser.provider_notes,
                                      "cuda_graph": rt.denoiser.config.cuda_graph, "rows": rows})
    return 0


@command(PROG)
def cmd_generate(args: argparse.Namespace) -> int:
    if args.ca_file is not None and not (args.server or "").startswith("https://"):
        from .errors import InputError

        raise InputError("--ca-file verifies an https:// server; use it with --server https://HOST:PORT")
    req = GenerateRequest(
        bundle=args.bundle, out=args.out, n=args.n, from_file=args.from_file, local=args.local,
        seed=args.seed, labels=args.labels, max_batch=args.max_batch,
        sampler=_sampler_config(args), session=_session_config(args), server=args.server, token=args.token,
        server_steps=args.server_steps, server_sampler=args.server_sampler, ca_file=args.ca_file,
        trust=tuple(args.trust) if args.trust else None, progress=_progress(args),
    )
    r = run_generate(req)
    labels = "none" if r["labels"] is None else _short_list(r["labels"])
    print(f"wrote {r['images']} images to {r['out']} ({r['levels']} client levels, "
          f"{r['seconds']:.2f} s, {', '.join(r['providers'])}); model {r['model_version']}, seed {r['seed']}, "
          f"labels {labels}, bundle sha256 {r['bundle_sha256'][:16]}"
          + (f", signed by {r['signed_by']}" if r["signed_by"] else ""))
    return 0


def _short_list(values: list[int], limit: int = 16) -> str:
    text = ",".join(map(str, values[:limit]))
    return text + (f",… ({len(values)})" if len(values) > limit else "")


@command(PROG)
def cmd_warmup(args: argparse.Namespace) -> int:
    from .warmup import warm_up

    r = warm_up(args.bundle, _session_config(args), args.batch, max_batch=args.max_batch, trust=args.trust,
                progress=_progress(args))
    calls = ", ".join(f"B={c['batch']} {c['first_ms']:.1f} → {c['second_ms']:.1f} ms" for c in r["calls"])
    cache = ("optimised graph loaded from the cache" if r["graph_cache_hit"] else
             "optimised graph saved for later starts" if r["graph_cache"] != "off" and r["providers"] == ["CPUExecutionProvider"]
             else "no CPU graph cache")
    if r["trt_cache_dir"]:
        cache = (f"TensorRT engines {'built' if r['trt_first_build'] else 'reused'}: {r['trt_engines']} in "
                 f"{r['trt_cache_dir']}")
    print(f"warm: {r['bundle']} on {', '.join(r['providers'])}: session {r['session_s']:.2f} s ({cache}); "
          f"first/second call {calls}; total {r['total_s']:.2f} s")
    if args.json:
        from .files import atomic_write_json

        atomic_write_json(args.json, r)
    return 0


@command(PROG)
def cmd_doctor(args: argparse.Namespace) -> int:
    from .doctor import format_report, report

    r = report(args.bundle, args.trt_cache)
    print(json.dumps(r, indent=2) if args.json else format_report(r))
    return 0 if r["onnxruntime"]["ok"] and r.get("bundle", {}).get("ok", True) else 1


@command(PROG)
def cmd_keygen(args: argparse.Namespace) -> int:
    from .signing import key_id, load_private_key, write_key_pair

    priv, pub = write_key_pair(args.out, overwrite=args.overwrite)
    print(f"wrote {priv} (private: keep it on the exporting machine, mode 0600) and {pub} (public: give it to "
          f"devices as --trust {pub}); key id {key_id(load_private_key(priv).public_key())}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "quiet", False):
        return run_command(PROG, args.func, args)
    import logging  # --quiet: the runtime's notices (provider fallbacks, TensorRT builds) too

    log = logging.getLogger("collafuse_edge")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        return run_command(PROG, args.func, args)
    finally:
        log.setLevel(level)


if __name__ == "__main__":
    sys.exit(main())
