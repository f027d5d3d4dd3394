"""The GPU benchmark scripts keep working between GPU runs: their CPU smoke modes run here."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")


def _run(args: list[str], timeout: int) -> None:
    subprocess.run([sys.executable, *args], check=True, cwd=ROOT, timeout=timeout,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_train_gpu_smoke(tmp_path):
    out = tmp_path / "train_gpu.json"
    _run(["benchmarks/train_gpu.py", "--device", "cpu", "--preset", "client", "--batch", "8", "--quick",
          "--no-compile", "--precisions", "fp32,fp32-cl", "--out", str(out)], timeout=300)
    res = json.loads(out.read_text())
    variants = {(r["precision"], r["variant"]) for r in res["rows"]}
    assert len(variants) == 10 and all(r["images_per_s"] > 0 for r in res["rows"])


def test_train_gpu_refuses_an_unknown_precision(tmp_path):
    with pytest.raises(subprocess.CalledProcessError):
        _run(["benchmarks/train_gpu.py", "--device", "cpu", "--precisions", "fp8", "--out", str(tmp_path / "x.json")],
             timeout=120)


@pytest.mark.slow
def test_edge_gpu_smoke(tmp_path):
    out = tmp_path / "edge_gpu.json"
    _run(["benchmarks/edge_gpu.py", "--device", "cpu", "--quick", "--bundles", str(tmp_path / "b"), "--out", str(out)],
         timeout=900)
    res = json.loads(out.read_text())
    assert res["parity"]["target"].endswith("(PASS: target ≤ 1e-4)")
    assert {r["impl"] for r in res["loops"]} >= {"edge-cpu-fp32", "torch", "diffusers"}
