"""The operator docs cannot drift from the code: docs/api.md's table of serve flags is generated
from the parser, server/README.md's config example holds every [server] option and loads, and the
README links the operator pages."""
from __future__ import annotations

import os
import re

from collafuse.server.cli import flags_markdown
from collafuse.server.config import _SERVER_FIELDS, hash_token, load_server_config

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")


def _read(*parts: str) -> str:
    with open(os.path.join(ROOT, *parts), encoding="utf-8") as f:
        return f.read()


def test_api_md_lists_every_serve_flag_as_the_parser_has_it():
    doc = _read("docs", "api.md")
    m = re.search(r"<!-- serve flags: .*? -->\n(.*?)<!-- end of serve flags -->", doc, re.S)
    assert m is not None, "docs/api.md lost its serve flags section"
    assert m.group(1) == flags_markdown(), "regenerate: python -m collafuse.server.cli"
    for flag in ("--workers N", "--new-token K", "--json", "--name NAME", "--train", "--tls-cert PEM"):
        assert f"`{flag}`" in m.group(1)


def test_the_readme_config_example_has_every_option_and_loads(run_dir, tmp_path):
    readme = _read("server", "README.md")
    block = re.search(r"```toml\n(\[server\].*?)```", readme, re.S).group(1)
    server = block.split("\n[[tokens]]\n")[0]
    keys = set(re.findall(r"^#? ?([a-z_0-9]+) = ", server, re.M))
    assert keys == _SERVER_FIELDS, (sorted(_SERVER_FIELDS - keys), sorted(keys - _SERVER_FIELDS))
    path = tmp_path / "server.toml"
    path.write_text(block.replace('sha256 = "…"', f'sha256 = "{hash_token("example")}"'))
    cfg = load_server_config(run_dir, str(path))  # every value in the example is valid as written
    assert cfg.tokens[0].name == "hospital-a" and cfg.token_reload_s == 5 and cfg.train_checkpoint_every == 50


def test_the_readme_links_every_operator_page():
    readme = _read("README.md")
    for page in ("docs/operations.md", "server/README.md", "docs/monitoring.md", "docs/api.md"):
        assert f"]({page})" in readme, page
