"""``collafuse`` command line: thin wrappers that parse flags into config dataclasses and call
one library function each.

Subcommands: ``train``, ``init``, ``sample``, ``demo``, ``client-train`` and ``evaluate`` live in the core;
``export`` and ``serve`` (the upper layers, which the core never imports) register themselves
through the ``collafuse.commands`` entry-point group: each entry point names a function that takes
the subparsers object and adds its command. A plugin that fails to load raises; it is not skipped.

The contract (:mod:`collafuse_edge.cli_contract`): exit codes 0 ok, 1 an operation failed (a
server, an export, a missing dependency), 2 bad input with a one-line message (argparse's usage
errors too), 130 interrupted; every handler is stored with ``set_defaults(func=...)``; ``--steps``
is always a number of training steps and sampling takes ``--sampler``/``--server-steps``/``--client-steps``.
"""
from __future__ import annotations

import argparse
import os
import sys
from importlib.metadata import entry_points
from typing import Sequence

from collafuse_edge.cli_contract import add_sampler_args, command, run_command

from .config import (PRESETS, DataConfig, ModelConfig, RunConfig, ScheduleConfig, TrainConfig,
                     client_preset, server_preset)
from .errors import ConfigError

PROG = "collafuse"
COMMANDS_GROUP = "collafuse.commands"  # entry points: name = "module:function(subparsers)"
DEFAULT_TRAIN_STEPS = 3000


def _model(preset: str, channels_text: str | None, image_size: int) -> ModelConfig:
    if preset not in PRESETS:
        raise ConfigError(f"unknown model preset {preset!r}; choose one of {', '.join(PRESETS)}")
    m = PRESETS[preset](image_size)
    if channels_text:
        try:
            ch = tuple(int(c) for c in channels_text.split(","))
        except ValueError:
            raise ConfigError(f"--*-channels must be comma-separated integers like 32,64; got {channels_text!r}") from None
        blocks = ("plain",) * len(ch)
        groups = m.norm_num_groups if all(c % m.norm_num_groups == 0 for c in ch) else 8
        m = ModelConfig(image_size, m.channels, ch, m.layers_per_block, blocks, m.mid_attention, groups)
    return m


def _cut_ratios(text: str, n: int) -> tuple[float, ...]:
    try:
        vals = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise ConfigError(f"--cut-ratio must be a number in [0, 1] or one per client, comma-separated; got {text!r}") from None
    if len(vals) == 1:
        vals = vals * n
    return vals


def add_run_args(p: argparse.ArgumentParser, steps: int = DEFAULT_TRAIN_STEPS) -> None:
    """The flags of a run's config. ``--steps`` parses to None when not given (``--resume`` keeps the
    checkpoint's target then); :func:`train_steps` resolves it to ``steps``."""
    p.add_argument("--data", default="digits", help="'digits' (embedded), a MedMNIST-style .npz, or an image folder")
    p.add_argument("--image-size", type=int, default=16)
    p.add_argument("--clients", type=int, default=3, help="number of clients")
    p.add_argument("--partition", default="by-label", help="iid | by-label | dirichlet:ALPHA")
    p.add_argument("--cut-ratio", default="0.6", help="share of levels on the client; one value or one per client")
    p.add_argument("--timesteps", type=int, default=1000)
    p.add_argument("--beta-schedule", default="linear", help="linear | cosine")
    p.add_argument("--objective", default="exact", help="exact | double-noise | shared-noise (leaks x0)")
    p.add_argument("--server-conditioning", default="label", help="label | none")
    p.add_argument("--unconditional", action="store_true", help="client models ignore labels")
    p.add_argument("--client-model", default="client", help="preset for client models: " + ", ".join(PRESETS))
    p.add_argument("--server-model", default="server", help="preset for the server model: " + ", ".join(PRESETS))
    p.add_argument("--client-channels", default=None, help="override block channels, e.g. 16,32")
    p.add_argument("--server-channels", default=None, help="override block channels, e.g. 32,64,64")
    p.add_argument("--steps", type=int, default=None, help=f"training steps (default {steps})")
    p.set_defaults(default_steps=steps)
    p.add_argument("--batch-size", type=int, default=64, help="per client")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--checkpoint-every", type=int, default=500)
    p.add_argument("--disclose", default="fresh", choices=("fresh", "once"),
                   help="fresh: a new noise draw per upload (default); once: one keyed x_h per image, reused "
                        "every epoch, so the server cannot average copies (see collafuse privacy)")


