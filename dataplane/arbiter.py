"""A/B arbitration: each sequence number reaches the book exactly once, in order.

Per channel and session the arbiter keeps the next expected sequence (``A_NEXT``). A
packet from either line (or from the recovery path) is, relative to it:

- behind (every message already taken): dropped, counted as that line's duplicates;
- overlapping: the messages not yet taken are applied (``take``), the rest dropped;
- ahead: copied into a preallocated hold slot (``hold``) and released, in order, as soon
  as the hole before it fills (``drain``). Without a free slot it is counted
  (``A_HOLD_OVERFLOW``) and left to recovery, never applied out of order.

Held packets are kept in a free-slot stack and an array of slots sorted by sequence
(``new_hold``): holding, the duplicate check, releasing and finding the lowest held
sequence cost O(1) in the usual order of arrival and O(log n) at worst, never a scan of
every slot -- under heavy loss the hold is full and every packet still costs the same.

A *hole* exists while something announced a sequence past ``A_NEXT``: a held packet, a
data packet's end, a heartbeat or the end of session (heartbeats carry the next sequence,
so a loss at the end of a burst is seen too). ``hole_check`` declares the hole a gap --
pushed into the shared ``gaps`` ring for the recovery client -- only once neither line has
filled it within the arbitration window: ``C_WINDOW_NS`` nanoseconds since it was first
seen (no later than the arrival of the packet held after it), or ``C_WINDOW_MSGS``
messages held. Once the hole at ``A_NEXT`` is declared, every later hole between held
packets that is past the window is declared too, in order, so recovery works on all of
them at once instead of one window and one round trip per hole. The recovery client answers through
the ``recov`` ring: answer packets go through the same path as the lines' packets (first
copy wins), and a range it gives up on comes back as ``REC_LOST``: ``lost`` skips it,
counts it, marks the books stale and, under the halt policy, stops the consumer.

Output to the decoder is strictly monotonic and never repeats a sequence: only ``take``
applies messages, and only from ``A_NEXT`` upwards. Nothing here allocates.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from dataplane import book as bk
from dataplane import events, itch, msgring, shm
from dataplane import moldudp64 as mold
from dataplane.itch import rd_u16

HOLD_SLOT = 2048  # bytes per held packet (a MoldUDP64 datagram)
# hold_meta columns: per slot (row = slot index) ...
H_SEQ = 0  # first sequence (-1: free)
H_COUNT = 1
H_LEN = 2
H_LINE = 3
H_TIME = 4  # when it was held
# ... and two index arrays sharing the rows: the slots held, sorted by sequence, at rows
# A_HOLD_HEAD .. A_HOLD_HEAD + A_HELD_NOW - 1; the free slots, a stack at rows
# 0 .. slots - A_HELD_NOW - 1
H_ORDER = 5
H_FREE = 6
H_RX = 7  # its receive stamp (the events published when it is taken carry it)
H_COLS = 8
A_HOLD_HEAD = shm.A_BASE + 14  # private: row of the lowest held sequence in H_ORDER
A_HELD_MSGS = shm.A_BASE + 15  # private: messages in held packets
HOLE_WALK = 256  # held packets one hole_check looks at past the declared front (bounded)


def new_hold(slots: int):
    """``(hold_buf, hold_meta)`` for ``slots`` held packets, all free."""
    hold_buf = np.zeros((slots, HOLD_SLOT), np.uint8)
    hold_meta = np.full((slots, H_COLS), -1, np.int64)
    hold_meta[:, H_FREE] = np.arange(slots)
    return hold_buf, hold_meta


@njit(cache=True, nogil=True, inline="always", _nrt=False)
def publish_bbo(bbo, sides, locate, feed_seq, t):
    """Copy one locate's cached best levels into its seqlocked record when they changed."""
    b = sides[2 * locate]
    a = sides[2 * locate + 1]
    r = bbo[locate]
    if (
        r.bid_px == b.best_px
        and r.bid_qty == b.best_qty
        and r.ask_px == a.best_px
        and r.ask_qty == a.best_qty
    ):
        return
    r.seq += 1
    events.compiler_fence()
    r.bid_px = b.best_px
    r.bid_qty = b.best_qty
    r.ask_px = a.best_px
    r.ask_qty = a.best_qty
    r.feed_seq = feed_seq
    r.update_ns = t
    events.compiler_fence()
    r.seq += 1


