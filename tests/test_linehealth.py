"""Line health: a function of each line's silence, the same for every observer."""

import numpy as np

from dataplane import shm
from host.appliance import linehealth as lh

S = 1_000_000_000
NOW = 100 * S


def _counters(rx_a: int, rx_b: int) -> np.ndarray:
    c = np.zeros(shm.COUNTERS_LEN, np.int64)
    c[shm.L_RX_NS] = rx_a
    c[shm.LINE_STRIDE + shm.L_RX_NS] = rx_b
    return c


def test_the_state_is_the_silence_classified():
    assert lh.state_for(None) == lh.UNKNOWN  # never heard
    assert lh.state_for(0.0) == lh.UP
    assert lh.state_for(lh.STALE_AFTER) == lh.UP  # a heartbeat may still be on its way
    assert lh.state_for(lh.STALE_AFTER + 0.01) == lh.STALE
    assert lh.state_for(lh.DOWN_AFTER) == lh.STALE
    assert lh.state_for(lh.DOWN_AFTER + 0.01) == lh.DOWN
    assert set(lh.STATE_CODE) == {lh.UNKNOWN, lh.UP, lh.STALE, lh.DOWN}


def test_a_first_look_sees_stale_and_down_lines():
    """``tickwire status`` and a first scrape look once: a line silent for 2 s is stale and
    one silent for 10 s down, not "unknown" (an observer that started at "unknown" and
    kept it on silence could never show either)."""
    got = lh.lines(_counters(NOW - 2 * S, NOW - 10 * S), NOW)
    assert got == {
        "A": {"state": "stale", "silence_s": 2.0},
        "B": {"state": "down", "silence_s": 10.0},
    }
    assert lh.LineHealth().observe(_counters(NOW - 2 * S, NOW - 10 * S), NOW)["A"]["state"] == (
        "stale"
    )


def test_how_often_it_is_read_does_not_change_the_state():
    """A line down, then one packet 2 s ago: stale, whether the watcher saw it down before
    or not (a transition table kept it down for the watcher that had)."""
    c = _counters(NOW - 2 * S, 0)
    watched = lh.LineHealth()
    watched.observe(_counters(NOW - 10 * S, 0), NOW)
    assert watched.observe(c, NOW)["A"]["state"] == lh.lines(c, NOW)["A"]["state"] == "stale"


def test_the_watch_reports_each_change_once():
    h = lh.LineHealth()
    first = h.observe(_counters(NOW - S // 10, 0), NOW)
    assert first["A"] == {"state": "up", "silence_s": 0.1, "changed": True}
    assert first["B"] == {"state": "unknown", "silence_s": None, "changed": False}
    assert not h.observe(_counters(NOW - S // 10, 0), NOW)["A"]["changed"]
    stale = h.observe(_counters(NOW - 2 * S, 0), NOW)["A"]
    assert stale["state"] == "stale" and stale["changed"]
    assert h.observe(_counters(NOW - 6 * S, 0), NOW)["A"]["state"] == "down"
    back = h.observe(_counters(NOW - S // 100, 0), NOW)["A"]
    assert back["state"] == "up" and back["changed"]


def test_a_receive_time_after_now_is_no_silence():
    """Another process's ``now`` may be read a moment before the consumer's last stamp."""
    assert lh.lines(_counters(NOW + 5, 0), NOW)["A"] == {"state": "up", "silence_s": 0.0}
