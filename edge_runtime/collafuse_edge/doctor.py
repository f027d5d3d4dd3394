"""``collafuse-edge doctor``: what this device can run, in one report to read or paste into a bug.

It reports the Python and package versions, numpy's ABI generation (1.x or 2.x: Jetson's
onnxruntime-gpu wheels are built against numpy 1.x), the onnxruntime build and its providers —
and whether each provider can really start (the CUDA/cuDNN/TensorRT libraries it loads are
found; with ``--bundle``, a session is started on each) — the cache folders (optimised graphs,
TensorRT engines), the trust configuration for signed bundles, and the machine (CPU, cores,
memory, a Jetson's model and L4T release).

Nothing here raises for a missing piece: every check becomes a line with ``ok`` or what is wrong
and what to do. Only the standard library, numpy and (when present) onnxruntime are imported.
"""
from __future__ import annotations

import ctypes
import os
import platform
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from .graph_cache import cache_base, trt_engine_files

# The shared libraries each GPU provider loads (Linux names; the major version is what matters).
GPU_LIBRARIES = {
    "CUDAExecutionProvider": ("libcudart.so", "libcublas.so", "libcublasLt.so", "libcufft.so", "libcurand.so",
                              "libcudnn.so"),
    "TensorrtExecutionProvider": ("libnvinfer.so", "libnvinfer_plugin.so", "libnvonnxparser.so"),
}
_MAJORS = {"libcudnn.so": ("9",), "libnvinfer.so": ("10",), "libnvinfer_plugin.so": ("10",),
           "libnvonnxparser.so": ("10",)}


def _dist_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _read(path: str, limit: int = 4096) -> str | None:
    try:
        with open(path, "rb") as f:
            return f.read(limit).decode("utf-8", "replace").replace("\x00", "").strip()
    except OSError:
        return None


def machine() -> dict:
    """CPU, cores, memory and, on a Jetson, its model and L4T (JetPack's Linux) release."""
    cpu = ""
    text = _read("/proc/cpuinfo", 1 << 16) or ""
    for line in text.splitlines():
        if line.lower().startswith(("model name", "hardware", "cpu part")):
            cpu = line.split(":", 1)[-1].strip()
            break
    mem_gib = None
    meminfo = _read("/proc/meminfo") or ""
    for line in meminfo.splitlines():
        if line.startswith("MemTotal:"):
            mem_gib = round(int(line.split()[1]) / 2**20, 1)
    out = {
        "arch": platform.machine(),
        "system": f"{platform.system()} {platform.release()}",
        "cpu": cpu or platform.processor() or "unknown",
        "cores": os.cpu_count(),
        "memory_gib": mem_gib,
        "device_model": _read("/proc/device-tree/model"),  # e.g. "NVIDIA Jetson AGX Orin Developer Kit"
        "l4t_release": None,
    }
    rel = _read("/etc/nv_tegra_release")
    if rel:
        out["l4t_release"] = rel.splitlines()[0].lstrip("# ").strip()
    return out


def numpy_report() -> dict:
    import numpy as np

    major = int(np.__version__.split(".")[0])
    return {"version": np.__version__, "abi": f"{major}.x",
            "note": ("numpy 2.x: an onnxruntime wheel built against numpy 1.x (Jetson wheels are) fails to import; "
                     "then pip install 'numpy<2'") if major >= 2 else "numpy 1.x: what Jetson onnxruntime-gpu wheels need"}


def _find_library(name: str) -> str | None:
    """The first loadable ``name`` (any major listed for it, then unversioned), or None."""
    majors = _MAJORS.get(name, ("13", "12", "11"))
    for candidate in [f"{name}.{m}" for m in majors] + [name]:
        try:
            ctypes.CDLL(candidate)
            return candidate
        except OSError:
            continue
    return None


