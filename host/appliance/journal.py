"""The message journal: every ITCH message the appliance took, in MoldUDP64 sequence order,
on local disk (issue 18, section 1). The one codec of the journal's files: the ``Writer``
(called by the journal process, never by the consumer), the ``Reader``, and ``verify``
(``tickwire journal verify``).

A journal is a directory of segment files, ``<first_seq:020d>.twj``, each named after the
sequence number of its first record, beside an advisory index ``<first_seq:020d>.twi``
(and the writer's ``.lock``). One journal holds one channel's one MoldUDP64 session: the
writer refuses a directory holding another's. Everything is little-endian.

Segment file header (80 bytes, ``FILE_HEADER``):

====== ===== ===========================================================================
offset bytes field
====== ===== ===========================================================================
0      4     magic ``b"TWJ1"``
4      2     version (1)
6      2     header length (80): records start here
8      8     first_seq: the sequence number of the segment's first record (its name)
16     8     created: CLOCK_REALTIME nanoseconds when the segment was created
24     10    MoldUDP64 session, ASCII, space padded (as on the wire)
34     2     reserved, 0
36     4     index_every: K, the index holds every K-th record of this segment
40     32    channel name, ASCII, NUL padded
72     4     reserved, 0
76     4     CRC-32 of bytes 0..75
====== ===== ===========================================================================

Then records, back to back, each a 20-byte header (``RECORD``) and its payload:

====== ===== ===========================================================================
offset bytes field
====== ===== ===========================================================================
0      2     marker 0xEB7A (bytes 7A EB)
2      1     kind: 1 message, 2 hole
3      1     flags, 0
4      4     payload length: a message 1..65535; a hole 8..263
8      8     seq: the message's MoldUDP64 sequence number; a hole's first missing one
16     4     CRC-32 of header bytes 0..15, then of the payload
20     len   payload: one ITCH message without its 2-byte length prefix; a hole: u64
             count (>= 1) of missing sequence numbers, then why, UTF-8 (at most 255 bytes)
====== ===== ===========================================================================

A record follows its predecessor in sequence: its seq is the last message's + 1, or the
last hole's first + count. The first record's seq is the header's ``first_seq``, and a
segment's first seq is the previous segment's next. No sequence number is ever journaled
twice, and a missing one is a hole record, never a silent jump.

Framing and CRC are told apart: a header with the wrong marker, an unknown kind, non-zero
flags or a length out of its kind's range is a *framing* error (where the next record
starts is unknown, so checking that file stops there); a plausible header whose CRC does
not match is a *CRC* error (the length is trusted to find the next record). The CRC is
zlib's CRC-32 (IEEE 802.3, as ``zlib.crc32``): the stdlib computes it at C speed for the
reader and verify, and the writer's batch builder computes the same one in numba with a
table (CRC-32C would need a third-party module on the Python side for no gain here: this
is corruption detection, not an adversary).

A torn tail is what a crash mid-write leaves: at the end of the newest segment, fewer than
20 bytes of a header, a payload cut short, a final record whose CRC fails, or only zero
bytes (a file system that extended the file before the crash). The writer cuts it on open
(``Writer.recovered``: bytes cut, and a log line) and appends after the last whole record;
a bad record with whole records after it is corruption, and the writer refuses to open.

Index file (``.twi``, no header): 16-byte entries (u64 seq, u64 offset) of records 0, K,
2K, ... of its segment, appended as the segment grows. It is advisory: a reader checks an
entry against the record it points at and falls back to scanning; the writer rebuilds it
on open from its last good entry, and stops adding to it (rather than leave a gap in it)
after a failed write.

Writing: ``Writer.append_many`` builds a batch's records in one numba pass and writes them
with one ``write`` per segment touched; a segment rolls at ``segment_bytes``. Sync policy:
``"none"`` (the kernel writes back), ``"interval"`` (fdatasync at most every
``sync_interval_s``, on append or ``tick()``), ``"every"`` (fdatasync after each append
call). Retention deletes whole oldest segments while the journal is over ``retain_bytes``
or a segment's newest record (its file's mtime) is older than ``retain_age_s``, never the
newest segment. A full disk (ENOSPC, EDQUOT) never raises: what was written of the batch
is cut back to whole records, the writer is ``disk_full``, counts what it cannot write,
retries at most every ``retry_s`` and, once a write succeeds, writes a hole record
("disk full") for exactly what it lost before going on.

``tickwire journal verify`` exit status: 0 every file is whole and continuous (holes are
reported, and are not corruption: the journal says what it lacks), 1 corruption or a
torn tail (a torn tail is repairable: the writer cuts it on its next open), 2 bad
arguments.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import errno
import fcntl
import logging
import os
import re
import struct
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
from numba import njit

from dataplane.moldudp64 import BLOCK_LEN_LEN, index_messages, session_bytes

log = logging.getLogger("tickwire.journal")

# --- the format: one definition ------------------------------------------------------------
MAGIC = b"TWJ1"
VERSION = 1
FILE_HEADER = struct.Struct("<4sHHQq10sHI32sII")
HEADER_LEN = FILE_HEADER.size  # 80
RECORD = struct.Struct("<HBBIQI")  # marker, kind, flags, length, seq, crc
REC_HDR = RECORD.size  # 20
REC_CRC_OFF = 16  # the CRC covers the header's bytes before it, then the payload
MARKER = 0xEB7A
KIND_MESSAGE = 1
KIND_HOLE = 2
MAX_MESSAGE = 0xFFFF  # an ITCH message's length fits its 2-byte prefix
MAX_WHY = 255  # bytes of a hole's reason
HOLE_COUNT = struct.Struct("<Q")
INDEX = np.dtype([("seq", "<u8"), ("offset", "<u8")])
SEGMENT_SUFFIX, INDEX_SUFFIX = ".twj", ".twi"
SEGMENT_NAME = re.compile(r"^(\d{20})\.twj$")
CHANNEL_LEN = 32
SYNC_POLICIES = ("none", "interval", "every")
DISK_FULL = "disk full"

_MARK_LO, _MARK_HI = MARKER & 0xFF, MARKER >> 8
_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_CHUNK = 8 << 20  # bytes a scan reads at a time (a record is at most 65555)
_MAX_ERRORS = 100  # errors listed per file


class JournalError(ValueError):
    """A journal that cannot be used as asked: another channel's or session's, locked by
    another writer, or lacking the sequence asked for. The message names the file."""


class JournalCorrupt(JournalError):
    """A bad record (or header) with whole records after it: not a torn tail."""

    def __init__(self, path: str | os.PathLike, offset: int, what: str):
        super().__init__(f"{path}: offset {offset}: {what}")
        self.path, self.offset, self.what = str(path), offset, what


class SequenceError(JournalError):
    """A sequence number the journal already holds (or passed): never journaled twice."""


class NotAJournal(JournalError):
    """``verify``'s bad argument: no such path, or not a segment file or journal directory."""


@dataclasses.dataclass(frozen=True)
class Hole:
    """Sequence numbers ``first .. first + count - 1`` the journal does not hold, and why."""

    first: int
    count: int
    why: str

    @property
    def last(self) -> int:
        return self.first + self.count - 1


@dataclasses.dataclass(frozen=True)
class Header:
    first_seq: int
    created_ns: int
    session: bytes
    index_every: int
    channel: str


def _crc_table() -> np.ndarray:
    t = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        t = np.where(t & 1, (t >> 1) ^ np.uint32(0xEDB88320), t >> 1).astype(np.uint32)
    return t


