"""``tickwire bench failover``: how fast the appliance rides through line loss.

In a private lab, with the real appliance (AF_XDP when available) and the simulator
publishing at a fixed rate, in one run:

- failover: line A is cut by BPF on the wire (``bpf/fault.c``) mid-session; the time from
  the cut to the first message taken from line B, read by polling the consumer's
  per-line counters every ~100 us (so the figure is accurate to about that);
- gap fill: for gaps of 1, 100 and 10,000 messages dropped on both lines, the time from
  the moment the arbiter declared the gap to the moment the recovery client had handed the
  consumer every message of it (the recovery client's histogram), plus the arbitration
  window the hole waited before being declared (``run.window_ms``).

The baseline is the arbitration window itself: a fill time is "window + recovery".
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from dataplane import shm
from host import config
from host.appliance import runner as appliance
from host.bench.book import say
from host.exchange import itchgen, lab


class _App:
    def __init__(self, cfg_path: str, channel: str, mode: str):
        self.channel = channel
        shm.remove(channel)
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "host.cli",
                "run",
                "--config",
                cfg_path,
                "--lab",
                "--mode",
                mode,
                "--json",
                "--until-eos",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.reader = appliance.wait_consumer(channel, self.proc)

    def finish(self) -> dict:
        out, err = self.proc.communicate(timeout=300)
        if self.proc.returncode != 0:
            raise RuntimeError(f"tickwire run failed: {err.strip()}")
        shm.remove(self.channel)
        return json.loads(out)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        shm.remove(self.channel)


def _sim(cfg_path: str, session: Path, rate: int, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "host.cli",
            "sim",
            "--config",
            cfg_path,
            "--session",
            str(session),
            "--rate",
            str(rate),
            "--eos-for",
            "2",
            "--heartbeat",
            "0.05",
            "--json",
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def bench_failover(
    messages: int = 300_000, rate: int = 200_000, cut_ms: float = 200.0, mode: str = "xdp"
) -> dict:
    """In a private lab (root): line A cut for ``cut_ms`` mid-session of ``messages`` at
    ``rate`` msgs/s, then gaps of 1, 100 and 10,000 messages lost on both lines."""
    from host.exchange import wirefaults as faults

    if os.geteuid() != 0:
        raise PermissionError("bench failover needs root (network namespaces, XDP, BPF)")
    prefix = f"tbf{os.getpid() % 100000:05d}"
    cfg = config.with_lab(prefix=prefix)
    window_ms = config.RunConfig().window_ms
    tmp = Path(tempfile.mkdtemp(prefix="tickwire-bench-"))
    session = tmp / "s.itch"
    say(f"bench failover: generating {messages:,} messages")
    itchgen.write_session(str(session), messages, 100, 5)
    cfg_path = tmp / "lab.toml"
    cfg_path.write_text(f'[lab]\nprefix = "{prefix}"\n[run]\nchannel = "{prefix}"\nmetrics = ""\n')
    out: dict = {"mode": mode, "rate": rate, "messages": messages, "window_ms": window_ms}
    say(f"bench failover: private lab {prefix}")
    lab.up(cfg.lab)
    try:
        # 1. failover: cut A mid-session, poll who delivers
        app = _App(str(cfg_path), prefix, mode)
        try:
            with faults.WireFaults(cfg.lab, "A") as wire:
                sim = _sim(str(cfg_path), session, rate)
                r = app.reader
                while r.counters()["taken"] < messages // 3:
                    time.sleep(0.001)
                b0 = r.counters()["lines"]["B"]["first"]
                t0 = time.monotonic_ns()
                wire.cut(cut_ms)
                t_switch = None
                deadline = t0 + 5_000_000_000
                while time.monotonic_ns() < deadline:
                    c = np.array(r.m["counters"])
                    if c[shm.LINE_STRIDE + shm.L_FIRST_TAKEN] > b0:
                        t_switch = time.monotonic_ns()
                        break
                    time.sleep(0.0001)
                sim.communicate(timeout=300)
                s = app.finish()
                cut = wire.stats("A")
        finally:
            app.kill()
        out["failover_ms"] = None if t_switch is None else (t_switch - t0) / 1e6
        out["failover_cut_packets"] = cut["dropped_cut"]
        out["failover_gaps_declared"] = s["gaps_declared"]
        out["failover_digest_ok"] = s["check"] is None and s["unrecoverable_messages"] == 0
        say(f"  failover: {out['failover_ms']} ms from cut to the first message from B")
        # 2. gap fill for 1, 100, 10,000 messages lost on both lines
        out["gap_fill"] = {}
        for size in (1, 100, 10_000):
            app = _App(str(cfg_path), prefix, mode)
            try:
                with faults.WireFaults(cfg.lab, "AB") as wire:
                    first = messages // 2
                    wire.drop_range(first, first + size - 1)
                    sim = _sim(str(cfg_path), session, rate)
                    sim.communicate(timeout=300)
                    s = app.finish()
                    dropped = wire.stats("A")["dropped_messages"]
            finally:
                app.kill()
            lat = s.get("recovery_latency_ns", {})
            out["gap_fill"][str(size)] = {
                "dropped_messages": dropped,
                "recovered": s["lines"]["recovery"]["first"],
                "recovery_p50_ms": (lat.get("p50") or 0) / 1e6,
                "recovery_max_ms": (lat.get("p99.9") or 0) / 1e6,
                "fill_ms": window_ms + (lat.get("p50") or 0) / 1e6,
                "whole": s["unrecoverable_messages"] == 0 and s["taken"] == messages,
            }
            say(f"  gap of {size}: {out['gap_fill'][str(size)]}")
    finally:
        for what in faults.remove_all(cfg.lab):
            say(f"  removed {what}")
        lab.down(cfg.lab)
    return out


def text(r: dict) -> str:
    lines = [
        f"failover bench ({r['mode']} mode, {r['rate']:,} msgs/s, "
        f"{r['messages']:,} messages, arbitration window {r['window_ms']} ms)"
    ]
    fo = r["failover_ms"]
    lines.append(
        f"  line A cut -> first message from B: "
        f"{'not seen' if fo is None else f'{fo:.2f} ms'} "
        f"({r['failover_cut_packets']} packets cut, gaps declared "
        f"{r['failover_gaps_declared']}, books whole: {r['failover_digest_ok']})"
    )
    for size, g in r["gap_fill"].items():
        lines.append(
            f"  gap of {int(size):>6,} messages ({g['dropped_messages']:,} dropped in "
            f"whole packets): recovery p50 {g['recovery_p50_ms']:.2f} ms, fill "
            f"~{g['fill_ms']:.2f} ms incl. window, books whole: {g['whole']}"
        )
    return "\n".join(lines)
