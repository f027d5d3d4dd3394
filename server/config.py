"""Server configuration: frozen dataclasses, and the JSON/TOML file that holds limits and tokens.

A config file (``collafuse serve --run DIR --config server.toml``)::

    [server]                      # optional; any ServerConfig field except run_dir/tokens
    max_n = 64
    max_batch_rows = 256
    body_timeout_s = 60           # slow peers: also keepalive_timeout_s, send_timeout_s (docs/reliability.md)
    token_reload_s = 5            # re-read [[tokens]] when this file changes (and on SIGHUP); 0 = SIGHUP only

    [[tokens]]
    name = "hospital-a"           # shown in logs and metrics (the token itself never is)
    client = 0                    # index into the run's clients
    sha256 = "9f86d0…"            # sha256 hex digest of the bearer token (the token is not stored)
    max_n = 16                    # optional: images per request (≤ server max_n)
    requests_per_minute = 120     # optional: token-bucket rate limit
    burst = 20                    # optional: bucket size (default: 10 s worth, at least 1)
    images_per_day = 5000         # optional: quota per UTC day (per server process)
    cut_ratio = 0.6               # optional: must give one of the run's handoff levels;
                                  #   default the client's own cut ratio
    min_handoff_level = 400       # optional: uploads (POST /v1/train) of x_h below this level are
                                  #   refused with 403 handoff_below_minimum (inference is not affected)

The same document as JSON: ``{"server": {…}, "tokens": [{…}, …]}``.
``collafuse serve --new-token K`` prints a fresh token and its entry.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import secrets
from dataclasses import dataclass
from typing import Any

from collafuse_edge.validation import check_choice, check_int, check_number, is_int, is_number

from .errors import ServerConfigError

PRECISIONS = ("fp32", "bf16", "fp16")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def hash_token(token: str) -> str:
    """The sha256 hex digest a config file stores for ``token``."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def new_token() -> str:
    """A fresh random bearer token (256 bits, URL-safe)."""
    return secrets.token_urlsafe(32)


@dataclass(frozen=True)
class TokenEntry:
    """One client credential. Only the sha256 digest of the token is kept."""

    sha256: str  # hex digest of the bearer token
    client: int  # index into the run's clients
    name: str = ""  # label for logs/metrics; defaults to "client-<client>"
    cut_ratio: float | None = None  # None: the run's cut ratio for this client
    max_n: int | None = None  # images per request; None: the server's max_n
    requests_per_minute: float | None = None  # None: unlimited
    burst: int | None = None  # bucket size; None: 10 s worth of requests (≥ 1)
    images_per_day: int | None = None  # None: unlimited
    disabled: bool = False  # a revoked token: answered with 403
    min_handoff_level: int | None = None  # uploads of x_h below this level: 403; None: no minimum

    def __post_init__(self) -> None:
        where = f"token {self.name or self.client!r}: "
        if not isinstance(self.sha256, str) or not _HEX64.match(self.sha256):
            raise ServerConfigError(
                f"{where}sha256 must be the 64-character lowercase hex sha256 digest of the token "
                "(see `collafuse serve --new-token K`); plain tokens are not stored in config files"
            )
        if not is_int(self.client) or self.client < 0:
            raise ServerConfigError(f"{where}client must be a client index ≥ 0, got {self.client!r}")
        if not isinstance(self.name, str):
            raise ServerConfigError(f"{where}name must be a string, got {self.name!r}")
        if not self.name:
            object.__setattr__(self, "name", f"client-{self.client}")
        check_number(f"{where}cut_ratio", self.cut_ratio, low=0, high=1, allow_none=True, error=ServerConfigError)
        check_int(f"{where}max_n", self.max_n, low=1, allow_none=True, error=ServerConfigError)
        check_number(f"{where}requests_per_minute", self.requests_per_minute, positive=True, allow_none=True,
                     error=ServerConfigError)
        check_int(f"{where}burst", self.burst, low=1, allow_none=True, error=ServerConfigError)
        check_int(f"{where}images_per_day", self.images_per_day, low=1, allow_none=True, error=ServerConfigError)
        check_int(f"{where}min_handoff_level", self.min_handoff_level, low=0, allow_none=True,
                  error=ServerConfigError)
        if not isinstance(self.disabled, bool):
            raise ServerConfigError(f"{where}disabled must be true or false, got {self.disabled!r}")


