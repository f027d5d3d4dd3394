"""Edge footprint: installed size, import time, peak RSS and time to the first finished image of
the torch-free edge runtime against the torch stack doing the same work (SPEC §7, issue 3).

"The same work" is the client's part of one image: finish one handoff sample (B = 1, client
preset, c = 0.2 of T = 1000 → 200 DDPM levels) from a ``.npy`` file and write the image. Each
measurement is a fresh process, timed from spawn to exit by this script; peak RSS is the
child's own ``ru_maxrss``. Medians over ``--repeats`` runs.

    python benchmarks/edge_footprint.py                          # writes runs/bench-edge/edge_footprint.json
    python benchmarks/edge_footprint.py --edge-venv .venv-edge   # also size a real edge-only venv

Bars (issue 3): edge peak RSS ≤ 80 MB; process start → first finished image ≤ 0.3 s at B = 1.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from importlib import metadata
from pathlib import Path

import numpy as np


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/bench-edge/edge_footprint.json")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2, help="intra-op threads of both stacks")
    p.add_argument("--edge-venv", help="a venv holding only collafuse-edge[cpu,png]: its size is reported too")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# installed size


def _closure(roots: list[tuple[str, set[str]]]) -> dict[str, int]:
    """Installed bytes of each distribution in the dependency closure of ``roots`` (name, extras)."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    seen: dict[str, int] = {}
    todo = list(roots)
    while todo:
        name, extras = todo.pop()
        key = canonicalize_name(name)
        if key in seen:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        size = 0
        for f in dist.files or []:
            p = Path(dist.locate_file(f))
            if p.is_file():
                size += p.stat().st_size
        seen[key] = size
        for req in dist.requires or []:
            r = Requirement(req)
            envs = [{"extra": e} for e in extras] or [{"extra": ""}]
            if r.marker is None or any(r.marker.evaluate(env) for env in envs):
                todo.append((r.name, set(r.extras)))
    return seen


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def installed_sizes(edge_venv: str | None) -> dict:
    edge = _closure([("collafuse-edge", {"cpu", "png"})])
    torch_stack = _closure([("torch", set()), ("diffusers", set()), ("safetensors", set())])
    out = {
        "edge_closure_mb": sum(edge.values()) / 1e6,
        "edge_packages": {k: round(v / 1e6, 1) for k, v in sorted(edge.items(), key=lambda kv: -kv[1])},
        "torch_closure_mb": sum(torch_stack.values()) / 1e6,
        "torch_packages": {k: round(v / 1e6, 1) for k, v in sorted(torch_stack.items(), key=lambda kv: -kv[1])[:8]},
    }
    if edge_venv:
        site = next(Path(edge_venv).glob("lib/python*/site-packages"))
        out["edge_venv_site_packages_mb"] = _du(site) / 1e6
    return out


# ---------------------------------------------------------------------------------------------
# processes


# Measures one child from a small, fresh launcher process: a child forked from this (large,
# torch-holding) process would inherit its peak RSS, since Linux carries ru_maxrss across exec.
LAUNCHER = textwrap.dedent("""
    import json, os, sys, time
    out = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    fa = [(os.POSIX_SPAWN_DUP2, out, 1)]
    env = dict(os.environ, SPAWN_T=repr(time.time()))  # lets a child time its phases from spawn
    t0 = time.perf_counter()
    pid = os.posix_spawn(sys.argv[2], sys.argv[2:], env, file_actions=fa)
    _, status, usage = os.wait4(pid, 0)
    wall = time.perf_counter() - t0
    print(json.dumps({"wall_s": wall, "rss_mb": usage.ru_maxrss / 1024, "code": os.waitstatus_to_exitcode(status)}))
""")


def run_child(argv: list[str], env: dict | None = None) -> dict:
    """Wall seconds from spawn to exit and the child's peak RSS (MB), measured by a launcher."""
    with tempfile.NamedTemporaryFile("r", suffix=".out") as out:
        r = subprocess.run([sys.executable, "-c", LAUNCHER, out.name, *argv], capture_output=True, text=True,
                           env=env, check=False)
        if r.returncode != 0:
            raise RuntimeError(f"launcher failed: {r.stderr[-2000:]}")
        res = json.loads(r.stdout)
        res["stdout"] = Path(out.name).read_text()
    if res["code"] != 0:
        raise RuntimeError(f"{argv[:3]} exited with {res['code']}: {res['stdout'][-2000:]}")
    return res


