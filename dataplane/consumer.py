"""The consumer: MoldUDP64 packets from both lines -> each sequence once -> ITCH decode ->
L3 book -> BBO publication. numba, nopython, nogil; nothing allocated per packet.

``on_packet`` is the whole per-packet path and does not care where the bytes came from:
the AF_XDP loop (``xdp_loop``, frames in UMEM) and the kernel-socket loop
(``socket_loop``, ``recvmmsg`` into a preallocated buffer) both call it.

Sequencing here is first-copy-wins: a message whose sequence was already taken (from
either line) is counted as a duplicate and never reaches the book; a packet that starts
past the next expected sequence is applied and the skipped range is counted as a gap (the
arbiter with gap recovery replaces this). A packet that overlaps what was taken has only
its new messages applied.

When the book needs room (a ``NEED_*`` status) the loop returns with the packet kept
pending; the caller grows the book off the hot path and calls the loop again, which
resumes that packet -- the messages already applied count as duplicates of themselves and
are skipped, so nothing is applied twice.
"""

from __future__ import annotations

import ctypes

import numpy as np
from numba import njit, types
from numba.extending import intrinsic

from dataplane import book as bk
from dataplane import itch, shm, xsk
from dataplane import moldudp64 as mold
from dataplane.itch import rd_u16

OK = 0
STOPPED = 1  # control asked to stop
HOUSEKEEPING = 2  # time budget used up: the caller may check things and call again
SNAPSHOT = 3  # a level snapshot was requested (answered by the caller)

_libc = ctypes.CDLL(None, use_errno=True)
_clock_gettime = _libc.clock_gettime
_clock_gettime.argtypes = [ctypes.c_int, ctypes.c_size_t]
_clock_gettime.restype = ctypes.c_int
_recvmmsg = _libc.recvmmsg
_recvmmsg.argtypes = [ctypes.c_int, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_size_t]
_recvmmsg.restype = ctypes.c_int
CLOCK_MONOTONIC = 1
MSG_DONTWAIT = 0x40


@intrinsic
def compiler_fence(typingctx):
    """A release fence: on x86 it only stops the compiler moving stores across it, which
    is what the seqlock needs (the CPU keeps stores in order)."""

    def codegen(context, builder, sig, args):
        builder.fence("release")
        return context.get_dummy_value()

    return types.none(), codegen


@njit(nogil=True, inline="always", _nrt=False)
def now_ns(ts):
    """CLOCK_MONOTONIC in ns (the clock bpf_ktime_get_ns reads); ``ts``: int64[2]."""
    _clock_gettime(CLOCK_MONOTONIC, ts.ctypes.data)
    return ts[0] * 1_000_000_000 + ts[1]


@njit(cache=True, nogil=True, inline="always", _nrt=False)
def lat_bucket(v):
    if v < shm.LAT_SUB:
        return max(v, 0)
    e = 0
    x = v
    while x > 1:
        x >>= 1
        e += 1
    return (e - 2) * shm.LAT_SUB + ((v >> (e - 3)) & (shm.LAT_SUB - 1))


@njit(cache=True, nogil=True, inline="always", _nrt=False)
def publish_bbo(bbo, sides, locate, feed_seq, t):
    """Copy one locate's cached best levels into its seqlocked record when they changed."""
    b = sides[2 * locate]
    a = sides[2 * locate + 1]
    r = bbo[locate]
    if r.bid_px == b.best_px and r.bid_qty == b.best_qty and r.ask_px == a.best_px and \
            r.ask_qty == a.best_qty:  # fmt: skip
        return
    r.seq += 1
    compiler_fence()
    r.bid_px = b.best_px
    r.bid_qty = b.best_qty
    r.ask_px = a.best_px
    r.ask_qty = a.best_qty
    r.feed_seq = feed_seq
    r.update_ns = t
    compiler_fence()
    r.seq += 1


