from collafuse.config import DataConfig, RunConfig, ScheduleConfig, TrainConfig, tiny_preset


def tiny_run_config(steps: int = 4, objective: str = "exact", **kw) -> RunConfig:
    """A seconds-long 3-client run on the digits with tiny models and a 50-level schedule."""
    return RunConfig(
        data=DataConfig("digits", 16, 3, "by-label", 0.2, 0),
        schedule=ScheduleConfig(50),
        cut_ratios=kw.pop("cut_ratios", (0.6, 0.4, 0.8)),
        client_model=tiny_preset(),
        server_model=tiny_preset(),
        objective=objective,
        train=TrainConfig(steps=steps, batch_size=8, checkpoint_every=kw.pop("checkpoint_every", 2), log_every=1,
                          device="cpu", seed=kw.pop("seed", 0)),
        **kw,
    )
