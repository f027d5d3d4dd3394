"""collafuse-edge: the torch-free client runtime of collafuse (numpy + onnxruntime + aiohttp).

This package is the bottom layer of the project: it never imports torch or diffusers, and the
rest of collafuse imports its schedule maths and wire protocol from here.
"""
from .errors import BundleError, CollafuseEdgeError, ProtocolError, ScheduleError, ServerError
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

__all__ = [
    "BundleError",
    "CollafuseEdgeError",
    "ProtocolError",
    "Schedule",
    "ScheduleError",
    "ServerError",
    "Timetable",
    "__version__",
    "client_level_count",
    "client_timetable",
    "ddim_step",
    "ddpm_step",
    "handoff_level",
    "server_timetable",
]
