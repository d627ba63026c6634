"""Local clients of a channel: a snapshot consistent with a position of the event ring, then
every event after it, with no gap and no duplicate (``Subscriber``).

How a client joins (``Subscriber.snapshot``): it asks the consumer for a level snapshot
(``dataplane.shm``: the consumer answers between packets, at a message boundary, and tags the
answer with the last sequence it includes and the event ring's position right after it). It
loads the levels and the stock directory of the symbols it follows into its own copy, and
reads the ring from that position on: the first event it reads is the first change after the
snapshot. A reader that falls more than the ring's length behind is lapped: ``poll`` raises
``events.Lapped`` (and counts it in ``lapped``); the copy is then not whole and the client
must snapshot again -- nothing is ever skipped silently.

Two faces over the same ring:

- numba: ``events.poll(ring, hdr, cursor, out)`` copies ready events into a preallocated
  ``events.EVENT`` array and returns how many (or ``events.LAPPED``); a strategy that is
  itself a numba loop calls it with ``Subscriber.arrays()`` and reads the records' fields.
- Python: ``poll()`` returns the records (a numpy array, also applied to the client's own
  levels), and iterating a ``Subscriber`` yields ``Event`` tuples with tickers resolved.

The client's own copy (``depth``, ``bbo``, ``rows``, ``digest``) is kept by numba code for
the symbols it follows (all when none are given): a strategy asks for depth without a
snapshot round trip. ``digest()`` uses ``tickwire book``'s definition, so a client that
followed a whole session can prove it saw every change.

The BBO table (``shm.Reader.bbo``) stays the cheapest read of the latest best prices.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
from numba import njit

from dataplane import book as bk
from dataplane import events as ev
from dataplane import shm

# --- the client's copy of the levels (numba) --------------------------------------------------
# an open-addressing hash (linear probing, backward-shift deletion) keyed by
# ((locate * 2 + side) << 32 | price) + 1; 0 is an empty slot
NEED_GROW = 1
D_COUNT = 0
# client state (int64)
S_LAST_SEQ = 0  # sequence of the last event applied
S_EOS = 1  # the end of session was announced (its next sequence)
S_STALE = 2  # 1 once the channel announced its books are stale
S_EVENTS = 3  # events applied
S_DROPPED = 4  # events read for symbols not followed
STATE_LEN = 8


@njit(cache=True, nogil=True, inline="always")
def _key(locate, side, price):
    return ((np.int64(locate) * 2 + side) << 32 | np.int64(price)) + 1


@njit(cache=True, nogil=True, inline="always")
def _home(key, mask):
    return np.int64((np.uint64(key) * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(40)) & mask


@njit(cache=True, nogil=True)
def depth_set(keys, vals, meta, key, shares, orders):
    """Set (shares > 0) or remove (shares == 0) one level. Returns NEED_GROW (nothing done)
    when an insert would fill the table past half."""
    mask = keys.shape[0] - 1
    i = _home(key, mask)
    while keys[i] != 0 and keys[i] != key:
        i = (i + 1) & mask
    if shares > 0:
        if keys[i] == 0:
            if 2 * (meta[D_COUNT] + 1) > keys.shape[0]:
                return NEED_GROW
            keys[i] = key
            meta[D_COUNT] += 1
        vals[i, 0] = shares
        vals[i, 1] = orders
        return 0
    if keys[i] == 0:
        return 0
    # backward-shift deletion: pull later entries of the run into the hole
    meta[D_COUNT] -= 1
    j = i
    while True:
        j = (j + 1) & mask
        if keys[j] == 0:
            break
        h = _home(keys[j], mask)
        # the entry at j may move to i when its home is not in (i, j] cyclically
        if (j > i and (h <= i or h > j)) or (j < i and (h <= i and h > j)):
            keys[i] = keys[j]
            vals[i, 0] = vals[j, 0]
            vals[i, 1] = vals[j, 1]
            i = j
    keys[i] = 0
    return 0


@njit(cache=True, nogil=True)
def depth_get(keys, vals, key):
    mask = keys.shape[0] - 1
    i = _home(key, mask)
    while keys[i] != 0:
        if keys[i] == key:
            return vals[i, 0], vals[i, 1]
        i = (i + 1) & mask
    return 0, 0


@njit(cache=True, nogil=True)
def apply_events(out, start, n, follow, wanted, keys, vals, meta, bbo, stocks, state):
    """Apply ``out[start:n]`` to the client's copy. Returns ``(k, status)``: the events
    applied up to ``k``, and NEED_GROW when event ``k`` needs a bigger table."""
    for k in range(start, n):
        e = out[k]
        kind = e.kind
        loc = np.int64(e.locate)
        if kind == ev.CHANNEL:
            if e.code == ev.CH_END_OF_SESSION:
                state[S_EOS] = e.value
            elif e.code == ev.CH_BOOKS_STALE or e.code == ev.CH_GAP_UNRECOVERABLE:
                state[S_STALE] = 1
        elif kind == ev.INSTRUMENT and e.code == 82:  # R: the stock directory
            sym = np.uint64(e.value)
            stocks[loc].symbol = sym
            stocks[loc].named = 1
            if wanted.shape[0] > 0:
                j = np.searchsorted(wanted, sym)
                if j < wanted.shape[0] and wanted[j] == sym:
                    follow[loc] = 1
        elif follow[loc] == 0:
            state[S_DROPPED] += 1
        elif kind == ev.LEVEL:
            if depth_set(keys, vals, meta, _key(loc, e.side, e.price), e.value, e.n) != 0:
                return k, NEED_GROW
        elif kind == ev.BBO:
            bbo[loc, e.side, 0] = e.price
            bbo[loc, e.side, 1] = e.value
        elif kind == ev.INSTRUMENT:
            if e.code == 72:  # H
                stocks[loc].state = e.n
            elif e.code == 89:  # Y
                stocks[loc].regsho = e.n
        state[S_LAST_SEQ] = e.seq
        state[S_EVENTS] += 1
    return n, 0


@njit(cache=True, nogil=True)
def _load_rows(rows, follow, keys, vals, meta, bbo):
    """Load snapshot rows (locate, side, price, shares, orders; digest order) of the followed
    locates; the best level of each side is its last bid / first ask row."""
    for r in range(rows.shape[0]):
        loc = rows[r, 0]
        if follow[loc] == 0:
            continue
        if depth_set(keys, vals, meta, _key(loc, rows[r, 1], rows[r, 2]), rows[r, 3], rows[r, 4]):
            return r
        side = rows[r, 1]
        first_ask = side == 1 and (r == 0 or rows[r - 1, 0] != loc or rows[r - 1, 1] != 1)
        if side == 0 or first_ask:
            bbo[loc, side, 0] = rows[r, 2]
            bbo[loc, side, 1] = rows[r, 3]
    return rows.shape[0]


@njit(cache=True, nogil=True)
def _export(keys, vals, out):
    r = 0
    for i in range(keys.shape[0]):
        k = keys[i]
        if k != 0:
            k -= 1
            sd = k >> 32
            out[r, 0] = sd >> 1
            out[r, 1] = sd & 1
            out[r, 2] = k & 0xFFFFFFFF
            out[r, 3] = vals[i, 0]
            out[r, 4] = vals[i, 1]
            r += 1
    return r


def digest_of(rows: np.ndarray) -> str:
    """``tickwire book``'s digest of level rows (locate, side, price, shares, ...), any order."""
    rows = np.asarray(rows, np.int64)
    if len(rows):
        rows = rows[np.lexsort((rows[:, 2], rows[:, 1], rows[:, 0]))]
    buf = np.zeros(max(1, 64 * len(rows)), np.uint8)
    n = bk.digest_text(rows, buf)
    return hashlib.sha256(buf[:n].tobytes()).hexdigest()


