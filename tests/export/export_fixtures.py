"""Tiny, deterministic bundles for tests: the committed fixtures under ``tests/edge/fixtures``.

The torch-free edge tests cannot export anything, so they run on bundles exported here from
``tiny_preset`` models with fixed seeds, plus torch reference outputs of the client loop
(``<name>_reference.npz``) that the edge runtime must reproduce. Regenerate with::

    python tests/export/export_fixtures.py tests/edge/fixtures

(a test helper, not part of the installed package: the export tests import it by name).
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from collafuse.config import tiny_preset
from collafuse.models import build_unet
from collafuse.sampling import run_levels
from collafuse_edge.schedule import Schedule, client_level_count, client_timetable

from collafuse.export.exporter import ExportConfig, ExportResult, export_bundle


@dataclass(frozen=True)
class FixtureSpec:
    name: str
    channels: int
    num_classes: int | None
    num_train_timesteps: int
    beta_schedule: str
    cut_ratio: float
    sample_size: int = 8
    seed: int = 0

    @property
    def schedule(self) -> Schedule:
        return Schedule.create(self.num_train_timesteps, self.beta_schedule)

    @property
    def client_levels(self) -> int:
        return client_level_count(self.cut_ratio, self.num_train_timesteps)


FIXTURES = (
    # a split client: 20 of 100 levels, class-conditional, grey
    FixtureSpec("tiny_cond", channels=1, num_classes=10, num_train_timesteps=100, beta_schedule="linear", cut_ratio=0.2),
    # a purely local client (c = 1): every level, unconditional, RGB
    FixtureSpec("tiny_local", channels=3, num_classes=None, num_train_timesteps=50, beta_schedule="cosine", cut_ratio=1.0),
)
FIXTURE_BY_NAME = {f.name: f for f in FIXTURES}

# the client loops the reference file records: (key, sampler, steps, eta)
REFERENCE_RUNS = (("ddpm", "ddpm", None, 0.0), ("ddim5", "ddim", 5, 0.0), ("ddim5_eta1", "ddim", 5, 1.0))


def fixture_model(spec: FixtureSpec) -> torch.nn.Module:
    """The fixture's torch model: ``tiny_preset`` initialised from ``spec.seed`` (eval mode)."""
    torch.manual_seed(spec.seed)
    return build_unet(tiny_preset(spec.sample_size, spec.channels, spec.num_classes)).eval()


def write_fixture(spec: FixtureSpec, out_dir: str | Path, *, exporter: str = "auto") -> ExportResult:
    return export_bundle(
        fixture_model(spec), spec.schedule, spec.cut_ratio, out_dir,
        config=ExportConfig(exporter=exporter, measure_speed=False),
        source={"fixture": spec.name, "seed": spec.seed, "preset": "tiny"}, overwrite=True,
    )


def reference_outputs(spec: FixtureSpec, batch: int = 4, seed: int = 7) -> dict[str, np.ndarray]:
    """Torch's client loop (``collafuse.sampling.run_levels``) on seeded handoff samples."""
    model = fixture_model(spec)
    rng = np.random.default_rng(spec.seed + 1)
    shape = (batch, spec.channels, spec.sample_size, spec.sample_size)
    handoff = rng.standard_normal(shape).astype(np.float32)
    labels = rng.integers(0, spec.num_classes, batch).astype(np.int64) if spec.num_classes else None
    out = {"handoff": handoff, "seed": np.int64(seed), "level": np.int64(spec.client_levels - 1)}
    if labels is not None:
        out["labels"] = labels
    for key, sampler, steps, eta in REFERENCE_RUNS:
        x = run_levels(model, spec.schedule, torch.from_numpy(handoff), client_timetable(spec.client_levels, steps),
                       labels, sampler=sampler, eta=eta, seed=seed)
        out[key] = x.numpy()
    return out


def write_wrong_io_model(path: str | Path) -> Path:
    """A valid ONNX model whose inputs are named wrongly (``x``, ``t``): ε̂ = x."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1, 8, 8])
    t = helper.make_tensor_value_info("t", TensorProto.INT64, ["batch"])
    y = helper.make_tensor_value_info("eps", TensorProto.FLOAT, ["batch", 1, 8, 8])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["eps"])], "wrong_io", [x, t], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], producer_name="collafuse fixtures")
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return Path(path)


def write_all(root: str | Path) -> list[Path]:
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    written = []
    for spec in FIXTURES:
        written.append(write_fixture(spec, root / spec.name).bundle_dir)
        ref = root / f"{spec.name}_reference.npz"
        np.savez(ref, **reference_outputs(spec))
        written.append(ref)
    written.append(write_wrong_io_model(root / "wrong_io.onnx"))
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python tests/export/export_fixtures.py", description=__doc__.splitlines()[0])
    p.add_argument("root", nargs="?", default="tests/edge/fixtures", help="where to write (default tests/edge/fixtures)")
    args = p.parse_args(argv)
    for path in write_all(args.root):
        size = sum(f.stat().st_size for f in path.rglob("*")) if path.is_dir() else path.stat().st_size
        print(f"{path}  {size / 1e3:.0f} kB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
