"""A distilled few-step student end to end: ``collafuse distill`` → ``collafuse export --student`` →
the edge runtime and ``collafuse-edge generate``. The bundle records the sampler ("distilled", its
N levels) in a format-2 manifest; the numpy edge sampler on the exported ONNX model agrees with the
torch sampler to ≤ 1e-4; format-1 bundles still read; a manifest whose timetable was edited is
refused."""
import json
import shutil

import numpy as np
import pytest
import torch

from collafuse.checkpoint import load_run
from collafuse.cli import main
from collafuse.distill import DistillConfig, distill, load_student, student_finish
from collafuse.train import train
from collafuse_edge.bundle import FORMAT_VERSION, load_bundle
from collafuse_edge.cli import main as edge_main
from collafuse_edge.errors import BundleError
from collafuse_edge.noise import initial_noise
from collafuse_edge.runtime import EdgeRuntime, Handoff
from collafuse_edge.sampler import SamplerConfig
from tiny_runs import tiny_run_config


@pytest.fixture(scope="module")
def distilled(tmp_path_factory):
    """A tiny run, a 2-step student of client 0 (the default method) and its bundle (through the CLI)."""
    root = tmp_path_factory.mktemp("distilled")
    run = str(root / "run")
    train(tiny_run_config(steps=2), run)
    res = distill(run, DistillConfig(client=0, steps=2, teacher_steps=8, iters=2, batch_size=4, pairs=8,
                                     checkpoint_every=2), str(root / "students"), progress=False)
    bundle = str(root / "bundle")
    assert main(["export", "--run", run, "--client", "0", "--student", res.students[2], "--out", bundle,
                 "--no-speed"]) == 0
    return run, res, bundle


def test_manifest_records_the_distilled_sampler(distilled):
    run, res, bundle = distilled
    b = load_bundle(bundle)
    m = b.manifest
    assert m["format_version"] == FORMAT_VERSION == 2
    assert m["sampler"]["kind"] == "distilled" and m["sampler"]["steps"] == 2
    assert m["sampler"]["levels"] == [29, 14] and m["sampler"]["method"] == "dmd"
    assert b.distilled and b.sampler == SamplerConfig("distilled", 2)
    # whatever the caller asks for, the student runs its own timetable
    assert b.sampler_for(SamplerConfig("ddim", 20)) == SamplerConfig("distilled", 2)
    assert m["source"]["student"].endswith("student_n2.json")


def test_edge_sampler_matches_torch_on_the_exported_student(distilled):
    run_dir, res, bundle = distilled
    run = load_run(run_dir)
    st = load_student(res.students[2], run)
    rt = EdgeRuntime.open(bundle)
    x = initial_noise(5, (6, 1, 16, 16))
    labels = np.array([0, 1, 2, 3, 0, 1])
    calls = []
    edge = rt.finish(Handoff(x, rt.bundle.handoff_level, seed=5), labels, sampler=SamplerConfig("ddpm"),
                     callback=lambda i, t, s: calls.append(t))
    ref = student_finish(st, run.schedule, torch.from_numpy(x), torch.from_numpy(labels), seed=5).numpy()
    assert calls == [29, 14]  # two model calls, at the student's levels
    diff = float(np.max(np.abs(edge - ref)))
    assert diff <= 1e-4, f"edge vs torch distilled student: max |Δ| {diff:.3g}"


def test_edge_cli_generates_with_the_distilled_bundle(distilled, tmp_path, capsys):
    run_dir, res, bundle = distilled
    src = tmp_path / "handoff.npy"
    np.save(src, initial_noise(1, (4, 1, 16, 16)))
    out = tmp_path / "images.npy"
    assert edge_main(["generate", "--bundle", bundle, "--from", str(src), "--out", str(out)]) == 0
    imgs = np.load(out)
    assert imgs.shape == (4, 1, 16, 16) and np.all(np.isfinite(imgs)) and np.abs(imgs).max() <= 1.0


def test_edge_info_and_bench_say_the_bundle_is_a_distilled_student(distilled, capsys):
    _, _, bundle = distilled
    assert edge_main(["info", "--bundle", bundle]) == 0
    assert "distilled: 2 model calls per image" in capsys.readouterr().out
    assert edge_main(["bench", "--bundle", bundle, "--batch", "1", "--runs", "2", "--loop-runs", "1"]) == 0
    assert "a distilled student: 2 calls over 30 client levels" in capsys.readouterr().out


