"""The arbiter alone (no network): whatever happens to two copies of a sequence -- loss,
duplication, reordering, any interleaving of the lines -- the book receives exactly that
sequence minus the ranges declared unrecoverable, each message once, in order.

Every message is an add of one share at one price with reference = sequence number, so
the level's FIFO queue is the order the book saw the messages in, and a message applied
twice would be a counted duplicate add.
"""

import random

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from dataplane import arbiter, consumer, msgring, shm
from dataplane import events as ev
from dataplane import moldudp64 as mold
from dataplane.book import B_DUP_ADD, BID, Book
from tests import itchbytes as ib

SESSION = b"TICKWIRE01"
PRICE = 1_000_000


def _packets(n: int, rng: random.Random) -> list[tuple[int, int, bytes]]:
    out, seq = [], 1
    while seq <= n:
        k = min(rng.randint(1, 5), n - seq + 1)
        body = ib.framed(*(ib.A(s, "B", 1, PRICE) for s in range(seq, seq + k)))
        out.append((seq, k, mold.request(SESSION, seq, k) + body))
        seq += k
    return out


class Rig:
    """The consumer's state around ``arbiter.on_packet``, with recovery answering every
    declared gap "unrecoverable" at once (what the appliance does with no server)."""

    def __init__(self, hold_slots: int, window_ns: int, window_msgs: int):
        self.m = {
            name: np.zeros(shape, dtype)
            for name, (dtype, shape) in shm.REGIONS.items()
            if name != "levels"
        }
        self.ctr, self.control = self.m["counters"], self.m["control"]
        self.ctr[shm.A_NEXT] = 1
        self.control[shm.C_WINDOW_NS] = window_ns
        self.control[shm.C_WINDOW_MSGS] = window_msgs
        self.book = Book(orders=16, levels=16, ladder=16, counters=self.ctr[shm.BOOK_BASE :])
        hold_buf, self.hold_meta = arbiter.new_hold(hold_slots)
        self.arb = (
            self.ctr,
            hold_buf,
            self.hold_meta,
            self.m["gaps"],
            self.control,
            self.m["recov"],
            self.m["recov_meta"],
        )
        self.touched = np.zeros(256, np.int64)
        self.msgs = msgring.private(1 << 22)  # the journal's copy of what was taken
        self.ring = ev.Ring.private(1 << 16).arrays()
        self.session = np.frombuffer(SESSION, np.uint8).copy()
        self.lost: list[tuple[int, int]] = []
        self.halted = False
        self.t = 1_000

    def bk(self):
        return (
            *self.book.arrays(),
            self.m["bbo"],
            self.touched,
            self.m["latency"],
            *self.ring,
            *self.msgs,
        )

    def events(self) -> np.ndarray:
        """Every event published so far (the ring is big enough never to lap here)."""
        out = np.zeros(int(self.ring[1][ev.H_WRITE]) + 1, ev.EVENT)
        n = ev.poll(self.ring[0], self.ring[1], np.zeros(1, np.int64), out)
        assert n >= 0
        return out[:n]

    def _settle(self, status: int) -> None:
        while status != 0:  # the book asked for room: grow, then the same call again
            self.book.grow(status)
            status = self._retry()
        while (gap := shm.gap_pop(self.m)) is not None:
            self.lost.append((gap[0], gap[1]))
            assert shm.rec_push(self.m, shm.REC_LOST, gap[0], gap[1])
        while True:  # as the consumer loops do: recovery ring, then the idle drain
            mark = (int(self.control[shm.C_REC_TAIL]), int(self.ctr[shm.A_NEXT]))
            st_ = consumer.service_recovery(self.t, self.session, self.arb, self.bk())
            if st_ < 0:  # halted by policy: the loop would return HALTED
                self.halted = True
                break
            if st_ == 0:
                st_ = consumer._idle(self.t, self.arb, self.bk())
                moved = mark != (int(self.control[shm.C_REC_TAIL]), int(self.ctr[shm.A_NEXT]))
                if (
                    st_ == 0
                    and not moved
                    and self.control[shm.C_GAP_HEAD] == self.control[shm.C_GAP_TAIL]
                ):
                    break
            if st_ != 0:
                self.book.grow(st_)
            while (gap := shm.gap_pop(self.m)) is not None:
                self.lost.append((gap[0], gap[1]))
                assert shm.rec_push(self.m, shm.REC_LOST, gap[0], gap[1])

    def packet(self, line: int, data: bytes) -> None:
        self.t += 1_000
        b = np.frombuffer(data, np.uint8).copy()
        while True:  # a NEED with done == 0: grow and hand in the same packet again
            need, done = consumer._packet(
                b, 0, len(b), line, self.t - 500, self.t, self.session, self.arb, self.bk()
            )
            if need:
                self.book.grow(need)
            if done:
                break
        self._retry = lambda: consumer._idle(self.t, self.arb, self.bk())
        self._settle(self._retry())

    def idle(self, dt: int) -> None:
        self.t += dt
        self._retry = lambda: consumer._idle(self.t, self.arb, self.bk())
        self._settle(self._retry())

    def heartbeat(self, line: int, next_seq: int) -> None:
        self.packet(line, mold.request(SESSION, next_seq, 0))

    def queue(self) -> list[int]:
        return self.book.queue(1, BID, PRICE)


