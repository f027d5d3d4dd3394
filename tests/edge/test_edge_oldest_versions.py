"""edge_runtime/scripts/oldest_versions.py: the floors ``make test-edge-oldest`` pins come from
edge_runtime/pyproject.toml, one per requirement, and versions compare as PEP 440 does."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("tomllib")  # the script reads pyproject.toml with Python 3.11's tomllib

SCRIPT = Path(__file__).resolve().parents[2] / "edge_runtime" / "scripts" / "oldest_versions.py"


@pytest.fixture(scope="module")
def mod():
    if not SCRIPT.is_file():
        pytest.skip("the repository's edge_runtime/scripts is not next to these tests")
    spec = importlib.util.spec_from_file_location("oldest_versions", SCRIPT)
    m = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(m)
    return m


def test_every_requirement_has_a_floor(mod):
    floors = mod.floors()
    assert {"numpy", "aiohttp", "onnxruntime", "pillow", "cryptography"} <= set(floors)
    assert int(floors["numpy"].split(".")[0]) == 1  # numpy 1.x stays supported (Jetson wheels)


def test_versions_compare_with_zero_padding(mod):
    assert mod._same("1.24.0", "1.24") and mod._same("10.0.0", "10") and mod._same("3.9.0+local", "3.9")
    assert not mod._same("1.24.2", "1.24") and not mod._same("1.18.1", "1.18")


def test_constraints_output(mod, capsys):
    assert mod.main(["constraints"]) == 0
    lines = capsys.readouterr().out.split()
    assert "numpy==1.24.2" in lines and all("==" in line for line in lines)
    assert mod.main([]) == 2
