"""One helper for torch's intra-op CPU threads, used by the cost probe, evaluation and the
feature net."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from collafuse_edge.validation import check_int

from .errors import ConfigError


@contextlib.contextmanager
def torch_threads(num_threads: int | None) -> Iterator[None]:
    """Cap torch's intra-op CPU threads inside the block and restore them after (None: leave
    as is).

    The project's nets are too small to gain from intra-op threads, and on a busy machine OpenMP
    spin-waiting made 2 threads 3–30× slower than 1 (measured on the 2-core dev box).
    """
    if num_threads is None:
        yield
        return
    check_int("num_threads", num_threads, low=1, error=ConfigError)
    previous = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


__all__ = ["torch_threads"]
