"""``tickwire bench rx``: the receive path against the XDP_DROP ceiling of the same veth, in
one run, in a private lab, then what publishing to the event ring costs the consumer and
how soon a reader on another core sees it. Nothing here asserts; it measures and says
whether the targets and budgets were met.

The sender is ``host.exchange.pktgen`` (an XDP program run with BPF_PROG_RUN live frames out of
``ex-a``, pinned to ``sender_core``); everything is sent on line A (``ex-a`` -> ``feed-a``).
Two frames: 64 bytes (a MoldUDP64 heartbeat; packets/s) and a full 1,419-byte frame
(1,377-byte MoldUDP64 payload, 46 ITCH messages: 23 adds and their deletes, so the book
stays bounded; messages/s). In order:

1. XDP_DROP ceiling: ``tw_sink`` (count, drop) on ``feed-a``; the generator at full speed
   for ``duration`` s per frame size; rate = frames the sink counted / send time.
2. Jitter probe: a numba loop spinning on ``clock_gettime(CLOCK_MONOTONIC)`` for
   ``jitter_seconds`` on ``consumer_core`` -- no consumer running, the generator sending
   to the sink at ``latency_rate`` meanwhile (as during the latency phases) -- with a
   histogram of the gaps between consecutive readings: what the machine itself takes away
   (a VM's vCPU stalls for up to milliseconds). Latency tails are read against it.
3. For each path (``xdp``: AF_XDP; ``socket``: kernel UDP sockets): the real appliance
   (``tickwire run --lab --mode M`` in a subprocess, consumer pinned to
   ``consumer_core``), then
   - latency at ``latency_rate`` packets/s for ``latency_seconds``, small data packets
     (one add and its delete, 121-byte frames) and full ones: receive-to-book percentiles
     from the consumer's histogram, the part of it written during the phase. In AF_XDP
     mode that is from the XDP program's ``bpf_ktime_get_ns`` stamp on ``feed-a`` (before
     the AF_XDP copy) to the packet applied to the book; in socket mode from the kernel's
     software receive stamp (``SO_TIMESTAMPING``, taken as the packet enters the stack,
     moved to ``CLOCK_MONOTONIC``) to the book -- the UDP stack and the socket queue are
     in it, so the two paths compare like for like.
   - the highest loss-free rate for each frame size: one step at full speed (if nothing is
     lost the path took everything the sender could send while the sender's core also did
     the path's kernel-side work, and the rate is marked ``sender_bound``: the path's own
     limit is at least that), else ``steps`` bisection steps on the offered rate between 0
     and the smaller of that and 1.5x what the consumer took meanwhile. A step sends
     ``rate x duration`` frames, waits for the consumer to drain, and compares the packets
     the consumer counted on line A with the frames sent; loss-free means none missing.
     The rate recorded is the achieved one (the generator's first-to-last frame time).
     Every step starts once the arbiter has settled (``Consumer.settle``), and messages it
     had to skip during the step count as lost frames.
4. Ratios (AF_XDP loss-free / socket loss-free, AF_XDP / XDP_DROP ceiling, both for 64-byte
   packets/s) and targets: >= 3x, >= 75 %, AF_XDP p50 < 10 us at ``latency_rate`` (small
   packets).
5. The event ring, once the lab is down (``publish_messages`` 0 skips it):
   ``tickwire bench publish``'s offline phases (``host.bench.publish``) on a generated
   session of ``publish_messages``: consumer messages/s through the consumer's per-packet
   path with the ring off, on, and on with per-order events (ratios against off, best of
   3, and issue 16's budget: on >= 90 % of off), and publish-to-reader latency with the
   producer on ``sender_core`` and a reader process on ``consumer_core``. Offline, because
   in this lab the consumer waits on the network: the ratio there is close to 1 whatever
   the ring costs (``tickwire bench publish --lab`` measures it on the appliance).

On veth the generator, the peer's XDP program, the AF_XDP copy and the kernel UDP stack all
run on the sender's core; the consumer's core runs only the consumer. The lab is removed on
every exit path.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from numba import njit

from dataplane import shm
from dataplane.consumer import now_ns

ROOT = Path(__file__).resolve().parents[2]  # the repository (host/bench/rx.py)


@dataclasses.dataclass(frozen=True)
class RxOptions:
    """What ``bench_rx`` measures, and how long (``tickwire bench rx``'s options)."""

    duration: float = 1.0  # seconds per step
    steps: int = 6  # bisection steps per search
    latency_rate: float = 100_000.0  # packets/s of the latency phases
    latency_seconds: float = 2.0
    jitter_seconds: float = 2.0
    sender_core: int = 0
    consumer_core: int = -1  # -1: the last CPU this process may use
    modes: str = "xdp,socket"
    prefix: str | None = None  # lab prefix (default tbrx<pid>)
    publish_messages: int = 500_000  # the event ring phase's session (0: skip it)


TARGET_VS_SOCKET = 3.0
TARGET_VS_DROP = 0.75
TARGET_P50_NS = 10_000
MODE_NAMES = {"xdp": "af_xdp", "socket": "socket"}


class BenchError(OSError):
    """The benchmark cannot run a part: the message says which and why."""


def say(msg: str) -> None:
    print(f"bench rx: {msg}", file=sys.stderr, flush=True)


# --- jitter probe -----------------------------------------------------------------------------
@njit(nogil=True)
def _spin(hist, seconds_ns, ts, stall_ns):
    """Read CLOCK_MONOTONIC back to back for ``seconds_ns``; histogram of the gaps.
    Returns (readings, max gap, gaps over ``stall_ns``, ns lost in them)."""
    prev = now_ns(ts)
    end = prev + seconds_ns
    n = 0
    mx = 0
    stalls = 0
    stalled = 0
    while prev < end:
        t = now_ns(ts)
        g = t - prev
        hist[shm.lat_bucket(g)] += 1
        if g > mx:
            mx = g
        if g > stall_ns:
            stalls += 1
            stalled += g
        prev = t
        n += 1
    return n, mx, stalls, stalled


def jitter_probe(core: int, seconds: float, stall_ns: int = 10_000) -> dict:
    """Spin on ``core`` for ``seconds``: percentiles of the gaps between readings (ns)."""
    out: dict = {}

    def body():
        os.sched_setaffinity(0, {core})  # this thread only
        ts = np.zeros(2, np.int64)
        hist = np.zeros(shm.LAT_BUCKETS, np.int64)
        _spin(hist, 1_000_000, ts, stall_ns)  # compile and warm up
        hist[:] = 0
        n, mx, stalls, stalled = _spin(hist, int(seconds * 1e9), ts, stall_ns)
        pct = shm.percentiles(hist)
        # weighted by the time each gap lasted: the gap a packet arriving at a random
        # moment falls into -- what a latency percentile is to be read against
        low = np.array([shm.bucket_low(i) for i in range(shm.LAT_BUCKETS)], np.float64)
        timed = shm.percentiles(np.round(hist * low).astype(np.int64))
        out.update(
            core=core,
            seconds=seconds,
            readings=int(n),
            p50=pct["p50"],
            p99=pct["p99"],
            **{"p99.9": pct["p99.9"]},
            max=int(mx),
            time_p50=timed["p50"],
            time_p99=timed["p99"],
            **{"time_p99.9": timed["p99.9"]},
            stall_threshold_ns=stall_ns,
            stalls=int(stalls),
            stalled_fraction=stalled / (seconds * 1e9),
        )

    t = threading.Thread(target=body, name="tw-jitter")
    t.start()
    t.join()
    return out


# --- the appliance under test -----------------------------------------------------------------
class Consumer:
    """``tickwire run --lab --mode MODE`` in a subprocess on its own channel."""

    def __init__(self, cfg, mode: str, core: int, workdir: Path, timeout: float = 120.0):
        self.channel = f"benchrx{os.getpid()}{mode}"
        self.mode = mode
        path = workdir / f"run-{mode}.toml"
        text = (
            f'[lab]\nprefix = "{cfg.lab.prefix}"\nmtu = {cfg.lab.mtu}\n'
            f'[feed]\nsession = "{cfg.feed.session}"\n'
            f'[run]\nchannel = "{self.channel}"\ncore = {core}\nmetrics = ""\n'
            # no re-request server in this lab: a lossy step's holes are given up fast
            "recovery_timeout_ms = 10.0\nrecovery_retries = 0\n"
            "recovery_slo_ms = 50.0\n"
        )
        path.write_text(text)
        self.errfile = open(workdir / f"run-{mode}.err", "w+")  # closed in stop()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "host.cli",
                "run",
                "--config",
                str(path),
                "--lab",
                "--mode",
                mode,
                "--json",
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=self.errfile,
            text=True,
        )
        deadline = time.monotonic() + timeout
        self.reader = None
        while True:
            if self.proc.poll() is not None:
                why = self._err()
                self.stop()
                raise BenchError(f"tickwire run --mode {mode} exited: {why}")
            try:
                reader = shm.Reader(self.channel)
                if reader.counters()["running"]:
                    self.reader = reader
                    break
            except FileNotFoundError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise BenchError(f"the {mode} consumer did not start within {timeout:.0f} s")
            time.sleep(0.05)

    def _err(self) -> str:
        self.errfile.seek(0)
        lines = [ln for ln in self.errfile.read().splitlines() if ln.strip()]
        return " | ".join(lines[-3:]) or "no message"

    def packets(self) -> tuple[int, int]:
        """(packets, messages) the consumer counted on line A."""
        c = self.reader.m["counters"]
        return int(c[shm.L_PACKETS]), int(c[shm.L_MESSAGES])

    def latency_hist(self) -> np.ndarray:
        return np.array(self.reader.m["latency"])

    def arbiter(self) -> tuple[int, int, int]:
        """(next sequence, sequences skipped as unrecoverable, packets held)."""
        c = self.reader.m["counters"]
        return int(c[shm.A_NEXT]), int(c[shm.A_UNRECOVERABLE_MSGS]), int(c[shm.A_HELD_NOW])

    def settle(self, pg, limit: float = 10.0) -> bool:
        """Wait until the arbiter has taken or given up everything sent so far: the next
        sequence is the generator's and nothing is held. A lossy step leaves holes that
        recovery has to give up first (there is no re-request server in this lab: each
        waits out the recovery SLO); a loss at the very end is only seen once something
        announces the sequence after it, so a heartbeat goes out while waiting."""
        deadline = time.monotonic() + limit
        announced = False
        while True:
            nxt, _, held = self.arbiter()
            if nxt >= pg.next_seq and held == 0:
                return True
            if time.monotonic() > deadline:
                say(
                    f"  the arbiter did not settle within {limit:.0f} s (next sequence {nxt:,}"
                    f" of {pg.next_seq:,}, {held:,} held): this step may count skips"
                )
                return False
            if not announced:
                template = pg.template
                pg.use(pg.heartbeat())
                pg.send(1)
                pg.use(template)
                announced = True
            time.sleep(0.02)

    def drain(self, expected: int, quiet: float = 0.3, limit: float = 5.0) -> tuple[int, int]:
        """Wait until line A counted ``expected`` packets, or nothing moved for ``quiet``."""
        last, since = self.packets(), time.monotonic()
        deadline = since + limit
        while last[0] < expected and time.monotonic() < deadline:
            time.sleep(0.02)
            now = self.packets()
            if now != last:
                last, since = now, time.monotonic()
            elif time.monotonic() - since >= quiet:
                break
        return last

    def stop(self) -> dict:
        summary: dict = {}
        if self.errfile.closed:
            return summary
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
            out, _ = self.proc.communicate(timeout=60)
            if self.proc.returncode == 0 and out.strip():
                summary = json.loads(out)
            else:
                summary = {"error": self._err()}
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            summary = {"error": "did not stop within 60 s (killed)"}
        finally:
            self.errfile.close()
            shm.remove(self.channel)
        return summary


