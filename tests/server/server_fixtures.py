"""Helpers of the server tests: a tiny run config (T=50, three clients at different cut ratios),
tokens, and the in-process reference sampler."""
from __future__ import annotations

import numpy as np

from collafuse.config import DataConfig, RunConfig, ScheduleConfig, TrainConfig, tiny_preset
from collafuse.serve_process import ServeProcess as _ServeProcess
from collafuse.serve_process import free_port
from collafuse.server.config import TokenEntry, hash_token

T = 50
CUT_RATIOS = (0.6, 0.4, 0.8)  # k = 30, 20, 40 → handoff levels 29, 19, 39
TOKENS = {i: f"test-token-client-{i}" for i in range(len(CUT_RATIOS))}
LIMITED_TOKEN = "test-token-limited"  # client 0, max_n 2, 2 requests per minute, 5 images a day
DISABLED_TOKEN = "test-token-disabled"


def run_config() -> RunConfig:
    return RunConfig(
        data=DataConfig("digits", 16, 3, "by-label", 0.2, 0),
        schedule=ScheduleConfig(T),
        cut_ratios=CUT_RATIOS,
        client_model=tiny_preset(),
        server_model=tiny_preset(),
        train=TrainConfig(steps=4, batch_size=8, checkpoint_every=4, log_every=1, device="cpu"),
    )


def token_entries() -> tuple[TokenEntry, ...]:
    out = [TokenEntry(hash_token(tok), client=i, name=f"client-{i}") for i, tok in TOKENS.items()]
    out.append(TokenEntry(hash_token(LIMITED_TOKEN), client=0, name="limited", max_n=2,
                          requests_per_minute=2, burst=2, images_per_day=5))
    out.append(TokenEntry(hash_token(DISABLED_TOKEN), client=1, name="revoked", disabled=True))
    return tuple(out)


def token_toml() -> str:
    lines = ["[server]", "max_n = 8", "max_batch_rows = 64", ""]
    for i, tok in TOKENS.items():
        lines += ["[[tokens]]", f'name = "client-{i}"', f"client = {i}", f'sha256 = "{hash_token(tok)}"', ""]
    return "\n".join(lines)


def auth(client: int = 0) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS[client]}"}


def labels_for(n: int, offset: int = 0) -> list[int]:
    return [int(v) for v in (np.arange(n) + offset) % 10]


def reference_handoff(run, client: int, n: int, labels, seed: int, sampler="ddpm", steps=None) -> np.ndarray:
    """The in-process reference: collafuse.sampling.split_sample's handoff with the same seed."""
    from collafuse.sampling import split_sample

    k = run.config.client_levels[client]
    out = split_sample(run.server, None if k == 0 else run.clients[client], run.schedule, k, n,
                       shape=(run.data.channels, run.data.image_size, run.data.image_size),
                       labels=labels, server_labels=labels, sampler=sampler, server_steps=steps,
                       client_steps=None, seed=seed)
    return out.handoff.numpy()


class ServeProcess(_ServeProcess):
    """A real ``collafuse serve`` process on loopback (one torch thread), ready (``/readyz`` 200)
    when constructed. ``port`` None picks a free one; a restart may pass the old one.
    ``start_s``: seconds to ready."""

    def __init__(self, run_dir: str, config: str, *extra: str, port: int | None = None, timeout: float = 120):
        super().__init__(run_dir, config, *extra, port=port, threads=1, env={"OMP_NUM_THREADS": "1"},
                         timeout=timeout)
        self.wait_ready()

    def stop(self) -> tuple[int, str]:
        """SIGTERM (graceful drain), SIGKILL after 60 s; returns (exit code, output)."""
        return super().stop(), self.output()
