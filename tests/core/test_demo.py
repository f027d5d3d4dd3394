"""`collafuse demo --quick`: the whole story end to end (train → export → serve → edge over HTTP)."""
import json

from collafuse.cli import main


def test_demo_quick(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert len(rep["clients"]) == 3
    for c in rep["clients"]:
        assert c["max_abs_diff_http_vs_in_process"] <= 1e-4  # networked == in-process split sampling
        assert (out / c["samples"]).stat().st_size > 0
    for f in ("samples.png", "losses.png", "server.log"):
        assert (out / f).exists()