@njit(cache=True, nogil=True, _nrt=False)
def take(
    b,
    pos,
    end,
    seq,
    count,
    line,
    rx_ns,
    t,
    ctr,
    orders,
    levels,
    sides,
    ladder,
    htab,
    stocks,
    meta,
    bctr,
    bbo,
    touched,
    lat,
    ring,
    rhdr,
    clk,
    rts,
    mbuf,
    mhdr,
):
    """Apply the messages of the validated data packet ``b[pos:end]`` (sequences
    ``seq..seq+count-1``, ``seq <= A_NEXT``) that were not taken yet, publishing their
    events when the ring is on (``dataplane.events``). Returns 0 or a book ``NEED_*``
    status (then ``A_NEXT`` stands after the last message applied, and calling again with
    the same packet resumes exactly there). ``rx_ns``: the packet's receive stamp, 0 when
    unknown, negative for a packet released from the hold (its events carry the stamp; the
    receive-to-book histogram counts packets taken as they arrive)."""
    lb = line * shm.LINE_STRIDE
    nxt = ctr[shm.A_NEXT]
    p = pos + mold.HEADER_LEN
    s = seq
    while s < nxt:  # skip the part already taken
        p += 2 + rd_u16(b, p)
        s += 1
    n_touch = 0
    q = p
    while q < end and n_touch < touched.shape[0]:  # locates this packet may change
        if rd_u16(b, q) >= 3:
            touched[n_touch] = rd_u16(b, q + 3)
            n_touch += 1
        q += 2 + rd_u16(b, q)
    if rhdr[events.H_ON] != 0:
        st, stop = events.apply_stream(
            b,
            p,
            end,
            s,
            abs(rx_ns),
            orders,
            levels,
            sides,
            ladder,
            htab,
            stocks,
            meta,
            bctr,
            ring,
            rhdr,
        )
        events.finish(ring, rhdr, clk, rts, abs(rx_ns))
    else:
        st, stop = bk.apply_stream(
            b, p, end, orders, levels, sides, ladder, htab, stocks, meta, bctr
        )
    if st == itch.OK:
        applied = seq + count - s
    else:  # stopped at a message that needs room: count what went in before it
        applied = 0
        q = p
        while q < stop:
            q += 2 + rd_u16(b, q)
            applied += 1
    # the journal's copy: the blocks just applied, one record
    msgring.put(mbuf, mhdr, b, p, end if st == itch.OK else stop, s, applied)
    ctr[shm.A_NEXT] = s + applied
    ctr[shm.A_TAKEN] += applied
    ctr[lb + shm.L_FIRST_TAKEN] += applied
    for k in range(n_touch):
        publish_bbo(bbo, sides, touched[k], s + applied - 1, t)
    if st != itch.OK:
        # the retry counts the messages applied now as skipped duplicates: take them back
        ctr[lb + shm.L_DUPLICATES] -= applied
        return st
    ctr[lb + shm.L_DUPLICATES] += s - seq
    ctr[shm.A_PACKETS] += 1
    if rx_ns > 0 and t >= rx_ns:
        lat[shm.lat_bucket(t - rx_ns)] += 1
    return 0


@njit(cache=True, nogil=True, inline="always", _nrt=False)
def _lower_bound(hold_meta, lo, hi, seq):
    """First row in ``H_ORDER[lo:hi]`` whose slot's sequence is >= ``seq`` (``hi``: none)."""
    while lo < hi:
        mid = (lo + hi) >> 1
        if hold_meta[hold_meta[mid, H_ORDER], H_SEQ] < seq:
            lo = mid + 1
        else:
            hi = mid
    return lo


