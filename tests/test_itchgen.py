"""The ITCH session generator (host/itchgen.py) and the reference book (tests/reference.py).

Generated sessions are replayed through the reference book with checks after every
message: no anomaly, never a locked or crossed book, timestamps never decreasing.
"""

from __future__ import annotations

import hashlib
import struct
from collections import Counter

import numpy as np
import pytest

from host.exchange import itchgen
from tests.itchbytes import framed
from tests.reference import ANOMALIES, LENGTHS, ReferenceBook, frames, timestamp

T_0400 = 4 * 3600 * 10**9
T_2001 = 20 * 3600 * 10**9 + 60 * 10**9


# --------------------------------------------------------------------------- analysis


def analyse(data: bytes) -> dict:
    """Replay a session through the reference book, checking after every message."""
    book = ReferenceBook()
    types: Counter = Counter()
    last_ts = -1
    phase = ""  # last system event code
    events: list[str] = []
    had_orders: set[int] = set()
    empty_moments: list[int] = []
    prev = None  # (type, locate, ts) of the previous message
    edges = Counter()
    for _, msg in frames(data):
        mtype = chr(msg[0])
        types[mtype] += 1
        assert len(msg) == LENGTHS[mtype], f"{mtype} has length {len(msg)}"
        (locate,) = struct.unpack_from(">H", msg, 1)
        ts = timestamp(msg)
        assert ts >= last_ts, f"timestamp went back at message {sum(types.values())}"
        last_ts = ts
        if mtype in "ECXDU":
            (ref,) = struct.unpack_from(">Q", msg, 11)
            assert ref in book.orders, f"{mtype} names a ref that is not live"
            # Nasdaq fills in the header locate; ours must agree with the resting order
            assert book.orders[ref][0] == locate
        if mtype in "AF":
            ref, side, shares, _, price = struct.unpack_from(">QcI8sI", msg, 11)
            edges["ref>2^32"] += ref > 2**32
            edges["ref<2^32"] += ref < 2**32
            edges["price>2^31"] += price > 2**31
            edges["shares>65535"] += shares > 65_535
            edges["add@65535"] += locate == 65_535
        if mtype == "U":
            edges["ref>2^32"] += struct.unpack_from(">Q", msg, 19)[0] > 2**32
        if mtype == "P":
            ref, side = struct.unpack_from(">Qc", msg, 11)
            assert (ref, side) == (0, b"B")
        if mtype == "E" and prev == ("E", locate, ts):
            edges["sweep"] += 1
        if mtype == "S":
            phase = chr(msg[11])
            events.append(phase)
        prev = (mtype, locate, ts)

        book.apply(msg)

        if mtype in "AFECXDU" and locate:
            bid, _, ask, _ = book.bbo(locate)
            assert not (bid and ask and bid >= ask), f"locate {locate} locked/crossed"
            if bid or ask:
                had_orders.add(locate)
            elif locate in had_orders and phase == "Q" and locate in book.symbols:
                empty_moments.append(locate)
    return {
        "book": book,
        "types": types,
        "events": events,
        "edges": edges,
        "empty_moments": empty_moments,
        "first_ts": timestamp(next(frames(data))[1]),
        "last_ts": last_ts,
    }


def anomalies(book: ReferenceBook) -> dict[str, int]:
    return {k: book.counters[k] for k in ANOMALIES}


# --------------------------------------------------------------------------- generator


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"n_messages": 1_999}, "n_messages"),
        ({"n_messages": 0}, "n_messages"),
        ({"n_messages": 5_000, "n_stocks": 0}, "n_stocks"),
        ({"n_messages": 50_000, "n_stocks": 10_000}, "n_stocks"),
        ({"n_messages": 2_000, "n_stocks": 9_999}, "n_messages"),  # too short for 9,999 R
    ],
)
def test_rejects_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        itchgen.generate(**kwargs)


def test_same_arguments_same_bytes_other_seed_other_bytes():
    a = itchgen.generate(3_000, 50, seed=7)
    b = itchgen.generate(3_000, 50, seed=7)
    c = itchgen.generate(3_000, 50, seed=8)
    assert a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


SMALL = [
    (2_000, 1, 1),
    (2_000, 2, 5),
    (2_000, 100, 1),
    (2_000, 100, 2),
    (2_000, 225, 3),
    (itchgen.min_messages(9_999), 9_999, 4),
]


