"""docs/api.md's command-line flag tables are generated from the parsers of ``collafuse`` and
``collafuse-edge`` (collafuse.cli_docs); the doc must equal the generator's output."""
from __future__ import annotations

import argparse
import os
import re

import pytest

from collafuse.cli_docs import DOC, REFRESH, main, sections, updated
from collafuse_edge.cli_docs import BLOCK_BEGIN, BLOCK_END, Section, flags_table, render_block, update_block

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")


def _doc() -> str:
    with open(os.path.join(ROOT, DOC), encoding="utf-8") as f:
        return f.read()


def test_api_md_equals_the_generated_flag_tables():
    doc = _doc()
    new, dropped = updated(doc)
    assert not dropped
    assert new == doc, f"{DOC}'s command flag tables are out of date; run: {REFRESH}"


def test_every_subcommand_of_both_commands_has_its_heading_and_table():
    from collafuse.cli import build_parser
    from collafuse_edge.cli import build_parser as build_edge_parser
    from collafuse_edge.cli_docs import subcommands

    doc = _doc()
    block = doc[doc.index(BLOCK_BEGIN):doc.index(BLOCK_END)]
    headings = re.findall(r"^### (.+)$", block, re.M)
    want = ([f"collafuse {n}" for n, _ in subcommands(build_parser())]
            + [f"collafuse-edge {n}" for n, _ in subcommands(build_edge_parser())])
    assert headings == want == [s.title for s in sections()]
    for name in ("train", "init", "sample", "demo", "client-train", "evaluate", "export", "serve"):
        assert f"collafuse {name}" in headings
    for name in ("info", "bench", "generate"):
        assert f"collafuse-edge {name}" in headings
    for s in sections():
        assert f"<!-- {s.key} flags: generated" in block and f"<!-- end of {s.key} flags -->" in block


def _table(doc: str, key: str) -> str:
    m = re.search(rf"<!-- {re.escape(key)} flags: generated[^\n]*-->\n(.*?)<!-- end of {re.escape(key)} flags -->",
                  doc, re.S)
    assert m is not None, key
    return m.group(1)


def test_hidden_flags_stay_hidden_and_the_others_are_listed():
    doc = _doc()
    evaluate = _table(doc, "evaluate")
    assert "`--sample-steps N`" in evaluate and "`--steps" not in evaluate  # renamed, hidden
    for cmd in ("bench", "generate"):
        table = _table(doc, f"collafuse-edge {cmd}")
        assert "`--client-steps N`" in table and "`--steps" not in table
        assert "`-h, --help`" not in table
    assert "`--steps STEPS` | training steps (default 3000) |" in _table(doc, "train")
    assert "`--out OUT` | run directory (required) |" in _table(doc, "train")


def test_the_serve_table_is_the_servers_own():
    from collafuse.server.cli import flags_markdown

    assert _table(_doc(), "serve") == flags_markdown()


def test_flags_table_renders_argparse_as_help_shows_it():
    p = argparse.ArgumentParser(prog="x")
    p.add_argument("--a", type=int, default=3, help="a | b")
    p.add_argument("--b", default=0, type=int)
    p.add_argument("--c", choices=("u", "v"), default="u", help="pick (default u)")
    p.add_argument("--d", required=True, metavar="DIR")
    p.add_argument("--old", help=argparse.SUPPRESS)
    p.add_argument("--flag", action="store_true", help="on")
    p.add_argument("--pct", type=int, default=5, help="%(default)s%% of it")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--x", action="store_true")
    g.add_argument("--y", metavar="Y")
    assert flags_table(p).splitlines() == [
        "| flag | meaning |",
        "|------|---------|",
        "| `--a A` | a \\| b (default 3) |",
        "| `--b B` | (default 0) |",
        "| `--c {u,v}` | pick (default u) |",
        "| `--d DIR` | (required) |",
        "| `--flag` | on |",
        "| `--pct PCT` | 5% of it (default 5) |",
        "| `--x` | (exactly one of `--x`, `--y`) |",
        "| `--y Y` | (exactly one of `--x`, `--y`) |",
    ]


def test_writing_keeps_text_outside_the_block_and_notes_under_headings():
    one = [Section("p a", "a", "| t1 |\n"), Section("p b", "b", "| t2 |\n")]
    doc = "intro\n\n" + render_block(one, "refresh") + "\n\noutro\n"
    doc = doc.replace("### p b\n\n", "### p b\n\nWritten by hand.\n\n")
    two = [Section("p a", "a", "| new |\n"), Section("p b", "b", "| t2 |\n"), Section("p c", "c", "| t3 |\n")]
    new, dropped = update_block(doc, two, "refresh")
    assert not dropped
    assert new.startswith("intro\n\n" + BLOCK_BEGIN) and new.endswith(BLOCK_END + "\n\noutro\n")
    assert "### p b\n\nWritten by hand.\n\n<!-- b flags: generated" in new
    assert "| new |" in new and "| t1 |" not in new and "### p c\n\n<!-- c flags: generated" in new
    assert update_block(new, two, "refresh") == (new, [])  # idempotent
    _, dropped = update_block(new, two[:1] + two[2:], "refresh")
    assert dropped == ["p b"]
    with pytest.raises(ValueError, match="no line starting with"):
        update_block("no block here\n", two, "refresh")


def test_check_mode_says_how_to_refresh(tmp_path, capsys):
    doc = _doc()
    stale = tmp_path / "api.md"
    stale.write_text(doc.replace("| `--resume` |", "| `--resumed` |", 1), encoding="utf-8")
    assert main(["--check", str(stale)]) == 1
    assert REFRESH in capsys.readouterr().err
    assert main(["--write", str(stale)]) == 0
    assert stale.read_text(encoding="utf-8") == doc
    assert main(["--check", str(stale)]) == 0
