"""FedAvg/FedProx baseline (collafuse.fedavg): exact averaging, data-size weights, the one-client
and μ = 0 reductions, determinism and the cost record. Tiny models, a 50-level schedule, seconds."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import collafuse.fedavg as fedavg
from collafuse.checkpoint import model_configs
from collafuse.config import DataConfig, RunConfig, ScheduleConfig, TrainConfig, tiny_preset
from collafuse.cost import FLOPS
from collafuse.data import load_dataset, partition
from collafuse.errors import ConfigError, InputError
from collafuse.fedavg import FedAvgConfig, average_state, client_weights, proximal_grad_, train_fedavg
from collafuse.models import build_unet
from collafuse.train import SplitTrainer

SCHED = ScheduleConfig(50).build()
MCFG = tiny_preset(num_classes=10)


@pytest.fixture(scope="module")
def parts():
    return partition(load_dataset("digits", 16), DataConfig("digits", 16, 3, "dirichlet:0.5", 0.2, 0))


@pytest.fixture(scope="module")
def base(parts):
    """FedAvg with the default test settings (4 steps, R = 2), trained once for several tests."""
    return train_fedavg(parts, MCFG, SCHED, config=_cfg())


def _cfg(**kw) -> FedAvgConfig:
    base = dict(steps=4, local_steps=2, batch_size=4, lr=2e-3, ema_decay=0.9, seed=0)
    base.update(kw)
    return FedAvgConfig(**base)


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


# ------------------------------------------------------------------------------ averaging


def test_average_state_is_the_weighted_mean_in_float64():
    g = torch.Generator().manual_seed(1)
    states = [{"w": torch.randn(5, 3, generator=g), "b": torch.randn(3, generator=g).double(),
               "n": torch.tensor([7])} for _ in range(3)]
    w = [0.2, 0.5, 0.3]
    avg = average_state(states, w)
    for key in ("w", "b"):
        want = sum(wi * s[key].double().numpy() for s, wi in zip(states, w))
        assert avg[key].dtype == states[0][key].dtype
        np.testing.assert_allclose(avg[key].double().numpy(), want, rtol=0, atol=1e-7 if key == "w" else 1e-15)
    assert torch.equal(avg["n"], torch.tensor([7]))
    # identical clients average to themselves bit for bit, whatever the weights
    same = average_state([states[0]] * 3, w)
    assert all(torch.equal(same[k], states[0][k]) for k in states[0])


def test_average_state_refuses_bad_input():
    s = {"w": torch.ones(2)}
    with pytest.raises(InputError, match="sum to 1"):
        average_state([s, s], [0.5, 0.6])
    with pytest.raises(InputError, match="2 client states"):
        average_state([s, s], [1.0])
    with pytest.raises(InputError, match="different tensors"):
        average_state([s, {"v": torch.ones(2)}], [0.5, 0.5])
    with pytest.raises(InputError, match="cannot be averaged"):
        average_state([{"n": torch.tensor([1])}, {"n": torch.tensor([2])}], [0.5, 0.5])


def test_client_weights():
    assert client_weights([100, 300]) == [0.25, 0.75]
    assert client_weights([100, 300], "uniform") == [0.5, 0.5]
    with pytest.raises(ConfigError, match="weighting"):
        client_weights([1], "median")


def test_the_server_averages_by_data_size(parts, monkeypatch):
    seen = []
    real = fedavg.average_state

    def spy(states, weights):
        seen.append(([{k: v.clone() for k, v in s.items()} for s in states], list(weights)))
        return real(states, weights)

    monkeypatch.setattr(fedavg, "average_state", spy)
    res = train_fedavg(parts, MCFG, SCHED, config=_cfg())
    n = [len(p.train_labels) for p in parts]
    assert len(set(n)) == 3  # the Dirichlet split gives unequal sizes, so the weights matter
    assert len(seen) == 2  # 4 steps, R = 2
    states, w = seen[-1]
    assert w == pytest.approx([x / sum(n) for x in n], abs=0)
    assert res.cost.examples == tuple(n) and res.cost.weights == tuple(w)
    # the clients really differ before averaging, and the global model is their weighted mean
    key = "conv_in.weight"
    assert not torch.equal(states[0][key], states[1][key])
    want = sum(wi * s[key].double() for s, wi in zip(states, w)).float()
    assert torch.equal(res.global_raw.state_dict()[key], want)
    # a uniform average is a different model
    uni = train_fedavg(parts, MCFG, SCHED, config=_cfg(weighting="uniform"))
    assert not _same(uni.global_raw, res.global_raw)


# ------------------------------------------------------------------------------ reductions


@pytest.mark.parametrize("local_steps", [1, 3])
def test_one_client_fedavg_is_local_training(tmp_path, local_steps):
    """One client: FedAvg is the purely local training of SplitTrainer at c = 1, bit for bit
    (raw weights for any R; the EMA too when R = 1, where both take one EMA step per step)."""
    cfg = RunConfig(data=DataConfig("digits", 16, 1, "iid", 0.2, 0), schedule=ScheduleConfig(50),
                    cut_ratios=(1.0,), client_model=tiny_preset(), server_model=tiny_preset(),
                    train=TrainConfig(steps=6, batch_size=4, lr=2e-3, ema_decay=0.9, device="cpu", seed=3,
                                      checkpoint_every=100))
    tr = SplitTrainer(cfg, str(tmp_path / "run"))
    init = {k: v.clone() for k, v in tr.client(0).model.state_dict().items()}
    ccfg, _ = model_configs(cfg, tr.data_info)
    for _ in range(6):
        tr.train_step()
    res = train_fedavg(tr.clients_data, ccfg, tr.schedule, config=_cfg(steps=6, local_steps=local_steps, seed=3),
                       init=init)
    assert _same(res.global_raw, tr.client(0).model)
    if local_steps == 1:
        local_ema = build_unet(ccfg)
        tr.client(0).ema.copy_to(local_ema.parameters())
        assert _same(res.models[0], local_ema)


def test_fedprox_mu_zero_is_fedavg_and_mu_pulls_clients_together(parts, base):
    prox0 = train_fedavg(parts, MCFG, SCHED, config=_cfg(), mu=0.0)
    assert _same(base.global_raw, prox0.global_raw) and _same(base.models[0], prox0.models[0])
    strong = train_fedavg(parts, MCFG, SCHED, config=_cfg(steps=3, local_steps=3, mu=1e3))
    plain = train_fedavg(parts, MCFG, SCHED, config=_cfg(steps=3, local_steps=3))
    assert not _same(strong.global_raw, plain.global_raw)
    # one round of 3 local steps from the same global model: the proximal term holds the clients together
    assert strong.history[0]["drift"] < 0.5 * plain.history[0]["drift"]


def test_proximal_gradient_is_the_gradient_of_the_proximal_term():
    torch.manual_seed(0)
    m = torch.nn.Linear(4, 3)
    anchor = [p.detach() + torch.randn_like(p) for p in m.parameters()]
    mu, x = 0.37, torch.randn(5, 4)
    m(x).square().mean().backward()
    plain = [p.grad.clone() for p in m.parameters()]
    proximal_grad_(m, anchor, mu)
    assert not any(torch.equal(p.grad, g) for p, g in zip(m.parameters(), plain))
    ref = torch.nn.Linear(4, 3)
    ref.load_state_dict(m.state_dict())
    prox = sum(((p - a) ** 2).sum() for p, a in zip(ref.parameters(), anchor))
    (ref(x).square().mean() + mu / 2 * prox).backward()
    for p, q in zip(m.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------ determinism, cost, input


def test_deterministic_given_the_seed(parts, base):
    a = base
    b = train_fedavg(parts, MCFG, SCHED, config=_cfg())
    c = train_fedavg(parts, MCFG, SCHED, config=_cfg(), seed=1)
    assert _same(a.models[1], b.models[1]) and _same(a.global_raw, b.global_raw)
    assert not _same(a.global_raw, c.global_raw)
    assert [h["loss"] for h in a.history] == [h["loss"] for h in b.history]
    # every client ends with the global EMA model
    assert all(_same(m, a.models[0]) for m in a.models[1:]) and a.models[0] is not a.models[1]


def test_cost_record(parts):
    res = train_fedavg(parts, MCFG, SCHED, config=_cfg(steps=5, local_steps=2))
    c = res.cost
    params = sum(p.numel() for p in res.global_raw.parameters())
    assert c.params == params and c.rounds == 3 and len(res.history) == 3
    assert res.history[-1]["step"] == 5
    assert c.bytes_up_per_round == c.bytes_down_per_round == 4 * params  # UNet2DModel has no float buffers
    assert c.bytes_total == 2 * 4 * params * 3 and c.bytes_per_step == pytest.approx(c.bytes_total / 5)
    assert c.train_flops_per_example == FLOPS.train(res.global_raw) > 0
    assert c.train_flops_per_step == 4 * c.train_flops_per_example
    assert c.train_flops_total == 5 * c.train_flops_per_step
    assert all(w > 0 for w in c.wall_s) and c.wall_s_total >= sum(c.wall_s)


def test_bad_input_is_refused(parts):
    with pytest.raises(ConfigError, match="local_steps"):
        FedAvgConfig(steps=4, local_steps=0)
    with pytest.raises(ConfigError, match="mu"):
        FedAvgConfig(steps=4, mu=-1.0)
    with pytest.raises(ConfigError, match="ema_decay"):
        FedAvgConfig(steps=4, ema_decay=1.0)
    with pytest.raises(ConfigError, match="give steps"):
        train_fedavg(parts, MCFG, SCHED)
    with pytest.raises(InputError, match="at least one"):
        train_fedavg([], MCFG, SCHED, steps=2)
    with pytest.raises(InputError, match="model takes"):
        train_fedavg(parts, tiny_preset(sample_size=8, num_classes=10), SCHED, steps=2)
    with pytest.raises(InputError, match="ClientData"):
        train_fedavg([np.zeros((2, 1, 16, 16))], MCFG, SCHED, steps=2)