def _line(packets, rng, loss, dup, reorder):
    out = []
    for p in packets:
        if rng.random() < loss:
            continue
        out.append(p)
        if rng.random() < dup:
            out.append(p)
    for i in range(len(out) - 1):  # swap neighbours within a small window
        if rng.random() < reorder:
            j = min(len(out) - 1, i + rng.randint(1, 3))
            out[i], out[j] = out[j], out[i]
    return out


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 400),
    seed=st.integers(0, 2**32 - 1),
    loss=st.sampled_from([0.0, 0.02, 0.2, 0.6]),
    dup=st.sampled_from([0.0, 0.1, 0.5]),
    reorder=st.sampled_from([0.0, 0.1, 0.4]),
    hold=st.sampled_from([4, 64]),
    window=st.sampled_from([1_500, 50_000, 10**12]),
)
def test_output_is_the_sequence_minus_declared_gaps(n, seed, loss, dup, reorder, hold, window):
    rng = random.Random(seed)
    packets = _packets(n, rng)
    lines = [_line(packets, rng, loss, dup, reorder) for _ in range(2)]
    rig = Rig(hold, window, 10**9)
    cursors = [0, 0]
    while cursors[0] < len(lines[0]) or cursors[1] < len(lines[1]):  # any interleaving
        ln = rng.randrange(2)
        if cursors[ln] >= len(lines[ln]):
            ln = 1 - ln
        rig.packet(ln, lines[ln][cursors[ln]][2])
        cursors[ln] += 1
    rig.heartbeat(0, n + 1)  # the tail: heartbeats announce the next sequence
    for _ in range(n + 1):  # the consumer keeps ticking: each hole, once at the front and
        rig.idle(10**12 + 1)  # past the window, is declared
        if rig.ctr[shm.A_NEXT] == n + 1:
            break
    out = rig.queue()
    lost = {s for first, count in rig.lost for s in range(first, first + count)}
    assert out == sorted(set(out))  # monotonic, no duplicates
    assert set(out) | lost == set(range(1, n + 1)) and not set(out) & lost
    assert rig.ctr[shm.BOOK_BASE + B_DUP_ADD] == 0
    assert rig.ctr[shm.A_NEXT] == n + 1 and rig.ctr[shm.A_TAKEN] == len(out)
    delivered = {s for ln in lines for (seq, k, _) in ln for s in range(seq, seq + k)}
    assert set(range(1, n + 1)) - delivered <= lost  # what no line carried is declared
    if window == 10**12 and hold == 64 and rig.ctr[shm.A_HOLD_OVERFLOW] == 0:
        assert lost == set(range(1, n + 1)) - delivered  # nothing declared that arrived
    # the event ring tells the same story: one level event per message taken, in order,
    # each tagged with its sequence, and every gap declared and declared unrecoverable
    events = rig.events()
    levels = events[events["kind"] == ev.LEVEL]
    assert list(levels["seq"]) == out
    assert list(levels["value"]) == list(range(1, len(out) + 1))  # one share more each
    chan = events[events["kind"] == ev.CHANNEL]
    declared = chan[chan["code"] == ev.CH_GAP_DECLARED]
    assert len(declared) == rig.ctr[shm.A_GAPS_DECLARED]
    unrec = chan[chan["code"] == ev.CH_GAP_UNRECOVERABLE]
    assert sorted(zip(unrec["value"], unrec["n"], strict=True)) == sorted(rig.lost)
    assert (chan["code"] == ev.CH_BOOKS_STALE).sum() == (1 if rig.lost else 0)
    assert (chan["code"] == ev.CH_GAP_FILLED).sum() == 0  # nothing was recovered
    # the journal's copy (the message ring) says it once more: every message taken, once,
    # in order, byte for byte, and every sequence skipped as unrecoverable in a hole
    reader = msgring.Reader(*rig.msgs, cursor=0)
    chunk = reader.poll()
    seqs, buf, offs, holes = msgring.Split(len(rig.msgs[0])).messages(chunk, reader.start)
    assert list(seqs) == out
    want = {}
    for seq, k, pkt in packets:
        blocks, p = pkt[mold.HEADER_LEN :], 0
        for i in range(k):
            ln = int.from_bytes(blocks[p : p + 2], "big")
            want[seq + i] = blocks[p + 2 : p + 2 + ln]
            p += 2 + ln
    assert all(bytes(buf[offs[i] : offs[i + 1]]) == want[s] for i, s in enumerate(out))
    assert {s for a, c, _ in holes for s in range(a, a + c)} == lost
    assert int(rig.msgs[1][msgring.M_NEXT_SEQ]) == (n + 1 if out or lost else 0)


