"""Distillation of a client's segment into a few-step student (collafuse.distill): the timetable,
the target maths, a tiny progressive and consistency run, resume bit for bit, the CLI, and
``collafuse evaluate``'s sampler choice for a student."""
import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from collafuse.cli import main
from collafuse.distill import (DistillConfig, Distiller, ddim_target_x0, distill, dmd_direction, landing_weight,
                               load_student, stages, student_finish, student_paths, unroll_student)
from collafuse.errors import ConfigError
from collafuse.sampling import split_sample
from collafuse.train import train
from collafuse_edge.errors import ScheduleError
from collafuse_edge.schedule import Schedule, ddim_step, distilled_timetable
from tiny_runs import tiny_run_config

TINY = dict(client=0, method="progressive", teacher_steps=8, start_steps=2, iters=3, batch_size=8, checkpoint_every=2)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("distill") / "run")
    train(tiny_run_config(steps=2), d)
    return d


@pytest.mark.parametrize("k", [1, 7, 30, 200, 600])
def test_distilled_timetable_starts_at_handoff_is_nested_and_distinct(k):
    for n in (1, 2, 4, 8):
        if n > k:
            with pytest.raises(ScheduleError):
                distilled_timetable(k, n)
            continue
        lv = distilled_timetable(k, n).levels
        assert lv[0] == k - 1 and len(lv) == n and lv[-1] >= 0
        assert np.all(np.diff(lv) < 0)
        if 2 * n <= k:  # progressive distillation: the n-step timetable is every other level of 2n
            assert np.array_equal(distilled_timetable(k, 2 * n).levels[::2], lv)


