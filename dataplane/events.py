"""The event ring: every book change of a channel, in feed order, for any number of readers.

One single-producer broadcast ring per channel in shared memory
(``/dev/shm/tickwire/<channel>/events`` and ``events.hdr``), built like Mantra's seqlocked
queues. ``slots`` (a power of two) fixed-size ``EVENT`` records of 64 bytes (one cache
line). Event number ``pos`` (0, 1, 2, ... since the ring was created) lives in slot
``pos & (slots - 1)``; its lap is ``pos >> log2(slots)``. Every slot carries a ``version``:
the producer writes ``2 * lap + 1`` before it touches the record and ``2 * lap + 2`` once
the record is whole. A reader expecting event ``pos`` reads the version:

- ``2 * lap + 2``: ready. It copies the record, then reads the version again; unchanged
  means the copy is whole;
- lower: not written yet (the reader is at the head: poll again later);
- higher, or changed during the copy: the producer has lapped the reader -- the event it
  wanted is gone. That is an error the reader reports (``Lapped``), never a silent skip.

Readers never write to the ring or its header, so no reader can slow the producer or
another reader. The producer publishes without a lock, an allocation or a system call.

What is published, one event per change, each with the MoldUDP64 sequence number of the
message that caused it and that message's ITCH timestamp (``kind``, then the fields it
uses; ``side`` 0 is bid/buy, 1 ask/sell):

=================  ===========================================================================
``LEVEL``          a price level changed: ``locate, side, price``, ``n`` its order count,
                   ``value`` its aggregate shares (0 and 0: the level is gone)
``BBO``            the best level of one side changed: ``locate, side, price``, ``value``
                   its shares (0 and 0: the side is empty); ``n`` is 0 (the level's order
                   count is in the ``LEVEL`` event when the change was at the top, and
                   reading it otherwise costs the producer a dependent load per change)
``TRADE``          ``code`` the ITCH type (``E`` execution, ``C`` execution with price, ``P``
                   non-cross trade, ``Q`` cross): ``locate, price``, ``value`` shares,
                   ``side`` the resting order's side where known (``E``, ``C``, ``P``), else
                   ``NO_SIDE``; ``flags`` ``F_NON_PRINTABLE`` for a ``C`` marked ``N``
``INSTRUMENT``     ``code`` ``R`` (stock directory: ``value`` the symbol, 8 ASCII bytes
                   little-endian as in ``symbol_text``), ``H`` (trading action: ``n`` the
                   state byte ``H P Q T``), ``Y`` (Reg SHO: ``n`` the action byte)
``CHANNEL``        ``code`` one of ``CH_*``: line up, stale, down (``side`` the line, 0 A, 1
                   B), gap declared, filled or unrecoverable (``value`` its first sequence,
                   ``n`` its message count), books stale, end of session (``value`` the
                   next sequence it announced), system event (``n`` the ITCH event code);
                   ``seq`` is the last sequence applied when it was published
``ORDER_*``        only with per-order events on (``H_ORDER_EVENTS``): ``ORDER_ADD``
                   (``value`` reference, ``locate, side, price``, ``n`` shares),
                   ``ORDER_EXEC`` (``n`` shares executed, ``price`` the resting price),
                   ``ORDER_CANCEL`` (``n`` shares cancelled), ``ORDER_DELETE``; a replace
                   is ``ORDER_DELETE`` of the old reference then ``ORDER_ADD`` of the new
                   one, both with ``F_REPLACE``
=================  ===========================================================================

Per-stage stamps on every event, one clock (``dataplane.clock``; the header says which):
``rx_ns`` the packet's receive stamp (the XDP program's, or the kernel's software receive
stamp on the socket path), ``apply_ns = rx_ns + apply_dt`` when the book had applied the
packet, ``pub_ns = apply_ns + pub_dt`` when its events were published. Events are published
a packet at a time: the records are written as the messages apply, and the versions that
make them visible are stored together once the packet is done, so the stamps cost two clock
reads per packet, not per message. The deltas are unsigned 32-bit nanoseconds (a packet
held longer than 4.29 s saturates).
"""

from __future__ import annotations

import contextlib
import mmap
import os
import shutil
import time
from pathlib import Path

import numpy as np
from numba import njit, types
from numba.extending import intrinsic

from dataplane import book as bk
from dataplane import clock, itch, shm
from dataplane.itch import (
    HEADER_LEN,
    T_A,
    T_C,
    T_D,
    T_E,
    T_F,
    T_H,
    T_P,
    T_Q,
    T_R,
    T_S,
    T_U,
    T_X,
    T_Y,
    TRUNCATED,
    count_frame,
    frame,
    rd_u16,
    rd_u32,
    rd_u48,
    rd_u64,
)
from dataplane.itch import OK as ITCH_OK

EVENT = np.dtype(
    [
        ("version", np.uint64),
        ("seq", np.int64),
        ("itch_ns", np.int64),
        ("rx_ns", np.int64),
        ("apply_dt", np.uint32),
        ("pub_dt", np.uint32),
        ("locate", np.uint16),
        ("kind", np.uint8),
        ("side", np.uint8),
        ("code", np.uint8),
        ("flags", np.uint8),
        ("_pad", np.uint16),
        ("price", np.uint32),
        ("n", np.uint32),
        ("value", np.int64),
    ],
    align=True,
)
assert EVENT.itemsize == 64

