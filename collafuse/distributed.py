"""Server training on several GPUs or nodes with PyTorch DDP, launched by ``torchrun`` (SPEC §8).

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
import os
import sys

import numpy as np
import torch
import torch.distributed as dist

from .checkpoint import model_configs, read_config, read_data_info, save_checkpoint
from .objectives import Disclosure
from .server_training import ServerTrainer, ServerTrainingConfig
from .train import resolve_device, server_update


def _setup() -> tuple[int, int, torch.device]:
    if "RANK" not in os.environ:
        raise SystemExit("collafuse.distributed must be launched by torchrun (RANK/WORLD_SIZE are not set)")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
        dist.init_process_group("nccl")
    else:
        dev = torch.device("cpu")
        dist.init_process_group("gloo")
    return rank, world, dev


def train_ddp(run_dir: str, steps: int, batch_rows: int, seed: int = 0) -> dict:
    rank, world, dev = _setup()
    try:
        tr = ServerTrainer(run_dir, ServerTrainingConfig(batch_rows=batch_rows, device=str(dev), seed=seed))
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
        if rank == 0:
            save_checkpoint(tr.state_dir, tr.step, [ms], tr.gen.get_state(),
                            extra={"trained": sorted(tr.trained), "trained_rows": tr.trained_rows,
                                   "ddp": {"world_size": world, "steps": steps}})
        # every rank must hold identical weights after DDP
        flat_w = torch.cat([p.detach().flatten() for p in orig_model.parameters()])
        ref = flat_w.clone()
        dist.broadcast(ref, 0)
        in_sync = bool(torch.equal(ref, flat_w))
        dist.barrier()  # nobody tears down the group while a peer is still in a collective
        return {"rank": rank, "world_size": world, "first_loss": losses[0], "last_loss": float(np.mean(losses[-5:])),
                "in_sync": in_sync, "step": tr.step}
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m collafuse.distributed", description=__doc__.split("\n\n")[0])
    p.add_argument("--run-dir", dest="run", required=True)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-rows", type=int, default=256, help="global batch (split across ranks)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--report", default=None, help="write each rank's summary as JSON lines here")
    a = p.parse_args(argv)
    if a.steps < 1 or a.batch_rows < 1:
        p.error("--steps and --batch-rows must be positive")
    res = train_ddp(a.run, a.steps, a.batch_rows, a.seed)
    print(res, flush=True)
    if a.report:
        import json

        with open(f"{a.report}.rank{res['rank']}", "w") as f:
            json.dump(res, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
