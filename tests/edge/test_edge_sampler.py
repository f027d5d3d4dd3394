"""The numpy client sampler and the EdgeRuntime API on the committed fixture bundles."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest
from edge_paths import COND, FIXTURES, LOCAL

from collafuse_edge import EdgeRuntime, Handoff, InputError, SamplerConfig, load_bundle
from collafuse_edge.noise import initial_noise, step_noise
from collafuse_edge.sampler import apply_step, finish, plan_steps, run_levels
from collafuse_edge.schedule import Schedule, client_timetable, ddpm_step, step

RUNS = {"ddpm": SamplerConfig("ddpm"), "ddim5": SamplerConfig("ddim", 5), "ddim5_eta1": SamplerConfig("ddim", 5, 1.0)}


@pytest.fixture(scope="module")
def cond() -> EdgeRuntime:
    return EdgeRuntime.open(COND)


@pytest.fixture(scope="module")
def local() -> EdgeRuntime:
    return EdgeRuntime.open(LOCAL)


@pytest.mark.parametrize("name", ["tiny_cond", "tiny_local"])
@pytest.mark.parametrize("key", list(RUNS))
def test_matches_the_torch_reference(name, key):
    """The torch split sampler's client half (recorded when the fixture was made) and the edge
    runtime agree for the same handoff samples, labels and seed (the torch-free half of the
    parity test; tests/core/test_export_parity.py runs both live)."""
    rt = EdgeRuntime.open(FIXTURES / name)
    with np.load(FIXTURES / f"{name}_reference.npz") as z:
        ref = {k: z[k] for k in z.files}
    h = Handoff(ref["handoff"], int(ref["level"]), int(ref["seed"]), ref.get("labels"))
    out = rt.finish(h, sampler=RUNS[key])
    assert out.shape == ref[key].shape and out.dtype == np.float32
    assert np.max(np.abs(out - ref[key])) <= 1e-4


def test_shapes_and_range(cond):
    x = initial_noise(1, (5, 1, 8, 8))
    out = cond.finish(Handoff(x, 19, seed=3))
    assert out.shape == (5, 1, 8, 8) and out.dtype == np.float32
    assert np.all(np.abs(out) <= 1.0 + 1e-6)  # the last step returns the clipped x̂0


def test_deterministic_for_a_seed(cond):
    x = initial_noise(1, (3, 1, 8, 8))
    a = cond.finish(Handoff(x, 19, seed=5), labels=[1, 2, 3])
    b = cond.finish(Handoff(x.copy(), 19, seed=5), labels=[1, 2, 3])
    c = cond.finish(Handoff(x, 19, seed=6), labels=[1, 2, 3])
    assert np.array_equal(a, b)
    assert not np.allclose(a, c)  # DDPM draws step noise from the seed


def test_ddim_eta0_ignores_the_seed(cond):
    x = initial_noise(1, (2, 1, 8, 8))
    cfg = SamplerConfig("ddim", steps=4)
    a = cond.finish(Handoff(x, 19, seed=1), sampler=cfg)
    b = cond.finish(Handoff(x, 19, seed=2), sampler=cfg)
    assert np.array_equal(a, b)


def test_labels_matter_and_default_cycles(cond):
    x = initial_noise(1, (4, 1, 8, 8))
    a = cond.finish(Handoff(x, 19, seed=0), labels=0)
    b = cond.finish(Handoff(x, 19, seed=0), labels=[0, 1, 2, 3])
    c = cond.finish(Handoff(x, 19, seed=0))  # default: 0, 1, 2, 3
    assert np.array_equal(b, c) and not np.array_equal(a, b)
    h = Handoff(x, 19, seed=0, labels=np.array([0, 1, 2, 3]))
    assert np.array_equal(cond.finish(h), b)  # the handoff's labels are the default


def test_chunking_does_not_change_results():
    small = EdgeRuntime.open(COND, max_batch=2)
    full = EdgeRuntime.open(COND)
    x = initial_noise(4, (5, 1, 8, 8))
    assert np.allclose(small.finish(Handoff(x, 19, seed=1)), full.finish(Handoff(x, 19, seed=1)), atol=1e-6)


def test_run_levels_is_the_plain_loop():
    """The sampler is exactly: for (t, prev) in timetable: ε̂ = model; step with keyed noise."""
    b = load_bundle(COND)

    def fake(x, t, lab):
        return np.tanh(x * 0.5 + 0.01 * t[:, None, None, None]).astype(np.float32)

    x = initial_noise(0, (2, 1, 8, 8))
    got = run_levels(fake, b.schedule, x, client_timetable(3), seed=9)
    ref = x
    for t, prev in ((2, 1), (1, 0), (0, -1)):
        noise = step_noise(9, t, ref.shape) if t > 0 else None
        ref = ddpm_step(b.schedule, ref, fake(ref, np.full(2, t), None), t, prev, noise)
    assert np.array_equal(got, ref)
    seen = []
    finish(fake, b.schedule, x, 3, callback=lambda i, t, s: seen.append((i, t, s.shape)))
    assert seen == [(0, 2, (2, 1, 8, 8)), (1, 1, (2, 1, 8, 8)), (2, 0, (2, 1, 8, 8))]


@pytest.mark.parametrize("schedule", [Schedule.create(1000), Schedule.create(50, "cosine"),
                                      Schedule.create(100, clip_sample=False)], ids=["linear", "cosine", "noclip"])
@pytest.mark.parametrize("sampler,steps,eta", [("ddpm", None, 0.0), ("ddpm", 9, 0.0), ("ddim", None, 0.0),
                                               ("ddim", 7, 0.0), ("ddim", 7, 1.0), ("ddim", None, 0.5)])
def test_planned_steps_equal_the_schedule_step_bit_for_bit(schedule, sampler, steps, eta):
    """The sampler hoists the per-level coefficients out of its loop; the result must be exactly
    schedule.step's (the one definition of a step, parity-tested against diffusers)."""
    rng = np.random.default_rng(0)
    tt = client_timetable(min(schedule.T, 300), steps)
    for p in plan_steps(schedule, tt, sampler, eta):
        x, e, n = (rng.standard_normal((3, 1, 4, 4)).astype(np.float32) for _ in range(3))
        n = n if p.draws_noise else None
        a = apply_step(p, schedule, x, e, n)
        b = step(sampler, schedule, x, e, p.t, p.prev, n, eta)
        assert a.dtype == b.dtype == np.float32
        assert np.array_equal(a, b), (p.t, p.prev)