# --- steps ------------------------------------------------------------------------------------
def _step(pg, consumer: Consumer, rate: float | None, n: int, burst: int = 64) -> dict:
    """Send ``n`` frames at ``rate`` from a settled arbiter. ``lost`` counts the frames the
    consumer never received plus, as frames, any messages the arbiter then had to skip: a
    frame received but given up (its hold was full behind a hole) is not loss-free."""
    n = max(1000, int(n))
    settled = consumer.settle(pg)
    p0, m0 = consumer.drain(0, quiet=0.1, limit=1.0)
    _, skipped0, _ = consumer.arbiter()
    r = pg.send(n, rate, burst)
    p1, m1 = consumer.drain(p0 + r["sent"])
    consumer.settle(pg)
    _, skipped1, _ = consumer.arbiter()
    received = p1 - p0
    per = max(1, pg.messages)
    skipped = skipped1 - skipped0
    lost = r["sent"] - received + (skipped + per - 1) // per
    return {
        "requested_pps": float(rate or 0.0),
        "offered_pps": r["rate_pps"],
        "sent": r["sent"],
        "received": received,
        "lost": lost,
        "messages": m1 - m0,
        "skipped_messages": skipped,
        "settled": settled,
        "seconds": r["seconds"],
        "calls": r["calls"],
    }