def pack_symbol(text: str) -> int:
    """A ticker as the book stores it (8 ASCII bytes, space padded, big-endian)."""
    raw = text.upper().encode("ascii")
    if not 1 <= len(raw) <= 8:
        raise ValueError(f"symbol {text!r}: 1-8 ASCII characters")
    return int.from_bytes(raw.ljust(8, b" "), "big")


# --- Python face -------------------------------------------------------------------------------
class Event(NamedTuple):
    """One event, decoded (``kind`` by name, ``side`` "B"/"S"/None -- a channel event's
    line, "A"/"B", for line events -- ``symbol`` resolved)."""

    kind: str
    seq: int
    itch_ns: int
    locate: int
    symbol: str
    side: str | None
    price: int
    n: int
    value: int
    code: str
    flags: int
    rx_ns: int
    apply_ns: int
    pub_ns: int

    def as_dict(self) -> dict:
        """Named fields as each kind means them (see ``dataplane.events``)."""
        d: dict = {"kind": self.kind, "seq": self.seq}
        if self.kind != "channel":
            d.update(itch_ns=self.itch_ns, locate=self.locate, symbol=self.symbol)
        if self.kind == "level":
            d.update(side=self.side, price=self.price, shares=self.value, orders=self.n)
        elif self.kind == "bbo":
            d.update(side=self.side, price=self.price, shares=self.value)
        elif self.kind == "trade":
            d.update(type=self.code, side=self.side, price=self.price, shares=self.value)
            if self.flags & ev.F_NON_PRINTABLE:
                d["printable"] = False
        elif self.kind == "instrument":
            if self.code == "R":
                d.update(type="directory")
            else:
                d.update(type="trading_action" if self.code == "H" else "reg_sho")
                d["state"] = chr(self.n) if self.n else ""
        elif self.kind == "channel":
            d["event"] = self.code
            if self.code.startswith("line_"):
                d["line"] = self.side
            elif self.code.startswith("gap_"):
                d.update(first=self.value, count=self.n)
            elif self.code == "end_of_session":
                d["next_seq"] = self.value
            elif self.code == "system":
                d["code"] = chr(self.n) if self.n else ""
        else:  # per-order events
            d.update(ref=self.value, side=self.side, price=self.price, shares=self.n)
            if self.flags & ev.F_REPLACE:
                d["replace"] = True
        d["stamps_ns"] = {"rx": self.rx_ns, "apply": self.apply_ns, "publish": self.pub_ns}
        return d


