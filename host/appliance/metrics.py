"""Prometheus exposition: a custom collector that reads the consumer's shared counters (and
the XDP program's per-CPU map) at scrape time. The hot path never calls into metrics.

Names are ``tickwire_``-prefixed, in base units, counters end in ``_total``; lines and
channels are labels.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.registry import CollectorRegistry

from dataplane import book as bk
from dataplane import itch, shm
from host.appliance import linehealth
from host.config import host_port

LINE_COUNTERS = (
    ("line_packets", shm.L_PACKETS, "Packets received on the line"),
    ("line_bytes", shm.L_BYTES, "UDP payload bytes received on the line"),
    ("line_messages", shm.L_MESSAGES, "Messages carried by the line's data packets"),
    (
        "line_duplicate_messages",
        shm.L_DUPLICATES,
        "Messages already taken from either line, dropped before the book",
    ),
    ("line_first_messages", shm.L_FIRST_TAKEN, "Messages this line delivered first"),
    ("line_malformed_packets", shm.L_MALFORMED, "Packets dropped as malformed"),
    ("line_heartbeats", shm.L_HEARTBEATS, "MoldUDP64 heartbeats received"),
    ("line_end_of_session", shm.L_END, "MoldUDP64 end-of-session packets received"),
    (
        "line_other_session_packets",
        shm.L_OTHER_SESSION,
        "Packets of another MoldUDP64 session, dropped",
    ),
)
LAT_BOUNDS_S = (
    1e-6,
    2e-6,
    5e-6,
    10e-6,
    20e-6,
    50e-6,
    100e-6,
    200e-6,
    500e-6,
    1e-3,
    2e-3,
    5e-3,
    10e-3,
    100e-3,
    1.0,
)


def latency_histogram(name: str, doc: str, channel: str, hist) -> HistogramMetricFamily:
    """A shared-memory latency histogram (``shm.LAT_BUCKETS`` counts of nanoseconds) as a
    Prometheus histogram in seconds, cumulative at ``LAT_BOUNDS_S``; its sum counts each
    bucket at its lower bound. The one conversion, for every such histogram."""
    hist = np.array(hist)  # one copy: buckets, count and sum from the same moment
    lows = np.array([shm.bucket_low(i) for i in range(shm.LAT_BUCKETS)], np.float64) / 1e9
    buckets = [(f"{ub:g}", float(hist[lows < ub].sum())) for ub in LAT_BOUNDS_S]
    buckets.append(("+Inf", float(hist.sum())))
    h = HistogramMetricFamily(name, doc, labels=["channel"])
    h.add_metric([channel], buckets, sum_value=float((hist * lows).sum()))
    return h


class ConsumerCollector:
    """Collects one channel's counters from shared memory (and XDP stats if given).
    Stateless: a scrape shows the counters and, for line health, their age at ``now_ns()``
    (CLOCK_MONOTONIC), so any number of scrapers see the same thing."""

    def __init__(
        self,
        channel: str,
        maps: dict,
        xdp_stats: Callable[[], dict] | None = None,
        recovery: Callable[[], dict] | None = None,
        now_ns: Callable[[], int] = time.monotonic_ns,
        root=None,
    ):
        self.channel = channel
        self.root = root  # the shared memory's root (default /dev/shm/tickwire)
        self.m = maps
        self.xdp_stats = xdp_stats
        self.recovery = recovery
        self.now_ns = now_ns

    def collect(self):
        c = np.array(self.m["counters"])  # one copy: every family from the same moment
        yield from self._lines(c)
        yield from self._sequencing(c)
        yield from self._book(c[shm.BOOK_BASE :])
        yield latency_histogram(
            "tickwire_receive_to_book_seconds",
            "Receive (XDP stamp or the kernel's SO_TIMESTAMPING stamp) to book applied, per packet",
            self.channel,
            self.m["latency"],
        )
        yield from self._events()
        yield from self._clock()
        yield from self._recovery()
        yield from self._xdp()

    def _lines(self, c: np.ndarray):
        """Per line: the consumer's counters, last sequence and health."""
        ch = self.channel
        for name, idx, doc in LINE_COUNTERS:
            f = CounterMetricFamily(f"tickwire_{name}", doc, labels=["channel", "line"])
            for k, letter in enumerate("AB"):
                f.add_metric([ch, letter], float(c[k * shm.LINE_STRIDE + idx]))
            yield f
        g = GaugeMetricFamily(
            "tickwire_line_last_sequence",
            "Last sequence seen on the line",
            labels=["channel", "line"],
        )
        for k, letter in enumerate("AB"):
            g.add_metric([ch, letter], float(c[k * shm.LINE_STRIDE + shm.L_LAST_SEQ]))
        yield g
        g = GaugeMetricFamily(
            "tickwire_line_state",
            "Line health: 0 up, 1 stale, 2 down, -1 never heard",
            labels=["channel", "line"],
        )
        for letter, h in linehealth.lines(c, self.now_ns()).items():
            g.add_metric([ch, letter], float(linehealth.STATE_CODE[h["state"]]))
        yield g

    def _sequencing(self, c: np.ndarray):
        """The arbiter's sequence, gaps and hold; the consumer's and the books' state."""
        ch = self.channel
        g = GaugeMetricFamily(
            "tickwire_sequence_next", "Next sequence number expected", labels=["channel"]
        )
        g.add_metric([ch], float(c[shm.A_NEXT]))
        yield g
        for name, idx, doc in (
            ("messages_taken", shm.A_TAKEN, "Messages taken into the book, each sequence once"),
            ("gaps_declared", shm.A_GAPS_DECLARED, "Gaps declared (handed to recovery)"),
            ("gap_declared_messages", shm.A_GAP_DECLARED_MSGS, "Messages in declared gaps"),
            ("unrecoverable_gaps", shm.A_UNRECOVERABLE_GAPS, "Unrecoverable ranges applied"),
            (
                "unrecoverable_messages",
                shm.A_UNRECOVERABLE_MSGS,
                "Sequences given up by recovery, skipped (never taken)",
            ),
            (
                "hold_overflow_packets",
                shm.A_HOLD_OVERFLOW,
                "Packets ahead of a hole not held for want of a slot (left to recovery)",
            ),
            (
                "join_attempts",
                shm.S_JOIN_TRIES,
                "Logins to the snapshot service tried by the consumer's late join",
            ),
        ):
            f = CounterMetricFamily(f"tickwire_{name}", doc, labels=["channel"])
            f.add_metric([ch], float(c[idx]))
            yield f
        ctl = self.m["control"]
        for name, value, doc in (
            (
                "consumer_up",
                c[shm.S_RUNNING] and not c[shm.S_DIED] and shm.alive(int(c[shm.S_PID])),
                "1 while the consumer loop runs",
            ),
            ("consumer_died", c[shm.S_DIED] != 0, "1 when the consumer died with no report"),
            (
                "books_stale",
                shm.books_stale(c, ctl),
                "1 while the books are not whole: a gap was unrecoverable, the consumer died, "
                "or it is joining by the snapshot service",
            ),
            (
                "consumer_joining",
                c[shm.S_BEGIN] == shm.BEGIN_JOINING,
                "1 while the consumer logs in to the snapshot service or takes its spin",
            ),
            ("consumer_halted", ctl[shm.C_HALTED], "1 when halted by the unrecoverable policy"),
            ("held_packets", c[shm.A_HELD_NOW], "Packets held ahead of a hole right now"),
            (
                "books_began_seq",
                c[shm.S_BEGIN_SEQ],
                "The last sequence in the books the consumer began with (0: empty; else "
                "restored or joined there)",
            ),
        ):
            g = GaugeMetricFamily(f"tickwire_{name}", doc, labels=["channel"])
            g.add_metric([ch], float(value))
            yield g

    def _book(self, b: np.ndarray):
        """The decoder's and the book's counters (``b``: the counters from ``BOOK_BASE``)."""
        ch = self.channel
        f = CounterMetricFamily(
            "tickwire_book_messages", "ITCH messages decoded", labels=["channel"]
        )
        f.add_metric([ch], float(b[itch.C_MESSAGES]))
        yield f
        f = CounterMetricFamily(
            "tickwire_book_anomalies", "Counted book anomalies by kind", labels=["channel", "kind"]
        )
        for kind, i in bk.ANOMALIES.items():
            f.add_metric([ch, kind], float(b[i]))
        f.add_metric([ch, "unknown_type"], float(b[itch.C_UNKNOWN_TYPE]))
        f.add_metric([ch, "bad_length"], float(b[itch.C_BAD_LENGTH]))
        yield f

    def _events(self):
        """The event ring: events published, slots, readers, their largest lag and laps."""
        from dataplane import events

        st = events.ring_status(self.channel, self.root)
        if st is None:
            return
        ch = [self.channel]
        readers = st["readers"]
        for name, doc, value, kind in (
            ("events_published", "Events published on the event ring", st["published"], 1),
            ("event_ring_on", "1: the consumer publishes events", int(st["on"]), 0),
            ("event_ring_slots", "Slots of the event ring", st["slots"], 0),
            ("event_readers", "Live local readers (Subscriber) of the ring", len(readers), 0),
            (
                "event_reader_lag_max",
                "Largest count of published events a live reader has not read yet",
                max((r["lag"] for r in readers), default=0),
                0,
            ),
            (
                "event_reader_laps",
                "Times live readers were lapped (and told to re-snapshot)",
                sum(r["lapped"] for r in readers),
                1,
            ),
        ):
            fam = CounterMetricFamily if kind else GaugeMetricFamily
            f = fam(f"tickwire_{name}", doc, labels=["channel"])
            f.add_metric(ch, value)
            yield f

    def _clock(self):
        """The channel's clock.json (``tickwire calibrate``): offsets, source, TSC Hz."""
        try:
            from host.appliance import clock
        except ImportError:  # host.appliance._clock not built: the rest still scrape
            return
        yield from clock.ClockCollector(self.channel).collect()

    def _recovery(self):
        if self.recovery is None:
            return
        from host.appliance import recovery

        try:
            st = self.recovery()
        except Exception:  # noqa: BLE001 - a scrape must not fail on a stopped client
            st = None
        if st:
            yield from recovery.metric_families(self.channel, st)

    def _xdp(self):
        """The XDP program's per-line steering and pass counters."""
        if self.xdp_stats is None:
            return
        try:
            st = self.xdp_stats()
        except Exception:  # noqa: BLE001 - a scrape must not fail on a detached program
            return
        ch = self.channel
        f = CounterMetricFamily(
            "tickwire_xdp_packets", "Packets the XDP program steered", labels=["channel", "line"]
        )
        fb = CounterMetricFamily(
            "tickwire_xdp_bytes", "Bytes the XDP program steered", labels=["channel", "line"]
        )
        for letter, v in st.get("lines", {}).items():
            f.add_metric([ch, letter], float(v["packets"]))
            fb.add_metric([ch, letter], float(v["bytes"]))
        yield f
        yield fb
        f = CounterMetricFamily(
            "tickwire_xdp_passed_packets",
            "Packets the XDP program passed to the kernel, by reason",
            labels=["channel", "reason"],
        )
        for reason, v in st.get("passed", {}).items():
            f.add_metric([ch, reason], float(v))
        yield f


