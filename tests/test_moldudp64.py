"""The MoldUDP64 codec (dataplane/moldudp64.py): the layout of the spec
(``shared/specs/moldudp64.md``), round trips of every packet kind through both sides of
the codec (numba and Python), bad bytes as a status or a ``MoldError`` -- on the hot path
a counted drop, never an exception -- and a guard that no other module under ``host/``
or ``dataplane/`` packs or unpacks the header by hand. Unit tier: no root."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dataplane import arbiter, consumer, msgring, shm
from dataplane import events as ev
from dataplane import moldudp64 as mold
from dataplane.book import Book

ROOT = Path(__file__).resolve().parents[1]
SESSION = b"TICKWIRE01"

sessions = st.binary(min_size=mold.SESSION_LEN, max_size=mold.SESSION_LEN)
seqs = st.integers(0, 2**64 - 1)
messages = st.lists(st.binary(max_size=300), min_size=1, max_size=40)


# --- layout ----------------------------------------------------------------------------------
def test_layout_is_the_specs_table():
    # offset, length of Session, Sequence Number, Message Count (the spec's table)
    assert (mold.SESSION_OFF, mold.SESSION_LEN) == (0, 10)
    assert (mold.SEQ_OFF, mold.SEQ_LEN) == (10, 8)
    assert (mold.COUNT_OFF, mold.COUNT_LEN) == (18, 2)
    assert mold.HEADER_LEN == mold.REQUEST_LEN == mold.HEADER.itemsize == 20
    fields = {
        name: (mold.HEADER.fields[name][1], mold.HEADER.fields[name][0].itemsize)
        for name in mold.HEADER.names
    }
    assert fields == {"session": (0, 10), "seq": (10, 8), "count": (18, 2)}


# --- round trips -----------------------------------------------------------------------------
@settings(max_examples=200, deadline=None)
@given(session=sessions, seq=seqs, count=st.integers(0, 0xFFFF))
def test_header_round_trips_and_both_sides_write_the_same_bytes(session, seq, count):
    h = mold.header(session, seq, count)
    assert len(h) == mold.HEADER_LEN
    assert mold.unpack_header(h) == (session, seq, count)
    out = np.zeros(mold.HEADER_LEN + 3, np.uint8)  # at an offset, inside a larger buffer
    mold.put_header(out, 3, np.frombuffer(session, np.uint8), np.uint64(seq), count)
    assert out[3:].tobytes() == h and not out[:3].any()
    b = np.frombuffer(h, np.uint8)
    status, got_seq, got_count = mold.parse_header(b, 0, len(b))
    assert int(got_seq) % 2**64 == seq and got_count == count  # int64 on the hot path


@settings(max_examples=100, deadline=None)
@given(session=sessions, next_seq=st.integers(1, 2**63 - 1))
def test_heartbeat_and_end_of_session_round_trip(session, next_seq):
    assert mold.parse(mold.heartbeat(session, next_seq)) == (
        mold.P_HEARTBEAT,
        next_seq,
        mold.HEARTBEAT,
        session,
        [],
    )
    assert mold.parse(mold.end_of_session(session, next_seq)) == (
        mold.P_END,
        next_seq,
        mold.END_OF_SESSION,
        session,
        [],
    )


@settings(max_examples=200, deadline=None)
@given(session=sessions, seq=st.integers(1, 2**64 - 1), count=st.integers(1, mold.MAX_COUNT))
def test_request_round_trips(session, seq, count):
    data = mold.request(session, seq, count)
    assert len(data) == mold.REQUEST_LEN
    assert mold.parse_request(data) == (session, seq, count)


@settings(max_examples=200, deadline=None)
@given(session=sessions, seq=st.integers(1, 2**62), msgs=messages)
def test_data_packet_round_trips(session, seq, msgs):
    pkt = mold.packet(session, seq, msgs)
    assert mold.parse(pkt) == (mold.P_DATA, seq, len(msgs), session, msgs)
    assert mold.unpack_header(pkt) == (session, seq, len(msgs))


@settings(max_examples=50, deadline=None)
@given(
    msgs=st.lists(st.binary(min_size=1, max_size=200), min_size=1, max_size=200),
    limit=st.integers(mold.HEADER_LEN + 2 + 200, 1400),
)
def test_publisher_packets_parse_back_to_the_session(msgs, limit):
    """index_messages + pack + write_headers (the publisher) against parse (a receiver)."""
    buf = np.frombuffer(b"".join(len(m).to_bytes(2, "big") + m for m in msgs), np.uint8)
    offsets = np.zeros(len(buf) // 2 + 2, np.int64)
    n, bad = mold.index_messages(buf, offsets)
    assert (n, bad) == (len(msgs), -1)
    packets = np.zeros(n, mold.PACKET)
    k = mold.pack(offsets, 0, n, limit, packets)
    hdrs = np.zeros(mold.HEADER_LEN * k, np.uint8)
    mold.write_headers(packets, k, np.frombuffer(SESSION, np.uint8), hdrs)
    got = []
    for j, p in enumerate(packets[:k]):
        h = hdrs[mold.HEADER_LEN * j : mold.HEADER_LEN * (j + 1)].tobytes()
        pkt = h + buf[p["start"] : p["end"]].tobytes()
        assert len(pkt) <= limit
        status, seq, count, session, body = mold.parse(pkt)
        assert (status, seq, count, session) == (mold.P_DATA, len(got) + 1, len(body), SESSION)
        got += body
    assert got == msgs


def test_timestamps_are_the_itch_48_bit_field():
    ts = [0, 1, 34_200_000_000_123, 2**48 - 1]
    body = [b"A" + bytes(4) + t.to_bytes(6, "big") + bytes(25) for t in ts] + [b"S" * 3]
    buf = np.frombuffer(b"".join(len(m).to_bytes(2, "big") + m for m in body), np.uint8)
    offsets = np.zeros(len(buf) // 2 + 2, np.int64)
    n, _ = mold.index_messages(buf, offsets)
    out = np.full(n, -1, np.int64)
    mold.timestamps(buf, offsets, n, out)
    assert out.tolist() == [*ts, 0]  # too short to carry one: 0


# --- bad bytes -------------------------------------------------------------------------------
DROPS = (mold.P_SHORT, mold.P_BAD_BLOCKS)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=200))
def test_any_bytes_parse_to_a_status_never_an_exception(data):
    status, seq, count, session, msgs = mold.parse(data)
    assert status in (mold.P_DATA, mold.P_HEARTBEAT, mold.P_END, *DROPS)
    if status == mold.P_DATA:  # then it is exactly what the builder makes of its parts
        assert mold.packet(session, seq, msgs) == data
    elif status in (mold.P_HEARTBEAT, mold.P_END):
        assert mold.header(session, seq, count) == data


@settings(max_examples=100, deadline=None)
@given(seq=st.integers(1, 2**62), msgs=messages, extra=st.binary(min_size=1, max_size=4))
def test_truncated_or_overlong_packets_are_drops(seq, msgs, extra):
    pkt = mold.packet(SESSION, seq, msgs)
    for cut in range(len(pkt)):
        assert mold.parse(pkt[:cut])[0] == (
            mold.P_SHORT if cut < mold.HEADER_LEN else mold.P_BAD_BLOCKS
        ), cut
    assert mold.parse(pkt + extra)[0] == mold.P_BAD_BLOCKS
    for ctl in (mold.heartbeat(SESSION, seq), mold.end_of_session(SESSION, seq)):
        assert mold.parse(ctl + extra)[0] == mold.P_BAD_BLOCKS


@settings(max_examples=100, deadline=None)
@given(seq=st.integers(1, 2**62), msgs=messages)
def test_parse_header_reads_nothing_past_end(seq, msgs):
    """A packet whose tail lies past ``end`` in the same buffer is still a drop."""
    pkt = np.frombuffer(mold.packet(SESSION, seq, msgs), np.uint8)
    assert mold.parse_header(pkt, 0, len(pkt))[0] == mold.P_DATA
    for end in (len(pkt) - 1, mold.HEADER_LEN, mold.HEADER_LEN - 1, 0):
        assert mold.parse_header(pkt, 0, end)[0] in DROPS


@pytest.mark.parametrize(
    "data, why",
    [
        (b"", "20 bytes, not 0"),
        (SESSION + bytes(9), "20 bytes, not 19"),
        (mold.request(SESSION, 1, 1) + b"!", "20 bytes, not 21"),
        (mold.request(SESSION, 0, 10), "sequence number 1 or later"),
        (mold.request(SESSION, 5, 0), "messages, not 0"),
        (mold.request(SESSION, 5, mold.END_OF_SESSION), "messages, not 65535"),
    ],
)
def test_bad_requests_are_a_clear_error(data, why):
    with pytest.raises(mold.MoldError, match=why):
        mold.parse_request(data)


def test_building_what_the_fields_cannot_hold_is_a_clear_error():
    with pytest.raises(mold.MoldError, match="not 10 bytes"):
        mold.header(b"SHORT", 1, 1)
    with pytest.raises(mold.MoldError, match="does not fit"):
        mold.header(SESSION, 2**64, 1)
    with pytest.raises(mold.MoldError, match="does not fit"):
        mold.request(SESSION, 1, 0x10000)
    with pytest.raises(mold.MoldError, match="1..65534 messages"):
        mold.packet(SESSION, 1, [])
    with pytest.raises(mold.MoldError, match="shorter than a MoldUDP64 header"):
        mold.unpack_header(SESSION)
    for name in ("", "ELEVENCHARS", "SESSIÖN"):
        with pytest.raises(mold.MoldError, match="1-10 ASCII"):
            mold.session_bytes(name)
    assert mold.session_bytes("S1") == b"S1        "


def test_the_hot_path_counts_bad_packets_as_drops():
    """Through ``arbiter.on_packet`` as the consumer loops call it: every malformed packet
    is one count of the line's ``malformed`` counter, and nothing else moves."""
    m = {n: np.zeros(shape, dt) for n, (dt, shape) in shm.REGIONS.items() if n != "levels"}
    ctr = m["counters"]
    ctr[shm.A_NEXT] = 1
    book = Book(orders=16, levels=16, ladder=16, counters=ctr[shm.BOOK_BASE :])
    arb = (ctr, *arbiter.new_hold(4), m["gaps"], m["control"], m["recov"], m["recov_meta"])
    bk_ = (
        *book.arrays(),
        m["bbo"],
        np.zeros(256, np.int64),
        m["latency"],
        *ev.Ring.off(),
        *msgring.off(),
    )
    session = np.frombuffer(SESSION, np.uint8).copy()
    good = mold.packet(SESSION, 1, [b"S" + bytes(10) + b"O"])
    bad = [good[:k] for k in range(len(good))] + [good + b"x", mold.heartbeat(SESSION, 1) + b"x"]
    line = 1
    for data in bad:
        b = np.frombuffer(data, np.uint8).copy()
        assert consumer._packet(b, 0, len(b), line, 0, 1_000, session, arb, bk_) == (0, 1)
    lb = line * shm.LINE_STRIDE
    assert ctr[lb + shm.L_MALFORMED] == len(bad)
    assert ctr[shm.A_NEXT] == 1 and ctr[lb + shm.L_OTHER_SESSION] == 0