def test_ddim_target_lands_exactly_where_the_teacher_landed():
    s = Schedule.create(1000, clip_sample=False)
    g = torch.Generator().manual_seed(0)
    x_t = torch.randn(6, 1, 4, 4, generator=g, dtype=torch.float64)
    x0 = torch.randn(6, 1, 4, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([599, 599, 300, 300, 10, 10])
    prev = torch.tensor([299, -1, 150, -1, 4, -1])
    ab = torch.from_numpy(s.alpha_bar(t.numpy())).view(-1, 1, 1, 1)
    eps = (x_t - ab.sqrt() * x0) / (1 - ab).sqrt()  # the ε that predicts x0 from x_t
    x_s = ddim_step(s, x_t, eps, t.numpy(), prev.numpy())
    target = ddim_target_x0(s, x_t.float(), x_s.float(), t, prev).double()
    assert torch.allclose(target, x0, atol=2e-4)
    # the landing weight is how far an x̂0 error moves the landing sample: 1 on the last step
    w = landing_weight(s, t, prev).view(-1)
    assert torch.allclose(w[1::2], torch.ones(3)) and bool((w[0::2] < 1).all())
    moved = ddim_step(s, x_t, eps - (x0 * 0 + 0.1) * ab.sqrt() / (1 - ab).sqrt(), t.numpy(), prev.numpy())
    assert torch.allclose(((moved - x_s) ** 2).mean(dim=(1, 2, 3)), 0.01 * w.double(), rtol=1e-3)


def test_stages_halve_to_n_and_reject_bad_settings():
    pd = dict(method="progressive")
    assert [(s.student_steps, s.substeps) for s in stages(DistillConfig(steps=1, start_steps=8, teacher_steps=64,
                                                                        **pd), 600)] == [(8, 8), (4, 2), (2, 2), (1, 2)]
    assert [s.teacher for s in stages(DistillConfig(steps=4, start_steps=8, **pd), 600)] == ["model", "student_n8"]
    # progressive by default: one stage straight from the teacher, and N = 1 halved from N = 2
    assert [(s.student_steps, s.substeps) for s in stages(DistillConfig(steps=4, **pd), 600)] == [(4, 8)]
    assert [(s.student_steps, s.substeps) for s in stages(DistillConfig(steps=1, **pd), 600)] == [(2, 16), (1, 2)]
    # the product's default is distribution matching, one stage per N, at its own learning rate
    d = DistillConfig(steps=1)
    assert d.method == "dmd" and d.lr == 2e-5 and [(s.student_steps, s.substeps) for s in stages(d, 600)] == [(1, 32)]
    assert DistillConfig(steps=1, **pd).lr == 1e-4 and DistillConfig(steps=1, lr=3e-4).lr == 3e-4
    assert len(stages(DistillConfig(steps=4, method="consistency"), 600)) == 1
    for bad in (dict(steps=3), dict(method="x"), dict(steps=4, start_steps=12, **pd), dict(iters=0),
                dict(teacher_steps=12, start_steps=8, **pd), dict(ema_decay=1.0), dict(lr=float("nan")),
                dict(weighting="snr"), dict(method="dmd", pairs=0), dict(method="dmd", fake_lr=-1.0),
                dict(method="dmd", teacher_steps=1)):
        with pytest.raises(ConfigError):
            DistillConfig(**bad)


def test_progressive_run_writes_every_stage_and_samples(tiny_run, tmp_path):
    res = distill(tiny_run, DistillConfig(steps=1, **TINY), str(tmp_path / "pd"), progress=False)
    assert sorted(res.students) == [1, 2] and res.step == 6
    st = load_student(res.students[1])
    meta = json.load(open(res.students[1]))
    assert meta["method"] == "progressive" and meta["levels"] == [29] and meta["client_levels"] == 30
    assert st.steps == 1 and st.timetable.levels.tolist() == [29]
    x = torch.randn(3, 1, 16, 16)
    out = student_finish(st, st_schedule(tiny_run), x, torch.tensor([0, 1, 2]))
    assert out.shape == x.shape and torch.isfinite(out).all() and out.abs().max() <= 1.0 + 1e-6
    # the student weights moved away from the teacher (it was trained), and are finite
    teacher = load_file(os.path.join(tiny_run, "checkpoints", open(os.path.join(tiny_run, "LATEST")).read().strip(),
                                     "client_0.safetensors"))
    student = load_file(student_paths(str(tmp_path / "pd"), 1)[1])
    assert any(not torch.equal(teacher[k], student[k]) for k in teacher)


def st_schedule(run_dir):
    from collafuse.checkpoint import read_config

    return read_config(run_dir).schedule.build()


def _distill_dying_at_call(n: int, monkeypatch, run_dir: str, dc: DistillConfig, out: str) -> None:
    """Distil with the ``n``-th optimisation step interrupted (as Ctrl-C would), then restore."""
    calls = {"n": 0}
    real = Distiller.train_step

    def dying(self):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return real(self)

    monkeypatch.setattr(Distiller, "train_step", dying)
    with pytest.raises(KeyboardInterrupt):
        distill(run_dir, dc, out, progress=False)
    monkeypatch.setattr(Distiller, "train_step", real)


def test_resume_continues_bit_for_bit(tiny_run, tmp_path, monkeypatch):
    dc = DistillConfig(steps=1, **TINY)
    distill(tiny_run, dc, str(tmp_path / "a"), progress=False)
    _distill_dying_at_call(4, monkeypatch, tiny_run, dc, str(tmp_path / "b"))  # after the checkpoint at step 2 and
    res = distill(tiny_run, dc, str(tmp_path / "b"), resume=True, progress=False)  # the stage change at 3
    assert res.step == 6
    a, b = (load_file(student_paths(str(tmp_path / d), 1)[1]) for d in ("a", "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ConfigError, match="other settings"):
        distill(tiny_run, DistillConfig(steps=1, **{**TINY, "iters": 4}), str(tmp_path / "b"), resume=True,
                progress=False)


def test_consistency_run_serves_every_n(tiny_run, tmp_path):
    res = distill(tiny_run, DistillConfig(steps=2, **{**TINY, "method": "consistency", "start_steps": 2}),
                  str(tmp_path / "cd"), progress=False)
    assert sorted(res.students) == [1, 2] and res.step == 3
    assert json.load(open(res.students[2]))["method"] == "consistency"


DMD = dict(client=0, teacher_steps=8, iters=4, batch_size=8, checkpoint_every=2, pairs=12)


def test_dmd_run_writes_the_student_and_resumes_bit_for_bit(tiny_run, tmp_path, monkeypatch):
    dc = DistillConfig(steps=2, method="dmd", **DMD)
    assert [(s.student_steps, s.substeps) for s in stages(dc, 30)] == [(2, 8)]
    res = distill(tiny_run, dc, str(tmp_path / "a"), progress=False)
    assert sorted(res.students) == [2] and res.step == 4
    meta = json.load(open(res.students[2]))
    assert meta["method"] == "dmd" and meta["levels"] == [29, 14]
    ckpt = os.path.join(str(tmp_path / "a"), "checkpoints")
    assert any(f.startswith("fake") for d in os.listdir(ckpt) for f in os.listdir(os.path.join(ckpt, d)))
    _distill_dying_at_call(4, monkeypatch, tiny_run, dc, str(tmp_path / "b"))  # after the checkpoint at step 2:
    distill(tiny_run, dc, str(tmp_path / "b"), resume=True, progress=False)  # the fake denoiser must come back too
    a, b = (load_file(student_paths(str(tmp_path / d), 2)[1]) for d in ("a", "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_unrolled_student_is_the_distilled_sampler_and_dmd_direction_vanishes_at_the_teacher(tiny_run):
    from collafuse.checkpoint import load_run
    from collafuse.sampling import run_distilled

    run = load_run(tiny_run)
    model, sch = run.clients[0], run.schedule
    lv = distilled_timetable(30, 4)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 1, 16, 16, generator=g)
    lab = torch.tensor([0, 1, 2, 3, 4])
    r = sch.clip_sample_range
    with torch.no_grad():
        mine = unroll_student(model, sch, x, lv.levels, lab).clamp(-r, r)
    assert torch.allclose(mine, run_distilled(model, sch, x, lv, lab), atol=1e-5)
    # the gradient flows through every step
    p = next(model.parameters())
    p.requires_grad_(True)
    unroll_student(model, sch, x, lv.levels, lab).sum().backward()
    assert p.grad is not None and p.grad.abs().sum() > 0
    # a fake denoiser equal to the teacher sees no difference between the distributions
    x0 = torch.rand(5, 1, 16, 16, generator=g) * 2 - 1
    t = torch.tensor([1, 5, 10, 20, 29])
    noise = torch.randn(x0.shape, generator=g)
    assert dmd_direction(model, model, sch, x0, t, noise, lab).abs().max() == 0
    other = run.clients[1]
    assert dmd_direction(model, other, sch, x0, t, noise, lab).abs().max() > 0


def test_student_runs_its_own_timetable_in_split_sampling(tiny_run, tmp_path):
    from collafuse.checkpoint import load_run

    res = distill(tiny_run, DistillConfig(steps=2, **TINY), str(tmp_path / "s"), progress=False)
    run = load_run(tiny_run)
    st = load_student(res.students[2], run)
    kw = dict(shape=(1, 16, 16), labels=[1, 2], server_labels=[1, 2], sampler="ddim", server_steps=5,
              client_steps=20, seed=3)
    s = split_sample(run.server, st.model, run.schedule, 30, 2, **kw)
    direct = student_finish(st, run.schedule, s.handoff, torch.tensor([1, 2]), seed=3)
    assert torch.equal(s.images, direct)


def test_load_student_refuses_a_tampered_or_foreign_student(tiny_run, tmp_path):
    from collafuse.checkpoint import load_run

    res = distill(tiny_run, DistillConfig(steps=1, **TINY), str(tmp_path / "t"), progress=False)
    path = res.students[1]
    run = load_run(tiny_run)
    meta = json.load(open(path))
    bad = dict(meta, client=1)  # client 1 has 20 levels, the student 30
    p2 = tmp_path / "t" / "foreign.json"
    p2.write_text(json.dumps(bad))
    with pytest.raises(ConfigError, match="distilled for client 1"):
        load_student(str(p2), run)
    p3 = tmp_path / "t" / "levels.json"
    p3.write_text(json.dumps(dict(meta, levels=[28])))
    with pytest.raises(ConfigError, match="timetable"):
        load_student(str(p3))
    w = student_paths(str(tmp_path / "t"), 1)[1]
    with open(w, "r+b") as f:
        f.seek(-1, 2)
        f.write(b"\x00" if f.read(1) != b"\x00" else b"\x01")
    with pytest.raises(ConfigError, match="sha256"):
        load_student(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_student(str(tmp_path / "nope.json"))


def test_cli_distils_and_validates(tiny_run, tmp_path, capsys):
    out = str(tmp_path / "cli")
    rc = main(["distill", "--run", tiny_run, "--client", "1", "--steps", "2", "--method", "progressive",
               "--teacher-steps", "8", "--start-steps", "4", "--iters", "2", "--batch-size", "4", "--out", out])
    assert rc == 0
    text = capsys.readouterr().out
    assert "N=2" in text and "N=4" in text and os.path.isfile(os.path.join(out, "student_n2.json"))
    assert main(["distill", "--run", tiny_run, "--client", "7", "--steps", "2"]) == 2
    assert "holds no client model 7" in capsys.readouterr().err
    assert main(["distill", "--run", tiny_run, "--client", "0", "--steps", "2", "--method", "progressive",
                 "--start-steps", "3"]) == 2
    with pytest.raises(SystemExit) as e:
        main(["distill", "--run", tiny_run, "--client", "0", "--steps", "3"])
    assert e.value.code == 2


def test_evaluate_scores_a_student_with_its_own_calls(tiny_run, tmp_path, capsys):
    from collafuse.data import load_digits
    from collafuse.metrics.features_train import train_feature_classifier

    d = load_digits(16)
    stem = str(tmp_path / "net")
    train_feature_classifier(d.images, d.labels, 10, epochs=1, progress=False).save(stem)
    res = distill(tiny_run, DistillConfig(steps=2, **TINY), str(tmp_path / "e"), progress=False)
    out = str(tmp_path / "eval")
    rc = main(["evaluate", "--run", tiny_run, "--student", res.students[2], "-n", "6", "--disclosed", "4",
               "--no-attack", "--latency", "none", "--kd-subsets", "2", "--feature-net", stem,
               "--out", out, "--json"])
    assert rc == 0
    rep = json.loads(capsys.readouterr().out)
    costs = {c["client"]: c["cost"] for c in rep["clients"]}
    assert costs[0]["client_calls"] == 2  # the student's two calls, not the sampler's thinned timetable
    assert costs[1]["client_calls"] > 2
    assert rep["config"]["student"] == res.students[2]


def test_cli_distils_with_dmd_and_validates_its_flags(tiny_run, tmp_path, capsys):
    out = str(tmp_path / "cli_dmd")
    rc = main(["distill", "--run", tiny_run, "--client", "0", "--steps", "2", "--method", "dmd", "--teacher-steps",
               "8", "--iters", "2", "--batch-size", "4", "--pairs", "8", "--regression-weight", "0", "--out", out])
    assert rc == 0 and os.path.isfile(os.path.join(out, "student_n2.json"))
    assert json.load(open(os.path.join(out, "student_n2.json")))["distill"]["regression_weight"] == 0
    capsys.readouterr()
    for flag, value in (("--regression-weight", "-1"), ("--fake-lr", "0"), ("--pairs", "0")):
        with pytest.raises(SystemExit) as e:
            main(["distill", "--run", tiny_run, "--client", "0", "--steps", "2", "--method", "dmd", flag, value])
        assert e.value.code == 2
        assert flag in capsys.readouterr().err
