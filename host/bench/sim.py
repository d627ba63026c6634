"""``tickwire bench sim``: the publisher's rate (``Simulator``: numba + ``sendmmsg``, both
lines) against a plain Python loop sending the same packets with one ``sendmsg`` each,
in a private lab, as a ratio. No receiver is joined."""

from __future__ import annotations

import os
import time

import numpy as np

from dataplane import moldudp64 as mold
from host import config, netns
from host.bench.book import generated_session, say
from host.exchange import lab
from host.exchange import publisher as simmod
from host.exchange.publisher import line_socket


def bench_sim(
    session_file: str | None = None,
    messages: int = 5_000_000,
    stocks: int = 100,
    repeat: int = 3,
    seed: int = 1,
) -> dict:
    """Publisher rate: ``Simulator`` (numba + sendmmsg, both lines) against a plain Python
    loop sending the same packets with one ``sendmsg`` each, in a private lab; on the ITCH
    file ``session_file``, else a generated session. The best of ``repeat`` runs."""
    if session_file:
        buf, name = np.fromfile(session_file, np.uint8), session_file
    else:
        buf = generated_session(messages, stocks, seed)
        name = f"generated {messages:,} msgs / {stocks:,} stocks"
    session = simmod.Session.from_buffer(buf, name)
    cfg = config.with_lab(prefix=f"tb{os.getpid() % 100000:05d}")
    opts = simmod.SimOptions(pacing=simmod.Pacing(mode="max"), eos_for=0.0, serve=False)
    say(f"bench sim: {name}, private lab {cfg.lab.prefix}")
    lab.up(cfg.lab)
    try:
        with netns.entered(cfg.lab.exchange_ns):
            sim_s, base_s = float("inf"), float("inf")
            sim = None
            for _ in range(repeat):
                sim = simmod.Simulator(session, cfg.lab, opts)
                stats = sim.run()
                sim_s = min(sim_s, stats["seconds"])
                base_s = min(base_s, _baseline_send(sim, cfg.lab))
    finally:
        lab.down(cfg.lab)
    packets = len(sim.packets)
    return {
        "session": name,
        "messages": session.n,
        "packets_per_line": packets,
        "sim_seconds": sim_s,
        "sim_msgs_per_s": session.n / sim_s,
        "sim_packets_per_s": 2 * packets / sim_s,
        "baseline_seconds": base_s,
        "baseline_msgs_per_s": session.n / base_s,
        "ratio_vs_baseline": base_s / sim_s,
    }


def _baseline_send(sim, labcfg) -> float:
    """The same packets, both lines, one Python ``sendmsg`` per packet."""
    socks = [line_socket(line) for line in labcfg.lines.values()]
    hv = memoryview(sim.headers)
    mv = memoryview(sim.session.buf)
    rows = [
        (mold.HEADER_LEN * k, int(p["start"]), int(p["end"])) for k, p in enumerate(sim.packets)
    ]
    try:
        t0 = time.perf_counter()
        for h, a, b in rows:
            for s in socks:
                s.sendmsg([hv[h : h + mold.HEADER_LEN], mv[a:b]])
        return time.perf_counter() - t0
    finally:
        for s in socks:
            s.close()


def sim_text(r: dict) -> str:
    return "\n".join(
        [
            f"{r['session']}: {r['messages']:,} messages, {r['packets_per_line']:,} packets per "
            "line, both lines, no receiver joined",
            f"  tickwire sim (numba + sendmmsg)  {r['sim_msgs_per_s'] / 1e6:6.2f} M msg/s  "
            f"{r['sim_packets_per_s'] / 1e3:7.0f} k packets/s",
            f"  python sendmsg per packet        {r['baseline_msgs_per_s'] / 1e6:6.2f} M msg/s  "
            f"ratio {r['ratio_vs_baseline']:.2f}x",
        ]
    )