def decode_event(e, symbol_of) -> Event:
    """An ``EVENT`` record (ring or wire) as an ``Event``; ``symbol_of(locate)`` names a
    locate (a ``Subscriber``'s or a feed client's stock directory)."""
    kind = int(e["kind"])
    side, code, loc = int(e["side"]), int(e["code"]), int(e["locate"])
    code_s = ev.CHANNEL_NAMES.get(code, str(code)) if kind == ev.CHANNEL else chr(code) * bool(code)
    symbol = symbol_of(loc) if kind != ev.CHANNEL else ""
    if kind == ev.INSTRUMENT and code == 82:
        symbol = ev.symbol_text(int(e["value"]))
    rx = int(e["rx_ns"])
    apply_ns = rx + int(e["apply_dt"]) if rx else 0
    return Event(
        ev.KIND_NAMES.get(kind, str(kind)),
        int(e["seq"]),
        int(e["itch_ns"]),
        loc,
        symbol,
        ("AB" if kind == ev.CHANNEL else "BS")[side] if side in (0, 1) else None,
        int(e["price"]),
        int(e["n"]),
        int(e["value"]),
        code_s,
        int(e["flags"]),
        rx,
        apply_ns,
        (apply_ns + int(e["pub_dt"])) if apply_ns else 0,
    )


class Snapshot(NamedTuple):
    rows: np.ndarray  # (locate, side, price, shares, orders) of the followed locates
    stocks: np.ndarray  # bk.STOCK per locate
    seq: int  # the last sequence it includes
    pos: int  # the event ring's position right after it
    eos: int  # the end of session's next sequence when the snapshot is past it, else 0
    lines: dict  # {"A": "up" | "stale" | "down" | "unknown", "B": ...} as announced then
    stale: bool  # the books were stale then


LINE_NAMES = {ev.LINE_UP: "up", ev.LINE_STALE: "stale", ev.LINE_DOWN: "down"}


def _state(word: int) -> tuple[dict, bool]:
    lines = {k: LINE_NAMES.get((word >> (8 * i)) & 0xFF, "unknown") for i, k in enumerate("AB")}
    return lines, bool(word >> 16 & 1)


