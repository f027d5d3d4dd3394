"""Split training, checkpoints, resume and bad input."""
import json
import os

import pytest
import torch

from collafuse.checkpoint import latest_checkpoint, load_run, read_state
from collafuse.cli import main
from collafuse.config import RunConfig, replace
from collafuse.errors import CheckpointError, ConfigError
from collafuse.train import train

from tiny_runs import tiny_run_config


def _weights(run_dir):
    run = load_run(run_dir)
    return [dict(m.state_dict()) for m in [run.server, *run.clients]]


def test_train_writes_run_and_logs(tmp_path):
    res = train(tiny_run_config(steps=4), str(tmp_path / "r"), progress=False)
    assert res.step == 4
    lines = [json.loads(x) for x in open(tmp_path / "r" / "metrics.jsonl")]
    assert [x["step"] for x in lines] == [1, 2, 3, 4]
    assert {"client_0_loss", "client_1_loss", "client_2_loss", "server_loss"} <= set(lines[-1])
    run = load_run(str(tmp_path / "r"))
    assert run.step == 4 and len(run.clients) == 3
    assert RunConfig.from_dict(run.config.to_dict()) == run.config  # config round trip


def test_resume_is_bit_for_bit(tmp_path):
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    train(tiny_run_config(steps=4), full, progress=False)
    train(tiny_run_config(steps=4), part, progress=False)  # same, then continue from step 2
    # cut the second run back to its step-2 checkpoint
    ckpts = sorted(os.listdir(os.path.join(part, "checkpoints")))
    assert ckpts == ["step_0000002", "step_0000004"]
    import shutil

    shutil.rmtree(os.path.join(part, "checkpoints", "step_0000004"))
    with open(os.path.join(part, "LATEST"), "w") as f:
        f.write("step_0000002\n")
    res = train(None, part, resume=True, progress=False)
    assert res.step == 4
    for a, b in zip(_weights(full), _weights(part)):
        for k in a:
            assert torch.equal(a[k], b[k]), k
    lines = [json.loads(x)["step"] for x in open(os.path.join(part, "metrics.jsonl"))]
    assert lines == [1, 2, 3, 4]  # no duplicated log lines after resume


def test_resume_can_extend_steps(tmp_path):
    d = str(tmp_path / "r")
    train(tiny_run_config(steps=2), d, progress=False)
    assert train(None, d, resume=True, steps=4, progress=False).step == 4


def test_corrupted_checkpoint_is_refused(tmp_path):
    d = str(tmp_path / "r")
    train(tiny_run_config(steps=2), d, progress=False)
    ck = latest_checkpoint(d)
    p = os.path.join(ck, "client_1.safetensors")
    data = bytearray(open(p, "rb").read())
    data[-5] ^= 0xFF
    open(p, "wb").write(bytes(data))
    with pytest.raises(CheckpointError, match="corrupted"):
        load_run(d)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_even_with_matching_hashes(tmp_path, bad):
    """A diverged run writes NaN weights with valid hashes: loading must refuse, not sample garbage."""
    from safetensors.torch import load_file, save_file

    from collafuse.checkpoint import sha256_file

    d = str(tmp_path / "r")
    train(tiny_run_config(steps=2), d, progress=False)
    ck = latest_checkpoint(d)
    p = os.path.join(ck, "server.safetensors")
    sd = load_file(p)
    name = sorted(sd)[3]
    sd[name].view(-1)[0] = bad
    save_file(sd, p)
    state_path = os.path.join(ck, "state.json")
    state = json.load(open(state_path))
    state["files"]["server.safetensors"] = sha256_file(p)  # the hashes agree: only the values are wrong
    json.dump(state, open(state_path, "w"))
    with pytest.raises(CheckpointError, match=f"NaN or Inf.*{name}"):
        load_run(d)


def test_mismatched_checkpoint_is_refused(tmp_path):
    d = str(tmp_path / "r")
    train(tiny_run_config(steps=2), d, progress=False)
    cfg = json.load(open(os.path.join(d, "config.json")))
    cfg["client_model"]["block_out_channels"] = [16, 32]
    cfg["client_model"]["norm_num_groups"] = 8
    json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
    with pytest.raises(CheckpointError, match="do not match the model config"):
        load_run(d)


def test_atomic_checkpoint_keeps_previous_on_failure(tmp_path, monkeypatch):
    d = str(tmp_path / "r")
    train(tiny_run_config(steps=2), d, progress=False)
    before = latest_checkpoint(d)
    import collafuse.checkpoint as ck

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ck, "save_file", boom)
    # a clear error that names the cause and says the previous checkpoint is intact
    with pytest.raises(CheckpointError, match="No space left on device.*previous checkpoint"):
        train(None, d, resume=True, steps=4, progress=False)
    assert latest_checkpoint(d) == before
    read_state(before)  # still intact and verified
    assert not [x for x in os.listdir(os.path.join(d, "checkpoints")) if x.endswith(".tmp")]


