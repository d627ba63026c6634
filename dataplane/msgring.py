"""The message ring: every ITCH message the consumer took, raw and in sequence, for the
journal writer (``host.appliance.journal``), which reads it from another process -- the
consumer never waits on a disk.

One single-producer byte ring per channel in shared memory: ``messages`` (``size`` bytes, a
power of two) and ``messages.hdr`` (``HDR_LEN`` int64 words). The consumer appends one
record per packet it takes from (the part it had not taken yet), so the cost on the hot path
is one copy of the packet's message blocks:

``first_seq`` i64, ``count`` i32, ``nbytes`` i32, then ``nbytes`` bytes, padded to 8:

- ``nbytes >= 0``: ``count`` messages, sequences ``first_seq..first_seq+count-1``, as
  MoldUDP64 message blocks (a 2-byte big-endian length, then the message);
- ``nbytes == HOLE``: sequences ``first_seq..first_seq+count-1`` were declared unrecoverable
  and skipped: the books never had them;
- ``nbytes == WRAP``: nothing; the rest of the buffer is skipped and the next record starts
  at offset 0 (a record is never split; a tail shorter than a header is skipped unmarked).

Positions are byte counts since the ring was created. ``M_RESERVE``: the end of the record
being written, stored before its bytes; ``M_WRITE``: the end of the last whole record,
stored after them (behind compiler fences: x86 keeps stores in order). A reader copies
``[cursor, write)`` and then reads ``M_RESERVE``: if the producer may have written over a
byte it copied (``reserve - size > cursor``) it was lapped, its copy is not trusted, and
the journal records a hole. Records come in sequence order because the consumer takes
messages in sequence order (the arbiter's contract), recovered ones included.

Off (``[journal] enabled = false``): a one-page ring whose header says ``M_ON`` 0; the
consumer checks that word once a packet.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
from numba import njit

from dataplane import events, shm
from dataplane.events import compiler_fence

HDR_LEN = 16
M_MAGIC = 0
M_SIZE = 1
M_ON = 2
M_WRITE = 3  # bytes written (the end of the last whole record)
M_RECORDS = 4  # records written (wrap markers not counted)
M_NEXT_SEQ = 5  # the sequence after the last message (or hole) recorded
M_FULL = 6  # records that did not fit at all (bigger than the ring: never in practice)
M_CREATED_NS = 7
M_PID = 8
M_RESERVE = 9  # the end of the record being written (set before its bytes)
MAGIC = 0x54574D5347524E31  # "TWMSGRN1"
REC_HDR = 16
HOLE = -1
WRAP = -2
MIN_SIZE = 1 << 16
OFF_SIZE = 4096


@njit(cache=True, nogil=True, inline="always", _nrt=False)
def _room(buf, hdr, need):
    """The offset a record of ``need`` bytes goes at (writing a wrap marker first when it
    does not fit before the end), or -1 when it can never fit."""
    size = buf.shape[0]
    if need > size // 2:
        hdr[M_FULL] += 1
        return -1
    w = hdr[M_WRITE]
    off = w & (size - 1)
    if off + need > size:
        hdr[M_RESERVE] = w + (size - off)
        compiler_fence()
        if off + REC_HDR <= size:
            _put_i64(buf, off, 0)
            _put_i32(buf, off + 8, 0)
            _put_i32(buf, off + 12, WRAP)
        compiler_fence()
        hdr[M_WRITE] = w + (size - off)  # the marker is whole before the position moves
        off = 0
    hdr[M_RESERVE] = (hdr[M_WRITE] & ~(size - 1)) + off + need
    compiler_fence()  # a reader sees the reservation before any byte of the record
    return off


@njit(cache=True, nogil=True, inline="always", _nrt=False)
def _put_i64(buf, off, v):
    for k in range(8):
        buf[off + k] = (v >> (8 * k)) & 0xFF


@njit(cache=True, nogil=True, inline="always", _nrt=False)
def _put_i32(buf, off, v):
    for k in range(4):
        buf[off + k] = (v >> (8 * k)) & 0xFF


@njit(cache=True, nogil=True, inline="always", _nrt=False)
def _publish(hdr, next_seq):
    """The record reserved is whole: move the write position to its end."""
    compiler_fence()
    hdr[M_WRITE] = hdr[M_RESERVE]
    hdr[M_RECORDS] += 1
    hdr[M_NEXT_SEQ] = next_seq


@njit(cache=True, nogil=True, inline="always", _nrt=False)
def put(buf, hdr, b, p, q, seq, count):
    """Record the ``count`` message blocks ``b[p:q]`` (sequences from ``seq``)."""
    if hdr[M_ON] == 0 or count <= 0:
        return
    n = q - p
    need = REC_HDR + ((n + 7) & ~7)
    off = _room(buf, hdr, need)
    if off < 0:
        return
    _put_i64(buf, off, seq)
    _put_i32(buf, off + 8, count)
    _put_i32(buf, off + 12, n)
    for i in range(n):
        buf[off + REC_HDR + i] = b[p + i]
    _publish(hdr, seq + count)


@njit(cache=True, nogil=True, inline="always", _nrt=False)
def hole(buf, hdr, seq, count):
    """Record that sequences ``seq..seq+count-1`` were skipped as unrecoverable."""
    if hdr[M_ON] == 0 or count <= 0:
        return
    off = _room(buf, hdr, REC_HDR)
    if off < 0:
        return
    _put_i64(buf, off, seq)
    _put_i32(buf, off + 8, count)
    _put_i32(buf, off + 12, HOLE)
    _publish(hdr, seq + count)


def create(channel: str, size: int, on: bool = True, root: Path | None = None):
    """The channel's message ring, new (``size`` bytes; a one-page ring when off):
    ``(buf, hdr)``, the consumer's arguments."""
    if on and (size < MIN_SIZE or size & (size - 1)):
        raise ValueError(f"message ring size {size}: not a power of two >= {MIN_SIZE}")
    size = size if on else OFF_SIZE
    d = shm.make_channel_dir(channel, root)
    m = events.map_file(d / "messages", size, True)
    buf = np.frombuffer(m, np.uint8)
    hdr = np.memmap(d / "messages.hdr", np.int64, "w+", shape=(HDR_LEN,)).view(np.ndarray)
    hdr[M_SIZE] = size
    hdr[M_ON] = int(on)
    hdr[M_CREATED_NS] = time.monotonic_ns()
    hdr[M_PID] = os.getpid()
    hdr[M_MAGIC] = MAGIC
    return buf, hdr


