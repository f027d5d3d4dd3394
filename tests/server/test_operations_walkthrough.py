"""docs/operations.md's lifecycle walkthrough, run as written: its bash blocks, in order, in one
shell (slow: it trains three sites for 100 steps). Only the port is swapped for a free one."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from collafuse.serve_process import free_port

DOC = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "operations.md")
SECTION = "## The lifecycle, step by step"


def walkthrough_script(port: int) -> str:
    text = open(DOC, encoding="utf-8").read()
    start = text.index(SECTION)
    end = text.index("\n## ", start + len(SECTION))
    blocks = re.findall(r"```bash\n(.*?)```", text[start:end], flags=re.S)
    assert len(blocks) >= 4, "the walkthrough lost a step"
    return "set -euo pipefail\n" + "\n".join(blocks).replace("8080", str(port))


@pytest.mark.slow
def test_the_lifecycle_walkthrough_runs_as_written(tmp_path):
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
               OMP_NUM_THREADS="1")
    env.pop("COLLAFUSE_TOKEN", None)
    r = subprocess.run(["bash", "-c", walkthrough_script(free_port())], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=3000)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "x_h at level 599" in r.stdout
    assert "serving consortium@" in r.stdout
    for f in ("site0-samples.png", "device0.png", "bundle-site0/manifest.json", "site0/eval/report.json"):
        assert (tmp_path / f).exists(), f
