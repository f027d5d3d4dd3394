"""Split sampling equals unsplit sampling with the same model on both sides (docs/architecture.md#the-method)."""
import numpy as np
import pytest
import torch

from collafuse.config import tiny_preset
from collafuse.models import build_unet
from collafuse.sampling import run_levels, split_sample
from collafuse_edge.noise import initial_noise
from collafuse_edge.schedule import (Schedule, Timetable, client_level_count, client_timetable,
                                     server_timetable)

T = 100


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_unet(tiny_preset(num_classes=3)).eval()


@pytest.mark.parametrize("sampler,steps", [("ddpm", (None, None)), ("ddim", (12, 7))])
@pytest.mark.parametrize("c", [0.0, 0.2, 1.0])
def test_split_equals_unsplit(model, sampler, steps, c):
    s = Schedule.create(T, "linear")
    k = client_level_count(c, T)
    labels = np.array([0, 1, 2, 1])
    out = split_sample(model, model, s, k, 4, shape=(1, 16, 16), labels=labels, server_labels=labels,
                       sampler=sampler, server_steps=steps[0], client_steps=steps[1], seed=7)
    assert out.handoff_level == k - 1
    st, ct = server_timetable(T, k, steps[0]), client_timetable(k, steps[1])
    full = Timetable(np.concatenate([st.levels, ct.levels]), end=-1)
    if len(st):
        assert st.pairs()[-1][1] == k - 1  # the server's last step lands on the handoff level
    if len(ct):
        assert ct.levels[0] == k - 1  # the client's first step starts there
    x = torch.from_numpy(initial_noise(7, (4, 1, 16, 16)))
    ref = run_levels(model, s, x, full, labels, sampler=sampler, seed=7)
    assert torch.max(torch.abs(out.images - ref)) <= 1e-5
    if c == 1.0:
        assert torch.equal(out.handoff, x)  # the server did nothing
    if c == 0.0:
        assert torch.equal(out.handoff, out.images)  # the client did nothing


def test_timetables_hit_handoff_exactly():
    for k in (1, 2, 37, 99, 100):
        for steps in (1, 3, 10, None):
            st = server_timetable(T, k, steps)
            ct = client_timetable(k, steps)
            if k < T:
                assert st.levels[0] == T - 1 and st.end == k - 1
                if steps is None or steps >= 2:
                    assert st.levels[-1] == k
            else:
                assert len(st) == 0
            assert ct.levels[0] == k - 1 and ct.end == -1
            assert steps is None or len(ct) <= steps


def test_same_seed_same_images(model):
    s = Schedule.create(T, "linear")
    a = split_sample(model, model, s, 30, 2, shape=(1, 16, 16), labels=[0, 1], server_labels=[0, 1], seed=3)
    b = split_sample(model, model, s, 30, 2, shape=(1, 16, 16), labels=[0, 1], server_labels=[0, 1], seed=3)
    c = split_sample(model, model, s, 30, 2, shape=(1, 16, 16), labels=[0, 1], server_labels=[0, 1], seed=4)
    assert torch.equal(a.images, b.images) and not torch.equal(a.images, c.images)
