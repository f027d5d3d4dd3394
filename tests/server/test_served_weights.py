"""What networked training learned is what every reader of the run uses: ``load_run`` (sample,
evaluate), the model version, and a serving process without ``--train`` that picks up a newer
trainer checkpoint by itself while it serves."""
from __future__ import annotations

import asyncio
import shutil

import numpy as np
import torch

from collafuse.checkpoint import latest_checkpoint, load_run, model_version, server_checkpoint
from collafuse.server.app import create_app
from collafuse.server.config import ServerConfig
from collafuse.server_training import ServerTrainer, ServerTrainingConfig
from server_fixtures import auth, token_entries


def _train_some(run: str, batches: int) -> ServerTrainer:
    tr = ServerTrainer(run, ServerTrainingConfig(batch_rows=4, checkpoint_every=1, device="cpu"))
    rng = np.random.default_rng(batches)
    for i in range(batches):
        assert tr.spool.put(0, f"b{batches}-{i}", 29, rng.standard_normal((4, 1, 16, 16)).astype(np.float32),
                            rng.integers(0, 10, 4))
        tr.train_batches(tr.spool.take(4))
    return tr


def test_load_run_and_version_follow_the_trainer(run_dir, tmp_path):
    run = str(tmp_path / "run")
    shutil.copytree(run_dir, run)
    before = load_run(run)
    tr = _train_some(run, 3)
    tr.stop()
    trained_ckpt = latest_checkpoint(f"{run}/server_training")
    assert server_checkpoint(run) == trained_ckpt
    after = load_run(run)
    assert after.model_version == model_version(run, trained_ckpt)[0] != before.model_version
    assert after.model_version.startswith("run@3:")
    ema = tr.ema_state_dict()
    for k, v in after.server.state_dict().items():
        assert torch.equal(v, ema[k]), k
    old = load_run(run, server_weights="run")  # a flag picks the run's own weights
    assert old.model_version == before.model_version
    for k, v in old.server.state_dict().items():
        assert torch.equal(v, before.server.state_dict()[k]), k


async def test_a_serving_process_picks_up_new_trainer_checkpoints(run_dir, tmp_path, aiohttp_client):
    run = str(tmp_path / "run")
    shutil.copytree(run_dir, run)
    cfg = ServerConfig(run, tokens=token_entries(), warmup=False, weights_poll_s=0.1)
    client = await aiohttp_client(create_app(cfg))
    first = (await (await client.get("/v1/info", headers=auth(0))).json())["model_version"]
    tr = await asyncio.to_thread(_train_some, run, 2)
    await asyncio.to_thread(tr.stop)
    want = model_version(run, latest_checkpoint(f"{run}/server_training"))[0]
    for _ in range(100):
        await asyncio.sleep(0.1)
        got = (await (await client.get("/v1/info", headers=auth(0))).json())["model_version"]
        if got == want:
            break
    assert first != want and got == want
    r = await client.post("/v1/handoff", json={"n": 2, "seed": 1, "labels": [0, 1]}, headers=auth(0))
    assert r.status == 200 and r.headers["X-Collafuse-Model-Version"] == want
