"""Does collaboration pay? Every arm of the collaboration study, several seeds, with intervals (docs/results.md).

Regimes: data per client *scarce* (``--scarce`` training images per client, default 60) or
*ample* (all ≈ 480), partitions ``iid`` and ``dirichlet:0.3`` (``by-label``, disjoint classes, is
the extreme; add it with ``--regimes``). 3 clients; the held-out split of every client stays whole.

Arms, all trained for the same number of steps on the same batches per client:
* ``collab-cX`` — CollaFuse at cut ratio X (client levels 0 … k-1, shared server on levels ≥ k from
  the disclosed x_h of all clients), ``exact`` objective; ``dn-cX`` the ``double-noise`` objective;
* ``local`` — c = 1, each client alone with one model for every level;
* ``split-local-cX`` — each client alone with two models of its own split at X (no sharing);
* ``central`` — one model on the pooled raw training images (the privacy-violating reference);
* ``fedavg`` — FedAvg: each client trains the full chain, the weights are averaged every
  ``--fedavg-rounds`` local steps weighted by data size (:func:`collafuse.fedavg.client_weights`).

All models of one (regime, seed) train as two vmapped ensembles (:class:`collafuse.ensemble.Ensemble`;
batch b for per-client models, 3b for the server and central models). Every ``--eval-every``
steps each arm generates ``--images`` images per client (DDIM, ``--sample-steps`` evaluations split
by the cut as in ``cut_ratio_sweep.py``, the same initial noise for every arm) and is scored
against that client's held-out images: FD/KD in the project classifier's feature space, and
memorisation against that client's training images (pixel L2: the share of images whose nearest
training image is < 1/3 of the distance to the second nearest, and the mean nearest distance).

Stopping rule: every arm is reported at the same fixed budget (the last step); the curves show
whether local training had plateaued there, and the JSON also holds each arm at its best
evaluated step. Intervals: mean ± 95 % t-interval over seeds; paired comparisons per seed.

    python benchmarks/collaboration_study.py --out runs/study                      # default size
    python benchmarks/collaboration_study.py --quick --out runs/study-quick        # CI smoke (< 30 s)
    python benchmarks/collaboration_study.py --out runs/study --plot-only --plots-dir docs/img

``--reuse`` keeps the (regime, seed) groups already finished in OUT (same settings).
Writes ``OUT/study.json``, ``OUT/study_tables.md``, ``OUT/groups/*.json`` and the plots
``study_*.png``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from cut_ratio_sweep import SIZES

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/collaboration-study")
    p.add_argument("--quick", action="store_true", help="CI-sized smoke run (< 30 s): 1 regime, 2 seeds, 4 steps")
    p.add_argument("--regimes", default="scarce:iid,scarce:dirichlet:0.3,ample:iid,ample:dirichlet:0.3",
                   help="comma list of SIZE:PARTITION, SIZE scarce|ample, PARTITION iid|by-label|dirichlet:A")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0 … N-1 (data split, init, batches)")
    p.add_argument("--scarce", type=int, default=60, help="training images per client in the scarce regime")
    p.add_argument("--steps", type=int, default=240, help="training steps of every model")
    p.add_argument("--eval-every", type=int, default=60, help="evaluate every arm every N steps (training curves)")
    p.add_argument("--batch-size", type=int, default=8, help="per client and step (server and central: 3×)")
    p.add_argument("--cuts", default="0.2,0.4,0.6,0.8", help="cut ratios of the collaborative arms")
    p.add_argument("--double-noise", default="0.2,0.6", help="cut ratios of the double-noise arms ('' for none)")
    p.add_argument("--split-local", default="0.6", help="cut ratios of the split-local ablation ('' for none)")
    p.add_argument("--fedavg-rounds", type=int, default=10, help="FedAvg: local steps between averagings (0: no arm)")
    p.add_argument("--no-central", action="store_true")
    p.add_argument("--client-model", default="tiny", help="size of the per-client models (clients, local, FedAvg): "
                   + ", ".join(SIZES))
    p.add_argument("--server-model", default="tiny", help="size of the server-side models (shared server, central, "
                   "split-local's second model)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--ema-decay", type=float, default=0.99)
    p.add_argument("--timesteps", type=int, default=1000)
    p.add_argument("--sample-steps", type=int, default=16, help="DDIM evaluations per image, split by the cut")
    p.add_argument("--images", type=int, default=32, help="generated images per client and arm")
    p.add_argument("--kd-subsets", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", help="cpu | cuda (one ensemble per group on the GPU)")
    p.add_argument("--feature-cache", default=None, help="cache of the metric classifier (default ~/.cache/collafuse)")
    p.add_argument("--plots-dir", default=None, help="where the PNGs go (default OUT/plots)")
    p.add_argument("--reuse", action="store_true", help="reuse finished (regime, seed) groups found in OUT")
    p.add_argument("--plot-only", action="store_true", help="redraw plots and tables from OUT/study.json")
    a = p.parse_args(argv)
    if a.quick:
        a.regimes, a.seeds, a.steps, a.eval_every = "scarce:dirichlet:0.3", 2, 4, 2
        a.cuts, a.double_noise, a.split_local, a.fedavg_rounds = "0.2,0.6", "0.2", "0.6", 2
        a.batch_size, a.scarce, a.images, a.sample_steps, a.kd_subsets = 4, 12, 6, 3, 2
    for name in ("seeds", "scarce", "steps", "eval_every", "batch_size", "sample_steps", "images", "kd_subsets",
                 "threads", "timesteps"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be ≥ 1, got {getattr(a, name)}")
    if a.images < 2:
        p.error("--images must be ≥ 2 (FD needs two images)")
    if a.fedavg_rounds < 0:
        p.error("--fedavg-rounds must be ≥ 0")
    for flag in ("client_model", "server_model"):
        if getattr(a, flag) not in SIZES:
            p.error(f"--{flag.replace('_', '-')} must be one of {', '.join(SIZES)}, got {getattr(a, flag)!r}")
    try:
        a.regime_list = [parse_regime(r) for r in a.regimes.split(",") if r.strip()]
        a.cut_list = _cuts(a.cuts, "--cuts")
        a.dn_list = _cuts(a.double_noise, "--double-noise")
        a.sl_list = _cuts(a.split_local, "--split-local")
    except ValueError as e:
        p.error(str(e))
    if not a.regime_list or not a.cut_list:
        p.error("give at least one regime (--regimes) and one cut ratio (--cuts)")
    return a


def _cuts(text: str, flag: str) -> list[float]:
    out = []
    for v in (s for s in text.split(",") if s.strip()):
        try:
            c = float(v)
        except ValueError:
            raise ValueError(f"{flag}: {v!r} is not a number; give cut ratios like 0.2,0.6") from None
        if not 0 < c < 1:
            raise ValueError(f"{flag}: cut ratios must lie strictly between 0 and 1 (c = 1 is the local arm), got {c}")
        out.append(c)
    return out


def parse_regime(text: str) -> tuple[str, str]:
    from collafuse.config import parse_partition
    from collafuse.errors import ConfigError

    size, _, part = text.strip().partition(":")
    if size not in ("scarce", "ample") or not part:
        raise ValueError(f"regime {text!r}: write SIZE:PARTITION with SIZE scarce or ample, e.g. scarce:iid")
    try:
        parse_partition(part)
    except ConfigError as e:
        raise ValueError(f"regime {text!r}: {e}") from None
    return size, part


def regime_name(r: tuple[str, str]) -> str:
    return f"{r[0]}:{r[1]}"


# ----------------------------------------------------------------------------------------------
# arms and their members


@dataclass
class Member:
    """One model of architecture ``arch`` ("client" / "server": ``--client-model`` /
    ``--server-model``). ``role``: ("ddpm", lo, hi) levels lo … hi from x0, or (objective, h) from
    the disclosed x_h. A member with one slot trains at that client (batch b); one with every
    client's slots is a server-side model (batch 3b). Members of one architecture and batch size
    train in one ensemble: ``ens`` is its key, ``index`` the member's place in it."""

    arch: str
    role: tuple
    slots: list[int]  # the arm's x0 draws it trains on (one per client it learns from)
    index: int = -1
    ens: str = ""