def train_steps(args: argparse.Namespace) -> int:
    """``--steps`` if given, else the parser's default number of training steps."""
    return args.steps if args.steps is not None else getattr(args, "default_steps", DEFAULT_TRAIN_STEPS)


def run_config_from(args: argparse.Namespace) -> RunConfig:
    steps = train_steps(args)
    data = DataConfig(args.data, args.image_size, args.clients, args.partition, 0.2, args.seed)
    return RunConfig(
        data=data,
        schedule=ScheduleConfig(args.timesteps, args.beta_schedule),
        cut_ratios=_cut_ratios(args.cut_ratio, args.clients),
        client_model=_model(args.client_model, args.client_channels, args.image_size),
        server_model=_model(args.server_model, args.server_channels, args.image_size),
        class_conditional=not args.unconditional,
        server_conditioning=args.server_conditioning,
        objective=args.objective,
        disclose=args.disclose,
        train=TrainConfig(steps=steps, batch_size=args.batch_size, lr=args.lr, ema_decay=args.ema_decay,
                          seed=args.seed, device=args.device,
                          checkpoint_every=min(args.checkpoint_every, max(steps, 1))),
    )


@command("collafuse train")
def cmd_train(args: argparse.Namespace) -> int:
    from .privacy import check_disclosure
    from .train import train

    if args.resume:
        from .checkpoint import read_config

        cfg = read_config(args.out)  # the run's own cuts and schedule; --steps may extend it
        steps = args.steps if args.steps is not None else cfg.train.steps
    else:
        cfg = run_config_from(args)
        steps = cfg.train.steps
    check_disclosure("collafuse train", cfg.cut_ratios, report_path=args.privacy_report,
                     accept=args.accept_disclosure, data=cfg.data.source, timesteps=cfg.schedule.num_train_timesteps,
                     beta_schedule=cfg.schedule.beta_schedule, steps=steps, batch_size=cfg.train.batch_size,
                     disclose=cfg.disclose)
    if args.resume:  # --steps not given: the run's own target
        res = train(None, args.out, resume=True, steps=args.steps)
    else:
        res = train(cfg, args.out)
    print(f"trained to step {res.step} in {res.wall_s:.1f} s ({res.steps_per_s:.2f} steps/s); run: {res.run_dir}")
    return 0


@command("collafuse init")
def cmd_init(args: argparse.Namespace) -> int:
    from .checkpoint import DataInfo
    from .train import init_run

    cfg = run_config_from(args)
    info = None
    if (args.num_classes is None) != (args.channels is None):
        raise ConfigError("--num-classes and --channels go together (the data's shape without the data); "
                          "give both, or neither to read them from --data")
    if args.num_classes is not None:
        for name, v, low in (("--num-classes", args.num_classes, 1), ("--channels", args.channels, 1)):
            if not (low <= v <= 4096):
                raise ConfigError(f"{name} must be an integer in [{low}, 4096], got {v}")
        info = DataInfo("external", args.num_classes, args.channels, args.image_size)
    ckpt = init_run(cfg, args.out, data_info=info)
    print(f"initialised run {args.out} ({cfg.data.num_clients} clients, cut ratios "
          f"{', '.join(f'{c:g}' for c in cfg.cut_ratios)}; untrained weights in {ckpt}); "
          f"next: collafuse serve --run {args.out} --config server.toml --train")
    return 0


def remote_from(args: argparse.Namespace):
    """A :class:`collafuse.remote.RemoteServer` for ``--server URL`` (None without it)."""
    if not getattr(args, "server", None):
        return None
    from .remote import RemoteServer

    return RemoteServer(args.server, args.token, ca_file=args.ca_file)


def run_clients(run, choice: str, remote=None) -> list[int]:
    """The client indices ``--client`` picks: ``all`` means every model the run holds (a site's run
    holds one), or the token's client when the server is remote and the run holds them all."""
    held = [i for i, m in enumerate(run.clients) if m is not None]
    if choice == "all":
        if remote is not None and run.site is None:
            return [remote.info.client]
        return held
    try:
        c = int(choice)
    except ValueError:
        raise ConfigError(f"--client must be 'all' or a client index, got {choice!r}") from None
    if c not in held:
        raise ConfigError(f"--client must be 'all' or one of {', '.join(map(str, held))} (the models in "
                          f"{run.run_dir!r}), got {c}")
    return [c]