@njit(cache=True, nogil=True, _nrt=False)
def hold(b, pos, end, seq, count, line, rx_ns, t, ctr, hold_buf, hold_meta):
    """Keep a packet that arrived ahead of ``A_NEXT`` until its turn."""
    slots = hold_meta.shape[0]
    n = ctr[shm.A_HELD_NOW]
    head = ctr[A_HOLD_HEAD]
    tail = head + n
    p = tail  # packets mostly arrive in order: append
    if n > 0 and hold_meta[hold_meta[tail - 1, H_ORDER], H_SEQ] >= seq:
        p = _lower_bound(hold_meta, head, tail, seq)
    size = end - pos
    if p < tail and hold_meta[hold_meta[p, H_ORDER], H_SEQ] == seq:
        slot = hold_meta[p, H_ORDER]
        if hold_meta[slot, H_COUNT] >= count or size > hold_buf.shape[1]:
            ctr[line * shm.LINE_STRIDE + shm.L_DUPLICATES] += count  # held already
            return
        # the same start with more messages (another packetisation): keep the longer one
        ctr[line * shm.LINE_STRIDE + shm.L_DUPLICATES] += hold_meta[slot, H_COUNT]
        ctr[A_HELD_MSGS] += count - hold_meta[slot, H_COUNT]
    else:
        if n >= slots or size > hold_buf.shape[1]:
            ctr[shm.A_HOLD_OVERFLOW] += 1  # its sequences stay a hole: recovery fills it
            return
        slot = hold_meta[slots - n - 1, H_FREE]  # pop a free slot
        if p == head and head > 0:  # before the lowest: one row down
            head -= 1
            p = head
            ctr[A_HOLD_HEAD] = head
        else:
            if tail == slots:  # the sorted rows reached the end: move them down to row 0
                for k in range(n):
                    hold_meta[k, H_ORDER] = hold_meta[head + k, H_ORDER]
                p -= head
                tail = n
                head = 0
                ctr[A_HOLD_HEAD] = 0
            for k in range(tail, p, -1):
                hold_meta[k, H_ORDER] = hold_meta[k - 1, H_ORDER]
        hold_meta[p, H_ORDER] = slot
        hold_meta[slot, H_TIME] = t
        ctr[shm.A_HELD_NOW] = n + 1
        ctr[A_HELD_MSGS] += count
        ctr[line * shm.LINE_STRIDE + shm.L_HELD] += 1
        if n + 1 > ctr[shm.A_HELD_MAX]:
            ctr[shm.A_HELD_MAX] = n + 1
    for k in range(size):
        hold_buf[slot, k] = b[pos + k]
    hold_meta[slot, H_SEQ] = seq
    hold_meta[slot, H_COUNT] = count
    hold_meta[slot, H_LEN] = size
    hold_meta[slot, H_LINE] = line
    hold_meta[slot, H_RX] = rx_ns


@njit(cache=True, nogil=True, inline="always", _nrt=False)
def _release_lowest(ctr, hold_meta):
    """Free the slot of the lowest held sequence."""
    slots = hold_meta.shape[0]
    head = ctr[A_HOLD_HEAD]
    slot = hold_meta[head, H_ORDER]
    n = ctr[shm.A_HELD_NOW]
    ctr[A_HELD_MSGS] -= hold_meta[slot, H_COUNT]
    hold_meta[slot, H_SEQ] = -1
    hold_meta[slots - n, H_FREE] = slot  # push on the free stack
    ctr[shm.A_HELD_NOW] = n - 1
    ctr[A_HOLD_HEAD] = head + 1 if n > 1 else 0


@njit(cache=True, nogil=True, _nrt=False)
def drain(
    t,
    ctr,
    hold_buf,
    hold_meta,
    orders,
    levels,
    sides,
    ladder,
    htab,
    stocks,
    meta,
    bctr,
    bbo,
    touched,
    lat,
    ring,
    rhdr,
    clk,
    rts,
    mbuf,
    mhdr,
):
    """Release held packets in order while the lowest starts at or before ``A_NEXT``."""
    while ctr[shm.A_HELD_NOW] > 0:
        nxt = ctr[shm.A_NEXT]
        found = hold_meta[ctr[A_HOLD_HEAD], H_ORDER]
        seq = hold_meta[found, H_SEQ]
        if seq > nxt:
            return 0
        count = hold_meta[found, H_COUNT]
        line = hold_meta[found, H_LINE]
        if seq + count <= nxt:  # the other line (or recovery) delivered it meanwhile
            ctr[line * shm.LINE_STRIDE + shm.L_LATE] += 1
            ctr[line * shm.LINE_STRIDE + shm.L_DUPLICATES] += count
            _release_lowest(ctr, hold_meta)
            continue
        st = take(
            hold_buf[found],
            0,
            hold_meta[found, H_LEN],
            seq,
            count,
            line,
            -hold_meta[found, H_RX],
            t,
            ctr,
            orders,
            levels,
            sides,
            ladder,
            htab,
            stocks,
            meta,
            bctr,
            bbo,
            touched,
            lat,
            ring,
            rhdr,
            clk,
            rts,
            mbuf,
            mhdr,
        )
        if st != 0:
            return st
        _release_lowest(ctr, hold_meta)
    return 0


