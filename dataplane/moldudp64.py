"""MoldUDP64 framing (Nasdaq MoldUDP64 1.00): the one codec of the format.

A downstream packet is a 20-byte header -- Session(10), Sequence Number(8), Message
Count(2), big-endian; the layout is the ``*_OFF``/``*_LEN`` constants below and nothing
else -- followed by message blocks, each a 2-byte big-endian length and the message.
That block format is exactly Nasdaq's binary ITCH file framing, so a packet's payload is
a contiguous slice of a session file and packing needs only message boundaries.
Heartbeats carry count 0 and end of session 0xFFFF, both with the next expected sequence
number. A retransmission request is the header alone, asking for ``count`` messages from
``seq``.

numba side (hot path and publisher; no allocation, never raises on packet bytes):
``index_messages`` finds every message's offset in a session buffer, ``pack`` cuts a run
of messages into packets under a payload limit (never splitting a message),
``write_headers``/``put_header`` fill headers; ``parse_header`` validates a received
packet and returns a status code -- a bad packet is a code the caller counts.

Python side (control plane, bytes in and out): ``header``, ``heartbeat``,
``end_of_session``, ``request`` and ``packet`` build; ``unpack_header``,
``parse_request`` and ``parse`` read, raising ``MoldError`` (a ``ValueError``) with the
reason for bytes that are not what they claim to be.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from dataplane.itch import HEADER_LEN as ITCH_HEADER_LEN
from dataplane.itch import rd_u16, rd_u48, rd_u64

# --- the header: one definition of the layout ------------------------------------------
SESSION_OFF, SESSION_LEN = 0, 10  # ASCII, space padded
SEQ_OFF, SEQ_LEN = 10, 8  # sequence number of the first message (next expected, control)
COUNT_OFF, COUNT_LEN = 18, 2  # message blocks that follow; HEARTBEAT / END_OF_SESSION
HEADER_LEN = 20
REQUEST_LEN = HEADER_LEN  # a retransmission request is a header alone
# the same layout as a numpy record, for the Python side's bytes in and out
HEADER = np.dtype(
    {
        "names": ["session", "seq", "count"],
        "formats": [(np.uint8, (SESSION_LEN,)), f">u{SEQ_LEN}", f">u{COUNT_LEN}"],
        "offsets": [SESSION_OFF, SEQ_OFF, COUNT_OFF],
        "itemsize": HEADER_LEN,
    }
)
BLOCK_LEN_LEN = 2  # each message block: its length, big-endian, then the message

HEARTBEAT = 0
END_OF_SESSION = 0xFFFF
MAX_COUNT = 0xFFFE  # largest message count a data packet (or a request) may carry
_ITCH_TS_OFF = 5  # an ITCH message's 6-byte timestamp follows type(1), locate(2), tracking(2)


class MoldError(ValueError):
    """A session name, field value, packet or request that MoldUDP64 cannot carry or
    that is not what it should be; the message says why."""


# parse statuses
P_DATA = 0
P_HEARTBEAT = 1
P_END = 2
P_SHORT = 3  # shorter than the header
P_BAD_BLOCKS = 4  # blocks do not add up to the count and the packet length

# a packet table row (publisher side): messages first..first+count-1 (0-based message
# index into the session), bytes [start, end) of the session buffer
PACKET = np.dtype(
    [
        ("seq", np.int64),
        ("count", np.int64),
        ("start", np.int64),
        ("end", np.int64),
        ("first", np.int64),
    ],
    align=True,
)


def session_bytes(name: str) -> bytes:
    """The 10-byte wire form of a session name (ASCII, space padded)."""
    if not (name.isascii() and 1 <= len(name) <= SESSION_LEN):
        raise MoldError(f"session name {name!r} must be 1-{SESSION_LEN} ASCII characters")
    return name.encode("ascii").ljust(SESSION_LEN, b" ")


# --- numba side ----------------------------------------------------------------------------
@njit(cache=True, nogil=True)
def index_messages(b, offsets):
    """Fill ``offsets[i]`` with the offset of message i's length prefix and
    ``offsets[n]`` with the end; returns ``(n, bad_offset)`` where ``bad_offset`` is -1,
    or the offset of a length prefix whose message runs past the end (``n`` counts the
    messages before it). ``offsets`` needs ``len(b) // 2 + 1`` rows at most."""
    pos = 0
    n = 0
    end = b.shape[0]
    while pos < end:
        if pos + BLOCK_LEN_LEN > end:
            offsets[n] = pos
            return n, pos
        ln = rd_u16(b, pos)
        if pos + BLOCK_LEN_LEN + ln > end:
            offsets[n] = pos
            return n, pos
        offsets[n] = pos
        n += 1
        pos += BLOCK_LEN_LEN + ln
    offsets[n] = pos
    return n, -1