def median_of(fn, repeats: int) -> dict:
    runs = [fn() for _ in range(repeats)]
    return {"wall_s": float(np.median([r["wall_s"] for r in runs])),
            "rss_mb": float(np.median([r["rss_mb"] for r in runs])),
            "wall_s_all": [round(r["wall_s"], 3) for r in runs], "last_stdout": runs[-1]["stdout"][-500:]}


TORCH_FINISH = textwrap.dedent("""
    import sys, json
    import numpy as np
    import torch
    from safetensors.torch import load_file
    from collafuse.config import ModelConfig
    from collafuse.models import build_unet
    from collafuse.sampling import run_levels
    from collafuse_edge.schedule import Schedule, client_timetable
    weights, cfg, handoff, out, k, threads = sys.argv[1:7]
    torch.set_num_threads(int(threads))
    c = json.load(open(cfg))
    unet = build_unet(ModelConfig(**c)).eval()
    unet.load_state_dict(load_file(weights))
    sched = Schedule.create(1000)
    x = torch.from_numpy(np.load(handoff))
    labels = np.zeros(x.shape[0], dtype=np.int64) if c.get("num_classes") else None
    y = run_levels(unet, sched, x, client_timetable(int(k)), labels, seed=0)
    np.save(out, y.numpy())
""")

EDGE_BREAKDOWN = textwrap.dedent("""
    import os, sys, time
    t_start = float(os.environ["SPAWN_T"])
    marks = {}
    import numpy as np
    from collafuse_edge import EdgeRuntime, Handoff, SessionConfig, load_bundle
    import onnxruntime
    marks["imports"] = time.time()
    b = load_bundle(sys.argv[1])
    marks["bundle verified"] = time.time()
    rt = EdgeRuntime(b, session=SessionConfig(intra_op_threads=int(sys.argv[3])))
    marks["session ready"] = time.time()
    x = np.load(sys.argv[2])
    y = rt.finish(Handoff(x, b.handoff_level, seed=0))
    marks["client loop done"] = time.time()
    np.save(sys.argv[4], y)
    marks["image written"] = time.time()
    print(" ".join(f"{k.replace(' ', '_')}={v - t_start:.3f}" for k, v in marks.items()))
""")