@dataclass
class Arm:
    name: str
    kind: str  # collab | double-noise | local | split-local | central | fedavg
    cut: float | None
    members: list[Member] = field(default_factory=list)
    # pipelines[i]: the (member, timetable) list that generates for client i
    pipelines: list = field(default_factory=list)


def build_arms(a, T: int, n_clients: int) -> list[Arm]:
    from collafuse_edge.schedule import client_level_count, client_timetable, server_timetable
    from collafuse.evaluate import split_steps

    arms: list[Arm] = []
    S = a.sample_steps
    full = client_timetable(T, S)

    def split_arm(name: str, kind: str, c: float, objective: str, shared: bool) -> Arm:
        k = client_level_count(c, T)
        s_steps, c_steps = split_steps(S, k, T)
        arm = Arm(name, kind, c)
        clients = [Member("client", ("ddpm", 0, k - 1), [i]) for i in range(n_clients)]
        # split-local: each client alone holds a server-architecture model of its own
        servers = ([Member("server", (objective, k - 1), list(range(n_clients)))] if shared else
                   [Member("server", (objective, k - 1), [i]) for i in range(n_clients)])
        arm.members = clients + servers
        for i in range(n_clients):
            srv = servers[0] if shared else servers[i]
            arm.pipelines.append([(srv, server_timetable(T, k, s_steps)), (clients[i], client_timetable(k, c_steps))])
        return arm

    for c in a.cut_list:
        arms.append(split_arm(f"collab-c{c:g}", "collab", c, "exact", True))
    for c in a.dn_list:
        arms.append(split_arm(f"dn-c{c:g}", "double-noise", c, "double-noise", True))
    local = Arm("local", "local", 1.0)
    local.members = [Member("client", ("ddpm", 0, T - 1), [i]) for i in range(n_clients)]
    local.pipelines = [[(m, full)] for m in local.members]
    arms.append(local)
    for c in a.sl_list:
        arms.append(split_arm(f"split-local-c{c:g}", "split-local", c, "exact", False))
    if not a.no_central:
        central = Arm("central", "central", None)
        m = Member("server", ("ddpm", 0, T - 1), list(range(n_clients)))
        central.members = [m]
        central.pipelines = [[(m, full)] for _ in range(n_clients)]
        arms.append(central)
    if a.fedavg_rounds:
        fed = Arm("fedavg", "fedavg", 1.0)
        fed.members = [Member("client", ("ddpm", 0, T - 1), [i]) for i in range(n_clients)]
        # generation uses the global model: the weighted mean of the clients' EMA weights ("avg")
        fed.pipelines = [[("avg", full)] for _ in range(n_clients)]
        arms.append(fed)
    return arms