def test_old_bundles_read_and_edited_timetables_are_refused(distilled, tmp_path):
    _, _, bundle = distilled
    from collafuse_edge.bundle import MANIFEST_NAME

    def edited(change, name):
        d = tmp_path / name
        shutil.copytree(bundle, d)
        p = d / MANIFEST_NAME
        doc = json.loads(p.read_text())
        change(doc)
        p.write_text(json.dumps(doc))
        return d

    v1 = edited(lambda d: (d.pop("sampler"), d.update(format_version=1)), "v1")
    assert not load_bundle(v1).distilled  # a format-1 bundle: an ordinary client model
    with pytest.raises(BundleError, match="format_version 2"):
        load_bundle(edited(lambda d: d.update(format_version=1), "v1s"))
    with pytest.raises(BundleError, match="timetable"):
        load_bundle(edited(lambda d: d["sampler"].update(levels=[29, 10]), "lv"))
    with pytest.raises(BundleError, match="steps"):
        load_bundle(edited(lambda d: d["sampler"].update(steps=99), "st"))
    with pytest.raises(BundleError, match="unknown"):
        load_bundle(edited(lambda d: d["sampler"].update(kind="lcm"), "kd"))


def test_export_refuses_a_student_of_another_client(distilled, tmp_path, capsys):
    run, res, _ = distilled
    rc = main(["export", "--run", run, "--client", "1", "--student", res.students[2], "--out", str(tmp_path / "x")])
    assert rc == 2
    assert "client" in capsys.readouterr().err


def test_a_site_run_distils_exports_and_generates(tmp_path, capsys):
    """A site's client-train run (its own share, its own model, no server model) distils on its own
    machine and ships a distilled bundle: the CLI path end to end."""
    from collafuse.client_train import ClientTrainConfig, ClientTrainer
    from collafuse.config import DataConfig, ScheduleConfig, TrainConfig, tiny_preset

    async def transport(method, path, headers, body):
        if (method, path) == ("GET", "/v1/info"):
            return 200, {"schedule": ScheduleConfig(40, "linear").build().to_dict(), "image_shape": [1, 16, 16],
                         "num_classes": 10, "server_conditioning": "label",
                         "you": {"client_levels": 24, "handoff_level": 23, "cut_ratio": 0.6}}
        assert (method, path) == ("POST", "/v1/train")
        return 200, {}

    site = str(tmp_path / "site")
    cc = ClientTrainConfig(out=site, server="http://127.0.0.1:9", token="t", client_index=1,
                           data=DataConfig("digits", 16, 3, "iid", 0.2, 0), model=tiny_preset(),
                           train=TrainConfig(steps=2, batch_size=4, device="cpu", checkpoint_every=2))
    tr = ClientTrainer(cc, transport=transport)
    try:
        tr.run(progress=False)
    finally:
        tr.close()
    assert main(["distill", "--run", site, "--client", "1", "--steps", "1", "--teacher-steps", "8",
                 "--start-steps", "2", "--iters", "1", "--batch-size", "4"]) == 2  # progressive only
    assert "--start-steps only applies to --method progressive" in capsys.readouterr().err
    assert main(["distill", "--run", site, "--client", "1", "--steps", "1", "--teacher-steps", "8",
                 "--iters", "1", "--batch-size", "4", "--pairs", "8"]) == 0  # the default method, dmd
    student = f"{site}/distill/client_1/student_n1.json"
    bundle = str(tmp_path / "bundle")
    assert main(["export", "--run", site, "--client", "1", "--student", student, "--out", bundle, "--no-speed"]) == 0
    b = load_bundle(bundle)
    assert b.sampler == SamplerConfig("distilled", 1) and b.handoff_level == 23
    src = tmp_path / "h.npy"
    np.save(src, initial_noise(2, (3, 1, 16, 16)))
    assert edge_main(["generate", "--bundle", bundle, "--from", str(src), "--out", str(tmp_path / "o.npy")]) == 0
    assert np.load(tmp_path / "o.npy").shape == (3, 1, 16, 16)
