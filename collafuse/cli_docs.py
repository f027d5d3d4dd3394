"""The flag tables of docs/api.md ("Command line"), generated from the parsers of ``collafuse``
(every subcommand, plugins included) and ``collafuse-edge``:

    python -m collafuse.cli_docs --write docs/api.md      # rewrite the generated block
    python -m collafuse.cli_docs --check docs/api.md      # exit 1 when it is out of date
    python -m collafuse.cli_docs                          # print the block

The rendering lives in :mod:`collafuse_edge.cli_docs` (argparse only); this module gathers the
two parsers. A test keeps docs/api.md equal to the output.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from collafuse_edge.cli_docs import Section, command_sections, render_block, update_block

DOC = "docs/api.md"
REFRESH = f"python -m collafuse.cli_docs --write {DOC}"


def sections() -> list[Section]:
    """Every subcommand of ``collafuse`` (in ``--help``'s order), then every one of ``collafuse-edge``."""
    from collafuse_edge.cli import PROG as EDGE_PROG
    from collafuse_edge.cli import build_parser as build_edge_parser

    from .cli import PROG, build_parser

    return (command_sections(PROG, build_parser())
            + command_sections(EDGE_PROG, build_edge_parser(), key_prefix=f"{EDGE_PROG} "))


def updated(doc: str) -> tuple[str, list[str]]:
    """``doc`` (the text of docs/api.md) with its generated block refreshed; also the headings whose
    hand-written notes were dropped because their command is gone."""
    return update_block(doc, sections(), REFRESH)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m collafuse.cli_docs",
                                 description="Generate the command-line flag tables of docs/api.md.")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--write", metavar="FILE", help="rewrite the generated block of FILE in place")
    mode.add_argument("--check", metavar="FILE", help="exit 1 if FILE's generated block is out of date")
    args = ap.parse_args(argv)
    path = args.write or args.check
    if path is None:
        print(render_block(sections(), REFRESH))
        return 0
    with open(path, encoding="utf-8") as f:
        doc = f.read()
    try:
        new, dropped = updated(doc)
    except ValueError as e:
        print(f"{ap.prog}: error: {path}: {e}", file=sys.stderr)
        return 2
    if args.check:
        if new != doc:
            print(f"{path}: the command flag tables are out of date; run: {REFRESH}", file=sys.stderr)
            return 1
        return 0
    for title in dropped:
        print(f"{ap.prog}: note: dropped the text under '### {title}' (no such command any more)", file=sys.stderr)
    if new != doc:
        with open(path, "w", encoding="utf-8") as f:
            f.write(new)
        print(f"updated {path}")
    else:
        print(f"{path} is up to date")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
