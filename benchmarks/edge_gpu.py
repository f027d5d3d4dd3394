"""Edge runtime on a GPU: onnxruntime's CUDA provider against torch on the same GPU, plus the
provider checks a GPU box needs. One run, one script, for a GPU machine.

The model is the client preset (0.65 M params, class-conditional, 16×16×1), seeded random
weights; the client runs c = 0.2 of T = 1000 levels (200 levels, DDPM). Parts:

0. providers: what the automatic choice starts (TensorRT → CUDA → CPU; a provider whose libraries
   are missing must fall through with a note, not print or crash), what ``--provider tensorrt`` /
   ``cuda`` say.
1. parity (fp32): the CUDA provider against the CPU provider per call (B = 1, 16, 256), and the
   full client loop (B = 4, 200 levels) against the edge CPU loop and the torch split sampler's
   client half (``run_levels``, CPU fp32) with the same keyed noise — target ≤ 1e-4 with TF32 off.
   fp16 / int8 bundles and TF32 are reported against fp32.
2. speed: one denoiser call and the full client loop at B = 1, 16, 256 for
   ``edge-cuda-{fp32,fp32-tf32,fp16,int8}`` (EdgeRuntime on the CUDA provider), ``torch`` (eager,
   CUDA), ``diffusers`` (UNet2DModel + DDPMScheduler.step on CUDA), ``torch.compile``
   (mode reduce-overhead: inductor + CUDA graphs), ``edge-cuda-*-graph`` (SessionConfig
   cuda_graph: onnxruntime's CUDA graphs behind the same call), and ``ort-cuda-graph`` (raw onnxruntime with
   ``enable_cuda_graph`` and IO binding, per call only: what a device-resident loop could reach).
   Medians of interleaved rounds.

    python benchmarks/edge_gpu.py --bundles DIR --out runs/bench-edge/edge_gpu.json
    python benchmarks/edge_gpu.py --device cpu --quick      # the script's own smoke run, no GPU
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from edge_latency import (_diffusers_loop, _diffusers_scheduler, _torch_call, _torch_loop,  # noqa: E402
                          interleaved, load_client, make_bundles)

from collafuse.models import count_flops, count_params  # noqa: E402
from collafuse.sampling import run_levels  # noqa: E402
from collafuse_edge import EdgeRuntime, Handoff, SessionConfig  # noqa: E402
from collafuse_edge.bench import format_table, machine_description  # noqa: E402
from collafuse_edge.errors import CollafuseEdgeError  # noqa: E402
from collafuse_edge.noise import initial_noise  # noqa: E402
from collafuse_edge.schedule import client_level_count, client_timetable  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/bench-edge/edge_gpu.json")
    p.add_argument("--bundles", help="reuse (or create) the fp32/fp16/int8 bundles in this folder")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu: smoke-test the script")
    p.add_argument("--batches", default="1,16,256")
    p.add_argument("--compile-batches", default="1,16", help="batches torch.compile is timed at ('' = none)")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--loop-rounds", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="2 rounds, 1 loop round, B = 1, 4, no compile")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.loop_rounds, args.batches, args.compile_batches = 2, 1, "1,4", ""
    args.batches = [int(v) for v in args.batches.split(",")]
    args.compile_batches = [int(v) for v in args.compile_batches.split(",") if v]
    return args


class _Notes(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def provider_checks(bundle: str, gpu: bool) -> dict:
    """What the automatic choice starts, and what asking for each GPU provider by name says."""
    import onnxruntime as ort

    out = {"onnxruntime": ort.__version__, "available": ort.get_available_providers()}
    handler = _Notes()
    logging.getLogger("collafuse_edge").addHandler(handler)
    try:
        for name, providers in (("auto", None), ("tensorrt", ("tensorrt",)), ("cuda", ("cuda",))):
            if providers and not gpu:
                continue
            handler.lines.clear()
            t0 = time.perf_counter()
            try:
                rt = EdgeRuntime.open(bundle, SessionConfig(providers=providers))
                out[name] = {"providers": rt.denoiser.providers, "notes": rt.denoiser.provider_notes,
                             "open_s": time.perf_counter() - t0}
            except CollafuseEdgeError as e:
                out[name] = {"error": f"{type(e).__name__}: {e}", "open_s": time.perf_counter() - t0}
            out[name]["log"] = list(handler.lines)
    finally:
        logging.getLogger("collafuse_edge").removeHandler(handler)
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    gpu = args.device == "cuda"
    dev = torch.device(args.device)
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 references are fp32
        torch.backends.cudnn.allow_tf32 = False
    ep = "cuda" if gpu else "cpu"
    unet, schedule, cut, images, labels, what = load_client(argparse.Namespace(run=None, weights=None, cut=0.2))
    k = client_level_count(cut, schedule.T)
    flops = {b: count_flops(unet, b) for b in args.batches}
    shape = (int(unet.config.in_channels), unet.config.sample_size, unet.config.sample_size)
    nc = unet.config.num_class_embeds
    root = Path(args.bundles) if args.bundles else Path(tempfile.mkdtemp(prefix="edge-gpu-"))
    bundles = make_bundles(unet, schedule, cut, images, labels, root, trained=False)
    result: dict = {"benchmark": "edge_gpu", "machine": machine_description(), "model": what,
                    "params": count_params(unet), "client_levels": k, "T": schedule.T,
                    "versions": {"torch": torch.__version__}}
    if gpu:
        result["gpu"] = torch.cuda.get_device_name(0)
    print(f"model: {what}; {count_params(unet) / 1e6:.2f} M params; client levels {k}; device {result.get('gpu', 'cpu')}")

    # -- 0. providers ----------------------------------------------------------------------
    result["providers"] = provider_checks(bundles["fp32"]["path"], gpu)
    result["versions"]["onnxruntime"] = result["providers"]["onnxruntime"]
    print(json.dumps(result["providers"], indent=1, default=str), flush=True)

    def runtime(prec: str, tf32: bool = False, provider: str = ep, graph: bool = False) -> EdgeRuntime:
        cfg = SessionConfig(providers=(provider,), cuda_tf32=tf32, cuda_graph=graph,
                            intra_op_threads=0 if provider != "cpu" else 4)
        return EdgeRuntime.open(bundles[prec]["path"], cfg, max_batch=max(args.batches))

    rts = {"edge-%s-fp32" % ep: runtime("fp32")}
    if gpu:
        rts["edge-cuda-fp32-tf32"] = runtime("fp32", tf32=True)
        rts["edge-cuda-fp32-graph"] = runtime("fp32", graph=True)
        rts["edge-cuda-fp16-graph"] = runtime("fp16", graph=True)
    rts[f"edge-{ep}-fp16"] = runtime("fp16")
    rts[f"edge-{ep}-int8"] = runtime("int8")
    cpu_ref = {p: runtime(p, provider="cpu") for p in ("fp32", "fp16", "int8")}
    result["sessions"] = {n: rt.denoiser.providers for n, rt in rts.items()}
    unet_d = unet.to(dev)

    # -- 1. parity -------------------------------------------------------------------------
    parity: dict = {"per_call": [], "loop": {}}
    rng = np.random.default_rng(0)
    for b in args.batches:
        x = rng.standard_normal((b, *shape)).astype(np.float32)
        t = rng.integers(0, k, b).astype(np.int64)
        lab = (np.arange(b) % nc).astype(np.int64)
        ref = cpu_ref["fp32"].denoiser(x, t, lab)
        with torch.no_grad():
            tref = unet.to("cpu")(torch.from_numpy(x), torch.from_numpy(t), class_labels=torch.from_numpy(lab)).sample.numpy()
        unet.to(dev)
        row = {"batch": b, "cpu_ep_vs_torch_cpu": float(np.abs(ref - tref).max())}
        for name, rt in rts.items():
            prec = name.split("-")[2]
            for junk in (0.5, -1.0):  # a CUDA graph's regular run, then its capture: the third call replays
                rt.denoiser(x * junk, t[::-1].copy(), lab)
            row[f"{name}_vs_cpu_ep_{prec}"] = float(np.abs(rt.denoiser(x, t, lab) - cpu_ref[prec].denoiser(x, t, lab)).max())
        parity["per_call"].append(row)
    B = 4
    x0 = initial_noise(7, (B, *shape))
    lab = (np.arange(B) % nc).astype(np.int64)
    h = Handoff(x0, k - 1, seed=7)
    cpu_loop = cpu_ref["fp32"].finish(h, lab)
    with torch.no_grad():
        torch_loop = run_levels(unet.to("cpu"), schedule, torch.from_numpy(x0), client_timetable(k), lab,
                                sampler="ddpm", seed=7).numpy()
    unet.to(dev)
    for name, rt in rts.items():
        out = rt.finish(h, lab)
        parity["loop"][name] = {"vs_edge_cpu_fp32": float(np.abs(out - cpu_loop).max()),
                                "vs_torch_cpu_fp32": float(np.abs(out - torch_loop).max())}
    parity["loop"]["edge-cpu-fp32"] = {"vs_torch_cpu_fp32": float(np.abs(cpu_loop - torch_loop).max())}
    fp32 = parity["loop"][f"edge-{ep}-fp32"]["vs_torch_cpu_fp32"]
    parity["target"] = f"edge {ep} fp32 full loop vs torch: {fp32:.2e} ({'PASS' if fp32 <= 1e-4 else 'FAIL'}: target ≤ 1e-4)"
    result["parity"] = parity
    print(format_table(parity["per_call"], list(parity["per_call"][0])))
    print(json.dumps(parity["loop"], indent=1))
    print(parity["target"], flush=True)

    # -- 2. speed --------------------------------------------------------------------------
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    compiled = None
    if args.compile_batches:
        t0 = time.perf_counter()
        compiled = torch.compile(unet_d, mode="reduce-overhead" if gpu else "default", dynamic=False)
        with torch.no_grad():
            for b in args.compile_batches:
                for _ in range(3):  # reduce-overhead records its CUDA graph on a later call
                    z = torch.zeros(b, *shape, device=dev)
                    compiled(z, torch.zeros(b, dtype=torch.long, device=dev),
                             class_labels=torch.zeros(b, dtype=torch.long, device=dev))
        sync()
        result["torch_compile_s"] = time.perf_counter() - t0
        print(f"torch.compile: {result['torch_compile_s']:.0f} s for {args.compile_batches}", flush=True)
    sched = _diffusers_scheduler(schedule)
    call_rows, loop_rows = [], []
    nothing = lambda: None  # noqa: E731
    for b in args.batches:
        x = initial_noise(0, (b, *shape))
        t = np.full(b, k - 1, dtype=np.int64)
        lab = (np.arange(b) % nc).astype(np.int64)
        tx = torch.from_numpy(x).to(dev)
        tt_, tl = torch.full((b,), k - 1, device=dev), torch.from_numpy(lab).to(dev)

        def timed(fn):
            def run():
                fn()
                sync()
            return run

        calls = {n: (nothing, (lambda rt=rt: rt.denoiser(x, t, lab))) for n, rt in rts.items()}
        calls["torch"] = (nothing, timed(lambda: _torch_call(unet_d, tx, tt_, tl)))
        if compiled is not None and b in args.compile_batches:
            calls["torch.compile"] = (nothing, timed(lambda: _torch_call(compiled, tx, tt_, tl).clone()))
        if gpu:
            try:
                fn = cuda_graph_call(bundles["fp32"]["path"], x, t, lab)
                diff = float(np.abs(fn() - cpu_ref["fp32"].denoiser(x, t, lab)).max())
                result.setdefault("ort_cuda_graph_vs_cpu_ep", {})[b] = diff
                calls["ort-cuda-graph"] = (nothing, fn)
            except Exception as e:  # measured where it works; why not, where it does not
                result.setdefault("ort_cuda_graph_error", {})[b] = f"{type(e).__name__}: {str(e)[:400]}"
                print(f"ort-cuda-graph B={b}: {e}", flush=True)
        reps = {n: (5 if b <= 16 else 2) for n in calls}
        times = interleaved(calls, args.rounds, reps)
        for name, secs in times.items():
            ms = float(np.median(secs) * 1e3)
            call_rows.append({"impl": name, "batch": b, "median_ms": ms, "best_ms": float(np.min(secs) * 1e3),
                              "per_image_us": ms / b * 1e3, "gflops": flops[b] / (ms / 1e3) / 1e9})
        hb = Handoff(x, k - 1, seed=0)
        loops = {n: (nothing, (lambda rt=rt: rt.finish(hb, lab))) for n, rt in rts.items()}
        loops["torch"] = (nothing, timed(lambda: _torch_loop(unet_d, schedule, tx, client_timetable(k), lab)))
        loops["diffusers"] = (nothing, timed(lambda: _diffusers_loop(unet_d, sched, tx, k, tl)))
        if compiled is not None and b in args.compile_batches:
            loops["torch.compile"] = (nothing, timed(lambda: _torch_loop(compiled, schedule, tx, client_timetable(k), lab)))
        if b <= 16:
            loops["edge-cpu-fp32"] = (nothing, lambda: cpu_ref["fp32"].finish(hb, lab))
        for setup, fn in loops.values():  # one untimed loop each: shapes, cuDNN algorithm search
            fn()
        times = interleaved(loops, args.loop_rounds, {n: 1 for n in loops}, warm=False)
        for name, secs in times.items():
            ms = float(np.median(secs) * 1e3)
            loop_rows.append({"impl": name, "batch": b, "levels": k, "median_ms": ms, "per_image_ms": ms / b,
                              "per_level_ms": ms / k})
        print(f"B={b} done", flush=True)
    result["calls"], result["loops"] = call_rows, loop_rows
    print("\nper denoiser call")
    print(format_table(call_rows, ["impl", "batch", "median_ms", "best_ms", "per_image_us", "gflops"]))
    print(f"\nper client loop ({k} levels, DDPM)")
    print(format_table(loop_rows, ["impl", "batch", "levels", "median_ms", "per_image_ms", "per_level_ms"]))
    loop = {(r["impl"], r["batch"]): r["median_ms"] for r in loop_rows}
    lines = []
    for b in args.batches:
        e = loop.get((f"edge-{ep}-fp32", b))
        for other in ("torch", "diffusers", "torch.compile"):
            if e and (other, b) in loop:
                lines.append(f"B={b}: edge {ep} fp32 loop {e:.0f} ms vs {other} {loop[(other, b)]:.0f} ms "
                             f"→ {loop[(other, b)] / e:.2f}×")
    result["summary"] = lines
    print("\n" + "\n".join(lines))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2, default=str))
    print(f"\nwrote {args.out}")
    return 0


def cuda_graph_call(bundle_path: str, x: np.ndarray, t: np.ndarray, lab: np.ndarray):
    """A raw onnxruntime CUDA session with ``enable_cuda_graph`` and IO binding at a fixed batch:
    inputs are copied into bound device buffers, the captured graph replays, the output is
    copied back — the per-call floor a device-resident loop could reach."""
    import onnxruntime as ort

    from collafuse_edge import load_bundle

    bundle = load_bundle(bundle_path)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(bundle.model_file), so, enable_fallback=0,
                                providers=[("CUDAExecutionProvider", {"enable_cuda_graph": "1", "use_tf32": "0"})])
    feeds = {"sample": x, "timestep": t, "class_labels": lab}
    dev = {n: ort.OrtValue.ortvalue_from_numpy(v, "cuda", 0) for n, v in feeds.items()}
    out = ort.OrtValue.ortvalue_from_shape_and_type(list(x.shape), np.float32, "cuda", 0)
    io = sess.io_binding()
    for n, v in dev.items():
        io.bind_ortvalue_input(n, v)
    io.bind_ortvalue_output("eps", out)
    sess.run_with_iobinding(io)  # capture

    def call():
        for n, v in feeds.items():
            dev[n].update_inplace(v)
        sess.run_with_iobinding(io)
        return out.numpy()

    got = call()
    if not np.all(np.isfinite(got)):
        raise RuntimeError("CUDA-graph output is not finite")
    return call


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception:
        traceback.print_exc()
        sys.exit(1)
