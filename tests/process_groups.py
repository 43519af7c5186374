"""A helper of the tests that stop a driver: whether the processes it started (its process group) ended."""

from __future__ import annotations

import os
import time


def group_ended(pgid: int, within_s: float = 60.0) -> bool:
    """Whether process group `pgid` is gone within `within_s` seconds (a driver's Ray processes end with it)."""
    deadline = time.time() + within_s
    while time.time() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.5)
    return False
