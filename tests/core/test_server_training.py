"""Networked server training: durable spool, exactly-once training across restarts, and the
same server update as the in-process simulation."""
import os

import numpy as np
import pytest
import torch

from collafuse.checkpoint import latest_checkpoint, read_state, restore_model_state
from collafuse.objectives import Disclosure
from collafuse.server_training import ServerTrainer, ServerTrainingConfig
from collafuse.spool import DisclosureSpool, SpoolFull
from collafuse.train import new_model_state, server_update, train
from collafuse.checkpoint import model_configs, read_data_info

from tiny_runs import tiny_run_config


@pytest.fixture
def run_dir(tmp_path):
    d = str(tmp_path / "run")
    train(tiny_run_config(steps=2), d, progress=False)
    return d


def _batch(seed, rows=4):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((rows, 1, 16, 16)).astype(np.float32), rng.integers(0, 10, rows)


def test_spool_is_durable_idempotent_and_bounded(tmp_path):
    sp = DisclosureSpool(str(tmp_path / "s"), max_batches=3)
    x, y = _batch(0)
    assert sp.put(0, "a", 29, x, y) is True
    assert sp.put(0, "a", 29, x, y) is False  # replay: not stored twice
    assert sp.put(1, "a", 19, x, None) is True  # ids are per client
    sp.put(0, "b", 29, x, y)
    with pytest.raises(SpoolFull):
        sp.put(0, "c", 29, x, y)
    with pytest.raises(ValueError, match="batch id"):
        sp.put(0, "../etc", 29, x, y)
    again = DisclosureSpool(str(tmp_path / "s"))  # a restart sees every acknowledged batch, in order
    assert [b.key for b in again.all_pending()] == ["0/a", "1/a", "0/b"]
    assert np.array_equal(again.load(again.all_pending()[0]), x)
    assert again.all_pending()[0].labels == tuple(int(v) for v in y)


def test_same_update_as_simulation(run_dir):
    tr = ServerTrainer(run_dir, ServerTrainingConfig(batch_rows=64, checkpoint_every=100, device="cpu", seed=5))
    x0, y0 = _batch(1)
    x1, y1 = _batch(2)
    tr.spool.put(0, "b0", 29, x0, y0)
    tr.spool.put(2, "b1", 9, x1, y1)
    tr.train_batches(tr.spool.take(64))
    # the simulation's path: the same function on the same disclosures and generator seed
    cfg = tr.cfg
    _, scfg = model_configs(cfg, read_data_info(run_dir))
    ms = new_model_state("server", scfg, cfg.train, "cpu")
    ck = latest_checkpoint(run_dir)
    restore_model_state(ck, read_state(ck), ms)
    gen = torch.Generator().manual_seed(5)
    ds = [Disclosure(0, 29, torch.from_numpy(x0), torch.from_numpy(y0)),
          Disclosure(2, 9, torch.from_numpy(x1), torch.from_numpy(y1))]
    server_update(ms, ds, cfg.schedule.build(), cfg, gen, "cpu")
    for (k, a), b in zip(tr.ms.model.state_dict().items(), ms.model.state_dict().values()):
        assert torch.equal(a, b), k


def test_restart_loses_no_acknowledged_batch(run_dir):
    tc = ServerTrainingConfig(batch_rows=4, checkpoint_every=2, device="cpu")
    tr = ServerTrainer(run_dir, tc)
    for i in range(5):
        assert tr.spool.put(0, f"b{i}", 29, *_batch(i))
    for _ in range(3):  # 3 updates: a checkpoint after the 2nd, the 3rd not yet checkpointed
        tr.train_batches(tr.spool.take(4))
    del tr  # crash: no stop(), no final checkpoint
    tr2 = ServerTrainer(run_dir, tc)
    assert tr2.step == 2 and tr2.trained == {"0/b0", "0/b1"}
    pending = [b.key for b in tr2.spool.all_pending()]
    assert pending == ["0/b2", "0/b3", "0/b4"]  # b2 was trained after the checkpoint: it is redone
    assert len(tr2.trained) + len(pending) == 5
    assert tr2.spool.put(0, "b0", 29, *_batch(0)) is False  # a replay of a trained batch is refused
    while tr2.spool.all_pending():
        tr2.train_batches(tr2.spool.take(4))
    tr2.stop()
    meta = read_state(latest_checkpoint(os.path.join(run_dir, "server_training")))
    assert sorted(meta["extra"]["trained"]) == [f"0/b{i}" for i in range(5)]
    assert not [f for f in os.listdir(os.path.join(run_dir, "server_training", "spool", "pending"))]


def test_background_thread_trains_and_publishes(run_dir):
    got = []
    tr = ServerTrainer(run_dir, ServerTrainingConfig(batch_rows=8, checkpoint_every=1, device="cpu"),
                       on_weights=lambda sd, v: got.append(v))
    tr.start()
    for i in range(3):
        tr.spool.put(1, f"x{i}", 19, *_batch(i))
    from polling import wait_until

    assert wait_until(lambda: tr.progress()["trained_batches"] == 3, 60)
    tr.stop()
    assert got and got[-1] == tr.step and tr.progress()["pending_batches"] == 0


def test_ddp_two_processes_gloo(run_dir, tmp_path):
    """torchrun with 2 CPU processes (gloo): weights stay in sync, the loss falls, rank 0 checkpoints.

    It cannot hang the suite: ``--standalone`` lets torchrun's store take a free port (no collision
    with a concurrent run), ``--timeout`` fails a collective whose peer is gone, ``--watchdog`` makes
    a stuck rank print its threads' stacks and exit 1, and past the hard limit the whole process
    tree is sent SIGABRT (Python stacks, via PYTHONFAULTHANDLER) and then killed."""
    import json
    import signal
    import subprocess
    import sys

    sp = DisclosureSpool(os.path.join(run_dir, "server_training", "spool"))
    rng = np.random.default_rng(0)
    for i in range(4):  # structured "disclosures": easy to fit
        x = (np.tanh(rng.standard_normal((8, 1, 16, 16))) * 0.3).astype(np.float32)
        sp.put(0, f"b{i}", 29, x, rng.integers(0, 10, 8))
    report = str(tmp_path / "ddp")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1")
    p = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "collafuse.distributed", "--run-dir", run_dir, "--steps", "12", "--batch-rows", "16",
                          "--report", report, "--timeout", "120", "--watchdog", "180"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        out, err = p.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGABRT)  # torchrun and both ranks dump their Python stacks
        try:
            out, err = p.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            out, err = p.communicate()
        pytest.fail(f"torchrun did not finish in 240 s; stacks:\n{err[-6000:]}\n{out[-2000:]}")
    finally:
        try:  # nothing of this run may outlive the test (a stray rank would hold the pipes and its port)
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    r = subprocess.CompletedProcess(p.args, p.returncode, out, err)
    assert r.returncode == 0, r.stderr[-6000:]
    res = [json.load(open(f"{report}.rank{i}")) for i in range(2)]
    assert all(x["in_sync"] and x["world_size"] == 2 for x in res)
    assert res[0]["last_loss"] < res[0]["first_loss"]
    meta = read_state(latest_checkpoint(os.path.join(run_dir, "server_training")))
    assert meta["step"] == 12 and meta["extra"]["ddp"]["world_size"] == 2
