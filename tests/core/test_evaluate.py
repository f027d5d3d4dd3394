"""Evaluation of a run: quality, disclosure, reconstruction attack and cost (docs/architecture.md), on tiny runs."""
import json
import math
import os

import numpy as np
import pytest
import torch

from collafuse.cli import main
from collafuse.cost import LatencyProbe, image_cost
from collafuse.data import load_digits, partition
from collafuse.errors import ConfigError
from collafuse.evaluate import (EvalConfig, demo_report, evaluate_run, format_rows, jsonable, split_steps,
                                summary_rows)
from collafuse.metrics import train_feature_classifier
from collafuse.models import count_flops
from collafuse.train import train

from tiny_runs import tiny_run_config


@pytest.fixture(autouse=True)
def _one_thread():
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


@pytest.fixture(scope="module")
def feature_file(tmp_path_factory):
    d = load_digits(16)
    net = train_feature_classifier(d.images, d.labels, 10, epochs=1, progress=False)
    stem = str(tmp_path_factory.mktemp("feat") / "net")
    net.save(stem)
    return stem


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("run") / "run")
    train(tiny_run_config(steps=3, cut_ratios=(0.0, 0.6, 1.0)), d, progress=False)
    return d


def _ec(feature_file, **kw):
    base = dict(num_images=12, sample_steps=10, num_disclosed=16, latency="torch", latency_runs=1, kd_subsets=5,
                feature_net=feature_file)
    base.update(kw)
    return EvalConfig(**base)


@pytest.fixture(scope="module")
def report(run_dir, feature_file, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("eval"))
    torch.set_num_threads(1)
    return evaluate_run(run_dir, _ec(feature_file), out_dir=out), out


def test_split_steps_follows_the_cut_and_keeps_both_sides_alive():
    T = 1000
    assert split_steps(50, 600, T) == (20, 30)
    assert split_steps(50, 200, T) == (40, 10)
    assert split_steps(None, 600, T) == (None, None)
    s, c = split_steps(50, 1, T)  # one client level still gets its evaluation
    assert c == 1 and s == 49
    s, c = split_steps(50, 999, T)
    assert s == 1 and c == 49


def test_eval_config_names_the_bad_field():
    with pytest.raises(ConfigError, match="num_images"):
        EvalConfig(num_images=1)
    with pytest.raises(ConfigError, match="latency"):
        EvalConfig(latency="gpu")
    with pytest.raises(ConfigError, match="bundle"):
        EvalConfig(bundle="b/", latency="torch")
    with pytest.raises(ConfigError, match="sampler"):
        EvalConfig(sampler="euler")
    with pytest.raises(ConfigError, match="sample_steps"):
        EvalConfig(sample_steps=0)


def test_local_only_client_discloses_nothing(report):
    rep, _ = report
    local = rep.clients[2]
    assert local.cut_ratio == 1.0 and local.handoff_level == rep_T(rep) - 1
    for name in ("disclosure_training", "disclosure_inference", "attack_training_chain", "attack_training_tweedie",
                 "attack_inference_chain"):
        assert getattr(local, name) is None
    assert local.cost.server_flops_per_image == 0 and local.cost.handoff_bytes_per_image == 0
    assert local.cost.server_train_flops_per_example == 0


def rep_T(rep):
    return 50  # tiny_run_config's schedule


def test_c0_discloses_everything_and_the_attack_is_exact(report):
    rep, _ = report
    full = rep.clients[0]
    assert full.handoff_level == -1
    assert full.disclosure_training.paired_mse == 0.0
    assert math.isinf(full.attack_training_tweedie.psnr_paired)
    assert full.attack_training_tweedie.nn_match_rate == 1.0
    # at inference the server produced the final image itself
    assert math.isinf(full.attack_inference_chain.psnr_paired)
    assert full.cost.client_flops_per_image == 0 and full.cost.client_train_flops_per_example == 0