# kinds
LEVEL = 1
BBO = 2
TRADE = 3
INSTRUMENT = 4
CHANNEL = 5
ORDER_ADD = 6
ORDER_EXEC = 7
ORDER_CANCEL = 8
ORDER_DELETE = 9
KIND_NAMES = {
    LEVEL: "level",
    BBO: "bbo",
    TRADE: "trade",
    INSTRUMENT: "instrument",
    CHANNEL: "channel",
    ORDER_ADD: "order_add",
    ORDER_EXEC: "order_exec",
    ORDER_CANCEL: "order_cancel",
    ORDER_DELETE: "order_delete",
}
NO_SIDE = 255
# flags
F_NON_PRINTABLE = 1
F_REPLACE = 2
# channel event codes
CH_LINE_UP = 1
CH_LINE_STALE = 2
CH_LINE_DOWN = 3
CH_GAP_DECLARED = 4
CH_GAP_FILLED = 5
CH_GAP_UNRECOVERABLE = 6
CH_BOOKS_STALE = 7
CH_END_OF_SESSION = 8
CH_SYSTEM = 9
CHANNEL_NAMES = {
    CH_LINE_UP: "line_up",
    CH_LINE_STALE: "line_stale",
    CH_LINE_DOWN: "line_down",
    CH_GAP_DECLARED: "gap_declared",
    CH_GAP_FILLED: "gap_filled",
    CH_GAP_UNRECOVERABLE: "gap_unrecoverable",
    CH_BOOKS_STALE: "books_stale",
    CH_END_OF_SESSION: "end_of_session",
    CH_SYSTEM: "system",
}
# line states the control plane writes into control[C_LINE_STATE + line] (0: not known yet)
LINE_UP = 1
LINE_STALE = 2
LINE_DOWN = 3
LINE_CODE = {"up": LINE_UP, "stale": LINE_STALE, "down": LINE_DOWN}

# --- header (int64) ---------------------------------------------------------------------------
MAGIC = int.from_bytes(b"TWEVENT1", "little")
LAYOUT = 1
H_MAGIC = 0
H_LAYOUT = 1
H_SLOTS = 2
H_SLOT_BYTES = 3
H_SHIFT = 4  # log2(slots)
H_CLOCK = 5  # CLOCK_MONO or CLOCK_TSC
H_TSC_HZ = 6  # the calibration used (CLOCK_TSC)
H_TSC_BASE = 7  # a TSC reading ...
H_MONO_BASE = 8  # ... and CLOCK_MONOTONIC at the same moment
H_WRITE = 9  # events published so far: the next event's position
H_PID = 10  # the producer
H_ORDER_EVENTS = 11  # 1: per-order events are published
H_HUGEPAGES = 12  # 1: the ring is in hugepages
H_CREATED_NS = 13  # CLOCK_MONOTONIC when the ring was created (a new ring: a new run)
H_ON = 14  # 1: the consumer publishes (0: the ring is off, nothing will come)
# the last sequence in the book when the first event was published: 0 an empty book (every
# event since is the whole story), S a book restored or joined at S (only a snapshot gives
# its state), -1 not said yet (the producer says it before its first event)
H_BASE_SEQ = 15
# the producer's private state (readers ignore it)
P_BATCH = 32  # first position of the packet being published
P_GAP_SEEN = 33  # gaps-ring rows announced as declared
P_GAP_DONE = 34  # gaps-ring rows announced as filled (or passed)
P_EOS = 35  # end of session announced
P_STALE = 36  # books-stale announced
P_LINE = 37  # P_LINE + line: line state announced
P_LOST_MSGS = 40  # A_UNRECOVERABLE_MSGS when the last gap was announced
P_AHEAD = 41  # slots up to this position are marked as being rewritten
HDR_LEN = 64
CLOCK_MONO = 1
CLOCK_TSC = 2
CLOCK_NAMES = {CLOCK_MONO: "CLOCK_MONOTONIC", CLOCK_TSC: "tsc"}
U32_MAX = 0xFFFFFFFF
AHEAD = 512  # at least this many slots are marked ahead of the writer: more than the events
#   of one packet (the consumer takes packets of at most 2048 bytes, 55 replaces at most, 4
#   events each with per-order events on)
MIN_SLOTS = 4096  # readers keep at least slots - 2 * AHEAD events behind the writer


@intrinsic
def compiler_fence(typingctx):
    """A release fence: on x86 it only stops the compiler moving stores across it, which
    is what a seqlock needs (the CPU keeps stores in order, and loads in order)."""

    def codegen(context, builder, sig, args):
        builder.fence("acq_rel")
        return context.get_dummy_value()

    return types.none(), codegen


class Lapped(RuntimeError):
    """The producer overwrote events this reader had not read: re-snapshot."""