def test_a_hole_waits_for_the_other_line_within_the_window():
    rig = Rig(64, window_ns=10**9, window_msgs=10**9)
    packets = _packets(30, random.Random(1))
    for p in packets[1:]:  # line A lost the first packet
        rig.packet(0, p[2])
    assert rig.queue() == [] and rig.ctr[shm.A_HELD_NOW] == len(packets) - 1
    assert rig.ctr[shm.A_GAPS_DECLARED] == 0  # within the window: no gap yet
    rig.packet(1, packets[0][2])  # line B fills it
    assert rig.queue() == list(range(1, 31)) and rig.ctr[shm.A_HELD_NOW] == 0
    assert rig.lost == [] and rig.ctr[shm.A_GAPS_DECLARED] == 0


def test_window_in_messages_declares_early_and_tail_loss_is_seen_by_heartbeat():
    rig = Rig(64, window_ns=10**15, window_msgs=10)
    packets = _packets(60, random.Random(2))
    for p in packets[3:]:
        rig.packet(0, p[2])
    assert rig.ctr[shm.A_GAPS_DECLARED] == 1 and rig.lost[0][0] == 1  # declared by count
    assert rig.queue()[0] == packets[3][0]
    rig2 = Rig(64, window_ns=5_000, window_msgs=10**9)
    for p in packets[:-2]:  # the burst's last two packets are lost on both lines
        rig2.packet(0, p[2])
    rig2.idle(10_000)
    assert rig2.lost == []  # nothing announced the missing tail yet
    rig2.heartbeat(1, 61)
    rig2.idle(10_000)
    assert rig2.lost == [(packets[-2][0], 61 - packets[-2][0])]
    assert rig2.ctr[shm.A_NEXT] == 61