def test_existing_run_is_not_overwritten(tmp_path):
    d = str(tmp_path / "r")
    train(tiny_run_config(steps=1, checkpoint_every=1), d, progress=False)
    with pytest.raises(ConfigError, match="already holds a run"):
        train(tiny_run_config(steps=1), d, progress=False)


@pytest.mark.parametrize("c", [-0.1, 1.5, float("nan")])
def test_bad_cut_ratio(c):
    with pytest.raises(ConfigError, match="cut ratio"):
        tiny_run_config(cut_ratios=(c, 0.5, 0.5))


def test_bad_objective_and_partition():
    with pytest.raises(ConfigError, match="objective must be one of"):
        tiny_run_config(objective="magic")
    from collafuse.config import DataConfig

    with pytest.raises(ConfigError, match="unknown partition scheme"):
        DataConfig(partition="by-colour")


@pytest.mark.parametrize("argv,msg", [
    (["train", "--out", "X", "--cut-ratio", "1.7"], "cut ratio must lie in"),
    (["train", "--out", "X", "--partition", "zipf"], "unknown partition scheme"),
    (["train", "--out", "X", "--data", "/no/such/file.npz"], "does not exist"),
    (["sample", "--run", "/no/such/run", "--out", "x.png"], "does not exist"),
    (["train", "--out", "X", "--cut-ratio", "0.5,0.5"], "one cut ratio per client"),
])
def test_cli_bad_input_one_clear_error(argv, msg, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert msg in err and err.count("\n") == 1  # one line, no traceback


def test_cli_train_and_sample(tmp_path, capsys):
    d = tmp_path / "run"
    assert main(["train", "--out", str(d), "--timesteps", "50", "--steps", "2", "--batch-size", "4",
                 "--client-model", "tiny", "--server-model", "tiny", "--device", "cpu"]) == 0
    out = tmp_path / "s.png"
    assert main(["sample", "--run", str(d), "-n", "3", "--server-steps", "4", "--client-steps", "3",
                 "--device", "cpu", "--out", str(out)]) == 0
    assert out.stat().st_size > 0
    npy = tmp_path / "s.npy"
    assert main(["sample", "--run", str(d), "--client", "1", "-n", "2", "--sampler", "ddpm", "--device", "cpu",
                 "--out", str(npy)]) == 0
    import numpy as np

    x = np.load(npy)
    assert x.shape == (2, 1, 16, 16) and np.all(np.abs(x) <= 1.0 + 1e-6)


def test_cli_steps_means_training_steps_and_resume_sees_it_without_argv_sniffing():
    from collafuse.cli import build_parser, train_steps

    parser = build_parser()
    for argv in (["train", "--out", "X", "--resume", "--steps=7"], ["train", "--out", "X", "--resume", "--steps", "7"]):
        assert parser.parse_args(argv).steps == 7
    args = parser.parse_args(["train", "--out", "X", "--resume"])
    assert args.steps is None and train_steps(args) == 3000  # resume keeps the run's own target
    assert train_steps(parser.parse_args(["train", "--out", "X", "--steps=5"])) == 5


def test_cli_one_contract_for_every_subcommand(capsys):
    import argparse
    import inspect

    import collafuse.cli as core_cli
    from collafuse.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert {"train", "sample", "demo", "client-train", "evaluate", "export", "serve"} <= set(sub.choices)
    for name, p in sub.choices.items():
        assert callable(p.get_default("func")) and p.get_default("handler") is None, name
    # the upper layers come in through entry points: the core names neither package
    src = inspect.getsource(core_cli)
    assert "collafuse.export" not in src and "collafuse.server" not in src
    # one sampler flag set: a validated choice, default ddim, on every command that samples
    s = parser.parse_args(["sample", "--run", "R", "--out", "o.png"])
    assert (s.sampler, s.server_steps, s.client_steps) == ("ddim", 40, 20)
    e = parser.parse_args(["evaluate", "--run", "R"])
    assert (e.sampler, e.sample_steps) == ("ddim", 50)
    with pytest.raises(SystemExit) as ex:
        parser.parse_args(["sample", "--run", "R", "--out", "o.png", "--sampler", "euler"])
    assert ex.value.code == 2
    capsys.readouterr()
    e = parser.parse_args(["evaluate", "--run", "R", "--steps", "6"])  # the old name still works
    assert e.sample_steps == 6 and "--steps is deprecated" in capsys.readouterr().err
