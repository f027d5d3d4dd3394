"""collafuse.server: the aiohttp endpoint that runs the server's high-noise levels for many clients.

    from collafuse.server import ServerConfig, TokenEntry, create_app, hash_token
    app = create_app(ServerConfig("runs/demo", tokens=(TokenEntry(hash_token(tok), client=0),)))

CLI: ``collafuse serve --run DIR --config server.toml [--host H] [--port P] [--workers N]``.
Routes and the wire format: ``server/openapi.json`` and :mod:`collafuse_edge.protocol`.
Names load on first use, so wiring the CLI parser imports neither torch nor aiohttp.
"""
from collafuse_edge.lazy import lazy_getattr

_LAZY = {
    "create_app": "app",
    "STATE": "state",
    "ServerState": "state",
    "ServerConfig": "config",
    "TokenEntry": "config",
    "hash_token": "config",
    "load_server_config": "config",
    "new_token": "config",
    "HandoffSpec": "engine",
    "StepEngine": "engine",
    "ApiError": "errors",
    "ServerConfigError": "errors",
    "openapi_document": "openapi",
    "add_serve_parser": "cli",
    "serve": "serve",
}

__all__ = sorted(_LAZY)

__getattr__ = lazy_getattr(__name__, _LAZY)