# --- producer (numba) -------------------------------------------------------------------------
@njit(cache=True, nogil=True, inline="always", _nrt=False)
def stamp(hdr, clk, ts):
    """Now, in ns on CLOCK_MONOTONIC's scale (TSC when the header says so)."""
    if hdr[H_CLOCK] == CLOCK_TSC:
        return hdr[H_MONO_BASE] + np.int64((clock.rdtscp() - hdr[H_TSC_BASE]) * clk[0])
    return clock.now_ns(ts)


@njit(cache=True, nogil=True, inline="always", _nrt=False)
def _put(ring, hdr, w, kind, side, code, flags, locate, seq, itch_ns, rx_ns, price, n, value):
    """Write event ``w`` into its slot (invisible until ``finish`` stores its version;
    ``finish`` already marked the slot as being rewritten). Returns ``w + 1``: the write
    position stays in a register through a packet and reaches ``H_WRITE`` at its end."""
    e = ring[w & (ring.shape[0] - 1)]
    e.seq = seq
    e.itch_ns = itch_ns
    e.rx_ns = rx_ns
    e.locate = locate
    e.kind = kind
    e.side = side
    e.code = code
    e.flags = flags
    e.price = price
    e.n = n
    e.value = value
    return w + 1


@njit(cache=True, nogil=True, inline="always", _nrt=False)
def _dt(a, b):
    d = b - a
    if d < 0:
        return np.uint32(0)
    return np.uint32(min(d, U32_MAX))


@njit(cache=True, nogil=True, inline="always", _nrt=False)
def _invalidate(ring, hdr, upto):
    """Mark the slots of positions ``[P_AHEAD, upto)`` as being rewritten (odd versions of
    their new lap): a reader still expecting the old event there sees it is gone."""
    mask = ring.shape[0] - 1
    shift = hdr[H_SHIFT]
    for pos in range(max(hdr[P_AHEAD], hdr[H_WRITE]), upto):  # never what is published
        ring[pos & mask].version = np.uint64(2 * (pos >> shift) + 1)
    hdr[P_AHEAD] = upto


@njit(cache=True, nogil=True, _nrt=False)
def finish(ring, hdr, clk, ts, rx_ns):
    """Stamp and publish every event written since the last ``finish``: one apply stamp and
    one publish stamp for all of them, then their final versions, in order. Then mark the
    next ``AHEAD`` slots as being rewritten, so that ``_put`` writes records only."""
    start = hdr[P_BATCH]
    end = hdr[H_WRITE]
    if start == end:
        return
    t_apply = stamp(hdr, clk, ts)
    apply_dt = _dt(rx_ns, t_apply) if rx_ns > 0 else np.uint32(0)
    mask = ring.shape[0] - 1
    shift = hdr[H_SHIFT]
    t_pub = stamp(hdr, clk, ts)
    pub_dt = _dt(t_apply, t_pub)
    for pos in range(start, end):  # x86 stores are seen in program order: fields first
        e = ring[pos & mask]
        e.apply_dt = apply_dt
        e.pub_dt = pub_dt
        compiler_fence()
        e.version = np.uint64(2 * (pos >> shift) + 2)
    hdr[P_BATCH] = end
    if hdr[P_AHEAD] < end + AHEAD:
        _invalidate(ring, hdr, end + 2 * AHEAD)
        compiler_fence()


@njit(cache=True, nogil=True, inline="always", _nrt=False)
def _level(ring, hdr, w, levels, lv, sd, seq, its, rx):
    lr = levels[lv]
    return _put(
        ring, hdr, w, LEVEL, sd & 1, 0, 0, sd >> 1, seq, its, rx, lr.price, lr.count, lr.shares
    )


@njit(cache=True, nogil=True, inline="always", _nrt=False)
def _bbo(ring, hdr, w, sides, sd, px0, qty0, seq, its, rx):
    """A BBO event when side ``sd``'s best level moved from ``(px0, qty0)``."""
    s = sides[sd]
    if s.best_px == px0 and s.best_qty == qty0:
        return w
    return _put(ring, hdr, w, BBO, sd & 1, 0, 0, sd >> 1, seq, its, rx, s.best_px, 0, s.best_qty)


