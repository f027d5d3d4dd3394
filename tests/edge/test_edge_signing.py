"""Signed bundles: a detached Ed25519 signature over manifest.json (collafuse_edge.signing), the
``--trust`` flag of the device CLI and ``$COLLAFUSE_TRUST``. Needs the ``sign`` extra (cryptography)."""
from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest

pytest.importorskip("cryptography")

from collafuse_edge.bundle import load_bundle  # noqa: E402
from collafuse_edge.cli import main  # noqa: E402
from collafuse_edge.errors import BundleError, InputError  # noqa: E402
from collafuse_edge.signing import (SIGNATURE_NAME, load_verified_bundle, read_signature, sign_bundle,  # noqa: E402
                                    write_key_pair)


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    a = write_key_pair(d / "exporter")
    b = write_key_pair(d / "other")
    return {"priv": a[0], "pub": a[1], "other_priv": b[0], "other_pub": b[1], "dir": d}


@pytest.fixture
def signed(cond_bundle, keys):
    sign_bundle(cond_bundle, keys["priv"])
    return cond_bundle


def test_key_pair_files(keys):
    assert oct(os.stat(keys["priv"]).st_mode & 0o777) == "0o600"
    assert keys["pub"].read_text().startswith("-----BEGIN PUBLIC KEY-----")
    with pytest.raises(InputError, match="already exists"):
        write_key_pair(keys["dir"] / "exporter")


def test_signed_bundle_verifies_and_names_its_key(signed, keys):
    bundle, kid = load_verified_bundle(signed, [keys["pub"]])
    sig = read_signature(signed)
    assert kid == sig["key_id"] and len(kid) == 16 and bundle.client_levels == 20
    # a trust file may hold several keys: the other key first, ours second
    both = keys["dir"] / "both.pem"
    both.write_bytes(keys["other_pub"].read_bytes() + keys["pub"].read_bytes())
    assert load_verified_bundle(signed, [both])[1] == kid


def test_unsigned_bundle_is_refused_only_when_trust_is_configured(cond_bundle, keys):
    assert load_verified_bundle(cond_bundle, [])[1] is None  # no trust: works as before
    with pytest.raises(BundleError, match="is not signed"):
        load_verified_bundle(cond_bundle, [keys["pub"]])


def test_signature_by_an_untrusted_key_is_refused(signed, keys):
    with pytest.raises(BundleError, match="not trusted here"):
        load_verified_bundle(signed, [keys["other_pub"]])


def test_editing_model_and_manifest_together_is_caught(signed, keys, rehash):
    """The attack plain hashes miss: replace the model and fix the manifest's sha256 to match."""
    model = signed / "denoiser.onnx"
    model.write_bytes(model.read_bytes()[:-8] + b"\0" * 8)
    rehash(signed)
    load_bundle(signed)  # hashes alone now pass (the manifest was rewritten)
    with pytest.raises(BundleError, match="changed after it was signed"):
        load_verified_bundle(signed, [keys["pub"]])


def test_a_forged_signature_for_an_edited_manifest_is_refused(signed, keys):
    """Editing the manifest and its recorded sha256 in the signature file still fails the signature."""
    path = signed / "manifest.json"
    doc = json.loads(path.read_text())
    doc["cut_ratio"] = doc["cut_ratio"]  # same content, other bytes
    path.write_text(json.dumps(doc))
    import hashlib

    sig_path = signed / SIGNATURE_NAME
    sig = json.loads(sig_path.read_text())
    sig["manifest_sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    sig_path.write_text(json.dumps(sig))
    with pytest.raises(BundleError, match="not valid"):
        load_verified_bundle(signed, [keys["pub"]])


@pytest.mark.parametrize("content,match", [
    (b"not json", "not valid JSON"),
    (b'{"format": "x"}', "malformed"),
    (json.dumps({"format": "collafuse-edge-signature", "format_version": 1, "algorithm": "rsa"}).encode(), "rsa"),
    (json.dumps({"format": "collafuse-edge-signature", "format_version": 1, "algorithm": "ed25519", "key_id": "a",
                 "manifest_sha256": "b", "signature": "***"}).encode(), "not base64"),
])
def test_malformed_signature_files(signed, keys, content, match):
    (signed / SIGNATURE_NAME).write_bytes(content)
    with pytest.raises(BundleError, match=match):
        load_verified_bundle(signed, [keys["pub"]])


def test_bad_trust_files_say_what_to_give(tmp_path, cond_bundle, keys):
    with pytest.raises(InputError, match="give the .pub file"):
        load_verified_bundle(cond_bundle, [keys["priv"]])
    junk = tmp_path / "junk.pem"
    junk.write_text("hello")
    with pytest.raises(InputError, match="holds no"):
        load_verified_bundle(cond_bundle, [junk])
    with pytest.raises(InputError, match="is not a file"):
        load_verified_bundle(cond_bundle, [tmp_path / "missing.pub"])


def test_signing_refuses_a_damaged_bundle_and_a_bad_key(cond_bundle, keys, tmp_path):
    (tmp_path / "k.key").write_text("nope")
    with pytest.raises(InputError, match="not a PEM private key"):
        sign_bundle(cond_bundle, tmp_path / "k.key")
    (cond_bundle / "denoiser.onnx").write_bytes(b"x")
    with pytest.raises(BundleError):
        sign_bundle(cond_bundle, keys["priv"])
    assert not (cond_bundle / SIGNATURE_NAME).exists()


def test_cli_trust_flag_and_environment(signed, cond_bundle, keys, tmp_path, capsys, monkeypatch):
    assert main(["info", "--bundle", str(signed), "--trust", str(keys["pub"])]) == 0
    assert "verified: signed by trusted key" in capsys.readouterr().out
    assert main(["info", "--bundle", str(signed)]) == 0
    assert "(not checked: no --trust)" in capsys.readouterr().out
    out = tmp_path / "x.npy"
    np.save(tmp_path / "h.npy", np.zeros((1, 1, 8, 8), np.float32))
    args = ["generate", "--bundle", str(signed), "--from", str(tmp_path / "h.npy"), "--out", str(out), "-q"]
    assert main(args + ["--trust", str(keys["other_pub"])]) == 2
    assert "not trusted here" in capsys.readouterr().err and not out.exists()
    assert main(args + ["--trust", str(keys["pub"])]) == 0
    assert "signed by" in capsys.readouterr().out
    monkeypatch.setenv("COLLAFUSE_TRUST", str(keys["other_pub"]))
    assert main(args) == 2  # the environment's trust applies without a flag
    capsys.readouterr()
    assert main(["keygen", "--out", str(tmp_path / "k" / "dev")]) == 0
    assert (tmp_path / "k" / "dev.key").exists() and "key id" in capsys.readouterr().out


def test_missing_cryptography_is_a_clear_dependency_error(cond_bundle, keys, monkeypatch, capsys):
    for name in [m for m in sys.modules if m.startswith("cryptography")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "cryptography", None)
    rc = main(["info", "--bundle", str(cond_bundle), "--trust", str(keys["pub"])])
    err = capsys.readouterr().err
    assert rc == 1 and "collafuse-edge[sign]" in err
    assert main(["info", "--bundle", str(cond_bundle)]) == 0  # no trust: no cryptography needed