@pytest.fixture(scope="module", params=SMALL, ids=lambda p: f"{p[0]}msg-{p[1]}stk-seed{p[2]}")
def small(request):
    n_messages, n_stocks, seed = request.param
    data = itchgen.generate(n_messages, n_stocks, seed).tobytes()
    return n_messages, n_stocks, data, analyse(data)


def test_exact_count_every_type_and_valid_book(small):
    n_messages, _, data, a = small
    assert sum(a["types"].values()) == n_messages
    assert itchgen.count_by_type(np.frombuffer(data, np.uint8)) == dict(a["types"])
    assert set(a["types"]) == set(LENGTHS)
    assert anomalies(a["book"]) == dict.fromkeys(ANOMALIES, 0)
    assert a["book"].counters["messages"] == n_messages


def test_edge_values_present(small):
    _, _, _, a = small
    for edge in ("ref<2^32", "ref>2^32", "price>2^31", "shares>65535", "sweep", "add@65535"):
        assert a["edges"][edge] > 0, edge
    assert a["types"]["P"] > 0  # and every P had ref 0, side B (checked in analyse)
    assert 65_535 in a["book"].symbols
    assert a["empty_moments"], "no stock's book went empty mid-session"


def test_session_structure(small):
    _, n_stocks, data, a = small
    assert a["events"] == ["O", "S", "Q", "M", "E", "C"]
    msgs = [m for _, m in frames(data)]
    assert msgs[0][:1] == b"S" and msgs[0][11:12] == b"O"
    assert msgs[-1][:1] == b"S" and msgs[-1][11:12] == b"C"
    assert T_0400 <= a["first_ts"] and a["last_ts"] <= T_2001

    symbols = a["book"].symbols
    assert a["types"]["R"] == n_stocks == len(symbols)
    assert sorted(symbols) == list(range(1, n_stocks)) + [65_535]
    assert len(set(symbols.values())) == n_stocks
    for sym in symbols.values():
        assert 1 <= len(sym) <= 8 and sym.isascii() and sym.isalpha() and sym.isupper()

    # opening and closing crosses: one of each per stock, either side of the session
    sq = next(i for i, m in enumerate(msgs) if m[:1] == b"S" and m[11:12] == b"Q")
    sm = next(i for i, m in enumerate(msgs) if m[:1] == b"S" and m[11:12] == b"M")
    crosses = [
        (i, m[39:40], struct.unpack_from(">H", m, 1)[0])
        for i, m in enumerate(msgs)
        if m[:1] == b"Q"
    ]
    opening = [loc for i, t, loc in crosses if t == b"O"]
    closing = [loc for i, t, loc in crosses if t == b"C"]
    assert sorted(opening) == sorted(closing) == sorted(symbols)
    assert all(sq < i < sm for i, _, _ in crosses)
    trading = [
        struct.unpack_from(">H", m, 1)[0] for m in msgs[:sq] if m[:1] == b"H" and m[19:20] == b"T"
    ]
    assert sorted(trading) == sorted(symbols)


@pytest.fixture(scope="module")
def big():
    data = itchgen.generate(100_000, 100, seed=11).tobytes()
    return data, analyse(data)


@pytest.mark.slow
def test_100k_session_replays_clean(big):
    data, a = big
    book = a["book"]
    assert book.counters["messages"] == 100_000
    assert anomalies(book) == dict.fromkeys(ANOMALIES, 0)
    assert a["empty_moments"]
    assert a["edges"]["sweep"] > 10
    # realistic mix and bounded books
    t = a["types"]
    assert t["A"] + t["F"] > t["D"] > t["U"] > 0
    assert 0 < t["F"] < t["A"]
    assert t["H"] > 100  # halts and resumes on top of the 100 opening H T
    orders = [s["orders"] for s in book.stocks().values()]
    assert max(orders) <= itchgen.CAP
    assert sum(orders) == len(book.orders) > 100


def test_write_session(tmp_path):
    path = tmp_path / "s.itch"
    stats = itchgen.write_session(path, 2_500, n_stocks=20, seed=9)
    data = path.read_bytes()
    assert data == itchgen.generate(2_500, 20, 9).tobytes()
    assert stats["messages"] == 2_500
    assert stats["bytes"] == len(data)
    assert stats["by_type"] == dict(Counter(chr(m[0]) for _, m in frames(data)))