@dataclass(frozen=True)
class ServerConfig:
    """Everything ``collafuse serve`` needs. The constructor is the config."""

    run_dir: str  # a trained run directory (collafuse train --out DIR)
    tokens: tuple[TokenEntry, ...] = ()
    host: str = "127.0.0.1"
    port: int = 8080
    device: str = "auto"  # "auto" (CUDA when present), "cpu", "cuda", "cuda:N"
    precision: str = "fp32"  # fp32 keeps results equal to in-process sampling; bf16/fp16 autocast
    compile: bool = False  # torch.compile the server model (batch padded to buckets)
    cuda_graphs: bool = False  # capture one CUDA graph per batch bucket (CUDA only)
    threads: int = 0  # torch intra-op threads; 0 = torch's default
    batching: bool = True  # step-level batching across requests; False = one request at a time
    max_batch_rows: int = 256  # rows (images) per model forward
    max_n: int = 64  # images per request (a token may lower it)
    max_queue: int = 1024  # waiting requests before the server answers 503
    max_body_bytes: int = 64 * 1024  # request body limit (413 above)
    drain_timeout_s: float = 30.0  # how long shutdown waits for in-flight requests
    tls_cert: str | None = None  # PEM certificate chain: serve HTTPS
    tls_key: str | None = None  # PEM private key of tls_cert
    warmup: bool = True  # run every batch bucket once before /readyz says ready
    workers: int = 1  # >1: gunicorn with aiohttp workers (one process each; needs gunicorn)
    train: bool = False  # accept POST /v1/train and train the server model in the background
    max_train_rows: int = 1024  # rows per uploaded training batch
    max_train_body_bytes: int = 16 * 2**20  # upload body limit for POST /v1/train (413 above)
    train_batch_rows: int = 256  # rows per server update (uploads mixed across clients)
    train_checkpoint_every: int = 50  # server updates between checkpoints / weight publications
    max_pending_batches: int = 1024  # queued uploads before POST /v1/train answers 429
    # Slow or stalled peers (docs/reliability.md): each bounds how long one connection can hold the server.
    keepalive_timeout_s: float = 15.0  # idle connection, or one that never finishes sending its headers
    body_timeout_s: float = 60.0  # receiving one request body, once its headers are in (408 after)
    send_timeout_s: float = 60.0  # writing one response to a client that does not read it (then closed)
    # Token rotation: re-read the [[tokens]] of config_file when its mtime changes (checked every
    # token_reload_s seconds; 0 = only on SIGHUP). Set by load_server_config; None = no file.
    config_file: str | None = None
    token_reload_s: float = 5.0
    # Which server weights: "latest" (the networked trainer's newest checkpoint, else the run's),
    # "run" (the run's own), or a checkpoint folder. With "latest" and no --train, a serving process
    # looks for newer trainer checkpoints every weights_poll_s seconds (0 = never) and swaps them in.
    server_checkpoint: str = "latest"
    weights_poll_s: float = 5.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "tokens", tuple(self.tokens))
        if not isinstance(self.run_dir, str) or not self.run_dir:
            raise ServerConfigError(f"run_dir must be a run directory path, got {self.run_dir!r}")
        check_int("port", self.port, low=0, high=65535, error=ServerConfigError)
        check_choice("precision", self.precision, PRECISIONS, error=ServerConfigError)
        if not is_int(self.threads) or self.threads < 0:
            raise ServerConfigError(f"threads must be an integer ≥ 0, got {self.threads!r}")
        if not isinstance(self.train, bool):
            raise ServerConfigError(f"train must be true or false, got {self.train!r}")
        if self.train and self.workers > 1:
            raise ServerConfigError("train = true needs workers = 1: one process owns the training queue; "
                                    "scale training out with torchrun (docs/operations.md)")
        for name in ("max_train_rows", "max_train_body_bytes", "train_batch_rows", "train_checkpoint_every",
                     "max_pending_batches", "max_batch_rows", "max_n", "max_queue", "max_body_bytes", "workers"):
            check_int(name, getattr(self, name), low=1, error=ServerConfigError)
        if self.max_n > self.max_batch_rows:
            raise ServerConfigError(
                f"max_n ({self.max_n}) must not exceed max_batch_rows ({self.max_batch_rows}): "
                "a request must fit into one model forward"
            )
        for name in ("drain_timeout_s", "keepalive_timeout_s", "body_timeout_s", "send_timeout_s"):
            check_number(name, getattr(self, name), positive=True, error=ServerConfigError)
        check_number("weights_poll_s", self.weights_poll_s, low=0, error=ServerConfigError)
        if not isinstance(self.server_checkpoint, str) or not self.server_checkpoint:
            raise ServerConfigError(f"server_checkpoint must be latest, run or a checkpoint folder, "
                                    f"got {self.server_checkpoint!r}")
        if not is_number(self.token_reload_s) or not (self.token_reload_s >= 0) or math.isinf(self.token_reload_s):
            raise ServerConfigError(f"token_reload_s must be a number of seconds ≥ 0 (0: only on SIGHUP), "
                                    f"got {self.token_reload_s!r}")
        if self.config_file is not None and not isinstance(self.config_file, str):
            raise ServerConfigError(f"config_file must be a path, got {self.config_file!r}")
        for name in ("batching", "compile", "cuda_graphs", "warmup"):
            if not isinstance(getattr(self, name), bool):
                raise ServerConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ServerConfigError("tls_cert and tls_key go together: give both or neither")
        for name in ("tls_cert", "tls_key"):
            p = getattr(self, name)
            if p is not None and not os.path.isfile(p):
                raise ServerConfigError(f"{name} {p!r} is not a file")
        seen: dict[str, str] = {}
        for t in self.tokens:
            if not isinstance(t, TokenEntry):
                raise ServerConfigError(f"tokens must hold TokenEntry objects, got {type(t).__name__}")
            if t.sha256 in seen:
                raise ServerConfigError(f"tokens {seen[t.sha256]!r} and {t.name!r} have the same digest")
            seen[t.sha256] = t.name
            if t.max_n is not None and t.max_n > self.max_n:
                raise ServerConfigError(
                    f"token {t.name!r}: max_n {t.max_n} exceeds the server's max_n {self.max_n}"
                )

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None


