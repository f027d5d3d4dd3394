"""torch → ONNX for a client denoiser: a declared interface, a dynamic batch axis, one file.

The interface is the bundle's (``collafuse_edge.bundle.model_io``): ``sample`` [B,C,H,W] float32,
``timestep`` [B] int64, ``class_labels`` [B] int64 when the model is conditional → ``eps``.
torch's default (dynamo) exporter is tried first; when it fails the legacy TorchScript exporter
is used and the reason is kept, so the manifest can say which one produced the file.

Example::

    info = export_onnx(unet, "denoiser.onnx", opset=18)
    info.exporter, info.opset        # "dynamo", 18
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch

from collafuse_edge.bundle import BATCH_DIM, CLASS_LABELS, EPS, SAMPLE, TIMESTEP
from collafuse_edge.validation import check_choice, check_int

from .errors import ExportError

EXPORTERS = ("auto", "dynamo", "legacy")
MIN_OPSET = 18  # the dynamo exporter's floor; onnxruntime ≥ 1.14 and TensorRT ≥ 8.6 run it


class _Conditional(torch.nn.Module):
    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        return self.unet(sample, timestep, class_labels=class_labels).sample


class _Unconditional(torch.nn.Module):
    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        return self.unet(sample, timestep).sample


def eps_module(unet: torch.nn.Module) -> torch.nn.Module:
    """The denoiser as a module with the bundle's positional interface, in eval mode."""
    conditional = getattr(unet.config, "num_class_embeds", None) is not None
    return (_Conditional(unet) if conditional else _Unconditional(unet)).eval()


def model_facts(unet: torch.nn.Module) -> tuple[tuple[int, int, int], int | None]:
    """(image shape (C, H, W), number of classes or None) of a diffusers ``UNet2DModel``."""
    cfg = unet.config
    size = cfg.sample_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return (int(cfg.in_channels), int(h), int(w)), cfg.num_class_embeds


@dataclass(frozen=True)
class OnnxExport:
    path: Path
    exporter: str  # "dynamo" or "legacy"
    opset: int
    torch_version: str
    fallback_reason: str | None = None  # why dynamo was not used, when it was not

    def to_dict(self) -> dict:
        return {"exporter": f"torch.onnx ({self.exporter})", "exporter_kind": self.exporter, "opset": self.opset,
                "torch": self.torch_version, "exporter_fallback_reason": self.fallback_reason}


@contextlib.contextmanager
def _quiet():
    """The dynamo exporter narrates its passes on stdout and warns about optional packages."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


def _example_inputs(module: torch.nn.Module, image_shape: tuple[int, int, int], batch: int = 2) -> tuple:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *image_shape, generator=g)
    t = torch.tensor([1, 7][:batch] + [3] * max(0, batch - 2), dtype=torch.long)
    if isinstance(module, _Conditional):
        return x, t, torch.zeros(batch, dtype=torch.long)
    return x, t


def _names(module: torch.nn.Module) -> list[str]:
    return [SAMPLE, TIMESTEP] + ([CLASS_LABELS] if isinstance(module, _Conditional) else [])


def _export_dynamo(module: torch.nn.Module, args: tuple, path: Path, opset: int) -> None:
    names = _names(module)
    batch = torch.export.Dim(BATCH_DIM, min=1, max=4096)
    with _quiet():
        torch.onnx.export(
            module, args, str(path), dynamo=True, opset_version=opset, input_names=names,
            output_names=[EPS], dynamic_shapes={n: {0: batch} for n in names}, external_data=False,
            optimize=True, verbose=False,
        )


def _export_legacy(module: torch.nn.Module, args: tuple, path: Path, opset: int) -> None:
    names = _names(module)
    with _quiet():
        torch.onnx.export(
            module, args, str(path), dynamo=False, opset_version=opset, input_names=names,
            output_names=[EPS], dynamic_axes={n: {0: BATCH_DIM} for n in names + [EPS]},
            do_constant_folding=True,
        )


def strip_debug_info(model: onnx.ModelProto) -> onnx.ModelProto:
    """Drop per-node stack traces and doc strings (the dynamo exporter's make up most of a small
    model's file) and record who made the file."""
    for node in model.graph.node:
        node.doc_string = ""
        del node.metadata_props[:]
    model.graph.doc_string = ""
    model.producer_name = "collafuse export"
    return model


def check_single_file(path: Path) -> onnx.ModelProto:
    """The model must be one self-contained file: no external data, no stray side files."""
    model = onnx.load(str(path), load_external_data=False)
    external = [t.name for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    if external:
        raise ExportError(f"{path.name} keeps {len(external)} tensors in external data files (e.g. "
                          f"{external[0]!r}); a bundle needs one self-contained model file")
    strays = sorted(p.name for p in path.parent.iterdir() if p != path)
    if strays:
        raise ExportError(f"exporting {path.name} left extra files {strays}; a bundle needs one model file")
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as e:  # onnx raises ValidationError/InferenceError
        raise ExportError(f"{path.name} is not a valid ONNX model: {e}") from e
    return model


def export_onnx(
    unet: torch.nn.Module,
    path: str | os.PathLike,
    *,
    opset: int = MIN_OPSET,
    exporter: str = "auto",
) -> OnnxExport:
    """Export ``unet`` (a diffusers ``UNet2DModel``) to ``path``, alone in its directory.

    ``exporter``: "auto" (dynamo, falling back to legacy on failure), "dynamo" or "legacy".
    """
    check_choice("exporter", exporter, EXPORTERS, error=ExportError)
    check_int("opset", opset, low=MIN_OPSET, error=ExportError)
    path = Path(path)
    if path.parent.exists() and any(path.parent.iterdir()):
        raise ExportError(f"export into an empty directory; {path.parent} already holds files")
    path.parent.mkdir(parents=True, exist_ok=True)
    module = eps_module(unet)
    image_shape, _ = model_facts(unet)
    args = _example_inputs(module, image_shape)
    fallback = None
    kind = "legacy" if exporter == "legacy" else "dynamo"
    with torch.no_grad():
        if kind == "dynamo":
            try:
                _export_dynamo(module, args, path, opset)
            except Exception as e:  # any failure of the new exporter → the legacy one
                if exporter == "dynamo":
                    raise ExportError(f"the dynamo ONNX exporter failed: {type(e).__name__}: {e}") from e
                fallback = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:500]
                for p in path.parent.iterdir():
                    p.unlink()
                kind = "legacy"
        if kind == "legacy":
            try:
                _export_legacy(module, args, path, opset)
            except Exception as e:
                raise ExportError(f"the legacy ONNX exporter failed too: {type(e).__name__}: {e}"
                                  + (f" (dynamo failed first: {fallback})" if fallback else "")) from e
    onnx.save(strip_debug_info(onnx.load(str(path))), str(path))
    model = check_single_file(path)
    actual = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), opset)
    return OnnxExport(path, kind, int(actual), torch.__version__, fallback)
