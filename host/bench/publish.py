"""``tickwire bench publish``: what publishing every book change to the event ring costs the
consumer, and how soon a reader on another core sees it (issue 16 §1's budget: messages/s
with the ring on at least 90 % of the ring off, measured in the same run; publish-to-reader
latency reported). Nothing here asserts; it measures and says whether the budget was met.

1. Offline (no root, no network): one session (generated, or ``--session FILE``) framed
   into MoldUDP64 packets as ``tickwire sim`` frames them (its default payload limit),
   all on line A (line B's copies would only be dropped as duplicates), and run through
   the consumer's own per-packet path (``consumer._packet``: the arbiter, decode, book,
   BBO table, event ring, then the arbiter's between-packets work) in a numba loop, one
   receive stamp (``CLOCK_MONOTONIC``) per packet as the receive loops take one. Three
   ways, each round timing each once, best of ``repeat`` rounds:

   - ``off``: the ring the appliance makes with ``[run] events = false`` (``H_ON`` 0,
     ``MIN_SLOTS``: the consumer applies with ``book.apply_stream`` and checks one word a
     packet) -- the baseline;
   - ``on``: ``[run] events = true`` (``event_slots`` slots, the default);
   - ``order``: also ``order_events = true``.

   Each ring is a real one in shared memory (``events.Ring.create``, its clock TSC when
   the TSC is invariant, as after ``tickwire calibrate``), touched once before the runs so
   that the first lap's page faults (once in a consumer's life) are not timed; each run
   starts a fresh book and arbiter, presized by a warm-up pass so no growth is timed. The
   three runs must end with the same digest (the book does not depend on the ring).
2. Publish to reader: the ``on`` ring again, the producer (the same loop) pinned to
   ``producer_core`` and paced -- it spins on the clock until each packet's first message
   is due at ``pace`` messages/s, so a reader keeps up and is not lapped -- and a reader
   process (forked) pinned to ``reader_core`` polling the ring with ``events.poll`` in a
   numba loop. For each event, latency = the reader's stamp right after the poll that
   returned it (``events.read_ns``, the ring's clock) minus its publish stamp
   (``rx_ns + apply_dt + pub_dt``): p50/p99/p99.9 (histogram buckets, 1/8 resolution),
   max, count, times lapped. The reader also times the gaps between its own polls: a gap
   over 10 us is time it was kept off its core (another task, the hypervisor), which every
   event published meanwhile waits out -- read the tail against it.
3. ``--lab`` (root, opt-in): the real appliance (``tickwire run --lab --until-eos``,
   consumer on ``reader_core``) with ``[run] events = false``, then ``true``, each taking
   the same session from ``tickwire sim`` (on ``producer_core``, ``lab_rate`` msgs/s; 0:
   as fast as it can, which overruns the consumer and times recovery instead) in one
   private lab. The consumer's messages/s: the messages it took between its first and its
   last (its counters, polled every millisecond). Below what the consumer can take it
   follows the offered rate, so this ratio says whether the ring costs a receive-bound
   consumer anything it shows; gaps and recovered messages say whether it kept up.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import mmap
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from numba import njit

from dataplane import arbiter, consumer, msgring, shm
from dataplane import events as ev
from dataplane import moldudp64 as mold
from dataplane.book import Book
from dataplane.clock import now_ns
from host.bench.book import generated_session
from host.config import FeedConfig, RunConfig
from host.exchange.publisher import SimOptions

BUDGET = 0.90  # ring on / ring off, consumer messages/s
SLOTS = RunConfig.__dataclass_fields__["event_slots"].default  # [run] event_slots' default
PAYLOAD = SimOptions().payload  # tickwire sim's default UDP payload limit
ROOT = Path(__file__).resolve().parents[2]
MODES = ("off", "on", "order")


@dataclasses.dataclass(frozen=True)
class PublishOptions:
    """What ``bench_publish`` measures (``tickwire bench publish``'s options)."""

    messages: int = 2_000_000
    stocks: int = 100
    seed: int = 1
    session: str | None = None  # an ITCH file instead of a generated session
    repeat: int = 5  # rounds, each timing off, on and order once; best kept
    slots: int = SLOTS  # the on and order rings' slots
    pace: float = 1_000_000.0  # msgs/s of the latency phase's producer
    producer_core: int = 0
    reader_core: int = -1  # -1: the last CPU this process may use
    latency: bool = True
    lab: bool = False
    lab_mode: str = "xdp"
    lab_rate: int = 2_000_000  # msgs/s tickwire sim publishes in the lab phase (0: --max)
    prefix: str | None = None  # the lab's prefix (default tbp<pid>)


class BenchError(OSError):
    """A part of the benchmark could not run: the message says which and why."""


def say(msg: str) -> None:
    print(f"bench publish: {msg}", file=sys.stderr, flush=True)


# --- the session as the consumer sees it ------------------------------------------------------
@njit(nogil=True)
def _lay_out(buf, packets, n, session, out, bounds):
    """MoldUDP64 packets ``0..n-1`` (header, then their messages' blocks) back to back in
    ``out``; ``bounds[k]``: packet k's (start, end)."""
    pos = 0
    for k in range(n):
        bounds[k, 0] = pos
        mold.put_header(out, pos, session, packets[k].seq, packets[k].count)
        pos += mold.HEADER_LEN
        for i in range(packets[k].start, packets[k].end):
            out[pos] = buf[i]
            pos += 1
        bounds[k, 1] = pos
    return pos


def frame(buf: np.ndarray, session: bytes) -> tuple[np.ndarray, np.ndarray, int]:
    """``(packets, bounds, messages)``: the ITCH session ``buf`` in MoldUDP64 packets of at
    most ``PAYLOAD`` bytes, as ``tickwire sim`` sends them."""
    offsets = np.zeros(len(buf) // 2 + 2, np.int64)
    n, bad = mold.index_messages(buf, offsets)
    if bad >= 0:
        raise ValueError(f"session truncated at byte {bad}")
    if n == 0:
        raise ValueError("session holds no messages")
    rows = np.zeros(n, mold.PACKET)
    k = mold.pack(offsets, 0, n, PAYLOAD, rows)
    if k < 0:
        raise ValueError(f"message {-k} does not fit a {PAYLOAD}-byte payload")
    out = np.zeros(len(buf) + k * mold.HEADER_LEN, np.uint8)
    bounds = np.zeros((k, 2), np.int64)
    name = np.frombuffer(session, np.uint8).copy()
    end = _lay_out(buf, rows, k, name, out, bounds)
    return out[:end], bounds, int(n)


# --- the consumer's per-packet path, offline -------------------------------------------------
@njit(nogil=True)
def _consume(pk, bounds, k, session, arb, bk_, ts, t0, ns_per_msg):
    """Packets ``k..`` through ``consumer._packet`` on line A, each stamped received when
    its turn comes; with ``ns_per_msg`` > 0, a packet is not taken before ``t0 +`` (its
    first sequence - 1) ``* ns_per_msg`` (spinning on the clock). Returns ``(k, need)``:
    where to resume and a book ``NEED_*`` (0: every packet done)."""
    ctr = arb[0]
    n = bounds.shape[0]
    while k < n:
        t = now_ns(ts)
        if ns_per_msg > 0.0:
            due = t0 + np.int64((ctr[shm.A_NEXT] - 1) * ns_per_msg)
            while t < due:
                t = now_ns(ts)
        need, done = consumer._packet(pk, bounds[k, 0], bounds[k, 1], 0, t, t, session, arb, bk_)
        k += done
        if need != 0:
            return k, need
    return k, 0


class _Consumer:
    """The consumer's state for one run (as ``tickwire run`` builds it, in private memory):
    counters, hold slots, recovery rings, a fresh book sized like ``like``, and ``ring``."""

    def __init__(self, ring: ev.Ring, like: Book, session: bytes):
        self.m = {n: np.zeros(shape, dt) for n, (dt, shape) in shm.REGIONS.items()}
        self.ctr = self.m["counters"]
        self.ctr[shm.A_NEXT] = 1
        self.book = Book.sized_like(like)
        self.book.counters = self.ctr[shm.BOOK_BASE :]
        self.arb = (
            self.ctr,
            *arbiter.new_hold(RunConfig().hold_slots),
            self.m["gaps"],
            self.m["control"],
            self.m["recov"],
            self.m["recov_meta"],
        )
        self.ring = ring.arrays()
        self.msgs = msgring.off()  # the journal is another process's cost
        self.touched = np.zeros(256, np.int64)
        self.session = np.frombuffer(session, np.uint8).copy()
        self.ts = np.zeros(2, np.int64)

    def bk(self) -> tuple:
        return (
            *self.book.arrays(),
            self.m["bbo"],
            self.touched,
            self.m["latency"],
            *self.ring,
            *self.msgs,
        )

    def run(self, pk: np.ndarray, bounds: np.ndarray, ns_per_msg: float = 0.0) -> float:
        """Every packet through the consumer; the seconds it took (growth included, none
        expected: the book is presized)."""
        k = 0
        t0 = time.perf_counter()
        start = time.monotonic_ns()
        while True:
            k, need = _consume(
                pk, bounds, k, self.session, self.arb, self.bk(), self.ts, start, ns_per_msg
            )
            if need == 0:
                return time.perf_counter() - t0
            self.book.grow(need)


def _tsc_hz() -> int:
    """The TSC's Hz when it is invariant (the event ring then stamps with it, as after
    ``tickwire calibrate``), else 0 (``CLOCK_MONOTONIC``)."""
    from host.appliance import clock

    fit = clock.measure_tsc(0.2)
    if not fit or not {"constant_tsc", "nonstop_tsc"} <= set(fit.get("flags") or ()):
        return 0
    return int(round(float(fit["hz"])))


class _Rings:
    """The three rings, each a real one in shared memory on its own bench channel."""

    def __init__(self, slots: int, tsc_hz: int):
        self.base = f"benchpub{os.getpid()}"
        self.rings: dict[str, ev.Ring] = {}
        try:
            for mode, n, order, on in (
                ("off", ev.MIN_SLOTS, False, False),
                ("on", slots, False, True),
                ("order", slots, True, True),
            ):
                r = ev.Ring.create(self.base + mode, n, order_events=order, on=on, tsc_hz=tsc_hz)
                r.ring["_pad"] = 0  # every page touched now: no first-lap page fault is timed
                self.rings[mode] = r
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self.rings.clear()
        for mode in MODES:
            shm.remove(self.base + mode)


# --- offline throughput -----------------------------------------------------------------------
def throughput(
    pk: np.ndarray, bounds: np.ndarray, messages: int, rings: _Rings, like: Book, repeat: int
) -> dict:
    """Off, on and order, each once per round, ``repeat`` rounds: best rates, their ratios."""
    session = FeedConfig().session.encode()
    warm = min(len(bounds), 2000)  # packets
    t0 = time.perf_counter()
    for mode in MODES:  # compile (once: the same types) and warm up, on a throwaway book
        _Consumer(rings.rings[mode], like, session).run(pk, bounds[:warm])
    compile_s = time.perf_counter() - t0
    best = dict.fromkeys(MODES, float("inf"))
    taken, written, digests = {}, {}, {}
    for r in range(repeat):
        for mode in MODES:
            ring = rings.rings[mode]
            c = _Consumer(ring, like, session)
            w0 = ring.write_pos
            best[mode] = min(best[mode], c.run(pk, bounds))
            taken[mode] = int(c.ctr[shm.A_TAKEN])
            written[mode] = ring.write_pos - w0 if ring.hdr[ev.H_ON] else 0
            digests[mode] = c.book.digest()
        say(
            f"  round {r + 1}/{repeat}: "
            + ", ".join(f"{m} {messages / best[m] / 1e6:.2f}" for m in MODES)
            + " M msgs/s (best so far)"
        )
    out: dict = {
        "compile_seconds": compile_s,
        "rounds": repeat,
    }
    for mode in MODES:
        out[mode] = {
            "messages": taken[mode],
            "seconds": best[mode],
            "msgs_per_s": taken[mode] / best[mode],
            "ns_per_msg": 1e9 * best[mode] / max(1, taken[mode]),
            "events": written[mode],
            "events_per_msg": written[mode] / max(1, taken[mode]),
            "digest": digests[mode],
        }
    off = out["off"]["msgs_per_s"]
    out["ratio_on_vs_off"] = out["on"]["msgs_per_s"] / off
    out["ratio_order_vs_off"] = out["order"]["msgs_per_s"] / off
    out["budget"] = BUDGET
    out["budget_met"] = out["ratio_on_vs_off"] >= BUDGET
    out["same_digest"] = len(set(digests.values())) == 1
    return out


# --- publish to reader ------------------------------------------------------------------------
# the reader's results (int64, shared with the forked reader)
R_COUNT = 0  # events seen
R_MAX = 1  # largest latency (ns)
R_LAPPED = 2  # times the reader was lapped (it then jumps to the head)
R_NEGATIVE = 3  # events stamped published after the reader's stamp (clock skew between cores)
R_UNSTAMPED = 4  # events with no receive stamp (channel events): not in the histogram
R_READY = 5  # the reader is polling
R_STOP = 6  # set by the producer's side: finish what is published, then stop
R_STALLS = 7  # gaps over STALL_NS between two of the reader's polls: it was off its core
R_STALLED_NS = 8  # the time in them
R_MAX_GAP = 9  # the longest gap between two polls
R_START = 10  # the reader's first stamp ...
R_END = 11  # ... and its last
R_LEN = 16
STALL_NS = 10_000


@njit(nogil=True)
def _read(ring, hdr, clk, ts, cursor, out, hist, res):
    """Poll the ring from ``cursor`` until ``res[R_STOP]`` is set and everything written is
    read; histogram of (the reader's stamp right after the poll - each event's publish
    stamp). The gaps between polls say when the reader itself was kept off its core."""
    prev = ev.read_ns(hdr, clk, ts)
    res[R_START] = prev
    res[R_READY] = 1
    while True:
        k = ev.poll(ring, hdr, cursor, out)
        now = ev.read_ns(hdr, clk, ts)
        g = now - prev
        prev = now
        if g > STALL_NS:
            res[R_STALLS] += 1
            res[R_STALLED_NS] += g
        if g > res[R_MAX_GAP]:
            res[R_MAX_GAP] = g
        if k > 0:
            for i in range(k):
                e = out[i]
                if e.rx_ns == 0:
                    res[R_UNSTAMPED] += 1
                    continue
                d = now - (e.rx_ns + np.int64(e.apply_dt) + np.int64(e.pub_dt))
                if d < 0:
                    res[R_NEGATIVE] += 1
                    d = 0
                hist[shm.lat_bucket(d)] += 1
                if d > res[R_MAX]:
                    res[R_MAX] = d
                res[R_COUNT] += 1
        elif k == ev.LAPPED:
            res[R_LAPPED] += 1
            cursor[0] = hdr[ev.H_WRITE]
        elif res[R_STOP] != 0 and cursor[0] >= hdr[ev.H_WRITE]:
            res[R_END] = now
            return


def _shared(n: int, dtype) -> np.ndarray:
    """A zeroed array in anonymous shared memory (the forked reader writes, we read)."""
    dtype = np.dtype(dtype)
    return np.frombuffer(mmap.mmap(-1, max(1, n * dtype.itemsize)), dtype, count=n)


def latency(
    pk: np.ndarray,
    bounds: np.ndarray,
    ring: ev.Ring,
    like: Book,
    pace: float,
    producer_core: int,
    reader_core: int,
) -> dict:
    """A paced producer on ``producer_core``, a forked reader on ``reader_core``."""
    session = FeedConfig().session.encode()
    r, h, clk, _ = ring.arrays()
    hist = _shared(shm.LAT_BUCKETS, np.int64)
    res = _shared(R_LEN, np.int64)
    out = np.zeros(64, ev.EVENT)
    cursor = np.array([ring.write_pos], np.int64)
    res[R_STOP] = 1
    _read(r, h, clk, np.zeros(2, np.int64), cursor, out, hist, res)  # compile before forking
    hist[:], res[:] = 0, 0
    pid = os.fork()
    if pid == 0:  # the reader
        code = 1
        try:
            os.sched_setaffinity(0, {reader_core})
            _read(r, h, clk, np.zeros(2, np.int64), cursor, out, hist, res)
            code = 0
        finally:
            os._exit(code)
    mask = os.sched_getaffinity(0)
    try:
        deadline = time.monotonic() + 30
        while res[R_READY] == 0:
            if time.monotonic() > deadline:
                raise BenchError("the reader did not start within 30 s")
            time.sleep(0.001)
        os.sched_setaffinity(0, {producer_core})
        c = _Consumer(ring, like, session)
        w0 = ring.write_pos
        seconds = c.run(pk, bounds, 1e9 / pace)
        written = ring.write_pos - w0
    finally:
        os.sched_setaffinity(0, mask)
        res[R_STOP] = 1
        if res[R_READY] == 0:  # it never started polling: it would not see the stop
            os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
    if status != 0:
        raise BenchError(f"the reader failed (wait status {status})")
    pct = shm.percentiles(hist)
    reader_ns = int(res[R_END] - res[R_START])
    return {
        "producer_core": producer_core,
        "reader_core": reader_core,
        "pace_msgs_per_s": pace,
        "achieved_msgs_per_s": int(c.ctr[shm.A_TAKEN]) / seconds,
        "messages": int(c.ctr[shm.A_TAKEN]),
        "events": written,
        "count": int(res[R_COUNT]),
        "p50": pct["p50"],
        "p99": pct["p99"],
        "p99.9": pct["p99.9"],
        "max": int(res[R_MAX]),
        "lapped": int(res[R_LAPPED]),
        "negative": int(res[R_NEGATIVE]),
        "unstamped": int(res[R_UNSTAMPED]),
        "reader_stalls": int(res[R_STALLS]),
        "reader_stalled_fraction": int(res[R_STALLED_NS]) / max(1, reader_ns),
        "reader_max_gap_ns": int(res[R_MAX_GAP]),
        "clock": ev.CLOCK_NAMES.get(int(h[ev.H_CLOCK]), "unknown"),
    }


# --- the lab ----------------------------------------------------------------------------------
def follow_taken(reader: shm.Reader, run: subprocess.Popen, n: int, timeout: float = 600):
    """Poll the consumer's messages taken every millisecond until ``n`` (or ``run`` exits,
    or ``timeout``): ``(first, last)``, each ``(time, taken)`` -- the first reading with
    messages and the last change (None: none seen)."""
    c = reader.m["counters"]
    first = last = None
    deadline = time.monotonic() + timeout
    while True:
        taken, now = int(c[shm.A_TAKEN]), time.monotonic()
        if taken > 0 and first is None:
            first = (now, taken)
        if taken > 0 and (last is None or taken != last[1]):
            last = (now, taken)
        if taken >= n or run.poll() is not None or now > deadline:
            return first, last
        time.sleep(0.001)


def stop_procs(*procs) -> None:
    """End each process still running (``None``: skipped): SIGTERM, then SIGKILL after 20 s."""
    for p in procs:
        if p is not None and p.poll() is None:
            p.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=20)
            if p.poll() is None:
                p.kill()
                p.wait()


def finish_runs(sim: subprocess.Popen, run: subprocess.Popen, err) -> tuple[str, str]:
    """Wait for ``tickwire sim`` and then ``tickwire run --until-eos`` (its stderr in the
    file ``err``) to end; their outputs, or ``BenchError`` saying which failed and why."""
    sim_out, sim_err = sim.communicate(timeout=600)
    if sim.returncode != 0:
        raise BenchError(f"tickwire sim failed: {sim_err.strip()[-300:]}")
    out, _ = run.communicate(timeout=300)
    if run.returncode != 0:
        err.seek(0)
        raise BenchError(f"tickwire run failed: {err.read().strip()[-300:]}")
    return sim_out, out


def _lab_run(prefix: str, session: Path, n: int, events: bool, o: PublishOptions, tmp: Path):
    """One ``tickwire run --lab --until-eos`` with ``[run] events = events`` taking the
    session from ``tickwire sim``: the consumer's messages/s from its first message taken
    to its last (counters polled every ms), and the run's summary."""
    from host.appliance import runner

    channel = f"{prefix}{'on' if events else 'off'}"
    cfg = tmp / f"run-{channel}.toml"
    cfg.write_text(
        f'[lab]\nprefix = "{prefix}"\n'
        f'[run]\nchannel = "{channel}"\nmetrics = ""\ncore = {o.reader_core}\n'
        f"events = {'true' if events else 'false'}\n"
    )
    shm.remove(channel)
    err = open(tmp / f"run-{channel}.err", "w+")
    run = subprocess.Popen(
        [sys.executable, "-m", "host.cli", "run", "--config", str(cfg), "--lab"]
        + ["--mode", o.lab_mode, "--json", "--until-eos"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=err,
        text=True,
    )
    sim = None
    try:
        reader = runner.wait_consumer(channel, run, timeout=620)
        pace = ["--max"] if o.lab_rate <= 0 else ["--rate", str(o.lab_rate)]
        sim = subprocess.Popen(
            [sys.executable, "-m", "host.cli", "sim", "--config", str(cfg)]
            + ["--session", str(session), *pace, "--eos-for", "1", "--heartbeat", "0.05"]
            + ["--json"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=lambda: os.sched_setaffinity(0, {o.producer_core}),
        )
        first, last = follow_taken(reader, run, n)
        sim_out, out = finish_runs(sim, run, err)
    finally:
        stop_procs(sim, run)
        err.close()
        shm.remove(channel)
    summary = json.loads(out)
    s = json.loads(sim_out)
    seconds = last[0] - first[0] if first and last and last[0] > first[0] else None
    return {
        "events": events,
        "taken": summary.get("taken"),
        "seconds": seconds,
        "msgs_per_s": (last[1] - first[1]) / seconds if seconds else None,
        "sim_msgs_per_s": s.get("msgs_per_s"),
        "gaps_declared": summary.get("gaps_declared"),
        "recovered": summary.get("lines", {}).get("recovery", {}).get("first"),
        "unrecoverable_messages": summary.get("unrecoverable_messages"),
        "digest": summary.get("digest"),
    }


def lab_phase(session_file: Path, n: int, o: PublishOptions) -> dict:
    """Events off, then on, in one private lab (root)."""
    from host import config
    from host.exchange import lab

    if os.geteuid() != 0:
        raise PermissionError("--lab builds a lab and runs the appliance: run it as root")
    prefix = o.prefix or f"tbp{os.getpid() % 100000:05d}"
    cfg = config.with_lab(prefix=prefix)
    say(f"lab {prefix}: tickwire run --mode {o.lab_mode}, events off then on")
    lab.up(cfg.lab)
    try:
        with tempfile.TemporaryDirectory(prefix="tw-benchpub-") as tmp:
            runs = {}
            for events in (False, True):
                key = "on" if events else "off"
                runs[key] = _lab_run(prefix, session_file, n, events, o, Path(tmp))
                v = runs[key]["msgs_per_s"]
                say(f"  events {key}: {'n/a' if v is None else f'{v / 1e6:.2f} M'} msgs/s")
    finally:
        lab.down(cfg.lab)
    off, on = runs["off"]["msgs_per_s"], runs["on"]["msgs_per_s"]
    ratio = on / off if on and off else None
    return {
        "prefix": prefix,
        "mode": o.lab_mode,
        "sim_rate": o.lab_rate or None,
        **runs,
        "ratio_on_vs_off": ratio,
        "budget_met": None if ratio is None else ratio >= BUDGET,
    }


# --- the run ----------------------------------------------------------------------------------
def _session(o: PublishOptions) -> tuple[np.ndarray, str, Path | None]:
    if o.session:
        return np.fromfile(o.session, np.uint8), o.session, Path(o.session)
    from host.bench.book import cache_dir

    buf = generated_session(o.messages, o.stocks, o.seed)
    path = cache_dir() / f"session-{o.messages}-{o.stocks}-{o.seed}.itch"
    return buf, f"generated {o.messages:,} msgs / {o.stocks:,} stocks", path


def bench_publish(o: PublishOptions = PublishOptions()) -> dict:
    """The whole benchmark (see the module doc); returns the result dict."""
    cpus = sorted(os.sched_getaffinity(0))
    reader_core = cpus[-1] if o.reader_core < 0 else o.reader_core
    o = dataclasses.replace(o, reader_core=reader_core)
    for key in ("producer_core", "reader_core"):
        if getattr(o, key) not in cpus:
            raise ValueError(
                f"--{key.replace('_', '-')} {getattr(o, key)}: not a CPU this process may use "
                f"({cpus})"
            )
    if o.slots < ev.MIN_SLOTS or o.slots & (o.slots - 1):
        raise ValueError(f"--slots {o.slots}: not a power of two >= {ev.MIN_SLOTS}")
    if o.latency and o.producer_core == o.reader_core:
        raise ValueError(
            f"--producer-core and --reader-core are both {o.reader_core}: the reader needs "
            "a core of its own (or --no-latency)"
        )
    if o.lab_mode not in ("xdp", "socket"):
        raise ValueError(f"--lab-mode {o.lab_mode!r}: xdp or socket")
    t_start = time.monotonic()
    buf, name, path = _session(o)
    say(f"{name}: framing into MoldUDP64 packets")
    pk, bounds, messages = frame(buf, FeedConfig().session.encode())
    like = Book()
    like.feed(buf)  # the sizes the session needs: no growth while timed
    tsc_hz = _tsc_hz()
    result: dict = {
        "session": name,
        "messages": messages,
        "packets": len(bounds),
        "machine": {"cpus": os.cpu_count(), "usable": cpus, "kernel": platform.release()},
        "slots": o.slots,
        "clock": "tsc" if tsc_hz else "CLOCK_MONOTONIC",
        "digest": like.digest(),
    }
    rings = _Rings(o.slots, tsc_hz)
    try:
        say(f"offline: ring off, on, on with order events; {o.repeat} rounds")
        result["offline"] = throughput(pk, bounds, messages, rings, like, o.repeat)
        if o.latency:
            say(
                f"publish to reader: producer on core {o.producer_core} paced at "
                f"{o.pace:,.0f} msgs/s, reader on core {o.reader_core}"
            )
            result["latency_ns"] = latency(
                pk,
                bounds,
                rings.rings["on"],
                like,
                o.pace,
                o.producer_core,
                o.reader_core,
            )
    finally:
        rings.close()
    if o.lab:
        if path is None:
            raise ValueError("--lab needs the session as a file")
        result["lab"] = lab_phase(path, messages, o)
        result["lab"]["same_digest"] = all(
            result["lab"][k]["digest"] == result["digest"] for k in ("off", "on")
        )
    result["seconds"] = time.monotonic() - t_start
    return result


# --- text -------------------------------------------------------------------------------------
def _met(v: bool | None) -> str:
    return "not measured" if v is None else ("met" if v else "NOT met")


def _t(ns: float | None) -> str:
    if ns is None:
        return "n/a"
    return f"{ns / 1e6:.2f} ms" if ns >= 1e6 else f"{ns / 1e3:.2f} us"


def budget_line(f: dict) -> str:
    """The offline ratios and the budget, on one line."""
    return (
        f"ring on / off {f['ratio_on_vs_off']:.2f}x (budget >= {f['budget']:.2f}: "
        f"{_met(f['budget_met'])}), with order events / off {f['ratio_order_vs_off']:.2f}x"
    )


def latency_lines(v: dict) -> list[str]:
    """Publish-to-reader latency, and how long the reader itself was kept off its core."""
    return [
        f"publish to reader, core {v['producer_core']} -> {v['reader_core']}, producer paced "
        f"at {v['pace_msgs_per_s'] / 1e6:g} M msgs/s (achieved "
        f"{v['achieved_msgs_per_s'] / 1e6:.2f}), {v['count']:,} events, lapped {v['lapped']}:",
        f"  p50 {_t(v['p50'])}, p99 {_t(v['p99'])}, p99.9 {_t(v['p99.9'])}, max {_t(v['max'])}",
        f"  reader off its core (gaps > {STALL_NS // 1000} us between polls): "
        f"{v['reader_stalls']:,}, longest {_t(v['reader_max_gap_ns'])}, "
        f"{100 * v['reader_stalled_fraction']:.2f} % of the time; the tail waits them out",
    ]


def _rate(v: float | None) -> str:
    return "n/a" if v is None else f"{v / 1e6:.2f} M msgs/s"


def publish_text(r: dict) -> str:
    """The human report of ``bench_publish``'s result."""
    f, m = r["offline"], r["machine"]
    rows = (
        ("off", "ring off (baseline)", None),
        ("on", "ring on", f["ratio_on_vs_off"]),
        ("order", "ring on + order events", f["ratio_order_vs_off"]),
    )
    lines = [
        f"{r['session']}: {r['messages']:,} messages in {r['packets']:,} packets (line A), "
        f"offline, consumer's per-packet path; ring {r['slots']:,} slots, clock {r['clock']}; "
        f"best of {f['rounds']}",
    ]
    for mode, name, ratio in rows:
        v = f[mode]
        lines.append(
            f"  {name:<24}{v['msgs_per_s'] / 1e6:7.2f} M msgs/s {v['ns_per_msg']:6.1f} ns/msg "
            f"{v['events_per_msg']:5.2f} events/msg" + ("" if ratio is None else f"  {ratio:.2f}x")
        )
    lines.append(f"  {budget_line(f)}; same book all three ways: {f['same_digest']}")
    if "latency_ns" in r:
        lines += ["  " + ln for ln in latency_lines(r["latency_ns"])]
        if m["cpus"] <= 2:
            lines.append(
                f"  ({m['cpus']} CPUs: producer and reader have the machine's only cores; "
                "anything else running shares them)"
            )
    if "lab" in r:
        lb = r["lab"]
        for key in ("off", "on"):
            v = lb[key]
            lines.append(
                f"  lab, {lb['mode']}, events {key:<3}  consumer {_rate(v['msgs_per_s'])}, "
                f"sim offered {_rate(v['sim_msgs_per_s'])}; {v['gaps_declared']} gaps, "
                f"{v['recovered']:,} recovered"
            )
        ratio = "n/a" if lb["ratio_on_vs_off"] is None else f"{lb['ratio_on_vs_off']:.2f}x"
        lines.append(
            f"  lab ring on / off: {ratio}, budget {_met(lb['budget_met'])}; same book as "
            f"offline: {lb['same_digest']}"
        )
    lines.append(f"  ({r['seconds']:.0f} s in all)")
    return "\n".join(lines)
