"""Server training on several GPUs or nodes with PyTorch DDP, launched by ``torchrun`` (docs/architecture.md).

Trains the shared server model on the disclosures the server has durably queued
(``RUN/server_training/spool``), re-noising each x_h with fresh ε′ every step exactly as the
single-process trainer does (same :func:`collafuse.train.server_update`). Each rank draws its own
rows (generator seeded by seed + rank); DDP averages gradients; rank 0 writes the checkpoint into
``RUN/server_training/`` where ``collafuse serve`` picks it up.

    torchrun --nproc-per-node 8 -m collafuse.distributed --run-dir RUN --steps 10000 --batch-rows 256
    torchrun --nnodes 2 --node-rank R --master-addr HOST --nproc-per-node 8 -m collafuse.distributed --run-dir RUN …

CPU (gloo) works too, which is how the tests run it.
"""
from __future__ import annotations

import argparse
import faulthandler
import os
import sys
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from .checkpoint import model_configs, read_config, read_data_info, save_checkpoint
from .objectives import Disclosure
from .server_training import ServerTrainer, ServerTrainingConfig
from .train import resolve_device, server_update


def _setup(timeout_s: float) -> tuple[int, int, torch.device]:
    if "RANK" not in os.environ:
        raise SystemExit("collafuse.distributed must be launched by torchrun (RANK/WORLD_SIZE are not set)")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", 0))
    timeout = timedelta(seconds=timeout_s)  # a collective whose peer is gone fails after this, never blocks forever
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
        dist.init_process_group("nccl", timeout=timeout)
    else:
        dev = torch.device("cpu")
        dist.init_process_group("gloo", timeout=timeout)
    return rank, world, dev


def _teardown(clean: bool) -> None:
    """Leave the process group. After a clean run every rank has passed the final barrier, so nobody
    is still inside a collective. On an error path there is no barrier (the peers may be blocked in a
    collective this rank will never join, or gone): gloo's teardown is local and is done so its worker
    threads do not outlive the interpreter; NCCL's is collective and would hang, so it is left to the
    process exit (torchrun stops the other ranks)."""
    if not dist.is_initialized():
        return
    if clean or dist.get_backend() == "gloo":
        dist.destroy_process_group()


def train_ddp(run_dir: str, steps: int, batch_rows: int, seed: int = 0, timeout_s: float = 1800.0) -> dict:
    rank, world, dev = _setup(timeout_s)
    clean = False
    try:
        tr = ServerTrainer(run_dir, ServerTrainingConfig(batch_rows=batch_rows, device=str(dev), seed=seed),
                           owner=rank == 0)  # rank 0 writes the checkpoints and holds the run's lock
        pool = tr.spool.all_pending()
        if not pool:
            raise SystemExit(f"no queued disclosures in {tr.spool.pending_dir}; nothing to train on")
        xs = [torch.from_numpy(tr.spool.load(b)) for b in pool]
        levels = [b.level for b in pool]
        labels = [torch.tensor(b.labels) if b.labels is not None else None for b in pool]
        ddp = torch.nn.parallel.DistributedDataParallel(tr.ms.model, device_ids=[dev.index] if dev.type == "cuda" else None)
        ms = tr.ms
        gen = torch.Generator().manual_seed(seed * 1000 + rank)
        per_rank = max(1, batch_rows // world)
        sizes = np.array([x.shape[0] for x in xs])
        flat = np.concatenate([np.stack([np.full(n, i), np.arange(n)], 1) for i, n in enumerate(sizes)])
        losses = []
        orig_model = ms.model
        ms.model = ddp  # server_update calls ms.model(...) through denoise → DDP syncs gradients
        ddp.config = orig_model.config
        for _ in range(steps):
            pick = flat[torch.randint(len(flat), (per_rank,), generator=gen).numpy()]
            ds = []
            for bi, ri in pick:
                lab = labels[bi][ri:ri + 1] if labels[bi] is not None else None
                ds.append(Disclosure(0, levels[bi], xs[bi][ri:ri + 1], lab))
            losses.append(server_update(ms, ds, tr.schedule, tr.cfg, gen, dev))
            tr.step += 1
        ms.model = orig_model
        del ddp  # drop DDP's reducer (and its hold on the process group) before teardown
        # every rank must hold identical weights after DDP
        flat_w = torch.cat([p.detach().flatten() for p in orig_model.parameters()])
        ref = flat_w.clone()
        dist.broadcast(ref, 0)
        in_sync = bool(torch.equal(ref, flat_w))
        dist.barrier()  # the last collective: after it no rank is inside one, so teardown cannot strand a peer
        clean = True
    finally:
        _teardown(clean)
    # Rank 0 writes the checkpoint only now, outside the group: a slow or refused write (fsync on a
    # loaded disk, disk full) can neither hold a peer inside a collective nor leave it waiting on a
    # rank that died; a failure fails rank 0 alone and torchrun reports it.
    if rank == 0:
        save_checkpoint(tr.state_dir, tr.step, [ms], tr.gen.get_state(),
                        extra={"trained": sorted(tr.trained), "trained_rows": tr.trained_rows,
                               "ddp": {"world_size": world, "steps": steps}})
    return {"rank": rank, "world_size": world, "first_loss": losses[0], "last_loss": float(np.mean(losses[-5:])),
            "in_sync": in_sync, "step": tr.step}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m collafuse.distributed", description=__doc__.split("\n\n")[0])
    p.add_argument("--run-dir", dest="run", required=True)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-rows", type=int, default=256, help="global batch (split across ranks)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--report", default=None, help="write each rank's summary as JSON lines here")
    p.add_argument("--timeout", type=float, default=1800.0,
                   help="seconds a collective may wait for its peers before it fails (default 1800)")
    p.add_argument("--watchdog", type=float, default=0.0,
                   help="if > 0: a rank still running after this many seconds prints every thread's stack to "
                        "stderr and exits with status 1 (for tests and CI: a hang becomes a failure with a stack)")
    a = p.parse_args(argv)
    if a.steps < 1 or a.batch_rows < 1:
        p.error("--steps and --batch-rows must be positive")
    if a.timeout <= 0 or a.watchdog < 0:
        p.error("--timeout must be positive and --watchdog not negative")
    if a.watchdog:
        faulthandler.dump_traceback_later(a.watchdog, exit=True)
    res = train_ddp(a.run, a.steps, a.batch_rows, a.seed, a.timeout)
    print(res, flush=True)
    if a.report:
        import json

        with open(f"{a.report}.rank{res['rank']}", "w") as f:
            json.dump(res, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
