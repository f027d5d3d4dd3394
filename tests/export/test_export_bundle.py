"""export_bundle end to end: the legacy fallback, int8 from a trained run through the CLI,
and refusals. (tests/export/test_export_parity.py covers the dynamo path and parity.)"""
from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
from export_fixtures import FIXTURE_BY_NAME, fixture_model
from tiny_runs import tiny_run_config

from collafuse.export import onnx_export
from collafuse.export.cli import EXPORTERS, MIN_OPSET, add_export_parser, export_client
from collafuse.export.errors import ExportError
from collafuse.export.exporter import ExportConfig, export_bundle
from collafuse.export.variants import GateThresholds
from collafuse_edge import EdgeRuntime, load_bundle

FIXTURE = FIXTURE_BY_NAME["tiny_local"]


def test_cli_constants_mirror_the_exporter():
    assert EXPORTERS == onnx_export.EXPORTERS and MIN_OPSET == onnx_export.MIN_OPSET


def test_dynamo_failure_falls_back_to_legacy_and_says_so(tmp_path, monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("simulated dynamo failure")

    monkeypatch.setattr(onnx_export, "_export_dynamo", broken)
    r = export_bundle(fixture_model(FIXTURE), FIXTURE.schedule, 1.0, tmp_path / "b",
                      config=ExportConfig(measure_speed=False))
    model = r.manifest["model"]
    assert model["exporter_kind"] == "legacy" and model["exporter"] == "torch.onnx (legacy)"
    assert "simulated dynamo failure" in model["exporter_fallback_reason"]
    assert r.validation["passed"]
    out = EdgeRuntime.open(r.bundle_dir).generate_local(2, seed=0)
    assert out.shape == (2, 3, 8, 8)
    with pytest.raises(ExportError, match="dynamo ONNX exporter failed"):  # no fallback when asked for dynamo
        export_bundle(fixture_model(FIXTURE), FIXTURE.schedule, 1.0, tmp_path / "c",
                      config=ExportConfig(exporter="dynamo"))
    assert not (tmp_path / "c").exists()  # a failed export leaves nothing behind
    assert [p.name for p in tmp_path.iterdir()] == ["b"]


def test_cli_exports_int8_from_a_trained_run(tmp_path, capsys):
    from collafuse.train import train

    run = tmp_path / "run"
    train(tiny_run_config(steps=2), str(run), progress=False)
    parser = argparse.ArgumentParser(prog="collafuse")
    add_export_parser(parser.add_subparsers(dest="command"))
    out = tmp_path / "client1"
    args = parser.parse_args(["export", "--run", str(run), "--client", "1", "--out", str(out),
                              "--precision", "fp32", "--exporter", "legacy"])
    assert args.func(args) == 0
    assert "max |onnx − torch|" in capsys.readouterr().out
    b = load_bundle(out)
    assert (b.cut_ratio, b.client_levels, b.schedule.T) == (0.4, 20, 50)  # client 1 of the tiny run
    assert b.manifest["source"]["client"] == 1 and b.num_classes == 10
    # int8 through the library path, calibrated on client 1's own images (a 2-step model: loose gate)
    r = export_client(str(run), 1, str(tmp_path / "int8"),
                      ExportConfig(precision="int8", exporter="legacy", gate=GateThresholds(1.0, 0.5),
                                   calibration_inputs=64, gate_inputs=32, gate_images=4))
    m = r.manifest
    assert m["precision"] == "int8" and m["variant"]["op_types"] == ["Conv"]
    assert m["variant"]["calibration_levels"] == [0, 19]
    assert m["quality_gate"]["data"] == "client images" and m["quality_gate"]["passed"]
    assert isinstance(m["speed"]["faster_than_fp32"], bool) and "fp32" in m["speed"]["summary"]
    assert EdgeRuntime.open(r.bundle_dir).finish  # loads in the edge runtime
    json.dumps(m)


def test_cli_refusals(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="collafuse")
    add_export_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["export", "--run", str(tmp_path / "none"), "--client", "0", "--out", str(tmp_path / "o")])
    assert args.func(args) == 2  # bad input: the run directory does not exist
    assert "collafuse export: error:" in capsys.readouterr().err


def test_cli_a_failed_export_exits_1(tmp_path, capsys, monkeypatch):
    import collafuse.export.cli as export_cli
    from collafuse.export.errors import ValidationError

    def fail(*a, **k):
        raise ValidationError("max |onnx - torch| 0.5 exceeds atol")

    monkeypatch.setattr(export_cli, "export_client", fail)
    parser = argparse.ArgumentParser(prog="collafuse")
    add_export_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["export", "--run", str(tmp_path), "--client", "0", "--out", str(tmp_path / "o")])
    assert args.func(args) == 1
    assert capsys.readouterr().err == "collafuse export: error: max |onnx - torch| 0.5 exceeds atol\n"


def test_export_refusals(tmp_path):
    m, s = fixture_model(FIXTURE), FIXTURE.schedule
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.txt").write_text("mine")
    with pytest.raises(ExportError, match="already holds files"):
        export_bundle(m, s, 1.0, tmp_path / "full")
    with pytest.raises(ExportError, match="not a bundle"):
        export_bundle(m, s, 1.0, tmp_path / "full", overwrite=True)
    assert (tmp_path / "full" / "x.txt").read_text() == "mine"
    with pytest.raises(ExportError, match="int8 export needs calibration images"):
        export_bundle(m, s, 1.0, tmp_path / "q", config=ExportConfig(precision="int8"))
    with pytest.raises(ExportError, match="calibration images must be"):
        export_bundle(m, s, 1.0, tmp_path / "q", calibration_images=np.zeros((4, 1, 8, 8)))
    with pytest.raises(ExportError, match="gives the client no levels"):
        export_bundle(m, s, 0.001, tmp_path / "q")
    with pytest.raises(ExportError, match="precision must be one of"):
        ExportConfig(precision="int4")
    with pytest.raises(ExportError, match="opset must be an integer ≥ 18"):
        onnx_export.export_onnx(m, tmp_path / "o" / "m.onnx", opset=13)
