"""The event ring without a network (``dataplane.events``, ``dataplane.subscriber``): the
consumer's per-packet path publishing every book change. Whatever the session, the levels a
client rebuilds from a snapshot plus the events after it are the book's; the book itself is
the same with the ring on or off; each kind of message makes the events it should; a reader
overtaken by the writer is told so."""

import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dataplane import arbiter, consumer, msgring, shm
from dataplane import book as bk
from dataplane import events as ev
from dataplane import moldudp64 as mold
from dataplane import subscriber as sb
from dataplane.book import Book
from host.exchange import itchgen
from tests import itchbytes as ib

SESSION = b"EVENTS0001"


def packetize(buf: np.ndarray, limit: int = 1400) -> tuple[np.ndarray, np.ndarray]:
    """MoldUDP64 packets of the framed messages in ``buf``: one buffer, (start, end) rows."""
    offs = np.zeros(len(buf) // 2 + 2, np.int64)
    n, bad = mold.index_messages(buf, offs)
    assert bad == -1
    rows = np.zeros(n + 1, mold.PACKET)
    k = mold.pack(offs, 0, n, limit, rows)
    out, bounds = bytearray(), []
    for r in rows[:k]:
        start = len(out)
        out += mold.header(SESSION, int(r["seq"]), int(r["count"]))
        out += buf[r["start"] : r["end"]].tobytes()
        bounds.append((start, len(out)))
    return np.frombuffer(bytes(out), np.uint8).copy(), np.array(bounds, np.int64)


class Consumer:
    """The consumer's state around ``consumer._packet``, publishing into ``ring``."""

    def __init__(self, ring):
        self.m = {n: np.zeros(shape, dt) for n, (dt, shape) in shm.REGIONS.items()}
        self.ctr = self.m["counters"]
        self.ctr[shm.A_NEXT] = 1
        self.book = Book(orders=64, levels=64, ladder=64, counters=self.ctr[shm.BOOK_BASE :])
        self.arb = (
            self.ctr,
            *arbiter.new_hold(64),
            self.m["gaps"],
            self.m["control"],
            self.m["recov"],
            self.m["recov_meta"],
        )
        self.ring = ring
        self.touched = np.zeros(256, np.int64)
        self.msgs = msgring.private(1 << 22)  # the journal's copy of what was taken
        self.session = np.frombuffer(SESSION, np.uint8).copy()

    def bk(self):
        return (
            *self.book.arrays(),
            self.m["bbo"],
            self.touched,
            self.m["latency"],
            *self.ring,
            *self.msgs,
        )

    def packet(self, b, start, end, rx=1000):
        while True:
            need, done = consumer._packet(
                b, start, end, 0, rx, 2000, self.session, self.arb, self.bk()
            )
            if need:
                self.book.grow(need)
            if done:
                return

    def snapshot(self):
        """What the consumer answers to a snapshot request: rows, stocks, seq, position."""
        ctl = self.m["control"]
        ctl[shm.C_SNAP_REQ] += 1
        consumer.snapshot(
            self.book.sides,
            self.book.ladder,
            self.book.levels,
            self.book.stocks,
            self.m["levels"],
            self.m["stocks"],
            ctl,
            self.ctr,
            self.ring[1],
        )
        rows = self.m["levels"][: int(ctl[shm.C_SNAP_ROWS])].copy()
        return rows, int(ctl[shm.C_SNAP_SEQ]), int(ctl[shm.C_SNAP_POS])


def read_all(ring, pos: int = 0) -> np.ndarray:
    out = np.zeros(int(ring[1][ev.H_WRITE]) - pos + 1, ev.EVENT)
    n = ev.poll(ring[0], ring[1], np.array([pos], np.int64), out)
    assert n >= 0
    return out[:n]


class Copy:
    """A client's copy of the levels, rebuilt by the Subscriber's numba code."""

    def __init__(self, rows=None):
        self.keys = np.zeros(1 << 10, np.int64)
        self.vals = np.zeros((1 << 10, 2), np.int64)
        self.meta = np.zeros(2, np.int64)
        self.follow = np.ones(bk.N_LOCATES, np.uint8)
        self.bbo = np.zeros((bk.N_LOCATES, 2, 2), np.int64)
        self.stocks = np.zeros(bk.N_LOCATES, bk.STOCK)
        self.state = np.zeros(sb.STATE_LEN, np.int64)
        if rows is not None:
            while sb._load_rows(rows, self.follow, self.keys, self.vals, self.meta, self.bbo) < len(
                rows
            ):
                self._grow()

    def _grow(self):
        keys, vals = self.keys, self.vals
        self.keys = np.zeros(2 * len(keys), np.int64)
        self.vals = np.zeros((2 * len(keys), 2), np.int64)
        self.meta[:] = 0
        for i in np.nonzero(keys)[0]:
            sb.depth_set(self.keys, self.vals, self.meta, keys[i], vals[i, 0], vals[i, 1])

    def apply(self, events):
        k = 0
        while True:
            k, status = sb.apply_events(
                events,
                k,
                len(events),
                self.follow,
                np.zeros(0, np.uint64),
                self.keys,
                self.vals,
                self.meta,
                self.bbo,
                self.stocks,
                self.state,
            )
            if status != sb.NEED_GROW:
                return
            self._grow()

    def rows(self):
        out = np.zeros((int(self.meta[sb.D_COUNT]), 5), np.int64)
        sb._export(self.keys, self.vals, out)
        return out[np.lexsort((out[:, 2], out[:, 1], out[:, 0]))]


@pytest.fixture(scope="module")
def session():
    buf = itchgen.generate(120_000, 40, seed=11)
    pbuf, bounds = packetize(buf)
    ref = Book()
    ref.feed(buf)
    return buf, pbuf, bounds, ref


@pytest.mark.parametrize("order_events", [False, True])
def test_snapshot_plus_events_rebuild_the_book(session, order_events):
    buf, pbuf, bounds, ref = session
    ring = ev.Ring.private(1 << 20, order_events=order_events).arrays()
    c = Consumer(ring)
    half = len(bounds) // 2
    for s, e in bounds[:half]:
        c.packet(pbuf, s, e)
    rows, seq, pos = c.snapshot()
    for s, e in bounds[half:]:
        c.packet(pbuf, s, e)
    assert c.book.digest() == ref.digest()
    events = read_all(ring)
    assert len(events) == int(ring[1][ev.H_WRITE])  # every event published, none pending
    # from the snapshot on: the book's levels exactly
    copy = Copy(rows)
    copy.apply(events[pos:])
    assert sb.digest_of(copy.rows()) == ref.digest()
    assert (copy.rows() == ref_rows(ref)).all()  # the order counts too
    # from the start: the same
    whole = Copy()
    whole.apply(events)
    assert sb.digest_of(whole.rows()) == ref.digest()
    # every event says which message made it, in feed order, the snapshot at a boundary
    assert (np.diff(events["seq"]) >= 0).all()
    assert events["seq"][pos - 1] <= seq < events["seq"][pos]
    # the BBO events leave the client with the book's best prices
    for loc in range(1, 41):
        b = ref.bbo(loc)
        assert tuple(whole.bbo[loc].ravel()[[0, 1, 2, 3]]) == (b[0], b[1], b[2], b[3])
    kinds = set(events["kind"])
    assert {ev.LEVEL, ev.BBO, ev.TRADE, ev.INSTRUMENT, ev.CHANNEL} <= kinds
    assert (ev.ORDER_ADD in kinds) == order_events


def ref_rows(book: Book) -> np.ndarray:
    out = np.zeros((bk.count_levels(book.sides), 5), np.int64)
    bk.export_levels(book.sides, book.ladder, book.levels, out)
    return out


def test_per_order_events_rebuild_every_order(session):
    """A client keeping its own L3 from ORDER_* events ends with the book's live orders."""
    buf, pbuf, bounds, ref = session
    ring = ev.Ring.private(1 << 20, order_events=True).arrays()
    c = Consumer(ring)
    for s, e in bounds:
        c.packet(pbuf, s, e)
    orders: dict[int, list] = {}
    for e in read_all(ring):
        k, ref_no = int(e["kind"]), int(e["value"])
        if k == ev.ORDER_ADD:
            assert ref_no not in orders
            orders[ref_no] = [int(e["locate"]), int(e["side"]), int(e["price"]), int(e["n"])]
        elif k in (ev.ORDER_EXEC, ev.ORDER_CANCEL):
            orders[ref_no][3] -= int(e["n"])
            if orders[ref_no][3] <= 0:
                del orders[ref_no]
        elif k == ev.ORDER_DELETE:
            del orders[ref_no]
    levels: dict[tuple, list] = {}
    for loc, side, price, shares in orders.values():
        lv = levels.setdefault((loc, side, price), [0, 0])
        lv[0] += shares
        lv[1] += 1
    rows = np.array([(*k, *v) for k, v in levels.items()], np.int64).reshape(-1, 5)
    assert sb.digest_of(rows) == ref.digest()
    assert len(orders) == ref.live_orders


def test_the_book_is_the_same_with_the_ring_on_or_off(session):
    buf, pbuf, bounds, ref = session
    results = []
    for ring in (ev.Ring.off(), ev.Ring.private(1 << 12).arrays()):  # a small ring laps: fine
        c = Consumer(ring)
        for s, e in bounds:
            c.packet(pbuf, s, e)
        results.append((c.book.digest(), c.ctr[shm.BOOK_BASE :].copy(), c.m["bbo"].copy()))
    assert results[0][0] == results[1][0] == ref.digest()
    assert (results[0][1] == results[1][1]).all()  # decoder and anomaly counters alike
    assert (
        results[0][2][["bid_px", "bid_qty", "ask_px", "ask_qty"]]
        == results[1][2][["bid_px", "bid_qty", "ask_px", "ask_qty"]]
    ).all()


def _one(msgs, order_events=False, ring_slots=1 << 12):
    ring = ev.Ring.private(ring_slots, order_events=order_events).arrays()
    c = Consumer(ring)
    body = ib.framed(*msgs)
    data = np.frombuffer(mold.request(SESSION, 1, len(msgs)) + body, np.uint8).copy()
    c.packet(data, 0, len(data), rx=5)
    return read_all(ring), c


def test_each_message_makes_its_events():
    events, c = _one(
        [
            ib.R("AAPL", locate=1),
            ib.H("AAPL", "T", locate=1),
            ib.A(10, "B", 100, 1_000_000, locate=1),  # level + BBO
            ib.A(11, "B", 50, 990_000, locate=1),  # level only
            ib.E(10, 30, locate=1),  # level + BBO + trade at the resting price
            ib.C(10, 20, 1_000_100, printable="N", locate=1),  # ... at its own price
            ib.U(11, 12, 70, 995_000, locate=1),  # two levels + BBO
            ib.X(12, 70, locate=1),  # level gone; the best bid is still 50 at 1_000_000
            ib.P(500, 1_001_000, locate=1),  # a trade, no book change
            ib.Q(9_000_000_000, 1_002_000, locate=1),  # a cross beyond 32 bits of shares
            ib.D(77, locate=1),  # unknown reference: nothing
            ib.S("C"),
        ]
    )
    got = [
        (
            int(e["seq"]),
            ev.KIND_NAMES[int(e["kind"])],
            int(e["side"]),
            int(e["price"]),
            int(e["value"]),
        )
        for e in events
    ]
    sym = int.from_bytes(b"AAPL    ", "big")
    assert got == [
        (1, "instrument", ev.NO_SIDE, 0, np.int64(np.uint64(sym))),
        (2, "instrument", ev.NO_SIDE, 0, 0),
        (3, "level", 0, 1_000_000, 100),
        (3, "bbo", 0, 1_000_000, 100),
        (4, "level", 0, 990_000, 50),
        (5, "level", 0, 1_000_000, 70),
        (5, "bbo", 0, 1_000_000, 70),
        (5, "trade", 0, 1_000_000, 30),
        (6, "level", 0, 1_000_000, 50),
        (6, "bbo", 0, 1_000_000, 50),
        (6, "trade", 0, 1_000_100, 20),
        (7, "level", 0, 990_000, 0),
        (7, "level", 0, 995_000, 70),
        (8, "level", 0, 995_000, 0),
        (9, "trade", 0, 1_001_000, 500),
        (10, "trade", ev.NO_SIDE, 1_002_000, 9_000_000_000),
        (12, "channel", ev.NO_SIDE, 0, 0),
    ]
    assert chr(events[1]["n"]) == "T" and chr(events[-1]["n"]) == "C"
    assert events[10]["flags"] & ev.F_NON_PRINTABLE and events[10]["code"] == ord("C")
    assert (events["rx_ns"][:-1] == 5).all()  # the packet's receive stamp on each
    assert c.ctr[shm.BOOK_BASE + bk.B_UNKNOWN_REF] == 1


def test_a_reader_the_writer_overtook_is_told():
    ring = ev.Ring.private(ev.MIN_SLOTS)
    arrays = ring.arrays()
    cursor = np.zeros(1, np.int64)
    out = np.zeros(64, ev.EVENT)
    ts = np.zeros(2, np.int64)
    for i in range(100):
        ev.channel_event(*arrays, ev.CH_SYSTEM, 0, i, 0, 0)
    assert ev.poll(ring.ring, ring.hdr, cursor, out) == 64 and cursor[0] == 64
    for i in range(ev.MIN_SLOTS):  # the writer laps the reader
        ev.channel_event(ring.ring, ring.hdr, ring.clk, ts, ev.CH_SYSTEM, 0, i, 0, 0)
    assert ev.poll(ring.ring, ring.hdr, cursor, out) == ev.LAPPED
    assert cursor[0] == 64  # where it was lost, for the error message
    # a reader at the head waits; the marked-ahead slots never look ready
    head = np.array([int(ring.hdr[ev.H_WRITE])], np.int64)
    assert ev.poll(ring.ring, ring.hdr, head, out) == 0
    ev.channel_event(ring.ring, ring.hdr, ring.clk, ts, ev.CH_SYSTEM, 0, 7, 0, 0)
    assert ev.poll(ring.ring, ring.hdr, head, out) == 1 and out[0]["seq"] == 7


def test_a_torn_read_is_a_lap():
    """A reader that copied a slot while the writer rewrote it (the slot's version moved
    under it) is lapped, never handed the torn record."""
    ring = ev.Ring.private(ev.MIN_SLOTS)
    ts = np.zeros(2, np.int64)
    ev.channel_event(ring.ring, ring.hdr, ring.clk, ts, ev.CH_SYSTEM, 0, 1, 0, 0)
    ring.ring[0]["version"] = 3  # the writer's mark for the next lap of slot 0
    assert ev.poll(ring.ring, ring.hdr, np.zeros(1, np.int64), np.zeros(4, ev.EVENT)) == ev.LAPPED


@settings(max_examples=40, deadline=None)
@given(
    ops=st.lists(
        st.tuples(st.integers(0, 3), st.integers(0, 1), st.integers(0, 40), st.integers(0, 5)),
        max_size=400,
    )
)
def test_the_clients_level_table_is_a_map(ops):
    """The client's open-addressing table (insert, update, backward-shift delete, growth)
    behaves as a dict."""
    copy = Copy()
    copy.keys = np.zeros(16, np.int64)
    copy.vals = np.zeros((16, 2), np.int64)
    ref = {}
    for loc, side, price, shares in ops:
        key = sb._key(loc, side, price)
        while sb.depth_set(copy.keys, copy.vals, copy.meta, key, shares, 1) == sb.NEED_GROW:
            copy._grow()
        if shares:
            ref[(loc, side, price)] = shares
        else:
            ref.pop((loc, side, price), None)
        assert int(copy.meta[sb.D_COUNT]) == len(ref)
    for (loc, side, price), shares in ref.items():
        assert sb.depth_get(copy.keys, copy.vals, sb._key(loc, side, price))[0] == shares
    rows = copy.rows()
    assert {(r[0], r[1], r[2]): r[3] for r in rows.tolist()} == ref


def test_random_loss_still_rebuilds(session):
    """Packets lost on the line and re-delivered later (held, then released): the events of
    held packets carry their own receive stamps and come in sequence order."""
    buf, pbuf, bounds, ref = session
    ring = ev.Ring.private(1 << 20).arrays()
    c = Consumer(ring)
    rng = random.Random(4)
    order = list(range(len(bounds)))
    for i in range(0, len(order) - 3, 7):  # swap neighbours: each swap holds one packet
        if rng.random() < 0.5:
            order[i], order[i + 1] = order[i + 1], order[i]
    for k in order:
        s, e = bounds[k]
        c.packet(pbuf, s, e, rx=1000 + k)
    assert c.book.digest() == ref.digest()
    events = read_all(ring)
    assert (np.diff(events["seq"]) >= 0).all()
    held = c.ctr[shm.L_HELD]
    assert held > 0
    copy = Copy()
    copy.apply(events)
    assert sb.digest_of(copy.rows()) == ref.digest()


def test_status_and_metrics_show_the_ring_and_its_readers(tmp_path):
    """``tickwire status`` and the exporter read the ring's header and the readers' registry:
    events published, slots, clock, and each live reader's lag and laps."""
    from host.appliance import metrics
    from host.appliance import status as st_

    assert ev.ring_status("nochan", tmp_path) is None
    ring = ev.Ring.create("evst", ev.MIN_SLOTS, tsc_hz=0, root=tmp_path)
    ts = np.zeros(2, np.int64)
    for i in range(10):
        ev.channel_event(ring.ring, ring.hdr, ring.clk, ts, ev.CH_SYSTEM, 0, i, 0, 0)
    reg, path = ev.register_reader("evst", tmp_path)
    reg[ev.R_CREATED_NS] = ring.hdr[ev.H_CREATED_NS]
    reg[ev.R_POS], reg[ev.R_LAPPED] = 4, 2
    s = ev.ring_status("evst", tmp_path)
    assert (s["on"], s["slots"], s["published"], s["clock"]) == (
        True,
        ev.MIN_SLOTS,
        10,
        "monotonic",
    )
    assert [(r["lag"], r["lapped"]) for r in s["readers"]] == [(6, 2)]
    text = st_.text({"channel": "evst", "consumer": None, "consumer_error": "x", "events": s})
    assert "events: 10 published, 4,096 slots, monotonic clock; 1 reader(s), largest lag 6" in text
    maps = {n: np.zeros(shape, dt) for n, (dt, shape) in shm.REGIONS.items()}
    fams = {
        f.name: f.samples[0].value
        for f in metrics.ConsumerCollector("evst", maps, root=tmp_path).collect()
        if f.name.startswith("tickwire_event")
    }
    assert fams == {
        "tickwire_events_published": 10,
        "tickwire_event_ring_on": 1,
        "tickwire_event_ring_slots": ev.MIN_SLOTS,
        "tickwire_event_readers": 1,
        "tickwire_event_reader_lag_max": 6,
        "tickwire_event_reader_laps": 2,
    }
    path.unlink()  # a reader that closed is gone from both
    assert ev.ring_status("evst", tmp_path)["readers"] == []