def test_training_disclosure_is_what_disclose_sends(report, run_dir):
    """MSE(x_h, x0) must match its closed form E = (1-√ᾱ_h)²·E[x0²] + (1-ᾱ_h) for the client's images."""
    rep, _ = report
    from collafuse.checkpoint import read_config

    cfg = read_config(run_dir)
    sched = cfg.schedule.build()
    mid = rep.clients[1]
    h = mid.handoff_level
    assert h == round(0.6 * 50) - 1
    ab = float(sched.alpha_bar(np.array([h]))[0])
    truth = partition(load_digits(16), cfg.data)[1]
    # the evaluated subset is random; E[x0²] over the client's training set is close enough for 16 images
    expected = (1 - math.sqrt(ab)) ** 2 * float(np.mean(truth.train_images ** 2)) + (1 - ab)
    assert mid.disclosure_training.paired_mse == pytest.approx(expected, rel=0.15)
    # what the server sees is further from the images than the images are from themselves, but
    # less far than pure noise
    assert mid.disclosure_training.nn_mse < mid.noise_floor.nn_mse


def test_cost_counts_calls_and_flops(report, run_dir):
    rep, _ = report
    from collafuse.checkpoint import load_run

    run = load_run(run_dir)
    fc, fs = count_flops(run.clients[0]), count_flops(run.server)
    mid = rep.clients[1].cost
    assert mid.client_calls + mid.server_calls == 10
    assert (mid.server_calls, mid.client_calls) == split_steps(10, 30, 50)
    assert mid.client_flops_per_image == fc * mid.client_calls
    assert mid.server_flops_per_image == fs * mid.server_calls
    assert mid.local_flops_per_image == fc * 10
    assert mid.handoff_bytes_per_image == 16 * 16 * 4 + 8  # float32 sample + int64 label
    assert mid.client_train_flops_per_example > 2 * fc  # forward + backward
    assert mid.latency_backend == "torch" and mid.latency_ms_per_image > 0


def test_report_is_strict_json_and_files_are_written(report):
    rep, out = report
    d = rep.to_dict()
    text = json.dumps(d, allow_nan=False)
    back = json.loads(text)
    assert back["clients"][0]["attack_training_tweedie"]["psnr_paired"] == "inf"
    assert back["kd_sum"] == pytest.approx(sum(c.quality.kd_mean for c in rep.clients))
    assert back["feature_net"]["test_accuracy"] is not None
    for f in ("report.json", "samples_client0.png", "samples_client2.png", "attack_client1.png"):
        assert os.path.isfile(os.path.join(out, f)), f
    assert not os.path.exists(os.path.join(out, "attack_client2.png"))  # c = 1: nothing to attack
    table = format_rows(summary_rows(rep))
    assert "inf" in table and len(table.splitlines()) == 4


def test_jsonable_handles_non_finite_and_numpy():
    assert jsonable({"a": float("inf"), "b": np.float32(1.5), "c": [np.int64(3), float("nan")]}) == \
        {"a": "inf", "b": 1.5, "c": [3, None]}


def test_shared_noise_disclosure_is_inverted_exactly(tmp_path, feature_file):
    d = str(tmp_path / "shared")
    with pytest.warns(UserWarning, match="shared-noise"):
        train(tiny_run_config(steps=1, objective="shared-noise", cut_ratios=(0.6, 0.6, 0.6)), d, progress=False)
    rep = evaluate_run(d, _ec(feature_file, num_images=4, num_disclosed=8, latency="none"))
    for c in rep.clients:
        assert c.attack_training_tweedie.psnr_paired > 60  # float32 round-off only
        assert c.cost.latency_ms_per_image is None