# --- one codec: the guard ----------------------------------------------------------------------
# The header's fields by hand: a struct format with the sequence and count side by side,
# slices at their offsets, the two fields' to_bytes widths in one expression, or an
# unpack_from/pack_into at a literal offset ending in the count's or sequence's offset.
_HEADER_FORMAT = re.compile(r"^[@=<>!]?(\d*s)?\s*Q\s*H$")
_FIELD_SLICES = {(mold.SEQ_OFF, mold.COUNT_OFF), (mold.COUNT_OFF, mold.HEADER_LEN)}
_FIELD_OFFSETS = {mold.SEQ_OFF, mold.COUNT_OFF}


def _int_leaves(node: ast.AST) -> list[int] | None:
    """The integer literals of an expression made only of them and + (else None)."""
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return [node.value]
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = _int_leaves(node.left), _int_leaves(node.right)
        return None if left is None or right is None else left + right
    return None


def _const_int(node: ast.AST | None) -> int | None:
    return node.value if isinstance(node, ast.Constant) and type(node.value) is int else None


def hand_coded_headers(source: str) -> list[int]:
    """Line numbers in ``source`` that pack or unpack the MoldUDP64 header by hand."""
    hits = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Constant) and isinstance(node.value, str | bytes):
            text = node.value if isinstance(node.value, str) else node.value.decode("latin-1")
            if _HEADER_FORMAT.match(text):
                hits.add(node.lineno)
        elif isinstance(node, ast.Slice):
            if (_const_int(node.lower), _const_int(node.upper)) in _FIELD_SLICES:
                hits.add(node.lineno)
        elif isinstance(node, ast.BinOp):
            widths = {
                _const_int(c.args[0])
                for c in ast.walk(node)
                if isinstance(c, ast.Call)
                and isinstance(c.func, ast.Attribute)
                and c.func.attr == "to_bytes"
                and c.args
            }
            if {mold.SEQ_LEN, mold.COUNT_LEN} <= widths:
                hits.add(node.lineno)
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in ("unpack_from", "pack_into")
            and len(node.args) >= 3
        ):
            leaves = _int_leaves(node.args[2])
            if leaves and len(leaves) > 1 and leaves[-1] in _FIELD_OFFSETS:
                hits.add(node.lineno)
    return sorted(hits)


@pytest.mark.parametrize(
    "snippet",
    [
        'struct.pack(">QH", seq, count)',
        'struct.Struct("!10sQH").unpack(data)',
        'seq = int.from_bytes(buf[10:18], "big")',
        'count = int.from_bytes(data[18:20], "big")',
        'sock.send(name + seq.to_bytes(8, "big") + count.to_bytes(2, "big"))',
        'n = struct.unpack_from(">H", f, 14 + 20 + 8 + 18)[0]',
    ],
)
def test_the_guard_sees_each_way_the_header_was_hand_coded(snippet):
    assert hand_coded_headers(snippet) == [1]


def test_only_the_codec_packs_or_unpacks_the_header():
    codec = ROOT / "dataplane" / "moldudp64.py"
    found = {}
    for path in sorted([*(ROOT / "host").rglob("*.py"), *(ROOT / "dataplane").rglob("*.py")]):
        if path != codec:
            lines = hand_coded_headers(path.read_text())
            if lines:
                found[str(path.relative_to(ROOT))] = lines
    assert found == {}, f"use dataplane.moldudp64 instead of the header by hand: {found}"
