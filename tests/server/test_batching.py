"""Step-level batching: concurrent requests at different levels share forwards and each gets
exactly what it gets when served alone — and what in-process split sampling gives (docs/architecture.md#the-method)."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from collafuse.server.app import create_app
from collafuse.server.state import STATE
from collafuse.server.engine import HandoffSpec, StepEngine
from collafuse_edge.protocol import H_LEVEL, H_SEED, decode_tensor

from server_fixtures import auth, labels_for, reference_handoff

# (client, n, seed, sampler, steps): three cut ratios → three handoff levels, plus DDIM rows
REQUESTS = [
    (0, 3, 11, "ddpm", None),
    (1, 1, 12, "ddpm", None),
    (2, 2, 13, "ddpm", None),
    (0, 2, 14, "ddim", 7),
    (1, 4, 15, "ddpm", None),
]


def _body(client, n, seed, sampler, steps):
    body = {"n": n, "seed": seed, "labels": labels_for(n, client), "sampler": sampler}
    if steps is not None:
        body["steps"] = steps
    return body


async def _post(client, req):
    resp = await client.post("/v1/handoff", json=_body(*req), headers=auth(req[0]))
    assert resp.status == 200, await resp.text()
    x = decode_tensor(await resp.read(), dtype="float32", ndim=4)
    return x, int(resp.headers[H_LEVEL]), int(resp.headers[H_SEED])


async def test_concurrent_requests_equal_one_at_a_time(aiohttp_client, server_config, loaded_run):
    import dataclasses

    batched = await aiohttp_client(create_app(server_config, run=loaded_run))
    results = await asyncio.gather(*(_post(batched, r) for r in REQUESTS))
    m = batched.app[STATE].metrics.registry
    count = m.get_sample_value("collafuse_batch_requests_count")
    alone = m.get_sample_value("collafuse_batch_requests_bucket", {"le": "1.0"})
    assert count > alone, "no step served more than one request: batching did not happen"

    serial = await aiohttp_client(create_app(dataclasses.replace(server_config, batching=False), run=loaded_run))
    for req, (x, level, seed) in zip(REQUESTS, results):
        y, level_1, _ = await _post(serial, req)
        k = loaded_run.config.client_levels[req[0]]
        assert level == level_1 == k - 1 and seed == req[2]
        np.testing.assert_allclose(x, y, rtol=0, atol=1e-5)
        ref = reference_handoff(loaded_run, req[0], req[1], labels_for(req[1], req[0]), req[2], req[3], req[4])
        np.testing.assert_allclose(x, ref, rtol=0, atol=1e-5)
    m1 = serial.app[STATE].metrics.registry
    assert m1.get_sample_value("collafuse_batch_requests_bucket", {"le": "1.0"}) == \
        m1.get_sample_value("collafuse_batch_requests_count")  # batching off: one request per forward


async def test_engine_rows_at_different_levels_share_one_forward(loaded_run):
    """Drive the engine directly and record every forward: levels differ within one batch."""
    calls = []
    model = loaded_run.server

    def denoise(x, t, labels):
        calls.append(t.tolist())
        return model(x, t, class_labels=labels).sample

    eng = StepEngine(denoise, loaded_run.schedule, (1, 16, 16), torch.device("cpu"), conditional=True,
                     batching=True, max_batch_rows=16)
    await eng.start()
    specs = [HandoffSpec(n=2, seed=s, client_levels=k, labels=np.array([1, 2]))
             for s, k in ((1, 30), (2, 20), (3, 40))]
    try:
        first = asyncio.ensure_future(eng.submit(specs[0]))
        while eng.steps_run < 3:  # every timetable starts at T-1: join late to mix levels
            await asyncio.sleep(0.001)
        rest = asyncio.gather(*(eng.submit(s) for s in specs[1:]))
        outs = [await first, *await rest]
    finally:
        await eng.close()
    mixed = [c for c in calls if len(c) == 6]  # all three requests in one forward …
    assert mixed and any(len(set(c)) > 1 for c in mixed)  # … at different levels
    for s, out in zip(specs, outs):
        client = {30: 0, 20: 1, 40: 2}[s.client_levels]
        ref = reference_handoff(loaded_run, client, 2, [1, 2], s.seed)
        np.testing.assert_allclose(out.samples, ref, rtol=0, atol=1e-5)
        assert out.level == s.client_levels - 1 and out.steps == 50 - s.client_levels


async def test_max_batch_rows_limits_a_forward(loaded_run):
    sizes = []
    model = loaded_run.server

    def denoise(x, t, labels):
        sizes.append(x.shape[0])
        return model(x, t, class_labels=labels).sample

    eng = StepEngine(denoise, loaded_run.schedule, (1, 16, 16), torch.device("cpu"), conditional=True,
                     batching=True, max_batch_rows=4)
    await eng.start()
    try:
        await asyncio.gather(*(eng.submit(HandoffSpec(n=3, seed=i, client_levels=45, labels=np.zeros(3, int)))
                               for i in range(3)))
    finally:
        await eng.close()
    assert max(sizes) <= 4


@pytest.mark.parametrize("k", [0, 50])
async def test_extreme_cuts(loaded_run, k):
    """c = 1 (k = T): the server returns x_{T-1} untouched; c = 0: it denoises to the clean image."""
    from collafuse_edge.noise import initial_noise

    eng = StepEngine(lambda x, t, lab: loaded_run.server(x, t, class_labels=lab).sample, loaded_run.schedule,
                     (1, 16, 16), torch.device("cpu"), conditional=True)
    await eng.start()
    try:
        out = await eng.submit(HandoffSpec(n=2, seed=5, client_levels=k, labels=np.array([0, 1])))
    finally:
        await eng.close()
    assert out.level == k - 1
    if k == 50:
        np.testing.assert_array_equal(out.samples, initial_noise(5, (2, 1, 16, 16)))
        assert out.steps == 0
    else:
        assert out.steps == 50 and np.abs(out.samples).max() <= 1.0 + 1e-6


async def test_a_cancelled_request_is_dropped_and_others_continue(loaded_run):
    """A caller that hangs up (its handler is cancelled) stops costing forwards at the next step."""
    rows = []
    model = loaded_run.server

    def denoise(x, t, labels):
        rows.append(x.shape[0])
        return model(x, t, class_labels=labels).sample

    eng = StepEngine(denoise, loaded_run.schedule, (1, 16, 16), torch.device("cpu"), conditional=True)
    await eng.start()
    try:
        gone = asyncio.ensure_future(eng.submit(HandoffSpec(n=3, seed=1, client_levels=10, labels=np.zeros(3, int))))
        stays = asyncio.ensure_future(eng.submit(HandoffSpec(n=1, seed=2, client_levels=10, labels=np.zeros(1, int))))
        while eng.steps_run < 2:
            await asyncio.sleep(0.001)
        gone.cancel()
        out = await stays
    finally:
        await eng.close()
    assert gone.cancelled() and out.steps == 40
    assert rows[0] == 4 and rows[-1] == 1 and len(rows) == 40
