"""Flag tables for the docs, generated from an argparse parser, so the docs cannot drift from the
code. Shared by ``collafuse`` and ``collafuse-edge``; it needs argparse only (no torch, numpy or
collafuse).

:func:`flags_table` renders one (sub)parser's flags as a Markdown table, exactly the rows
``--help`` shows: flags hidden with ``argparse.SUPPRESS`` (deprecated aliases) stay hidden.
:func:`command_sections` lists every subcommand of a parser with its table, and
:func:`update_block` rewrites the generated block of a Markdown file: between
:data:`BLOCK_BEGIN` … and :data:`BLOCK_END`, one ``### PROG NAME`` heading per subcommand, then
``<!-- KEY flags: … -->``, the table and ``<!-- end of KEY flags -->``. Text written by hand
between a heading and its table is kept; everything outside the block is left as it is.
"""
from __future__ import annotations

import argparse
import re
from dataclasses import dataclass

BLOCK_BEGIN = "<!-- command flags: generated"
BLOCK_END = "<!-- end of command flags -->"


@dataclass(frozen=True)
class Section:
    title: str  # the heading: "collafuse train", "collafuse-edge generate"
    key: str  # the marker name: "<!-- KEY flags: … -->"
    table: str  # flags_table() of the subcommand


def _flag(formatter: argparse.HelpFormatter, a: argparse.Action) -> str:
    if not a.option_strings:  # a positional argument
        return formatter._format_args(a, a.dest)
    flag = ", ".join(a.option_strings)
    if a.nargs != 0:
        flag += " " + formatter._format_args(a, formatter._get_default_metavar_for_optional(a))
    return flag


def _help(a: argparse.Action, prog: str) -> str:
    text = a.help or ""
    if "%" in text:  # as argparse expands it for --help
        params = {k: v for k, v in vars(a).items() if v is not argparse.SUPPRESS}
        params["prog"] = prog
        if params.get("choices") is not None:
            params["choices"] = ", ".join(str(c) for c in params["choices"])
        text = text % params
    return text


def _default_text(value: object) -> str:
    if isinstance(value, (tuple, list)):
        return ",".join(str(v) for v in value)
    return str(value)


def _meaning(a: argparse.Action, prog: str, groups: list[argparse._MutuallyExclusiveGroup]) -> str:
    parts = [_help(a, prog)]
    shown = parts[0].lower()
    no_default = a.default is None or a.default is False or a.default is argparse.SUPPRESS
    if a.nargs != 0 and not no_default and a.option_strings and "default" not in shown:
        parts.append(f"(default {_default_text(a.default)})")
    if a.required:
        parts.append("(required)")
    for g in groups:
        if a in g._group_actions:
            names = ", ".join(f"`{x.option_strings[0] if x.option_strings else x.dest}`"
                              for x in g._group_actions if x.help != argparse.SUPPRESS)
            parts.append(f"({'exactly' if g.required else 'at most'} one of {names})")
    return " ".join(p for p in parts if p)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def flags_table(parser: argparse.ArgumentParser) -> str:
    """The parser's arguments as a Markdown table ``| flag | meaning |``, in ``--help``'s order,
    without ``-h/--help`` and without hidden (``argparse.SUPPRESS``) flags."""
    formatter = argparse.HelpFormatter(parser.prog)
    groups = list(parser._mutually_exclusive_groups)
    rows = ["| flag | meaning |", "|------|---------|"]
    for a in parser._actions:
        if a.help == argparse.SUPPRESS or isinstance(a, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        rows.append(f"| `{_cell(_flag(formatter, a))}` | {_cell(_meaning(a, parser.prog, groups))} |")
    return "\n".join(rows) + "\n"


def subcommands(parser: argparse.ArgumentParser) -> list[tuple[str, argparse.ArgumentParser]]:
    """``(name, subparser)`` for every subcommand, in the order they were added."""
    out: list[tuple[str, argparse.ArgumentParser]] = []
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            seen: set[int] = set()
            for name, p in a.choices.items():  # aliases map to the same parser: list it once
                if id(p) not in seen:
                    seen.add(id(p))
                    out.append((name, p))
    return out


def command_sections(prog: str, parser: argparse.ArgumentParser, key_prefix: str = "") -> list[Section]:
    """One :class:`Section` per subcommand of ``parser`` (the command ``prog``)."""
    return [Section(f"{prog} {name}", f"{key_prefix}{name}", flags_table(p)) for name, p in subcommands(parser)]


def _block_span(doc: str) -> tuple[int, int]:
    start = doc.find(BLOCK_BEGIN)
    if start < 0 or (start > 0 and doc[start - 1] != "\n"):
        raise ValueError(f"no line starting with {BLOCK_BEGIN!r}: add the block's two marker lines "
                         f"(… and {BLOCK_END!r}) where the tables should go")
    end = doc.find(BLOCK_END, start)
    if end < 0:
        raise ValueError(f"the generated block has no end line {BLOCK_END!r}")
    return start, end + len(BLOCK_END)


_HEADING_NOTES = re.compile(r"^### ([^\n]+)\n(.*?)^<!-- [^\n]*? flags: generated", re.M | re.S)


def block_notes(doc: str) -> dict[str, str]:
    """The hand-written text between each heading of the generated block and its table."""
    start, end = _block_span(doc)
    return {m.group(1).strip(): m.group(2).strip() for m in _HEADING_NOTES.finditer(doc[start:end])}


def render_block(sections: list[Section], refresh: str, notes: dict[str, str] | None = None) -> str:
    """The generated block (from :data:`BLOCK_BEGIN` to :data:`BLOCK_END`), ``refresh`` being the
    command that rewrites it."""
    notes = notes or {}
    out = [f"{BLOCK_BEGIN} by `{refresh}` (a test keeps them equal); "
           "text between a heading and its table is written by hand and kept -->\n"]
    for s in sections:
        out.append(f"### {s.title}\n\n")
        if notes.get(s.title):
            out.append(notes[s.title] + "\n\n")
        out.append(f"<!-- {s.key} flags: generated from the parser by `{refresh}` -->\n")
        out.append(s.table)
        out.append(f"<!-- end of {s.key} flags -->\n\n")
    out.append(BLOCK_END)
    return "".join(out)


def update_block(doc: str, sections: list[Section], refresh: str) -> tuple[str, list[str]]:
    """``doc`` with its generated block rewritten from ``sections``, keeping the hand-written notes
    of the commands that still exist; also the titles whose notes were dropped (commands gone)."""
    start, end = _block_span(doc)
    notes = block_notes(doc)
    titles = {s.title for s in sections}
    dropped = [t for t, text in notes.items() if text and t not in titles]
    return doc[:start] + render_block(sections, refresh, notes) + doc[end:], dropped
