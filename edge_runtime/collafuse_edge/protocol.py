"""The wire protocol between edge clients and the collafuse server (docs/architecture.md#contracts).

Tensors travel as NumPy ``.npy`` bytes (format version 1.0/2.0, never pickled), content type
``application/x-npy``. Metadata travels in ``X-Collafuse-*`` headers. JSON carries only small
request bodies and errors ``{"error": {"code": …, "message": …}}``.

Both sides import this module, so a client author needs only this file to interoperate.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np

from .errors import ProtocolError
from .validation import is_int

NPY_CONTENT_TYPE = "application/x-npy"
API_PREFIX = "/v1"

# response headers of POST /v1/handoff
H_SHAPE = "X-Collafuse-Shape"  # "B,C,H,W"
H_DTYPE = "X-Collafuse-Dtype"  # "float32"
H_LEVEL = "X-Collafuse-Level"  # handoff level k-1 of the sample (-1 = clean image)
H_MODEL_VERSION = "X-Collafuse-Model-Version"
H_SEED = "X-Collafuse-Seed"  # the seed the server used (echoed or drawn)
H_CLIENT = "X-Collafuse-Client"  # the client id the token is bound to
H_STEPS = "X-Collafuse-Steps"  # server levels evaluated for this response
H_SAMPLER = "X-Collafuse-Sampler"  # "ddpm" or "ddim"
H_QUEUE_MS = "X-Collafuse-Queue-Ms"  # time the request waited before its first step
# request headers of POST /v1/train
H_BATCH_ID = "X-Collafuse-Batch-Id"
H_LABELS = "X-Collafuse-Labels"  # comma-separated ints, one per row, when labels are shared

ALLOWED_DTYPES = ("float32", "float16", "int64")
_NPY_MAGIC = b"\x93NUMPY"


@dataclass(frozen=True)
class TensorMeta:
    shape: tuple[int, ...]
    dtype: str


def encode_tensor(arr: np.ndarray) -> bytes:
    """``.npy`` bytes of a C-contiguous numeric array (no pickle)."""
    arr = np.ascontiguousarray(arr)
    if arr.dtype.name not in ALLOWED_DTYPES:
        raise ProtocolError(f"dtype {arr.dtype} cannot be sent; use one of {ALLOWED_DTYPES}")
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def decode_tensor(
    data: bytes,
    *,
    max_bytes: int = 64 * 2**20,
    dtype: str | None = None,
    ndim: int | None = None,
    shape_tail: tuple[int, ...] | None = None,
    require_finite: bool = True,
) -> np.ndarray:
    """Parse and validate ``.npy`` bytes; every failure raises :class:`ProtocolError`.

    The declared header is checked before any payload is allocated, so a header that declares a
    gigantic shape costs nothing.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ProtocolError(f"tensor payload must be bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) > max_bytes:
        raise ProtocolError(f"tensor payload is {len(data)} bytes; the limit is {max_bytes}")
    if not data.startswith(_NPY_MAGIC):
        raise ProtocolError("tensor payload is not .npy data (bad magic); send np.save bytes")
    buf = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(buf)
        if version == (1, 0):
            shape, fortran, dt = np.lib.format.read_array_header_1_0(buf, max_header_size=1024)
        elif version == (2, 0):
            shape, fortran, dt = np.lib.format.read_array_header_2_0(buf, max_header_size=1024)
        else:
            raise ProtocolError(f".npy format version {version} is not supported; use 1.0 or 2.0")
    except ProtocolError:
        raise
    except Exception as e:  # numpy raises ValueError/SyntaxError variants on bad headers
        raise ProtocolError(f"malformed .npy header: {e}") from e
    if dt.hasobject or dt.name not in ALLOWED_DTYPES:
        raise ProtocolError(f"tensor dtype {dt} is not allowed; use one of {ALLOWED_DTYPES}")
    if dtype is not None and dt.name != dtype:
        raise ProtocolError(f"tensor dtype must be {dtype}, got {dt.name}")
    if fortran:
        raise ProtocolError("tensor must be C-ordered (fortran_order=False)")
    if any(not is_int(s) or not (0 <= s < 2**31) for s in shape) \
            or math.prod(max(s, 1) for s in shape) * dt.itemsize >= 2**62:
        # (0, 2**63) declares 0 bytes but numpy cannot even make the empty array of that shape
        raise ProtocolError(f"invalid tensor shape {shape}")
    if ndim is not None and len(shape) != ndim:
        raise ProtocolError(f"tensor must have {ndim} dimensions, got shape {shape}")
    if shape_tail is not None and tuple(shape[len(shape) - len(shape_tail):]) != tuple(shape_tail):
        raise ProtocolError(
            f"tensor shape {tuple(shape)} does not end with the expected {tuple(shape_tail)}"
        )
    nbytes = math.prod(shape) * dt.itemsize
    payload = len(data) - buf.tell()
    if nbytes != payload:
        raise ProtocolError(
            f"tensor header declares shape {tuple(shape)} ({nbytes} bytes) but {payload} bytes follow"
        )
    # a copy in native byte order: ">f4" is named float32 too, but torch.from_numpy refuses it
    arr = np.frombuffer(data, dtype=dt, offset=buf.tell()).reshape(shape).astype(dt.newbyteorder("="))
    if require_finite and arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
        raise ProtocolError("tensor contains NaN or Inf values")
    return arr


def format_shape(shape: tuple[int, ...]) -> str:
    return ",".join(str(int(s)) for s in shape)


def parse_shape(text: str) -> tuple[int, ...]:
    try:
        out = tuple(int(p) for p in text.split(","))
    except ValueError as e:
        raise ProtocolError(f"bad shape header {text!r}; expected comma-separated ints") from e
    if any(s < 0 for s in out):
        raise ProtocolError(f"bad shape header {text!r}: negative size")
    return out


def error_body(code: str, message: str) -> dict:
    """The JSON error document every 4xx/5xx response carries."""
    return {"error": {"code": code, "message": message}}
