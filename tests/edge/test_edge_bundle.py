"""Bundle reading: a good bundle loads; every corruption is refused with a message naming it."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from edge_paths import COND, FIXTURES, LOCAL

from collafuse_edge import BundleError, EdgeRuntime, Schedule, load_bundle
from collafuse_edge.bundle import FORMAT_VERSION, build_manifest, file_entry, write_manifest


def test_fixtures_load_and_describe():
    b = load_bundle(COND)
    assert (b.cut_ratio, b.client_levels, b.handoff_level) == (0.2, 20, 19)
    assert b.image_shape == (1, 8, 8) and b.num_classes == 10 and b.conditional
    assert b.schedule.T == 100 and b.precision == "fp32" and not b.local_only
    assert [s.name for s in b.inputs] == ["sample", "timestep", "class_labels"]
    assert b.inputs[0].shape == ("batch", 1, 8, 8)
    d = b.describe()
    assert d["opset"] >= 18 and d["exporter"].startswith("torch.onnx")
    json.dumps(d)  # JSON-ready
    local = load_bundle(LOCAL)
    assert local.local_only and local.num_classes is None and local.image_shape == (3, 8, 8)
    assert [s.name for s in local.inputs] == ["sample", "timestep"]


def test_manifest_records_the_contract():
    doc = json.loads((COND / "manifest.json").read_text())
    for key in ("format_version", "files", "image_shape", "num_classes", "schedule", "cut_ratio",
                "handoff_level", "precision", "producer", "tolerance", "validation"):
        assert key in doc, key
    assert len(doc["schedule"]["betas"]) == doc["schedule"]["num_train_timesteps"]
    assert doc["validation"]["passed"] and doc["validation"]["max_abs_diff"] <= doc["tolerance"]["atol"]
    assert {"torch", "onnx", "onnxruntime", "diffusers"} <= set(doc["producer"])


# --- corruption: each case must be refused with a message that names the problem -------------


def _flip_byte(path: Path, offset: int = 1000) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_bad_hash(cond_bundle):
    _flip_byte(cond_bundle / "denoiser.onnx")
    with pytest.raises(BundleError, match="sha256.*modified or corrupted"):
        load_bundle(cond_bundle)


def test_missing_model_file(cond_bundle):
    (cond_bundle / "denoiser.onnx").unlink()
    with pytest.raises(BundleError, match="denoiser.onnx listed in the manifest is missing"):
        load_bundle(cond_bundle)


def test_missing_manifest(cond_bundle):
    (cond_bundle / "manifest.json").unlink()
    with pytest.raises(BundleError, match="manifest.json is missing"):
        load_bundle(cond_bundle)


def test_not_a_directory(tmp_path):
    with pytest.raises(BundleError, match="no such directory"):
        load_bundle(tmp_path / "nope")


def test_truncated_model(cond_bundle):
    p = cond_bundle / "denoiser.onnx"
    p.write_bytes(p.read_bytes()[:5000])
    with pytest.raises(BundleError, match="truncated or replaced"):
        load_bundle(cond_bundle)


def test_truncated_model_with_matching_manifest_fails_at_load(cond_bundle, rehash):
    # someone re-hashed a truncated file: the manifest checks pass, onnxruntime must refuse it
    p = cond_bundle / "denoiser.onnx"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    rehash(cond_bundle)
    load_bundle(cond_bundle)
    with pytest.raises(BundleError, match="could not load denoiser.onnx"):
        EdgeRuntime.open(cond_bundle)


def test_invalid_json(cond_bundle):
    (cond_bundle / "manifest.json").write_text('{"format": "collafuse-edge-bundle", ')
    with pytest.raises(BundleError, match="not valid JSON"):
        load_bundle(cond_bundle)


def test_manifest_not_an_object(cond_bundle):
    (cond_bundle / "manifest.json").write_text("[1, 2]")
    with pytest.raises(BundleError, match="must hold a JSON object"):
        load_bundle(cond_bundle)


def test_wrong_format_name(edit_manifest):
    b = edit_manifest(lambda d: d.update(format="something-else"))
    with pytest.raises(BundleError, match="not a collafuse bundle"):
        load_bundle(b)


@pytest.mark.parametrize("version,hint", [(FORMAT_VERSION + 1, "upgrade collafuse-edge"), (0, "re-export"),
                                          ("1", "must be an integer")])
def test_wrong_schema_version(edit_manifest, version, hint):
    b = edit_manifest(lambda d: d.update(format_version=version))
    with pytest.raises(BundleError, match=hint):
        load_bundle(b)


def test_schedule_mismatch_handoff_level(edit_manifest):
    b = edit_manifest(lambda d: d.update(handoff_level=29, client_levels=30))
    with pytest.raises(BundleError, match="schedule mismatch.*k=20"):
        load_bundle(b)


def test_schedule_mismatch_T_and_betas(edit_manifest):
    b = edit_manifest(lambda d: d["schedule"].update(num_train_timesteps=1000))
    with pytest.raises(BundleError, match="schedule is invalid.*num_train_timesteps=1000 but has 100 betas"):
        load_bundle(b)


def test_schedule_invalid_betas(edit_manifest):
    b = edit_manifest(lambda d: d["schedule"]["betas"].__setitem__(3, 1.5))
    with pytest.raises(BundleError, match="schedule is invalid.*betas"):
        load_bundle(b)


def test_schedule_mismatch_with_server(cond_bundle):
    b = load_bundle(cond_bundle)
    b.check_compatible(schedule=Schedule.create(100, "linear"), handoff_level=19)
    with pytest.raises(BundleError, match="schedule differs.*handoff level differs"):
        b.check_compatible(schedule=Schedule.create(100, "cosine"), handoff_level=39)
    with pytest.raises(BundleError, match="image shape differs"):
        b.check_compatible(image_shape=(3, 8, 8))


def test_wrong_input_names_in_manifest(edit_manifest):
    b = edit_manifest(lambda d: d["model"]["inputs"][0].update(name="x"))
    with pytest.raises(BundleError, match=r"inputs are \['x', 'timestep', 'class_labels'\]"):
        load_bundle(b)


def test_missing_class_labels_input(edit_manifest):
    b = edit_manifest(lambda d: d["model"]["inputs"].pop())
    with pytest.raises(BundleError, match="needs exactly"):
        load_bundle(b)


def test_static_batch_axis_refused(edit_manifest):
    b = edit_manifest(lambda d: d["model"]["inputs"][0].update(shape=[1, 1, 8, 8]))
    with pytest.raises(BundleError, match="dynamic batch axis"):
        load_bundle(b)


def test_io_shape_disagrees_with_image_shape(edit_manifest):
    b = edit_manifest(lambda d: d.update(image_shape=[1, 16, 16]))
    with pytest.raises(BundleError, match="image_shape"):
        load_bundle(b)


def test_wrong_input_names_in_model_file(cond_bundle, rehash):
    # a valid ONNX file whose interface is not the declared one
    shutil.copyfile(FIXTURES / "wrong_io.onnx", cond_bundle / "denoiser.onnx")
    rehash(cond_bundle)
    load_bundle(cond_bundle)  # the manifest itself is consistent
    with pytest.raises(BundleError, match=r"does not match its manifest: model inputs are \['t', 'x'\]"):
        EdgeRuntime.open(cond_bundle)


def test_unknown_precision(edit_manifest):
    b = edit_manifest(lambda d: d.update(precision="int4"))
    with pytest.raises(BundleError, match="precision 'int4' is unknown"):
        load_bundle(b)


@pytest.mark.parametrize("path", ["../denoiser.onnx", "/etc/passwd", "sub/denoiser.onnx", "manifest.json"])
def test_file_paths_stay_inside_the_bundle(edit_manifest, path):
    b = edit_manifest(lambda d: d["files"][0].update(path=path))
    with pytest.raises(BundleError, match="not a plain file name"):
        load_bundle(b)


def test_model_file_not_listed(edit_manifest):
    b = edit_manifest(lambda d: d["model"].update(file="other.onnx"))
    with pytest.raises(BundleError, match="not listed in files"):
        load_bundle(b)


def test_missing_required_field(edit_manifest):
    b = edit_manifest(lambda d: d.pop("cut_ratio"))
    with pytest.raises(BundleError, match="no 'cut_ratio' field"):
        load_bundle(b)


def test_cut_ratio_out_of_range(edit_manifest):
    b = edit_manifest(lambda d: d.update(cut_ratio=1.5))
    with pytest.raises(BundleError, match="cut_ratio must lie in"):
        load_bundle(b)


def test_hash_check_can_be_skipped_but_size_is_still_checked(cond_bundle):
    _flip_byte(cond_bundle / "denoiser.onnx")
    load_bundle(cond_bundle, verify_hashes=False)


def test_writer_round_trip(tmp_path):
    src = load_bundle(COND)
    out = tmp_path / "copy"
    out.mkdir()
    shutil.copyfile(src.model_file, out / "denoiser.onnx")
    doc = build_manifest(model_file="denoiser.onnx", files=[file_entry(out, "denoiser.onnx")],
                         image_shape=src.image_shape, num_classes=src.num_classes, schedule=src.schedule,
                         cut_ratio=src.cut_ratio, precision="fp32", model_info={"opset": 18})
    write_manifest(out, doc)
    again = load_bundle(out)
    assert again.schedule.same_as(src.schedule) and again.handoff_level == src.handoff_level
    assert np.array_equal(again.schedule.betas, src.schedule.betas)  # betas survive JSON exactly


def test_writer_refuses_an_inconsistent_manifest(tmp_path):
    src = load_bundle(COND)
    out = tmp_path / "copy"
    out.mkdir()
    shutil.copyfile(src.model_file, out / "denoiser.onnx")
    doc = build_manifest(model_file="denoiser.onnx", files=[file_entry(out, "denoiser.onnx")],
                         image_shape=src.image_shape, num_classes=src.num_classes, schedule=src.schedule,
                         cut_ratio=src.cut_ratio, precision="fp32")
    _flip_byte(out / "denoiser.onnx")
    with pytest.raises(BundleError, match="sha256"):
        write_manifest(out, doc)
    assert not (out / "manifest.json").exists()


def test_bundle_hashes_with_the_shared_sha256_file(tmp_path):
    import hashlib

    from collafuse_edge import bundle, files

    assert bundle.sha256_file is files.sha256_file
    p = tmp_path / "f.bin"
    p.write_bytes(b"x" * 3_000_000)
    assert bundle.file_entry(tmp_path, "f.bin").sha256 == hashlib.sha256(b"x" * 3_000_000).hexdigest()
