"""Disclose once: one keyed x_h per image, reused every epoch — secret kept on the site, the draws
fixed per (image, level, secret), the `exact` objective still unbiased, and both trainers wired
(docs/privacy.md)."""
from __future__ import annotations

import io
import os
import stat

import numpy as np
import pytest
import torch

from collafuse.errors import ConfigError
from collafuse.objectives import disclose, server_batch, server_loss
from collafuse.privacy_once import SECRET_FILE, OnceNoise, load_or_create_secret

from test_objectives import K, MU, SIGMA, PerLevelAffine, _error, _schedule


def test_the_secret_is_created_private_and_reused(tmp_path):
    key = load_or_create_secret(str(tmp_path))
    path = tmp_path / SECRET_FILE
    assert len(key) == 32 and stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert load_or_create_secret(str(tmp_path)) == key  # a resumed run keeps its draws
    path.write_text("not hex\n")
    with pytest.raises(ConfigError, match="restore it"):
        load_or_create_secret(str(tmp_path))


def test_the_noise_is_fixed_per_image_level_and_secret():
    rng = np.random.default_rng(0)
    imgs = rng.uniform(-1, 1, (50, 1, 4, 4)).astype(np.float32)
    a, b = OnceNoise(imgs, b"a" * 32), OnceNoise(imgs, b"b" * 32)
    idx = torch.tensor([3, 7, 3, 49])
    n1 = a.noise(idx, 10)
    assert n1.shape == (4, 1, 4, 4) and n1.dtype == torch.float32
    assert torch.equal(n1[0], n1[2])  # the same image drawn twice in a batch: one draw
    assert torch.equal(n1, a.noise(idx, 10))  # and every epoch
    assert not torch.equal(n1[0], n1[1])
    assert not torch.equal(n1, b.noise(idx, 10))  # another secret: other draws
    assert not torch.equal(n1, a.noise(idx, 11))  # another level: independent, never the same ε twice
    # the same pixels at another index get the same draw (keyed by content, not position)
    assert torch.equal(OnceNoise(imgs[[7, 3]], b"a" * 32).noise(torch.tensor([1]), 10)[0], n1[0])
    z = a.noise(torch.arange(50), 5).numpy()
    assert abs(z.mean()) < 0.1 and abs(z.std() - 1) < 0.1


def test_exact_objective_stays_unbiased_with_disclose_once():
    """The closed-form check of test_objectives, with a fixed pool of images whose x_h is drawn once
    (keyed) and reused every step while the server adds its own fresh forward noise: the trained
    per-level affine ε̂ converges to the analytic E[ε | x_t] of the Gaussian data."""
    s = _schedule()
    gen = torch.Generator().manual_seed(1)
    pool = MU + SIGMA * torch.randn(20000, 1, 2, 2, generator=gen)
    once = OnceNoise(pool.numpy(), b"k" * 32)
    eps_pool = once.noise(torch.arange(len(pool)), K - 1)
    x_h_pool = s.add_noise(pool, eps_pool, K - 1)
    ab = s.alphas_cumprod[K - 1]
    # the disclosed set has the marginal of fresh disclosures
    assert abs(float(x_h_pool.mean()) - np.sqrt(ab) * MU) < 0.01
    assert abs(float(x_h_pool.var()) - (ab * SIGMA**2 + 1 - ab)) < 0.02
    model = PerLevelAffine()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    steps = 600
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        idx = torch.randint(len(pool), (4096,), generator=gen)
        d = disclose(0, pool[idx], None, K, s, "exact", gen, False, once.noise(idx, K - 1))
        assert torch.allclose(d.x, x_h_pool[idx], atol=1e-6)  # the same x_h every time the image is drawn
        loss = server_loss(model, server_batch([d], s, "exact", gen))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    err = _error(model)
    assert err < 0.04, err


def test_split_trainer_sends_one_x_h_per_image(tmp_path, monkeypatch):
    import collafuse.train as train_mod
    from collafuse.config import replace
    from tiny_runs import tiny_run_config

    seen: dict[tuple[int, bytes], list[np.ndarray]] = {}
    real = train_mod.disclose

    def spy(client, x0, labels, k, schedule, objective, gen, share, noise=None):
        d = real(client, x0, labels, k, schedule, objective, gen, share, noise)
        if d is not None:
            for row0, row in zip(x0.numpy(), d.x.numpy()):
                seen.setdefault((client, row0.tobytes()), []).append(row)
        return d

    monkeypatch.setattr(train_mod, "disclose", spy)
    for mode in ("once", "fresh"):
        seen.clear()
        cfg = tiny_run_config(steps=2, disclose=mode)
        cfg = replace(cfg, train=replace(cfg.train, batch_size=64))  # 128 draws of ~480 images: repeats
        run = tmp_path / mode
        train_mod.train(cfg, str(run), progress=False)
        repeats = [v for v in seen.values() if len(v) > 1]
        assert repeats, "the tiny run should draw some image twice"
        same = all(all(np.array_equal(v[0], w) for w in v[1:]) for v in repeats)
        assert same == (mode == "once"), mode
        assert (run / SECRET_FILE).exists() == (mode == "once")
    with pytest.raises(ConfigError, match="shared-noise"):
        tiny_run_config(objective="shared-noise", disclose="once")
    with pytest.raises(ConfigError, match="disclose"):
        tiny_run_config(disclose="twice")


def test_client_train_uploads_one_x_h_per_image(tmp_path):
    from collafuse.client_train import ClientTrainConfig, ClientTrainer
    from collafuse.config import DataConfig, ScheduleConfig, TrainConfig, tiny_preset

    uploads: list[np.ndarray] = []

    async def transport(method, path, headers, body):
        if path == "/v1/info":
            return 200, {"schedule": ScheduleConfig(100, "linear").build().to_dict(), "image_shape": [1, 16, 16],
                         "num_classes": 10, "server_conditioning": "none",
                         "you": {"client_levels": 60, "handoff_level": 59, "cut_ratio": 0.6}}
        uploads.append(np.load(io.BytesIO(body), allow_pickle=False))
        return 200, {}

    for mode in ("once", "fresh"):
        uploads.clear()
        out = tmp_path / mode
        cc = ClientTrainConfig(out=str(out), server="http://127.0.0.1:9", token="t",
                               data=DataConfig("digits", 16, 12, "iid", 0.2, 0), model=tiny_preset(),
                               train=TrainConfig(steps=3, batch_size=4, device="cpu", checkpoint_every=3),
                               upload_batch=64, disclose=mode)
        tr = ClientTrainer(cc, transport=transport)
        try:
            n_images = len(tr.y)
            tr.run(progress=False)
        finally:
            tr.close()
        rows = np.concatenate(uploads).reshape(-1, 256)
        distinct = len(np.unique(rows, axis=0))
        assert len(rows) == 192 > n_images
        if mode == "once":
            assert distinct <= n_images  # every upload of an image is the same x_h
            assert stat.S_IMODE(os.stat(out / SECRET_FILE).st_mode) == 0o600
        else:
            assert distinct == len(rows) and not (out / SECRET_FILE).exists()
    with pytest.raises(ConfigError, match="--disclose"):
        ClientTrainConfig(out=str(tmp_path / "x"), server="http://h:1", token="t", disclose="sometimes")