def loss_free(
    pg,
    consumer: Consumer,
    template: bytes,
    label: str,
    duration: float,
    steps: int,
    guess: float,
    log,
) -> dict:
    """Highest loss-free offered rate of ``template`` (achieved rates, packets/s)."""
    pg.use(template)
    per_packet = pg.messages
    probe = _step(pg, consumer, None, guess * duration / 10)  # how fast is full speed here?
    top = _step(pg, consumer, None, probe["offered_pps"] * duration)
    history = [probe, top]
    log(f"  {label}: full speed {top['offered_pps'] / 1e6:.3f} M/s offered, {top['lost']:,} lost")
    best = top["offered_pps"] if top["lost"] <= 0 else 0.0
    sender_bound = top["lost"] <= 0
    if not sender_bound:
        # what the consumer took at full speed bounds what it can take (its backlog drained
        # after the send only adds to it): search below 1.5x that
        took = top["received"] / top["seconds"] if top["seconds"] > 0 else top["offered_pps"]
        lo, hi = 0.0, min(top["offered_pps"], 1.5 * took)
        for _ in range(steps):
            mid = (lo + hi) / 2
            s = _step(pg, consumer, mid, mid * duration)
            history.append(s)
            ok = s["lost"] <= 0
            log(
                f"  {label}: {mid / 1e6:.3f} M/s asked, {s['offered_pps'] / 1e6:.3f} offered, "
                f"{s['lost']:,} lost{'' if ok else ' x'}"
            )
            if ok:
                best = max(best, s["offered_pps"])
                lo = mid
                if s["offered_pps"] < 0.9 * mid:  # the sender itself cannot go faster
                    break
            else:
                hi = mid
    return {
        "packets_per_s": best,
        "messages_per_s": best * per_packet,
        "messages_per_packet": per_packet,
        "sender_bound": sender_bound,
        "full_speed_pps": top["offered_pps"],
        "steps": history,
    }


