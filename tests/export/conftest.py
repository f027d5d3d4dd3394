"""Fixtures of the exporter tests (``collafuse.export``). Helpers: ``export_fixtures`` (the tiny
fixture models and the committed edge bundles' generator) and ``tiny_runs`` (one folder up)."""
import os

# Test runs on a shared 2-core machine: OpenMP spin-waiting under oversubscription is ruinous.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