class JournalCollector:
    """A channel's journal writer, from the ``journal.json`` it keeps up to date
    (``host.appliance.journalwriter``); nothing when the channel has no journal."""

    def __init__(self, channel: str, root=None):
        self.channel, self.root = channel, root

    def collect(self):
        from host.appliance import journalwriter

        st = journalwriter.read_stats(self.channel, self.root)
        if st is None:
            return
        ch = [self.channel]
        for name, key, doc in (
            ("journal_messages", "messages", "Messages written to the journal"),
            ("journal_bytes_written", "bytes", "Bytes written to the journal"),
            ("journal_syncs", "syncs", "fdatasync calls of the journal writer"),
            ("journal_lost_messages", "lost", "Messages not written: the disk was full"),
            ("journal_already_messages", "already", "Messages the journal held already"),
            ("journal_lapped", "lapped", "Times the writer fell a whole message ring behind"),
        ):
            f = CounterMetricFamily(f"tickwire_{name}", doc, labels=["channel"])
            f.add_metric(ch, float(st.get(key) or 0))
            yield f
        for name, value, doc in (
            ("journal_up", bool(st.get("running")), "1 while the journal writer runs"),
            ("journal_disk_full", bool(st.get("disk_full")), "1 while the disk is full"),
            ("journal_holes", len(st.get("holes") or []), "Holes the journal records"),
            ("journal_last_seq", st.get("last_seq") or 0, "The journal's last sequence"),
            ("journal_segments", st.get("segments") or 0, "Segment files of the journal"),
        ):
            g = GaugeMetricFamily(f"tickwire_{name}", doc, labels=["channel"])
            g.add_metric(ch, float(value))
            yield g


class Merged:
    """Several channels' collectors as one: a family that several yield (every channel's
    ``tickwire_line_packets_total``, each with its own ``channel`` label) is exposed once,
    with all their samples -- the text format allows one HELP and TYPE per name."""

    def __init__(self, collectors):
        self.collectors = list(collectors)

    def collect(self):
        families: dict = {}
        for c in self.collectors:
            for f in c.collect():
                if f.name in families:
                    families[f.name].samples.extend(f.samples)
                else:
                    families[f.name] = f
        yield from families.values()


def serve(address: str, *collectors) -> object:
    """Start the HTTP endpoint on ``host:port`` for one collector, or several channels'
    (``Merged``); returns the server (``shutdown()``)."""
    from prometheus_client import start_http_server

    host, port = host_port(address, "run.metrics")
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collectors[0] if len(collectors) == 1 else Merged(collectors))
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server
