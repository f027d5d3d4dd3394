"""What ``/metrics`` says about training from uploads and about the served model: the spool, the
trainer's step, batches, rows and loss EMA, checkpoint age, uploads by status and error code,
``collafuse_model_info``; and the exposition's naming (no ``_created`` series)."""
from __future__ import annotations

import asyncio
import math
import shutil
import time
from types import SimpleNamespace

import numpy as np
import pytest

from collafuse.server.app import create_app
from collafuse.server.config import ServerConfig
from collafuse.server.prometheus import LOSS_EMA_WEIGHT, ServerMetrics
from collafuse.server.state import STATE
from collafuse_edge.protocol import encode_tensor
from server_fixtures import LIMITED_TOKEN, auth, token_entries


def _sample(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


class _Spool:
    n = nbytes = 0

    def __len__(self) -> int:
        return self.n


def _fake_trainer():
    """What ServerMetrics reads of a ServerTrainer."""
    return SimpleNamespace(trained=set(), trained_rows=0, losses=[], step=0, checkpoint_error=None, spool=_Spool())


def test_trainer_metrics_count_this_process_and_average_the_loss():
    m = ServerMetrics(training=True)
    tr = _fake_trainer()
    tr.trained, tr.trained_rows, tr.step, tr.losses = {"0/a", "0/b"}, 40, 7, [9.0]  # a resumed trainer
    m.watch_trainer(tr, checkpoint_time=None)
    tr.spool.n, tr.spool.nbytes = 3, 3 * 4096
    m.observe_trainer(tr)
    get = m.registry.get_sample_value
    assert get("collafuse_train_batches_total") == 0 and get("collafuse_train_rows_total") == 0
    assert get("collafuse_train_step") == 7
    assert math.isnan(get("collafuse_train_loss_ema"))  # no update by this process yet
    assert get("collafuse_train_spool_pending_batches") == 3 and get("collafuse_train_spool_pending_bytes") == 12288
    assert get("collafuse_train_last_checkpoint_timestamp_seconds") == 0
    assert math.isnan(get("collafuse_train_last_checkpoint_age_seconds"))
    # three updates, then a checkpoint
    tr.trained |= {"0/c", "1/d", "2/e"}
    tr.trained_rows += 12
    tr.losses += [1.0, 2.0, 4.0]
    tr.step = 10
    tr.spool.n, tr.spool.nbytes = 0, 0
    m.checkpoint_written(time.time() - 30)
    m.observe_trainer(tr)
    m.observe_trainer(tr)  # a second scrape counts nothing twice
    ema = 1.0
    for loss in (2.0, 4.0):
        ema = LOSS_EMA_WEIGHT * loss + (1 - LOSS_EMA_WEIGHT) * ema
    assert get("collafuse_train_batches_total") == 3 and get("collafuse_train_rows_total") == 12
    assert get("collafuse_train_loss_ema") == pytest.approx(ema)
    assert get("collafuse_train_step") == 10 and get("collafuse_train_spool_pending_batches") == 0
    assert 30 <= get("collafuse_train_last_checkpoint_age_seconds") < 60
    assert get("collafuse_train_checkpoint_failing") == 0
    tr.checkpoint_error = "disk full"
    m.observe_trainer(tr)
    assert get("collafuse_train_checkpoint_failing") == 1


def test_a_server_that_does_not_train_has_no_training_metrics():
    text = ServerMetrics().render().decode()
    assert "collafuse_train_" not in text and "collafuse_model_info" in text


def test_model_info_names_the_served_version():
    m = ServerMetrics()
    m.set_model_version("run@4:aaaaaaaaaaaa")
    m.set_model_version("run@8:bbbbbbbbbbbb")
    get = m.registry.get_sample_value
    assert get("collafuse_model_info", {"version": "run@8:bbbbbbbbbbbb"}) == 1
    assert get("collafuse_model_info", {"version": "run@4:aaaaaaaaaaaa"}) == 0


@pytest.fixture
async def train_client(aiohttp_client, run_dir, tmp_path):
    own = str(tmp_path / "run")
    shutil.copytree(run_dir, own)
    cfg = ServerConfig(own, tokens=token_entries(), warmup=False, train=True, train_checkpoint_every=1,
                       max_train_rows=16)
    return await aiohttp_client(create_app(cfg))


def _upload(batch: str, *, token_headers=None, x=None) -> tuple[bytes, dict]:
    x = np.random.default_rng(len(batch)).standard_normal((4, 1, 16, 16)).astype(np.float32) if x is None else x
    h = {**(token_headers or auth(0)), "Content-Type": "application/x-npy", "X-Collafuse-Batch-Id": batch,
         "X-Collafuse-Level": "29", "X-Collafuse-Labels": "0,1,2,3"}
    return encode_tensor(x), h


async def test_training_server_metrics_follow_uploads_and_the_trainer(train_client):
    c = train_client
    state = c.server.app[STATE]
    before = _sample(await (await c.get("/metrics")).text())
    v0 = state.model_version
    assert before[f'collafuse_model_info{{version="{v0}"}}'] == 1
    assert before["collafuse_train_step"] == 0 and before["collafuse_train_spool_pending_batches"] == 0
    assert before["collafuse_train_last_checkpoint_timestamp_seconds"] == 0  # the trainer has none yet

    for batch in ("b1", "b1"):  # accepted, then a duplicate
        body, h = _upload(batch)
        await c.post("/v1/train", data=body, headers=h)
    bad = np.full((4, 1, 16, 16), np.nan, dtype=np.float32)
    body, h = _upload("b2", x=bad)
    assert (await c.post("/v1/train", data=body, headers=h)).status == 400
    limited = {"Authorization": f"Bearer {LIMITED_TOKEN}"}  # 2 requests per minute, burst 2
    codes = [(await c.post("/v1/train", data=b, headers=h)).status
             for b, h in (_upload(f"l{i}", token_headers=limited) for i in range(3))]
    assert codes == [200, 200, 429]

    for _ in range(600):  # three accepted batches trained and checkpointed (the spool is empty), new weights served
        text = await (await c.get("/metrics")).text()
        m = _sample(text)
        if m["collafuse_train_batches_total"] == 3 and state.model_version != v0 \
                and m["collafuse_train_spool_pending_bytes"] == 0:
            break
        await asyncio.sleep(0.1)
    assert "_created" not in text
    assert m['collafuse_train_uploads_total{code="accepted",status="200"}'] == 3
    assert m['collafuse_train_uploads_total{code="duplicate_batch",status="409"}'] == 1
    assert m['collafuse_train_uploads_total{code="bad_tensor",status="400"}'] == 1
    assert m['collafuse_train_uploads_total{code="rate_limited",status="429"}'] == 1
    trainer = state.trainer
    assert m["collafuse_train_batches_total"] == 3 and m["collafuse_train_rows_total"] == 12
    assert m["collafuse_train_step"] == trainer.step >= 1
    assert m["collafuse_train_spool_pending_batches"] == 0
    ema = trainer.losses[0]
    for loss in trainer.losses[1:]:
        ema = LOSS_EMA_WEIGHT * loss + (1 - LOSS_EMA_WEIGHT) * ema
    assert m["collafuse_train_loss_ema"] == pytest.approx(ema)
    assert 0 <= m["collafuse_train_last_checkpoint_age_seconds"] < 120
    assert m["collafuse_train_last_checkpoint_timestamp_seconds"] == pytest.approx(time.time(), abs=120)
    assert m["collafuse_train_checkpoint_failing"] == 0
    assert m[f'collafuse_model_info{{version="{state.model_version}"}}'] == 1
    assert m[f'collafuse_model_info{{version="{v0}"}}'] == 0
