"""collafuse-edge: the torch-free client runtime of collafuse (numpy + onnxruntime + aiohttp).

This package is the bottom layer of the project: it never imports torch or diffusers, and the
rest of collafuse imports its schedule maths and wire protocol from here.
"""
from .errors import (BundleError, CollafuseEdgeError, CollafuseError, InputError, ProtocolError, ScheduleError,
                     ServerError, ServerRequestError)
from .lazy import lazy_getattr
from .schedule import (
    Schedule,
    Timetable,
    client_level_count,
    client_timetable,
    ddim_step,
    ddpm_step,
    handoff_level,
    server_timetable,
)

__version__ = "0.1.0"

# The runtime API loads on first use, so importing the schedule maths stays cheap.
_LAZY = {
    "Bundle": "bundle",
    "load_bundle": "bundle",
    "EdgeRuntime": "runtime",
    "Handoff": "runtime",
    "HandoffSource": "runtime",
    "SamplerConfig": "sampler",
    "OnnxDenoiser": "session",
    "SessionConfig": "session",
}

__getattr__ = lazy_getattr(__name__, _LAZY)


__all__ = [
    "Bundle",
    "BundleError",
    "EdgeRuntime",
    "Handoff",
    "HandoffSource",
    "InputError",
    "OnnxDenoiser",
    "SamplerConfig",
    "SessionConfig",
    "load_bundle",
    "CollafuseEdgeError",
    "CollafuseError",
    "ProtocolError",
    "Schedule",
    "ScheduleError",
    "ServerError",
    "ServerRequestError",
    "Timetable",
    "__version__",
    "client_level_count",
    "client_timetable",
    "ddim_step",
    "ddpm_step",
    "handoff_level",
    "server_timetable",
]
