"""Plots and markdown tables of a cut-ratio sweep (``benchmarks/cut_ratio_sweep.py``).

Reads the ``sweep.json`` the sweep writes (and its ``figures.npz`` of sample/attack images),
so the figures can be redrawn without re-running anything:

    python benchmarks/cut_ratio_sweep.py --out runs/sweep --plot-only --plots-dir docs/img
"""
from __future__ import annotations

import json
import math
import os

import numpy as np

PSNR_CAP = 60.0  # an exact copy has infinite PSNR; plotted at this value with a marker


def load_results(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _num(v) -> float:
    """JSON value → float ("inf" strings back to inf, None to nan)."""
    if v is None:
        return float("nan")
    if isinstance(v, str):
        return float(v)
    return float(v)


def _get(d: dict | None, *path) -> float:
    for p in path:
        if d is None:
            return float("nan")
        d = d.get(p)
    return _num(d)


def _mean(values) -> float:
    vals = [v for v in values if not math.isnan(v)]
    if not vals:
        return float("nan")
    if any(math.isinf(v) for v in vals):
        return float("inf") if all(v > 0 for v in vals if math.isinf(v)) else float("nan")
    return float(np.mean(vals))


def kind(r: dict) -> str:
    return r.get("kind", "centralised" if r["central"] else "sweep")


def series(res: dict, objective: str) -> list[dict]:
    """Rows of one objective sorted by c, with the per-client metrics averaged (or summed)."""
    out = []
    for r in res["runs"]:
        if kind(r) != "sweep" or r["objective"] != objective:
            continue
        cl = r["clients"]
        out.append({
            "c": r["cut_ratio"], "kd_sum": r["kd_sum"], "fd_sum": r["fd_sum"],
            "kd": [_get(c, "quality", "kd_mean") for c in cl], "fd": [_get(c, "quality", "fd") for c in cl],
            "pooled_kd": _get(r, "pooled_quality", "kd_mean"),
            "handoff": cl[0]["handoff_level"],
            "disc_kd": _mean(_get(c, "disclosure_training", "kd_mean") for c in cl),
            "disc_mse": _mean(_get(c, "disclosure_training", "mse") for c in cl),
            "floor_kd": _mean(_get(c, "noise_floor", "kd_mean") for c in cl),
            "floor_mse": _mean(_get(c, "noise_floor", "mse") for c in cl),
            "inf_kd": _mean(_get(c, "disclosure_inference", "kd_mean") for c in cl),
            "inf_nn_mse": _mean(_get(c, "disclosure_inference", "nn_mse") for c in cl),
            "att_tw": _mean(_get(c, "attack_training_tweedie", "psnr_paired") for c in cl),
            "att_chain": _mean(_get(c, "attack_training_chain", "psnr_paired") for c in cl),
            "att_match": _mean(_get(c, "attack_training_tweedie", "nn_match_rate") for c in cl),
            "inf_chain": _mean(_get(c, "attack_inference_chain", "psnr_paired") for c in cl),
            "inf_tw": _mean(_get(c, "attack_inference_tweedie", "psnr_paired") for c in cl),
            "inf_nn": _mean(_get(c, "attack_inference_train_nn", "nn_distance_mean") for c in cl),
            "client_calls": cl[0]["cost"]["client_calls"], "server_calls": cl[0]["cost"]["server_calls"],
            "client_mflop": cl[0]["cost"]["client_flops_per_image"] / 1e6,
            "server_mflop": cl[0]["cost"]["server_flops_per_image"] / 1e6,
            "local_mflop": cl[0]["cost"]["local_flops_per_image"] / 1e6,
            "client_train_mflop": cl[0]["cost"]["client_train_flops_per_example"] / 1e6,
            "server_train_mflop": cl[0]["cost"]["server_train_flops_per_example"] / 1e6,
            # every client has the same architecture and timetable: 3 repeats, keep the least disturbed
            "latency_ms": min((_num(c["cost"]["latency_ms_per_image"]) for c in cl), default=float("nan")),
            "wire_bytes": cl[0]["cost"]["handoff_bytes_per_image"],
            "train_s": r["train_wall_s"], "eval_s": r["eval_wall_s"],
        })
    return sorted(out, key=lambda x: x["c"])


def central(res: dict) -> dict | None:
    for r in res["runs"]:
        if kind(r) == "centralised":
            return r
    return None


def objectives(res: dict) -> list[str]:
    seen = []
    for r in res["runs"]:
        if kind(r) == "sweep" and r["objective"] not in seen:
            seen.append(r["objective"])
    return seen


# ------------------------------------------------------------------------------------- plots


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str, gray: bool = False) -> None:
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=120)
    if gray:  # image grids: an 8-bit grey PNG is a fraction of matplotlib's RGBA
        from PIL import Image

        with Image.open(tmp) as im:
            im.convert("L").save(tmp, optimize=True)
    os.replace(tmp, path)