def latency(pg, consumer: Consumer, template: bytes, rate: float, seconds: float) -> dict:
    pg.use(template)
    h0 = consumer.latency_hist()
    s = _step(pg, consumer, rate, rate * seconds, burst=4)
    pct = shm.percentiles(consumer.latency_hist() - h0)
    return {
        "rate_pps": s["offered_pps"],
        "lost": s["lost"],
        "p50": pct["p50"],
        "p99": pct["p99"],
        "p99.9": pct["p99.9"],
        "count": pct["count"],
        "messages_per_packet": pg.messages,
    }


# --- the run ----------------------------------------------------------------------------------
def _lab_config(prefix: str):
    from host import config

    return config.with_lab(prefix=prefix)


def _ceiling(pg, labcfg, template: bytes, duration: float, log) -> dict:
    pg.use(template)
    with pg.sink(labcfg.appliance_ns, labcfg.line_a.appliance_if) as sink:
        probe = pg.send(200_000)  # warm-up, and the size of the real run
        before = sink.packets()
        r = pg.send(max(10_000, int(probe["rate_pps"] * duration)))
        time.sleep(0.05)
        counted = sink.packets() - before
    rate = counted / r["seconds"] if r["seconds"] > 0 else 0.0
    log(
        f"  XDP_DROP {len(template)}-byte frames: {rate / 1e6:.3f} M/s "
        f"({counted:,} of {r['sent']:,} counted)"
    )
    return {
        "packets_per_s": rate,
        "sent": r["sent"],
        "counted": counted,
        "sender_pps": r["rate_pps"],
    }


