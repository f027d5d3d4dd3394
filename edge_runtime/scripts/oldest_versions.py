"""The oldest versions collafuse-edge declares, as pip constraints, and a check that they are
what a venv really holds (``make test-edge-oldest``).

    python edge_runtime/scripts/oldest_versions.py constraints > oldest.txt   # name==floor lines
    python edge_runtime/scripts/oldest_versions.py check                      # installed == floors?

The floors come from ``edge_runtime/pyproject.toml`` (dependencies and the cpu, png and sign
extras), so the tested versions and the declared ones cannot drift apart. Standard library only.
"""
from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = None

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
EXTRAS = ("cpu", "png", "sign")
_REQ = re.compile(r"^\s*([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?\s*>=\s*([0-9][0-9A-Za-z.]*)\s*$")


def _requirements() -> list[str]:
    text = PYPROJECT.read_text(encoding="utf-8")
    if tomllib is not None:
        doc = tomllib.loads(text)["project"]
        reqs = list(doc["dependencies"])
        for extra in EXTRAS:
            reqs += doc["optional-dependencies"][extra]
        return reqs
    raise SystemExit("oldest_versions.py needs Python >= 3.11 (tomllib) to read the floors")


def floors() -> dict[str, str]:
    """name → the declared lower bound, for every requirement (each must have one)."""
    out = {}
    for req in _requirements():
        m = _REQ.match(req)
        if not m:
            raise SystemExit(f"{PYPROJECT}: requirement {req!r} has no plain '>=' floor; the oldest-versions "
                             f"test needs one per requirement")
        out[m.group(1).lower()] = m.group(2)
    return out


def _same(a: str, b: str) -> bool:
    """1.24 == 1.24.0 (PEP 440 pads release segments with zeros)."""
    def norm(v: str) -> list[str]:
        parts = v.split("+")[0].split(".")
        while len(parts) > 1 and parts[-1] == "0":
            parts.pop()
        return parts
    return norm(a) == norm(b)


def main(argv: list[str]) -> int:
    if argv[:1] == ["constraints"]:
        for name, v in floors().items():
            print(f"{name}=={v}")
        return 0
    if argv[:1] == ["check"]:
        bad = []
        for name, want in floors().items():
            try:
                got = metadata.version(name)
            except metadata.PackageNotFoundError:
                got = None
            ok = got is not None and _same(got, want)
            print(f"{name:<16} floor {want:<10} installed {got}{'' if ok else '   <-- not the floor'}")
            bad += [] if ok else [name]
        if bad:
            print(f"not at their floors: {', '.join(bad)}", file=sys.stderr)
            return 1
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
