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
    from dataplane import events

    out["events"] = events.ring_status(channel)
    from host.appliance import journalwriter

    out["journal"] = journalwriter.read_stats(channel)
    from host.appliance import restart

    out["start"] = restart.started(channel)
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


def channels(root=None) -> list[str]:
    """The channels with a consumer's shared memory under ``root`` (default
    /dev/shm/tickwire), running or not, by name."""
    root = root or shm.SHM_ROOT
    try:
        return sorted(d.name for d in root.iterdir() if (d / "counters").exists())
    except FileNotFoundError:
        return []


def collect_all(names: list[str], netns: str | None = None, now_ns: int | None = None) -> dict:
    """``collect`` for several channels: ``{"channels": {name: ...}, "xdp": [...]}``, the
    XDP programs listed once."""
    out: dict = {"channels": {}}
    for name in names:
        st = collect(name, netns, now_ns)
        out["xdp"] = st.pop("xdp")
        if "xdp_error" in st:
            out["xdp_error"] = st.pop("xdp_error")
        out["channels"][name] = st
    return out


def text_all(st: dict) -> str:
    parts = [text(c, show_xdp=False) for c in st["channels"].values()]
    parts.append(text({"xdp": st.get("xdp"), "xdp_error": st.get("xdp_error")}, channel=False))
    return "\n".join(parts)


def text(st: dict, show_xdp: bool = True, channel: bool = True) -> str:
    lines = []
    if not channel:
        return _xdp_text(st)
    c = st.get("consumer")
    if c is None:
        lines.append(f"channel {st['channel']}: no consumer ({st.get('consumer_error')})")
    else:
        state = "running" if c["running"] else "stopped"
        if not c["running"] and c["start"]["how"] == "starting" and c["pid"]:
            state = "starting (compiling, or loading from numba's cache)"
        if c["died"]:
            state = f"DIED ({c['died']}, no report)"
        lines.append(
            f"channel {st['channel']}: consumer {state} (pid {c['pid']}, {c['mode']}"
            f" mode), next sequence {c['next_seq']:,}, taken {c['taken']:,}, "
            f"unrecoverable {c['unrecoverable_messages']:,}"
        )
        if c["died"]:
            lines.append(
                f"  BOOKS STALE: the consumer died at sequence {c['next_seq']:,}; nothing "
                "is applied until a consumer rebuilds them"
            )
        elif c["began"] == "joining":
            why = ""
            st_ = st.get("start") or {}
            errs = (st_.get("join") or {}).get("errors") or []
            if errs:
                why = f" (last try: {errs[-1]})"
            lines.append(
                f"  BOOKS STALE: joining by the snapshot service, try {c['join_tries']}{why}"
            )
        elif c["stale"] or c["halted"]:
            lines.append(
                f"  BOOKS STALE: {c['unrecoverable_gaps']} unrecoverable gap(s), "
                f"{c['unrecoverable_messages']:,} messages missing"
                + (" -- consumer HALTED by policy" if c["halted"] else "")
            )
        if c["began"] in ("restored", "joined", "join failed"):
            lines.append(f"  books began {c['began']} at sequence {c['began_seq']:,}")
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
    evr = st.get("events")
    if evr and evr["on"]:
        rd = evr["readers"]
        lines.append(
            f"events: {evr['published']:,} published, {evr['slots']:,} slots"
            f"{' in hugepages' if evr['hugepages'] else ''}, {evr['clock']} clock"
            f"{', per-order events' if evr['order_events'] else ''}; {len(rd)} reader(s)"
            + (
                f", largest lag {max(r['lag'] for r in rd):,}, lapped "
                f"{sum(r['lapped'] for r in rd)}"
                if rd
                else ""
            )
        )
    elif evr:
        lines.append("events: off ([run] events = false)")
    j = st.get("journal")
    if j:
        if j.get("error"):
            lines.append(f"journal: writer FAILED: {j['error']}")
        else:
            holes = j.get("holes") or []
            lines.append(
                f"journal: {'writing' if j.get('running') else 'stopped'}, "
                f"{j.get('messages', 0):,} messages written, last seq {j.get('last_seq')}, "
                f"{len(holes)} hole(s), {j.get('segments', 0)} segment(s)"
                + (
                    " -- DISK FULL, messages lost: " + f"{j.get('lost', 0):,}"
                    if j.get("disk_full")
                    else ""
                )
                + (f", lapped {j['lapped']}" if j.get("lapped") else "")
            )
    if st.get("clock"):
        from host.appliance import clock

        lines.append(clock.status_line(st["clock"]))
    if show_xdp:
        lines.append(_xdp_text(st))
    return "\n".join(lines)


def _xdp_text(st: dict) -> str:
    if st.get("xdp"):
        return "\n".join(
            f"xdp: {x.get('ifname')} {x.get('mode')} prog id {x.get('prog_id')} "
            f"{x.get('prog_name', '')}".rstrip()
            for x in st["xdp"]
        )
    return "xdp: no program attached" + (f" ({st['xdp_error']})" if st.get("xdp_error") else "")
