"""``collafuse export``: one client of a trained run → an edge bundle.

    collafuse export --run runs/demo --client 0 --out bundles/client0 --precision fp32

The ``collafuse`` command finds :func:`add_export_parser` through the ``collafuse.commands`` entry
point; the handler returns an exit code. The work is :func:`collafuse.export.client_export.export_client`
(still importable from here).

Exit codes (:mod:`collafuse_edge.cli_contract`): 0 ok; 1 the export failed (it did not convert,
validate or pass the quality gate); 2 bad input (run directory, client index, flag); 130 interrupted.
"""
from __future__ import annotations

import argparse
import json

from collafuse_edge.bundle import PRECISIONS
from collafuse_edge.cli_contract import command

from .client_export import export_client

# Mirrors of onnx_export.EXPORTERS / MIN_OPSET, so building the parser imports neither torch
# nor onnx (a test keeps them equal).
EXPORTERS = ("auto", "dynamo", "legacy")
MIN_OPSET = 18


def add_export_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``export`` sub-command; sets ``func=cmd_export`` (returns an exit code)."""
    p = subparsers.add_parser(
        "export", help="export one client's denoiser as an edge bundle (ONNX + manifest)",
        description="Export a client's denoiser (EMA weights) for collafuse-edge: ONNX, validated "
                    "against torch, with a manifest holding the schedule, the cut and sha256 hashes.",
    )
    p.add_argument("--run", required=True, metavar="DIR", help="a trained run directory")
    p.add_argument("--client", required=True, type=int, metavar="K", help="client index (0-based)")
    p.add_argument("--out", required=True, metavar="BUNDLE", help="output bundle directory (new or empty)")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="fp32 (default); fp16: half the size, float32 I/O; int8: static QDQ calibrated "
                        "on the client's data. Variants pass a quality gate against fp32 and are "
                        "timed; the manifest says whether they were faster here")
    p.add_argument("--opset", type=int, default=MIN_OPSET, help=f"ONNX opset (default {MIN_OPSET})")
    p.add_argument("--exporter", choices=EXPORTERS, default="auto",
                   help="auto: torch's dynamo exporter, the legacy one if it fails")
    p.add_argument("--atol", type=float, default=1e-4, help="validation tolerance vs torch (absolute)")
    p.add_argument("--rtol", type=float, default=1e-3, help="validation tolerance vs torch (relative)")
    p.add_argument("--no-speed", action="store_true", help="skip timing a variant against fp32")
    p.add_argument("--student", default=None, metavar="JSON",
                   help="export a few-step student of this client instead (the student_n{N}.json written by "
                        "`collafuse distill`); the bundle records its sampler and N-level timetable")
    p.add_argument("--sign-key", "--sign", dest="sign_key", metavar="KEY",
                   help="sign the bundle with this Ed25519 private key (collafuse-edge keygen --out PREFIX makes "
                        "one): writes manifest.json.sig; devices given the public key (--trust) refuse anything else")
    p.add_argument("--overwrite", action="store_true", help="replace an existing bundle at --out")
    p.add_argument("--json", action="store_true", help="print the manifest summary as JSON")
    p.set_defaults(func=cmd_export)
    return p


@command("collafuse export")
def cmd_export(args: argparse.Namespace) -> int:
    from .exporter import ExportConfig

    key = None
    if args.sign_key is not None:  # a bad key is refused before minutes of export
        from collafuse_edge.signing import load_private_key

        key = load_private_key(args.sign_key)
    cfg = ExportConfig(precision=args.precision, opset=args.opset, exporter=args.exporter,
                       atol=args.atol, rtol=args.rtol, measure_speed=not args.no_speed)
    result = export_client(args.run, args.client, args.out, cfg, overwrite=args.overwrite, student=args.student)
    m = result.manifest
    signed = None
    if key is not None:
        from collafuse_edge.signing import key_id, sign_bundle

        sign_bundle(result.bundle_dir, key)
        signed = key_id(key.public_key())
    summary = {
        "bundle": str(result.bundle_dir), "precision": m["precision"], "exporter": m["model"]["exporter"],
        "opset": m["model"]["opset"], "cut_ratio": m["cut_ratio"], "handoff_level": m["handoff_level"],
        "model_bytes": m["files"][0]["bytes"], "validation_max_abs_diff": m["validation"]["max_abs_diff"],
        "quality_gate": m.get("quality_gate"), "speed": (m.get("speed") or {}).get("summary"),
        "signed_by": signed,
    }
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"wrote {summary['bundle']}: {summary['precision']}, {summary['model_bytes'] / 1e6:.2f} MB, "
              f"{summary['exporter']} opset {summary['opset']}, c={summary['cut_ratio']} "
              f"(handoff level {summary['handoff_level']}); max |onnx − torch| "
              f"{summary['validation_max_abs_diff']:.2g}")
        if summary["quality_gate"]:
            g = summary["quality_gate"]
            print(f"quality gate vs fp32: ε rel-RMS {g['eps_rel_rms']:.3g}, sample mean |Δ| "
                  f"{g['sample_mean_abs']:.3g}, PSNR {float(g['sample_psnr_db']):.1f} dB — passed")
        if summary["speed"]:
            print(f"speed: {summary['speed']}")
        if signed:
            print(f"signed: manifest.json.sig by key {signed} (devices check it with --trust PUBKEY)")
        if m.get("sampler"):
            sm = m["sampler"]
            print(f"distilled student ({sm.get('method')}): {sm['steps']} model call(s) per image at levels "
                  f"{sm['levels']}; collafuse-edge runs exactly these steps")
    return 0


__all__ = ["EXPORTERS", "MIN_OPSET", "add_export_parser", "cmd_export", "export_client"]