@njit(cache=True, nogil=True, inline="always", _nrt=False)
def apply_publish(
    b, p, t, seq, rx, orders, levels, sides, ladder, htab, stocks, meta, counters, rm, ring, hdr, w
):
    """``book.apply_message`` plus the events of the change it made, written from position
    ``w`` on. Returns ``(status, w)``: 0 or a ``NEED_*`` status (then nothing was changed or
    written), and the next write position."""
    q = p + HEADER_LEN
    locate = rd_u16(b, p + 1)
    its = np.int64(rd_u48(b, p + 5))
    oev = hdr[H_ORDER_EVENTS] != 0
    if t == T_A or t == T_F:
        side = np.int64(bk.SIDE_OF[b[q + 8]])
        if side > bk.ASK:
            counters[bk.B_BAD_SIDE] += 1
            return 0, w
        shares = rd_u32(b, q + 9)
        if shares == 0:
            counters[bk.B_ZERO_SHARES] += 1
            return 0, w
        sd = np.int64(locate) * 2 + side
        ref = rd_u64(b, q)
        need = bk._fits_add(sides, ladder, orders, levels, htab, meta, sd, ref, rm)
        if need != 0:
            return need, w
        px0 = sides[sd].best_px
        qty0 = sides[sd].best_qty
        price = rd_u32(b, q + 21)
        lv = bk._add(
            orders, levels, sides, ladder, htab, meta, counters, ref, sd, price, shares, rm
        )
        if lv == bk.NIL:
            return 0, w
        if oev:
            w = _put(ring, hdr, w, ORDER_ADD, side, t, 0, locate, seq, its, rx, price, shares, ref)
        w = _level(ring, hdr, w, levels, lv, sd, seq, its, rx)
        w = _bbo(ring, hdr, w, sides, sd, px0, qty0, seq, its, rx)
    elif t == T_D or t == T_E or t == T_C or t == T_X:
        ref = rd_u64(b, q)
        o, hi = bk.ix_find(orders, htab, meta, ref, rm)
        if o == bk.NIL:
            counters[bk.B_UNKNOWN_REF] += 1
            return 0, w
        sd = np.int64(orders[o].sd)
        px0 = sides[sd].best_px
        qty0 = sides[sd].best_qty
        lv, n = bk._reduce_at(orders, levels, sides, ladder, htab, meta, counters, b, q, t, o, hi)
        if lv == bk.NIL:
            return 0, w
        price = levels[lv].price
        if oev:
            kind = ORDER_DELETE if t == T_D else (ORDER_CANCEL if t == T_X else ORDER_EXEC)
            w = _put(ring, hdr, w, kind, sd & 1, t, 0, locate, seq, its, rx, price, n, ref)
        w = _level(ring, hdr, w, levels, lv, sd, seq, its, rx)
        w = _bbo(ring, hdr, w, sides, sd, px0, qty0, seq, its, rx)
        if t == T_E or t == T_C:
            shown = np.int64(rd_u32(b, q + 8))  # what the exchange says traded
            tpx = price if t == T_E else rd_u32(b, q + 21)
            fl = F_NON_PRINTABLE if t == T_C and b[q + 20] == 78 else 0
            w = _put(ring, hdr, w, TRADE, sd & 1, t, fl, locate, seq, its, rx, tpx, 0, shown)
    elif t == T_U:
        ref = rd_u64(b, q)
        o, hi = bk.ix_find(orders, htab, meta, ref, rm)
        if o == bk.NIL:
            counters[bk.B_UNKNOWN_REF] += 1
            return 0, w
        sd = np.int64(orders[o].sd)
        new_ref = rd_u64(b, q + 8)
        need = bk._fits_add(sides, ladder, orders, levels, htab, meta, sd, new_ref, rm)
        if need != 0:
            return need, w
        px0 = sides[sd].best_px
        qty0 = sides[sd].best_qty
        old_shares = orders[o].shares
        lv = bk._remove(orders, levels, sides, ladder, htab, meta, o, hi)
        if oev:
            w = _put(
                ring,
                hdr,
                w,
                ORDER_DELETE,
                sd & 1,
                t,
                F_REPLACE,
                locate,
                seq,
                its,
                rx,
                levels[lv].price,
                old_shares,
                ref,
            )
        w = _level(ring, hdr, w, levels, lv, sd, seq, its, rx)  # now: the freed row may be reused
        shares = rd_u32(b, q + 16)
        if shares == 0:
            counters[bk.B_ZERO_SHARES] += 1
        else:
            price = rd_u32(b, q + 20)
            lv = bk._add(
                orders, levels, sides, ladder, htab, meta, counters, new_ref, sd, price, shares, rm
            )
            if lv != bk.NIL:
                if oev:
                    w = _put(
                        ring,
                        hdr,
                        w,
                        ORDER_ADD,
                        sd & 1,
                        t,
                        F_REPLACE,
                        locate,
                        seq,
                        its,
                        rx,
                        price,
                        shares,
                        new_ref,
                    )
                w = _level(ring, hdr, w, levels, lv, sd, seq, its, rx)
        w = _bbo(ring, hdr, w, sides, sd, px0, qty0, seq, its, rx)
    elif t == T_P:
        side = np.int64(bk.SIDE_OF[b[q + 8]])
        sd_side = side if side <= bk.ASK else NO_SIDE
        w = _put(
            ring,
            hdr,
            w,
            TRADE,
            sd_side,
            t,
            0,
            locate,
            seq,
            its,
            rx,
            rd_u32(b, q + 21),
            0,
            np.int64(rd_u32(b, q + 9)),
        )
    elif t == T_Q:
        w = _put(
            ring,
            hdr,
            w,
            TRADE,
            NO_SIDE,
            t,
            0,
            locate,
            seq,
            its,
            rx,
            rd_u32(b, q + 16),
            0,
            np.int64(rd_u64(b, q)),
        )
    elif t == T_R:
        sym = rd_u64(b, q)
        stocks[locate].symbol = sym
        stocks[locate].named = 1
        w = _put(ring, hdr, w, INSTRUMENT, NO_SIDE, t, 0, locate, seq, its, rx, 0, 0, np.int64(sym))
    elif t == T_H:
        stocks[locate].state = b[q + 8]
        w = _put(ring, hdr, w, INSTRUMENT, NO_SIDE, t, 0, locate, seq, its, rx, 0, b[q + 8], 0)
    elif t == T_Y:
        stocks[locate].regsho = b[q + 8]
        w = _put(ring, hdr, w, INSTRUMENT, NO_SIDE, t, 0, locate, seq, its, rx, 0, b[q + 8], 0)
    elif t == T_S:
        w = _put(ring, hdr, w, CHANNEL, NO_SIDE, CH_SYSTEM, 0, 0, seq, its, rx, 0, b[q], 0)
    return 0, w


