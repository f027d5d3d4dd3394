"""A checkpoint write that the OS refuses (disk full, read-only file system) at each point of
``save_checkpoint``: a clear CheckpointError, the previous checkpoint intact and loadable, no
debris, and the next write succeeds. The networked trainer survives the same fault without
losing or double-training a batch (docs/reliability.md)."""
from __future__ import annotations

import errno
import os

import numpy as np
import pytest
import torch

from collafuse import checkpoint as ck
from collafuse.checkpoint import (latest_checkpoint, load_rng, read_state, restore_model_state, save_checkpoint)
from collafuse.errors import CheckpointError
from collafuse.server_training import ServerTrainer, ServerTrainingConfig
from collafuse.train import new_model_state, train

from tiny_runs import tiny_run_config


def _ms(seed: int):
    from collafuse.checkpoint import DataInfo, model_configs

    cfg = tiny_run_config()
    _, scfg = model_configs(cfg, DataInfo("digits", 10, 1, 16))
    torch.manual_seed(seed)
    return new_model_state("server", scfg, cfg.train, torch.device("cpu"))


def _refuse(err: int):
    def fail(*a, **k):
        raise OSError(err, os.strerror(err))
    return fail


# Each fault point of save_checkpoint, as (what to patch, after how many successful calls it fails).
FAULTS = {
    "mkdir": ("makedirs", 0),  # read-only checkpoints/ folder: the temp dir cannot be made
    "weights": ("save_file", 2),  # disk full while writing the third tensor file
    "state_json": ("atomic_write_bytes", 0),  # … while writing state.json
    "rename": ("replace", 1),  # the rename of step_N.tmp → step_N (after state.json's rename)
    "latest": ("replace", 2),  # the rename that moves LATEST to the new checkpoint
}


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EROFS])
@pytest.mark.parametrize("point", list(FAULTS))
def test_a_refused_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch, point, err):
    run = str(tmp_path / "run")
    ms = _ms(0)
    rng = torch.Generator().manual_seed(1).get_state()
    good = save_checkpoint(run, 10, [ms], rng, extra={"trained": ["0/a"]})
    before = {f: open(os.path.join(good, f), "rb").read() for f in os.listdir(good)}
    with torch.no_grad():  # the state that the failed write would have stored differs
        for p in ms.model.parameters():
            p.add_(1.0)

    name, ok_calls = FAULTS[point]
    target = ck.os if name in ("makedirs", "replace") else ck
    real = getattr(target, name)
    calls = {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] > ok_calls:
            raise OSError(err, os.strerror(err))
        return real(*a, **k)

    monkeypatch.setattr(target, name, flaky)
    with pytest.raises(CheckpointError) as e:
        save_checkpoint(run, 20, [ms], rng, extra={"trained": ["0/a", "0/b"]})
    monkeypatch.setattr(target, name, real)
    msg = str(e.value)
    assert os.strerror(err) in msg and "step_0000020" in msg
    assert "previous checkpoint step_0000010 is intact" in msg

    # the old checkpoint: LATEST points at it, every file verifies and is byte-identical, it loads
    assert latest_checkpoint(run) == good
    meta = read_state(good)  # sha256 of every file checked
    assert {f: open(os.path.join(good, f), "rb").read() for f in os.listdir(good)} == before
    fresh = _ms(5)
    restore_model_state(good, meta, fresh)
    assert meta["step"] == 10 and meta["extra"]["trained"] == ["0/a"] and load_rng(good).equal(rng)
    # no debris: no temp dir, no temp file, nothing named step_0000020 unless it is complete
    root = os.path.join(run, "checkpoints")
    assert not [f for f in os.listdir(root) if f.endswith((".tmp", ".old"))]
    assert not [f for f in os.listdir(run) if f.startswith(".tmp-")]
    # the next write (space freed) succeeds and moves LATEST
    save_checkpoint(run, 20, [ms], rng, extra={"trained": ["0/a", "0/b"]})
    assert latest_checkpoint(run).endswith("step_0000020") and read_state(latest_checkpoint(run))["step"] == 20


