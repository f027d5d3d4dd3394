"""``collafuse serve``: the handoff server of a trained run.

    collafuse serve --run runs/demo --config server.toml --host 0.0.0.0 --port 8080
    collafuse serve --run runs/demo --config server.toml --workers 4        # gunicorn, 4 processes
    collafuse serve --new-token 0                                           # a token for client 0
    collafuse serve --new-token 0 --name site-a --json                      # … as JSON, for scripts

The ``collafuse`` command finds :func:`add_serve_parser` through the ``collafuse.commands`` entry
point; the handler returns an exit code. Parsing imports neither torch nor aiohttp.

Exit codes (:mod:`collafuse_edge.cli_contract`): 0 ok (also after a graceful shutdown); 1 an
operation failed; 2 bad input (run directory, config file, tokens, flags); 130 interrupted.
"""
from __future__ import annotations

import argparse
import logging

from collafuse_edge.cli_contract import command

from .config import PRECISIONS


def add_serve_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "serve", help="serve the server's denoising levels over HTTP (aiohttp, step-level batching)",
        description="Serve POST /v1/handoff for the clients of a trained run: the server model runs the "
                    "high-noise levels of many requests in shared batches. Client tokens and limits come "
                    "from --config (JSON or TOML); flags override its [server] table.",
    )
    p.add_argument("--run", metavar="DIR", help="a trained run directory")
    p.add_argument("--config", metavar="FILE", help="server config (.json or .toml): [server] options and [[tokens]]")
    p.add_argument("--host", default=None, metavar="ADDR", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, metavar="N", help="port (default 8080)")
    p.add_argument("--device", default=None, help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="fp32 (default; equal to in-process sampling), bf16 or fp16 autocast (faster, not equal)")
    p.add_argument("--compile", action="store_true", default=None, help="torch.compile the server model")
    p.add_argument("--cuda-graphs", action="store_true", default=None, help="CUDA graphs per batch bucket (CUDA)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--no-batching", dest="batching", action="store_false", default=None,
                   help="serve one request at a time (baseline)")
    p.add_argument("--max-batch-rows", type=int, default=None, metavar="N", help="rows per model forward (default 256)")
    p.add_argument("--max-n", type=int, default=None, metavar="N", help="images per request (default 64)")
    p.add_argument("--max-queue", type=int, default=None, metavar="N",
                   help="waiting requests before 503 (default 1024)")
    p.add_argument("--max-body-bytes", type=int, default=None, metavar="BYTES",
                   help="request body limit (default 65536)")
    p.add_argument("--drain-timeout", dest="drain_timeout_s", type=float, default=None, metavar="S",
                   help="seconds shutdown waits for in-flight requests (default 30)")
    p.add_argument("--tls-cert", default=None, metavar="PEM", help="serve HTTPS with this certificate chain")
    p.add_argument("--tls-key", default=None, metavar="PEM", help="private key of --tls-cert")
    p.add_argument("--no-warmup", dest="warmup", action="store_false", default=None,
                   help="skip the warm-up forward(s) before /readyz turns ready")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="processes (default 1); >1 runs gunicorn's aiohttp worker (pip install gunicorn)")
    p.add_argument("--train", action="store_true", default=None,
                   help="accept POST /v1/train uploads and train the server model in the background")
    p.add_argument("--server-checkpoint", default=None, metavar="WHICH",
                   help="server weights: latest (default: the networked trainer's newest checkpoint, else the "
                        "run's; picked up while serving), run (the run's own), or a checkpoint folder")
    p.add_argument("--weights-poll", dest="weights_poll_s", type=float, default=None, metavar="S",
                   help="without --train: look for newer trainer checkpoints every S seconds (default 5; 0 = never)")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"),
                   help="log lines at this level and above (default info); each line carries the process id")
    p.add_argument("--new-token", type=int, metavar="K", default=None,
                   help="print a fresh token for client K and the [[tokens]] entry to add, then exit")
    p.add_argument("--name", default=None, metavar="NAME",
                   help="with --new-token: the token's name in logs and metrics (default client-K)")
    p.add_argument("--json", action="store_true",
                   help="with --new-token: print one JSON object (token, client, name, sha256, config_entry) so a "
                        "script can store the secret and the config entry apart")
    p.set_defaults(func=cmd_serve)
    return p


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"

_OPTIONS = ("host", "port", "device", "precision", "compile", "cuda_graphs", "threads", "batching",
            "max_batch_rows", "max_n", "max_queue", "max_body_bytes", "drain_timeout_s", "tls_cert",
            "tls_key", "warmup", "workers", "train", "server_checkpoint", "weights_poll_s")


@command("collafuse serve")
def cmd_serve(args: argparse.Namespace) -> int:
    from .config import load_server_config
    from .errors import ServerConfigError

    if args.new_token is not None:
        return _print_new_token(args.new_token, args.name, args.json)
    if args.name is not None or args.json:
        raise ServerConfigError("--name and --json go with --new-token K (they describe the token it prints)")
    if not args.run:
        raise ServerConfigError("--run DIR is required: the trained run whose server model to serve")
    # %(process)d: under --workers N every line says which worker wrote it
    logging.basicConfig(level=args.log_level.upper(), format=LOG_FORMAT)
    cfg = load_server_config(args.run, args.config, **{k: getattr(args, k) for k in _OPTIONS})
    from .serve import serve

    serve(cfg)
    return 0


def _print_new_token(client: int, name: str | None, as_json: bool) -> int:
    import json

    from .config import check_token_name, hash_token, new_token, token_entry_text
    from .errors import ServerConfigError

    if client < 0:
        raise ServerConfigError(f"--new-token takes a client index ≥ 0, got {client}")
    if name is not None:
        check_token_name(name, "--name")
    tok = new_token()
    entry = token_entry_text(tok, client, name or "")
    if as_json:
        print(json.dumps({"token": tok, "client": client, "name": name or f"client-{client}",
                          "sha256": hash_token(tok), "config_entry": entry}))
        return 0
    print(f"token (give it to client {client}; it is shown only now):\n  {tok}\n")
    print("add to the server config file:\n")
    print(entry)
    return 0


def flags_markdown() -> str:
    """The table of ``collafuse serve``'s flags in docs/api.md, generated from the parser itself by
    :func:`collafuse_edge.cli_docs.flags_table` (``python -m collafuse.server.cli`` prints it;
    ``python -m collafuse.cli_docs --write docs/api.md`` writes every command's table)."""
    from collafuse_edge.cli_docs import flags_table

    parser = argparse.ArgumentParser(prog="collafuse")
    return flags_table(add_serve_parser(parser.add_subparsers()))


if __name__ == "__main__":
    print(flags_markdown(), end="")
