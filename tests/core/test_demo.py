"""`collafuse demo --quick`: the whole story end to end.

The default path is the networked lifecycle (init → serve --train + three client-train sites →
each site exports → serving the trained weights → the edge CLI generates through it); the
one-process simulation stays behind ``--in-process``."""
import hashlib
import json
import re

import pytest

from collafuse.cli import main


def test_demo_quick_runs_the_networked_lifecycle(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["path"].startswith("networked")
    assert len(rep["clients"]) == 3
    for c in rep["clients"]:
        assert c["max_abs_diff_http_vs_in_process"] <= 1e-4  # networked == in-process split sampling
        assert (out / c["samples"]).stat().st_size > 0
    # every step was a real command, and the served weights are what the server trained from the uploads
    cmds = "\n".join(rep["commands"])
    for word in ("collafuse serve", "--train", "collafuse client-train", "collafuse export --run",
                 "collafuse-edge generate"):
        assert word in cmds
    assert rep["served_model_version"].startswith("server-run@")
    assert rep["train"]["server_steps"] > 0
    assert "COLLAFUSE_TOKEN=… " in cmds
    hashes = set(re.findall(r'sha256 = "([0-9a-f]{64})"', (out / "server.toml").read_text()))
    assert len(hashes) == 3 and not any(hashlib.sha256(w.encode()).hexdigest() in hashes for w in cmds.split())
    for f in ("samples.png", "losses.png", "logs/serve-train.log", "logs/serve.log", "server-run/server_training"):
        assert (out / f).exists()


@pytest.mark.slow
def test_demo_quick_in_process(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--in-process", "--out", str(out)]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert len(rep["clients"]) == 3
    for c in rep["clients"]:
        assert c["max_abs_diff_http_vs_in_process"] <= 1e-4
    for f in ("samples.png", "losses.png", "server.log"):
        assert (out / f).exists()