@contextlib.contextmanager
def snapshot_lock(channel: str, root: Path | None = None):
    """One snapshot request at a time per channel (the answer area is shared)."""
    with open(shm.channel_dir(channel, root) / "snapshot.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def request_snapshot(m: dict, channel: str, root: Path | None, timeout: float) -> Snapshot:
    """Ask the consumer for a snapshot and copy the answer (rows of every locate)."""
    ctl = m["control"]
    with snapshot_lock(channel, root):
        want = int(ctl[shm.C_SNAP_REQ]) + 1
        ctl[shm.C_SNAP_REQ] = want
        deadline = time.monotonic() + timeout
        while int(ctl[shm.C_SNAP_DONE]) < want:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{channel}: the consumer did not answer the snapshot request")
            time.sleep(0.0005)
        if int(ctl[shm.C_SNAP_TRUNC]):
            raise OverflowError(f"more than {shm.LEVELS_CAP} levels: snapshot truncated")
        rows = np.array(m["levels"][: int(ctl[shm.C_SNAP_ROWS])])
        stocks = np.array(m["stocks"])
        return Snapshot(
            rows,
            stocks,
            int(ctl[shm.C_SNAP_SEQ]),
            int(ctl[shm.C_SNAP_POS]),
            int(ctl[shm.C_SNAP_EOS]),
            *_state(int(ctl[shm.C_SNAP_STATE])),
        )


class Subscriber:
    """Follow ``channel``'s books from another process. ``symbols``: tickers (or locates) to
    follow; None follows every stock."""

    def __init__(
        self,
        channel: str = "totalview",
        symbols=None,
        root: Path | None = None,
        batch: int = 4096,
        depth_capacity: int = 1 << 16,
    ):
        self.channel = channel
        self.root = root
        self.m = shm.attach(channel, root)
        self.ring = ev.Ring.attach(channel, root)
        if not int(self.ring.hdr[ev.H_ON]):
            raise RuntimeError(f"{channel}: the event ring is off (run.events = false)")
        self._created = int(self.ring.hdr[ev.H_CREATED_NS])
        try:  # the cursor lives in this reader's registry entry (metrics read it)
            self.reg, self._reg_path = ev.register_reader(channel, root)
        except OSError:  # a read-only view of the channel: no entry, same reading
            self.reg, self._reg_path = np.zeros(ev.READER_LEN, np.int64), None
        self.reg[ev.R_CREATED_NS] = self._created
        self.cursor = self.reg[ev.R_POS : ev.R_POS + 1]
        self.out = np.zeros(batch, ev.EVENT)
        self.follow = np.zeros(bk.N_LOCATES, np.uint8)
        self.stocks = np.zeros(bk.N_LOCATES, bk.STOCK)
        self.bbo_table = np.zeros((bk.N_LOCATES, 2, 2), np.int64)
        self.state = np.zeros(STATE_LEN, np.int64)
        self.lapped = 0  # times this client was lapped (each one needs a new snapshot)
        self.snapshots = 0
        self._cap0 = max(1024, 1 << (depth_capacity - 1).bit_length())
        self._clear_depth()
        self._set_follow(symbols)
        self.joined = False
        self.lines = {"A": "unknown", "B": "unknown"}  # as the channel last announced
        self._warm()

    def _warm(self) -> None:
        """Compile (or load from numba's cache) the reading code now, not while the ring
        moves on under a client that has just taken its snapshot."""
        cur = np.array([int(self.ring.hdr[ev.H_WRITE])], np.int64)
        ev.poll(self.ring.ring, self.ring.hdr, cur, self.out[:0])
        keys, vals, meta = np.zeros(8, np.int64), np.zeros((8, 2), np.int64), np.zeros(2, np.int64)
        no = np.zeros((0, 5), np.int64)
        _load_rows(no, self.follow, keys, vals, meta, np.zeros_like(self.bbo_table[:1]))
        apply_events(
            self.out,
            0,
            0,
            self.follow,
            self.wanted,
            keys,
            vals,
            meta,
            self.bbo_table,
            self.stocks,
            np.zeros(STATE_LEN, np.int64),
        )
        _export(keys, vals, np.zeros((0, 5), np.int64))
        ev.read_ns(self.ring.hdr, self.ring.clk, np.zeros(2, np.int64))

    # --- symbols ---
    def _set_follow(self, symbols) -> None:
        self.follow[:] = 0 if symbols else 1
        wanted, locates = [], []
        for s in symbols or ():
            if isinstance(s, (int, np.integer)) or (isinstance(s, str) and s.isdigit()):
                locates.append(int(s))
            else:
                wanted.append(pack_symbol(s))
        self.wanted = np.array(sorted(set(wanted)), np.uint64)
        for loc in locates:
            if not 0 <= loc < bk.N_LOCATES:
                raise ValueError(f"locate {loc} is outside 0..{bk.N_LOCATES - 1}")
            self.follow[loc] = 1
        self._resolve()

    def _resolve(self) -> None:
        """Follow the locates of the wanted tickers the directory names already."""
        if len(self.wanted):
            named = self.stocks["named"] != 0
            hit = np.isin(self.stocks["symbol"], self.wanted) & named
            self.follow[hit] = 1

    def locate(self, symbol) -> int:
        """The locate of a ticker (from the stock directory seen so far)."""
        if isinstance(symbol, (int, np.integer)):
            return int(symbol)
        key = pack_symbol(symbol)
        hit = np.nonzero((self.stocks["symbol"] == np.uint64(key)) & (self.stocks["named"] != 0))
        if not len(hit[0]):
            raise KeyError(f"{symbol}: not in the stock directory")
        return int(hit[0][0])

    def symbol(self, locate: int) -> str:
        st = self.stocks[locate]
        return bk._symbol(int(st["symbol"])) if st["named"] else ""

    # --- joining ---
    def _clear_depth(self, cap: int | None = None) -> None:
        cap = cap or self._cap0
        self.keys = np.zeros(cap, np.int64)
        self.vals = np.zeros((cap, 2), np.int64)
        self.meta = np.zeros(2, np.int64)

    def _grow(self) -> None:
        keys, vals = self.keys, self.vals
        self._clear_depth(2 * len(keys))
        for i in np.nonzero(keys)[0]:
            depth_set(self.keys, self.vals, self.meta, keys[i], vals[i, 0], vals[i, 1])

    def snapshot(self, symbols=None, timeout: float = 5.0) -> Snapshot:
        """Load a snapshot of the followed symbols (``symbols`` replaces them) and continue
        from the ring position it is tagged with."""
        if symbols is not None:
            self.stocks[:] = 0
            self._set_follow(symbols)
        self._check_ring()
        snap = request_snapshot(self.m, self.channel, self.root, timeout)
        self.stocks[:] = snap.stocks
        self._resolve()
        self._clear_depth(max(self._cap0, 1 << (2 * len(snap.rows) + 1).bit_length()))
        self.bbo_table[:] = 0
        while _load_rows(
            snap.rows, self.follow, self.keys, self.vals, self.meta, self.bbo_table
        ) < len(snap.rows):
            self._grow()
        self.state[:] = 0
        self.state[S_LAST_SEQ] = snap.seq
        self.state[S_EOS] = snap.eos
        self.state[S_STALE] = int(snap.stale)
        self.lines = dict(snap.lines)
        self.cursor[0] = snap.pos
        self.snapshots += 1
        self.reg[ev.R_SNAPSHOTS] = self.snapshots
        self.joined = True
        return snap._replace(rows=snap.rows[self.follow[snap.rows[:, 0]] != 0])

    def join_live(self) -> int:
        """Follow from now on without a snapshot (the copy then holds only what changes)."""
        self._check_ring()
        self.cursor[0] = int(self.ring.hdr[ev.H_WRITE])
        self.joined = True
        return int(self.cursor[0])

    def close(self) -> None:
        """Leave the readers' registry (also done when the object goes away)."""
        if self._reg_path is not None:
            self._reg_path.unlink(missing_ok=True)
            self._reg_path = None

    def __del__(self):
        with contextlib.suppress(Exception):
            self.close()

    def __enter__(self) -> Subscriber:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_ring(self) -> None:
        if int(self.ring.hdr[ev.H_CREATED_NS]) != self._created:
            self.ring = ev.Ring.attach(self.channel, self.root)
            self._created = int(self.ring.hdr[ev.H_CREATED_NS])
            self.close()
            try:
                self.reg, self._reg_path = ev.register_reader(self.channel, self.root)
            except OSError:
                self.reg, self._reg_path = np.zeros(ev.READER_LEN, np.int64), None
            self.reg[ev.R_CREATED_NS] = self._created
            self.cursor = self.reg[ev.R_POS : ev.R_POS + 1]
            if self.joined:
                self.joined = False
                raise ev.Lapped(
                    f"{self.channel}: the consumer restarted (a new event ring): snapshot again"
                )

    # --- reading ---
    def poll(self) -> np.ndarray:
        """The events ready since the last poll (up to ``batch``), applied to the client's
        copy; an empty array when none are. Raises ``events.Lapped`` when lapped."""
        if not self.joined:
            raise RuntimeError("snapshot() or join_live() first")
        self._check_ring()
        n = ev.poll(self.ring.ring, self.ring.hdr, self.cursor, self.out)
        if n == ev.LAPPED:
            self.lapped += 1
            self.reg[ev.R_LAPPED] = self.lapped
            self.joined = False
            raise ev.Lapped(
                f"{self.channel}: lapped at event {int(self.cursor[0])} (the ring holds "
                f"{len(self.ring.ring)}): snapshot again"
            )
        k = 0
        while True:
            k, st = apply_events(
                self.out,
                k,
                n,
                self.follow,
                self.wanted,
                self.keys,
                self.vals,
                self.meta,
                self.bbo_table,
                self.stocks,
                self.state,
            )
            if st != NEED_GROW:
                break
            self._grow()
        got = self.out[:n]
        if n and (got["kind"] == ev.CHANNEL).any():
            for e in got[got["kind"] == ev.CHANNEL]:
                if ev.CH_LINE_UP <= e["code"] <= ev.CH_LINE_DOWN and e["side"] < 2:
                    self.lines["AB"[e["side"]]] = LINE_NAMES[int(e["code"])]
        return got

    def decode(self, e) -> Event:
        return decode_event(e, self.symbol)

    def events(self, idle: float = 0.0005, until=None):
        """Yield ``Event``s of the followed symbols (and every channel event) as they come;
        stops when ``until()`` is true while idle."""
        while True:
            got = self.poll()
            for e in got:
                k = int(e["kind"])
                if k == ev.CHANNEL or self.follow[int(e["locate"])]:
                    yield self.decode(e)
            if not len(got):
                if until is not None and until():
                    return
                time.sleep(idle)

    __iter__ = events

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(ring, hdr, cursor)`` for ``events.poll`` in a numba loop (it advances the
        cursor; the client's own copy is then not kept)."""
        return self.ring.ring, self.ring.hdr, self.cursor

    def now_ns(self) -> int:
        """Now on the ring's clock (for publish-to-read latency)."""
        return int(ev.read_ns(self.ring.hdr, self.ring.clk, np.zeros(2, np.int64)))

    # --- the client's copy ---
    @property
    def last_seq(self) -> int:
        return int(self.state[S_LAST_SEQ])

    @property
    def ended(self) -> bool:
        """The channel announced the end of session."""
        return bool(self.state[S_EOS])

    @property
    def stale(self) -> bool:
        return bool(self.state[S_STALE])

    def rows(self) -> np.ndarray:
        """Every level of the followed symbols: (locate, side, price, shares, orders), in
        digest order."""
        out = np.zeros((int(self.meta[D_COUNT]), 5), np.int64)
        _export(self.keys, self.vals, out)
        return out[np.lexsort((out[:, 2], out[:, 1], out[:, 0]))]

    def depth(self, symbol, side: str = "B", levels: int = 10) -> list[tuple[int, int, int]]:
        """The best ``levels`` of one side: (price, shares, orders), best first."""
        loc = self.locate(symbol)
        s = 0 if side.upper() in ("B", "BID", "BUY") else 1
        rows = self.rows()
        rows = rows[(rows[:, 0] == loc) & (rows[:, 1] == s)]
        rows = rows[::-1] if s == 0 else rows
        return [(int(r[2]), int(r[3]), int(r[4])) for r in rows[:levels]]

    def bbo(self, symbol) -> tuple[int, int, int, int]:
        """``(bid_px, bid_qty, ask_px, ask_qty)`` from the client's copy."""
        b = self.bbo_table[self.locate(symbol)]
        return int(b[0, 0]), int(b[0, 1]), int(b[1, 0]), int(b[1, 1])

    def digest(self) -> str:
        return digest_of(self.rows())
