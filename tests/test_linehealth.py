"""Line health as an explicit transition table, driven by silence."""

import numpy as np

from dataplane import shm
from host.appliance import linehealth as lh


def _counters(rx_a: int, rx_b: int) -> np.ndarray:
    c = np.zeros(shm.COUNTERS_LEN, np.int64)
    c[shm.L_RX_NS] = rx_a
    c[shm.LINE_STRIDE + shm.L_RX_NS] = rx_b
    return c


def test_every_state_and_event_has_a_transition():
    states = {lh.UNKNOWN, lh.UP, lh.STALE, lh.DOWN}
    events = {lh.HEARD, lh.QUIET, lh.SILENT}
    assert set(lh.TRANSITIONS) == {(s, e) for s in states for e in events}
    assert set(lh.TRANSITIONS.values()) <= states


def test_a_line_goes_stale_then_down_then_comes_back():
    h = lh.LineHealth(stale_after=1.5, down_after=5.0)
    s = 1_000_000_000
    now = 100 * s
    first = h.observe(_counters(now - s // 10, 0), now)
    assert first["A"] == {"state": "up", "silence_s": 0.1, "changed": True}
    assert first["B"]["state"] == "unknown" and first["B"]["silence_s"] is None
    assert h.observe(_counters(now - 2 * s, 0), now)["A"]["state"] == "stale"
    assert h.observe(_counters(now - 6 * s, 0), now)["A"]["state"] == "down"
    assert h.observe(_counters(now - 2 * s, 0), now)["A"]["state"] == "down"  # not yet back
    back = h.observe(_counters(now - s // 100, 0), now)["A"]
    assert back["state"] == "up" and back["changed"]