def add_remote_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", default=None, metavar="URL",
                   help="run the server's levels on this collafuse server over HTTP (needed for a site's run)")
    p.add_argument("--token", default=None, help="bearer token for --server (default: $COLLAFUSE_TOKEN)")
    p.add_argument("--ca-file", default=None, metavar="PEM", help="CA bundle that signed the server's certificate")


@command("collafuse sample")
def cmd_sample(args: argparse.Namespace) -> int:
    from collafuse_edge.images import check_output_path, save_images

    from .checkpoint import load_run
    from .generate import SampleConfig, require_server, sample_client, to_numpy
    from .train import resolve_device

    sc = SampleConfig(n=args.n, sampler=args.sampler, server_steps=args.server_steps,
                      client_steps=args.client_steps, seed=args.seed)
    out = check_output_path(args.out)
    run = load_run(args.run, device=resolve_device(args.device), server_weights=args.server_checkpoint)
    require_server(run, args.server)
    remote = remote_from(args)
    try:
        clients = run_clients(run, args.client, remote)
        print(f"server weights {remote.model_version + ' at ' + args.server if remote else run.model_version}")
        import numpy as np

        imgs = [to_numpy(sample_client(run, c, sc, progress=True, remote=remote).images) for c in clients]
    finally:
        if remote is not None:
            remote.close()
    save_images(out, np.concatenate(imgs))
    print(f"wrote {sum(len(i) for i in imgs)} images to {out}")
    return 0


@command("collafuse demo")
def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import DemoConfig, run_demo

    report = run_demo(DemoConfig(out=args.out, steps=args.steps, seed=args.seed, quick=args.quick,
                                 in_process=args.in_process))
    out = os.path.abspath(args.out)
    print(f"demo ({report['path']}) finished in {report['wall_s']:.0f} s; outputs in {out}: samples.png, "
          f"losses.png, report.json (with the commands it ran)")
    return 0