_SERVER_FIELDS = {f.name for f in dataclasses.fields(ServerConfig)} - {"run_dir", "tokens", "config_file"}
_TOKEN_FIELDS = {f.name for f in dataclasses.fields(TokenEntry)}


def read_config_file(path: str) -> dict:
    """The raw document of a JSON (``.json``) or TOML (``.toml``) server config file."""
    if not os.path.isfile(path):
        raise ServerConfigError(f"server config file {path!r} does not exist")
    try:
        if path.endswith(".toml"):
            import tomllib

            with open(path, "rb") as f:
                doc = tomllib.load(f)
        elif path.endswith(".json"):
            with open(path, encoding="utf-8") as f:
                doc = json.load(f)
        else:
            raise ServerConfigError(f"server config file {path!r} must end in .json or .toml")
    except ServerConfigError:
        raise
    except (ValueError, OSError) as e:  # json.JSONDecodeError and tomllib.TOMLDecodeError are ValueErrors
        raise ServerConfigError(f"server config file {path!r} cannot be parsed: {e}") from e
    if not isinstance(doc, dict):
        raise ServerConfigError(f"server config file {path!r} must hold a table/object at the top")
    unknown = set(doc) - {"server", "tokens"}
    if unknown:
        raise ServerConfigError(f"server config file {path!r}: unknown top-level keys {sorted(unknown)}; "
                                "allowed: server, tokens")
    return doc


