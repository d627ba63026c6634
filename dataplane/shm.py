"""Shared memory between the consumer and everyone else, under ``/dev/shm/tickwire/``.

One directory per channel (``/dev/shm/tickwire/<channel>/``) holds flat files mapped by
both sides; the consumer is the only writer of all but ``control``:

- ``counters`` (int64, ``COUNTERS_LEN``): per line ``L_*`` at ``line * LINE_STRIDE``, the
  sequencer's ``A_*``, the consumer's ``S_*``, and the book's counter array (decoder and
  book anomalies, ``dataplane.itch`` / ``dataplane.book``) at ``BOOK_BASE``.
- ``bbo`` (``BBO`` per locate, 65,536): best bid/ask price and shares under a seqlock --
  ``seq`` is odd while the consumer writes; a reader copies the record and retries until
  it saw the same even ``seq`` before and after.
- ``latency`` (int64 histogram, ``LAT_BUCKETS``): receive-to-book nanoseconds per packet,
  log-linear buckets (8 per power of two).
- ``control`` (int64): requests from other processes: stop, level snapshots.
- ``levels`` (int64 rows ``locate, side, price, shares, orders``) and ``stocks`` (the
  book's ``STOCK`` per locate: symbol, trading state, Reg SHO): the snapshot answer, taken
  at a message boundary and tagged (``C_SNAP_SEQ``, ``C_SNAP_POS``) with the last sequence
  it includes and the event ring's position right after it.
- ``events`` and ``events.hdr``: the event ring (``dataplane.events``).

``Reader`` is the documented way in for other processes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
from numba import njit

from dataplane import book as bk

SHM_ROOT = Path(os.environ.get("TICKWIRE_SHM", "/dev/shm/tickwire"))

# --- counters -------------------------------------------------------------------------------
LINE_STRIDE = 16
L_PACKETS = 0  # packets received on the line (any kind)
L_BYTES = 1  # their UDP payload bytes
L_MESSAGES = 2  # messages carried by data packets
L_DUPLICATES = 3  # messages already taken from either line (dropped before the book)
L_MALFORMED = 4  # packets dropped: short, blocks inconsistent with count and length
L_LAST_SEQ = 5  # the last sequence number seen on the line (end of its last packet)
L_HEARTBEATS = 6
L_END = 7  # end-of-session packets
L_OTHER_SESSION = 8  # packets of another MoldUDP64 session (dropped)
L_FIRST_TAKEN = 9  # messages this line delivered first (taken into the book)
L_RX_NS = 10  # receive time of the line's last packet
L_HELD = 11  # packets held because they arrived ahead of the next sequence
L_LATE = 12  # held packets that were no longer needed when their turn came
N_LINES = 3  # A, B, and the recovery path (answers from the re-request server)
LINE_RECOVERY = 2

A_BASE = N_LINES * LINE_STRIDE
A_NEXT = A_BASE + 0  # next sequence expected
A_TAKEN = A_BASE + 1  # messages taken into the book, each sequence once
A_UNRECOVERABLE_MSGS = A_BASE + 2  # sequences given up by recovery and skipped (never taken)
A_GAPS_DECLARED = A_BASE + 3  # gaps declared (handed to recovery)
A_END_SEQ = A_BASE + 4  # next sequence announced by end of session (0 until seen)
A_PACKETS = A_BASE + 5  # packets that contributed messages
A_HELD_NOW = A_BASE + 6  # packets held right now
A_HELD_MAX = A_BASE + 7
A_HOLD_OVERFLOW = A_BASE + 8  # packets not held for want of a slot (recovered later)
A_ANNOUNCED = A_BASE + 9  # highest next-sequence any packet or heartbeat announced
A_HOLE_SINCE = A_BASE + 10  # when the current hole at A_NEXT was first seen (0: none)
A_DECLARED_TO = A_BASE + 11  # below this: declared as gaps, held or taken (a hole here is declared)
A_GAP_DECLARED_MSGS = A_BASE + 12  # messages in declared gaps
A_UNRECOVERABLE_GAPS = A_BASE + 13  # unrecoverable ranges applied (of A_UNRECOVERABLE_MSGS)

S_BASE = A_BASE + 16
S_RUNNING = S_BASE + 0  # 1 while the consumer loop runs
S_ALIVE_NS = S_BASE + 1  # CLOCK_MONOTONIC of the consumer's last housekeeping
S_LOOPS = S_BASE + 2
S_RX_BATCHES = S_BASE + 3
S_PID = S_BASE + 4
S_CPU = S_BASE + 5
S_MODE = S_BASE + 6  # 1 AF_XDP, 2 kernel sockets
S_RING_FULL = S_BASE + 7  # fill ring had no room (frames held back)
S_WAKEUPS = S_BASE + 8
S_START_NS = S_BASE + 9  # how long the consumer loop took to come up (compile or cache load)
S_START_HOW = S_BASE + 10  # 1: compiled now (cold numba cache), 2: loaded from the cache
S_DIED = S_BASE + 11  # its wait status + 1 when it died with no report (the supervisor's)
S_BEGIN = S_BASE + 12  # how its books began: a BEGIN_* state (host.appliance.restart)
S_JOIN_TRIES = S_BASE + 13  # snapshot service logins tried (the late join's attempts)
S_BEGIN_SEQ = S_BASE + 14  # the last sequence in the books it began with (0: empty)
# S_BEGIN: how the consumer's books began (0: not decided yet, the consumer is starting)
BEGIN_EMPTY = 1  # empty, from the session's first message
BEGIN_RESTORED = 2  # the newest snapshot and the journal past it (a restart)
BEGIN_JOINING = 3  # logging in to the snapshot service / taking its spin, or retrying
BEGIN_JOINED = 4  # the snapshot service's spin (a late join)
BEGIN_JOIN_FAILED = 5  # the snapshot service failed every try: the rest is asked for again
BEGIN_NAMES = {
    0: "starting",
    BEGIN_EMPTY: "empty",
    BEGIN_RESTORED: "restored",
    BEGIN_JOINING: "joining",
    BEGIN_JOINED: "joined",
    BEGIN_JOIN_FAILED: "join failed",
}
START_COMPILED = 1
START_CACHED = 2

BOOK_BASE = S_BASE + 16
COUNTERS_LEN = BOOK_BASE + 320
MODE_XDP = 1
MODE_SOCKET = 2

# --- BBO ----------------------------------------------------------------------------------
BBO = np.dtype(
    [
        ("seq", np.uint64),
        ("bid_px", np.uint32),
        ("ask_px", np.uint32),
        ("bid_qty", np.int64),
        ("ask_qty", np.int64),
        ("feed_seq", np.int64),
        ("update_ns", np.int64),
        ("_pad", np.int64, 2),
    ],
    align=True,
)  # 64 bytes: one cache line per instrument
assert BBO.itemsize == 64

# --- latency histogram -------------------------------------------------------------------
LAT_SUB = 8
LAT_BUCKETS = 64 * LAT_SUB

# --- control -------------------------------------------------------------------------------
C_STOP = 0
C_SNAP_REQ = 1  # a reader bumps this to ask for a level snapshot
C_SNAP_DONE = 2  # the consumer sets it to the request number it answered
C_SNAP_ROWS = 3
C_SNAP_TRUNC = 4  # 1 when the book had more levels than the snapshot area holds
# the two recovery rings (single producer, single consumer; a side only ever writes its
# own index, after the record it publishes):
#   gaps (consumer -> recovery): GAP_SLOTS rows (first seq, count, detected ns, reserved);
#     the consumer writes C_GAP_HEAD, the recovery client C_GAP_TAIL.
#   recov (recovery -> consumer): REC_SLOTS packet slots of REC_SLOT_BYTES plus rows in
#     recov_meta (kind, length, first seq, count); the recovery client writes C_REC_HEAD,
#     the consumer C_REC_TAIL. kind REC_DATA: a MoldUDP64 packet answered by the server;
#     kind REC_LOST: sequences first..first+count-1 are declared unrecoverable.
C_GAP_HEAD = 5
C_GAP_TAIL = 6
C_REC_HEAD = 7
C_REC_TAIL = 8
C_POLICY = 9  # what the consumer does with an unrecoverable gap: POLICY_STALE or POLICY_HALT
C_STALE = 10  # 1 once a gap was declared unrecoverable: the books are not whole
C_HALTED = 11  # 1 when the consumer stopped because of the halt policy
C_WINDOW_NS = 12  # arbitration window: a hole older than this is declared a gap
C_WINDOW_MSGS = 13  # ... or one with this many messages held behind it
C_LINE_STATE = 14  # + line (0 A, 1 B): the line's health as the control plane sees it
#   (dataplane.events LINE_*; 0 not known yet); the consumer announces changes on the ring
C_SNAP_POS = 16  # the event ring's position right after the snapshot's book state
C_SNAP_SEQ = 17  # the last sequence the snapshot's book state includes
C_SNAP_EOS = 18  # the end of session's next sequence when the snapshot is past it, else 0
C_SNAP_STATE = 19  # the channel state announced on the ring by then: line A's state (bits
#   0-7), line B's (8-15), books stale (bit 16)
C_BOOKSNAP_REQ = 20  # a requester bumps this to ask for a book snapshot (host.appliance.snapshot)
C_BOOKSNAP_DONE = 21  # the consumer sets it to the request number it answered
CONTROL_LEN = 32
GAP_SLOTS = 1024
REC_SLOTS = 4096
REC_SLOT_BYTES = 2048
REC_DATA = 0
REC_LOST = 1
POLICY_STALE = 0
POLICY_HALT = 1
LEVELS_CAP = 1 << 20

REGIONS = {
    "counters": (np.int64, (COUNTERS_LEN,)),
    "bbo": (BBO, (bk.N_LOCATES,)),
    "latency": (np.int64, (LAT_BUCKETS,)),
    "control": (np.int64, (CONTROL_LEN,)),
    "levels": (np.int64, (LEVELS_CAP, 5)),
    "stocks": (bk.STOCK, (bk.N_LOCATES,)),
    "gaps": (np.int64, (GAP_SLOTS, 4)),
    "recov": (np.uint8, (REC_SLOTS, REC_SLOT_BYTES)),
    "recov_meta": (np.int64, (REC_SLOTS, 4)),
    # the recovery client's mirror of its counters and latency histogram (host.appliance.recovery)
    "recovery": (np.int64, (64 + LAT_BUCKETS,)),
}


def channel_dir(channel: str, root: Path | None = None) -> Path:
    return (root or SHM_ROOT) / channel


def write_json(path: Path, obj) -> None:
    """A small JSON file beside a channel's regions (its state for other processes),
    written under a temporary name and renamed: whole or absent, never half."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def read_json(path: Path):
    """What ``write_json`` wrote (None: nothing there, or not JSON)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def books_stale(counters: np.ndarray, control: np.ndarray) -> bool:
    """The books are not whole: a gap was unrecoverable (or the consumer died), or the
    consumer is still joining by the snapshot service."""
    return bool(control[C_STALE]) or int(counters[S_BEGIN]) == BEGIN_JOINING


def make_channel_dir(channel: str, root: Path | None = None) -> Path:
    """The channel's directory, created when missing. The shared root belongs to the user
    the appliance runs as (Ansible's tickwire role makes it the service user's): a channel
    directory root creates first (``tickwire calibrate`` from an operator's shell) is handed
    to that user, or the service could not create its regions in it."""
    d = channel_dir(channel, root)
    d.mkdir(parents=True, exist_ok=True)
    owner = d.parent.stat()
    if os.geteuid() == 0 and owner.st_uid != 0 and d.stat().st_uid == 0:
        os.chown(d, owner.st_uid, owner.st_gid)
    return d


def create(channel: str, root: Path | None = None) -> dict[str, np.ndarray]:
    """Create (or reset) a channel's regions; returns writable maps by name."""
    d = make_channel_dir(channel, root)
    out = {}
    for name, (dtype, shape) in REGIONS.items():
        out[name] = np.memmap(d / name, dtype=dtype, mode="w+", shape=shape).view(np.ndarray)
    return out


def attach(channel: str, root: Path | None = None, writable_control: bool = True) -> dict:
    d = channel_dir(channel, root)
    # the directory alone is not a consumer: `tickwire calibrate` may have left clock.json
    if not (d / "counters").exists():
        raise FileNotFoundError(f"no consumer shared memory at {d} (is tickwire run running?)")
    out = {}
    for name, (dtype, shape) in REGIONS.items():
        writable = name in ("control", "gaps", "recov", "recov_meta", "recovery")
        mode = "r+" if (writable and writable_control) else "r"
        try:
            out[name] = np.memmap(d / name, dtype=dtype, mode=mode, shape=shape).view(np.ndarray)
        except (FileNotFoundError, ValueError) as e:
            raise FileNotFoundError(f"{d / name}: missing or the wrong size ({e})") from None
    return out


def remove(channel: str, root: Path | None = None) -> None:
    d = channel_dir(channel, root)
    shutil.rmtree(d / "readers", ignore_errors=True)  # the event ring's readers' registry
    ring = d / "events"  # the event ring, or a link to it in hugetlbfs
    if ring.is_symlink():
        Path(os.readlink(ring)).unlink(missing_ok=True)
    for name in (*REGIONS, "final.json", "error.txt", "events", "events.hdr", "snapshot.lock"):
        try:
            (d / name).unlink()
        except FileNotFoundError:
            pass
    try:
        d.rmdir()
    except OSError:
        pass


def alive(pid: int) -> bool:
    """Whether process ``pid`` exists (a consumer killed outright leaves S_RUNNING set)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def died_how(status: int) -> str:
    """A wait status in words: "killed by signal 9 (SIGKILL)", "exit status 3"."""
    import signal

    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = "unknown"
        return f"killed by signal {sig} ({name})"
    return f"exit status {os.WEXITSTATUS(status)}"


@njit(cache=True, nogil=True, inline="always", _nrt=False)
def lat_bucket(ns):
    """Histogram bucket of ``ns`` nanoseconds: exact below ``LAT_SUB``, then ``LAT_SUB``
    buckets per power of two (``bucket_low`` is each one's smallest value). The one
    definition of the buckets: jitted code inlines it; Python calls ``lat_bucket.py_func``,
    the same body uncompiled (the compiled one costs its caller 0.1-0.2 s on first use)."""
    if ns < LAT_SUB:
        return max(ns, 0)
    e = 0
    x = ns
    while x > 1:  # e = floor(log2(ns))
        x >>= 1
        e += 1
    return (e - 2) * LAT_SUB + ((ns >> (e - 3)) & (LAT_SUB - 1))


def bucket_low(i: int) -> int:
    """Smallest nanosecond value of bucket ``i``."""
    if i < LAT_SUB:
        return i
    e = i // LAT_SUB + 2
    return (1 << e) | ((i % LAT_SUB) << (e - 3))


def percentiles(hist: np.ndarray, qs=(50, 99, 99.9)) -> dict[str, float | None]:
    """Percentiles (ns, bucket lower bounds: accurate to 1/8 of the value) of a histogram."""
    total = int(hist.sum())
    out: dict[str, float | None] = {}
    cum = np.cumsum(hist)
    for q in qs:
        key = f"p{q:g}"
        if total == 0:
            out[key] = None
            continue
        i = int(np.searchsorted(cum, total * q / 100.0, side="left"))
        out[key] = float(bucket_low(min(i, LAT_BUCKETS - 1)))
    out["count"] = total
    return out


# --- the recovery client's side of the rings (Python; the consumer's side is numba) ---------
def gap_pop(m: dict) -> tuple[int, int, int] | None:
    """The next gap the consumer declared, ``(first, count, detected_ns)``, or None."""
    ctl = m["control"]
    tail = int(ctl[C_GAP_TAIL])
    if tail == int(ctl[C_GAP_HEAD]):
        return None
    row = m["gaps"][tail % GAP_SLOTS]
    out = (int(row[0]), int(row[1]), int(row[2]))
    ctl[C_GAP_TAIL] = tail + 1
    return out


def rec_push(m: dict, kind: int, first: int, count: int, packet: bytes = b"") -> bool:
    """Hand the consumer an answer packet (``REC_DATA``) or an unrecoverable range
    (``REC_LOST``); False when the ring is full (try again later)."""
    ctl = m["control"]
    head = int(ctl[C_REC_HEAD])
    if head - int(ctl[C_REC_TAIL]) >= REC_SLOTS:
        return False
    if len(packet) > REC_SLOT_BYTES:
        raise ValueError(f"packet of {len(packet)} bytes exceeds a recovery slot")
    i = head % REC_SLOTS
    m["recov"][i, : len(packet)] = np.frombuffer(packet, np.uint8)
    m["recov_meta"][i] = (kind, len(packet), first, count)
    ctl[C_REC_HEAD] = head + 1  # published last: x86 keeps the stores in order
    return True


class Reader:
    """Read a running consumer's books, BBOs and counters from another process."""

    def __init__(self, channel: str, root: Path | None = None, maps: dict | None = None):
        """Attach to ``channel``'s regions (or read ``maps`` the caller already holds)."""
        self.channel = channel
        self.m = maps if maps is not None else attach(channel, root)

    def counters(self) -> dict:
        c = np.array(self.m["counters"])  # one copy: a consistent-enough view for metrics
        lines = {}
        names = {
            "packets": L_PACKETS,
            "bytes": L_BYTES,
            "messages": L_MESSAGES,
            "duplicates": L_DUPLICATES,
            "malformed": L_MALFORMED,
            "last_seq": L_LAST_SEQ,
            "heartbeats": L_HEARTBEATS,
            "end_of_session": L_END,
            "other_session": L_OTHER_SESSION,
            "first": L_FIRST_TAKEN,
        }
        names.update(held=L_HELD, late=L_LATE, rx_ns=L_RX_NS)
        for k, letter in enumerate(("A", "B", "recovery")):
            lines[letter] = {n: int(c[k * LINE_STRIDE + i]) for n, i in names.items()}
        book_c = c[BOOK_BASE:]
        from dataplane import itch

        return {
            "lines": lines,
            "next_seq": int(c[A_NEXT]),
            "taken": int(c[A_TAKEN]),
            "end_seq": int(c[A_END_SEQ]),
            "running": bool(c[S_RUNNING]) and not c[S_DIED] and alive(int(c[S_PID])),
            "died": died_how(int(c[S_DIED]) - 1) if c[S_DIED] else None,
            "gaps_declared": int(c[A_GAPS_DECLARED]),
            "gap_declared_messages": int(c[A_GAP_DECLARED_MSGS]),
            "unrecoverable_gaps": int(c[A_UNRECOVERABLE_GAPS]),
            "unrecoverable_messages": int(c[A_UNRECOVERABLE_MSGS]),
            "held_now": int(c[A_HELD_NOW]),
            "held_max": int(c[A_HELD_MAX]),
            "hold_overflow": int(c[A_HOLD_OVERFLOW]),
            "stale": books_stale(c, self.m["control"]),
            "began": BEGIN_NAMES.get(int(c[S_BEGIN]), "starting"),
            "began_seq": int(c[S_BEGIN_SEQ]),
            "join_tries": int(c[S_JOIN_TRIES]),
            "halted": bool(self.m["control"][C_HALTED]),
            "mode": {MODE_XDP: "xdp", MODE_SOCKET: "socket"}.get(int(c[S_MODE]), "none"),
            "pid": int(c[S_PID]),
            "cpu": int(c[S_CPU]),
            "start": {
                "seconds": int(c[S_START_NS]) / 1e9,
                "how": {START_COMPILED: "compiled", START_CACHED: "cache"}.get(
                    int(c[S_START_HOW]), "starting"
                ),
            },
            "book": {
                "messages": int(book_c[itch.C_MESSAGES]),
                "unknown_type": int(book_c[itch.C_UNKNOWN_TYPE]),
                "bad_length": int(book_c[itch.C_BAD_LENGTH]),
                **{name: int(book_c[i]) for name, i in bk.ANOMALIES.items()},
                "growths": int(book_c[bk.B_GROWTHS]),
            },
        }

    def bbo(self, locate: int, tries: int = 1000) -> tuple[int, int, int, int]:
        """``(bid_px, bid_qty, ask_px, ask_qty)`` of one locate, torn reads retried."""
        rec = self.m["bbo"]
        for _ in range(tries):
            s1 = int(rec[locate]["seq"])
            if s1 & 1:
                continue
            r = rec[locate].copy()
            if int(rec[locate]["seq"]) == s1:
                return int(r["bid_px"]), int(r["bid_qty"]), int(r["ask_px"]), int(r["ask_qty"])
        raise TimeoutError(f"locate {locate}: BBO kept changing under the reader")

    def latency(self) -> dict:
        return percentiles(np.array(self.m["latency"]))

    def levels(self, timeout: float = 5.0) -> np.ndarray:
        """A consistent snapshot of every level (``locate, side, price, shares, orders``),
        taken by the consumer between packets."""
        ctl = self.m["control"]
        want = int(ctl[C_SNAP_REQ]) + 1
        ctl[C_SNAP_REQ] = want
        deadline = time.monotonic() + timeout
        while int(ctl[C_SNAP_DONE]) < want:
            if time.monotonic() > deadline:
                raise TimeoutError("the consumer did not answer the snapshot request")
            time.sleep(0.001)
        if int(ctl[C_SNAP_TRUNC]):
            raise OverflowError(f"more than {LEVELS_CAP} levels: snapshot truncated")
        return np.array(self.m["levels"][: int(ctl[C_SNAP_ROWS])])

    def digest(self, timeout: float = 5.0) -> str:
        rows = self.levels(timeout)
        buf = np.zeros(max(1, 48 * len(rows)), np.uint8)
        n = bk.digest_text(rows, buf)
        return hashlib.sha256(buf[:n].tobytes()).hexdigest()

    def stop(self) -> None:
        self.m["control"][C_STOP] = 1
