"""The contract every collafuse command line keeps (``collafuse``, its ``export``/``serve``/
``evaluate`` subcommands, and ``collafuse-edge``).

Exit codes:

====  ==========================================================================================
0     success
1     an operation failed: a server refused or could not be reached, an export did not validate,
      a dependency is missing (the message says what to install)
2     bad input: a flag, file, bundle, checkpoint or run directory is wrong (the message says
      which and what to do); argparse's own usage errors are 2 as well
130   interrupted (Ctrl-C)
====  ==========================================================================================

Every subcommand stores its handler with ``set_defaults(func=...)``; the handler takes the parsed
namespace and returns an exit code. Flags mean one thing everywhere: ``--steps`` is always a number
of *training* steps; sampling uses ``--sampler {ddpm,ddim}``, ``--server-steps`` and
``--client-steps`` (model evaluations on each side of the cut; DDPM runs every level).
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable

from .errors import CollafuseError

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130

SAMPLER_CHOICES = ("ddpm", "ddim")
DEFAULT_SAMPLER = "ddim"
DEFAULT_SERVER_STEPS = 40
DEFAULT_CLIENT_STEPS = 20


def positive_int(text: str) -> int:
    """argparse ``type=``: an integer ≥ 1."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def non_negative_int(text: str) -> int:
    """argparse ``type=``: an integer ≥ 0."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return v


def add_sampler_args(p: argparse.ArgumentParser, *, server: bool = True) -> None:
    """``--sampler``, ``--client-steps`` and (with ``server``) ``--server-steps``, the same on every
    command that samples. Steps are DDIM model evaluations per side; DDPM ignores them."""
    g = p.add_argument_group("sampler")
    g.add_argument("--sampler", choices=SAMPLER_CHOICES, default=DEFAULT_SAMPLER,
                   help=f"ddim: a thinned timetable that hits the handoff level exactly; ddpm: every level "
                        f"(default {DEFAULT_SAMPLER})")
    if server:
        g.add_argument("--server-steps", type=positive_int, default=DEFAULT_SERVER_STEPS,
                       help=f"DDIM model evaluations on the server's levels (default {DEFAULT_SERVER_STEPS})")
    g.add_argument("--client-steps", type=positive_int, default=DEFAULT_CLIENT_STEPS,
                   help=f"DDIM model evaluations on the client's levels (default {DEFAULT_CLIENT_STEPS})")


def run_command(prog: str, func: Callable[[argparse.Namespace], int | None], args: argparse.Namespace) -> int:
    """Call a subcommand's handler and turn our errors into one line on stderr and an exit code."""
    try:
        return int(func(args) or EXIT_OK)
    except CollafuseError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return int(getattr(e, "exit_code", EXIT_BAD_INPUT))
    except ImportError as e:
        print(f"{prog}: error: a dependency is missing ({e}); install it and retry", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


__all__ = ["DEFAULT_CLIENT_STEPS", "DEFAULT_SAMPLER", "DEFAULT_SERVER_STEPS", "EXIT_BAD_INPUT", "EXIT_FAILURE",
           "EXIT_INTERRUPTED", "EXIT_OK", "SAMPLER_CHOICES", "add_sampler_args", "non_negative_int",
           "positive_int", "run_command"]
