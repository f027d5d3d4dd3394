"""The metrics reference cannot drift: docs/monitoring.md lists every family the server exports, and
every metric name in the operator docs and the Grafana dashboard exists; renamed families are gone
from docs, benchmarks and tests."""
from __future__ import annotations

import json
import os
import re

from collafuse.server.prometheus import ServerMetrics

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
NAME = re.compile(r"\bcollafuse_[a-z0-9_]+")
NOT_METRICS = {"collafuse_edge", "collafuse_state"}  # module and app-key names in the same docs


def _read(*parts: str) -> str:
    with open(os.path.join(ROOT, *parts), encoding="utf-8") as f:
        return f.read()


def _families() -> dict[str, str]:
    """Exposition name (counters with _total) → type, of a server that trains (every family)."""
    out = {}
    for fam in ServerMetrics(training=True).registry.collect():
        out[fam.name + ("_total" if fam.type == "counter" else "")] = fam.type
    return out


def _series_names() -> set[str]:
    names = set()
    for name, typ in _families().items():
        names.add(name)
        if typ == "histogram":
            names |= {name + s for s in ("_bucket", "_sum", "_count")}
    return names


def test_monitoring_md_lists_every_family_with_its_type():
    doc = _read("docs", "monitoring.md")
    for name, typ in _families().items():
        row = re.search(rf"^\| `{name}` \| (\w+) \|", doc, re.M)
        assert row is not None, f"docs/monitoring.md has no table row for {name}"
        assert row.group(1) == typ, (name, row.group(1), typ)


def test_every_metric_named_in_the_operator_docs_and_the_dashboard_exists():
    known = _series_names()
    dashboard = json.loads(_read("docs", "grafana-dashboard.json"))
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])
    for where, text in (("docs/monitoring.md", _read("docs", "monitoring.md")),
                        ("server/README.md", _read("server", "README.md")),
                        ("docs/grafana-dashboard.json", exprs)):
        unknown = set(NAME.findall(text)) - known - NOT_METRICS
        assert not unknown, f"{where} names metrics the server does not export: {sorted(unknown)}"
    assert {n for n in NAME.findall(exprs)} >= {"collafuse_requests_total", "collafuse_train_loss_ema"}


def test_renamed_families_are_gone_everywhere():
    old = re.compile(r"collafuse_bytes_(in|out)\b|collafuse_bytes_(in|out)_total")
    for folder in ("docs", "benchmarks", "tests", "server"):
        for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
            for f in files:
                if f.endswith((".md", ".py", ".json")) and f != os.path.basename(__file__):
                    with open(os.path.join(dirpath, f), encoding="utf-8", errors="replace") as fh:
                        assert not old.search(fh.read()), os.path.join(dirpath, f)