def test_noise_drawn_ahead_is_the_keyed_noise():
    from collafuse_edge.noise import StepNoiseAhead

    levels = list(range(9, 0, -1))
    ahead = StepNoiseAhead(3, (2, 1, 4, 4), levels, budget=3 * 2 * 16 * 4)  # blocks of 3 levels
    assert ahead.block == 3
    for lv in levels:
        assert np.array_equal(ahead(lv), step_noise(3, lv, (2, 1, 4, 4)))


def test_local_generation(local):
    out = local.generate_local(3, seed=2)
    assert out.shape == (3, 3, 8, 8)
    ref = local.finish(Handoff(initial_noise(2, (3, 3, 8, 8)), 49, seed=2))
    assert np.array_equal(out, ref)
    fast = local.generate_local(2, seed=2, sampler=SamplerConfig("ddim", steps=5))
    assert fast.shape == (2, 3, 8, 8)


def test_local_generation_refused_for_a_split_bundle(cond):
    with pytest.raises(InputError, match="cut ratio 0.2.*need the server"):
        cond.generate_local(2)


@pytest.mark.parametrize("bad,match", [
    (Handoff(np.zeros((2, 1, 8, 8), np.float32), 18), "level 18 but this bundle's client starts at level 19"),
    (Handoff(np.zeros((2, 1, 16, 16), np.float32), 19), r"shape \[B, 1, 8, 8\]"),
    (Handoff(np.zeros((2, 1, 8, 8), np.int64), 19), "floating point"),
    (Handoff(np.full((1, 1, 8, 8), np.nan, np.float32), 19), "NaN"),
])
def test_bad_handoff_refused(cond, bad, match):
    with pytest.raises(InputError, match=match):
        cond.finish(bad)


@pytest.mark.parametrize("labels,match", [([1], "one per image"), ([0, 10], r"\[0, 9\]"), ([0.5, 1], "integers")])
def test_bad_labels_refused(cond, labels, match):
    with pytest.raises(InputError, match=match):
        cond.finish(Handoff(np.zeros((2, 1, 8, 8), np.float32), 19), labels=labels)


def test_labels_refused_for_an_unconditional_bundle(local):
    with pytest.raises(InputError, match="unconditional"):
        local.generate_local(2, labels=[0, 1])


@pytest.mark.parametrize("kwargs,match", [
    (dict(sampler="euler"), "sampler must be one of"),
    (dict(steps=0), "steps must be a positive integer"),
    (dict(sampler="ddpm", eta=0.5), "eta only applies"),
])
def test_sampler_config_validation(kwargs, match):
    with pytest.raises(InputError, match=match):
        SamplerConfig(**kwargs)


def test_sync_generate_with_a_handoff_source(cond):
    calls = []

    def source(n, labels, seed):
        calls.append((n, labels.tolist(), seed))
        return Handoff(initial_noise(seed, (n, 1, 8, 8)), 19, seed, labels)

    out = cond.generate(3, source, labels=[4, 5, 6], seed=11)
    assert calls == [(3, [4, 5, 6], 11)] and out.shape == (3, 1, 8, 8)


def test_handoff_source_must_return_the_rows_asked_for(cond):
    with pytest.raises(InputError, match="asked for 3 handoff samples, got 2"):
        cond.generate(3, lambda n, lab, s: Handoff(np.zeros((2, 1, 8, 8), np.float32), 19, s))


async def test_async_api(cond, local):
    async def source(n, labels, seed):
        await asyncio.sleep(0)
        return Handoff(initial_noise(seed, (n, 1, 8, 8)), 19, seed, labels)

    a, b = await asyncio.gather(cond.agenerate(2, source, seed=3), cond.agenerate(2, source, seed=3))
    assert np.array_equal(a, b)
    assert np.array_equal(a, cond.generate(2, lambda n, lab, s: Handoff(initial_noise(s, (n, 1, 8, 8)), 19, s, lab), seed=3))
    loc = await local.agenerate(2, seed=1)  # no source: purely local
    assert np.array_equal(loc, local.generate_local(2, seed=1))
    fin = await cond.afinish(Handoff(initial_noise(0, (1, 1, 8, 8)), 19))
    assert fin.shape == (1, 1, 8, 8)
