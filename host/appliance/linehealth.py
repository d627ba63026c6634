"""Line health: up / stale / down per line, as an explicit transition table.

A line is judged by its silence: the time since its last packet of any kind (heartbeats
count), from the consumer's shared counters (``L_RX_NS``, CLOCK_MONOTONIC). The exchange
sends heartbeats every second while idle, so a line silent for longer than ``stale_after``
has missed one; longer than ``down_after`` it is gone. ``LineHealth.observe`` feeds the
event for the current silence through ``TRANSITIONS`` and remembers the state, so every
change is explicit (and logged by whoever watches).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from dataplane import shm

UP, STALE, DOWN, UNKNOWN = "up", "stale", "down", "unknown"
HEARD, QUIET, SILENT = "heard", "quiet", "silent"  # events, by silence

# (state, event) -> next state
TRANSITIONS = {
    (UNKNOWN, HEARD): UP, (UNKNOWN, QUIET): UNKNOWN, (UNKNOWN, SILENT): UNKNOWN,
    (UP, HEARD): UP, (UP, QUIET): STALE, (UP, SILENT): DOWN,
    (STALE, HEARD): UP, (STALE, QUIET): STALE, (STALE, SILENT): DOWN,
    (DOWN, HEARD): UP, (DOWN, QUIET): DOWN, (DOWN, SILENT): DOWN,
}  # fmt: skip
STATE_CODE = {UNKNOWN: -1, UP: 0, STALE: 1, DOWN: 2}


def event_for(silence_s: float | None, stale_after: float, down_after: float) -> str:
    if silence_s is None:
        return SILENT
    if silence_s <= stale_after:
        return HEARD
    return QUIET if silence_s <= down_after else SILENT


@dataclass
class LineHealth:
    # silence (s) after which a line is stale (one heartbeat missed) and down
    stale_after: float = 1.5
    down_after: float = 5.0
    states: dict[str, str] = field(default_factory=lambda: {"A": UNKNOWN, "B": UNKNOWN})

    def observe(self, counters, now_ns: int | None = None) -> dict[str, dict]:
        """Update every line from the shared counters; returns per line state, silence,
        and whether it changed."""
        now = time.monotonic_ns() if now_ns is None else now_ns
        out = {}
        for k, letter in enumerate("AB"):
            rx = int(counters[k * shm.LINE_STRIDE + shm.L_RX_NS])
            silence = (now - rx) / 1e9 if rx > 0 else None
            old = self.states[letter]
            new = TRANSITIONS[(old, event_for(silence, self.stale_after, self.down_after))]
            self.states[letter] = new
            out[letter] = {"state": new, "silence_s": silence, "changed": new != old}
        return out


def snapshot(counters, now_ns: int | None = None, stale_after: float = 1.5,
             down_after: float = 5.0) -> dict[str, dict]:  # fmt: skip
    """The states a fresh observer reaches from the counters alone (``tickwire status``)."""
    h = LineHealth(stale_after, down_after)
    return h.observe(counters, now_ns)
