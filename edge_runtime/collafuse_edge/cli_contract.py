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
``collafuse evaluate`` shares one per-image budget between the sides in proportion to their
levels instead (``--sample-steps``), so that clients with different cuts are compared fairly.
A flag that changed its name stays accepted, hidden, and prints a deprecation notice.
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


def _int_at_least(low: int, what: str):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            v = low - 1
        if v < low:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return v

    return parse


positive_int = _int_at_least(1, "a positive integer")  # argparse ``type=``: an integer ≥ 1
non_negative_int = _int_at_least(0, "a non-negative integer")  # argparse ``type=``: an integer ≥ 0


def add_sampler_args(p: argparse.ArgumentParser, *, server: bool = True,
                     total_steps: int | None = None) -> argparse._ArgumentGroup:
    """``--sampler``, ``--client-steps`` and (with ``server``) ``--server-steps``, the same on every
    command that samples. Steps are DDIM model evaluations per side; DDPM ignores them.

    With ``total_steps`` the command takes one per-image budget, ``--sample-steps`` (default
    ``total_steps``), shared by the two sides in proportion to their levels, instead of the
    per-side flags. Returns the argument group, for a command's own sampler flags."""
    g = p.add_argument_group("sampler")
    g.add_argument("--sampler", choices=SAMPLER_CHOICES, default=DEFAULT_SAMPLER,
                   help=f"ddim: a thinned timetable that hits the handoff level exactly; ddpm: every level "
                        f"(default {DEFAULT_SAMPLER})")
    if total_steps is not None:
        g.add_argument("--sample-steps", type=positive_int, metavar="N", default=total_steps,
                       help=f"DDIM model evaluations per image, shared by server and client in proportion to "
                            f"their levels (default {total_steps})")
        return g
    if server:
        g.add_argument("--server-steps", type=positive_int, metavar="N", default=DEFAULT_SERVER_STEPS,
                       help=f"DDIM model evaluations on the server's levels (default {DEFAULT_SERVER_STEPS})")
    g.add_argument("--client-steps", type=positive_int, metavar="N", default=DEFAULT_CLIENT_STEPS,
                   help=f"DDIM model evaluations on the client's levels (default {DEFAULT_CLIENT_STEPS})")
    return g


class _DeprecatedAlias(argparse.Action):
    """A renamed flag's old spelling: stores into the new flag's ``dest`` and says so on stderr."""

    def __init__(self, option_strings, dest, *, replacement: str, **kwargs):
        self.replacement = replacement
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"{parser.prog}: warning: {option_string} is deprecated here and will be removed; "
              f"use {self.replacement}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_deprecated_alias(p: argparse.ArgumentParser | argparse._ArgumentGroup, flag: str, replacement: str,
                         dest: str, type: Callable[[str], object] | None = None) -> None:
    """Accept ``flag`` (hidden from ``--help``) as the old name of ``replacement`` (whose ``dest``
    it fills), with a deprecation notice on stderr when used."""
    p.add_argument(flag, dest=dest, type=type, default=argparse.SUPPRESS, help=argparse.SUPPRESS,
                   action=_DeprecatedAlias, replacement=replacement)


def run_command(prog: str, func: Callable[[argparse.Namespace], int | None], args: argparse.Namespace) -> int:
    """Call a subcommand's handler and turn our errors into one line on stderr and an exit code."""
    try:
        return int(func(args) or EXIT_OK)
    except CollafuseError as e:  # each class carries its exit code (2: bad input, 1: failed)
        print(f"{prog}: error: {e}", file=sys.stderr)
        return int(getattr(e, "exit_code", EXIT_BAD_INPUT))
    except ImportError as e:
        print(f"{prog}: error: a dependency is missing ({e}); install it and retry", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def command(prog: str) -> Callable[[Callable[[argparse.Namespace], int | None]], Callable[[argparse.Namespace], int]]:
    """Decorator for a subcommand handler: calling it (``args.func(args)``) runs it through
    :func:`run_command`, so the handler itself already keeps the exit-code contract."""

    def wrap(func: Callable[[argparse.Namespace], int | None]) -> Callable[[argparse.Namespace], int]:
        def handler(args: argparse.Namespace) -> int:
            return run_command(prog, func, args)

        handler.__name__ = func.__name__
        handler.__qualname__ = func.__qualname__
        handler.__doc__ = func.__doc__
        handler.__wrapped__ = func  # type: ignore[attr-defined]
        return handler

    return wrap


__all__ = ["DEFAULT_CLIENT_STEPS", "DEFAULT_SAMPLER", "DEFAULT_SERVER_STEPS", "EXIT_BAD_INPUT", "EXIT_FAILURE",
           "EXIT_INTERRUPTED", "EXIT_OK", "SAMPLER_CHOICES", "add_deprecated_alias", "add_sampler_args", "command",
           "non_negative_int", "positive_int", "run_command"]