# ----------------------------------------------------------------------------------------------
# one (regime, seed) group


class Group:
    """The data, ensembles and batch sampler of one (regime, seed)."""

    def __init__(self, a, regime: tuple[str, str], seed: int, dataset, device):
        import numpy as np
        import torch

        from collafuse.config import DataConfig
        from collafuse.data import partition
        from collafuse.ensemble import Ensemble
        from collafuse.fedavg import client_weights
        from collafuse.models import build_unet
        from cut_ratio_sweep import model_config

        self.a, self.regime, self.seed, self.device = a, regime, seed, device
        self.schedule = a.schedule
        T = self.schedule.T
        n_clients = 3
        clients = partition(dataset, DataConfig("digits", 16, n_clients, regime[1], 0.2, seed))
        rng = np.random.default_rng(10_000 + seed)
        self.train = []
        for c in clients:
            x, y = c.train_images, c.train_labels
            if regime[0] == "scarce" and len(y) > a.scarce:
                keep = np.sort(rng.choice(len(y), a.scarce, replace=False))
                x, y = x[keep], y[keep]
            self.train.append((x, y))
        self.truths = clients
        self.arms = build_arms(a, T, n_clients)
        from collafuse.config import replace

        # class-conditional; labels shared with the server
        self.arch = {"client": a.client_model, "server": a.server_model}
        mcfgs = {n: replace(model_config(n, 16), num_classes=dataset.num_classes) for n in set(self.arch.values())}
        # slots: one x0 draw of b images per (arm, client); the server/central members read all of an arm's
        self.slot_client: list[int] = []
        for arm in self.arms:
            base = len(self.slot_client)
            self.slot_client += list(range(n_clients))
            for m in arm.members:
                m.slots = [base + s for s in m.slots]
        torch.manual_seed(seed)
        ens_members: dict[str, list[Member]] = {}
        for arm in self.arms:
            for m in arm.members:
                m.ens = f"{self.arch[m.arch]}/b{len(m.slots)}"
                m.index = len(ens_members.setdefault(m.ens, []))
                ens_members[m.ens].append(m)
        self.members = ens_members
        kw = dict(lr=a.lr, ema_decay=a.ema_decay, grad_clip=1.0)
        self.ens = {k: Ensemble([build_unet(mcfgs[k.split("/")[0]]).to(device) for _ in v], **kw)
                    for k, v in ens_members.items()}
        self.gen = torch.Generator().manual_seed(seed)
        xs = [torch.from_numpy(x) for x, _ in self.train]
        ys = [torch.from_numpy(y) for _, y in self.train]
        self.x_all, self.y_all = torch.cat(xs), torch.cat(ys)
        sizes = torch.tensor([len(y) for y in ys])
        offsets = torch.cumsum(sizes, 0) - sizes
        sc = torch.tensor(self.slot_client)
        self.slot_off, self.slot_n = offsets[sc], sizes[sc]
        self.fed_weights = client_weights([len(y) for y in ys], "data-size")
        self._tables = {k: self._member_tables(v) for k, v in ens_members.items() if v}

    def _member_tables(self, members: list[Member]):
        import torch

        T = self.schedule.T
        kinds, lo, hi = [], [], []
        for m in members:
            if m.role[0] == "ddpm":
                kinds.append(0), lo.append(m.role[1]), hi.append(m.role[2])
            else:
                kinds.append(1 if m.role[0] == "exact" else 2), lo.append(m.role[1] + 1), hi.append(T - 1)
        h = [m.role[1] if m.role[0] != "ddpm" else -1 for m in members]
        return (torch.tensor([m.slots for m in members]), torch.tensor(kinds), torch.tensor(lo), torch.tensor(hi),
                torch.tensor(h))

    def batch(self, key: str, x_slots, y_slots):
        """Rows of every member of ensemble ``key``: (x_t, t, labels, target, weight), each [E, B, …]."""
        import numpy as np
        import torch

        from collafuse.objectives import exact_scale

        slots, kinds, lo, hi, h = self._tables[key]
        E, ns = slots.shape
        b = x_slots.shape[1]
        B = ns * b
        x0 = x_slots[slots].reshape(E * B, *x_slots.shape[2:])
        y = y_slots[slots].reshape(E, B)
        rk = kinds.repeat_interleave(B)
        rlo, rhi, rh = lo.repeat_interleave(B), hi.repeat_interleave(B), h.repeat_interleave(B)
        u = torch.rand(E * B, generator=self.gen, dtype=torch.float64)
        t = (rlo + torch.floor(u * (rhi - rlo + 1).double()).long()).clamp(max=self.schedule.T - 1)
        eps = torch.randn(x0.shape, generator=self.gen)
        sched = self.schedule
        x_t, target, w = torch.empty_like(x0), eps.clone(), torch.ones(E * B)
        d = rk == 0
        if d.any():
            x_t[d] = sched.add_noise(x0[d], eps[d], t[d].numpy())
        s = ~d
        if s.any():
            eps1 = torch.randn(x0.shape, generator=self.gen)
            x_h = sched.add_noise(x0[s], eps1[s], rh[s].numpy())  # what the client discloses
            ex = rk[s] == 1
            xs = torch.empty_like(x_h)
            ts, hs = t[s].numpy(), rh[s].numpy()
            if ex.any():
                e = ex.numpy()
                xs[ex] = sched.renoise(x_h[ex], eps[s][ex], ts[e], hs[e])
                sc = torch.from_numpy(exact_scale(sched, ts[e], hs[e])).float()
                tg = target[s]
                tg[ex] = eps[s][ex] * sc.view(-1, 1, 1, 1)
                target[s] = tg
                ws = w[s]
                ws[ex] = 1.0 / sc**2
                w[s] = ws
            if (~ex).any():
                xs[~ex] = sched.add_noise(x_h[~ex], eps[s][~ex], ts[~ex.numpy()])
            x_t[s] = xs
        shape = (E, B, *x_slots.shape[2:])
        dev = self.device
        return (x_t.view(shape).to(dev), t.view(E, B).to(dev), y.to(dev), target.view(shape).to(dev),
                w.view(E, B).to(dev))

    def train_step(self, step: int) -> None:
        import torch

        b = self.a.batch_size
        n = len(self.slot_client)
        u = torch.rand(n, b, generator=self.gen, dtype=torch.float64)
        idx = self.slot_off.view(-1, 1) + torch.floor(u * self.slot_n.view(-1, 1).double()).long()
        x_slots, y_slots = self.x_all[idx], self.y_all[idx]
        for key, ens in self.ens.items():
            ens.step(*self.batch(key, x_slots, y_slots))
        R = self.a.fedavg_rounds
        if R and (step % R == 0 or step == self.a.steps):
            fed = next(arm for arm in self.arms if arm.kind == "fedavg")
            self.ens[fed.members[0].ens].average_([m.index for m in fed.members], self.fed_weights)

    # -- evaluation -----------------------------------------------------------------------------

    def eval_models(self) -> dict:
        """{(ensemble key, member index) or "avg": model with the EMA weights, eval mode}; "avg" is
        FedAvg's global model, the data-size-weighted mean of the clients' EMA weights."""
        import torch

        out = {}
        stacks = {k: e.stacked(ema=True) for k, e in self.ens.items()}
        for arm in self.arms:
            for stages in arm.pipelines:
                for member, _ in stages:
                    key = "avg" if member == "avg" else (member.ens, member.index)
                    if key in out:
                        continue
                    if key == "avg":
                        fed = next(x for x in self.arms if x.kind == "fedavg")
                        ens, st = self.ens[fed.members[0].ens], stacks[fed.members[0].ens]
                        idx = torch.tensor([m.index for m in fed.members])
                        w = torch.tensor(self.fed_weights, dtype=torch.float64)
                        state = {k: (v[idx].double() * w.view(-1, *([1] * (v.ndim - 1)))).sum(0).to(v.dtype)
                                 for k, v in st.items()}
                    else:
                        ens, st = self.ens[key[0]], stacks[key[0]]
                        state = {k: v[key[1]] for k, v in st.items()}
                    m = type(ens._base).from_config(ens.config)
                    m.load_state_dict(state)
                    out[key] = m.to(self.device).eval()
        return out

    def generate(self) -> dict:
        """{(arm name, client): images [n, C, H, W]} — every arm's pipelines run together, one
        vmapped model call per sampler step."""
        import torch

        with torch.no_grad():
            return self._generate()

    def _generate(self) -> dict:
        import numpy as np
        import torch

        from collafuse_edge.noise import initial_noise
        from collafuse_edge.schedule import ddim_step
        from collafuse.evaluate import cycle_labels
        from collafuse.models import denoise

        models = self.eval_models()
        n = self.a.images
        pipes = []  # (arm, client, [(pool index, t, prev)], labels)
        for arm in self.arms:
            for i, stages in enumerate(arm.pipelines):
                steps = []
                for member, tt in stages:
                    key = "avg" if member == "avg" else (member.ens, member.index)
                    steps += [(key, t, prev) for t, prev in tt.pairs()]
                pipes.append((arm.name, i, steps, cycle_labels(self.truths[i].classes, n)))
        shape = (n, *self.train[0][0].shape[1:])
        x = torch.stack([torch.from_numpy(initial_noise(1_000_003 * self.seed + 7919 * i + 1, shape))
                         for _, i, _, _ in pipes]).float().to(self.device)
        labels = torch.from_numpy(np.stack([p[3] for p in pipes])).to(self.device)
        # Sampling runs each model once per step on the rows of every pipeline that uses it (a shared
        # server or the central model serves 3 clients in one call). Measured: for inference a
        # vmapped ensemble of E tiny models is slower on the CPU than E plain calls (grouped
        # convolutions of 8–16 channels per group), so sampling does not vmap.
        for j in range(max(len(p[2]) for p in pipes)):
            by_model: dict = {}
            for q, p in enumerate(pipes):
                if j < len(p[2]):
                    by_model.setdefault(p[2][j][0], []).append(q)
            for pi, qs in by_model.items():
                idx = torch.tensor(qs)
                tt = np.repeat(np.array([pipes[q][2][j][1] for q in qs]), n)
                pv = np.repeat(np.array([pipes[q][2][j][2] for q in qs]), n)
                xa = x[idx].flatten(0, 1)
                tb = torch.from_numpy(tt).to(self.device)
                eps = denoise(models[pi], xa, tb, labels[idx].flatten())
                x[idx] = ddim_step(self.schedule, xa, eps, tt, pv).view(len(qs), *x.shape[1:])
        return {(p[0], p[1]): x[q].cpu().numpy() for q, p in enumerate(pipes)}

    def evaluate(self, extractor, real_features) -> dict:
        import numpy as np
        import torch

        from collafuse.metrics.quality import quality_scores

        images = self.generate()
        out: dict = {}
        for (name, i), img in images.items():
            q = quality_scores(img, self.truths[i].test_images, extractor, real_features=real_features[i],
                               num_subsets=self.a.kd_subsets, subset_size=1000, seed=self.seed)
            tr = torch.from_numpy(self.train[i][0]).flatten(1)
            d = torch.cdist(torch.from_numpy(img).flatten(1).double(), tr.double())
            two = torch.topk(d, 2, dim=1, largest=False).values
            ratio = (two[:, 0] / two[:, 1].clamp_min(1e-12)).numpy()
            out.setdefault(name, []).append({
                "client": i, "fd": q.fd, "kd": q.kd_mean, "kd_std": q.kd_std,
                "copy_share": float(np.mean(ratio < 1 / 3)), "nn_l2": float(two[:, 0].mean()),
                "nn_ratio_median": float(np.median(ratio))})
        return out, images


