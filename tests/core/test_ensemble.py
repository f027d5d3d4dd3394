"""An ensemble-trained member equals the same model trained alone (collafuse.ensemble)."""
from __future__ import annotations

import copy

import pytest
import torch

from collafuse.config import TrainConfig, tiny_preset
from collafuse.ensemble import Ensemble
from collafuse.errors import InputError
from collafuse.models import build_unet
from collafuse.train import apply_update, new_model_state

# fp32: vmap turns each convolution of E members into one grouped convolution, which sums in
# another order; Adam divides by √v, so a rounding difference in a near-zero gradient can move a
# weight by up to ~lr. After 6 steps at lr 2e-3 the weights agree to this tolerance (measured max
# |Δ| 2e-5), while training moved them by more than 50× as much.
ATOL = 1e-4


def _batches(steps: int, E: int, B: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        yield (torch.randn(E, B, 1, 16, 16, generator=g), torch.randint(0, 1000, (E, B), generator=g),
               torch.randint(0, 10, (E, B), generator=g), torch.randn(E, B, 1, 16, 16, generator=g),
               torch.rand(E, B, generator=g) + 0.1)


@pytest.mark.parametrize("weighted", [False, True])
def test_member_equals_model_trained_alone(weighted):
    torch.manual_seed(0)
    tcfg = TrainConfig(lr=2e-3, ema_decay=0.99, grad_clip=0.05)  # a small clip: the per-member clip acts
    mcfg = tiny_preset(16, 1, 10)
    models = [build_unet(mcfg) for _ in range(3)]
    ens = Ensemble(models, lr=tcfg.lr, weight_decay=tcfg.weight_decay, ema_decay=tcfg.ema_decay,
                   grad_clip=tcfg.grad_clip)
    alone = []
    for m in models:
        ms = new_model_state("m", mcfg, tcfg, "cpu")
        ms.model.load_state_dict(m.state_dict())
        ms.ema.shadow_params = [p.clone().detach() for p in ms.model.parameters()]
        alone.append(ms)
    for x, t, y, target, w in _batches(6, 3, 8, seed=1):
        ens.step(x, t, y, target, w if weighted else None)
        for i, ms in enumerate(alone):
            pred = ms.model(x[i], t[i], class_labels=y[i]).sample
            per_row = ((pred - target[i]) ** 2).flatten(1).mean(1)
            loss = (w[i] * per_row).sum() / w[i].sum() if weighted else per_row.mean()
            apply_update(ms, loss, tcfg.grad_clip)
    for i, ms in enumerate(alone):
        raw = ens.member_state(i, ema=False)
        moved = 0.0
        for name, p in ms.model.named_parameters():
            assert torch.allclose(raw[name], p.detach(), atol=ATOL, rtol=0), (name, float((raw[name] - p.detach()).abs().max()))
            moved = max(moved, float((p.detach() - models[i].state_dict()[name]).abs().max()))
        assert moved > 50 * ATOL  # the models did train, by far more than the tolerance
        ema_model = ens.member_model(i, ema=True)
        ref = copy.deepcopy(ms.model)
        ms.ema.copy_to(ref.parameters())
        for (name, a), b in zip(ema_model.named_parameters(), ref.parameters()):
            assert torch.allclose(a, b, atol=ATOL, rtol=0), name


def test_average_and_member_checks():
    torch.manual_seed(0)
    mcfg = tiny_preset(16, 1, 10)
    models = [build_unet(mcfg) for _ in range(3)]
    ens = Ensemble(models)
    ens.average_([0, 2], [0.25, 0.75])
    s0, s2 = ens.member_state(0, ema=False), ens.member_state(2, ema=False)
    for name, p in models[0].named_parameters():
        want = 0.25 * p.detach() + 0.75 * dict(models[2].named_parameters())[name].detach()
        assert torch.allclose(s0[name], want, atol=1e-6) and torch.equal(s0[name], s2[name])
    other = build_unet(tiny_preset(16, 1, None))
    with pytest.raises(InputError, match="architecture"):
        Ensemble([models[0], other])
    with pytest.raises(InputError, match="member"):
        ens.member_state(3)
    with pytest.raises(InputError, match=r"\[E=3"):
        ens.forward(torch.zeros(2, 4, 1, 16, 16), torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long))