@njit(cache=True, nogil=True, _nrt=False)
def on_packet(b, pos, end, line, rx_ns, t_ns, session, ctr, orders, levels, sides, ladder,
              htab, stocks, meta, bctr, bbo, touched, lat):  # fmt: skip
    """Handle one MoldUDP64 packet in ``b[pos:end]`` that arrived on ``line`` (0 A, 1 B)
    at ``rx_ns``. Returns 0, or a book ``NEED_*`` status (nothing after the message that
    did not fit was applied; call again with the same packet after growing)."""
    lb = line * shm.LINE_STRIDE
    status, seq, count = mold.parse_header(b, pos, end)
    if status == mold.P_SHORT or status == mold.P_BAD_BLOCKS:
        ctr[lb + shm.L_MALFORMED] += 1
        return 0
    for i in range(mold.SESSION_LEN):
        if b[pos + i] != session[i]:
            ctr[lb + shm.L_OTHER_SESSION] += 1
            return 0
    if status == mold.P_HEARTBEAT:
        ctr[lb + shm.L_HEARTBEATS] += 1
        return 0
    if status == mold.P_END:
        ctr[lb + shm.L_END] += 1
        ctr[shm.A_END_SEQ] = seq
        return 0
    nxt = ctr[shm.A_NEXT]
    last = seq + count
    if ctr[lb + shm.L_LAST_SEQ] < last - 1:
        ctr[lb + shm.L_LAST_SEQ] = last - 1
    if last <= nxt:  # every message already taken
        ctr[lb + shm.L_DUPLICATES] += count
        return 0
    p = pos + mold.HEADER_LEN
    s = seq
    while s < nxt:  # skip the part already taken
        p += 2 + rd_u16(b, p)
        s += 1
    if s > nxt:
        ctr[shm.A_GAP_MESSAGES] += s - nxt
        ctr[shm.A_GAP_EVENTS] += 1
    ctr[lb + shm.L_DUPLICATES] += s - seq
    n_touch = 0
    q = p
    while q < end and n_touch < touched.shape[0]:  # locates this packet may change
        if rd_u16(b, q) >= 3:
            touched[n_touch] = rd_u16(b, q + 3)
            n_touch += 1
        q += 2 + rd_u16(b, q)
    st, stop = bk.apply_stream(b, p, end, orders, levels, sides, ladder, htab, stocks, meta,
                               bctr)  # fmt: skip
    applied = 0
    q = p
    while q < stop:
        q += 2 + rd_u16(b, q)
        applied += 1
    ctr[shm.A_NEXT] = s + applied
    ctr[shm.A_TAKEN] += applied
    ctr[lb + shm.L_FIRST_TAKEN] += applied
    for k in range(n_touch):
        publish_bbo(bbo, sides, touched[k], s + applied - 1, t_ns)
    if st != itch.OK:
        # NEED_*: the rest waits for the caller to grow the book. The retry will skip what
        # was applied as already taken; take back the duplicates it will count again.
        ctr[lb + shm.L_DUPLICATES] -= (s - seq) + applied
        return st
    ctr[shm.A_PACKETS] += 1
    if rx_ns > 0 and t_ns >= rx_ns:
        lat[lat_bucket(t_ns - rx_ns)] += 1
    return 0


@njit(cache=True, nogil=True, _nrt=False)
def count_rx(ctr, line, nbytes, rx_ns):
    lb = line * shm.LINE_STRIDE
    ctr[lb + shm.L_PACKETS] += 1
    ctr[lb + shm.L_BYTES] += nbytes
    ctr[lb + shm.L_RX_NS] = rx_ns


@njit(cache=True, nogil=True, _nrt=False)
def count_messages(b, pos, end, ctr, line):
    status, seq, count = mold.parse_header(b, pos, end)
    if status == mold.P_DATA:
        ctr[line * shm.LINE_STRIDE + shm.L_MESSAGES] += count


# --- kernel sockets ---------------------------------------------------------------------------
SLOT = 2048  # bytes per receive slot (a MoldUDP64 packet fits one datagram)
IOVEC = np.dtype([("base", np.uint64), ("len", np.uint64)])
MSGHDR = np.dtype(
    [("name", np.uint64), ("namelen", np.uint32), ("_p0", np.uint32), ("iov", np.uint64),
     ("iovlen", np.uint64), ("control", np.uint64), ("controllen", np.uint64),
     ("flags", np.int32), ("_p1", np.int32)],
)  # fmt: skip
MMSGHDR = np.dtype([("hdr", MSGHDR), ("len", np.uint32), ("_p", np.uint32)])

