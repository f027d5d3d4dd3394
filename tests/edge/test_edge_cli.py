"""``collafuse-edge info | bench | generate`` on the fixture bundles, in-process via ``main``."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
from edge_paths import COND, LOCAL

from collafuse_edge import EdgeRuntime, Handoff, SamplerConfig
from collafuse_edge.cli import main
from collafuse_edge.noise import initial_noise


def test_info_text(capsys):
    assert main(["info", "--bundle", str(COND)]) == 0
    out = capsys.readouterr().out
    assert "sha256 verified" in out and "c=0.2: client levels 19…0 (20 levels)" in out
    assert "class_labels" in out and "opset 18" in out


def test_info_json(capsys):
    assert main(["info", "--bundle", str(LOCAL), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["local_only"] is True and d["image_shape"] == [3, 8, 8] and d["num_classes"] is None


def test_info_refuses_a_corrupt_bundle(cond_bundle, capsys):
    (cond_bundle / "denoiser.onnx").write_bytes(b"not onnx")
    assert main(["info", "--bundle", str(cond_bundle)]) == 2  # bad input: the bundle
    err = capsys.readouterr().err
    assert err.startswith("collafuse-edge: error: bundle") and "truncated or replaced" in err


def test_generate_from_file_npy(tmp_path, capsys):
    x = initial_noise(3, (4, 1, 8, 8))
    np.save(tmp_path / "h.npy", x)
    out = tmp_path / "img.npy"
    rc = main(["generate", "--bundle", str(COND), "--from", str(tmp_path / "h.npy"), "--out", str(out),
               "--seed", "3", "--labels", "1,2,3,4", "--threads", "1", "--sampler", "ddpm"])
    assert rc == 0, capsys.readouterr().err
    assert "wrote 4 images" in capsys.readouterr().out
    got = np.load(out)
    ref = EdgeRuntime.open(COND).finish(Handoff(x, 19, seed=3), labels=[1, 2, 3, 4])
    assert np.array_equal(got, ref)


def test_generate_from_file_png_and_n(tmp_path):
    np.save(tmp_path / "h.npy", initial_noise(0, (6, 1, 8, 8)))
    out = tmp_path / "grid.png"
    assert main(["generate", "--bundle", str(COND), "--from", str(tmp_path / "h.npy"), "-n", "4",
                 "--out", str(out), "--sampler", "ddim", "--client-steps", "5", "--labels", "7"]) == 0
    from PIL import Image

    with Image.open(out) as im:
        assert im.mode == "L" and im.size == (2 * 9 + 1, 2 * 9 + 1)  # 2×2 grid of 8×8, 1-px padding


def test_generate_local(tmp_path):
    out = tmp_path / "local.png"
    assert main(["generate", "--bundle", str(LOCAL), "--local", "-n", "3", "--out", str(out)]) == 0
    from PIL import Image

    with Image.open(out) as im:
        assert im.mode == "RGB"
    npy = tmp_path / "local.npy"
    assert main(["generate", "--bundle", str(LOCAL), "--local", "-n", "2", "--seed", "4",
                 "--sampler", "ddim", "--client-steps", "5", "--out", str(npy)]) == 0
    ref = EdgeRuntime.open(LOCAL).generate_local(2, seed=4, sampler=SamplerConfig("ddim", 5))
    assert np.array_equal(np.load(npy), ref)


def test_generate_default_sampler_is_ddim_with_the_shared_step_flags(tmp_path):
    npy = tmp_path / "d.npy"
    assert main(["generate", "--bundle", str(LOCAL), "--local", "-n", "2", "--seed", "4", "--out", str(npy)]) == 0
    ref = EdgeRuntime.open(LOCAL).generate_local(2, seed=4, sampler=SamplerConfig("ddim", 20))
    assert np.array_equal(np.load(npy), ref)


def test_steps_is_a_deprecated_alias_of_client_steps(tmp_path, capsys):
    npy = tmp_path / "old.npy"
    assert main(["generate", "--bundle", str(LOCAL), "--local", "-n", "2", "--seed", "4",
                 "--sampler", "ddim", "--steps=5", "--out", str(npy)]) == 0
    assert "--steps is deprecated" in capsys.readouterr().err
    ref = EdgeRuntime.open(LOCAL).generate_local(2, seed=4, sampler=SamplerConfig("ddim", 5))
    assert np.array_equal(np.load(npy), ref)
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    helptext = capsys.readouterr().out
    assert "--client-steps" in helptext and not re.search(r"(?<![\w-])--steps\b", helptext)  # hidden


@pytest.mark.parametrize("args,message", [
    (["--local", "-n", "2"], "need the server"),  # a c = 0.2 bundle cannot run locally
    (["--local"], "--local needs -n"),
    (["--from", "missing.npy"], "does not exist"),
    (["--from", "bad.npy"], "not a readable .npy"),
    (["--from", "wrong.npy"], r"shape \[B, 1, 8, 8\]"),
    (["--from", "h.npy", "-n", "9"], "more images than the 2 rows"),
    (["--from", "h.npy", "--labels", "1,2,3"], "one per image"),
    # the CPU build lacks TensorRT; a GPU build without the TensorRT libraries cannot start it
    (["--from", "h.npy", "--provider", "tensorrt"],
     "not available in this onnxruntime build|TensorrtExecutionProvider could not start"),
])
def test_generate_refusals(tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    np.save("h.npy", np.zeros((2, 1, 8, 8), np.float32))
    np.save("wrong.npy", np.zeros((2, 3, 8, 8), np.float32))
    (tmp_path / "bad.npy").write_bytes(b"nonsense")
    assert main(["generate", "--bundle", str(COND), *args, "--out", "o.npy"]) == 2  # bad input
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert not (tmp_path / "o.npy").exists()


def test_generate_refuses_a_bad_output_suffix_before_working(tmp_path, capsys):
    assert main(["generate", "--bundle", str(LOCAL), "--local", "-n", "1", "--out", str(tmp_path / "x.jpg")]) == 2
    assert "must end in .png or .npy" in capsys.readouterr().err


def test_generate_needs_a_source(capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", "--bundle", str(COND), "--out", "x.npy"])
    assert e.value.code == 2


def test_bench(tmp_path, capsys):
    js = tmp_path / "bench.json"
    assert main(["bench", "--bundle", str(COND), "--batch", "1,4", "--runs", "5", "--loop-runs", "1",
                 "--threads", "1", "--json", str(js)]) == 0
    out = capsys.readouterr().out
    assert "median_ms" in out and "machine:" in out
    rows = json.loads(js.read_text())["rows"]
    assert [(r["what"], r["batch"], r["levels"]) for r in rows] == [("call", 1, 1), ("loop", 1, 20), ("call", 4, 1), ("loop", 4, 20)]