@njit(cache=True, nogil=True)
def timestamps(b, offsets, n, out):
    """ITCH timestamp (ns since midnight) of each message; 0 for a message too short to
    carry one."""
    for i in range(n):
        p = offsets[i] + BLOCK_LEN_LEN
        if offsets[i + 1] - p >= ITCH_HEADER_LEN:
            out[i] = np.int64(rd_u48(b, p + _ITCH_TS_OFF))
        else:
            out[i] = 0


@njit(cache=True, nogil=True)
def pack(offsets, first, last, limit, out):
    """Pack messages ``first..last-1`` (0-based) into packets whose UDP payload is at
    most ``limit`` bytes; rows go to ``out`` (``PACKET``). Returns the packet count, or
    ``-(i + 1)`` when message i alone does not fit under the limit."""
    room = limit - HEADER_LEN
    k = 0
    i = first
    while i < last:
        start = offsets[i]
        j = i
        while j < last and offsets[j + 1] - start <= room and j - i < MAX_COUNT:
            j += 1
        if j == i:
            return -(i + 1)
        out[k].seq = i + 1
        out[k].count = j - i
        out[k].start = start
        out[k].end = offsets[j]
        out[k].first = i
        k += 1
        i = j
    return k


@njit(cache=True, nogil=True)
def put_header(out, pos, session, seq, count):
    """Write a header at ``out[pos:pos + HEADER_LEN]`` (``session``: SESSION_LEN uint8)."""
    for i in range(SESSION_LEN):
        out[pos + SESSION_OFF + i] = session[i]
    for i in range(SEQ_LEN):
        out[pos + SEQ_OFF + i] = (seq >> (8 * (SEQ_LEN - 1 - i))) & 0xFF
    for i in range(COUNT_LEN):
        out[pos + COUNT_OFF + i] = (count >> (8 * (COUNT_LEN - 1 - i))) & 0xFF


@njit(cache=True, nogil=True)
def write_headers(packets, n, session, out):
    """Headers of packets ``0..n-1`` into ``out[HEADER_LEN * k : HEADER_LEN * (k + 1)]``."""
    for k in range(n):
        put_header(out, HEADER_LEN * k, session, packets[k].seq, packets[k].count)


@njit(cache=True, nogil=True)
def parse_header(b, pos, end):
    """``(status, seq, count)`` of the packet in ``b[pos:end]``: P_DATA, P_HEARTBEAT,
    P_END, or P_SHORT / P_BAD_BLOCKS for a packet that must be dropped (counted). Reads
    nothing outside ``b[pos:end]``."""
    if end - pos < HEADER_LEN:
        return P_SHORT, 0, 0
    seq = np.int64(rd_u64(b, pos + SEQ_OFF))
    count = np.int64(rd_u16(b, pos + COUNT_OFF))
    if count == HEARTBEAT:
        return (P_HEARTBEAT if end - pos == HEADER_LEN else P_BAD_BLOCKS), seq, count
    if count == END_OF_SESSION:
        return (P_END if end - pos == HEADER_LEN else P_BAD_BLOCKS), seq, count
    p = pos + HEADER_LEN
    for _ in range(count):
        if p + BLOCK_LEN_LEN > end:
            return P_BAD_BLOCKS, seq, count
        p += BLOCK_LEN_LEN + rd_u16(b, p)
    if p != end:
        return P_BAD_BLOCKS, seq, count
    return P_DATA, seq, count


