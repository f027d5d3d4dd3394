"""collafuse.export: torch → ONNX edge bundles (validated, with fp16/int8 variants).

    from collafuse.export import export_bundle, ExportConfig
    export_bundle(unet, schedule, cut_ratio=0.2, out_dir="bundle/", config=ExportConfig("fp32"))

CLI: ``collafuse export --run DIR --client K --out BUNDLE [--precision fp32|fp16|int8]``.
Names load on first use, so wiring the CLI parser does not import onnx.
"""
from collafuse_edge.lazy import lazy_getattr

_LAZY = {
    "ExportConfig": "exporter",
    "ExportResult": "exporter",
    "export_bundle": "exporter",
    "export_client": "cli",
    "add_export_parser": "cli",
    "export_onnx": "onnx_export",
    "validate_onnx": "validate",
    "ExportError": "errors",
    "ValidationError": "errors",
    "QualityGateError": "errors",
}

__all__ = sorted(_LAZY)

__getattr__ = lazy_getattr(__name__, _LAZY)