CRC_TABLE = _crc_table()  # zlib's CRC-32, reflected 0xEDB88320


def pack_header(first_seq: int, channel: str, session: bytes, index_every: int, created_ns: int):
    """A segment's 80-byte file header."""
    body = FILE_HEADER.pack(
        MAGIC,
        VERSION,
        HEADER_LEN,
        first_seq,
        created_ns,
        session,
        0,
        index_every,
        channel.encode("ascii"),
        0,
        0,
    )[:-4]
    return body + struct.pack("<I", zlib.crc32(body))


def unpack_header(raw: bytes) -> Header:
    """A segment's file header; ``ValueError`` saying what is wrong with it."""
    if len(raw) < HEADER_LEN:
        raise ValueError(f"file header cut short ({len(raw)} of {HEADER_LEN} bytes)")
    magic, version, hlen, first, created, session, _, every, chan, _, crc = FILE_HEADER.unpack(
        raw[:HEADER_LEN]
    )
    if magic != MAGIC:
        raise ValueError(f"not a journal segment (magic {magic!r}, not {MAGIC!r})")
    if version != VERSION or hlen != HEADER_LEN:
        raise ValueError(f"journal version {version} (header {hlen} bytes): this reads {VERSION}")
    if zlib.crc32(raw[: HEADER_LEN - 4]) != crc:
        raise ValueError("file header CRC mismatch")
    if every < 1:
        raise ValueError(f"file header: index_every {every}")
    return Header(first, created, session, every, chan.rstrip(b"\0").decode("ascii", "replace"))


def pack_record(kind: int, seq: int, payload: bytes) -> bytes:
    """One record, header and payload (the writer's numba builder makes the same bytes)."""
    head = RECORD.pack(MARKER, kind, 0, len(payload), seq, 0)[:REC_CRC_OFF]
    crc = zlib.crc32(payload, zlib.crc32(head))
    return head + struct.pack("<I", crc) + payload


def hole_payload(count: int, why: str) -> bytes:
    raw = why.encode("utf-8")[:MAX_WHY].decode("utf-8", "ignore").encode("utf-8")
    return HOLE_COUNT.pack(count) + raw


def segment_name(first_seq: int) -> str:
    return f"{first_seq:020d}{SEGMENT_SUFFIX}"


# --- numba: the batch builder and the walker -----------------------------------------------
@njit(cache=True, nogil=True)
def _rd(data, p, n):
    v = 0
    for i in range(n):
        v |= np.int64(data[p + i]) << (8 * i)
    return v


@njit(cache=True, nogil=True)
def _wr(out, p, v, n):
    for i in range(n):
        out[p + i] = (v >> (8 * i)) & 0xFF


@njit(cache=True, nogil=True)
def _crc(table, crc, data, a, b):
    c = crc ^ 0xFFFFFFFF
    for i in range(a, b):
        c = np.int64(table[(c ^ data[i]) & 0xFF]) ^ (c >> 8)
    return c ^ 0xFFFFFFFF


@njit(cache=True, nogil=True)
def _build(seqs, buf, offsets, prefix, out, pos, rec_off, table):
    """Message records for ``buf[offsets[i] + prefix : offsets[i + 1]]`` with ``seqs[i]``,
    into ``out`` from ``pos``; ``rec_off[i]``: record i's start, ``rec_off[n]``: the end."""
    n = seqs.shape[0]
    for i in range(n):
        a = offsets[i] + prefix
        ln = offsets[i + 1] - a
        rec_off[i] = pos
        out[pos] = _MARK_LO
        out[pos + 1] = _MARK_HI
        out[pos + 2] = KIND_MESSAGE
        out[pos + 3] = 0
        _wr(out, pos + 4, ln, 4)
        _wr(out, pos + 8, seqs[i], 8)
        c = _crc(table, 0, out, pos, pos + REC_CRC_OFF) ^ 0xFFFFFFFF
        q = pos + REC_HDR
        for j in range(ln):  # copy and checksum in one pass
            x = buf[a + j]
            out[q + j] = x
            c = np.int64(table[(c ^ x) & 0xFF]) ^ (c >> 8)
        _wr(out, pos + REC_CRC_OFF, c ^ 0xFFFFFFFF, 4)
        pos = q + ln
    rec_off[n] = pos
    return pos


# walker statuses
ST_END = 0  # walked to the end of the data
ST_HOLE = 1  # just walked a hole record (at); go on from nxt
ST_LIMIT = 2  # the records array is full; go on from nxt
ST_SHORT_HEADER = 3  # fewer than REC_HDR bytes left at at
ST_SHORT_PAYLOAD = 4  # the record at at runs past the end
ST_FRAMING = 5  # the header at at is not a record header
ST_CRC = 6  # the record at at (ending at nxt) fails its CRC
ST_BAD_HOLE = 7  # a hole record of count 0 (ending at nxt)
ST_SEQ = 8  # the record at at has seq res[8], not expect


@njit(cache=True, nogil=True)
def _walk(data, pos, end, expect, rec_no, every, table, idx, recs, res):
    """Walk the records of ``data[pos:end]``, checking each one's framing, CRC and seq
    (``expect``; -1: any). Record number ``rec_no`` (within its segment) on: every
    ``every``-th goes into ``idx`` (seq, offset); with ``recs`` non-empty, each record's
    (offset, seq, kind, length) goes into it. Stops at the end or at the first thing to
    report; ``res``: status, at, nxt, expect, rec_no, records, messages, index rows, seq."""
    n_idx = 0
    n_rec = 0
    n_msg = 0
    cap = recs.shape[0]
    status = ST_END
    at = end
    nxt = end
    seq = -1
    while pos < end:
        if cap > 0 and n_rec == cap:
            status = ST_LIMIT
            at = pos
            nxt = pos
            break
        if end - pos < REC_HDR:
            status = ST_SHORT_HEADER
            at = pos
            break
        kind = data[pos + 2]
        ln = _rd(data, pos + 4, 4)
        ok = data[pos] == _MARK_LO and data[pos + 1] == _MARK_HI and data[pos + 3] == 0
        if kind == KIND_MESSAGE:
            ok = ok and 1 <= ln <= MAX_MESSAGE
        elif kind == KIND_HOLE:
            ok = ok and 8 <= ln <= 8 + MAX_WHY
        else:
            ok = False
        if not ok:
            status = ST_FRAMING
            at = pos
            break
        rend = pos + REC_HDR + ln
        if rend > end:
            status = ST_SHORT_PAYLOAD
            at = pos
            break
        seq = _rd(data, pos + 8, 8)
        c = _crc(table, 0, data, pos, pos + REC_CRC_OFF)
        c = _crc(table, c, data, pos + REC_HDR, rend)
        if c != _rd(data, pos + REC_CRC_OFF, 4):
            status = ST_CRC
            at = pos
            nxt = rend
            break
        span = 1
        if kind == KIND_HOLE:
            span = _rd(data, pos + REC_HDR, 8)
            if span < 1:
                status = ST_BAD_HOLE
                at = pos
                nxt = rend
                break
        if expect >= 0 and seq != expect:
            status = ST_SEQ
            at = pos
            nxt = pos
            break
        if rec_no % every == 0 and n_idx < idx.shape[0]:
            idx[n_idx, 0] = seq
            idx[n_idx, 1] = pos
            n_idx += 1
        if cap > 0:
            recs[n_rec, 0] = pos
            recs[n_rec, 1] = seq
            recs[n_rec, 2] = kind
            recs[n_rec, 3] = ln
        rec_no += 1
        n_rec += 1
        expect = seq + span
        if kind == KIND_HOLE:
            status = ST_HOLE
            at = pos
            nxt = rend
            pos = rend
            break
        n_msg += 1
        pos = rend
    if status == ST_END:
        at = pos
        nxt = pos
    res[0] = status
    res[1] = at
    res[2] = nxt
    res[3] = expect
    res[4] = rec_no
    res[5] = n_rec
    res[6] = n_msg
    res[7] = n_idx
    res[8] = seq


