"""Test helper: poll a condition until it holds or a timeout passes."""
from __future__ import annotations

import time
from typing import Callable


def wait_until(cond: Callable[[], bool], timeout: float, poll: float = 0.05) -> bool:
    """True as soon as ``cond()`` is; after ``timeout`` seconds, ``cond()``'s last answer."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(poll)
    return cond()
