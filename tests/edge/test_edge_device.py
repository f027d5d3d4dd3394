"""The device CLI that talks: doctor, warmup, progress/--quiet, --server-sampler, --ca-file,
default labels from the client's own classes, provenance in the PNG and the final line."""
from __future__ import annotations

import io
import json
import logging
import sys

import numpy as np
import pytest
from edge_paths import COND, LOCAL

from collafuse_edge import EdgeRuntime
from collafuse_edge.bundle import load_bundle
from collafuse_edge.cli import build_parser, main
from collafuse_edge.errors import BundleError
from collafuse_edge.progress import Progress


# -- doctor ------------------------------------------------------------------------------------


def test_doctor_text_reports_versions_providers_caches_and_machine(capsys):
    assert main(["doctor", "--bundle", str(COND)]) == 0
    out = capsys.readouterr().out
    for word in ("collafuse-edge 0.1.0", "machine", "numpy", "ABI", "onnxruntime", "CPUExecutionProvider",
                 "session ok", "caches", "trust", "bundle"):
        assert word in out, word


def test_doctor_json_and_a_broken_bundle(cond_bundle, capsys):
    assert main(["doctor", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["numpy"]["abi"] in ("1.x", "2.x") and r["onnxruntime"]["ok"] is True
    assert "CPUExecutionProvider" in r["onnxruntime"]["available_providers"]
    assert r["torch_imported"] is ("torch" in sys.modules) and r["machine"]["cores"] >= 1
    (cond_bundle / "denoiser.onnx").write_bytes(b"broken")
    assert main(["doctor", "--bundle", str(cond_bundle)]) == 1  # the report still prints
    assert "NOT OK" in capsys.readouterr().out


def test_doctor_explains_a_missing_onnxruntime(monkeypatch):
    from collafuse_edge.doctor import onnxruntime_report

    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    r = onnxruntime_report()
    assert r["ok"] is False and "pip install" in r["error"]


# -- warmup ------------------------------------------------------------------------------------


def test_warmup_builds_then_reuses_the_optimised_graph(tmp_path, capsys):
    cache = tmp_path / "graphs"
    args = ["warmup", "--bundle", str(COND), "--batch", "1,4", "--threads", "1", "--graph-cache", str(cache),
            "--json", str(tmp_path / "w.json")]
    assert main(args) == 0
    first = json.loads((tmp_path / "w.json").read_text())
    assert first["graph_cache_hit"] is False and [c["batch"] for c in first["calls"]] == [1, 4]
    assert len(list(cache.glob("*.onnx"))) == 1
    assert main(args) == 0
    second = json.loads((tmp_path / "w.json").read_text())
    assert second["graph_cache_hit"] is True  # the next start (and generate) loads it as is
    out = capsys.readouterr()
    assert "optimised graph loaded from the cache" in out.out
    assert "session started" in out.err  # progress on stderr


def test_warmup_refuses_batches_above_max_batch(capsys):
    assert main(["warmup", "--bundle", str(COND), "--batch", "32", "--max-batch", "16"]) == 2
    assert "above --max-batch" in capsys.readouterr().err


def test_trt_profile_follows_max_batch_so_warmup_and_generate_share_engines(tmp_path):
    """The TensorRT options (unit-tested on a CPU build): engine + timing cache in one folder per
    model, the optimisation profile 1 … --max-batch, the same for warmup and generate."""
    from collafuse_edge.cli import _session_config
    from collafuse_edge.providers import provider_options

    bundle = load_bundle(COND)
    p = build_parser()
    common = ["--bundle", str(COND), "--max-batch", "16", "--trt-cache", str(tmp_path / "trt")]
    w = _session_config(p.parse_args(["warmup", *common]))
    g = _session_config(p.parse_args(["generate", *common, "--local", "-n", "1", "--out", "x.npy"]))
    assert w == g and w.trt_max_batch == 16
    opts = provider_options("TensorrtExecutionProvider", w, bundle)
    assert opts["trt_engine_cache_enable"] and opts["trt_engine_cache_path"] == str(tmp_path / "trt")
    assert opts["trt_timing_cache_path"] == str(tmp_path / "trt")
    assert opts["trt_profile_min_shapes"] == "sample:1x1x8x8,timestep:1,class_labels:1"
    assert opts["trt_profile_max_shapes"] == "sample:16x1x8x8,timestep:16,class_labels:16"


def test_trt_engine_files_are_what_the_first_build_notice_checks(tmp_path):
    from collafuse_edge.graph_cache import trt_engine_files

    assert trt_engine_files(tmp_path / "missing") == []
    (tmp_path / "a.engine").write_bytes(b"x")
    (tmp_path / "a.profile").write_bytes(b"x")
    assert [p.name for p in trt_engine_files(tmp_path)] == ["a.engine"]


# -- progress ----------------------------------------------------------------------------------


def test_progress_lines_on_a_pipe_and_redraws_on_a_terminal():
    buf = io.StringIO()
    p = Progress(stream=buf, log_interval_s=0.0)
    with p.task("client levels", total=3) as t:
        for _ in range(3):
            t.advance()
    lines = buf.getvalue().splitlines()
    assert lines[0].startswith("client levels 0/3") and "3/3" in lines[-2] and "done in" in lines[-1]

    class Tty(io.StringIO):
        def isatty(self):
            return True

    tty = Tty()
    with Progress(stream=tty, tty_interval_s=0.0).task("x", total=2) as t:
        t.advance()
    assert "\r" in tty.getvalue() and tty.getvalue().endswith("\n")
    quiet = io.StringIO()
    with Progress(enabled=False, stream=quiet).ticker("waiting", every_s=0.01):
        pass
    assert quiet.getvalue() == ""


def test_generate_reports_progress_unless_quiet(tmp_path, capsys):
    out = tmp_path / "a.npy"
    assert main(["generate", "--bundle", str(LOCAL), "--local", "-n", "2", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "client levels" in err and "done in" in err
    assert main(["generate", "--bundle", str(LOCAL), "--local", "-n", "2", "--out", str(out), "--quiet"]) == 0
    assert capsys.readouterr().err == ""


# -- labels, provenance ------------------------------------------------------------------------


def test_default_labels_cycle_through_the_clients_own_classes(edit_manifest):
    bundle = edit_manifest(lambda d: d.update(client_classes=[2, 4, 6, 7]))
    rt = EdgeRuntime.open(bundle)
    assert rt.labels_for(6).tolist() == [2, 4, 6, 7, 2, 4]
    assert rt.labels_for(2, 9).tolist() == [9, 9]  # explicit labels still win
    assert EdgeRuntime.open(COND).labels_for(3).tolist() == [0, 1, 2]  # not recorded: 0, 1, 2, …


@pytest.mark.parametrize("bad", [[], [10], [1, 1], ["2"], 3])
def test_malformed_client_classes_are_refused(edit_manifest, bad):
    with pytest.raises(BundleError, match="client_classes"):
        EdgeRuntime.open(edit_manifest(lambda d: d.update(client_classes=bad)))


def test_png_and_final_line_carry_provenance(edit_manifest, tmp_path, capsys):
    pytest.importorskip("PIL")
    from collafuse_edge.generate import bundle_hash
    from collafuse_edge.images import read_png_metadata

    bundle = edit_manifest(lambda d: d.update(client_classes=[3, 5]))
    np.save(tmp_path / "h.npy", np.zeros((3, 1, 8, 8), np.float32))
    out = tmp_path / "img.png"
    assert main(["generate", "--bundle", str(bundle), "--from", str(tmp_path / "h.npy"), "--seed", "11",
                 "--out", str(out), "-q"]) == 0
    line = capsys.readouterr().out
    sha = bundle_hash(load_bundle(bundle))
    assert f"seed 11, labels 3,5,3, bundle sha256 {sha[:16]}" in line and "model from-file" in line
    meta = read_png_metadata(out)
    assert meta["seed"] == "11" and meta["labels"] == "3,5,3" and meta["bundle_sha256"] == sha
    assert meta["model_version"] == "from-file" and meta["client_sampler"] == "ddim 20 steps"


# -- server flags ------------------------------------------------------------------------------


def test_server_sampler_and_steps_reach_the_server(tmp_path, monkeypatch, capsys):
    from fake_collafuse_server import TOKEN, FakeServer, serve_in_thread

    fake = FakeServer.for_cond_bundle()
    out = tmp_path / "img.png"
    with serve_in_thread(fake.app()) as url:
        monkeypatch.setenv("COLLAFUSE_TOKEN", TOKEN)
        # ddim here, ddpm on the server: every server level, no steps sent
        assert main(["generate", "--bundle", str(COND), "--server", url, "-n", "2", "--server-sampler", "ddpm",
                     "--out", str(out)]) == 0
        body = [b for p, b in fake.requests if p == "/v1/handoff"][-1]
        assert "sampler" not in body and "steps" not in body
        cap = capsys.readouterr()
        assert "model fake@1:000000000000" in cap.out
        assert "images: waiting on" in cap.err and "2/2 client steps" not in cap.out  # progress: stderr only
        assert "server: 1/1 handoff batches received; this device: 20/20 client steps: done in" in cap.err
        assert main(["generate", "--bundle", str(COND), "--server", url, "-n", "2", "--server-sampler", "ddim",
                     "--server-steps", "9", "--sampler", "ddpm", "--out", str(out), "-q"]) == 0
        body = [b for p, b in fake.requests if p == "/v1/handoff"][-1]
        assert body["sampler"] == "ddim" and body["steps"] == 9
        assert capsys.readouterr().err == ""
    from collafuse_edge.images import read_png_metadata

    meta = read_png_metadata(out)
    assert meta["model_version"] == "fake@1:000000000000" and meta["server_sampler"] == "ddim 9 steps"


def test_ca_file_is_for_https(tmp_path, capsys):
    pem = tmp_path / "ca.pem"
    pem.write_text("x")
    rc = main(["generate", "--bundle", str(COND), "--server", "http://127.0.0.1:9", "-n", "1", "--ca-file",
               str(pem), "--out", str(tmp_path / "a.npy")])
    assert rc == 2 and "--ca-file verifies an https:// server" in capsys.readouterr().err
    rc = main(["generate", "--bundle", str(COND), "--server", "https://127.0.0.1:9", "-n", "1", "--ca-file",
               str(tmp_path / "missing.pem"), "--token", "t", "--out", str(tmp_path / "a.npy")])
    assert rc == 2 and "is not a file" in capsys.readouterr().err


def _self_signed(tmp_path):
    """A certificate for 127.0.0.1 and its key, as PEM files (cryptography's x509)."""
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    (tmp_path / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
    return tmp_path / "cert.pem", tmp_path / "key.pem"


def test_self_signed_https_server_needs_ca_file_and_the_error_names_the_flag(tmp_path, monkeypatch, capsys):
    pytest.importorskip("cryptography")
    import asyncio
    import ssl
    import threading

    from aiohttp import web
    from fake_collafuse_server import TOKEN, FakeServer

    cert, key = _self_signed(tmp_path)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(FakeServer.for_cond_bundle().app())
    loop.run_until_complete(runner.setup())
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)
    loop.run_until_complete(site.start())
    port = site._server.sockets[0].getsockname()[1]  # noqa: SLF001 — the ephemeral port
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.setenv("COLLAFUSE_TOKEN", TOKEN)
        args = ["generate", "--bundle", str(COND), "--server", f"https://127.0.0.1:{port}", "-n", "1", "-q",
                "--out", str(tmp_path / "a.npy")]
        assert main(args) == 1
        err = capsys.readouterr().err
        assert "not trusted" in err and "--ca-file PEM" in err and "ClientConfig" in err
        assert main(args + ["--ca-file", str(cert)]) == 0, capsys.readouterr().err
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def test_first_trt_build_notice_is_logged(monkeypatch, caplog, tmp_path):
    """With the TensorRT provider chosen and no engine cached, the session says it will take a while."""
    import collafuse_edge.session as session_mod

    monkeypatch.setattr(session_mod, "choose_providers",
                        lambda req, avail: ["TensorrtExecutionProvider", "CPUExecutionProvider"])

    def fake_session(ort, path, so, providers):  # TensorRT is not in this CPU build: start on the CPU
        return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])

    monkeypatch.setattr(session_mod, "_new_session", fake_session)
    with caplog.at_level(logging.WARNING, logger="collafuse_edge"):
        den = session_mod.OnnxDenoiser(load_bundle(COND), session_mod.SessionConfig(trt_cache_dir=str(tmp_path)))
    assert den.trt_first_build is True and den.trt_cache_dir == tmp_path
    assert any("TensorRT builds its engines" in r.getMessage() and "warmup" in r.getMessage() for r in caplog.records)