# ----------------------------------------------------------------------------------------------
# cost per arm


def arm_costs(arms: list[Arm], a, fe: dict, ff: dict, params: dict, arch: dict, n_clients: int = 3) -> dict:
    """Training FLOPs per client and in total, the client's generation FLOPs per image and its bytes
    on the wire per training step. ``fe``/``ff``/``params``: counted training FLOPs per example,
    forward FLOPs per call and parameters per model size; ``arch``: "client"/"server" → size.
    A member with one client's slot runs at that client; a shared one (every slot) at the server."""
    b, S = a.batch_size, a.steps
    img_bytes = 4 * 16 * 16 + 8  # one float32 16×16 image (x_h or raw) and its int64 label
    out = {}
    for arm in arms:
        first = min(min(m.slots) for m in arm.members)  # the arm's slot of client 0
        mine = [m for m in arm.members if m.slots == [first]]
        shared = [m for m in arm.members if len(m.slots) > 1]
        client = sum(fe[arch[m.arch]] * b * S for m in mine)
        server = sum(fe[arch[m.arch]] * b * len(m.slots) * S for m in shared)
        gen = 0
        for member, tt in arm.pipelines[0]:
            if member == "avg" or len(member.slots) == 1:
                gen += len(tt) * ff[arch["client" if member == "avg" else member.arch]]
        if arm.kind == "fedavg":
            up = 2 * 4 * params[arch["client"]] / a.fedavg_rounds  # weights both ways once per round
        elif shared:
            up = b * img_bytes  # x_h (collaborative) or raw images (central)
        else:
            up = 0
        out[arm.name] = {"client_train_flops": client, "server_train_flops": server,
                         "total_train_flops": n_clients * client + server, "client_models": len(mine),
                         "client_gen_flops_per_image": gen, "client_bytes_per_step": up}
    return out