@command("collafuse client-train")
def cmd_client_train(args: argparse.Namespace) -> int:
    from .client_train import ClientTrainConfig, ClientTrainer
    from .privacy import check_disclosure

    token = args.token or os.environ.get("COLLAFUSE_TOKEN", "")
    cc = ClientTrainConfig(
        out=args.out, server=args.server, token=token,
        data=DataConfig(args.data, args.image_size, args.clients, args.partition, 0.2, args.seed),
        client_index=args.client_index,
        model=_model(args.client_model, args.client_channels, args.image_size),
        train=TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, ema_decay=args.ema_decay,
                          seed=args.seed, device=args.device,
                          log_every=10, checkpoint_every=min(args.checkpoint_every, args.steps)),
        upload_every=args.upload_every, upload_batch=args.upload_batch,
        retry_for_s=args.retry_for, ca_file=args.ca_file, disclose=args.disclose,
    )
    tr = ClientTrainer(cc)  # asks the server for this token's cut (GET /v1/info); nothing is sent yet
    try:
        you = tr.info["you"]
        if tr.k < tr.schedule.T:  # c = 1 uploads nothing
            floor = you.get("min_handoff_level")
            if floor is not None and tr.level < int(floor):
                raise ConfigError(f"the server refuses this token's uploads below handoff level {floor} and its cut "
                                  f"{float(you['cut_ratio']):g} hands off at level {tr.level}; ask the operator "
                                  "for a larger cut ratio")
        check_disclosure("collafuse client-train", [float(you["cut_ratio"])], report_path=args.privacy_report,
                         accept=args.accept_disclosure, data=args.data, timesteps=tr.schedule.T,
                         beta_schedule=tr.schedule.beta_schedule,
                         steps=args.steps // args.upload_every, batch_size=args.upload_batch, disclose=args.disclose)
        res = tr.run(progress=True)
    finally:
        tr.close()
    sent = "x_h at level %d and each row's class label (the server is label-conditioned)" % tr.level \
        if tr.share_labels else "x_h at level %d only (no labels)" % tr.level
    print(f"client trained to step {res['step']}; uploaded {res['uploaded']} disclosure batches "
          f"({res['bytes_sent']} bytes): {sent}; run: {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .privacy import add_guard_args  # --privacy-report/--accept-disclosure of train and client-train

    p = argparse.ArgumentParser(prog=PROG, description="Collaborative diffusion by split learning (CollaFuse).",
                                epilog="exit codes: 0 ok, 1 an operation failed, 2 bad input, 130 interrupted")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train server + client models in one process")
    t.add_argument("--out", required=True, help="run directory")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    add_run_args(t)
    add_guard_args(t)
    t.set_defaults(func=cmd_train)

    i = sub.add_parser("init", help="start a run for networked training: config + untrained weights, no data needed")
    i.add_argument("--out", required=True, help="run directory (new)")
    add_run_args(i)
    i.add_argument("--num-classes", type=int, default=None,
                   help="number of classes of the sites' data (with --channels: the server needs no data)")
    i.add_argument("--channels", type=int, default=None, help="image channels of the sites' data (1 or 3)")
    i.set_defaults(func=cmd_init)

    s = sub.add_parser("sample", help="split-sample images from a trained run")
    s.add_argument("--run", required=True)
    s.add_argument("--server-checkpoint", default="latest", metavar="WHICH",
                   help="server weights: latest (the networked trainer's newest checkpoint, else the run's), "
                        "run, or a checkpoint folder")
    s.add_argument("--client", default="all", help="client index or 'all'")
    add_remote_args(s)
    s.add_argument("-n", type=int, default=16, help="images per client")
    add_sampler_args(s)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--device", default="auto")
    s.add_argument("--out", required=True, help="output .png (grid) or .npy")
    s.set_defaults(func=cmd_sample)

    d = sub.add_parser("demo", help="the whole story on the embedded digits")
    d.add_argument("--out", default="demo-out")
    d.add_argument("--steps", type=int, default=None,
                   help="training steps per site (default 720; 320 with --in-process): well under 10 min on 2 cores")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--quick", action="store_true", help="a tiny smoke run (about a minute)")
    d.add_argument("--in-process", action="store_true",
                   help="train all sites and the server in one process (the simulation) instead of over HTTP")
    d.set_defaults(func=cmd_demo)

    ct = sub.add_parser("client-train", help="a client's side of networked training: local model + x_h uploads")
    ct.add_argument("--server", required=True, help="server base URL, e.g. https://host:8443")
    ct.add_argument("--token", default=None, help="bearer token (default: $COLLAFUSE_TOKEN)")
    ct.add_argument("--out", required=True, help="the client's own run directory (resumable)")
    ct.add_argument("--data", default="digits")
    ct.add_argument("--image-size", type=int, default=16)
    ct.add_argument("--clients", type=int, default=1, help="simulate a site: partition --data into this many shares")
    ct.add_argument("--client-index", type=int, default=0, help="which share is this client's")
    ct.add_argument("--partition", default="iid")
    ct.add_argument("--client-model", default="client")
    ct.add_argument("--client-channels", default=None)
    ct.add_argument("--steps", type=int, default=DEFAULT_TRAIN_STEPS, help="training steps")
    ct.add_argument("--batch-size", type=int, default=64)
    ct.add_argument("--lr", type=float, default=2e-4)
    ct.add_argument("--ema-decay", type=float, default=0.999, help="EMA of the weights that sample/export use")
    ct.add_argument("--seed", type=int, default=0)
    ct.add_argument("--device", default="auto")
    ct.add_argument("--checkpoint-every", type=int, default=200)
    ct.add_argument("--upload-every", type=int, default=1, help="upload a disclosure batch every N steps")
    ct.add_argument("--upload-batch", type=int, default=64, help="rows per uploaded batch")
    ct.add_argument("--retry-for", type=float, default=600.0, metavar="S",
                    help="keep retrying an unreachable or overloaded server this many seconds (default 600)")
    ct.add_argument("--ca-file", default=None, metavar="PEM", help="CA bundle that signed the server's certificate")
    ct.add_argument("--disclose", default="fresh", choices=("fresh", "once"),
                    help="fresh: a new noise draw per upload (default); once: one keyed x_h per image, reused "
                         "every upload (the key stays in --out)")
    add_guard_args(ct)
    ct.set_defaults(func=cmd_client_train)

    from .metrics.cli import add_evaluate_parser

    add_evaluate_parser(sub)
    from .privacy import add_privacy_parser

    add_privacy_parser(sub)
    from .distill_cli import add_distill_parser

    add_distill_parser(sub)
    for ep in sorted(entry_points(group=COMMANDS_GROUP), key=lambda e: e.name):
        ep.load()(sub)  # a broken plugin raises here: a missing command would be a worse surprise
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else list(argv))
    return run_command(f"{PROG} {args.command}", args.func, args)


if __name__ == "__main__":
    raise SystemExit(main())