# --- Python side ---------------------------------------------------------------------------
def header(session: bytes, seq: int, count: int) -> bytes:
    """The header's bytes; ``session`` is the wire form (``session_bytes``)."""
    if len(session) != SESSION_LEN:
        raise MoldError(f"session {session!r} is not {SESSION_LEN} bytes")
    if not 0 <= seq < 1 << (8 * SEQ_LEN) or not 0 <= count < 1 << (8 * COUNT_LEN):
        raise MoldError(f"sequence {seq} or count {count} does not fit the header")
    h = np.zeros(1, HEADER)
    h["session"] = np.frombuffer(session, np.uint8)
    h["seq"] = seq
    h["count"] = count
    return h.tobytes()


def heartbeat(session: bytes, next_seq: int) -> bytes:
    """A heartbeat: no messages, the next sequence number the sender will publish."""
    return header(session, next_seq, HEARTBEAT)


def end_of_session(session: bytes, next_seq: int) -> bytes:
    """The end of session: nothing follows ``next_seq - 1`` in this session."""
    return header(session, next_seq, END_OF_SESSION)


def request(session: bytes, seq: int, count: int) -> bytes:
    """A retransmission request for ``count`` messages from ``seq``. Encodes any values
    the fields hold (a test may send a bad request); ``parse_request`` judges them."""
    return header(session, seq, count)


def packet(session: bytes, seq: int, messages: list[bytes]) -> bytes:
    """A data packet carrying ``messages`` as sequences ``seq, seq + 1, ...``."""
    if not 1 <= len(messages) <= MAX_COUNT:
        raise MoldError(f"a data packet carries 1..{MAX_COUNT} messages, not {len(messages)}")
    blocks = bytearray()
    for m in messages:
        blocks += len(m).to_bytes(BLOCK_LEN_LEN, "big") + m
    return header(session, seq, len(messages)) + bytes(blocks)


def unpack_header(data: bytes) -> tuple[bytes, int, int]:
    """``(session, seq, count)`` of the header at the start of ``data`` (what follows is
    not looked at; ``parse`` validates a whole packet)."""
    if len(data) < HEADER_LEN:
        raise MoldError(f"{len(data)} bytes is shorter than a MoldUDP64 header ({HEADER_LEN})")
    h = np.frombuffer(data, HEADER, count=1)[0]
    return h["session"].tobytes(), int(h["seq"]), int(h["count"])


def parse_request(data: bytes) -> tuple[bytes, int, int]:
    """``(session, seq, count)`` of a retransmission request: exactly a header, asking for
    1..MAX_COUNT messages from a sequence number of at least 1."""
    if len(data) != REQUEST_LEN:
        raise MoldError(f"a request is {REQUEST_LEN} bytes, not {len(data)}")
    session, seq, count = unpack_header(data)
    if seq < 1:
        raise MoldError("a request asks from sequence number 1 or later, not 0")
    if not 1 <= count <= MAX_COUNT:
        raise MoldError(f"a request asks for 1..{MAX_COUNT} messages, not {count}")
    return session, seq, count


def parse(packet: bytes) -> tuple[int, int, int, bytes, list[bytes]]:
    """A received packet for tools and tests: ``(status, seq, count, session,
    messages)``, with ``parse_header``'s status (never raises on bad bytes)."""
    b = np.frombuffer(packet, np.uint8)
    status, seq, count = parse_header(b, 0, len(b))
    msgs: list[bytes] = []
    if status == P_DATA:
        p = HEADER_LEN
        for _ in range(count):
            ln = int.from_bytes(packet[p : p + BLOCK_LEN_LEN], "big")
            msgs.append(bytes(packet[p + BLOCK_LEN_LEN : p + BLOCK_LEN_LEN + ln]))
            p += BLOCK_LEN_LEN + ln
    session = bytes(packet[SESSION_OFF : SESSION_OFF + SESSION_LEN])
    return int(status), int(seq), int(count), session, msgs