def test_cli_evaluate(run_dir, feature_file, tmp_path, capsys):
    out = str(tmp_path / "ev")
    rc = main(["evaluate", "--run", run_dir, "--out", out, "-n", "8", "--sample-steps", "6", "--disclosed", "8",
               "--latency", "none", "--kd-subsets", "3", "--feature-net", feature_file, "--no-attack"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "summed KD" in printed and "classifier feature space" in printed
    rep = json.load(open(os.path.join(out, "report.json")))
    assert rep["clients"][1]["attack_training_chain"] is None  # --no-attack
    assert main(["evaluate", "--run", str(tmp_path / "missing")]) == 2
    assert main(["evaluate", "--run", run_dir, "--latency", "gpu"]) == 2
    assert "latency must be one of" in capsys.readouterr().err


def test_demo_report_is_short_and_json_ready(run_dir, feature_file):
    ec = _ec(feature_file, num_images=8, num_disclosed=8, kd_subsets=3)
    r = demo_report(run_dir, ec)
    json.dumps(r, allow_nan=False)
    assert len(r["clients"]) == 3 and r["clients"][2]["disclosure_training"] is None
    assert r["clients"][0]["attack_training_psnr_db"] == "inf"
    assert "classifier feature space" in r["metric_space"]


def test_image_cost_at_the_ends(run_dir):
    from collafuse.checkpoint import load_run

    run = load_run(run_dir)
    local = image_cost(run.clients[0], run.server, run.schedule, 50, 1, 10, share_labels=True)
    assert local.server_calls == 0 and local.client_calls == 10 and local.latency_backend == "none"
    full = image_cost(run.clients[0], run.server, run.schedule, 0, 10, 1, share_labels=False)
    assert full.client_calls == 0 and full.handoff_bytes_per_image == 16 * 16 * 4


def test_latency_probe_rejects_bad_backend(run_dir):
    from collafuse.checkpoint import load_run

    run = load_run(run_dir)
    with pytest.raises(ConfigError, match="latency backend"):
        LatencyProbe(run.clients[0], run.schedule, "tpu")
    probe = LatencyProbe(run.clients[0], run.schedule, "torch", runs=1)
    assert probe.ms_per_image(0, 5) == 0.0  # no client levels, no client time


EDGE_BUNDLE = os.path.join(os.path.dirname(__file__), "..", "edge", "fixtures", "tiny_cond")  # 1×8×8, 10 classes


def test_edge_latency_runs_an_exported_bundle_and_refuses_a_foreign_one(run_dir):
    from collafuse.checkpoint import load_run
    from collafuse.config import ScheduleConfig, replace, tiny_preset
    from collafuse.models import build_unet

    model = build_unet(replace(tiny_preset(8), num_classes=10)).eval()
    probe = LatencyProbe(model, ScheduleConfig(100).build(), "edge", bundle=EDGE_BUNDLE, runs=1)
    assert probe.backend == "edge" and "onnxruntime" in probe.note
    assert probe.ms_per_image(20, 4) > 0
    run = load_run(run_dir)  # 16×16 models: the 8×8 bundle is not theirs
    with pytest.raises(ConfigError, match="not an export of this run's client model"):
        LatencyProbe(run.clients[0], run.schedule, "edge", bundle=EDGE_BUNDLE)
    with pytest.raises(ConfigError, match="collafuse export"):
        LatencyProbe(run.clients[0], run.schedule, "edge")


@pytest.mark.slow
def test_cut_ratio_sweep_quick_mode(tmp_path):
    """The CI-sized sweep runs end to end (≈ 1.5 min on one core) and writes JSON, tables and plots."""
    import subprocess
    import sys

    root = os.path.join(os.path.dirname(__file__), "..", "..")
    out = tmp_path / "sweep"
    subprocess.run([sys.executable, os.path.join(root, "benchmarks", "cut_ratio_sweep.py"), "--quick", "--out", str(out),
                    "--split-local", "0.6"], check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    res = json.load(open(out / "sweep.json"))
    kinds = {r.get("kind") for r in res["runs"]}
    assert kinds == {"sweep", "centralised", "split-local"} and len(res["runs"]) == 12
    for png in ("quality_vs_c", "disclosure_vs_c", "compute_vs_c", "samples_vs_c", "attack_examples"):
        assert (out / "plots" / f"{png}.png").stat().st_size > 1000
    assert "KD sum" in (out / "tables.md").read_text()
