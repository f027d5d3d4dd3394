"""Client cost accounting (collafuse.client_cost) and the FedAvg-vs-CollaFuse benchmark's smoke mode."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from collafuse.client_cost import (client_cost, collafuse_client_cost, fedavg_client_cost, ratios,
                                   saved_activation_bytes, training_peak_bytes)
from collafuse.config import ScheduleConfig, tiny_preset
from collafuse.cost import FLOPS
from collafuse.errors import ConfigError
from collafuse.evaluate import split_steps
from collafuse.fedavg import average_state
from collafuse.models import build_unet
from collafuse_edge.protocol import encode_tensor

SCHED = ScheduleConfig(1000).build()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_unet(tiny_preset(num_classes=10)).eval()


def test_fedavg_client_pays_weights_both_ways_once_per_round(model, ):
    params = sum(p.numel() for p in model.parameters())
    c = fedavg_client_cost(model, SCHED, batch=32, steps=205, local_steps=10, sample_steps=50)
    assert c.arm == "fedavg" and c.client_levels == 1000 and c.params == params
    assert c.wire_up_bytes_per_step == c.wire_down_bytes_per_step == pytest.approx(4 * params * 21 / 205)
    assert c.wire_bytes_per_image == 0
    assert c.gen_calls_per_image == 50 and c.gen_flops_per_image == 50 * FLOPS.forward(model)
    assert c.train_flops_per_step == 32 * FLOPS.train(model) and c.train_flops_total == 205 * c.train_flops_per_step
    prox = fedavg_client_cost(model, SCHED, batch=32, steps=205, local_steps=10, sample_steps=50, mu=0.1)
    assert prox.train_peak_bytes - c.train_peak_bytes == 4 * params  # FedProx keeps the global weights


def test_collafuse_client_uploads_x_h_and_labels_and_runs_its_share(model):
    k = 600
    c = collafuse_client_cost(model, SCHED, k, batch=32, steps=200, sample_steps=50, share_labels=True)
    x_h = len(encode_tensor(np.zeros((32, 1, 16, 16), np.float32)))
    assert x_h == 32 * 1024 + 128  # float32 rows + the .npy header
    assert c.wire_up_bytes_per_step == x_h + len(",".join(["7"] * 32)) and c.wire_down_bytes_per_step == 0
    assert c.wire_down_bytes_per_image == 1024 + 128
    assert c.wire_up_bytes_per_image == len(b'{"n": 1, "labels": [7]}')
    _, calls = split_steps(50, k, 1000)
    assert c.gen_calls_per_image == calls == 30
    no_labels = collafuse_client_cost(model, SCHED, k, batch=32, steps=200, sample_steps=50, share_labels=False)
    assert no_labels.wire_up_bytes_per_step == x_h
    local = client_cost("local", model, SCHED, batch=32, steps=200, sample_steps=50)
    assert local.arm == "local" and local.wire_bytes_per_step == 0 and local.wire_bytes_per_image == 0
    fed = fedavg_client_cost(model, SCHED, batch=32, steps=200, local_steps=10, sample_steps=50)
    r = ratios(fed, c)
    assert r["gen_flops_per_image"] == pytest.approx(50 / 30) and r["train_flops_per_step"] == 1.0
    assert r["train_wall_s_per_step"] is None  # not measured here
    with pytest.raises(ConfigError, match="arm"):
        client_cost("gossip", model, SCHED)


def test_training_memory_is_counted(model):
    a2, a8 = saved_activation_bytes(model, 2), saved_activation_bytes(model, 8)
    assert a2 > 0 and a8 == pytest.approx(4 * a2, rel=0.05)  # activations scale with the batch
    params = sum(p.numel() for p in model.parameters())
    assert training_peak_bytes(model, 8) == 16 * params + a8
    assert all(p.grad is None for p in model.parameters())  # the caller's model is left as it was
    assert not model.training
    with pytest.raises(ConfigError, match="batch"):
        saved_activation_bytes(model, 0)


def test_fedavg_average_agrees_with_the_ensemble_average():
    """The study's vmapped ensemble averages a group of members; it must agree with FedAvg's average."""
    ensemble = pytest.importorskip("collafuse.ensemble")
    torch.manual_seed(1)
    models = [build_unet(tiny_preset(num_classes=10)) for _ in range(3)]
    w = [0.2, 0.3, 0.5]
    want = average_state([m.state_dict() for m in models], w)
    ens = ensemble.Ensemble(models)
    ens.average_([0, 1, 2], w)
    got = ens.member_state(1, ema=False)
    for k, v in got.items():
        torch.testing.assert_close(v, want[k], rtol=0, atol=1e-7)


def test_benchmark_quick_mode(tmp_path):
    """The FedAvg-vs-CollaFuse benchmark runs end to end in its smoke mode and writes table, JSON and plot."""
    root = os.path.join(os.path.dirname(__file__), "..", "..")
    out = tmp_path / "fq"
    subprocess.run([sys.executable, os.path.join(root, "benchmarks", "fedavg_vs_collafuse.py"), "--quick",
                    "--out", str(out)], check=True, cwd=root, timeout=600,
                   env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True)
    res = json.loads((out / "fedavg_vs_collafuse.json").read_text())
    arms = res["summary"]["scarce-iid"]["arms"]
    assert set(arms) == {"fedavg", "collafuse", "local", "centralised"} and all(a["n"] == 2 for a in arms.values())
    assert "fedavg_minus_collafuse" in res["summary"]["scarce-iid"]
    assert res["client_cost"]["fedavg"]["wire_bytes_per_step"] > 0 and res["client_cost"]["local"]["wire_bytes_per_step"] == 0
    assert (out / "fedavg_quality_vs_cost.png").stat().st_size > 1000
    assert "FedAvg − CollaFuse" in (out / "table.md").read_text()
    bad = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "fedavg_vs_collafuse.py"), "--regimes",
                          "plenty-iid", "--out", str(out)], cwd=root, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "SIZE-PARTITION" in bad.stderr