def onnxruntime_report(bundle: str | None = None, trt_cache: str | None = None) -> dict:
    """onnxruntime's build, providers and whether each can start; never raises."""
    out: dict[str, Any] = {"distributions": {d: _dist_version(d) for d in ("onnxruntime", "onnxruntime-gpu")},
                           "ok": False}
    try:
        import onnxruntime as ort
    except Exception as e:  # ImportError, or numpy's "compiled using NumPy 1.x" failure
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        hint = ("install one: pip install 'collafuse-edge[cpu]', or on a Jetson NVIDIA's onnxruntime-gpu wheel "
                "for your JetPack")
        if "numpy" in text.lower():
            hint = "this onnxruntime was built against another numpy generation: pip install 'numpy<2' (Jetson wheels)"
        out["error"] = f"cannot import onnxruntime ({text[:200]}); {hint}"
        return out
    out["ok"] = True
    out["version"] = getattr(ort, "__version__", "?")
    try:
        from onnxruntime.capi import build_and_package_info as info

        out["cuda_version"] = getattr(info, "cuda_version", None)
    except Exception:
        out["cuda_version"] = None
    available = list(ort.get_available_providers())
    out["available_providers"] = available
    providers: dict[str, dict] = {}
    gpu = [p for p in available if p in GPU_LIBRARIES]
    if gpu:
        from .providers import preload_gpu_libraries

        preload_gpu_libraries(ort)
    for p in available:
        entry: dict[str, Any] = {}
        libs = GPU_LIBRARIES.get(p)
        if libs:
            found = {lib: _find_library(lib) for lib in libs}
            missing = [lib for lib, hit in found.items() if hit is None]
            entry["libraries"] = found
            entry["libraries_ok"] = not missing
            if missing:
                entry["note"] = (f"not found: {', '.join(missing)}; on a Jetson they come with JetPack, elsewhere "
                                 f"pip install 'onnxruntime-gpu[cuda,cudnn]' (TensorRT: the tensorrt 10 libraries)")
        providers[p] = entry
    if bundle is not None:
        from .providers import PROVIDER_NAMES

        for p in available:
            if p in PROVIDER_NAMES.values():  # the ones collafuse-edge runs on (not e.g. Azure's)
                providers[p]["session"] = _try_session(bundle, p, trt_cache)
    out["providers"] = providers
    return out


def _try_session(bundle: str, provider: str, trt_cache: str | None) -> str:
    """'ok (… s)' or why a session on ``provider`` alone does not start for the bundle's model."""
    import time

    from .errors import CollafuseError
    from .runtime import EdgeRuntime
    from .session import SessionConfig

    t0 = time.perf_counter()
    try:
        rt = EdgeRuntime.open(bundle, SessionConfig(providers=(provider,), trt_cache_dir=trt_cache, graph_cache="off"),
                              trust=[])
        got = rt.denoiser.providers[0]
    except CollafuseError as e:
        return f"failed: {str(e)[:300]}"
    except Exception as e:  # onnxruntime's own error types
        return f"failed: {type(e).__name__}: {str(e)[:300]}"
    if got != provider:
        return f"failed: onnxruntime fell back to {got}"
    return f"ok ({time.perf_counter() - t0:.2f} s to start)"


def caches(bundle_path: str | None = None, trt_cache: str | None = None) -> dict:
    base = cache_base()
    graphs = base / "ort-optimized"
    out: dict[str, Any] = {
        "base": str(base),
        "base_writable": _writable(base),
        "optimized_graphs": {"dir": str(graphs), "entries": len(list(graphs.glob("*.onnx"))) if graphs.is_dir() else 0},
        "tensorrt": {"dir": str(base / "tensorrt"),
                     "models": len([p for p in (base / "tensorrt").iterdir() if p.is_dir()])
                     if (base / "tensorrt").is_dir() else 0},
    }
    if bundle_path is not None or trt_cache is not None:
        folder = Path(trt_cache) if trt_cache else None
        if folder is None:
            try:
                from .bundle import load_bundle
                from .graph_cache import default_trt_cache_dir

                folder = default_trt_cache_dir(load_bundle(bundle_path, verify_hashes=False))
            except Exception:
                folder = None
        if folder is not None:
            out["tensorrt"]["this_bundle"] = {"dir": str(folder), "engines": len(trt_engine_files(folder))}
    return out


def _writable(folder: Path) -> bool:
    p = folder
    while not p.exists() and p != p.parent:
        p = p.parent
    return os.access(p, os.W_OK)