def test_count_by_type_rejects_truncation():
    data = itchgen.generate(2_000, 10, 1)
    last = len(data) - 2 - LENGTHS["S"]  # the session ends with S C
    with pytest.raises(ValueError, match=f"offset {last}"):
        itchgen.count_by_type(data[:-5])


# --------------------------------------------------------------------------- reference book


def hdr(mtype: str, locate: int = 1, ts: int = 0) -> bytes:
    return mtype.encode() + struct.pack(">HH", locate, 0) + ts.to_bytes(6, "big")


def add(ref, side="B", shares=100, price=10_000, locate=1, stock=b"TEST    ") -> bytes:
    return hdr("A", locate) + struct.pack(">QcI8sI", ref, side.encode(), shares, stock, price)


def add_f(ref, side="B", shares=100, price=10_000, locate=1) -> bytes:
    return hdr("F", locate) + struct.pack(
        ">QcI8sI4s", ref, side.encode(), shares, b"TEST    ", price, b"GSCO"
    )


def exe(ref, shares, locate=1) -> bytes:
    return hdr("E", locate) + struct.pack(">QIQ", ref, shares, 1)


def exe_c(ref, shares, price=1, locate=1) -> bytes:
    return hdr("C", locate) + struct.pack(">QIQcI", ref, shares, 1, b"Y", price)


def cancel(ref, shares, locate=1) -> bytes:
    return hdr("X", locate) + struct.pack(">QI", ref, shares)


def delete(ref, locate=1) -> bytes:
    return hdr("D", locate) + struct.pack(">Q", ref)


def replace(orig, new, shares, price, locate=1) -> bytes:
    return hdr("U", locate) + struct.pack(">QQII", orig, new, shares, price)


def directory(locate, symbol) -> bytes:
    return (
        hdr("R", locate)
        + symbol.ljust(8).encode()
        + b"QN"
        + struct.pack(">I", 100)
        + (b"NCZ PNN1N" + struct.pack(">I", 0) + b"N")
    )


def book_of(*msgs: bytes) -> ReferenceBook:
    b = ReferenceBook()
    for m in msgs:
        b.apply(m)
    return b


def test_builders_match_spec_lengths():
    for m in (
        add(1),
        add_f(1),
        exe(1, 1),
        exe_c(1, 1),
        cancel(1, 1),
        delete(1),
        replace(1, 2, 1, 1),
        directory(1, "AAPL"),
    ):
        assert len(m) == LENGTHS[chr(m[0])]


def test_fifo_within_level_and_priority_rules():
    b = book_of(add(1), add(2), add_f(3), add(4, price=9_900))
    assert b.levels[(1, "B", 10_000)] == [1, 2, 3]
    b.apply(exe(1, 40))  # partial: keeps its place
    assert b.levels[(1, "B", 10_000)] == [1, 2, 3]
    assert b.level_shares(1, "B", 10_000) == 260
    b.apply(replace(2, 5, 100, 10_000))  # same price, new ref: back of the queue
    assert b.levels[(1, "B", 10_000)] == [1, 3, 5]
    b.apply(exe(1, 60))
    assert b.levels[(1, "B", 10_000)] == [3, 5]
    assert b.bbo(1) == (10_000, 200, 0, 0)
    b.apply(delete(3))
    b.apply(cancel(5, 100))
    assert (1, "B", 10_000) not in b.levels  # empty levels are removed
    assert b.bbo(1) == (9_900, 100, 0, 0)


def test_add_anomalies():
    b = book_of(add(1), add(1, shares=5), add(2, shares=0), add(3, side="Z"), add_f(1))
    assert b.counters["dup_add"] == 2
    assert b.counters["zero_shares"] == 1
    assert b.counters["bad_side"] == 1
    assert list(b.orders) == [1]
    assert b.orders[1] == [1, "B", 10_000, 100]


@pytest.mark.parametrize(
    "msg", [exe(9, 1), exe_c(9, 1), cancel(9, 1), delete(9), replace(9, 10, 1, 1)]
)
def test_unknown_ref_is_counted_and_ignored(msg):
    b = book_of(add(1), msg)
    assert b.counters["unknown_ref"] == 1
    assert b.orders == {1: [1, "B", 10_000, 100]}
    assert 10 not in b.orders