# private loop state (int64): the pending batch of the socket loop
P_LINE = 0
P_I = 1
P_N = 2
P_RX = 3
PSTATE_LEN = 8


def socket_buffers(batch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Receive slots, iovecs and mmsghdrs for ``recvmmsg`` on two lines."""
    rbuf = np.zeros((2, batch * SLOT), np.uint8)
    iov = np.zeros((2, batch), IOVEC)
    mm = np.zeros((2, batch), MMSGHDR)
    for ln in range(2):
        for i in range(batch):
            iov[ln, i]["base"] = rbuf[ln].ctypes.data + i * SLOT
            iov[ln, i]["len"] = SLOT
            mm[ln, i]["hdr"]["iov"] = iov.ctypes.data + (ln * batch + i) * IOVEC.itemsize
            mm[ln, i]["hdr"]["iovlen"] = 1
    return rbuf, iov, mm


@njit(nogil=True, _nrt=False)
def socket_loop(fds, mm, rbuf, pstate, budget_ns, session, ctr, orders, levels, sides, ladder,
                htab, stocks, meta, bctr, bbo, touched, lat, control, ts):  # fmt: skip
    """Poll both lines' UDP sockets (non-blocking ``recvmmsg``) and handle every packet
    until stopped, a snapshot is requested, the book needs room, or ``budget_ns`` passed.
    Returns ``(status, need)``."""
    batch = mm.shape[1]
    t_end = now_ns(ts) + budget_ns
    loops = 0
    while True:
        if pstate[P_I] < pstate[P_N]:  # finish the pending batch first
            ln = pstate[P_LINE]
            i = pstate[P_I]
            off = i * SLOT
            t = now_ns(ts)
            need = on_packet(rbuf[ln], off, off + mm[ln, i].len, ln, pstate[P_RX], t, session,
                             ctr, orders, levels, sides, ladder, htab, stocks, meta, bctr, bbo,
                             touched, lat)  # fmt: skip
            if need != 0:
                return OK, need
            pstate[P_I] = i + 1
            continue
        got = 0
        for ln in range(2):
            n = _recvmmsg(fds[ln], mm[ln].ctypes.data, batch, MSG_DONTWAIT, 0)
            if n > 0:
                t = now_ns(ts)
                ctr[shm.S_RX_BATCHES] += 1
                for i in range(n):
                    off = i * SLOT
                    count_rx(ctr, ln, mm[ln, i].len, t)
                    count_messages(rbuf[ln], off, off + mm[ln, i].len, ctr, ln)
                pstate[P_LINE] = ln
                pstate[P_I] = 0
                pstate[P_N] = n
                pstate[P_RX] = t  # receive time: when recvmmsg returned
                got += n
                break  # handle this batch, then poll again (lines alternate by arrival)
        if got:
            continue
        loops += 1
        if (loops & 63) == 0:
            ctr[shm.S_LOOPS] += 64
            if control[shm.C_STOP] != 0:
                return STOPPED, 0
            if control[shm.C_SNAP_REQ] != control[shm.C_SNAP_DONE]:
                return SNAPSHOT, 0
            if now_ns(ts) >= t_end:
                return HOUSEKEEPING, 0


# --- AF_XDP ---------------------------------------------------------------------------------
ETH_P_IP = 0x0800
ETH_P_8021Q = 0x8100
ETH_P_8021AD = 0x88A8
META_LEN = 16  # struct tw_meta (bpf/common.h) in front of the frame: rx_ns u64, channel, line

# pending rows of the AF_XDP loop: payload start and end (UMEM offsets), line, rx time,
# frame address to recycle
X_START = 0
X_END = 1
X_LINE = 2
X_RX = 3
X_FRAME = 4
X_COLS = 5


@njit(cache=True, nogil=True, inline="always", _nrt=False)
def udp_payload(u, addr, length):
    """``(start, end)`` of the UDP payload of the Ethernet frame at ``u[addr:addr+length]``,
    or ``(-1, -1)`` when the headers do not hold together (the XDP program checked them;
    this is the consumer's own guard)."""
    end = addr + length
    p = addr + 14
    if p > end:
        return -1, -1
    et = rd_u16(u, addr + 12)
    if et == ETH_P_8021Q or et == ETH_P_8021AD:
        if p + 4 > end:
            return -1, -1
        et = rd_u16(u, p + 2)
        p += 4
    if et != ETH_P_IP or p + 20 > end:
        return -1, -1
    ihl = (u[p] & 0x0F) * 4
    if ihl < 20 or u[p + 9] != 17 or p + ihl + 8 > end:
        return -1, -1
    udp = p + ihl
    ulen = rd_u16(u, udp + 4)
    if ulen < 8 or udp + ulen > end:
        return -1, -1
    return udp + 8, udp + ulen


@njit(nogil=True, _nrt=False)
def xdp_loop(ri, umem_a, umem_b, pstate, pend, budget_ns, session, ctr, orders, levels, sides,
             ladder, htab, stocks, meta, bctr, bbo, touched, lat, control, ts):  # fmt: skip
    """Poll both lines' AF_XDP rx rings (``ri[0]`` A, ``ri[1]`` B: ``dataplane.xsk``
    ring info), handle every packet in UMEM, give each frame back to the fill ring. Same
    returns as ``socket_loop``."""
    batch = pend.shape[0]
    t_end = now_ns(ts) + budget_ns
    loops = 0
    while True:
        if pstate[P_I] < pstate[P_N]:
            i = pstate[P_I]
            ln = pend[i, X_LINE]
            u = umem_a if ln == 0 else umem_b
            t = now_ns(ts)
            need = on_packet(u, pend[i, X_START], pend[i, X_END], ln, pend[i, X_RX], t,
                             session, ctr, orders, levels, sides, ladder, htab, stocks, meta,
                             bctr, bbo, touched, lat)  # fmt: skip
            if need != 0:
                return OK, need
            if xsk.fill_put(ri[ln], pend[i, X_FRAME]) == 0:
                ctr[shm.S_RING_FULL] += 1
            pstate[P_I] = i + 1
            continue
        got = 0
        for ln in range(2):
            r = ri[ln]
            n, idx = xsk.rx_peek(r, batch)
            if n == 0:
                continue
            u = umem_a if ln == 0 else umem_b
            k = 0
            for j in range(n):
                addr, length = xsk.rx_desc(r, idx + j)
                rx = np.int64(xsk.load_u64(r[xsk.RI_UMEM_BASE] + addr - META_LEN))
                count_rx(ctr, ln, length, rx)
                start, end = udp_payload(u, addr, length)
                frame_ = xsk.frame_addr(r, addr)
                if start < 0:
                    ctr[ln * shm.LINE_STRIDE + shm.L_MALFORMED] += 1
                    if xsk.fill_put(r, frame_) == 0:
                        ctr[shm.S_RING_FULL] += 1
                    continue
                count_messages(u, start, end, ctr, ln)
                pend[k, X_START] = start
                pend[k, X_END] = end
                pend[k, X_LINE] = ln
                pend[k, X_RX] = rx
                pend[k, X_FRAME] = frame_
                k += 1
            xsk.rx_release(r, n)
            ctr[shm.S_RX_BATCHES] += 1
            pstate[P_I] = 0
            pstate[P_N] = k
            got = n
            break
        if got:
            continue
        loops += 1
        if (loops & 63) == 0:
            ctr[shm.S_LOOPS] += 64
            for ln in range(2):
                if xsk.fill_needs_wakeup(ri[ln]):
                    xsk.kick(ri[ln])
                    ctr[shm.S_WAKEUPS] += 1
            if control[shm.C_STOP] != 0:
                return STOPPED, 0
            if control[shm.C_SNAP_REQ] != control[shm.C_SNAP_DONE]:
                return SNAPSHOT, 0
            if now_ns(ts) >= t_end:
                return HOUSEKEEPING, 0


@njit(cache=True, nogil=True)
def snapshot(sides, ladder, levels, out, control):
    """Answer a level-snapshot request into ``out`` (the shared ``levels`` region)."""
    n = bk.count_levels(sides)
    if n > out.shape[0]:
        control[shm.C_SNAP_TRUNC] = 1
        control[shm.C_SNAP_ROWS] = 0
    else:
        bk.export_levels(sides, ladder, levels, out)
        control[shm.C_SNAP_TRUNC] = 0
        control[shm.C_SNAP_ROWS] = n
    control[shm.C_SNAP_DONE] = control[shm.C_SNAP_REQ]