def trust_report() -> dict:
    from .signing import ENV_TRUST

    return {"env": os.environ.get(ENV_TRUST) or None, "cryptography": _dist_version("cryptography")}


def bundle_report(path: str) -> dict:
    from .errors import CollafuseError
    from .signing import signature_summary

    try:
        from .bundle import load_bundle

        b = load_bundle(path)
    except CollafuseError as e:
        return {"path": path, "ok": False, "error": str(e)}
    return {"path": path, "ok": True, "precision": b.precision, "client_levels": b.client_levels,
            "image_shape": list(b.image_shape), "signature": signature_summary(path)}


def report(bundle: str | None = None, trt_cache: str | None = None) -> dict:
    """Everything ``collafuse-edge doctor`` prints, as JSON-ready data."""
    from . import __version__

    out = {
        "collafuse_edge": __version__,
        "python": {"version": platform.python_version(), "implementation": platform.python_implementation(),
                   "executable": sys.executable},
        "machine": machine(),
        "numpy": numpy_report(),
        "onnxruntime": onnxruntime_report(bundle, trt_cache),
        "packages": {d: _dist_version(d) for d in ("aiohttp", "pillow", "cryptography")},
        "caches": caches(bundle, trt_cache),
        "trust": trust_report(),
    }
    if bundle is not None:
        out["bundle"] = bundle_report(bundle)
    out["torch_imported"] = "torch" in sys.modules  # must stay False: the edge never imports torch
    return out


def format_report(r: dict) -> str:
    m, ort = r["machine"], r["onnxruntime"]
    lines = [
        f"collafuse-edge {r['collafuse_edge']}   Python {r['python']['version']} ({r['python']['executable']})",
        f"machine        {m['arch']}, {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, {m['system']}",
    ]
    if m.get("device_model") or m.get("l4t_release"):
        lines.append(f"device         {m.get('device_model') or '?'}; L4T {m.get('l4t_release') or '?'}")
    lines.append(f"numpy          {r['numpy']['version']} (ABI {r['numpy']['abi']}): {r['numpy']['note']}")
    pk = r["packages"]
    lines.append("packages       " + ", ".join(f"{k} {v or 'not installed'}" for k, v in pk.items()))
    if not ort["ok"]:
        lines.append(f"onnxruntime    NOT USABLE: {ort['error']}")
    else:
        dist = ", ".join(f"{k} {v}" for k, v in ort["distributions"].items() if v) or "a build not installed by pip"
        lines.append(f"onnxruntime    {ort['version']} ({dist}; CUDA {ort.get('cuda_version') or 'none'})")
        for p, e in ort["providers"].items():
            state = []
            if "libraries_ok" in e:
                state.append("libraries found" if e["libraries_ok"] else e["note"])
            if "session" in e:
                state.append(f"session {e['session']}")
            lines.append(f"  {p:<27}{'; '.join(state) or 'available'}")
    c = r["caches"]
    lines.append(f"caches         {c['base']} ({'writable' if c['base_writable'] else 'NOT writable: caches off'}): "
                 f"{c['optimized_graphs']['entries']} optimised graphs, TensorRT engines for "
                 f"{c['tensorrt']['models']} models")
    if "this_bundle" in c["tensorrt"]:
        t = c["tensorrt"]["this_bundle"]
        lines.append(f"               this bundle's TensorRT engines: {t['engines']} in {t['dir']}"
                     + ("" if t["engines"] else " (first use builds them: run collafuse-edge warmup)"))
    t = r["trust"]
    lines.append(f"trust          $COLLAFUSE_TRUST {t['env'] or 'unset (unsigned bundles accepted)'}; "
                 f"signature checks {'available (cryptography ' + t['cryptography'] + ')' if t['cryptography'] else 'need: pip install collafuse-edge[sign]'}")
    if "bundle" in r:
        b = r["bundle"]
        lines.append(f"bundle         {b['path']}: " + (f"ok, {b['precision']}, {b['client_levels']} client levels, "
                                                        f"{b['signature']}" if b["ok"] else f"NOT OK: {b['error']}"))
    return "\n".join(lines)


__all__ = ["format_report", "machine", "report"]
