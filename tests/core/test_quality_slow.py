"""A 3000-step client-size run on the digits produces recognisable digits.

Slow (≈20-30 min on 2 cores): `pytest -m slow tests/core/test_quality_slow.py`. "Recognisable" is
measured, not eyeballed: the project's digit classifier (≈99 % test accuracy on real digits) must
read the label the samples were conditioned on for most of them. The grid is written to
docs/img/digits_3000_steps.png when COLLAFUSE_WRITE_DOCS=1.
"""
import os

import numpy as np
import pytest

from collafuse.config import DataConfig, RunConfig, ScheduleConfig, TrainConfig, client_preset


@pytest.mark.slow
def test_3000_step_client_run_makes_digits(tmp_path):
    from collafuse.checkpoint import load_run
    from collafuse.data import load_digits
    from collafuse.generate import SampleConfig, sample_client, to_numpy
    from collafuse.metrics import train_feature_classifier
    from collafuse.train import train

    cfg = RunConfig(
        data=DataConfig("digits", 16, 1, "iid", 0.2, 0),
        schedule=ScheduleConfig(1000),
        cut_ratios=(1.0,),  # purely local: the client model does every level
        client_model=client_preset(),
        server_model=client_preset(),
        train=TrainConfig(steps=3000, batch_size=64, lr=1e-3, ema_decay=0.995, device="auto", log_every=100,
                          checkpoint_every=3000),
    )
    train(cfg, str(tmp_path / "run"), progress=False)
    run = load_run(str(tmp_path / "run"))
    labels = np.repeat(np.arange(10), 10)
    imgs = to_numpy(sample_client(run, 0, SampleConfig(n=100, sampler="ddim", client_steps=50), labels=labels).images)
    ds = load_digits(16)
    clf = train_feature_classifier(ds.images, ds.labels, 10, seed=0, progress=False)
    acc = float(np.mean(clf.predict(imgs) == labels))
    if os.environ.get("COLLAFUSE_WRITE_DOCS"):
        from collafuse_edge.images import save_images

        save_images(os.path.join(os.path.dirname(__file__), "..", "..", "docs", "img", "digits_3000_steps.png"), imgs)
    print(f"classifier reads the conditioned label on {acc:.1%} of the samples")
    assert acc >= 0.8