def test_halt_policy_stops_and_marks_stale():
    rig = Rig(64, window_ns=1, window_msgs=10**9)
    rig.control[shm.C_POLICY] = shm.POLICY_HALT
    packets = _packets(20, random.Random(3))
    rig.packet(0, packets[0][2])
    rig.packet(0, packets[2][2])
    rig.idle(10)
    gap = shm.gap_pop(rig.m)
    assert gap is None  # Rig._settle already answered it
    assert rig.control[shm.C_STALE] == 1 and rig.control[shm.C_HALTED] == 1 and rig.halted
    assert rig.queue() == list(range(1, packets[0][1] + 1))  # nothing after the gap


def _hold_is_consistent(rig) -> None:
    """The sorted rows hold exactly the occupied slots, in sequence order; the free stack
    holds exactly the others."""
    meta, ctr = rig.hold_meta, rig.ctr
    slots, n, head = len(meta), int(ctr[shm.A_HELD_NOW]), int(ctr[arbiter.A_HOLD_HEAD])
    order = [int(meta[r, arbiter.H_ORDER]) for r in range(head, head + n)]
    free = [int(meta[r, arbiter.H_FREE]) for r in range(slots - n)]
    busy = {s for s in range(slots) if meta[s, arbiter.H_SEQ] >= 0}
    assert set(order) == busy and len(order) == n
    assert sorted(free + order) == list(range(slots))
    seqs = [int(meta[s, arbiter.H_SEQ]) for s in order]
    assert seqs == sorted(seqs)
    assert int(ctr[arbiter.A_HELD_MSGS]) == sum(int(meta[s, arbiter.H_COUNT]) for s in order)


@settings(max_examples=80, deadline=None)
@given(n=st.integers(2, 300), seed=st.integers(0, 2**32 - 1), hold=st.sampled_from([3, 8, 32]))
def test_the_hold_stays_sorted_through_any_arrival_order(n, seed, hold):
    """Held packets in any order (front, middle and end inserts, the rows moving down when
    they reach the end, overflow): after every packet the index is consistent, and once the
    first packet comes the book has everything that was held, in order."""
    rng = random.Random(seed)
    packets = _packets(n, rng)
    later = packets[1:]
    rng.shuffle(later)
    rig = Rig(hold, window_ns=10**15, window_msgs=10**9)
    for p in later:
        rig.packet(0, p[2])
        _hold_is_consistent(rig)
    rig.packet(1, packets[0][2])
    _hold_is_consistent(rig)
    out = rig.queue()
    assert out == sorted(set(out)) and out[: packets[0][1]] == list(range(1, packets[0][1] + 1))
    if rig.ctr[shm.A_HOLD_OVERFLOW] == 0:
        assert out == list(range(1, n + 1)) and rig.ctr[shm.A_HELD_NOW] == 0


def test_heavy_loss_declares_every_hole_past_the_window_at_once():
    """Every other packet lost on the only line: once the window has passed, all the holes
    are declared together (recovery works on them at once), not one window per hole as it
    reaches the front -- which under sustained loss never catches up."""
    rig = Rig(256, window_ns=50_000, window_msgs=10**9)
    packets = _packets(400, random.Random(7))
    kept = packets[1::2]  # the first packet and every second one after it are lost
    for p in kept:
        rig.packet(0, p[2])
    holes = len(packets) // 2  # the lost packets before the last one kept
    assert rig.ctr[shm.A_GAPS_DECLARED] < holes  # the latest holes are still young
    rig.idle(60_000)  # one tick past the window
    assert rig.ctr[shm.A_GAPS_DECLARED] == holes
    assert rig.ctr[shm.A_NEXT] == kept[-1][0] + kept[-1][1]
    out = rig.queue()
    assert out == [s for (seq, k, _) in kept for s in range(seq, seq + k)]
    lost = sorted(s for first, count in rig.lost for s in range(first, first + count))
    assert lost == [
        s for (seq, k, _) in packets[0::2] for s in range(seq, seq + k) if s < kept[-1][0]
    ]
