#!/usr/bin/env python3
"""Dependency audit (`make audit`): pip-audit over the project's venv, with a verdict CI can use.

    python .ci/audit.py            # run by `make audit` with .venv's python

Exit status, and what it means:

* 0 — pip-audit ran and found no known vulnerability in the dependencies it could look up.
* 1 — pip-audit found known vulnerabilities: printed loudly, and CI fails.
* 0 with a loud WARNING — the audit could not be completed: the vulnerability service (PyPI's
  JSON API; CI can reach PyPI only, so OSV is not used) was unreachable, or it did not know some
  of the installed versions (e.g. wheels from a private mirror). This does not fail CI: the tests
  are still valid, and an outage of a third-party service must not block every merge. Set
  ``AUDIT_STRICT=1`` (e.g. for a release) to make it exit 2 instead. See docs/reliability.md.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

BAR = "!" * 78


def main() -> int:
    strict = os.environ.get("AUDIT_STRICT", "") not in ("", "0")
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "audit.json")
        cmd = [sys.executable, "-m", "pip_audit", "--vulnerability-service", "pypi", "--skip-editable",
               "--progress-spinner", "off", "--timeout", "20", "--format", "json", "--output", out]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        doc = None
        if os.path.exists(out):
            try:
                with open(out, encoding="utf-8") as f:
                    doc = json.load(f)
            except ValueError:
                doc = None
    if doc is None:
        print(f"{BAR}\nWARNING: the dependency audit did not run (pip-audit exit {proc.returncode}); "
              f"no vulnerability verdict.\n{(proc.stderr or proc.stdout).strip()[-2000:]}\n{BAR}")
        return 2 if strict else 0
    deps = doc.get("dependencies", [])
    vulnerable = [x for x in deps if x.get("vulns")]
    skipped = [x for x in deps if "skip_reason" in x]
    audited = len(deps) - len(skipped)
    if vulnerable:
        print(BAR)
        print(f"DEPENDENCY AUDIT FAILED: {sum(len(x['vulns']) for x in vulnerable)} known vulnerabilities in "
              f"{len(vulnerable)} packages")
        for x in vulnerable:
            for v in x["vulns"]:
                fix = ", ".join(v.get("fix_versions") or []) or "no fixed version yet"
                print(f"  {x['name']} {x['version']}: {v['id']} (fixed in: {fix})")
        print(BAR)
        return 1
    if skipped:
        print(f"{BAR}\nWARNING: dependency audit incomplete: {len(skipped)} of {len(deps)} installed packages could "
              "not be looked up in the PyPI vulnerability service (unreachable, or versions it does not know, "
              f"e.g. from a private mirror); {audited} audited, no known vulnerabilities among them.")
        for x in skipped[:10]:
            print(f"  {x['skip_reason']}")
        if len(skipped) > 10:
            print(f"  … and {len(skipped) - 10} more")
        print(BAR)
        return 2 if strict else 0
    print(f"dependency audit: {audited} packages audited, no known vulnerabilities")
    return 0


if __name__ == "__main__":
    sys.exit(main())
