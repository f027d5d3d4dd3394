"""The `exact` server objective is unbiased; `double-noise` is not (docs/architecture.md#the-method, training step 3)."""
import numpy as np
import pytest
import torch

from collafuse.objectives import client_loss, disclose, exact_scale, server_batch, server_loss
from collafuse_edge.schedule import Schedule

MU, SIGMA = 0.5, 0.3  # x0 ~ N(MU, SIGMA²) per pixel: the posterior is known in closed form
T, K = 20, 8  # server levels 8 … 19, handoff level h = 7


def _schedule():
    return Schedule.create(T, "linear", beta_start=0.01, beta_end=0.3)


def analytic_eps(s: Schedule, t: int):
    """E[ε | x_t] = a_t·x_t + b_t for Gaussian data."""
    ab = s.alphas_cumprod[t]
    a = np.sqrt(1 - ab) / (ab * SIGMA**2 + 1 - ab)
    return a, -a * np.sqrt(ab) * MU


class PerLevelAffine(torch.nn.Module):
    """ε̂(x, t) = a[t]·x + b[t]: flexible enough to represent E[ε|x_t] exactly at every level."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Parameter(torch.zeros(T))
        self.b = torch.nn.Parameter(torch.zeros(T))

    def forward(self, x, t, labels=None):
        return self.a[t].view(-1, 1, 1, 1) * x + self.b[t].view(-1, 1, 1, 1)


def _train_server(objective: str, weighting: str = "eps-prime", steps: int = 600) -> PerLevelAffine:
    s = _schedule()
    gen = torch.Generator().manual_seed(0)
    model = PerLevelAffine()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        x0 = MU + SIGMA * torch.randn(4096, 1, 2, 2, generator=gen)
        d = disclose(0, x0, None, K, s, objective, gen, share_labels=False)
        assert d.x.shape == x0.shape and d.level == K - 1 and d.eps is None  # only x_h crosses
        batch = server_batch([d], s, objective, gen, weighting)
        assert int(batch.t.min()) >= K
        loss = server_loss(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return model


def _error(model: PerLevelAffine) -> float:
    """RMS over server levels of the coefficient error (a, b) against the analytic posterior."""
    s = _schedule()
    errs = []
    for t in range(K, T):
        a, b = analytic_eps(s, t)
        errs += [float(model.a[t]) - a, float(model.b[t]) - b]
    return float(np.sqrt(np.mean(np.square(errs))))


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    return {
        "exact": _error(_train_server("exact")),
        "exact-eps": _error(_train_server("exact", "eps")),
        "double-noise": _error(_train_server("double-noise")),
    }


def test_exact_converges_to_posterior(trained):
    assert trained["exact"] < 0.03, trained
    assert trained["exact-eps"] < 0.05, trained  # unweighted: same minimiser, noisier


def test_double_noise_is_biased(trained):
    assert trained["double-noise"] > 0.1, trained
    assert trained["exact"] < trained["double-noise"] / 5, trained


def test_exact_scale_is_one_for_clean_disclosure():
    s = _schedule()
    t = np.arange(0, T)
    assert np.allclose(exact_scale(s, t, np.full(T, -1)), 1.0)
    # next to the handoff level the unweighted target's std explodes
    assert exact_scale(s, np.array([K]), np.array([K - 1]))[0] > 1.5


def test_disclosure_edge_cases():
    s = _schedule()
    gen = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 1, 2, 2)
    assert disclose(0, x0, None, T, s, "exact", gen, False) is None  # c = 1: nothing leaves
    d = disclose(0, x0, torch.arange(4), 0, s, "exact", gen, True)  # c = 0: full disclosure
    assert d.level == -1 and torch.equal(d.x, x0) and d.labels.tolist() == [0, 1, 2, 3]
    d = disclose(0, x0, torch.arange(4), 5, s, "exact", gen, False)
    assert d.labels is None  # labels stay home unless shared
    with pytest.warns(UserWarning, match="recovers every client"):
        d = disclose(0, x0, None, 5, s, "shared-noise", gen, False)
    x0_rec = s.add_noise(d.x, -d.eps * 0, d.t)  # noqa: the server can invert exactly:
    ab = torch.from_numpy(s.alphas_cumprod[d.t.numpy()]).float().view(-1, 1, 1, 1)
    rec = (d.x - (1 - ab).sqrt() * d.eps) / ab.sqrt()
    assert torch.allclose(rec, x0, atol=1e-5)
    del x0_rec


def test_client_loss_uses_only_client_levels():
    s = _schedule()
    seen = []

    def eps_fn(x, t, lab):
        seen.append(t)
        return torch.zeros_like(x)

    client_loss(eps_fn, torch.rand(64, 1, 2, 2), None, 3, s, torch.Generator().manual_seed(0))
    t = torch.cat(seen)
    assert int(t.min()) >= 0 and int(t.max()) <= 2