def _jitter_under_load(pg, labcfg, core: int, seconds: float, rate: float, log) -> dict:
    pg.use(pg.heartbeat())
    with pg.sink(labcfg.appliance_ns, labcfg.line_a.appliance_if):
        sending = pg.start(int(rate * (seconds + 1.0)), rate)
        try:
            time.sleep(0.3)
            out = jitter_probe(core, seconds)
        finally:
            sending.join()
    log(
        f"  jitter on core {core}: gaps p50 {out['p50']:.0f} ns, p99 {out['p99']:.0f} ns, "
        f"p99.9 {out['p99.9']:.0f} ns, max {out['max'] / 1e3:.1f} us; by time p99 "
        f"{out['time_p99'] / 1e3:.2f} us, p99.9 {out['time_p99.9'] / 1e3:.2f} us; "
        f"{out['stalls']:,} gaps over 10 us"
    )
    return out


def _path(pg, cfg, mode: str, o: dict, workdir: Path, ceilings: dict, log) -> dict:
    log(
        f"{MODE_NAMES[mode]}: starting tickwire run --mode {mode} (consumer on core "
        f"{o['consumer_core']})"
    )
    pg.reset(1)  # a fresh consumer expects sequence 1
    consumer = Consumer(cfg, mode, o["consumer_core"], workdir)
    out: dict = {}
    try:
        pg.use(pg.data())
        _step(pg, consumer, o["latency_rate"], o["latency_rate"] * 0.3)  # warm-up
        out["latency_ns"] = latency(
            pg, consumer, pg.data(1), o["latency_rate"], o["latency_seconds"]
        )
        out["latency_full_ns"] = latency(
            pg, consumer, pg.data(), o["latency_rate"], o["latency_seconds"]
        )
        for key in ("latency_ns", "latency_full_ns"):
            v = out[key]
            log(
                f"  latency {v['messages_per_packet']} msgs/packet at "
                f"{v['rate_pps'] / 1e3:.0f} k/s: p50 {v['p50'] / 1e3:.1f} us, p99 "
                f"{v['p99'] / 1e3:.1f} us, p99.9 {v['p99.9'] / 1e3:.1f} us"
            )
        out["small"] = loss_free(
            pg,
            consumer,
            pg.heartbeat(),
            "64-byte",
            o["duration"],
            o["steps"],
            ceilings["small"],
            log,
        )
        out["full"] = loss_free(
            pg, consumer, pg.data(), "1,419-byte", o["duration"], o["steps"], ceilings["full"], log
        )
    finally:
        summary = consumer.stop()
    out["packets_per_s"] = out["small"]["packets_per_s"]
    out["full_packets_per_s"] = out["full"]["packets_per_s"]
    out["messages_per_s"] = out["full"]["messages_per_s"]
    out["consumer"] = {
        k: summary.get(k)
        for k in (
            "mode",
            "taken",
            "unrecoverable_messages",
            "gaps_declared",
            "live_orders",
            "error",
        )
        if k in summary
    }
    if "book" in summary:
        out["consumer"]["book_anomalies"] = sum(
            v for k, v in summary["book"].items() if k not in ("messages", "growths")
        )
    log(
        f"  {MODE_NAMES[mode]} loss-free: {out['packets_per_s'] / 1e6:.3f} M packets/s "
        f"(64 B), {out['messages_per_s'] / 1e6:.2f} M msgs/s (1,419 B)"
    )
    return out


