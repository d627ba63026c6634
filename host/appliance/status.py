"""``tickwire status``: what runs -- the consumer's counters from shared memory and the XDP
programs attached to interfaces (in the current or a named network namespace)."""

from __future__ import annotations

from dataplane import shm


def collect(channel: str, netns: str | None = None, now_ns: int | None = None) -> dict:
    """What runs on ``channel``: the consumer's counters, its lines' health at ``now_ns``
    (CLOCK_MONOTONIC; default now), the recovery client's, the clock's and XDP's state."""
    out: dict = {"channel": channel}
    try:
        r = shm.Reader(channel)
        out["consumer"] = r.counters()
        out["consumer"]["latency_ns"] = r.latency()
        from host.appliance import linehealth

        for letter, h in linehealth.lines(r.m["counters"], now_ns).items():
            out["consumer"]["lines"][letter]["state"] = h["state"]
            out["consumer"]["lines"][letter]["silence_s"] = h["silence_s"]
        from host.appliance import recovery

        rec = recovery.read_shared(r.m["recovery"])
        rec.pop("histogram", None)
        out["recovery"] = rec
    except FileNotFoundError as e:
        out["consumer"] = None
        out["consumer_error"] = str(e)
    try:
        from host.appliance import clock

        out["clock"] = clock.load(channel)
    except ImportError:  # host.appliance._clock not built
        out["clock"] = None
    try:
        from host.appliance import loader

        out["xdp"] = loader.attached(netns)
    except Exception as e:  # noqa: BLE001 - status shows what it can
        out["xdp"] = []
        out["xdp_error"] = str(e)
    return out


def text(st: dict) -> str:
    lines = []
    c = st.get("consumer")
    if c is None:
        lines.append(f"channel {st['channel']}: no consumer ({st.get('consumer_error')})")
    else:
        state = "running" if c["running"] else "stopped"
        if not c["running"] and c["start"]["how"] == "starting" and c["pid"]:
            state = "starting (compiling, or loading from numba's cache)"
        lines.append(
            f"channel {st['channel']}: consumer {state} (pid {c['pid']}, {c['mode']}"
            f" mode), next sequence {c['next_seq']:,}, taken {c['taken']:,}, "
            f"unrecoverable {c['unrecoverable_messages']:,}"
        )
        if c["stale"] or c["halted"]:
            lines.append(
                f"  BOOKS STALE: {c['unrecoverable_gaps']} unrecoverable gap(s), "
                f"{c['unrecoverable_messages']:,} messages missing"
                + (" -- consumer HALTED by policy" if c["halted"] else "")
            )
        lines.append(
            f"  gaps declared {c['gaps_declared']:,} ({c['gap_declared_messages']:,} "
            f"messages), held now {c['held_now']}"
        )
        for letter, ln in c["lines"].items():
            state = f" [{ln['state']}]" if "state" in ln else ""
            lines.append(
                f"  line {letter}{state}: {ln['packets']:,} packets, {ln['messages']:,} "
                f"messages, {ln['duplicates']:,} duplicates, last seq "
                f"{ln['last_seq']:,}"
            )
    rec = st.get("recovery")
    if rec and (rec["running"] or any(rec["counters"].values())):
        rc = rec["counters"]
        lat = rec["latency_ns"]
        p50 = f", fill latency p50 {lat['p50'] / 1e6:.2f} ms" if lat.get("p50") else ""
        lines.append(
            f"recovery: {'running' if rec['running'] else 'stopped'}, gaps detected "
            f"{rc.get('detected', 0)}, filled {rc.get('filled', 0)}, unrecoverable "
            f"{rc.get('unrecoverable', 0)}, outstanding {rc.get('outstanding', 0)}"
            f"{p50}"
        )
    if st.get("clock"):
        from host.appliance import clock

        lines.append(clock.status_line(st["clock"]))
    if st.get("xdp"):
        for x in st["xdp"]:
            lines.append(
                f"xdp: {x.get('ifname')} {x.get('mode')} prog id {x.get('prog_id')} "
                f"{x.get('prog_name', '')}".rstrip()
            )
    else:
        lines.append(
            "xdp: no program attached" + (f" ({st['xdp_error']})" if st.get("xdp_error") else "")
        )
    return "\n".join(lines)
