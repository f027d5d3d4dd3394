"""What ``collafuse export`` records for the device: the client's own classes (the edge's default
labels), no absolute path of the exporting machine, and a detached signature with --sign-key."""
from __future__ import annotations

import argparse

import pytest
from tiny_runs import tiny_run_config

from collafuse.export.cli import add_export_parser
from collafuse_edge import EdgeRuntime

pytest.importorskip("cryptography")

from collafuse_edge.signing import SIGNATURE_NAME, load_verified_bundle, write_key_pair  # noqa: E402


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from collafuse.train import train

    path = tmp_path_factory.mktemp("prov") / "myrun"
    train(tiny_run_config(steps=1), str(path), progress=False)
    return path


def _export(argv):
    parser = argparse.ArgumentParser(prog="collafuse")
    add_export_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["export", *argv])
    return args.func(args)


def test_signed_export_records_classes_and_no_absolute_paths(run, tmp_path, capsys):
    from collafuse.checkpoint import load_run
    from collafuse.data import load_dataset, partition

    priv, pub = write_key_pair(tmp_path / "exporter")
    out = tmp_path / "bundle"
    assert _export(["--run", str(run), "--client", "2", "--out", str(out), "--exporter", "legacy", "--no-speed",
                    "--sign-key", str(priv)]) == 0
    assert "signed: manifest.json.sig by key" in capsys.readouterr().out
    bundle, kid = load_verified_bundle(out, [pub])
    assert kid is not None and (out / SIGNATURE_NAME).is_file()
    text = (out / "manifest.json").read_text()
    assert str(tmp_path) not in text and str(run.parent) not in text  # nothing of the exporter's disk
    assert bundle.manifest["source"]["run"] == "myrun"
    cfg = load_run(str(run)).config
    classes = list(partition(load_dataset(cfg.data.source, cfg.data.image_size), cfg.data)[2].classes)
    assert bundle.manifest["client_classes"] == classes and len(classes) < 10  # by-label: a share of the classes
    labels = EdgeRuntime.open(out, trust=[pub]).labels_for(2 * len(classes)).tolist()
    assert labels == classes * 2


def test_a_bad_signing_key_is_refused_before_exporting(run, tmp_path, capsys):
    (tmp_path / "k.key").write_text("not a key")
    out = tmp_path / "bundle"
    assert _export(["--run", str(run), "--client", "0", "--out", str(out), "--sign-key", str(tmp_path / "k.key")]) == 2
    assert "not a PEM private key" in capsys.readouterr().err and not out.exists()
