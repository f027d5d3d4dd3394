"""Plots and markdown tables of the collaboration study (``benchmarks/collaboration_study.py``).

Reads ``study.json`` (and ``figures.npz`` for the sample grids), so everything can be redrawn
without re-running:

    python benchmarks/collaboration_study.py --out runs/study --plot-only --plots-dir docs/img
"""
from __future__ import annotations

import math
import os

import numpy as np

from sweep_report import _f, _grid, _plt, _save, _table


def _pm(cell: dict | None, digits: int = 3) -> str:
    """'mean ± ci' (just the mean with one seed)."""
    if not cell or cell.get("mean") is None:
        return "—"
    if cell.get("ci95") is None:
        return _f(cell["mean"], digits)
    return f"{_f(cell['mean'], digits)} ± {_f(cell['ci95'], 2)}"


def _arms(res: dict, regime: str) -> list[str]:
    return list(res["summary"]["table"][regime])


def _costs(res: dict, regime: str) -> dict:
    for g in res["groups"]:
        if g["regime"] == regime:
            return g["costs"]
    return {}


def _curves(res: dict, regime: str, arm: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Steps, mean FD over seeds and the 95 % half-width per evaluated step."""
    from scipy import stats

    runs = [g["curves"][arm] for g in res["groups"] if g["regime"] == regime and arm in g["curves"]]
    steps = np.array([p["step"] for p in runs[0]])
    fd = np.array([[p["fd"] for p in r] for r in runs])
    n = fd.shape[0]
    half = stats.t.ppf(0.975, n - 1) * fd.std(0, ddof=1) / math.sqrt(n) if n > 1 else np.zeros(fd.shape[1])
    return steps, fd.mean(0), half


def make_plots(res: dict, out_dir: str, figures_npz: str | None = None) -> list[str]:
    plt = _plt()
    os.makedirs(out_dir, exist_ok=True)
    table = res["summary"]["table"]
    regimes = list(table)
    written = []
    n = len(regimes)
    cols = min(n, 2)
    rows = math.ceil(n / cols)

    # final FD per arm with 95 % intervals, one panel per regime
    fig, axes = plt.subplots(rows, cols, figsize=(6.5 * cols, 3.6 * rows), squeeze=False)
    for ax, reg in zip(axes.flat, regimes):
        arms = _arms(res, reg)
        m = [table[reg][a]["fd"]["mean"] for a in arms]
        e = [table[reg][a]["fd"]["ci95"] or 0.0 for a in arms]
        colors = ["C0" if a.startswith("collab") else "C1" if a.startswith("dn") else "C3" if a == "local" else
                  "C2" if a.startswith("split") else "C4" if a == "fedavg" else "C7" for a in arms]
        ax.bar(range(len(arms)), m, yerr=e, color=colors, capsize=3)
        ax.set_xticks(range(len(arms)), arms, rotation=45, ha="right", fontsize=8)
        ax.set_title(reg, fontsize=10)
        ax.set_ylabel("FD (classifier space), mean over clients")
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle("Quality at the fixed budget (lower is better; mean ± 95 % interval over seeds)", fontsize=10)
    fig.tight_layout()
    path = os.path.join(out_dir, "study_quality.png")
    _save(fig, path)
    plt.close(fig)
    written.append(path)

    # training curves of held-out FD
    fig, axes = plt.subplots(rows, cols, figsize=(6.5 * cols, 3.6 * rows), squeeze=False)
    for ax, reg in zip(axes.flat, regimes):
        for j, arm in enumerate(_arms(res, reg)):
            if arm.startswith("dn"):
                continue
            s, m, h = _curves(res, reg, arm)
            ax.errorbar(s, m, yerr=h, label=arm, capsize=2, marker="o", ms=3,
                        ls="--" if not arm.startswith("collab") else "-")
        ax.set_title(reg, fontsize=10)
        ax.set_xlabel("training step")
        ax.set_ylabel("held-out FD")
        ax.set_yscale("log")
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path = os.path.join(out_dir, "study_curves.png")
    _save(fig, path)
    plt.close(fig)
    written.append(path)

    # memorisation: copy share and nearest-neighbour distance
    fig, axes = plt.subplots(1, 2, figsize=(13, 3.8))
    width = 0.8 / max(n, 1)
    arms = _arms(res, regimes[0])
    for k, reg in enumerate(regimes):
        x = np.arange(len(arms)) + k * width
        for ax, metric in zip(axes, ("copy_share", "nn_l2")):
            vals = [table[reg].get(a, {}).get(metric, {}) for a in arms]
            ax.bar(x, [v.get("mean") or 0.0 for v in vals], width, yerr=[v.get("ci95") or 0.0 for v in vals],
                   label=reg, capsize=2)
    for ax, title in zip(axes, ("share of generated images that copy a training image (NN ratio < 1/3)",
                                "mean L2 distance to the nearest training image of the client")):
        ax.set_xticks(np.arange(len(arms)) + 0.4 - width / 2, arms, rotation=45, ha="right", fontsize=8)
        ax.set_title(title, fontsize=9)
    axes[0].set_ylim(0, max(0.05, axes[0].get_ylim()[1]))  # a share: never below 0 (all zero when nothing copies)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    path = os.path.join(out_dir, "study_memorisation.png")
    _save(fig, path)
    plt.close(fig)
    written.append(path)

    if figures_npz and os.path.exists(figures_npz):
        figs = np.load(figures_npz)
        fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 0.36 * (len(arms) + 1) + 0.8), squeeze=False)
        for ax, reg in zip(axes.flat, regimes):
            rows_img, names = [], []
            for name in ["train"] + _arms(res, reg):
                key = f"{reg}/{name}/0"
                if key in figs.files:
                    rows_img.append(figs[key][:8])
                    names.append("training images" if name == "train" else name)
            if not rows_img:
                ax.axis("off")
                continue
            k = min(len(r) for r in rows_img)
            grid = _grid(np.concatenate([r[:k] for r in rows_img]), nrow=k)
            ax.imshow(grid, cmap="gray", vmin=0, vmax=255 if grid.dtype == np.uint8 else 1)
            ax.set_yticks([(i + 0.5) * grid.shape[0] / len(names) for i in range(len(names))], names, fontsize=7)
            ax.set_xticks([])
            ax.set_title(f"{reg}, client 0, seed 0", fontsize=8)
        fig.tight_layout()
        path = os.path.join(out_dir, "study_samples.png")
        _save(fig, path, gray=True)
        plt.close(fig)
        written.append(path)
    return written


def _paired(v: dict | None) -> str:
    """'diff ± ci (ratio × ± ci, wins/seeds)' of one paired comparison."""
    if not v:
        return "—"
    return f"{_pm(v['fd_diff'])} (×{_pm(v['fd_ratio'], 2)}, {v['wins']}/{v['seeds']})"


def write_tables(res: dict, path: str | None = None) -> str:
    table, paired = res["summary"]["table"], res["summary"]["paired"]
    parts = []
    for reg in table:
        costs = _costs(res, reg)
        rows = []
        for arm in _arms(res, reg):
            c, k = table[reg][arm], costs.get(arm, {})
            rows.append([arm, _pm(c["fd"]), _pm(c["kd"]), _pm(c["best_fd"]), _pm(c["copy_share"], 2), _pm(c["nn_l2"]),
                         (k.get("client_train_flops") or 0) / 1e9, (k.get("total_train_flops") or 0) / 1e9,
                         (k.get("client_gen_flops_per_image") or 0) / 1e6, k.get("client_bytes_per_step")])
        parts.append(f"### {reg}\n\n" + _table(
            ["arm", "FD (final)", "KD (final)", "FD (best step)", "copy share", "NN L2", "client train GFLOP",
             "total train GFLOP", "client MFLOP/img", "client bytes/step"], rows))
    rows = []
    for reg, p in paired.items():
        row = [reg, p["best_collab"]]
        for other in ("local", "fedavg", "central"):
            v = p["vs"].get(other)
            row.append(_paired(v))
        sl = [k for k in p["vs"] if k.startswith("split-local")]
        row.append("; ".join(f"{k}: {_paired(p['vs'][k])}" for k in sl) or "—")
        rows.append(row)
    parts.append("### Paired: best collaborative c minus the baseline (FD, per seed; negative = collaboration better; "
                 "the ratio best/baseline; wins/seeds)\n\n" + _table(["regime", "best c", "vs local", "vs FedAvg", "vs central",
                                              "vs split-local"], rows))
    text = "\n\n".join(parts) + "\n"
    if path:
        from collafuse_edge.files import atomic_write_text

        atomic_write_text(path, text)
    return text