def _hole_at(raw: bytes, at: int) -> Hole:
    """The hole record at ``raw[at:]`` (whole and checked)."""
    ln = int.from_bytes(raw[at + 4 : at + 8], "little")
    seq = int.from_bytes(raw[at + 8 : at + 16], "little")
    count = HOLE_COUNT.unpack_from(raw, at + REC_HDR)[0]
    why = raw[at + REC_HDR + 8 : at + REC_HDR + ln].decode("utf-8", "replace")
    return Hole(seq, count, why)


def _framing_what(raw: bytes) -> str:
    mark, kind, flags, ln, _, _ = RECORD.unpack(raw[:REC_HDR])
    if mark != MARKER:
        return f"framing: no record marker (0x{mark:04x}, not 0x{MARKER:04x})"
    if kind not in (KIND_MESSAGE, KIND_HOLE):
        return f"framing: unknown record kind {kind}"
    if flags:
        return f"framing: record flags 0x{flags:02x}, not 0"
    return f"framing: record length {ln} is impossible for its kind ({kind})"


class _Scan:
    """Walk one segment file from ``pos`` in chunks read with ``pread`` (a file truncated
    meanwhile is no fault, as it would be with a map), yielding what it meets:
    ``("recs", raw, rows)`` (with ``collect``; offsets in rows are into ``raw``),
    ``("hole", offset, Hole)``, ``("error", offset, what)``, ``("torn", offset, what)``.
    Afterwards: ``end`` (after the last whole record), ``expect``, ``rec_no``,
    ``records``, ``messages``, ``index`` (the (seq, offset) rows it passed)."""

    def __init__(self, fd, size, pos, expect, rec_no, every, collect=False, chunk=_CHUNK):
        self.fd, self.size, self.end = fd, size, pos
        self.expect, self.rec_no, self.every = expect, rec_no, every
        self.records = self.messages = self.n_errors = 0
        self.collect, self.chunk = collect, max(chunk, 1 << 17)  # > the largest record
        self._index: list[np.ndarray] = []

    @property
    def index(self) -> np.ndarray:
        if not self._index:
            return np.zeros((0, 2), np.int64)
        return np.concatenate(self._index)

    def events(self) -> Iterator[tuple]:
        res = np.zeros(9, np.int64)
        recs = np.zeros((65536 if self.collect else 0, 4), np.int64)
        pos = self.end
        while pos < self.size:
            raw = os.pread(self.fd, min(self.chunk, self.size - pos), pos)
            if not raw:  # shrank under us
                self.size = pos
                break
            data = np.frombuffer(raw, np.uint8)
            eof = pos + len(raw) >= self.size
            idx = np.zeros((len(raw) // (REC_HDR + 1) // self.every + 2, 2), np.int64)
            p, advance = 0, -1
            while advance < 0:
                ex, no, every = self.expect, self.rec_no, self.every
                _walk(data, p, len(raw), ex, no, every, CRC_TABLE, idx, recs, res)
                st, at, nxt, n_idx = int(res[0]), int(res[1]), int(res[2]), int(res[7])
                self.expect, self.rec_no = int(res[3]), int(res[4])
                self.records += int(res[5])
                self.messages += int(res[6])
                if n_idx:
                    rows = idx[:n_idx].copy()
                    rows[:, 1] += pos
                    self._index.append(rows)
                if self.collect and res[5]:
                    yield ("recs", raw, recs[: res[5]])
                if st in (ST_END, ST_LIMIT, ST_HOLE):
                    self.end = pos + nxt
                    if st == ST_HOLE:
                        yield ("hole", pos + at, _hole_at(raw, at))
                    if st == ST_END:
                        advance = len(raw)
                    p = nxt
                    continue
                self.end = pos + at
                if st in (ST_SHORT_HEADER, ST_SHORT_PAYLOAD) and not eof:
                    advance = at  # the record goes on in the next chunk
                    continue
                if st == ST_SHORT_HEADER:
                    yield ("torn", pos + at, f"a record header cut short ({len(raw) - at} bytes)")
                    return
                if st == ST_SHORT_PAYLOAD:
                    ln = int.from_bytes(raw[at + 4 : at + 8], "little")
                    have = len(raw) - at - REC_HDR
                    yield ("torn", pos + at, f"a record cut short ({have} of {ln} payload bytes)")
                    return
                if st == ST_FRAMING:
                    if self._zeros_from(pos + at):
                        yield ("torn", pos + at, "zero bytes to the end")
                    else:
                        what = _framing_what(raw[at : at + REC_HDR])
                        yield ("error", pos + at, f"{what}; the rest of the file is unchecked")
                    return
                seq = int(res[8])
                if st == ST_CRC:
                    if pos + nxt >= self.size:
                        yield ("torn", pos + at, f"the last record (seq {seq}) fails its CRC")
                        return
                    yield ("error", pos + at, f"CRC mismatch (record seq {seq}, {nxt - at} bytes)")
                    self.expect, p = -1, nxt
                elif st == ST_BAD_HOLE:
                    yield ("error", pos + at, f"a hole of 0 messages at seq {seq}")
                    self.expect, p = -1, nxt
                else:  # ST_SEQ
                    want = self.expect
                    how = "already journaled" if seq < want else f"{seq - want} skipped, no hole"
                    yield ("error", pos + at, f"seq {seq} where {want} was expected ({how})")
                    self.expect, p = seq, at
                self.n_errors += 1
                if self.n_errors >= _MAX_ERRORS:
                    yield ("error", pos + p, f"more than {_MAX_ERRORS} errors: the rest unchecked")
                    return
            pos += advance

    def _zeros_from(self, pos: int) -> bool:
        while pos < self.size:
            raw = os.pread(self.fd, min(self.chunk, self.size - pos), pos)
            if not raw:
                break
            if raw.count(0) != len(raw):
                return False
            pos += len(raw)
        return True


def _segments(directory: Path) -> list[tuple[int, Path]]:
    """The segment files of ``directory``, oldest (lowest first seq) first."""
    out = []
    with contextlib.suppress(FileNotFoundError):
        for p in directory.iterdir():
            m = SEGMENT_NAME.match(p.name)
            if m:
                out.append((int(m.group(1)), p))
    return sorted(out)


def _read_index(path: Path, size: int) -> np.ndarray:
    """A segment's index rows (seq, offset) that are increasing and inside ``size``."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return np.zeros((0, 2), np.int64)
    rows = np.frombuffer(raw[: len(raw) // 16 * 16], "<u8").reshape(-1, 2).astype(np.int64)
    good = (rows[:, 1] >= HEADER_LEN) & (rows[:, 1] + REC_HDR <= size)
    if len(rows) > 1:
        inc = (np.diff(rows[:, 0]) > 0) & (np.diff(rows[:, 1]) > 0)
        good[1:] &= np.logical_and.accumulate(inc)
    n = len(rows) if good.all() else int(np.argmin(good))
    return rows[:n]


def _record_at(fd: int, offset: int, seq: int) -> bool:
    """Whether a plausible record header of ``seq`` starts at ``offset``."""
    raw = os.pread(fd, REC_HDR, offset)
    if len(raw) < REC_HDR:
        return False
    mark, kind, flags, ln, s, _ = RECORD.unpack(raw)
    return mark == MARKER and kind in (KIND_MESSAGE, KIND_HOLE) and not flags and s == seq


def _is_full(e: OSError) -> bool:
    return e.errno in _FULL_ERRNOS


def _write_all(fd: int, data) -> None:
    mv = memoryview(data)
    while len(mv):
        mv = mv[os.write(fd, mv) :]


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclasses.dataclass
class _Segment:
    first_seq: int
    path: Path
    fd: int
    ifd: int  # the index, or -1 once it stopped (a failed write)
    every: int
    size: int  # bytes of the segment file
    isize: int  # bytes of its index
    nrec: int = 0
    dirty: bool = False


# --- the writer ----------------------------------------------------------------------------
class Writer:
    """Append a channel's messages to the journal in ``directory`` (created if missing,
    continued if it holds this channel's and session's journal). Not thread-safe; one
    writer per directory (a lock file says so to a second one).

    ``append(seq, payload)`` and ``append_many(seqs, buf, offsets)`` take messages in
    sequence: ``seq`` must be the next one; a later one first records a hole ("gap") for
    what is missing; an earlier one is a ``SequenceError``. An empty journal starts at
    whatever sequence comes first. ``hole(first, count, why)`` records missing messages
    the caller knows of. ``tick()`` when idle (the interval sync, retention by age, the
    disk-full retry). ``stats()`` for metrics."""

    def __init__(
        self,
        directory: str | os.PathLike,
        channel: str,
        session: str | bytes,
        *,
        sync: str = "interval",
        sync_interval_s: float = 1.0,
        segment_bytes: int = 256 << 20,
        retain_bytes: int = 0,
        retain_age_s: float = 0.0,
        index_every: int = 4096,
        retry_s: float = 1.0,
        clock: Callable[[], float] = time.time,
    ):
        if sync not in SYNC_POLICIES:
            raise ValueError(f"sync: {sync!r} is not one of {', '.join(SYNC_POLICIES)}")
        if not (channel.isascii() and 1 <= len(channel) <= CHANNEL_LEN):
            raise ValueError(f"channel: {channel!r} must be 1-{CHANNEL_LEN} ASCII characters")
        if segment_bytes < HEADER_LEN + REC_HDR or index_every < 1:
            raise ValueError(f"segment_bytes {segment_bytes} or index_every {index_every}")
        if retain_bytes < 0 or retain_age_s < 0 or sync_interval_s < 0 or retry_s < 0:
            raise ValueError("retain_bytes, retain_age_s, sync_interval_s, retry_s: not negative")
        self.dir = Path(directory)
        self.channel = channel
        self.session = session if isinstance(session, bytes) else session_bytes(session)
        if len(self.session) != 10:
            raise ValueError(f"session: {session!r} is not a 10-byte MoldUDP64 session")
        self.sync, self.sync_interval_s = sync, sync_interval_s
        self.segment_bytes, self.index_every = segment_bytes, index_every
        self.retain_bytes, self.retain_age_s = retain_bytes, retain_age_s
        self.retry_s, self.clock = retry_s, clock
        # state
        self._closed: list[list] = []  # [first_seq, path, bytes] of the older segments
        self._cur: _Segment | None = None
        self._next: int | None = None  # the next sequence number expected
        self._disk_next: int | None = None  # the seq after the journal's last whole record
        self._pending: list[list] = []  # holes [first, count, why] not written yet
        self._buf = np.zeros(1 << 16, np.uint8)
        self.disk_full = False
        self._retry_at = 0.0
        self._last_sync = time.monotonic()
        self._last_age_check = float("-inf")
        self.recovered = 0  # bytes cut off a torn tail (or a torn new segment) on open
        self._n = dict(records=0, messages=0, bytes=0, syncs=0, errors=0, lost=0, deleted=0)
        self._holes: list[tuple[int, int, str]] = []
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock = os.open(self.dir / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock)
            self._lock = -1
            raise JournalError(f"{self.dir}: another writer has this journal open") from None
        try:
            self._open_existing()
            self.retain()
        except BaseException:
            self.close()
            raise

    # --- opening ---------------------------------------------------------------------------
    def _open_existing(self) -> None:
        segs = _segments(self.dir)
        while segs:
            first, path = segs[-1]
            raw = path.read_bytes()[:HEADER_LEN] if path.stat().st_size <= HEADER_LEN else None
            if raw is not None and (len(raw) < HEADER_LEN or raw.count(0) == len(raw)):
                # created, then a crash before its header was whole: it holds no record
                self.recovered += len(raw)
                log.warning("journal %s: %s has no whole header: removed", self.dir, path.name)
                path.unlink()
                path.with_suffix(INDEX_SUFFIX).unlink(missing_ok=True)
                segs.pop()
                continue
            break
        if not segs:
            return
        for first, path in segs[:-1]:
            self._closed.append([first, path, _disk_bytes(path)])
        first, path = segs[-1]
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CLOEXEC)
        try:
            self._recover(first, path, fd)
        except BaseException:
            os.close(fd)
            raise

    def _recover(self, first: int, path: Path, fd: int) -> None:
        size = os.fstat(fd).st_size
        try:
            h = unpack_header(os.pread(fd, HEADER_LEN, 0))
        except ValueError as e:
            raise JournalCorrupt(path, 0, str(e)) from None
        if h.first_seq != first:
            raise JournalCorrupt(path, 0, f"its header says first seq {h.first_seq}")
        if (h.channel, h.session) != (self.channel, self.session):
            raise JournalError(
                f"{path}: the journal of channel {h.channel} session "
                f"{h.session.decode('ascii', 'replace').rstrip()}, not channel {self.channel} "
                f"session {self.session.decode('ascii').rstrip()}: a journal holds one "
                "channel's one session"
            )
        # from the last index entry that points at its record
        ipath = path.with_suffix(INDEX_SUFFIX)
        rows = _read_index(ipath, size)
        j = len(rows) - 1
        while j >= 0 and not _record_at(fd, int(rows[j, 1]), int(rows[j, 0])):
            j -= 1
        if j >= 0:
            pos, expect, rec_no = int(rows[j, 1]), int(rows[j, 0]), j * h.index_every
        else:
            j, pos, expect, rec_no = 0, HEADER_LEN, first, 0
        scan = _Scan(fd, size, pos, expect, rec_no, h.index_every)
        torn = None
        for ev in scan.events():
            if ev[0] == "error":
                raise JournalCorrupt(path, ev[1], ev[2] + " (not the last record: corruption)")
            if ev[0] == "torn":
                torn = ev
        if torn is not None:
            cut = size - scan.end
            os.ftruncate(fd, scan.end)
            self.recovered += cut
            log.warning(
                "journal %s: %s: torn tail at offset %d (%s): cut %d bytes; appending after seq %d",
                self.dir,
                path.name,
                scan.end,
                torn[2],
                cut,
                scan.expect - 1,
            )
            size = scan.end
        index = np.concatenate([rows[:j], scan.index]).astype("<u8")
        ifd = -1
        try:
            ifd = os.open(ipath, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
            os.ftruncate(ifd, 0)
            _write_all(ifd, index.tobytes())
        except OSError as e:
            self._n["errors"] += 1
            log.warning("journal %s: %s: index not rewritten (%s)", self.dir, ipath.name, e)
            if ifd >= 0:
                with contextlib.suppress(OSError):
                    os.ftruncate(ifd, 0)
                os.close(ifd)
            ifd = -1
        self._cur = _Segment(
            first, path, fd, ifd, h.index_every, size, len(index) * 16 if ifd >= 0 else 0
        )
        self._cur.nrec = scan.rec_no
        self._next = self._disk_next = scan.expect

    # --- appending ---------------------------------------------------------------------------
    def append(self, seq: int, payload: bytes) -> None:
        """Journal one message (without its 2-byte length prefix) as ``seq``."""
        buf = np.frombuffer(payload, np.uint8)
        self.append_many(np.array([seq], np.int64), buf, np.array([0, len(buf)], np.int64))

    def append_many(self, seqs, buf, offsets, prefix: int = 0) -> None:
        """Journal messages ``buf[offsets[i] + prefix : offsets[i + 1]]`` as ``seqs[i]``
        (increasing; ``prefix``: bytes before each message to leave out, 2 for a buffer in
        ITCH file framing as ``moldudp64.index_messages`` indexes it). A gap within the
        batch or before it records a hole; a sequence number already journaled is a
        ``SequenceError`` and nothing of the batch is written."""
        if self._lock < 0:
            raise ValueError(f"journal {self.dir}: the writer is closed")
        seqs = np.asarray(seqs, np.int64)
        offsets = np.asarray(offsets, np.int64)
        if isinstance(buf, (bytes, bytearray, memoryview)):
            buf = np.frombuffer(buf, np.uint8)
        n = len(seqs)
        if len(offsets) != n + 1:
            raise ValueError(f"offsets: {len(offsets)} for {n} messages (needs n + 1)")
        if n == 0:
            self.tick()
            return
        lens = np.diff(offsets) - prefix
        if offsets[0] < 0 or offsets[-1] > len(buf) or lens.min() < 1 or lens.max() > MAX_MESSAGE:
            raise ValueError(f"offsets: a message outside buf or not 1..{MAX_MESSAGE} bytes long")
        if prefix < 0 or seqs[0] < 1:
            raise ValueError(f"seq {seqs[0]} or prefix {prefix}: seqs start at 1, prefix at 0")
        if n > 1 and np.diff(seqs).min() < 1:
            i = int(np.argmin(np.diff(seqs)))
            raise SequenceError(f"seqs: {seqs[i + 1]} after {seqs[i]}: not increasing")
        if self._next is not None and seqs[0] < self._next:
            raise SequenceError(
                f"seq {seqs[0]}: already journaled or passed (the next is {self._next})"
            )
        if seqs[-1] - seqs[0] == n - 1:
            self._run(seqs, buf, offsets, prefix)
        else:  # gaps within the batch: each run of consecutive numbers after its hole
            cuts = np.flatnonzero(np.diff(seqs) != 1) + 1
            for a, b in zip([0, *cuts], [*cuts, n], strict=True):
                self._run(seqs[a:b], buf, offsets[a : b + 1], prefix)
        self._after_write()

    def hole(self, first: int, count: int, why: str) -> None:
        """Record that ``first .. first + count - 1`` are missing (``why``: a few words)."""
        if self._lock < 0:
            raise ValueError(f"journal {self.dir}: the writer is closed")
        if count < 1 or first < 1:
            raise ValueError(f"hole: first {first} and count {count} must be at least 1")
        if self._next is not None and first < self._next:
            raise SequenceError(f"hole at {first}: already journaled or passed ({self._next})")
        self._gap_before(first)
        self._pending.append([first, count, why])
        self._next = first + count
        if not self.disk_full or time.monotonic() >= self._retry_at:
            self._put(np.zeros(0, np.int64), self._buf, np.zeros(1, np.int64), 0)
        self._after_write()

    def _gap_before(self, first: int) -> None:
        if self._next is not None and first > self._next:
            self._pending.append([self._next, first - self._next, "gap"])

    def _run(self, seqs, buf, offsets, prefix) -> None:
        first, n = int(seqs[0]), len(seqs)
        self._gap_before(first)
        self._next = first + n
        if self.disk_full and time.monotonic() < self._retry_at:
            self._lose(first, n)
            return
        self._put(seqs, buf, offsets, prefix)

    def _put(self, seqs, buf, offsets, prefix) -> None:
        """Write the pending holes, then the messages; what a full disk stops is lost."""
        holes = self._pending
        raw = b"".join(pack_record(KIND_HOLE, f, hole_payload(c, w)) for f, c, w in holes)
        n, nh = len(seqs), len(holes)
        size = len(raw) + int(offsets[-1] - offsets[0]) - n * prefix + n * REC_HDR
        if len(self._buf) < size:
            self._buf = np.zeros(max(size, 2 * len(self._buf)), np.uint8)
        out = self._buf
        out[: len(raw)] = np.frombuffer(raw, np.uint8)
        rec_off = np.empty(nh + n + 1, np.int64)
        rec_seq = np.empty(nh + n, np.int64)
        rec_next = np.empty(nh + n, np.int64)  # the seq after each record
        rec_off[0] = 0
        for i, (f, c, w) in enumerate(holes):
            rec_off[i + 1] = rec_off[i] + REC_HDR + len(hole_payload(c, w))
            rec_seq[i], rec_next[i] = f, f + c
        _build(seqs, buf, offsets, prefix, out, len(raw), rec_off[nh:], CRC_TABLE)
        rec_seq[nh:] = seqs
        rec_next[nh:] = seqs + 1
        done, err = self._write(out, rec_off, rec_seq, rec_next, nh)
        written = holes[: min(done, nh)]
        self._holes.extend((f, c, w) for f, c, w in written)
        self._pending = holes[len(written) :]
        kept = max(done - nh, 0)  # messages whole in the journal
        if kept < n:
            why = DISK_FULL if err is None or _is_full(err) else f"write error: {err.strerror}"
            self._lose(int(seqs[kept]), n - kept, why)
        if err is not None and not _is_full(err):
            raise err  # the books are straight: what it stopped is a pending hole
        if kept < n or done < nh:
            pass  # still full
        elif self.disk_full:
            self.disk_full = False
            log.warning(
                "journal %s: writing again; holes recorded: %s",
                self.dir,
                ", ".join(f"{f}..{f + c - 1} ({w})" for f, c, w in written) or "none",
            )

    def _lose(self, first: int, count: int, why: str = DISK_FULL) -> None:
        self._n["lost"] += count
        last = self._pending[-1] if self._pending else None
        if last is not None and last[2] == why and last[0] + last[1] == first:
            last[1] += count
        else:
            self._pending.append([first, count, why])

    def _write(self, data, rec_off, rec_seq, rec_next, nh) -> tuple[int, OSError | None]:
        """Write records ``0..n-1`` (``data[rec_off[i]:rec_off[i + 1]]``, holes before
        ``nh``, ``rec_next[i]`` the seq after record i), rolling segments; returns how many
        are whole in the journal (all, unless a write failed) and the error."""
        n, j = len(rec_seq), 0
        while j < n:
            cur = self._cur
            if cur is None:
                try:
                    cur = self._cur = self._create(int(rec_seq[j]))
                except OSError as e:
                    self._failed(e)
                    return j, e
            room = self.segment_bytes - cur.size
            k = min(int(np.searchsorted(rec_off, rec_off[j] + room, side="right")) - 1, n)
            if k <= j:
                if cur.nrec:
                    self._roll()
                    continue
                k = j + 1  # a record larger than a segment has one to itself
            a, b = int(rec_off[j]), int(rec_off[k])
            mv, done = memoryview(data[a:b]), 0
            try:
                while done < b - a:
                    done += os.write(cur.fd, mv[done:])
            except OSError as e:
                # keep the records that are whole, cut the one the error split
                whole = int(np.searchsorted(rec_off, a + done, side="right")) - 1
                os.ftruncate(cur.fd, cur.size + int(rec_off[whole]) - a)
                self._commit(cur, rec_off, rec_seq, rec_next, nh, j, whole)
                self._failed(e)
                return whole, e
            self._commit(cur, rec_off, rec_seq, rec_next, nh, j, k)
            j = k
            if cur.size >= self.segment_bytes:
                self._roll()
        return n, None

    def _commit(self, cur: _Segment, rec_off, rec_seq, rec_next, nh: int, j: int, k: int):
        """Records ``j..k-1`` are whole in ``cur``: index and count them."""
        if k <= j:
            return
        a, b = int(rec_off[j]), int(rec_off[k])
        self._index(cur, rec_off[j:k] - a + cur.size, rec_seq[j:k])
        cur.size += b - a
        cur.nrec += k - j
        cur.dirty = True
        self._n["records"] += k - j
        self._n["messages"] += k - max(j, nh) if k > nh else 0
        self._n["bytes"] += b - a
        self._disk_next = int(rec_next[k - 1])

    def _index(self, cur: _Segment, offs: np.ndarray, seqs: np.ndarray) -> None:
        if cur.ifd < 0:
            return
        t = np.arange((-cur.nrec) % cur.every, len(seqs), cur.every)
        if not len(t):
            return
        rows = np.empty((len(t), 2), "<u8")
        rows[:, 0], rows[:, 1] = seqs[t], offs[t]
        try:
            _write_all(cur.ifd, rows.tobytes())
            cur.isize += rows.nbytes
        except OSError as e:  # advisory: stop it here rather than leave a gap in it
            self._n["errors"] += 1
            with contextlib.suppress(OSError):
                os.ftruncate(cur.ifd, cur.isize)
            os.close(cur.ifd)
            cur.ifd = -1
            log.warning("journal %s: %s: index stopped (%s)", self.dir, cur.path.name, e)

    def _create(self, first: int) -> _Segment:
        path = self.dir / segment_name(first)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC
        fd = os.open(path, flags, 0o644)
        try:
            head = pack_header(first, self.channel, self.session, self.index_every, time.time_ns())
            _write_all(fd, head)
        except OSError:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        ipath = path.with_suffix(INDEX_SUFFIX)
        try:
            ifd = os.open(ipath, flags & ~os.O_EXCL | os.O_TRUNC, 0o644)
        except OSError as e:
            self._n["errors"] += 1
            log.warning("journal %s: %s: no index (%s)", self.dir, ipath.name, e)
            ifd = -1
        if self.sync != "none":
            try:
                _fsync_dir(self.dir)
            except OSError as e:
                self._n["errors"] += 1
                log.warning("journal %s: directory fsync failed (%s)", self.dir, e)
        return _Segment(first, path, fd, ifd, self.index_every, HEADER_LEN, 0)

    def _roll(self) -> None:
        """Close the segment being written (synced unless the policy is none)."""
        cur = self._cur
        if cur is None:
            return
        if self.sync != "none":
            self._sync()
        os.close(cur.fd)
        if cur.ifd >= 0:
            os.close(cur.ifd)
        self._closed.append([cur.first_seq, cur.path, cur.size + cur.isize])
        self._cur = None
        self.retain()

    def _failed(self, e: OSError) -> None:
        self._n["errors"] += 1
        if _is_full(e):
            self._full(e)
        else:
            log.error("journal %s: %s", self.dir, e)

    def _full(self, e: OSError) -> None:
        self._retry_at = time.monotonic() + self.retry_s
        if not self.disk_full:
            self.disk_full = True
            log.warning(
                "journal %s: disk full (%s): counting what is lost, retrying every %gs",
                self.dir,
                os.strerror(e.errno),
                self.retry_s,
            )

    # --- sync, retention, ticks --------------------------------------------------------------
    def _after_write(self) -> None:
        if self.sync == "every":
            self._sync()
        elif self.sync == "interval":
            if time.monotonic() - self._last_sync >= self.sync_interval_s:
                self._sync()
        if self.retain_bytes:
            self._retain_size()

    def _sync(self) -> None:
        cur = self._cur
        self._last_sync = time.monotonic()
        if cur is None or not cur.dirty:
            return
        try:
            os.fdatasync(cur.fd)
        except OSError as e:
            self._failed(e)
            if not _is_full(e):
                raise
            return  # the records stay whole; what follows waits for the retry
        cur.dirty = False
        self._n["syncs"] += 1

    def tick(self) -> None:
        """Call when idle: the interval sync, retention by age (at most once a second),
        and the disk-full retry (which writes the pending holes)."""
        now = time.monotonic()
        if self.disk_full and self._pending and now >= self._retry_at:
            self._put(np.zeros(0, np.int64), self._buf, np.zeros(1, np.int64), 0)
        if self.sync == "interval" and now - self._last_sync >= self.sync_interval_s:
            self._sync()
        if self.retain_age_s and now - self._last_age_check >= 1.0:
            self._last_age_check = now
            self.retain()

    def retain(self) -> list[Path]:
        """Delete the oldest segments past ``retain_bytes`` or ``retain_age_s`` (never the
        newest); returns the segment files deleted."""
        gone = self._retain_size()
        if self.retain_age_s:
            now = self.clock()
            while len(self._closed) > (0 if self._cur else 1):
                path = self._closed[0][1]
                try:
                    mtime = path.stat().st_mtime
                except FileNotFoundError:
                    mtime = float("-inf")
                if now - mtime <= self.retain_age_s:
                    break
                gone.append(self._delete_oldest())
        return gone

    def _retain_size(self) -> list[Path]:
        gone = []
        if not self.retain_bytes:
            return gone
        total = sum(s[2] for s in self._closed)
        total += self._cur.size + self._cur.isize if self._cur else 0
        while total > self.retain_bytes and len(self._closed) > (0 if self._cur else 1):
            total -= self._closed[0][2]
            gone.append(self._delete_oldest())
        return gone

    def _delete_oldest(self) -> Path:
        first, path, size = self._closed.pop(0)
        path.unlink(missing_ok=True)
        path.with_suffix(INDEX_SUFFIX).unlink(missing_ok=True)
        self._n["deleted"] += 1
        log.info("journal %s: retention deleted %s (%d bytes)", self.dir, path.name, size)
        return path

    # --- state -------------------------------------------------------------------------------
    @property
    def next_seq(self) -> int | None:
        """The sequence number the journal expects next (None: empty, any)."""
        return self._next

    def stats(self) -> dict:
        """Counters since open (records, messages, bytes, syncs, errors, lost, deleted),
        the journal now (segments, journal_bytes, first_seq, last_seq: of its last whole
        record, next_seq: the one append expects, lost or not), the holes written since
        open and those pending, disk_full, recovered."""
        segs = [s[0] for s in self._closed] + ([self._cur.first_seq] if self._cur else [])
        size = sum(s[2] for s in self._closed)
        size += self._cur.size + self._cur.isize if self._cur else 0
        return {
            **self._n,
            "segments": len(segs),
            "journal_bytes": size,
            "first_seq": segs[0] if segs else None,
            "last_seq": self._disk_next - 1 if self._disk_next is not None else None,
            "next_seq": self._next,
            "holes": list(self._holes),
            "pending_holes": [tuple(h) for h in self._pending],
            "disk_full": self.disk_full,
            "recovered": self.recovered,
        }

    def close(self) -> None:
        """Sync (unless the policy is none) and close; pending holes stay unwritten."""
        cur, self._cur = self._cur, None
        if cur is not None:
            with contextlib.suppress(OSError):
                if self.sync != "none" and cur.dirty:
                    os.fdatasync(cur.fd)
                    self._n["syncs"] += 1
            os.close(cur.fd)
            if cur.ifd >= 0:
                os.close(cur.ifd)
            self._closed.append([cur.first_seq, cur.path, cur.size + cur.isize])
        if self._lock >= 0:
            os.close(self._lock)
            self._lock = -1

    def __enter__(self) -> Writer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _disk_bytes(path: Path) -> int:
    size = path.stat().st_size
    with contextlib.suppress(FileNotFoundError):
        size += path.with_suffix(INDEX_SUFFIX).stat().st_size
    return size


# --- the reader ----------------------------------------------------------------------------
class Reader:
    """Read the journal in ``directory``, as it is when each segment is reached (a segment
    being written ends at its last whole record)."""

    def __init__(self, directory: str | os.PathLike):
        self.dir = Path(directory)
        if not self.dir.is_dir():
            raise JournalError(f"{self.dir}: no such journal directory")

    def segments(self) -> list[Path]:
        return [p for _, p in _segments(self.dir)]

    def records(self, from_seq: int | None = None) -> Iterator[tuple[int, bytes] | Hole]:
        """``(seq, payload)`` for each message and a ``Hole`` for each hole, in sequence,
        from ``from_seq`` (a hole that covers it comes whole) or the journal's start. A
        ``from_seq`` before the journal's first is a ``JournalError``; corruption is a
        ``JournalCorrupt``."""
        segs = _segments(self.dir)
        if not segs:
            return
        i = 0
        if from_seq is not None:
            i = bisect.bisect_right([f for f, _ in segs], from_seq) - 1
            if i < 0:
                raise JournalError(
                    f"{self.dir}: seq {from_seq} is not in the journal, which begins at "
                    f"{segs[0][0]} (retention removed what came before, or it began there)"
                )
        expect = None
        for k in range(i, len(segs)):
            first, path = segs[k]
            newest = k == len(segs) - 1
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                raise JournalError(f"{path}: removed (retention) before it was read") from None
            try:
                start = from_seq if k == i else None
                expect = yield from self._segment(fd, path, first, newest, expect, start)
            finally:
                os.close(fd)

    def _segment(self, fd, path, first, newest, expect, from_seq):
        size = os.fstat(fd).st_size
        raw = os.pread(fd, HEADER_LEN, 0)
        if newest and (len(raw) < HEADER_LEN or raw.count(0) == len(raw)):
            return expect  # being created
        try:
            h = unpack_header(raw)
        except ValueError as e:
            raise JournalCorrupt(path, 0, str(e)) from None
        if h.first_seq != first:
            raise JournalCorrupt(path, 0, f"its header says first seq {h.first_seq}")
        if expect is not None and first != expect:
            raise JournalCorrupt(
                path, 0, f"begins at seq {first}; the segment before ends at {expect - 1}"
            )
        pos, want = HEADER_LEN, first
        if from_seq is not None:
            rows = _read_index(path.with_suffix(INDEX_SUFFIX), size)
            j = int(np.searchsorted(rows[:, 0], from_seq, side="right")) - 1
            while j >= 0 and not _record_at(fd, int(rows[j, 1]), int(rows[j, 0])):
                j -= 1
            if j >= 0:
                pos, want = int(rows[j, 1]), int(rows[j, 0])
        skip = from_seq if from_seq is not None else -1
        scan = _Scan(fd, size, pos, want, 0, h.index_every, collect=True)
        for ev in scan.events():
            if ev[0] == "recs":
                raw = ev[1]
                for off, seq, kind, ln in ev[2].tolist():
                    if kind == KIND_MESSAGE:
                        if seq >= skip:
                            yield seq, raw[off + REC_HDR : off + REC_HDR + ln]
                    else:
                        count = HOLE_COUNT.unpack_from(raw, off + REC_HDR)[0]
                        if seq + count > skip:
                            why = raw[off + REC_HDR + 8 : off + REC_HDR + ln]
                            yield Hole(seq, count, why.decode("utf-8", "replace"))
            elif ev[0] == "error":
                raise JournalCorrupt(path, ev[1], ev[2])
            elif ev[0] == "torn" and not newest:
                raise JournalCorrupt(path, ev[1], f"torn, and not the newest segment: {ev[2]}")
        return scan.expect


# --- verify --------------------------------------------------------------------------------
def _collect(paths: Iterable[str | os.PathLike]) -> list[Path]:
    files: dict[Path, None] = {}
    for arg in paths:
        p = Path(arg)
        if p.is_dir():
            segs = _segments(p)
            if not segs:
                raise NotAJournal(f"{p}: no journal segments (*{SEGMENT_SUFFIX}) in it")
            files.update((s.resolve(), None) for _, s in segs)
        elif p.is_file():
            if p.suffix != SEGMENT_SUFFIX:
                raise NotAJournal(f"{p}: not a journal segment (*{SEGMENT_SUFFIX})")
            files[p.resolve()] = None
        else:
            raise NotAJournal(f"{p}: no such file or directory")
    if not files:
        raise NotAJournal("no journal files given")
    return list(files)


def verify_file(path: str | os.PathLike) -> dict:
    """One segment file: header, framing, CRCs and sequence continuity within it, and
    whether its index agrees (advisory: never an error)."""
    path = Path(path)
    rep: dict = {
        "path": str(path),
        "channel": None,
        "session": None,
        "first_seq": None,
        "last_seq": None,
        "next_seq": None,
        "records": 0,
        "messages": 0,
        "holes": [],
        "errors": [],
        "torn_tail": False,
        "torn_offset": None,
        "torn_bytes": 0,
        "index": None,
        "bytes": 0,
    }
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = rep["bytes"] = os.fstat(fd).st_size
        raw = os.pread(fd, HEADER_LEN, 0)
        if len(raw) < HEADER_LEN or (size == HEADER_LEN and raw.count(0) == len(raw)):
            rep.update(torn_tail=True, torn_offset=0, torn_bytes=size)
            rep["torn_what"] = "no whole file header (a segment being created)"
            return rep
        try:
            h = unpack_header(raw)
        except ValueError as e:
            rep["errors"].append({"offset": 0, "error": str(e)})
            return rep
        rep.update(
            channel=h.channel,
            session=h.session.decode("ascii", "replace").rstrip(),
            first_seq=h.first_seq,
        )
        m = SEGMENT_NAME.match(path.name)
        if m and int(m.group(1)) != h.first_seq:
            rep["errors"].append(
                {"offset": 0, "error": f"named for seq {int(m.group(1))}, begins at {h.first_seq}"}
            )
        scan = _Scan(fd, size, HEADER_LEN, h.first_seq, 0, h.index_every)
        for ev in scan.events():
            if ev[0] == "hole":
                hole = ev[2]
                rep["holes"].append({"first": hole.first, "count": hole.count, "why": hole.why})
            elif ev[0] == "error":
                rep["errors"].append({"offset": ev[1], "error": ev[2]})
            elif ev[0] == "torn":
                rep.update(torn_tail=True, torn_offset=ev[1], torn_bytes=size - ev[1])
                rep["torn_what"] = ev[2]
        rep.update(records=scan.records, messages=scan.messages)
        if scan.records and scan.expect >= 0:
            rep.update(next_seq=scan.expect, last_seq=scan.expect - 1)
        elif not scan.records:
            rep["next_seq"] = h.first_seq
        ipath = path.with_suffix(INDEX_SUFFIX)
        if not ipath.exists():
            rep["index"] = "missing"
        else:
            rows = np.fromfile(ipath, "<u8")
            rows = rows[: len(rows) // 2 * 2].reshape(-1, 2).astype(np.int64)
            want = scan.index
            ok = len(rows) <= len(want) and np.array_equal(rows, want[: len(rows)])
            rep["index"] = "ok" if ok and len(rows) == len(want) else ("short" if ok else "stale")
    finally:
        os.close(fd)
    return rep


def verify(paths: Iterable[str | os.PathLike]) -> dict:
    """Check the segment files (or every segment of the journal directories) in ``paths``:
    each one's framing, CRCs and continuity, and continuity from segment to segment of the
    same channel and session. ``clean``: no errors and no torn tail (holes are reported,
    and are not corruption). ``NotAJournal`` for bad arguments."""
    files = [verify_file(p) for p in _collect(paths)]
    groups: dict[tuple, list[dict]] = {}
    for f in files:
        if f["first_seq"] is not None:
            groups.setdefault((f["channel"], f["session"]), []).append(f)
    for group in groups.values():
        group.sort(key=lambda f: f["first_seq"])
        for prev, f in zip(group, group[1:], strict=False):
            want = prev["next_seq"]
            if want is not None and f["first_seq"] != want:
                how = (
                    f"seq {want}..{f['first_seq'] - 1} missing (a segment removed?)"
                    if f["first_seq"] > want
                    else f"overlaps {Path(prev['path']).name}"
                )
                f["errors"].insert(
                    0,
                    {
                        "offset": 0,
                        "error": f"begins at seq {f['first_seq']} after "
                        f"{Path(prev['path']).name}, which ends before {want}: {how}",
                    },
                )
    firsts = [f["first_seq"] for f in files if f["first_seq"] is not None]
    lasts = [f["last_seq"] for f in files if f["last_seq"] is not None]
    summary = {
        "files": len(files),
        "records": sum(f["records"] for f in files),
        "messages": sum(f["messages"] for f in files),
        "holes": sum(len(f["holes"]) for f in files),
        "hole_messages": sum(h["count"] for f in files for h in f["holes"]),
        "errors": sum(len(f["errors"]) for f in files),
        "corrupt_files": sum(1 for f in files if f["errors"]),
        "torn_tails": sum(1 for f in files if f["torn_tail"]),
        "first_seq": min(firsts) if firsts else None,
        "last_seq": max(lasts) if lasts else None,
    }
    clean = not summary["errors"] and not summary["torn_tails"]
    return {"clean": clean, "files": files, "summary": summary}


def verify_text(report: dict) -> str:
    """One line per file, then a summary line."""
    lines = []
    for f in report["files"]:
        span = f"seq {f['first_seq']}..{f['last_seq']}" if f["last_seq"] is not None else "empty"
        nh = len(f["holes"])
        holes = f", {nh} hole{'s' if nh != 1 else ''}" if nh else ""
        head = f"{f['path']}: {span}, {f['records']} records ({f['messages']} messages{holes})"
        if f["errors"]:
            e = f["errors"][0]
            more = f" (+{len(f['errors']) - 1} more)" if len(f["errors"]) > 1 else ""
            lines.append(f"{head}: CORRUPT at offset {e['offset']}: {e['error']}{more}")
        elif f["torn_tail"]:
            lines.append(
                f"{head}: TORN TAIL at offset {f['torn_offset']}: {f['torn_bytes']} bytes, "
                f"{f['torn_what']} (the writer cuts it on open)"
            )
        else:
            idx = "" if f["index"] == "ok" else f" (index {f['index']}: advisory, rebuilt on open)"
            lines.append(f"{head}: OK{idx}")
        for h in f["holes"]:
            lines.append(f"  hole: seq {h['first']}..{h['first'] + h['count'] - 1} ({h['why']})")
    s = report["summary"]
    span = f"seq {s['first_seq']}..{s['last_seq']}" if s["last_seq"] is not None else "no records"
    verdict = "clean" if report["clean"] else "NOT CLEAN"
    if s["errors"]:
        verdict += f": {s['errors']} errors in {s['corrupt_files']} files"
    if s["torn_tails"]:
        verdict += f"{',' if s['errors'] else ':'} {s['torn_tails']} torn tails"
    lines.append(
        f"{s['files']} files, {span}, {s['records']} records, {s['holes']} holes "
        f"({s['hole_messages']} messages missing, not corruption): {verdict}"
    )
    return "\n".join(lines)


# --- configuration and measurement ---------------------------------------------------------
def writer_options(jcfg) -> dict:
    """``Writer`` keyword arguments from a ``config.JournalConfig``."""
    return {
        "sync": jcfg.sync,
        "sync_interval_s": jcfg.sync_interval_s,
        "segment_bytes": jcfg.segment_mb << 20,
        "retain_bytes": int(jcfg.retain_gb * (1 << 30)),
        "retain_age_s": jcfg.retain_days * 86400.0,
    }


def session_messages(buf: np.ndarray) -> np.ndarray:
    """``offsets`` of every message of a buffer in ITCH file framing (2-byte lengths), for
    ``append_many(..., prefix=2)``; ``ValueError`` if the last one is cut short."""
    offsets = np.zeros(len(buf) // BLOCK_LEN_LEN + 1, np.int64)
    n, bad = index_messages(buf, offsets)
    if bad >= 0:
        raise ValueError(f"message {n} at offset {bad} runs past the end")
    return offsets[: n + 1]


def bench(
    session: np.ndarray, directory: str | os.PathLike, batch: int = 4096, sync: str = "none"
) -> dict:
    """Append a session (a buffer in ITCH file framing) to a new journal in ``directory``
    in batches of ``batch``; the rate of ``append_many`` (numba compiled beforehand)."""
    offsets = session_messages(session)
    n = len(offsets) - 1
    seqs = np.arange(1, n + 1, dtype=np.int64)
    one, out = np.array([0, 1], np.int64), np.zeros(64, np.uint8)
    _build(seqs[:1], out, one, 0, out, 0, np.zeros(2, np.int64), CRC_TABLE)  # compiled first
    with Writer(directory, "bench", "BENCH", sync=sync) as w:
        t0 = time.perf_counter()
        for a in range(0, n, batch):
            b = min(a + batch, n)
            w.append_many(seqs[a:b], session, offsets[a : b + 1], prefix=BLOCK_LEN_LEN)
        w.close()
        dt = time.perf_counter() - t0
        st = w.stats()
    return {
        "messages": n,
        "seconds": dt,
        "msgs_per_s": n / dt if dt else 0.0,
        "bytes": st["bytes"],
        "mb_per_s": st["bytes"] / dt / 1e6 if dt else 0.0,
        "segments": st["segments"],
        "syncs": st["syncs"],
    }