# ----------------------------------------------------------------------------------------------
# statistics


def mean_ci(values) -> dict:
    """Mean and the 95 % t-interval half-width over seeds (None with one value)."""
    import numpy as np
    from scipy import stats

    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=float)
    if v.size == 0:
        return {"mean": None, "ci95": None, "n": 0}
    half = float(stats.t.ppf(0.975, v.size - 1) * v.std(ddof=1) / math.sqrt(v.size)) if v.size > 1 else None
    return {"mean": float(v.mean()), "ci95": half, "n": int(v.size)}


def arm_order(name: str) -> tuple:
    """Table order: collaborative by c, double-noise, local, split-local, central, FedAvg."""
    for rank, prefix in enumerate(("collab-", "dn-", "local", "split-local", "central", "fedavg")):
        if name.startswith(prefix):
            return rank, name
    return 99, name


def summarise(groups: list[dict], a) -> dict:
    """Per regime and arm: mean ± CI over seeds of the client-mean metrics; paired comparisons."""
    import numpy as np

    regimes = [regime_name(r) for r in a.regime_list]
    table: dict = {}
    paired: dict = {}
    for reg in regimes:
        gs = [g for g in groups if g["regime"] == reg]
        if not gs:
            continue
        arms = sorted(gs[0]["final"], key=arm_order)
        cell = {}
        for arm in arms:
            per_seed = {m: [float(np.mean([c[m] for c in g["final"][arm]])) for g in gs]
                        for m in ("fd", "kd", "copy_share", "nn_l2")}
            best = [float(np.mean([c["fd"] for c in g["best"][arm]])) for g in gs]
            cell[arm] = {m: mean_ci(v) for m, v in per_seed.items()}
            cell[arm]["best_fd"] = mean_ci(best)
            cell[arm]["per_seed_fd"] = per_seed["fd"]
        table[reg] = cell
        collab = [x for x in arms if x.startswith("collab-")]
        best = min(collab, key=lambda x: cell[x]["fd"]["mean"])
        comp = {}
        for other in [x for x in arms if x in ("local", "fedavg", "central") or x.startswith("split-local")]:
            d = [b - o for b, o in zip(cell[best]["per_seed_fd"], cell[other]["per_seed_fd"])]
            r = [b / o for b, o in zip(cell[best]["per_seed_fd"], cell[other]["per_seed_fd"]) if o > 0]
            comp[other] = {"fd_diff": mean_ci(d), "fd_ratio": mean_ci(r),
                           "wins": int(sum(x < 0 for x in d)), "seeds": len(d)}
        paired[reg] = {"best_collab": best, "vs": comp}
    return {"table": table, "paired": paired}


