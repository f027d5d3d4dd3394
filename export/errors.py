"""Exceptions of the exporter. Messages say what was wrong, the value, and what to do."""
from collafuse.errors import CollafuseError


class ExportError(CollafuseError):
    """torch → ONNX conversion, or writing the bundle, failed."""

    exit_code = 1  # an operation failed (see collafuse_edge.cli_contract)


class ValidationError(ExportError):
    """The exported ONNX model disagrees with the torch model beyond the declared tolerance."""


class QualityGateError(ExportError):
    """A reduced-precision variant is too far from the fp32 model to be shipped."""