def main(argv=None) -> int:
    args = parse_args(argv)
    py = sys.executable
    edge_cli = str(Path(py).parent / "collafuse-edge")
    work = Path(tempfile.mkdtemp(prefix="edge-footprint-"))
    load_before = os.getloadavg()

    # the model (client preset, seeded) as a bundle for the edge and as safetensors for torch
    import torch
    from safetensors.torch import save_file

    from collafuse.config import client_preset
    from collafuse.models import build_unet

    torch.manual_seed(0)
    cfg = client_preset(num_classes=10)
    unet = build_unet(cfg).eval()
    save_file({k: v.contiguous() for k, v in unet.state_dict().items()}, str(work / "client.safetensors"))
    (work / "config.json").write_text(json.dumps({**cfg.__dict__, "block_out_channels": list(cfg.block_out_channels),
                                                  "blocks": list(cfg.blocks)}))
    from collafuse.export.exporter import ExportConfig, export_bundle
    from collafuse_edge.schedule import Schedule

    bundle = str(work / "bundle")
    export_bundle(unet, Schedule.create(1000), 0.2, bundle, config=ExportConfig(measure_speed=False))
    from collafuse_edge import load_bundle

    k = load_bundle(bundle).client_levels
    np.save(work / "handoff.npy", np.random.default_rng(0).standard_normal((1, 1, 16, 16)).astype(np.float32))
    del unet, torch  # the children do the work

    threads = str(args.threads)
    # a private cache home: the first edge start optimises the graph and saves it, later ones load it
    env = {**os.environ, "OMP_NUM_THREADS": threads, "XDG_CACHE_HOME": str(work / "cache-home")}
    r = {}
    r["python_startup"] = median_of(lambda: run_child([py, "-c", "pass"], env), args.repeats)
    r["edge_import"] = median_of(lambda: run_child(
        [py, "-c", "import numpy, onnxruntime, collafuse_edge.runtime, collafuse_edge.cli"], env), args.repeats)
    r["torch_import"] = median_of(lambda: run_child(
        [py, "-c", "import torch, diffusers; from diffusers import UNet2DModel"], env), args.repeats)
    r["edge_first_image_no_graph_cache"] = median_of(lambda: run_child(
        [edge_cli, "generate", "--bundle", bundle, "--from", str(work / "handoff.npy"), "--out",
         str(work / "edge.npy"), "--threads", threads, "--graph-cache", "off"], env), args.repeats)
    r["edge_first_image"] = median_of(lambda: run_child(  # the first of these fills the graph cache
        [edge_cli, "generate", "--bundle", bundle, "--from", str(work / "handoff.npy"), "--out",
         str(work / "edge.npy"), "--threads", threads], env), args.repeats)
    r["torch_first_image"] = median_of(lambda: run_child(
        [py, "-c", TORCH_FINISH, str(work / "client.safetensors"), str(work / "config.json"),
         str(work / "handoff.npy"), str(work / "torch.npy"), str(k), threads], env), args.repeats)

    def breakdown():
        return run_child([py, "-c", EDGE_BREAKDOWN, bundle, str(work / "handoff.npy"), threads,
                          str(work / "edge2.npy")], env)

    r["edge_breakdown"] = median_of(breakdown, args.repeats)
    same = float(np.max(np.abs(np.load(work / "edge.npy") - np.load(work / "torch.npy"))))
    sizes = installed_sizes(args.edge_venv)

    from collafuse_edge.bench import format_table, machine_description

    machine = machine_description()
    rows = [
        {"what": "installed size (MB)", "edge": sizes["edge_closure_mb"], "torch stack": sizes["torch_closure_mb"]},
        {"what": "import time (s, minus bare python)",
         "edge": r["edge_import"]["wall_s"] - r["python_startup"]["wall_s"],
         "torch stack": r["torch_import"]["wall_s"] - r["python_startup"]["wall_s"]},
        {"what": "peak RSS, imports only (MB)", "edge": r["edge_import"]["rss_mb"], "torch stack": r["torch_import"]["rss_mb"]},
        {"what": f"peak RSS, first image (MB)", "edge": r["edge_first_image"]["rss_mb"],
         "torch stack": r["torch_first_image"]["rss_mb"]},
        {"what": f"process start → first image (s), {k} levels B=1",
         "edge": r["edge_first_image"]["wall_s"], "torch stack": r["torch_first_image"]["wall_s"]},
        {"what": "  … edge with --graph-cache off (s)", "edge": r["edge_first_image_no_graph_cache"]["wall_s"],
         "torch stack": float("nan")},
    ]
    print(f"machine: {machine['cpu']}, {machine['cores']} cores; load average {load_before[0]:.1f} at start, "
          f"{os.getloadavg()[0]:.1f} at end; {args.threads} thread(s); medians of {args.repeats} fresh processes")
    print(format_table(rows, ["what", "edge", "torch stack"]))
    print(f"edge breakdown (s after spawn): {r['edge_breakdown']['last_stdout'].strip()}")
    if "edge_venv_site_packages_mb" in sizes:
        print(f"edge-only venv site-packages: {sizes['edge_venv_site_packages_mb']:.0f} MB")
    print(f"edge vs torch image: max |Δ| {same:.2g}")
    rss, ttfi = r["edge_first_image"]["rss_mb"], r["edge_first_image"]["wall_s"]
    bars = [f"edge peak RSS {rss:.0f} MB ({'PASS' if rss <= 80 else 'FAIL'}: bar ≤ 80 MB)",
            f"edge process start → first image {ttfi:.3f} s ({'PASS' if ttfi <= 0.3 else 'FAIL'}: bar ≤ 0.3 s)"]
    for line in bars:
        print("  " + line)
    result = {"benchmark": "edge_footprint", "machine": machine,
              "load_average": {"start": load_before, "end": os.getloadavg()}, "threads": args.threads,
              "client_levels": k, "bundle": bundle, "sizes": sizes, "processes": r, "table": rows,
              "edge_vs_torch_max_abs": same, "bars": bars}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
