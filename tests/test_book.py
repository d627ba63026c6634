"""The L3 book: spec semantics, anomaly outcomes, growth, and a property test against the
dict-based reference model, with every invariant checked after every event."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dataplane import book as bk
from dataplane import itch
from dataplane.book import ASK, BID, Book
from tests import itchbytes as m
from tests.reference import ReferenceBook

BIG_REF = 2**32 + 7
BIG_PX = 3_000_000_000


def feed(*msgs: bytes, book: Book | None = None) -> Book:
    book = book or Book()
    book.feed(np.frombuffer(m.framed(*msgs), np.uint8))
    assert book.check(allow_crossed=True) is None
    return book


def test_adds_build_price_time_levels():
    b = feed(
        m.A(1, "B", 100, 1000),
        m.A(2, "B", 50, 1000),
        m.A(3, "B", 10, 990),
        m.A(4, "S", 20, 1010),
        m.A(5, "S", 30, 1020),
        m.F(6, "S", 5, 1010),
    )
    assert b.bbo(1) == (1000, 150, 1010, 25)
    assert b.depth(1, BID) == [(1000, 150, 2), (990, 10, 1)]
    assert b.depth(1, ASK) == [(1010, 25, 2), (1020, 30, 1)]
    assert b.queue(1, BID, 1000) == [1, 2]
    assert b.queue(1, ASK, 1010) == [4, 6]
    assert b.live_orders == 6


def test_execute_reduces_then_removes_at_zero_and_keeps_priority():
    b = feed(m.A(1, "B", 100, 1000), m.A(2, "B", 50, 1000), m.E(1, 30))
    assert b.queue(1, BID, 1000) == [1, 2]
    assert b.order(1)["shares"] == 70 and b.bbo(1)[:2] == (1000, 120)
    feed(m.C(1, 70, price=999), book=b)  # C prints elsewhere, rests here
    assert b.queue(1, BID, 1000) == [2] and b.order(1) is None


def test_partial_cancel_and_cancel_to_zero_removes():
    b = feed(m.A(1, "S", 100, 1000), m.X(1, 40))
    assert b.order(1)["shares"] == 60
    feed(m.X(1, 60), book=b)
    assert b.order(1) is None and b.bbo(1) == (0, 0, 0, 0)
    assert b.anomalies()["over_cancel"] == 0


def test_delete_removes_and_empties_levels():
    b = feed(m.A(1, "B", 100, 1000), m.A(2, "B", 100, 999), m.D(1))
    assert b.bbo(1) == (999, 100, 0, 0)
    feed(m.D(2), book=b)
    assert b.levels_table().shape[0] == 0 and b.live_orders == 0


def test_replace_moves_to_back_keeps_stock_and_side_from_original():
    b = feed(
        m.A(1, "B", 100, 1000, locate=9),
        m.A(2, "B", 50, 1000, locate=9),
        m.U(1, 10, 70, 1000, locate=0),
    )  # header locate is ignored
    assert b.queue(9, BID, 1000) == [2, 10]
    assert b.order(10) == {"ref": 10, "locate": 9, "side": "B", "price": 1000, "shares": 70}
    assert b.bbo(0) == (0, 0, 0, 0)


def test_stock_of_executions_comes_from_the_resting_order():
    b = feed(m.A(1, "S", 100, 1000, locate=9), m.E(1, 10, locate=3), m.X(1, 10, locate=4))
    assert b.bbo(9) == (0, 0, 1000, 80) and b.bbo(3) == (0, 0, 0, 0)


def test_trades_and_crosses_leave_the_book_alone():
    b = feed(
        m.A(1, "B", 100, 1000),
        m.P(500, 1000, ref=0, side="B"),
        m.Q(10_000, 1000),
        m.B(1),
        m.S("Q"),
        m.H(state="H"),
    )
    assert b.bbo(1) == (1000, 100, 0, 0) and b.live_orders == 1
    assert b.stocks["state"][1] == ord("H")


def test_edge_values():
    b = feed(
        m.R("BRK A", locate=65535),
        m.A(BIG_REF, "S", 70_000, BIG_PX, locate=65535),
        m.A(BIG_REF + 1, "B", 100_000, BIG_PX - 10_000, locate=65535),
    )
    assert b.bbo(65535) == (BIG_PX - 10_000, 100_000, BIG_PX, 70_000)
    assert b.stocks_summary()["65535"]["symbol"] == "BRK A"
    assert b.order(BIG_REF)["price"] == BIG_PX


@pytest.mark.parametrize(
    "msgs,counter,live",
    [
        ([m.A(1, "B", 100, 1000), m.A(1, "S", 5, 1010)], "dup_add", 1),
        ([m.A(1, "B", 0, 1000)], "zero_shares", 0),
        ([m.A(1, "Z", 10, 1000)], "bad_side", 0),
        ([m.E(9, 1), m.C(9, 1, 5), m.X(9, 1), m.D(9), m.U(9, 10, 1, 1)], "unknown_ref", 0),
        ([m.A(1, "B", 100, 1000), m.E(1, 101)], "over_exec", 0),
        ([m.A(1, "B", 100, 1000), m.X(1, 101)], "over_cancel", 0),
        ([m.A(1, "B", 100, 1000), m.E(1, 0)], "zero_shares", 1),
        ([m.A(1, "B", 100, 1000), m.A(2, "B", 1, 1), m.U(1, 2, 5, 1000)], "dup_add", 1),
        ([m.A(1, "B", 100, 1000), m.U(1, 2, 0, 1000)], "zero_shares", 0),
    ],
)
def test_anomalies_have_their_documented_outcome(msgs, counter, live):
    b = feed(*msgs)
    ref = ReferenceBook().replay(m.framed(*msgs))
    expected = {"unknown_ref": 5}.get(counter, 1)
    assert b.anomalies()[counter] == expected == ref.counters[counter]
    assert b.live_orders == live == len(ref.orders)
    assert b.digest() == ref.digest()


def test_growth_from_tiny_arrays_is_counted_and_exact():
    msgs = [
        m.A(i, "BS"[i % 2], 10 + i, 1000 + (i % 50) * (1 if i % 2 else -1), locate=1 + i % 5)
        for i in range(1, 600)
    ]
    msgs += [m.D(i) for i in range(1, 600, 3)]
    b = Book(orders=2, levels=2, ladder=2)
    feed(*msgs, book=b)
    ref = ReferenceBook().replay(m.framed(*msgs))
    from dataplane.book import B_GROWTHS

    assert b.counters[B_GROWTHS] > 10
    assert b.digest() == ref.digest()
    assert b.stocks_summary() == ref.stocks()


def test_capacity_limit_fails_loudly():
    from dataplane.book import CapacityError

    b = Book(orders=4, levels=4, ladder=4, max_orders=8)
    with pytest.raises(CapacityError, match="exceed"):
        feed(*[m.A(i, "B", 1, 1000 + i) for i in range(1, 20)], book=b)


# --- the order index: ring entries taken by older orders spill into the hash ---------------
def test_a_taken_ring_entry_spills_and_stays_exact():
    ring = 16
    b = Book(orders=16, ring=ring)
    a, c = 5, 5 + ring  # same ring entry
    feed(m.A(a, "B", 100, 1000), m.A(c, "B", 50, 1001), book=b)
    assert int(b.meta[bk.M_HASH_COUNT]) == 1 and b.live_orders == 2
    assert b.order(c)["shares"] == 50 and b.order(a)["shares"] == 100
    feed(m.D(a), book=b)  # the ring entry is free again; c still lives in the hash
    assert b.order(a) is None and b.order(c)["price"] == 1001
    feed(m.A(c, "S", 1, 2000), book=b)  # a duplicate, though its ring entry is free
    assert b.anomalies()["dup_add"] == 1
    feed(m.E(c, 20), m.U(c, a, 7, 999), book=b)  # replace from the hash into the ring
    assert b.order(c) is None and b.order(a) == {
        "ref": a,
        "locate": 1,
        "side": "B",
        "price": 999,
        "shares": 7,
    }
    assert int(b.meta[bk.M_HASH_COUNT]) == 0 and b.ring == ring


def test_the_ring_doubles_when_a_quarter_of_it_spilled():
    ring = 16
    refs = [1 + k * ring for k in range(40)]  # every one on ring entry 1 at first
    msgs = [
        m.A(r, "BS"[k % 2], 10 + k, 1000 + (k % 7) * (1 if k % 2 else -1), locate=1 + k % 3)
        for k, r in enumerate(refs)
    ]
    msgs += [m.X(r, 3) for r in refs[::3]] + [m.D(r) for r in refs[1::4]]
    b = Book(orders=16, ring=ring)
    feed(*msgs, book=b)
    want = ReferenceBook().replay(m.framed(*msgs))
    assert b.ring > ring and b.counters[bk.B_GROWTHS] > 0
    assert 4 * int(b.meta[bk.M_HASH_COUNT]) <= b.ring
    assert b.digest() == want.digest() and b.live_orders == len(want.orders)
    for r in refs:
        got = b.order(r)
        assert (got is None) == (r not in want.orders)
        if got is not None:
            assert got["shares"] == want.orders[r][3]


def test_a_ring_at_its_limit_keeps_spilling_into_the_hash():
    b = Book(orders=4, levels=4, ladder=4, max_orders=8, ring=16)  # ring limit 32
    refs = [3 + k * 64 for k in range(8)]  # one entry of any ring up to 64
    feed(*[m.A(r, "S", 1, 2000) for r in refs], book=b)
    assert b.ring == 32 and int(b.meta[bk.M_HASH_COUNT]) == 7 and b.live_orders == 8
    feed(*[m.D(r) for r in refs[:4]], book=b)
    assert [b.order(r) is None for r in refs] == [True] * 4 + [False] * 4


def test_ring_growth_moves_orders_and_keeps_time_priority():
    ring = 16
    # one level's queue mixes ring rows and spill rows (refs 16 apart share a ring row)
    refs = [2, 18, 3, 34, 19, 50, 35, 4]
    msgs = [m.A(r, "S", 10 + k, 2000) for k, r in enumerate(refs)]
    b = Book(orders=16, ring=ring)
    feed(*msgs[:6], book=b)
    assert b.ring == ring and int(b.meta[bk.M_HASH_COUNT]) == 4
    feed(*msgs[6:], book=b)  # a fifth spill doubles the ring first: every order moves
    assert b.ring == 2 * ring and b.counters[bk.B_GROWTHS] == 1
    assert b.queue(1, ASK, 2000) == refs
    feed(m.D(3), m.E(50, 5), m.A(66, "S", 1, 2000), book=b)  # 66 spills in the new ring
    assert b.queue(1, ASK, 2000) == [2, 18, 34, 19, 50, 35, 4, 66]
    assert b.order(50)["shares"] == 10 and b.order(66)["shares"] == 1
    assert b.bbo(1)[2:] == (2000, sum(range(10, 18)) - 12 - 5 + 1)


def test_spill_rows_grow_and_the_live_limit_fails_loudly():
    from dataplane.book import CapacityError

    b = Book(orders=16, ring=16, spill=16, max_orders=64)  # the ring stops at 4 * 64 rows
    refs = [5 + 256 * k for k in range(40)]  # all on one ring row of any ring up to 256
    feed(*[m.A(r, "B", 1, 1000 + k) for k, r in enumerate(refs)], book=b)
    assert b.spill_rows > 16 and b.live_orders == 40 and b.ring == 256
    assert [b.order(r)["price"] for r in refs] == [1000 + k for k in range(40)]
    more = [m.A(7 + 256 * k, "S", 1, 5000) for k in range(30)]
    with pytest.raises(
        CapacityError, match="live orders would exceed the configured maximum of 64"
    ):
        feed(*more, book=b)
    assert b.live_orders == 64 and b.check() is None


def test_a_book_sized_like_another_takes_the_same_input_without_growing():
    msgs = [m.A(1 + k * 16, "BS"[k % 2], 5 + k, 1000 + k, locate=1 + k % 4) for k in range(60)]
    grown = Book(orders=2, levels=2, ladder=2, ring=16)
    feed(*msgs, book=grown)
    assert grown.counters[bk.B_GROWTHS] > 0
    again = Book.sized_like(grown)
    feed(*msgs, book=again)
    assert again.counters[bk.B_GROWTHS] == 0 and again.digest() == grown.digest()


@pytest.mark.parametrize("side", ["B", "S"])
def test_sides_either_side_of_the_vector_width_insert_and_remove_levels_exactly(side):
    # a side grows through SCAN (16) levels and shrinks back, levels entering and leaving
    # at the top, the bottom and in between: the vector path (<= 16) and the loop (> 16)
    rng = np.random.default_rng(7)
    prices = [1000 + 10 * int(p) for p in rng.permutation(2 * bk.SCAN + 3)]
    adds = [m.A(k + 1, side, 1 + k, px) for k, px in enumerate(prices)]
    dels = [m.D(int(k) + 1) for k in rng.permutation(len(prices))]
    b, ref = Book(), ReferenceBook()
    for msg in adds + [m.A(100 + k, side, 5, px) for k, px in enumerate(prices[::4])] + dels:
        feed(msg, book=b)
        ref.apply(msg)
        _same_state(b, ref)
        assert b.bbo(1) == ref.bbo(1)
    assert b.live_orders == len(prices[::4]) and b.check() is None


# --- property test against the reference model ---------------------------------------------
# 17 and 33 share ring entry 1 with 1 in a 16- or 32-entry ring, 1 + 2**40 in any ring, and
# 2**64 - 1 - 2**20 shares 2**64 - 1's: the hash tier and ring growth are exercised too
REFS = [1, 2, 3, 4, 5, 6, 17, 33, 1 + 2**40, BIG_REF, 2**64 - 1 - 2**20, 2**64 - 1]
LOCATES = [1, 2, 65535]
PRICES = [1, 999, 1000, 1001, 1002, BIG_PX]
SHARES = st.sampled_from([0, 1, 7, 100, 65_536, 2**32 - 1])


def _msg():
    ref = st.sampled_from(REFS)
    loc = st.sampled_from(LOCATES)
    px = st.sampled_from(PRICES)
    return st.one_of(
        st.builds(
            lambda r, s, n, p, lo: m.A(r, s, n, p, locate=lo),
            ref,
            st.sampled_from("BBSSZ"),
            SHARES,
            px,
            loc,
        ),
        st.builds(
            lambda r, s, n, p, lo: m.F(r, s, n, p, locate=lo),
            ref,
            st.sampled_from("BS"),
            SHARES,
            px,
            loc,
        ),
        st.builds(lambda r, n: m.E(r, n), ref, SHARES),
        st.builds(lambda r, n, p: m.C(r, n, p), ref, SHARES, px),
        st.builds(lambda r, n: m.X(r, n), ref, SHARES),
        st.builds(lambda r: m.D(r), ref),
        st.builds(lambda r, r2, n, p: m.U(r, r2, n, p), ref, ref, SHARES, px),
        st.builds(lambda n, p: m.P(n, p), SHARES, px),
        st.builds(lambda: m.Q(1, 1000)),
        st.builds(lambda lo: m.R("SYM" + str(lo), locate=lo), loc),
        st.binary(max_size=12),  # malformed: unknown type or bad length
    )


def _same_state(b: Book, ref: ReferenceBook) -> None:
    rows = b.levels_table()
    got = {(int(r[0]), "BS"[r[1]], int(r[2])): (int(r[3]), int(r[4])) for r in rows}
    want = {k: (ref.level_shares(*k), len(q)) for k, q in ref.levels.items()}
    assert got == want
    for (locate, side, price), q in ref.levels.items():
        assert b.queue(locate, "BS".index(side), price) == q
    for name in ("dup_add", "unknown_ref", "over_exec", "over_cancel", "zero_shares", "bad_side"):
        assert b.anomalies()[name] == ref.counters[name], name
    assert b.counters[itch.C_UNKNOWN_TYPE] == ref.counters["unknown_type"]
    assert b.counters[itch.C_BAD_LENGTH] == ref.counters["bad_length"]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_msg(), max_size=40), st.sampled_from([2, 64]), st.sampled_from([16, 64]))
def test_random_sequences_match_the_reference_after_every_event(msgs, cap, ring):
    b = Book(orders=cap, levels=cap, ladder=cap, ring=ring)
    ref = ReferenceBook()
    for msg in msgs:
        b.feed(np.frombuffer(m.framed(msg), np.uint8))
        ref.apply(msg)
        assert b.check(allow_crossed=True) is None
        _same_state(b, ref)
    assert b.digest() == ref.digest()
    assert b.stocks_summary() == ref.stocks()
    for loc in LOCATES:
        assert b.bbo(loc) == ref.bbo(loc)


def _resized(msg: bytes, d: int) -> bytes:
    """A message one byte longer or shorter than its type says (d = 1, -1), or as is."""
    return msg + b"\x00" if d > 0 else msg[:-1] if d < 0 and len(msg) > 1 else msg


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.builds(_resized, _msg(), st.sampled_from([0, 0, 0, 0, 1, -1])), min_size=1, max_size=80
    ),
    st.sampled_from([2, 64]),
    st.sampled_from([16, 64]),
)
def test_random_sequences_in_one_buffer_match_the_reference(msgs, cap, ring):
    """The same sequences as one buffer: all but its last ``FAST_SLACK`` bytes go through
    apply_stream's one-compare fast path (growth, malformed and unknown messages, lengths
    off by one either way included), the rest through the general one."""
    data = b"".join(m.framed(msg) for msg in msgs)
    b = Book(orders=cap, levels=cap, ladder=cap, ring=ring)
    b.feed(np.frombuffer(data, np.uint8))
    ref = ReferenceBook()
    for msg in msgs:
        ref.apply(msg)
    assert b.check(allow_crossed=True) is None
    _same_state(b, ref)
    assert b.counters[itch.C_MESSAGES] == len(msgs)
    assert b.digest() == ref.digest() and b.stocks_summary() == ref.stocks()