# ----------------------------------------------------------------------------------------------
# main


def run_group(a, regime, seed, dataset, extractor, device) -> tuple[dict, dict]:
    import numpy as np
    import torch

    from collafuse.cost import FLOPS
    from collafuse.models import count_params

    t0 = time.perf_counter()
    g = Group(a, regime, seed, dataset, device)
    real = [extractor.features(t.test_images) for t in g.truths]
    eval_at = sorted({s for s in range(a.eval_every, a.steps + 1, a.eval_every)} | {a.steps})
    curves: dict = {arm.name: [] for arm in g.arms}
    best: dict = {}
    train_s = eval_s = 0.0
    images = None
    for step in range(1, a.steps + 1):
        t1 = time.perf_counter()
        g.train_step(step)
        train_s += time.perf_counter() - t1
        if step in eval_at:
            t1 = time.perf_counter()
            res, images = g.evaluate(extractor, real)
            eval_s += time.perf_counter() - t1
            for name, rows in res.items():
                fd = float(np.mean([r["fd"] for r in rows]))
                kd = float(np.mean([r["kd"] for r in rows]))
                curves[name].append({"step": step, "fd": fd, "kd": kd})
                if name not in best or fd < best[name][0]:
                    best[name] = (fd, step, rows)
            final = res
            print(f"  {regime_name(regime)} seed {seed} step {step}: " + "  ".join(
                f"{n} {c[-1]['fd']:.1f}" for n, c in curves.items()), flush=True)
    fe, ff, params = {}, {}, {}
    for key, ens in g.ens.items():
        m0 = ens.member_model(0)
        size = key.split("/")[0]
        fe[size], ff[size], params[size] = FLOPS.train(m0), FLOPS.forward(m0), count_params(m0)
    costs = arm_costs(g.arms, a, fe, ff, params, g.arch)
    out = {"regime": regime_name(regime), "seed": seed, "final": final,
           "best": {k: v[2] for k, v in best.items()}, "best_step": {k: v[1] for k, v in best.items()},
           "curves": curves, "costs": costs,
           "train_images": [len(y) for _, y in g.train], "test_images": [len(t.test_labels) for t in g.truths],
           "classes": [list(map(int, t.classes)) for t in g.truths],
           "members": {k: e.size for k, e in g.ens.items()}, "train_s": train_s, "eval_s": eval_s,
           "wall_s": time.perf_counter() - t0}
    figs = {f"{k[0]}/{k[1]}": v[:8] for k, v in images.items()}
    for i, (x, _) in enumerate(g.train):
        figs[f"train/{i}"] = x[:8]
    return out, figs