@njit(cache=True, nogil=True, inline="always", _nrt=False)
def _declare(t, first, lo, ctr, gaps, control):
    """Push the gap ``[first, lo)`` for the recovery client; False when its ring is full."""
    head = control[shm.C_GAP_HEAD]
    if head - control[shm.C_GAP_TAIL] >= gaps.shape[0]:
        return False  # the recovery client is behind: declare on a later check
    row = head % gaps.shape[0]
    gaps[row, 0] = first
    gaps[row, 1] = lo - first
    gaps[row, 2] = t
    gaps[row, 3] = 0
    events.compiler_fence()
    control[shm.C_GAP_HEAD] = head + 1
    ctr[shm.A_DECLARED_TO] = lo
    ctr[shm.A_GAPS_DECLARED] += 1
    ctr[shm.A_GAP_DECLARED_MSGS] += lo - first
    return True


@njit(cache=True, nogil=True, _nrt=False)
def hole_check(t, ctr, hold_meta, gaps, control):
    """Declare the hole at ``A_NEXT`` a gap once the arbitration window has passed, then
    the holes between held packets behind it that are past the window too."""
    nxt = ctr[shm.A_NEXT]
    lo = ctr[shm.A_ANNOUNCED]
    n = ctr[shm.A_HELD_NOW]
    head = ctr[A_HOLD_HEAD]
    if n > 0:
        lowest = hold_meta[head, H_ORDER]
        if hold_meta[lowest, H_SEQ] < lo:
            lo = hold_meta[lowest, H_SEQ]
    if lo <= nxt:
        ctr[shm.A_HOLE_SINCE] = 0
        return
    since = ctr[shm.A_HOLE_SINCE]
    if since == 0:
        since = t
    if n > 0 and hold_meta[lowest, H_TIME] < since:  # seen when the packet after it came
        since = hold_meta[lowest, H_TIME]
    ctr[shm.A_HOLE_SINCE] = since
    window = control[shm.C_WINDOW_NS]
    pressed = ctr[A_HELD_MSGS] >= control[shm.C_WINDOW_MSGS]
    first = max(nxt, ctr[shm.A_DECLARED_TO])
    if first < lo:
        if t - since < window and not pressed:
            return
        if not _declare(t, first, lo, ctr, gaps, control):
            return
        first = lo
    # the front is declared: walk the held packets from where the last walk stopped
    tail = head + n
    p = _lower_bound(hold_meta, head, tail, first)
    if p > head:
        p -= 1  # the packet before may reach past ``first``
    cur = first
    steps = 0
    while p < tail and steps < HOLE_WALK:
        slot = hold_meta[p, H_ORDER]
        s = hold_meta[slot, H_SEQ]
        e = s + hold_meta[slot, H_COUNT]
        if s > cur:
            if t - hold_meta[slot, H_TIME] < window and not pressed:
                break  # a young hole: it may still be filled by a line
            if not _declare(t, cur, s, ctr, gaps, control):
                break
        if e > cur:
            cur = e
            ctr[shm.A_DECLARED_TO] = cur  # below it: held, taken or declared
        p += 1
        steps += 1