def test_resaving_the_same_step_keeps_it_if_the_rename_fails(tmp_path, monkeypatch):
    run = str(tmp_path / "run")
    ms = _ms(0)
    rng = torch.Generator().manual_seed(1).get_state()
    save_checkpoint(run, 10, [ms], rng)
    real = ck.os.replace
    calls = {"n": 0}

    def flaky(src, dst):
        calls["n"] += 1
        if calls["n"] == 3:  # 1: state.json, 2: step_N → step_N.old, 3: step_N.tmp → step_N
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(src, dst)

    monkeypatch.setattr(ck.os, "replace", flaky)
    with pytest.raises(CheckpointError, match="No space left"):
        save_checkpoint(run, 10, [ms], rng)
    monkeypatch.setattr(ck.os, "replace", real)
    read_state(latest_checkpoint(run))  # still there, still verifies
    assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == ["step_0000010"]


def test_trainer_survives_a_full_disk_and_loses_nothing(tmp_path, monkeypatch):
    """Checkpoints fail for a while (ENOSPC): training goes on, the trained batches stay spooled
    (a crash now would redo them, not lose them), the error shows in progress(); once space is
    back the retry writes the checkpoint and forgets them. Then a restart resumes exactly there."""
    import collafuse.server_training as st

    run = str(tmp_path / "run")
    train(tiny_run_config(steps=2), run, progress=False)
    monkeypatch.setattr(st, "CHECKPOINT_RETRY_S", 0.0)
    tr = ServerTrainer(run, ServerTrainingConfig(batch_rows=4, checkpoint_every=1, device="cpu"))
    rng = np.random.default_rng(0)

    def put(i):
        assert tr.spool.put(0, f"b{i}", 29, rng.standard_normal((4, 1, 16, 16)).astype(np.float32),
                            rng.integers(0, 10, 4))

    put(0)
    tr.train_batches(tr.spool.take(4))  # checkpoint 1: fine
    real = st.save_checkpoint
    monkeypatch.setattr(st, "save_checkpoint", lambda *a, **k: (_ for _ in ()).throw(
        CheckpointError("cannot write checkpoint: No space left on device")))
    for i in (1, 2):
        put(i)
        tr.train_batches(tr.spool.take(4))  # trains; its checkpoint fails; no exception escapes
    p = tr.progress()
    assert p["step"] == 3 and "No space left" in p["checkpoint_error"]
    pending_files = {f for f in os.listdir(tr.spool.pending_dir) if f.endswith(".json")}
    assert len(pending_files) == 2  # b1, b2: trained but not durable yet, so kept
    # a crash now: a fresh trainer resumes at step 1 and re-queues b1, b2 (none lost)
    tr_crash = ServerTrainer(run, ServerTrainingConfig(batch_rows=4, checkpoint_every=1, device="cpu"))
    assert tr_crash.step == 1 and sorted(b.key for b in tr_crash.spool.all_pending()) == ["0/b1", "0/b2"]
    del tr_crash
    # space is back: the next retry writes step 3 and forgets b1, b2
    monkeypatch.setattr(st, "save_checkpoint", real)
    assert tr.try_checkpoint() and tr.progress()["checkpoint_error"] is None
    meta = read_state(latest_checkpoint(os.path.join(run, "server_training")))
    assert meta["step"] == 3 and sorted(meta["extra"]["trained"]) == ["0/b0", "0/b1", "0/b2"]
    assert meta["extra"]["trained_rows"] == 12
    assert not os.listdir(tr.spool.pending_dir)
    tr2 = ServerTrainer(run, ServerTrainingConfig(batch_rows=4, checkpoint_every=1, device="cpu"))
    assert tr2.step == 3 and tr2.trained_rows == 12 and not tr2.spool.all_pending()