@njit(cache=True, nogil=True, _nrt=False)
def apply_stream(
    b, pos, end, seq, rx, orders, levels, sides, ladder, htab, stocks, meta, counters, ring, hdr
):
    """``book.apply_stream`` publishing every change: the messages of ``b[pos:end]`` carry
    sequences ``seq, seq + 1, ...``. Same returns. The events are written, not yet visible:
    the caller ``finish``-es the packet (also after a ``NEED_*`` stop: what applied is
    published)."""
    rm = bk._ring_mask(meta)
    w = hdr[H_WRITE]
    while pos < end:
        if pos + bk.FAST_SLACK <= end:  # the common case, as in book.apply_stream
            length = np.int64(rd_u16(b, pos))
            p = pos + 2
            t = b[p]
            if length == bk.FAST_LEN[t]:
                nxt = p + length + 2
                bk.prefetch(orders, bk._ring_row(rm, rd_u64(b, nxt + HEADER_LEN)))
                bk.prefetch(sides, 2 * np.int64(rd_u16(b, nxt + 1)))
                need, w = apply_publish(
                    b,
                    p,
                    t,
                    seq,
                    rx,
                    orders,
                    levels,
                    sides,
                    ladder,
                    htab,
                    stocks,
                    meta,
                    counters,
                    rm,
                    ring,
                    hdr,
                    w,
                )
                if need != 0:
                    hdr[H_WRITE] = w
                    return need, pos
                counters[itch.C_MESSAGES] += 1
                counters[t] += 1
                seq += 1
                pos = p + length
                continue
        status, length = frame(b, pos, end)
        if status == TRUNCATED:
            hdr[H_WRITE] = w
            return TRUNCATED, pos
        p = pos + 2
        t = b[p] if length > 0 else 0
        nxt = p + length + 2
        if nxt + HEADER_LEN + 8 <= end:
            bk.prefetch(orders, bk._ring_row(rm, rd_u64(b, nxt + HEADER_LEN)))
            bk.prefetch(sides, 2 * np.int64(rd_u16(b, nxt + 1)))
        if status == ITCH_OK:
            need, w = apply_publish(
                b,
                p,
                t,
                seq,
                rx,
                orders,
                levels,
                sides,
                ladder,
                htab,
                stocks,
                meta,
                counters,
                rm,
                ring,
                hdr,
                w,
            )
            if need != 0:
                hdr[H_WRITE] = w
                return need, pos
        count_frame(counters, status, t)
        seq += 1
        pos = p + length
    hdr[H_WRITE] = w
    return ITCH_OK, pos


@njit(cache=True, nogil=True, _nrt=False)
def channel_event(ring, hdr, clk, ts, code, line, seq, value, n):
    """Publish one channel event at once (it is not part of a packet)."""
    hdr[H_WRITE] = _put(
        ring, hdr, hdr[H_WRITE], CHANNEL, line, code, 0, 0, seq, 0, 0, 0, min(n, U32_MAX), value
    )
    finish(ring, hdr, clk, ts, 0)