@njit(cache=True, nogil=True, _nrt=False)
def lost(first, count, ctr, control, mbuf, mhdr):
    """Apply an unrecoverable range: 1 when skipped (or already filled), 0 when it lies
    ahead of ``A_NEXT`` (try again once the sequence reaches it). A skip is recorded in
    the message ring (``mbuf``, ``mhdr``) as a hole."""
    nxt = ctr[shm.A_NEXT]
    end = first + count
    if end <= nxt:
        return 1
    if first > nxt:
        return 0
    ctr[shm.A_UNRECOVERABLE_MSGS] += end - nxt
    ctr[shm.A_UNRECOVERABLE_GAPS] += 1
    control[shm.C_STALE] = 1
    if control[shm.C_POLICY] == shm.POLICY_HALT:
        control[shm.C_HALTED] = 1  # the books stop before the gap; nothing more applies
        return 1
    msgring.hole(mbuf, mhdr, nxt, end - nxt)
    ctr[shm.A_NEXT] = end
    ctr[shm.A_HOLE_SINCE] = 0
    return 1


# Why 23 positional arguments: a numba record holds only fixed-size fields, not the book's
# arrays (they grow); a structref is reference-counted, which code compiled with _nrt=False
# cannot be (tests/test_nrt.py). A namedtuple would cost nothing (numba flattens tuple
# arguments), but it would change every caller -- the consumer's arb/bk_ tuples, the
# runner that builds them, take, drain and the tests -- at once, and no bench in the tree
# runs this path offline (bench book does not call it). Left for a change of its own.
@njit(cache=True, nogil=True, _nrt=False)
def on_packet(
    b,
    pos,
    end,
    line,
    rx_ns,
    t,
    session,
    ctr,
    hold_buf,
    hold_meta,
    orders,
    levels,
    sides,
    ladder,
    htab,
    stocks,
    meta,
    bctr,
    bbo,
    touched,
    lat,
    ring,
    rhdr,
    clk,
    rts,
    mbuf,
    mhdr,
):
    """Handle one MoldUDP64 packet ``b[pos:end]`` from ``line`` (0 A, 1 B, 2 recovery)
    received at ``rx_ns``: drop it as a duplicate, hold it, or take it. Returns 0, or a
    book ``NEED_*`` status: grow the book and call again with the same packet (nothing is
    applied twice, nothing counted twice). Releasing held packets and declaring gaps is
    the caller's next step (``drain``, ``hole_check``), once per packet."""
    lb = line * shm.LINE_STRIDE
    status, seq, count = mold.parse_header(b, pos, end)
    if status == mold.P_SHORT or status == mold.P_BAD_BLOCKS:
        ctr[lb + shm.L_MALFORMED] += 1
        return 0
    for i in range(mold.SESSION_LEN):
        if b[pos + i] != session[i]:
            ctr[lb + shm.L_OTHER_SESSION] += 1
            return 0
    if status == mold.P_HEARTBEAT or status == mold.P_END:
        if status == mold.P_HEARTBEAT:
            ctr[lb + shm.L_HEARTBEATS] += 1
        else:
            ctr[lb + shm.L_END] += 1
            ctr[shm.A_END_SEQ] = seq
        if seq > ctr[shm.A_ANNOUNCED]:
            ctr[shm.A_ANNOUNCED] = seq
    else:
        last = seq + count
        if ctr[lb + shm.L_LAST_SEQ] < last - 1:
            ctr[lb + shm.L_LAST_SEQ] = last - 1
        if last > ctr[shm.A_ANNOUNCED]:
            ctr[shm.A_ANNOUNCED] = last
        nxt = ctr[shm.A_NEXT]
        if last <= nxt:
            ctr[lb + shm.L_DUPLICATES] += count
        elif seq > nxt:
            hold(b, pos, end, seq, count, line, rx_ns, t, ctr, hold_buf, hold_meta)
        else:
            st = take(
                b,
                pos,
                end,
                seq,
                count,
                line,
                rx_ns,
                t,
                ctr,
                orders,
                levels,
                sides,
                ladder,
                htab,
                stocks,
                meta,
                bctr,
                bbo,
                touched,
                lat,
                ring,
                rhdr,
                clk,
                rts,
                mbuf,
                mhdr,
            )
            if st != 0:
                return st
        ctr[lb + shm.L_MESSAGES] += count  # once the packet is done (a retry counts it)
    return 0
