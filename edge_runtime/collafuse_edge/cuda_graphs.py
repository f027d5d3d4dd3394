"""onnxruntime's CUDA-graph mode behind a plain denoiser call (``SessionConfig.cuda_graph``).

Example::

    graphs = CudaGraphs(ort, session, device_id=0, tail=(3, 32, 32), max_graphs=8)
    eps = graphs({"sample": x, "timestep": t})     # captured once per batch size, then replayed
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .bundle import EPS, SAMPLE


class CudaGraphs:
    """onnxruntime's CUDA-graph mode behind the plain call: one captured graph per batch size
    (run option ``gpu_graph_id``), each on its own fixed device buffers bound through IO binding.
    A call copies the inputs into the buffers, replays (the first call of a size is a regular run,
    the second captures), and copies ε̂ back. Sizes beyond ``max_graphs`` run uncaptured
    (``gpu_graph_id`` -1): a graph replays on the addresses it was captured with, so a plain
    ``session.run`` on fresh buffers must never be captured."""

    def __init__(self, ort: Any, session: Any, device_id: int, tail: tuple, max_graphs: int,
                 device_type: str = "cuda"):
        self._ort, self._session, self._device, self._tail = ort, session, device_id, tail
        self._type = device_type  # "cpu" in the tests, which check the bookkeeping without a GPU
        self._max = max_graphs
        self._graphs: dict[int, tuple] = {}
        self._plain = ort.RunOptions()
        self._plain.add_run_config_entry("gpu_graph_id", "-1")

    @property
    def batch_sizes(self) -> list[int]:
        return sorted(self._graphs)

    def __call__(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        ort = self._ort
        # the buffers' types are fixed at capture: sample float32, timestep and labels int64
        feeds = {n: np.ascontiguousarray(v, dtype=np.float32 if n == SAMPLE else np.int64) for n, v in feeds.items()}
        b = feeds[SAMPLE].shape[0]
        g = self._graphs.get(b)
        if g is None:
            if len(self._graphs) >= self._max:
                return self._session.run([EPS], feeds, self._plain)[0]
            bufs = {n: ort.OrtValue.ortvalue_from_numpy(v, self._type, self._device) for n, v in feeds.items()}
            out = ort.OrtValue.ortvalue_from_shape_and_type([b, *self._tail], np.float32, self._type, self._device)
            io = self._session.io_binding()
            for n, v in bufs.items():
                io.bind_ortvalue_input(n, v)
            io.bind_ortvalue_output(EPS, out)
            opts = ort.RunOptions()
            opts.add_run_config_entry("gpu_graph_id", str(len(self._graphs) + 1))
            self._graphs[b] = (bufs, out, io, opts)  # fresh buffers: they already hold this call's inputs
        else:
            bufs, out, io, opts = g
            for n, v in feeds.items():
                bufs[n].update_inplace(v)
        self._session.run_with_iobinding(io, opts)
        return out.numpy()


__all__ = ["CudaGraphs"]