@njit(cache=True, nogil=True, _nrt=False)
def channel_tick(ctr, control, gaps, ring, hdr, clk, ts):
    """Between packets: announce what changed in the channel's state since the last tick --
    the lines' health (written into control by the control plane), gaps declared and
    filled, the books going stale, the end of session."""
    if hdr[H_ON] == 0:
        return
    last = ctr[shm.A_NEXT] - 1
    for ln in range(2):
        st = control[shm.C_LINE_STATE + ln]
        if st != 0 and st != hdr[P_LINE + ln]:
            hdr[P_LINE + ln] = st
            channel_event(ring, hdr, clk, ts, st, ln, last, 0, 0)  # CH_LINE_* == LINE_*
    head = control[shm.C_GAP_HEAD]
    if head - hdr[P_GAP_SEEN] > gaps.shape[0]:  # more than the ring holds: rows are gone
        hdr[P_GAP_SEEN] = head - gaps.shape[0]
    while hdr[P_GAP_SEEN] < head:
        row = gaps[hdr[P_GAP_SEEN] % gaps.shape[0]]
        channel_event(ring, hdr, clk, ts, CH_GAP_DECLARED, NO_SIDE, last, row[0], row[1])
        hdr[P_GAP_SEEN] += 1
    if hdr[P_GAP_DONE] < head - gaps.shape[0]:
        hdr[P_GAP_DONE] = head - gaps.shape[0]
    while hdr[P_GAP_DONE] < hdr[P_GAP_SEEN]:
        row = gaps[hdr[P_GAP_DONE] % gaps.shape[0]]
        if ctr[shm.A_NEXT] < row[0] + row[1]:
            break
        # filled: every message of it taken, none of it declared unrecoverable since (an
        # unrecoverable range was announced by its own event)
        if ctr[shm.A_UNRECOVERABLE_MSGS] == hdr[P_LOST_MSGS]:
            channel_event(ring, hdr, clk, ts, CH_GAP_FILLED, NO_SIDE, last, row[0], row[1])
        hdr[P_LOST_MSGS] = ctr[shm.A_UNRECOVERABLE_MSGS]
        hdr[P_GAP_DONE] += 1
    if control[shm.C_STALE] != 0 and hdr[P_STALE] == 0:
        hdr[P_STALE] = 1
        channel_event(ring, hdr, clk, ts, CH_BOOKS_STALE, NO_SIDE, last, 0, 0)
    end = ctr[shm.A_END_SEQ]
    if end > 0 and hdr[P_EOS] == 0 and ctr[shm.A_NEXT] >= end:
        hdr[P_EOS] = 1
        channel_event(ring, hdr, clk, ts, CH_END_OF_SESSION, NO_SIDE, last, end, 0)


# --- reader (numba) ---------------------------------------------------------------------------
LAPPED = -1


@njit(cache=True, nogil=True, _nrt=False)
def poll(ring, hdr, cursor, out):
    """Copy the events from ``cursor[0]`` on into ``out`` (an ``EVENT`` array), as many as
    are ready and fit; advance the cursor. Returns how many, or ``LAPPED`` (the cursor's
    event was overwritten: nothing after it can be trusted in order; re-snapshot)."""
    mask = ring.shape[0] - 1
    shift = hdr[H_SHIFT]
    pos = cursor[0]
    k = 0
    while k < out.shape[0]:
        e = ring[pos & mask]
        want = np.uint64(2 * (pos >> shift) + 2)
        v = e.version
        if v != want:
            if v > want:
                cursor[0] = pos
                return LAPPED
            break  # not written yet
        compiler_fence()
        out[k] = e
        compiler_fence()
        if e.version != want:
            cursor[0] = pos
            return LAPPED
        k += 1
        pos += 1
    cursor[0] = pos
    return k


@njit(cache=True, nogil=True, inline="always", _nrt=False)
def read_ns(hdr, clk, ts):
    """A reader's stamp on the ring's clock (for publish-to-read latency)."""
    return stamp(hdr, clk, ts)


# --- files ------------------------------------------------------------------------------------
def _hugetlbfs() -> Path | None:
    """A hugetlbfs mount with free 2 MiB pages, or None."""
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
        free = int(Path("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages").read_text())
    except (OSError, ValueError):
        return None
    if free <= 0:
        return None
    for line in mounts:
        f = line.split()
        if len(f) >= 4 and f[2] == "hugetlbfs" and "pagesize=1G" not in f[3]:
            p = Path(f[1])
            if os.access(p, os.W_OK):
                return p
    return None


