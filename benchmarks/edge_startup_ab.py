"""Did a change make the edge CLI start slower? ``collafuse-edge generate`` run from two source
trees of ``collafuse_edge``, side by side.

Each round runs, for every tree in turn, one fresh process (``python -c 'from collafuse_edge.cli
import main; …' generate --bundle B --from handoff.npy``; ``PYTHONPATH`` selects the tree, each
tree has its own bytecode and cache folders, warmed by one unmeasured run). Wall time from spawn
to exit; medians and the after/before ratio. The modules each tree imports on the generate path
are listed too (a deterministic view of the same question).

    git archive REV edge_runtime/collafuse_edge | tar -x -C /tmp/before
    python benchmarks/edge_startup_ab.py --before /tmp/before/edge_runtime --after edge_runtime
"""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CLI = "import sys; from collafuse_edge.cli import main; sys.exit(main(sys.argv[1:]))"
MODULES = """
import sys, numpy as np
before = set(sys.modules)
from collafuse_edge.cli import main
import collafuse_edge.runtime as r
rt = r.EdgeRuntime.open(sys.argv[1])
b = rt.bundle
rt.denoiser(np.zeros((1, *b.image_shape), np.float32), np.full(1, b.handoff_level), rt.labels_for(1))
print("\\n".join(sorted(m for m in set(sys.modules) - before if m.startswith("collafuse"))))
"""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before", required=True, help="the folder holding the old collafuse_edge package")
    p.add_argument("--after", default="edge_runtime", help="the folder holding the new one (default edge_runtime)")
    p.add_argument("--bundle", default="tests/edge/fixtures/tiny_cond")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--out", default="runs/bench-edge/edge_startup_ab.json")
    args = p.parse_args(argv)
    for name in ("before", "after"):
        if not (Path(getattr(args, name)) / "collafuse_edge" / "cli.py").is_file():
            p.error(f"--{name} {getattr(args, name)!r} holds no collafuse_edge/cli.py")
    if args.repeats < 1:
        p.error("--repeats must be a positive integer")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="edge-startup-ab-"))
    np.save(work / "h.npy", np.zeros((1, *_shape(args.bundle)), np.float32))
    trees = {"before": str(Path(args.before).resolve()), "after": str(Path(args.after).resolve())}

    def env(name: str) -> dict:
        return {**os.environ, "PYTHONPATH": trees[name], "XDG_CACHE_HOME": str(work / f"cache-{name}"),
                "PYTHONPYCACHEPREFIX": str(work / f"pyc-{name}"), "OMP_NUM_THREADS": "2"}

    def run(name: str) -> float:
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-c", CLI, "generate", "--bundle", args.bundle, "--from",
                            str(work / "h.npy"), "--out", str(work / f"{name}.npy"), "--threads", "2"],
                           env=env(name), capture_output=True, text=True, check=False)
        if r.returncode != 0:
            raise RuntimeError(f"{name}: generate exited with {r.returncode}: {r.stderr[-1500:]}")
        return time.perf_counter() - t0

    for name in trees:
        run(name)
    runs: dict[str, list[float]] = {name: [] for name in trees}
    load = os.getloadavg()[0]
    for _ in range(args.repeats):
        for name in trees:
            runs[name].append(run(name))
    med = {k: float(np.median(v)) for k, v in runs.items()}
    modules = {name: subprocess.run([sys.executable, "-c", MODULES, args.bundle], env=env(name), capture_output=True,
                                    text=True, check=True).stdout.split() for name in trees}
    from collafuse_edge.bench import format_table, machine_description
    from collafuse_edge.files import atomic_write_json

    machine = machine_description()
    print(f"machine: {machine['cpu']}, {machine['cores']} cores, {platform.machine()}; load {load:.2f} → "
          f"{os.getloadavg()[0]:.2f}; medians of {args.repeats} interleaved rounds")
    print(format_table([{"tree": k, "median_s": round(med[k], 3), "min_s": round(min(runs[k]), 3),
                         "max_s": round(max(runs[k]), 3), "collafuse modules": len(modules[k])} for k in trees],
                       ["tree", "median_s", "min_s", "max_s", "collafuse modules"]))
    added = sorted(set(modules["after"]) - set(modules["before"]))
    removed = sorted(set(modules["before"]) - set(modules["after"]))
    print(f"after/before: {med['after'] / med['before']:.3f}; modules added {added or 'none'}, removed "
          f"{removed or 'none'}")
    atomic_write_json(args.out, {"machine": machine, "median_s": med, "runs_s": runs,
                                 "ratio_after_before": med["after"] / med["before"], "modules_added": added,
                                 "modules_removed": removed})
    print(f"wrote {args.out}")
    return 0


def _shape(bundle: str) -> tuple[int, ...]:
    from collafuse_edge import load_bundle

    return load_bundle(bundle).image_shape


if __name__ == "__main__":
    sys.exit(main())