def off() -> tuple[np.ndarray, np.ndarray]:
    """A ring that is off, in private memory (tools and tests that drive the consumer)."""
    hdr = np.zeros(HDR_LEN, np.int64)
    hdr[M_SIZE] = OFF_SIZE
    return np.zeros(OFF_SIZE, np.uint8), hdr


def private(size: int) -> tuple[np.ndarray, np.ndarray]:
    """An on ring in private memory (tests)."""
    hdr = np.zeros(HDR_LEN, np.int64)
    hdr[M_SIZE], hdr[M_ON], hdr[M_MAGIC] = size, 1, MAGIC
    return np.zeros(size, np.uint8), hdr


class Lapped(RuntimeError):
    """The consumer wrote over records this reader had not copied yet."""


class Reader:
    """Reads a channel's message ring (``attach``) or given arrays, from a position."""

    def __init__(self, buf: np.ndarray, hdr: np.ndarray, cursor: int | None = None):
        if int(hdr[M_MAGIC]) != MAGIC:
            raise ValueError("not a message ring (bad magic)")
        self.buf, self.hdr = buf, hdr
        self.size = int(hdr[M_SIZE])
        self.cursor = int(hdr[M_WRITE]) if cursor is None else cursor
        self.start = self.cursor  # the ring position of the last chunk's first byte
        self.scratch = np.zeros(self.size, np.uint8)

    @classmethod
    def attach(cls, channel: str, root: Path | None = None, cursor: int | None = 0) -> Reader:
        d = shm.channel_dir(channel, root)
        try:
            hdr = np.memmap(d / "messages.hdr", np.int64, "r", shape=(HDR_LEN,)).view(np.ndarray)
        except (FileNotFoundError, ValueError):
            raise FileNotFoundError(
                f"no message ring at {d} (is tickwire run running, with [journal] on?)"
            ) from None
        if int(hdr[M_MAGIC]) != MAGIC:
            raise ValueError(f"{d / 'messages.hdr'}: not a message ring")
        buf = np.frombuffer(events.map_file(d / "messages", int(hdr[M_SIZE]), False), np.uint8)
        return cls(buf, hdr, cursor)

    @property
    def on(self) -> bool:
        return bool(self.hdr[M_ON])

    @property
    def write_pos(self) -> int:
        return int(self.hdr[M_WRITE])

    def poll(self) -> np.ndarray:
        """The bytes written since the last poll (whole records; ``self.start`` is the ring
        position of the first). Raises ``Lapped`` when the producer wrote over what was
        not read yet (the cursor then moves to the producer's position)."""
        start, w = self.cursor, int(self.hdr[M_WRITE])
        self.start = start
        if w == start:
            return self.scratch[:0]
        if w - start > self.size:
            self.cursor = w
            raise Lapped(f"lapped: {w - start:,} bytes behind a {self.size:,}-byte ring")
        mask = self.size - 1
        a, n = start & mask, w - start
        if a + n <= self.size:
            self.scratch[:n] = self.buf[a : a + n]
        else:
            k = self.size - a
            self.scratch[:k] = self.buf[a:]
            self.scratch[k:n] = self.buf[: n - k]
        if int(self.hdr[M_RESERVE]) - self.size > start:  # written over while copying
            self.cursor = int(self.hdr[M_WRITE])
            raise Lapped("lapped while copying")
        self.cursor = w
        return self.scratch[:n]


