"""Line health: up / stale / down per line, from the consumer's counters and the time.

A line is judged by its silence: the time since its last packet of any kind (heartbeats
count), from the consumer's shared counters (``L_RX_NS``, CLOCK_MONOTONIC, one clock for
every process). The exchange sends heartbeats every second while idle, so a line silent
for longer than ``stale_after`` has missed one; longer than ``down_after`` it is gone; a
line never heard is ``unknown``.

The state is a function of the silence alone (``state_for``), not of what an observer saw
before: ``tickwire status``, every Prometheus scrape and the appliance's log see the same
state at the same moment, however often and however many of them look. ``LineHealth``
only remembers the states it last reported, to say which changed (the appliance logs
those).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from dataplane import shm

UP, STALE, DOWN, UNKNOWN = "up", "stale", "down", "unknown"
STATE_CODE = {UNKNOWN: -1, UP: 0, STALE: 1, DOWN: 2}
# silence (s) after which a line is stale (one heartbeat missed) and down
STALE_AFTER = 1.5
DOWN_AFTER = 5.0


def state_for(
    silence_s: float | None, stale_after: float = STALE_AFTER, down_after: float = DOWN_AFTER
) -> str:
    """The state of a line silent for ``silence_s`` seconds (None: never heard)."""
    if silence_s is None:
        return UNKNOWN
    if silence_s <= stale_after:
        return UP
    return STALE if silence_s <= down_after else DOWN


def lines(
    counters,
    now_ns: int | None = None,
    stale_after: float = STALE_AFTER,
    down_after: float = DOWN_AFTER,
) -> dict[str, dict]:
    """Per line (A, B): ``state`` and ``silence_s`` (None: never heard) at ``now_ns``
    (CLOCK_MONOTONIC; default now)."""
    now = time.monotonic_ns() if now_ns is None else now_ns
    out = {}
    for k, letter in enumerate("AB"):
        rx = int(counters[k * shm.LINE_STRIDE + shm.L_RX_NS])
        silence = max(0, now - rx) / 1e9 if rx > 0 else None
        out[letter] = {"state": state_for(silence, stale_after, down_after), "silence_s": silence}
    return out


@dataclass
class LineHealth:
    """Reports the lines' states and which changed since the last ``observe``."""

    stale_after: float = STALE_AFTER
    down_after: float = DOWN_AFTER
    last: dict[str, str] = field(default_factory=lambda: {"A": UNKNOWN, "B": UNKNOWN})

    def observe(self, counters, now_ns: int | None = None) -> dict[str, dict]:
        """``lines()``, each with ``changed``: its state differs from the last one seen."""
        out = lines(counters, now_ns, self.stale_after, self.down_after)
        for letter, h in out.items():
            h["changed"] = h["state"] != self.last[letter]
            self.last[letter] = h["state"]
        return out