def publish_phase(o: dict) -> dict:
    """``tickwire bench publish``'s offline phases, small (module doc, step 5)."""
    from host.bench import publish

    say(f"event ring: {o['publish_messages']:,} messages offline, ring off / on / order events")
    return publish.bench_publish(
        publish.PublishOptions(
            messages=o["publish_messages"],
            repeat=3,
            producer_core=o["sender_core"],
            reader_core=o["consumer_core"],
            latency=o["sender_core"] != o["consumer_core"],
        )
    )


def publish_lines(p: dict) -> list[str]:
    """The event ring's figures in ``rx_text``."""
    from host.bench import publish

    f = p["offline"]
    lines = [
        f"  event ring, offline ({p['messages']:,} msgs, consumer's per-packet path): ring off "
        f"{f['off']['msgs_per_s'] / 1e6:.2f}, on {f['on']['msgs_per_s'] / 1e6:.2f}, with order "
        f"events {f['order']['msgs_per_s'] / 1e6:.2f} M msgs/s",
        f"    {publish.budget_line(f)}",
    ]
    if "latency_ns" in p:
        lines += ["    " + ln for ln in publish.latency_lines(p["latency_ns"])]
    return lines


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def bench_rx(opts: RxOptions = RxOptions()) -> dict:
    """Run the whole receive benchmark (see the module doc); returns the result dict."""
    from host.exchange import lab
    from host.exchange import pktgen as pgmod

    o = dataclasses.asdict(opts)
    cpus = sorted(os.sched_getaffinity(0))
    if o["consumer_core"] < 0:
        o["consumer_core"] = cpus[-1]
    for key in ("sender_core", "consumer_core"):
        if o[key] not in cpus:
            raise ValueError(
                f"--{key.replace('_', '-')} {o[key]}: not a CPU this process may use ({cpus})"
            )
    modes = [m.strip() for m in str(o["modes"]).split(",") if m.strip()]
    for m in modes:
        if m not in MODE_NAMES:
            raise ValueError(f"--modes: {m!r} is not xdp or socket")
    if o["duration"] <= 0 or o["steps"] < 0:
        raise ValueError("--duration must be positive and --steps at least 0")
    if os.geteuid() != 0:
        raise PermissionError("bench rx builds a lab and loads XDP programs: run it as root")
    cfg = _lab_config(o["prefix"] or f"tbrx{os.getpid() % 100000:05d}")
    t0 = time.monotonic()
    say(
        f"private lab {cfg.lab.prefix}; sender on core {o['sender_core']}, consumer on "
        f"core {o['consumer_core']} of {len(cpus)}"
    )
    result: dict = {
        "machine": {
            "cpus": os.cpu_count(),
            "kernel": platform.release(),
            "sender_core": o["sender_core"],
            "consumer_core": o["consumer_core"],
        },
        "lab": cfg.lab.prefix,
        "duration_per_step_s": o["duration"],
        "latency_rate_pps": o["latency_rate"],
    }
    pg = None
    lab.up(cfg.lab)
    try:
        # the socket path has no XDP program on feed-a: GRO gives the veth its NAPI
        pgmod.peer_napi(cfg.lab.appliance_ns, cfg.lab.line_a.appliance_if)
        pg = pgmod.PacketGen(cfg.lab, "A", cfg.feed.session, cpu=o["sender_core"])
        result["frames"] = {
            "small_bytes": len(pg.heartbeat()),
            "full_bytes": len(pg.data()),
            "full_messages": pgmod.frame_messages(pg.data()),
            "latency_bytes": len(pg.data(1)),
            "latency_messages": 2,
        }
        say("XDP_DROP ceiling of feed-a")
        small = _ceiling(pg, cfg.lab, pg.heartbeat(), o["duration"], say)
        full = _ceiling(pg, cfg.lab, pg.data(), o["duration"], say)
        result["xdp_drop"] = {
            "packets_per_s": small["packets_per_s"],
            "full_packets_per_s": full["packets_per_s"],
            "full_messages_per_s": full["packets_per_s"] * result["frames"]["full_messages"],
            "small": small,
            "full": full,
        }
        say("jitter probe")
        result["jitter_ns"] = _jitter_under_load(
            pg, cfg.lab, o["consumer_core"], o["jitter_seconds"], o["latency_rate"], say
        )
        ceilings = {"small": small["sender_pps"], "full": full["sender_pps"]}
        with tempfile.TemporaryDirectory(prefix="tw-benchrx-") as tmp:
            for mode in modes:
                try:
                    result[MODE_NAMES[mode]] = _path(pg, cfg, mode, o, Path(tmp), ceilings, say)
                except BenchError as e:  # the other path is still worth measuring
                    say(f"{MODE_NAMES[mode]}: {e}")
                    result[MODE_NAMES[mode]] = {"error": str(e)}
    finally:
        if pg is not None:
            pg.close()
        lab.down(cfg.lab)
    if o["publish_messages"] > 0:
        result["publish"] = publish_phase(o)
    result["ratios"], result["targets"] = _verdict(result)
    result["seconds"] = time.monotonic() - t0
    return result


