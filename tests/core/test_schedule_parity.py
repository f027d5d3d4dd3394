"""The numpy schedule maths in collafuse_edge against diffusers' schedulers (docs/architecture.md#the-method)."""
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from collafuse_edge.errors import ScheduleError
from collafuse_edge.schedule import (Schedule, StepResult, ddim_step, ddpm_step, predict_x0, step,
                                     step_coefficients)

CASES = [(1000, "linear"), (1000, "cosine"), (200, "linear"), (50, "cosine")]


def _diffusers_name(name):
    return "squaredcos_cap_v2" if name == "cosine" else name


def _float64(sched, ours):
    """Give a diffusers scheduler our float64 tables so the comparison tests the step formulas,
    not float32 rounding (diffusers builds its tables in float32; test_tables_match covers them)."""
    sched.betas = torch.from_numpy(ours.betas.copy())
    sched.alphas = torch.from_numpy(ours.alphas.copy())
    sched.alphas_cumprod = torch.from_numpy(ours.alphas_cumprod.copy())
    sched.one = torch.tensor(1.0, dtype=torch.float64)
    if hasattr(sched, "final_alpha_cumprod"):
        sched.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)
    return sched


def _fake_eps(x, t):
    # a deterministic stand-in for a model: depends on the sample and the level
    return np.tanh(x * 0.7 + 0.001 * t).astype(x.dtype)


@pytest.mark.parametrize("T,name", CASES)
def test_tables_match(T, name):
    s = Schedule.create(T, name)
    d = DDPMScheduler(num_train_timesteps=T, beta_schedule=_diffusers_name(name))
    assert np.max(np.abs(s.alphas_cumprod - d.alphas_cumprod.double().numpy())) < 1e-6


@pytest.mark.parametrize("T,name", CASES)
def test_add_noise_matches(T, name):
    s = Schedule.create(T, name)
    d = DDPMScheduler(num_train_timesteps=T, beta_schedule=_diffusers_name(name))
    rng = np.random.default_rng(0)
    x0 = rng.uniform(-1, 1, (8, 1, 4, 4)).astype(np.float32)
    n = rng.standard_normal(x0.shape).astype(np.float32)
    t = rng.integers(0, T, 8)
    ours = s.add_noise(x0, n, t)
    ref = d.add_noise(torch.from_numpy(x0), torch.from_numpy(n), torch.from_numpy(t)).numpy()
    assert np.max(np.abs(ours - ref)) < 1e-5
    # torch tensors go through the same code path
    ours_t = s.add_noise(torch.from_numpy(x0), torch.from_numpy(n), torch.from_numpy(t))
    assert isinstance(ours_t, torch.Tensor) and np.max(np.abs(ours_t.numpy() - ref)) < 1e-5


@pytest.mark.parametrize("T,name", CASES)
@pytest.mark.parametrize("start_frac", [1.0, 0.6, 0.2])
@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-5), (np.float32, 1e-3)])
def test_ddpm_full_loop_matches(T, name, start_frac, dtype, tol):
    """Full ancestral loop from a handoff level down to 0, same noise: ≤ 1e-5 in float64.

    In float32 with each side's own tables, both round differently (diffusers builds float32
    tables, we round float64 coefficients) and clipping makes the loop chaotic: measured
    ≤ 3e-4 over 1000 levels, hence 1e-3 there.
    """
    s = Schedule.create(T, name)
    d = DDPMScheduler(num_train_timesteps=T, beta_schedule=_diffusers_name(name))
    if dtype == np.float64:
        _float64(d, s)
    d.set_timesteps(T)
    start = int(round(start_frac * T)) - 1
    x = np.random.default_rng(1).standard_normal((4, 1, 4, 4)).astype(dtype)
    xd = torch.from_numpy(x.copy())
    gen = torch.Generator().manual_seed(3)
    for t in range(start, -1, -1):
        # diffusers draws torch.randn(shape, generator=gen); draw the same numbers for ours
        twin = torch.Generator().set_state(gen.get_state())
        noise = torch.randn(x.shape, generator=twin, dtype=xd.dtype).numpy()
        x = ddpm_step(s, x, _fake_eps(x, t), t, t - 1, noise)
        eps_d = torch.from_numpy(_fake_eps(xd.numpy(), t))
        xd = d.step(eps_d, t, xd, generator=gen).prev_sample.to(xd.dtype)
    assert np.max(np.abs(x - xd.numpy())) < tol


