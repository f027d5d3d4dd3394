"""The collaboration study's --quick mode runs end to end, and its statistics are right."""
from __future__ import annotations

import json
import math
import os
import sys

import pytest

BENCH = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks")
sys.path.insert(0, BENCH)

import collaboration_study as study  # noqa: E402


def test_quick_study_runs_every_arm(tmp_path):
    out = tmp_path / "study"
    assert study.main(["--quick", "--out", str(out), "--threads", "1"]) == 0
    res = json.loads((out / "study.json").read_text())
    table = res["summary"]["table"]["scarce:dirichlet:0.3"]
    assert set(table) == {"collab-c0.2", "collab-c0.6", "dn-c0.2", "local", "split-local-c0.6", "central", "fedavg"}
    for arm, cell in table.items():
        assert cell["fd"]["n"] == 2 and math.isfinite(cell["fd"]["mean"]) and cell["fd"]["ci95"] is not None, arm
        assert 0.0 <= cell["copy_share"]["mean"] <= 1.0 and cell["nn_l2"]["mean"] > 0
    g = res["groups"][0]
    assert g["train_images"] == [12, 12, 12]  # the scarce regime keeps --scarce images per client
    assert [p["step"] for p in g["curves"]["local"]] == [2, 4]
    c = g["costs"]
    # at equal steps a split-local client trains two models, a collaborative client one, a central client none
    assert c["split-local-c0.6"]["client_train_flops"] == 2 * c["collab-c0.2"]["client_train_flops"] > 0
    assert c["central"]["client_train_flops"] == 0 and c["fedavg"]["client_bytes_per_step"] > c["collab-c0.2"]["client_bytes_per_step"]
    paired = res["summary"]["paired"]["scarce:dirichlet:0.3"]
    assert paired["best_collab"] in ("collab-c0.2", "collab-c0.6") and paired["vs"]["local"]["seeds"] == 2
    for name in ("study_quality.png", "study_curves.png", "study_memorisation.png", "study_samples.png"):
        assert (out / "plots" / name).stat().st_size > 1000
    assert "vs local" in (out / "study_tables.md").read_text()
    # --reuse keeps finished groups
    assert study.main(["--quick", "--out", str(out), "--threads", "1", "--reuse", "--regimes", "scarce:dirichlet:0.3"]) == 0


def test_mean_ci_matches_the_t_interval():
    r = study.mean_ci([1.0, 2.0, 3.0])
    assert r["mean"] == 2.0 and r["n"] == 3
    assert r["ci95"] == pytest.approx(4.302652729911275 * 1.0 / math.sqrt(3))
    assert study.mean_ci([5.0])["ci95"] is None and study.mean_ci([])["mean"] is None


@pytest.mark.parametrize("argv, msg", [
    (["--regimes", "plenty:iid"], "SIZE:PARTITION"),
    (["--regimes", "scarce:dirichlet:-1"], "alpha"),
    (["--cuts", "1.0"], "strictly between"),
    (["--cuts", "x"], "not a number"),
    (["--steps", "0"], "--steps must be"),
    (["--client-model", "huge"], "--client-model must be"),
])
def test_bad_flags_are_refused_clearly(argv, msg, capsys):
    with pytest.raises(SystemExit):
        study.parse_args(argv)
    assert msg in capsys.readouterr().err
