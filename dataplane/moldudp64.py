"""MoldUDP64 framing (``../shared/specs/moldudp64.md``), numba-compiled.

A downstream packet is a 20-byte header -- Session(10), Sequence Number(8), Message
Count(2) -- followed by message blocks, each a 2-byte big-endian length and the message.
That block format is exactly Nasdaq's binary ITCH file framing, so a packet's payload is
a contiguous slice of a session file and packing needs only message boundaries.

Publisher side: ``index_messages`` finds every message's offset in a session buffer,
``pack`` cuts a run of messages into packets under a payload limit (never splitting a
message), ``write_headers`` fills their headers. Receiver side: ``parse_header`` and
``walk_blocks`` validate a packet and never raise; a bad packet is a status code.
Heartbeats carry count 0 and end of session carries 0xFFFF, both with the next expected
sequence number. A retransmission request is the 20-byte header alone (``REQUEST``).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from dataplane.itch import rd_u16, rd_u64

HEADER_LEN = 20
SESSION_LEN = 10
REQUEST_LEN = 20
HEARTBEAT = 0
END_OF_SESSION = 0xFFFF
MAX_COUNT = 0xFFFE  # largest message count a data packet may carry

# parse statuses
P_DATA = 0
P_HEARTBEAT = 1
P_END = 2
P_SHORT = 3  # shorter than the header
P_BAD_BLOCKS = 4  # blocks do not add up to the count and the packet length

# a packet table row (publisher side): messages first..first+count-1 (0-based message
# index into the session), bytes [start, end) of the session buffer
PACKET = np.dtype(
    [("seq", np.int64), ("count", np.int64), ("start", np.int64), ("end", np.int64),
     ("first", np.int64)],
    align=True,
)  # fmt: skip


def session_bytes(name: str) -> bytes:
    """The 10-byte wire form of a session name (ASCII, space padded)."""
    raw = name.encode("ascii")
    if not 1 <= len(raw) <= SESSION_LEN:
        raise ValueError(f"session name {name!r} must be 1-10 ASCII characters")
    return raw.ljust(SESSION_LEN, b" ")


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
        if pos + 2 > end:
            offsets[n] = pos
            return n, pos
        ln = rd_u16(b, pos)
        if pos + 2 + ln > end:
            offsets[n] = pos
            return n, pos
        offsets[n] = pos
        n += 1
        pos += 2 + ln
    offsets[n] = pos
    return n, -1


@njit(cache=True, nogil=True)
def timestamps(b, offsets, n, out):
    """ITCH timestamp (ns since midnight, 6 bytes at message offset 5) of each message;
    0 for a message too short to carry one."""
    for i in range(n):
        p = offsets[i] + 2
        if offsets[i + 1] - p >= 11:
            out[i] = (np.int64(rd_u16(b, p + 5)) << 32) | (
                (np.int64(b[p + 7]) << 24) | (np.int64(b[p + 8]) << 16)
                | (np.int64(b[p + 9]) << 8) | np.int64(b[p + 10]))  # fmt: skip
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
    """Write a 20-byte header at ``out[pos]`` (``session``: 10 uint8)."""
    for i in range(SESSION_LEN):
        out[pos + i] = session[i]
    for i in range(8):
        out[pos + 10 + i] = (seq >> (8 * (7 - i))) & 0xFF
    out[pos + 18] = (count >> 8) & 0xFF
    out[pos + 19] = count & 0xFF


@njit(cache=True, nogil=True)
def write_headers(packets, n, session, out):
    """Headers of packets ``0..n-1`` into ``out[20*k : 20*k+20]``."""
    for k in range(n):
        put_header(out, HEADER_LEN * k, session, packets[k].seq, packets[k].count)


@njit(cache=True, nogil=True)
def parse_header(b, pos, end):
    """``(status, seq, count)`` of the packet in ``b[pos:end]``: P_DATA, P_HEARTBEAT,
    P_END, or P_SHORT / P_BAD_BLOCKS for a packet that must be dropped (counted)."""
    if end - pos < HEADER_LEN:
        return P_SHORT, 0, 0
    seq = np.int64(rd_u64(b, pos + 10))
    count = np.int64(rd_u16(b, pos + 18))
    if count == HEARTBEAT:
        return (P_HEARTBEAT if end - pos == HEADER_LEN else P_BAD_BLOCKS), seq, count
    if count == END_OF_SESSION:
        return (P_END if end - pos == HEADER_LEN else P_BAD_BLOCKS), seq, count
    p = pos + HEADER_LEN
    for _ in range(count):
        if p + 2 > end:
            return P_BAD_BLOCKS, seq, count
        p += 2 + rd_u16(b, p)
    if p != end:
        return P_BAD_BLOCKS, seq, count
    return P_DATA, seq, count


def parse(packet: bytes) -> tuple[int, int, int, bytes, list[bytes]]:
    """Python-side parse for tools and tests: ``(status, seq, count, session, messages)``."""
    b = np.frombuffer(packet, np.uint8)
    status, seq, count = parse_header(b, 0, len(b))
    msgs: list[bytes] = []
    if status == P_DATA:
        p = HEADER_LEN
        for _ in range(count):
            ln = int.from_bytes(packet[p : p + 2], "big")
            msgs.append(bytes(packet[p + 2 : p + 2 + ln]))
            p += 2 + ln
    return int(status), int(seq), int(count), bytes(packet[:SESSION_LEN]), msgs


def request(session: bytes, seq: int, count: int) -> bytes:
    """A retransmission request packet."""
    return session + seq.to_bytes(8, "big") + count.to_bytes(2, "big")
