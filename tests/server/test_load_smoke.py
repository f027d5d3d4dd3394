"""benchmarks/load_test.py cannot rot: a few seconds of it against the session's tiny run.

``--mode handoff`` keeps it under 30 s on a loaded 2-core box (the ONNX export of ``--mode generate``
alone takes 8-15 s there); generate_over_http itself is covered by test_e2e_process.py."""
from __future__ import annotations

import importlib.util
import json
import os

import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "load_test.py")


@pytest.fixture(scope="module")
def load_test():
    spec = importlib.util.spec_from_file_location("load_test", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_load_test_smoke(load_test, run_dir, tmp_path):
    out = str(tmp_path / "load")
    rc = load_test.main(["--quick", "--run", run_dir, "--mode", "handoff", "--duration", "3", "--warmup", "0.5",
                         "--clients", "3", "--bad-clients", "1", "--bad-interval", "0.05", "--sample-interval", "0.5",
                         "--leak-threshold", "1e9",  # 3 s cannot judge a leak; the real run uses minutes
                         "--out", out])
    with open(os.path.join(out, "load_test.json")) as f:
        res = json.load(f)
    s = res["summary"]
    # the misbehaving client (bad tokens, huge bodies, abandoned and cut-short requests) must not
    # provoke a single 5xx or ERROR line (docs/reliability.md, "Load test")
    assert s["server_5xx"] == 0 and s["server_error_lines"] == 0, s
    assert rc == 0
    assert s["handoffs"] > 0 and s["handoffs_per_s"] > 0 and s["p99_ms"] >= s["p50_ms"] > 0
    assert s["errors"] == 0 and res["errors_by_kind"] == {}
    assert s["bad_requests"] > 0 and s["bad_unexpected"] == 0
    assert s["server_exit_code"] == 0 and s["server_ready_after"]
    assert rc == (1 if s["server_5xx"] or s["server_error_lines"] else 0)
    assert len(res["samples"]) >= 3 and all(x["rss_mib"] > 0 for x in res["samples"])
    assert res["leak"]["verdict"] == "window too short to judge"  # 3 s says nothing about leaks
    assert res["machine"]["cores"] and res["machine"]["torch"]
    assert os.path.getsize(os.path.join(out, "load_test.png")) > 1000


def test_leak_fit_flags_linear_growth(load_test):
    import numpy as np

    t = np.arange(0, 121, 1.0)
    flat = load_test.leak_fit(t, 400 + 0.01 * np.sin(t), 60, 120, 1.0, 10.0)
    assert flat["verdict"] == "no leak evident" and abs(flat["slope_mib_per_min"]) < 0.1
    leaky = load_test.leak_fit(t, 400 + 5 * t / 60, 60, 120, 1.0, 10.0)  # 5 MiB/min
    assert leaky["verdict"] == "leak suspected" and leaky["slope_mib_per_min"] == pytest.approx(5, rel=1e-6)