def settings(a) -> dict:
    """What a finished group must share with this invocation to be reused (not the list of regimes or seeds)."""
    keys = ("scarce", "steps", "eval_every", "batch_size", "cuts", "double_noise", "split_local",
            "fedavg_rounds", "no_central", "client_model", "server_model", "lr", "ema_decay", "timesteps", "sample_steps", "images",
            "kd_subsets")
    return {k: getattr(a, k) for k in keys}


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, HERE)
    a = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(a.threads))
    from study_report import make_plots, write_tables

    plots = a.plots_dir or os.path.join(a.out, "plots")
    if a.plot_only:
        with open(os.path.join(a.out, "study.json"), encoding="utf-8") as f:
            res = json.load(f)
        make_plots(res, plots, os.path.join(a.out, "figures.npz"))
        print(write_tables(res, os.path.join(a.out, "study_tables.md")))
        return 0

    import numpy as np
    import torch

    from collafuse.checkpoint import atomic_write_json
    from collafuse.data import load_dataset
    from collafuse.evaluate import default_feature_cache
    from collafuse.metrics.extractors import get_feature_net
    from collafuse.train import resolve_device
    from collafuse_edge.bench import machine_description
    from collafuse.config import ScheduleConfig

    torch.set_num_threads(a.threads)
    device = resolve_device(a.device)
    a.schedule = ScheduleConfig(a.timesteps, "linear").build()
    dataset = load_dataset("digits", 16)
    extractor = get_feature_net(dataset, a.feature_cache or default_feature_cache(), seed=0, progress=False)
    t_start = time.perf_counter()
    os.makedirs(os.path.join(a.out, "groups"), exist_ok=True)
    groups, figs = [], {}
    for regime in a.regime_list:  # regime-major: a regime's seeds finish together
        for seed in range(a.seeds):
            path = os.path.join(a.out, "groups", f"{regime_name(regime).replace(':', '_')}-seed{seed}.json")
            if a.reuse and os.path.exists(path):
                with open(path, encoding="utf-8") as f:
                    saved = json.load(f)
                have = dict(saved.get("settings", {}))
                if "model" in have:  # written before client and server sizes were separate flags
                    have.setdefault("client_model", have["model"])
                    have.setdefault("server_model", have["model"])
                if all(have.get(k) == v for k, v in settings(a).items()):
                    groups.append(saved)
                    if seed == 0 and os.path.exists(path[:-5] + ".npz"):
                        with np.load(path[:-5] + ".npz") as z:
                            figs.update({f"{regime_name(regime)}/{k}": z[k] for k in z.files})
                    print(f"reused {path}", flush=True)
                    continue
            res, gf = run_group(a, regime, seed, dataset, extractor, device)
            res["settings"] = settings(a)
            atomic_write_json(path, res)
            np.savez_compressed(path[:-5] + ".tmp.npz", **gf)
            os.replace(path[:-5] + ".tmp.npz", path[:-5] + ".npz")
            groups.append(res)
            if seed == 0:
                figs.update({f"{regime_name(regime)}/{k}": v for k, v in gf.items()})
            print(f"{regime_name(regime)} seed {seed}: train {res['train_s']:.0f} s, eval {res['eval_s']:.0f} s",
                  flush=True)
    summary = summarise(groups, a)
    res = {"meta": {"command": "python benchmarks/collaboration_study.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                    "settings": settings(a), "regimes": a.regimes, "seeds": a.seeds, "machine": machine_description(), "torch": torch.__version__,
                    "threads": a.threads, "device": str(device), "wall_s": time.perf_counter() - t_start,
                    "stopping_rule": "fixed budget: every arm at the last step (--steps); 'best_fd' = each arm at its "
                                     "best evaluated step, for reference",
                    "feature_net": "project classifier (FD/KD in classifier feature space)"},
           "summary": summary, "groups": groups}
    atomic_write_json(os.path.join(a.out, "study.json"), res)
    fig_path = os.path.join(a.out, "figures.npz")
    if figs and os.path.exists(fig_path):  # keep the sample images of regimes trained by an earlier invocation
        with np.load(fig_path) as z:
            figs = {**{k: z[k] for k in z.files}, **figs}
    if figs:
        np.savez_compressed(fig_path[:-4] + ".tmp.npz", **figs)
        os.replace(fig_path[:-4] + ".tmp.npz", fig_path)
    make_plots(res, plots, os.path.join(a.out, "figures.npz"))
    print(write_tables(res, os.path.join(a.out, "study_tables.md")))
    print(f"study finished in {res['meta']['wall_s']:.0f} s; plots in {plots}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