def _verdict(r: dict) -> tuple[dict, dict]:
    x, s, d = r.get("af_xdp"), r.get("socket"), r["xdp_drop"]
    x = None if x is None or "error" in x else x
    s = None if s is None or "error" in s else s
    ratios = {
        "af_xdp_vs_socket": _ratio(x and x["packets_per_s"], s and s["packets_per_s"]),
        "af_xdp_vs_socket_messages": _ratio(x and x["messages_per_s"], s and s["messages_per_s"]),
        "af_xdp_vs_xdp_drop": _ratio(x and x["packets_per_s"], d["packets_per_s"]),
        "af_xdp_vs_xdp_drop_full": _ratio(x and x["full_packets_per_s"], d["full_packets_per_s"]),
    }
    vs_s, vs_d = ratios["af_xdp_vs_socket"], ratios["af_xdp_vs_xdp_drop"]
    p50 = x["latency_ns"]["p50"] if x else None
    targets = {
        "af_xdp_3x_socket": None if vs_s is None else vs_s >= TARGET_VS_SOCKET,
        "af_xdp_75pct_of_xdp_drop": None if vs_d is None else vs_d >= TARGET_VS_DROP,
        "af_xdp_p50_under_10us": None if p50 is None else p50 < TARGET_P50_NS,
    }
    return ratios, targets


# --- text -------------------------------------------------------------------------------------
def _m(v: float | None) -> str:
    return "   n/a" if v is None else f"{v / 1e6:6.3f}"


def _us(v: float | None) -> str:
    return "n/a" if v is None else f"{v / 1e3:.2f}"


def _met(v: bool | None) -> str:
    return "not measured" if v is None else ("met" if v else "NOT met")


def _row(label: str, cols: list[str], note: str = "") -> str:
    return f"  {label:<30}" + "".join(f"{c:>12}" for c in cols) + (f"   {note}" if note else "")