@pytest.mark.parametrize("T,name", CASES)
@pytest.mark.parametrize("steps", [10, 50])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_ddim_full_loop_matches(T, name, steps, dtype):
    s = Schedule.create(T, name)
    d = DDIMScheduler(num_train_timesteps=T, beta_schedule=_diffusers_name(name))
    if dtype == np.float64:
        _float64(d, s)
    d.set_timesteps(steps)
    ts = d.timesteps.numpy()
    rng = np.random.default_rng(2)
    x = rng.standard_normal((4, 1, 4, 4)).astype(dtype)
    xd = torch.from_numpy(x.copy())
    ratio = T // steps
    for t in ts:
        x = ddim_step(s, x, _fake_eps(x, t), int(t), max(int(t) - ratio, -1))
        xd = d.step(torch.from_numpy(_fake_eps(xd.numpy(), t)), int(t), xd).prev_sample.to(xd.dtype)
    assert np.max(np.abs(x - xd.numpy())) < (1e-5 if dtype == np.float64 else 1e-4)


def test_predict_x0_clips():
    s = Schedule.create(100, "linear")
    x = np.full((1, 1, 2, 2), 50.0, np.float32)
    assert predict_x0(s, x, np.zeros_like(x), 10).max() == 1.0


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_step_returns_x0_like_diffusers_pred_original_sample(sampler):
    """``return_x0=True`` gives the sample and x̂0 (diffusers' prev_sample / pred_original_sample);
    the plain call returns the same sample, on numpy arrays and torch tensors alike."""
    T = 200
    s = Schedule.create(T, "linear")
    d = (DDPMScheduler if sampler == "ddpm" else DDIMScheduler)(num_train_timesteps=T)
    _float64(d, s)
    d.set_timesteps(T)
    rng = np.random.default_rng(4)
    x = rng.standard_normal((3, 1, 4, 4))
    t = 120
    eps = _fake_eps(x, t)
    gen = torch.Generator().manual_seed(3)  # diffusers' DDPM draws its noise from it; ours is the same draw
    twin = torch.Generator().set_state(gen.get_state())
    noise = torch.randn(x.shape, generator=twin, dtype=torch.float64).numpy() if sampler == "ddpm" else None
    fn = ddpm_step if sampler == "ddpm" else ddim_step
    out = fn(s, x, eps, t, t - 1, noise, return_x0=True)
    assert isinstance(out, StepResult)
    assert np.array_equal(out.prev_sample, fn(s, x, eps, t, t - 1, noise))
    assert np.array_equal(out.pred_x0, predict_x0(s, x, eps, t))
    kw = {} if sampler == "ddim" else {"generator": gen}
    ref = d.step(torch.from_numpy(eps), t, torch.from_numpy(x), **kw)
    assert np.max(np.abs(out.pred_x0 - ref.pred_original_sample.numpy())) < 1e-9
    assert np.max(np.abs(out.prev_sample - ref.prev_sample.numpy())) < 1e-9
    got = step(sampler, s, torch.from_numpy(x), torch.from_numpy(eps), t, t - 1,
               None if noise is None else torch.from_numpy(noise), return_x0=True)
    assert isinstance(got.prev_sample, torch.Tensor) and isinstance(got.pred_x0, torch.Tensor)
    assert np.array_equal(got.prev_sample.numpy(), out.prev_sample)
    assert np.array_equal(got.pred_x0.numpy(), out.pred_x0)


def test_step_coefficients_are_per_row_and_validated():
    s = Schedule.create(100, "linear")
    c = step_coefficients(s, [50, 10, 0], [49, 5, -1], "ddpm")
    assert c.t.tolist() == [50, 10, 0] and c.prev.tolist() == [49, 5, -1]
    assert c.adds_noise.tolist() == [True, True, False] and c.sigma[2] == 0.0
    assert not step_coefficients(s, [50], [40], "ddim").adds_noise.any()
    assert step_coefficients(s, [50], [40], "ddim", eta=1.0).adds_noise.all()
    for args, match in (((5, 5, "ddpm"), "below"), ((5, 4, "euler"), "unknown sampler"),
                        ((5, 4, "ddim", -1.0), "eta")):
        with pytest.raises(ScheduleError, match=match):
            step_coefficients(s, *args)


def test_predict_x0_without_clipping_inverts_add_noise():
    s = Schedule.create(100, "linear")
    rng = np.random.default_rng(5)
    x0 = rng.uniform(-1, 1, (4, 1, 2, 2))
    n = rng.standard_normal(x0.shape)
    t = np.array([0, 30, 60, 99])
    assert np.allclose(predict_x0(s, s.add_noise(x0, n, t), n, t, clip=False), x0, atol=1e-9)
    far = np.full((1, 1, 2, 2), 50.0)
    assert predict_x0(s, far, np.zeros_like(far), 10, clip=False).max() > 1.0