def tokens_from(raw: Any, where: str) -> tuple[TokenEntry, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ServerConfigError(f"{where}: tokens must be a list of tables/objects")
    out = []
    for i, entry in enumerate(raw):
        if not isinstance(entry, dict):
            raise ServerConfigError(f"{where}: tokens[{i}] must be a table/object")
        unknown = set(entry) - _TOKEN_FIELDS
        if unknown:
            hint = " (store its sha256 digest instead)" if "token" in unknown else ""
            raise ServerConfigError(f"{where}: tokens[{i}] has unknown keys {sorted(unknown)}{hint}; "
                                    f"allowed: {', '.join(sorted(_TOKEN_FIELDS))}")
        if "sha256" not in entry or "client" not in entry:
            raise ServerConfigError(f"{where}: tokens[{i}] needs at least 'sha256' and 'client'")
        out.append(TokenEntry(**entry))
    return tuple(out)


def load_server_config(run_dir: str, path: str | None = None, **overrides: Any) -> ServerConfig:
    """A ServerConfig from an optional config file, with ``overrides`` (e.g. CLI flags) on top.

    Overrides whose value is None are ignored, so argparse defaults of None mean "not given".
    """
    server: dict[str, Any] = {}
    tokens: tuple[TokenEntry, ...] = ()
    if path is not None:
        doc = read_config_file(path)
        raw_server = doc.get("server", {})
        if not isinstance(raw_server, dict):
            raise ServerConfigError(f"{path}: [server] must be a table/object")
        unknown = set(raw_server) - _SERVER_FIELDS
        if unknown:
            raise ServerConfigError(f"{path}: [server] has unknown keys {sorted(unknown)}; "
                                    f"allowed: {', '.join(sorted(_SERVER_FIELDS))}")
        server.update(raw_server)
        tokens = tokens_from(doc.get("tokens"), path)
    if path is not None:
        server["config_file"] = os.path.abspath(path)
    for k, v in overrides.items():
        if k not in _SERVER_FIELDS and k not in ("tokens", "config_file"):
            raise ServerConfigError(f"unknown server option {k!r}")
        if v is not None:
            server[k] = v
    if "tokens" in server:
        tokens = tuple(server.pop("tokens"))
    try:
        return ServerConfig(run_dir=run_dir, tokens=tokens, **server)
    except TypeError as e:
        raise ServerConfigError(f"invalid server option: {e}") from e


def load_tokens(path: str) -> tuple[TokenEntry, ...]:
    """Only the ``[[tokens]]`` of a config file, fully validated (token rotation re-reads these)."""
    return tokens_from(read_config_file(path).get("tokens"), path)


_TOKEN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def check_token_name(name: str, what: str = "name") -> str:
    """A token name for a new config entry: 1-64 of ``[A-Za-z0-9._-]``, starting with a letter or
    digit (it becomes a TOML string, a log word and a metrics label)."""
    if not isinstance(name, str) or not _TOKEN_NAME.match(name):
        raise ServerConfigError(f"{what} must be 1-64 characters of letters, digits, '.', '_' or '-', starting "
                                f"with a letter or digit (e.g. hospital-a), got {name!r}")
    return name


def token_entry_text(token: str, client: int, name: str = "") -> str:
    """The TOML entry to paste into a config file for ``token`` (what --new-token prints)."""
    if name:
        check_token_name(name)
    lines = ["[[tokens]]", f'name = "{name or f"client-{client}"}"', f"client = {client}",
             f'sha256 = "{hash_token(token)}"']
    return "\n".join(lines) + "\n"


__all__ = ["PRECISIONS", "ServerConfig", "TokenEntry", "check_token_name", "hash_token", "load_server_config",
           "load_tokens", "new_token", "read_config_file", "token_entry_text", "tokens_from"]