def test_execute_and_cancel_outcomes():
    b = book_of(add(1), add(2), add(3), add(4), add(5))
    b.apply(exe(1, 0))
    b.apply(cancel(1, 0))
    assert b.counters["zero_shares"] == 2 and b.orders[1][3] == 100
    b.apply(exe(1, 101))
    b.apply(exe_c(2, 500))
    b.apply(cancel(3, 101))
    assert b.counters["over_exec"] == 2 and b.counters["over_cancel"] == 1
    b.apply(exe_c(4, 100))  # exactly what rests
    b.apply(cancel(5, 30))
    assert b.orders == {5: [1, "B", 10_000, 70]}
    assert b.counters["msg_E"] == 2 and b.counters["msg_C"] == 2 and b.counters["msg_X"] == 3


def test_resting_order_decides_the_stock_not_the_header():
    b = book_of(add(1, side="S", locate=7), exe(1, 10, locate=3), cancel(1, 10, locate=0))
    assert b.orders[1] == [7, "S", 10_000, 80]
    b.apply(replace(1, 2, 50, 10_100, locate=99))
    assert b.orders == {2: [7, "S", 10_100, 50]}
    assert b.bbo(7) == (0, 0, 10_100, 50) and b.bbo(99) == (0, 0, 0, 0)


def test_replace_anomalies():
    b = book_of(add(1), add(2), replace(1, 2, 100, 10_000))
    assert b.counters["dup_add"] == 1 and list(b.orders) == [2]  # original still removed
    b.apply(replace(2, 3, 0, 10_000))
    assert b.counters["zero_shares"] == 1 and b.orders == {}
    b = book_of(add(1), replace(1, 1, 30, 10_200))  # re-using its own ref is allowed
    assert b.orders == {1: [1, "B", 10_200, 30]}


def test_validation_and_message_counters():
    b = book_of(
        b"",
        b"Z" + bytes(20),
        add(1)[:-1],
        add(1) + b"\0",
        hdr("S") + b"O",
        directory(5, "MSFT"),
        hdr("P", 5) + bytes(33),
    )
    c = b.counters
    assert c["messages"] == 7
    assert c["bad_length"] == 3 and c["unknown_type"] == 1
    assert c["msg_S"] == 1 and c["msg_R"] == 1 and c["msg_P"] == 1 and c["msg_A"] == 0
    assert b.orders == {} and b.symbols == {5: "MSFT"}


def test_replay_and_truncation():
    msgs = [directory(1, "AB"), add(1), add(2, side="S", price=10_100)]
    data = framed(*msgs)
    b = ReferenceBook().replay(data)
    assert b.bbo(1) == (10_000, 100, 10_100, 100)
    first = len(framed(msgs[0]))
    second = first + len(framed(msgs[1]))
    with pytest.raises(ValueError, match=f"offset {second}"):
        ReferenceBook().replay(data[:-1])  # body of the third runs past the end
    with pytest.raises(ValueError, match=f"offset {second}"):
        ReferenceBook().replay(data[: second + 1])  # half a length prefix
    with pytest.raises(ValueError, match=f"offset {first}"):
        ReferenceBook().replay(data[: first + 5])


def test_digest_by_hand_and_stocks():
    b = book_of(
        directory(10, "TEN"),
        add(1, "B", 100, 900, locate=10),
        add(2, "B", 50, 900, locate=10),
        add(3, "S", 10, 10_000, locate=9),
    )
    text = "9,S,10000,10\n10,B,900,150\n"  # numeric order: locate 9 before 10
    assert b.digest() == hashlib.sha256(text.encode()).hexdigest()
    assert ReferenceBook().digest() == hashlib.sha256(b"").hexdigest()
    other = book_of(add(1, "S", 5, 10_000), add(2, "B", 7, 10_000), add(3, "B", 9, 900))
    text = "1,B,900,9\n1,B,10000,7\n1,S,10000,5\n"  # B before S, prices numerically
    assert other.digest() == hashlib.sha256(text.encode()).hexdigest()
    assert b.stocks() == {
        "9": {
            "symbol": "",
            "bid_px": 0,
            "bid_qty": 0,
            "ask_px": 10_000,
            "ask_qty": 10,
            "orders": 1,
        },
        "10": {
            "symbol": "TEN",
            "bid_px": 900,
            "bid_qty": 150,
            "ask_px": 0,
            "ask_qty": 0,
            "orders": 2,
        },
    }