def map_file(path: Path, size: int, create: bool) -> mmap.mmap:
    """``path`` mapped shared (created at ``size`` and writable when ``create``), its pages
    populated."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC if create else os.O_RDONLY, 0o644)
    try:
        if create:
            os.ftruncate(fd, size)
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if create else 0)
        # populated now: the consumer's first lap must not take a page fault per 4 KiB
        return mmap.mmap(fd, size, mmap.MAP_SHARED | mmap.MAP_POPULATE, prot)
    finally:
        os.close(fd)


def tsc_clock(channel: str, root: Path | None = None) -> int:
    """The TSC's Hz from ``tickwire calibrate``'s ``clock.json`` when the TSC is invariant
    (``constant_tsc`` and ``nonstop_tsc``), else 0 (use CLOCK_MONOTONIC)."""
    import json

    if not clock.HAS_TSC:
        return 0
    try:
        tsc = json.loads((shm.channel_dir(channel, root) / "clock.json").read_text())["tsc"]
    except (OSError, ValueError, KeyError, TypeError):
        return 0
    if not tsc or not {"constant_tsc", "nonstop_tsc"} <= set(tsc.get("flags") or ()):
        return 0
    return int(round(float(tsc["hz"])))


@njit(cache=True, nogil=True)
def _base_pair(ts):
    """(tsc, CLOCK_MONOTONIC ns) read together: the tightest of a few brackets."""
    best, best_t, best_m = 1 << 62, 0, 0
    for _ in range(16):
        a = clock.rdtscp()
        m = clock.now_ns(ts)
        c = clock.rdtscp()
        if c - a < best:
            best, best_t, best_m = c - a, a + (c - a) // 2, m
    return best_t, best_m


class Ring:
    """A channel's event ring: ``ring`` (``EVENT`` records), ``hdr`` (int64 header) and
    ``clk`` (float64: ns per TSC tick). ``create`` makes one (the consumer's side), ``attach``
    maps an existing one read-only."""

    def __init__(self, ring: np.ndarray, hdr: np.ndarray, clk: np.ndarray, path: Path):
        self.ring, self.hdr, self.clk, self.path = ring, hdr, clk, path
        self.ts = np.zeros(2, np.int64)  # clock_gettime's scratch (CLOCK_MONOTONIC rings)

    @classmethod
    def create(
        cls,
        channel: str,
        slots: int,
        order_events: bool = False,
        on: bool = True,
        tsc_hz: int | None = None,
        root: Path | None = None,
        base_seq: int = 0,
    ) -> Ring:
        if slots < MIN_SLOTS or slots & (slots - 1):
            raise ValueError(f"event ring slots: {slots} is not a power of two >= {MIN_SLOTS}")
        d = shm.make_channel_dir(channel, root)
        shutil.rmtree(d / "readers", ignore_errors=True)  # readers of an older ring
        size = slots * EVENT.itemsize
        link = d / "events"
        link.unlink(missing_ok=True)
        huge = _hugetlbfs() if root is None else None
        m = None
        if huge is not None:
            target = huge / f"tickwire-{channel}-events"
            try:
                m = map_file(target, -(-size // (2 << 20)) * (2 << 20), True)
                link.symlink_to(target)
            except OSError:
                m = None
                target.unlink(missing_ok=True)
        if m is None:
            m = map_file(link, size, True)
            huge = None
        ring = np.frombuffer(m, EVENT, count=slots)
        hdr = np.memmap(d / "events.hdr", np.int64, "w+", shape=(HDR_LEN,)).view(np.ndarray)
        hz = tsc_clock(channel, root) if tsc_hz is None else tsc_hz
        clk = np.zeros(1, np.float64)
        hdr[H_SLOTS] = slots
        hdr[H_SLOT_BYTES] = EVENT.itemsize
        hdr[H_SHIFT] = slots.bit_length() - 1
        hdr[H_ORDER_EVENTS] = int(order_events)
        hdr[H_HUGEPAGES] = int(huge is not None)
        hdr[H_CREATED_NS] = time.monotonic_ns()
        hdr[H_ON] = int(on)
        hdr[H_BASE_SEQ] = base_seq
        hdr[H_PID] = os.getpid()
        if hz > 0:
            clk[0] = 1e9 / hz
            hdr[H_TSC_BASE], hdr[H_MONO_BASE] = _base_pair(np.zeros(2, np.int64))
            hdr[H_TSC_HZ] = hz
            hdr[H_CLOCK] = CLOCK_TSC
        else:
            hdr[H_CLOCK] = CLOCK_MONO
        hdr[H_LAYOUT] = LAYOUT
        hdr[H_MAGIC] = MAGIC  # last: a reader takes the ring as valid from here
        return cls(ring, hdr, clk, link)

    @classmethod
    def attach(cls, channel: str, root: Path | None = None) -> Ring:
        d = shm.channel_dir(channel, root)
        try:
            hdr = np.memmap(d / "events.hdr", np.int64, "r", shape=(HDR_LEN,)).view(np.ndarray)
        except (FileNotFoundError, ValueError):
            raise FileNotFoundError(
                f"no event ring at {d} (is tickwire run running, with events on?)"
            ) from None
        if int(hdr[H_MAGIC]) != MAGIC or int(hdr[H_LAYOUT]) != LAYOUT:
            raise ValueError(f"{d / 'events.hdr'}: not an event ring of layout {LAYOUT}")
        slots = int(hdr[H_SLOTS])
        m = map_file(d / "events", slots * EVENT.itemsize, False)
        ring = np.frombuffer(m, EVENT, count=slots)
        clk = np.zeros(1, np.float64)
        if int(hdr[H_CLOCK]) == CLOCK_TSC:
            clk[0] = 1e9 / int(hdr[H_TSC_HZ])
        return cls(ring, hdr, clk, d / "events")

    @staticmethod
    def off() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The arrays of a ring that is off, in private memory (for tests and tools that
        drive the consumer's functions without publishing)."""
        hdr = np.zeros(HDR_LEN, np.int64)
        hdr[H_SLOTS], hdr[H_CLOCK] = 1, CLOCK_MONO
        return np.zeros(1, EVENT), hdr, np.zeros(1, np.float64), np.zeros(2, np.int64)

    @staticmethod
    def private(slots: int, order_events: bool = False, tsc_hz: int = 0) -> Ring:
        """A ring in private memory (tests, benches): same layout, nothing shared."""
        hdr = np.zeros(HDR_LEN, np.int64)
        clk = np.zeros(1, np.float64)
        hdr[H_SLOTS], hdr[H_SLOT_BYTES], hdr[H_SHIFT] = (
            slots,
            EVENT.itemsize,
            slots.bit_length() - 1,
        )
        hdr[H_ORDER_EVENTS], hdr[H_ON], hdr[H_CLOCK] = int(order_events), 1, CLOCK_MONO
        if tsc_hz > 0:
            clk[0] = 1e9 / tsc_hz
            hdr[H_TSC_BASE], hdr[H_MONO_BASE] = _base_pair(np.zeros(2, np.int64))
            hdr[H_TSC_HZ], hdr[H_CLOCK] = tsc_hz, CLOCK_TSC
        hdr[H_LAYOUT], hdr[H_MAGIC] = LAYOUT, MAGIC
        ring = np.zeros(slots, EVENT)
        ring.view(np.uint8)[::4096] = 1  # fault every page in now, not on the first lap
        ring.view(np.uint8)[::4096] = 0
        return Ring(ring, hdr, clk, Path("/nonexistent"))

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``(ring, hdr, clk, ts)``: the consumer's arguments."""
        return self.ring, self.hdr, self.clk, self.ts

    @property
    def write_pos(self) -> int:
        return int(self.hdr[H_WRITE])

    def info(self) -> dict:
        h = self.hdr
        return {
            "slots": int(h[H_SLOTS]),
            "slot_bytes": int(h[H_SLOT_BYTES]),
            "published": int(h[H_WRITE]),
            "clock": CLOCK_NAMES.get(int(h[H_CLOCK]), "unknown"),
            "tsc_hz": int(h[H_TSC_HZ]) or None,
            "order_events": bool(h[H_ORDER_EVENTS]),
            "hugepages": bool(h[H_HUGEPAGES]),
            "on": bool(h[H_ON]),
            "producer_pid": int(h[H_PID]),
        }


# --- readers' registry ---------------------------------------------------------------------
# Readers never write to the ring; each one keeps a small file of its own under
# ``<channel>/readers/`` (its cursor lives there, so keeping it costs nothing), which the
# metrics exporter reads: how many readers, how far behind the head, how often lapped.
R_POS = 0  # the reader's next event
R_LAPPED = 1  # times it was lapped
R_SNAPSHOTS = 2
R_PID = 3
R_CREATED_NS = 4  # H_CREATED_NS of the ring it reads
READER_LEN = 8


def readers_dir(channel: str, root: Path | None = None) -> Path:
    return shm.channel_dir(channel, root) / "readers"


def register_reader(channel: str, root: Path | None = None) -> tuple[np.ndarray, Path]:
    """A reader's registry entry (int64 ``READER_LEN``), mapped; remove the path when done."""
    d = readers_dir(channel, root)
    if not d.exists():
        d.mkdir(exist_ok=True)
        with contextlib.suppress(OSError):
            os.chmod(d, 0o1777)  # any local user may read the ring; each owns its entry
    path = d / f"{os.getpid()}-{time.monotonic_ns()}"
    reg = np.memmap(path, np.int64, "w+", shape=(READER_LEN,)).view(np.ndarray)
    reg[R_PID] = os.getpid()
    return reg, path


def readers(channel: str, root: Path | None = None) -> list[dict]:
    """The registered readers of the channel's current ring whose process is alive."""
    try:
        hdr = np.memmap(
            shm.channel_dir(channel, root) / "events.hdr", np.int64, "r", shape=(HDR_LEN,)
        )
    except (OSError, ValueError):
        return []
    created, head = int(hdr[H_CREATED_NS]), int(hdr[H_WRITE])
    out = []
    for f in sorted(readers_dir(channel, root).glob("*-*")):
        try:
            r = np.fromfile(f, np.int64, READER_LEN)
        except OSError:
            continue
        if len(r) < READER_LEN or int(r[R_CREATED_NS]) != created:
            continue
        pid = int(r[R_PID])
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        except PermissionError:
            pass
        out.append(
            {
                "pid": pid,
                "position": int(r[R_POS]),
                "lag": max(0, head - int(r[R_POS])),
                "lapped": int(r[R_LAPPED]),
                "snapshots": int(r[R_SNAPSHOTS]),
            }
        )
    return out


def ring_status(channel: str, root: Path | None = None) -> dict | None:
    """The channel's event ring as ``tickwire status`` and the exporter show it (None: no
    ring): on or off, slots, events published, clock, hugepages, per-order events, and its
    live readers with their lag (events published they have not read) and laps."""
    try:
        hdr = np.fromfile(shm.channel_dir(channel, root) / "events.hdr", np.int64, HDR_LEN)
    except OSError:
        return None
    if len(hdr) < HDR_LEN or hdr[H_MAGIC] != MAGIC:
        return None
    return {
        "on": bool(hdr[H_ON]),
        "slots": int(hdr[H_SLOTS]),
        "published": int(hdr[H_WRITE]),
        "clock": "tsc" if hdr[H_CLOCK] == CLOCK_TSC else "monotonic",
        "hugepages": bool(hdr[H_HUGEPAGES]),
        "order_events": bool(hdr[H_ORDER_EVENTS]),
        "producer_pid": int(hdr[H_PID]),
        "readers": readers(channel, root),
    }


def symbol_text(value: int) -> str:
    """The ticker packed in an ``R`` event's ``value`` (as ``book`` stores symbols)."""
    return bk._symbol(int(value) & 0xFFFFFFFFFFFFFFFF)
