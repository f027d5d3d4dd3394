"""The keyed noise on torch tensors (the server's path) equals the numpy path bit for bit."""
import numpy as np
import torch

from collafuse_edge.noise import PURPOSE_INITIAL, keyed_normal, philox4x32


def test_philox_known_answer_on_int64_tensors():
    t = lambda v: torch.tensor([v], dtype=torch.int64)  # noqa: E731
    out = philox4x32(t(0x243F6A88), t(0x85A308D3), t(0x13198A2E), t(0x03707344), t(0xA4093822), t(0x299F31D0))
    assert [int(o[0]) for o in out] == [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]


def test_torch_and_numpy_draw_the_same_numbers():
    seeds = np.array([5, 2**62 + 7, 9, 0], dtype=np.int64)
    levels = np.array([3, 999, 0, 2**32 - 1], dtype=np.int64)
    rows = np.array([0, 1, 7, 3], dtype=np.int64)
    for purpose in (PURPOSE_INITIAL, 1):
        a = keyed_normal(seeds, levels, rows, 257, purpose)
        b = keyed_normal(*(torch.from_numpy(v) for v in (seeds, levels, rows)), 257, purpose)
        assert b.dtype == torch.float32 and b.shape == (4, 257)
        assert np.array_equal(a, b.numpy())