def _capped(vals):
    return [PSNR_CAP if math.isinf(v) else v for v in vals]


def make_plots(res: dict, out_dir: str, figures_npz: str | None = None) -> list[str]:
    plt = _plt()
    os.makedirs(out_dir, exist_ok=True)
    objs = objectives(res)
    rows = {o: series(res, o) for o in objs}
    main = rows[objs[0]]
    cen = central(res)
    styles = {o: s for o, s in zip(objs, ("-", "--", ":"))}
    written = []

    # quality vs c
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, per, label in ((axes[0], "kd_sum", "kd", "KD"), (axes[1], "fd_sum", "fd", "FD")):
        cs = [r["c"] for r in main]
        for i in range(len(main[0][per])):
            ax.plot(cs, [r[per][i] for r in main], "o-", lw=1, alpha=0.55, label=f"client {i} ({objs[0]})")
        for o in objs:
            rr = rows[o]
            ax.plot([r["c"] for r in rr], [r[key] for r in rr], "s" + styles[o], color="k", lw=2.2,
                    label=f"sum over clients ({o})")
        if cen is not None:
            ax.axhline(cen[key], color="tab:red", ls="-.", label="centralised (sum)")
        for r in res["runs"]:
            if kind(r) == "split-local":
                ax.axhline(r[key], color="tab:purple", ls=":", lw=2,
                           label=f"split-local c = {r['cut_ratio']:g}, no sharing (sum)")
        ax.set_xlabel("cut ratio c (share of levels on the client)")
        ax.set_ylabel(f"{label} vs held-out images (classifier features)")
        ax.set_title(f"quality: {label} per client and summed (lower is better)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    p = os.path.join(out_dir, "quality_vs_c.png")
    _save(fig, p)
    plt.close(fig)
    written.append(p)

    # disclosure vs c
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for o in objs:
        rr = [r for r in rows[o] if not math.isnan(r["disc_kd"])]
        cs = [r["c"] for r in rr]
        if o == objs[0]:  # x_h does not depend on the server's objective: draw it once
            axes[0].plot(cs, [r["disc_kd"] for r in rr], "o-", color="tab:blue", label="training: disclosed x_h")
            axes[1].plot(cs, [r["disc_mse"] for r in rr], "o-", color="tab:blue", label="x_h vs its source image")
        axes[0].plot(cs, [r["inf_kd"] for r in rr], "^" + styles[o], color="tab:orange",
                     label=f"inference: handoff sample ({o})")
        axes[2].plot(cs, _capped([r["att_tw"] for r in rr]), "o" + styles[o], color="tab:blue",
                     label=f"training, Tweedie x̂0(x_h) ({o})")
        axes[2].plot(cs, _capped([r["att_chain"] for r in rr]), "s" + styles[o], color="tab:orange",
                     label=f"training, server chain to 0 ({o})")
        axes[2].plot(cs, _capped([r["inf_chain"] for r in rr]), "^" + styles[o], color="tab:green",
                     label=f"inference, server completion vs client image ({o})")
    floor = [r for r in main if not math.isnan(r["floor_kd"])]
    axes[0].plot([r["c"] for r in floor], [r["floor_kd"] for r in floor], "k:", label="pure noise (nothing disclosed)")
    axes[1].plot([r["c"] for r in floor], [r["floor_mse"] for r in floor], "k:", label="pure noise vs image")
    axes[0].set_title("KD(what the server sees, client's training images)\nhigher = less disclosed")
    axes[1].set_title("pixel MSE(x_h, source image), the paper's MSE\nhigher = less disclosed")
    axes[2].set_title(f"reconstruction attack PSNR, dB (∞ plotted at {PSNR_CAP:.0f})\nhigher = more disclosed")
    for ax in axes:
        ax.set_xlabel("cut ratio c")
        ax.set_xlim(-0.05, 1.05)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    p = os.path.join(out_dir, "disclosure_vs_c.png")
    _save(fig, p)
    plt.close(fig)
    written.append(p)

    # compute vs c
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    cs = [r["c"] for r in main]
    axes[0].plot(cs, [r["client_mflop"] for r in main], "o-", label="client (per image)")
    axes[0].plot(cs, [r["server_mflop"] for r in main], "s-", label="server (per image)")
    axes[0].plot(cs, [r["local_mflop"] for r in main], "k:", label="all steps on the client model (c = 1)")
    if cen is not None:
        axes[0].axhline(cen["clients"][0]["cost"]["client_flops_per_image"] / 1e6, color="tab:red", ls="-.",
                        label="centralised model (server side)")
    axes[0].set_ylabel("MFLOP per generated image (counted)")
    axes[0].set_title(f"sampling compute, {res['meta']['args']['sample_steps']} DDIM evaluations per image")
    axes[1].plot(cs, [r["latency_ms"] for r in main], "o-")
    axes[1].set_ylabel("client ms per image (batch 1)")
    axes[1].set_title(f"client latency: {res['meta'].get('latency', '')}", fontsize=9)
    for ax in axes:
        ax.set_xlabel("cut ratio c")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    p = os.path.join(out_dir, "compute_vs_c.png")
    _save(fig, p)
    plt.close(fig)
    written.append(p)

    if figures_npz and os.path.exists(figures_npz):
        written += _image_figures(res, np.load(figures_npz), out_dir, plt)
    return written


def _grid(images: np.ndarray, nrow: int) -> np.ndarray:
    from collafuse_edge.images import make_grid

    return make_grid(images, nrow=nrow)[..., 0] if images.shape[1] == 1 else make_grid(images, nrow=nrow)


def _image_figures(res: dict, figs, out_dir: str, plt) -> list[str]:
    written = []
    names = [r["name"] for r in res["runs"]]
    per_client = 8
    objs = objectives(res)
    cuts = sorted({r["cut_ratio"] for r in res["runs"] if kind(r) == "sweep"})
    panels = [(f"{o}-c{c:.1f}", f"{o}, c = {c:g}") for c in cuts for o in objs if f"{o}-c{c:.1f}" in names]
    if "centralised" in names:
        panels.append(("centralised", "centralised (pooled data)"))
    if panels:
        rows_c = [c for c in cuts] + (["central"] if any(kind(r) != "sweep" for r in res["runs"]) else [])
        fig, axes = plt.subplots(len(rows_c), len(objs), figsize=(4.2 * len(objs), 1.5 * len(rows_c) + 0.3),
                                 squeeze=False)
        for i, c in enumerate(rows_c):
            for j, o in enumerate(objs):
                ax = axes[i, j]
                ax.axis("off")
                split = [r for r in res["runs"] if kind(r) == "split-local"]
                if c != "central":
                    name, title = f"{o}-c{c:.1f}", f"{o}, c = {c:g}"
                elif j == 0:
                    name, title = "centralised", "centralised (pooled data)"
                elif j == 1 and split:
                    name, title = split[0]["name"], f"split-local c = {split[0]['cut_ratio']:g} (no sharing)"
                else:
                    continue
                if name not in names:
                    continue
                imgs = [figs[f"{name}/samples/{k}"][:per_client] for k in range(3) if f"{name}/samples/{k}" in figs]
                if imgs:
                    ax.imshow(_grid(np.concatenate(imgs), per_client), cmap="gray", vmin=0, vmax=255)
                ax.set_title(title + " · rows: clients 0–2", fontsize=8)
        fig.tight_layout()
        p = os.path.join(out_dir, "samples_vs_c.png")
        _save(fig, p, gray=True)
        plt.close(fig)
        written.append(p)

    att = [(f"{objs[0]}-c{c:.1f}", c) for c in cuts if 0 < c < 1 and f"{objs[0]}-c{c:.1f}/attack/0/true" in figs]
    if att:
        fig, axes = plt.subplots(1, len(att), figsize=(3.2 * len(att), 3.2))
        axes = np.atleast_1d(axes)
        for ax, (name, c) in zip(axes, att):
            rows = [figs[f"{name}/attack/0/{k}"][:6] for k in ("true", "seen", "tweedie", "chain")]
            ax.imshow(_grid(np.concatenate(rows), 6), cmap="gray", vmin=0, vmax=255)
            ax.set_title(f"c = {c:g} (handoff level {round(c * 1000) - 1})\nrows: true · x_h · Tweedie · chain",
                         fontsize=8)
            ax.axis("off")
        fig.tight_layout()
        p = os.path.join(out_dir, "attack_examples.png")
        _save(fig, p, gray=True)
        plt.close(fig)
        written.append(p)
    return written


# ------------------------------------------------------------------------------------ tables


def _f(v, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    if isinstance(v, float) and math.isinf(v):
        return "∞"
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 1e5 else f"{v:.3e}"
    return str(v)


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_f(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def baselines_table(res: dict) -> str:
    """Every non-sweep row (centralised, split-local) next to local-only and the best cut."""
    rows = []
    objs = objectives(res)
    main = series(res, objs[0]) if objs else []
    if main:
        best = min(main, key=lambda r: r["kd_sum"])
        local = [r for r in main if r["c"] == 1.0]
        picks = ([("purely local (c = 1)", local[0])] if local else []) + [(f"collaborative, best c = {best['c']:g}", best)]
        rows += [[label, *r["kd"], r["kd_sum"], r["fd_sum"]] for label, r in picks]
    for r in res["runs"]:
        if kind(r) == "centralised":
            label = "centralised (one model, pooled raw data)"
        elif kind(r) == "split-local":
            label = f"split-local c = {r['cut_ratio']:g} (two own models per client, no sharing)"
        else:
            continue
        rows.append([label, *[_get(c, "quality", "kd_mean") for c in r["clients"]], r["kd_sum"], r["fd_sum"]])
    if not rows:
        return ""
    n = len(rows[0]) - 3
    return "### Baselines (KD per client, summed KD and FD; lower is better)\n\n" + _table(
        ["setting"] + [f"KD client {i}" for i in range(n)] + ["**KD sum**", "FD sum"], rows)


def write_tables(res: dict, path: str | None = None) -> str:
    objs = objectives(res)
    cen = central(res)
    parts = [baselines_table(res)]
    if not objs:
        text = parts[0] + "\n"
        if path:
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
        return text
    n_clients = len(series(res, objs[0])[0]["kd"])
    header = ["objective", "c"] + [f"KD client {i}" for i in range(n_clients)] + ["**KD sum**", "FD sum", "pooled KD"]
    rows = []
    for o in objs:
        for r in series(res, o):
            rows.append([o, r["c"], *r["kd"], r["kd_sum"], r["fd_sum"], r["pooled_kd"]])
    if cen is not None:
        rows.append(["centralised", "—", *[_get(c, "quality", "kd_mean") for c in cen["clients"]], cen["kd_sum"],
                     cen["fd_sum"], _get(cen, "pooled_quality", "kd_mean")])
    parts.append("### Quality (KD/FD in classifier feature space vs each client's held-out images; lower is better)\n\n"
                 + _table(header, rows))

    header = ["objective", "c", "handoff level", "KD(x_h, train)", "MSE(x_h, source)", "KD(handoff, train)",
              "attack PSNR Tweedie", "attack PSNR chain", "attack NN-match", "inference: completion PSNR",
              "completion → train NN dist."]
    rows = []
    for o in objs:
        for r in series(res, o):
            rows.append([o, r["c"], r["handoff"], r["disc_kd"], r["disc_mse"], r["inf_kd"], r["att_tw"], r["att_chain"],
                         r["att_match"], r["inf_chain"], r["inf_nn"]])
    floor = series(res, objs[0])[0]
    parts.append("### Disclosure and reconstruction attack (mean over clients)\n\n"
                 "KD/MSE: higher = less disclosed (pure noise scores KD ≈ " + _f(floor["floor_kd"]) + "). "
                 "PSNR in dB against each disclosed image's own source; higher = more disclosed. "
                 "At c = 1 nothing leaves the client (—).\n\n" + _table(header, rows))

    header = ["c", "client calls", "server calls", "client MFLOP/img", "server MFLOP/img", "client share",
              "client ms/img", "handoff bytes/img", "client train MFLOP/example", "server train MFLOP/example"]
    rows = []
    for r in series(res, objs[0]):
        tot = r["client_mflop"] + r["server_mflop"]
        rows.append([r["c"], r["client_calls"], r["server_calls"], r["client_mflop"], r["server_mflop"],
                     f"{100 * r['client_mflop'] / tot:.0f} %" if tot else "—", r["latency_ms"], r["wire_bytes"],
                     r["client_train_mflop"], r["server_train_mflop"]])
    if cen is not None:
        cc = cen["clients"][0]["cost"]
        rows.append(["centralised", 0, cc["client_calls"], 0.0, cc["client_flops_per_image"] / 1e6, "0 %", "—",
                     "raw images", 0.0, cc["client_train_flops_per_example"] / 1e6])
    parts.append("### Compute per generated image (counted FLOPs) and client latency\n\n"
                 f"Latency: {res['meta'].get('latency', '')}; the best of the clients' measurements (same "
                 "architecture and timetable).\n\n" + _table(header, rows))

    walls = [[r["name"], r["train_wall_s"], r["eval_wall_s"]] for r in res["runs"]]
    parts.append("### Wall time per run (s)\n\n" + _table(["run", "train", "evaluate"], walls)
                 + f"\n\nWhole sweep: {res['meta']['wall_s']:.0f} s"
                 + (f" (this pass; an earlier pass took {res['meta']['first_pass']['wall_s']:.0f} s)."
                    if "first_pass" in res["meta"] else "."))
    text = "\n\n".join(parts) + "\n"
    if path:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
    return text