@njit(cache=True, nogil=True)
def _i64(c, p):
    v = np.int64(0)
    for k in range(8):
        v |= np.int64(c[p + k]) << (8 * k)
    return v


@njit(cache=True, nogil=True)
def _i32(c, p):
    v = np.int64(0)
    for k in range(4):
        v |= np.int64(c[p + k]) << (8 * k)
    return v - (np.int64(1) << 32) if v >= (np.int64(1) << 31) else v


@njit(cache=True, nogil=True)
def split(chunk, start, size, seqs, out, offsets, holes):
    """The messages of a polled ``chunk`` (ring position ``start``, ring ``size``): message
    ``i`` is ``out[offsets[i]:offsets[i+1]]`` (no length prefix), sequence ``seqs[i]``;
    ``holes[j] = (first_seq, count, index of the message it comes before)``. Returns
    ``(messages, holes)``; the arrays must hold a chunk's worth (``size // 3`` messages)."""
    mask = size - 1
    pos = 0
    n = chunk.shape[0]
    m = 0
    h = 0
    o = 0
    offsets[0] = 0
    while pos < n:
        off = (start + pos) & mask
        if off + REC_HDR > size:  # the producer skipped a tail too short for a marker
            pos += size - off
            continue
        seq = _i64(chunk, pos)
        count = _i32(chunk, pos + 8)
        nbytes = _i32(chunk, pos + 12)
        if nbytes == WRAP:
            pos += size - off
            continue
        if nbytes == HOLE:
            holes[h, 0] = seq
            holes[h, 1] = count
            holes[h, 2] = m
            h += 1
            pos += REC_HDR
            continue
        q = pos + REC_HDR
        for k in range(count):
            ln = (np.int64(chunk[q]) << 8) | np.int64(chunk[q + 1])
            q += 2
            for i in range(ln):
                out[o + i] = chunk[q + i]
            o += ln
            q += ln
            seqs[m] = seq + k
            m += 1
            offsets[m] = o
        pos += REC_HDR + ((nbytes + 7) & ~7)
    return m, h


class Split:
    """Scratch for ``split`` sized for a ring: ``messages(chunk, start)`` returns
    ``(seqs, buf, offsets, holes)`` views of the chunk's messages and holes."""

    def __init__(self, size: int):
        self.size = size
        self.seqs = np.zeros(size // 3 + 1, np.int64)
        self.out = np.zeros(size, np.uint8)
        self.offsets = np.zeros(size // 3 + 2, np.int64)
        self.holes = np.zeros((size // REC_HDR + 1, 3), np.int64)

    def messages(self, chunk: np.ndarray, start: int):
        m, h = split(chunk, start, self.size, self.seqs, self.out, self.offsets, self.holes)
        return self.seqs[:m], self.out, self.offsets[: m + 1], self.holes[:h]
