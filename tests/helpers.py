"""Small helpers every tier uses: a free port, and waiting for a condition with a deadline
(the only way a test waits: it never sleeps to see that something did not happen)."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A port nothing on 127.0.0.1 uses right now (TCP, or UDP with ``SOCK_DGRAM``)."""
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(
    condition: Callable[[], T],
    timeout: float = 30.0,
    what: str = "the condition",
    detail: Callable[[], object] | None = None,
    interval: float = 0.005,
) -> T:
    """Poll ``condition`` until it returns something true, and return that; fail the test
    naming ``what`` (and ``detail()``, the state to show) when ``timeout`` passes first.
    The timeout is a deadline for a hang, never a measurement."""
    deadline = time.monotonic() + timeout
    while True:
        got = condition()
        if got:
            return got
        if time.monotonic() >= deadline:
            extra = f": {detail()}" if detail is not None else ""
            raise AssertionError(f"{what} did not happen within {timeout} s{extra}")
        time.sleep(interval)
