"""Numeric parity of one bundle across machines (``make test-aarch64``: arm64 vs x86).

``parity.py run --bundle DIR --out FILE.npz`` evaluates the bundle's denoiser once on fixed
inputs and finishes a full client chain (DDPM, every client level) from fixed handoff samples;
``parity.py compare A.npz B.npz --tol 1e-5`` prints the largest absolute differences and exits 1
when one exceeds the tolerance. Only numpy and collafuse_edge are needed (no torch).
"""
from __future__ import annotations

import argparse
import platform
import sys

import numpy as np


def run(bundle: str, out: str) -> None:
    from collafuse_edge import EdgeRuntime, Handoff, SamplerConfig, SessionConfig
    from collafuse_edge.files import atomic_write_bytes
    from collafuse_edge.noise import initial_noise

    import io

    rt = EdgeRuntime.open(bundle, SessionConfig(intra_op_threads=1, graph_cache="off"))
    b = rt.bundle
    n = 4
    x = initial_noise(11, (n, *b.image_shape))
    labels = rt.labels_for(n, None)
    t = np.full(n, b.handoff_level, dtype=np.int64)
    eps = rt.denoiser(x, t, labels)
    images = rt.finish(Handoff(x, b.handoff_level, seed=5), labels, sampler=SamplerConfig("ddpm"))
    buf = io.BytesIO()
    np.savez(buf, eps=eps, images=images, machine=np.array(platform.machine()))
    atomic_write_bytes(out, buf.getvalue())
    print(f"{platform.machine()}: wrote {out} (eps {list(eps.shape)}, images {list(images.shape)})")


def compare(a: str, b: str, tol: float) -> int:
    with np.load(a) as za, np.load(b) as zb:
        worst = 0.0
        for key in ("eps", "images"):
            d = float(np.max(np.abs(za[key].astype(np.float64) - zb[key].astype(np.float64))))
            worst = max(worst, d)
            print(f"{key:7s} max |{za['machine']} - {zb['machine']}| = {d:.3e}")
    ok = worst <= tol
    print(f"parity {'OK' if ok else 'FAILED'}: worst {worst:.3e} {'<=' if ok else '>'} {tol:g}")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--bundle", required=True)
    r.add_argument("--out", required=True)
    c = sub.add_parser("compare")
    c.add_argument("a")
    c.add_argument("b")
    c.add_argument("--tol", type=float, default=1e-5)
    args = ap.parse_args(argv)
    if args.cmd == "run":
        run(args.bundle, args.out)
        return 0
    return compare(args.a, args.b, args.tol)


if __name__ == "__main__":
    sys.exit(main())