def rx_text(r: dict) -> str:
    """The human report of ``bench_rx``'s result."""
    m, f, d = r["machine"], r["frames"], r["xdp_drop"]
    lines = [
        f"receive benchmark, lab {r['lab']}: {m['cpus']} CPUs, kernel {m['kernel']}, "
        f"{r['duration_per_step_s']:g} s per step",
        f"  sender (in-kernel generator + the veth's receive-side kernel work) on core "
        f"{m['sender_core']}, consumer on core {m['consumer_core']}",
        f"  frames: {f['small_bytes']} B (MoldUDP64 heartbeat) for packets/s, {f['full_bytes']} B "
        f"({f['full_messages']} ITCH messages) for messages/s",
        _row("rates, M/s", ["pkts 64 B", f"pkts {f['full_bytes']} B", "msgs"]),
        _row(
            "XDP_DROP ceiling",
            [_m(d["packets_per_s"]), _m(d["full_packets_per_s"]), _m(d["full_messages_per_s"])],
        ),
    ]
    for key, name in (("af_xdp", "AF_XDP loss-free"), ("socket", "socket loss-free")):
        if key in r and "error" in r[key]:
            lines.append(f"  {name:<30}failed: {r[key]['error']}")
        elif key in r:
            p = r[key]
            note = "64 B: took all the sender could send" if p["small"]["sender_bound"] else ""
            lines.append(
                _row(
                    name,
                    [_m(p["packets_per_s"]), _m(p["full_packets_per_s"]), _m(p["messages_per_s"])],
                    note,
                )
            )
    lines.append(_row("receive to book, us", ["p50", "p99", "p99.9"]))
    for key, name, what in (
        ("af_xdp", "AF_XDP", "from the XDP stamp"),
        ("socket", "socket", "from the kernel's receive stamp"),
    ):
        if key not in r or "error" in r[key]:
            continue
        for lk in ("latency_ns", "latency_full_ns"):
            v = r[key][lk]
            label = f"{name} {v['messages_per_packet']} msgs at {v['rate_pps'] / 1e3:.0f} k/s"
            lines.append(_row(label, [_us(v["p50"]), _us(v["p99"]), _us(v["p99.9"])], what))
    j = r["jitter_ns"]
    lines += [
        _row(
            f"jitter core {j['core']}, per reading",
            [_us(j["p50"]), _us(j["p99"]), _us(j["p99.9"])],
            f"max {_us(j['max'])} us",
        ),
        _row(
            f"jitter core {j['core']}, by time",
            [_us(j["time_p50"]), _us(j["time_p99"]), _us(j["time_p99.9"])],
            f"{j['stalls']:,} gaps > 10 us in {j['seconds']:g} s, "
            f"{100 * j['stalled_fraction']:.2f} % of the time",
        ),
    ]
    ra, t = r["ratios"], r["targets"]

    def x(v):
        return "n/a" if v is None else f"{v:.2f}x"

    lines += [
        f"  AF_XDP / socket, 64 B packets/s: {x(ra['af_xdp_vs_socket'])} (target >= 3x: "
        f"{_met(t['af_xdp_3x_socket'])}); messages/s {x(ra['af_xdp_vs_socket_messages'])}",
        f"  AF_XDP / XDP_DROP, 64 B: {x(ra['af_xdp_vs_xdp_drop'])} (target >= 0.75x: "
        f"{_met(t['af_xdp_75pct_of_xdp_drop'])}); {f['full_bytes']} B "
        f"{x(ra['af_xdp_vs_xdp_drop_full'])}",
        f"  AF_XDP receive-to-book p50 < 10 us at {r['latency_rate_pps'] / 1e3:.0f}k packets/s: "
        f"{_met(t['af_xdp_p50_under_10us'])}",
    ]
    if "publish" in r:
        lines += publish_lines(r["publish"])
    lines.append(f"  ({r['seconds']:.0f} s in all)")
    return "\n".join(lines)
