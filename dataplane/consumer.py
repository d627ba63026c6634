"""The consumer: MoldUDP64 packets from both lines -> the arbiter (each sequence once, in
order; gaps to recovery) -> ITCH decode -> L3 book -> BBO publication. numba, nopython,
nogil; nothing allocated per packet.

``arbiter.on_packet`` is the whole per-packet path and does not care where the bytes came
from: the AF_XDP loop (``xdp_loop``, frames in UMEM), the kernel-socket loop
(``socket_loop``, ``recvmmsg`` into a preallocated buffer) and the recovery ring (answers
from the re-request server, ``service_recovery``) all call it.

Both loops take two tuples: ``arb = (ctr, hold_buf, hold_meta, gaps, control, recov,
recov_meta)`` -- counters, hold slots, the recovery rings and control, all shared memory
but the hold slots -- and ``bk_ = (orders, levels, sides, ladder, htab, stocks, meta,
bctr, bbo, touched, lat, ring, rhdr, clk, rts, mbuf, mhdr)``: the book's arrays, the BBO
table, scratch, latency histogram, the event ring (``dataplane.events``: records, header,
clock, clock scratch; a ring that is off has ``H_ON`` 0 and costs one compare a packet) and
the message ring of the journal (``dataplane.msgring``: bytes, header; off likewise).

When the book needs room (a ``NEED_*`` status) the loop returns with the packet kept
pending; the caller grows the book off the hot path (rebuilding ``bk_``) and calls the
loop again, which resumes that packet: the arbiter never applies a sequence twice.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from dataplane import arbiter, events, shm, xsk
from dataplane import book as bk
from dataplane.clock import int64_args, now_ns, real_ns
from dataplane.itch import rd_u16
from dataplane.sysabi import CMSG_TS, IOVEC, MMSGHDR, SCM_TIMESTAMPING, SOL_SOCKET
from dataplane.xdpabi import META, META_SIZE

OK = 0
STOPPED = 1  # control asked to stop
HOUSEKEEPING = 2  # time budget used up: the caller may check things and call again
SNAPSHOT = 3  # a level snapshot was requested (answered by the caller)
HALTED = 4  # an unrecoverable gap under the halt policy

MSG_DONTWAIT = 0x40


@intrinsic
def _recvmmsg(typingctx, fd, msgvec, vlen, flags, timeout):
    """``recvmmsg(fd, (struct mmsghdr *)msgvec, vlen, flags, (struct timespec *)timeout)``:
    messages received, or -1."""
    if not all(isinstance(a, types.Integer) for a in (fd, msgvec, vlen, flags, timeout)):
        return None

    def codegen(context, builder, sig, args):
        i32, i8p = ir.IntType(32), ir.IntType(8).as_pointer()
        return xsk.call_by_symbol(
            builder,
            "recvmmsg",
            i32,
            [i32, i8p, i32, i32, i8p],
            int64_args(context, builder, sig, args),
        )

    return types.int64(fd, msgvec, vlen, flags, timeout), codegen


@njit(cache=True, nogil=True, _nrt=False)
def count_rx(ctr, line, nbytes, rx_ns):
    lb = line * shm.LINE_STRIDE
    ctr[lb + shm.L_PACKETS] += 1
    ctr[lb + shm.L_BYTES] += nbytes
    ctr[lb + shm.L_RX_NS] = rx_ns


# --- shared by both loops -------------------------------------------------------------------
@njit(nogil=True, _nrt=False, inline="always")
def _packet(b, pos, end, line, rx_ns, t, session, arb, bk_):
    """One packet through the arbiter, then the arbiter's follow-up (``_idle``). Returns
    ``(need, done)``: a book ``NEED_*`` with ``done`` 0 means retry this packet; with
    ``done`` 1 the packet is finished and only the release of held packets waits for
    room (it resumes at the next packet or idle tick)."""
    ctr, hold_buf, hold_meta, _g, _c, _r, _rm = arb
    (
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
    ) = bk_
    need = arbiter.on_packet(
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
    )
    if need != 0:
        return need, 0
    return _idle(t, arb, bk_), 1


@njit(nogil=True, _nrt=False)
def service_recovery(t, session, arb, bk_):
    """Take what the recovery client put in the ``recov`` ring: answer packets through the
    arbiter, unrecoverable ranges through ``arbiter.lost``. Returns a book ``NEED_*``,
    ``-1`` when halted by policy, else 0."""
    ctr, _h, _hm, _g, control, recov, recov_meta = arb
    while control[shm.C_REC_TAIL] != control[shm.C_REC_HEAD]:
        tail = control[shm.C_REC_TAIL]
        i = tail % recov.shape[0]
        if recov_meta[i, 0] == shm.REC_DATA:
            n = recov_meta[i, 1]
            need, done = _packet(recov[i], 0, n, shm.LINE_RECOVERY, 0, t, session, arb, bk_)
            if done:
                count_rx(ctr, shm.LINE_RECOVERY, n, t)
                control[shm.C_REC_TAIL] = tail + 1
            if need != 0:
                return need  # not done: the entry stays for the retry
            continue
        lost_before = ctr[shm.A_UNRECOVERABLE_MSGS]
        if arbiter.lost(recov_meta[i, 2], recov_meta[i, 3], ctr, control, bk_[15], bk_[16]) == 0:
            return 0  # ahead of the sequence: once it gets there
        ring, rhdr, clk, rts = bk_[11], bk_[12], bk_[13], bk_[14]
        if ctr[shm.A_UNRECOVERABLE_MSGS] != lost_before and rhdr[events.H_ON] != 0:
            events.channel_event(
                ring,
                rhdr,
                clk,
                rts,
                events.CH_GAP_UNRECOVERABLE,
                events.NO_SIDE,
                ctr[shm.A_NEXT] - 1,
                recov_meta[i, 2],
                recov_meta[i, 3],
            )
        control[shm.C_REC_TAIL] = tail + 1
        if control[shm.C_HALTED] != 0:
            return -1
        need = _idle(t, arb, bk_)
        if need != 0:
            return need
    return 0


@njit(nogil=True, _nrt=False)
def _idle(t, arb, bk_):
    """Between packets: release what can be released, declare holes past the window."""
    ctr, hold_buf, hold_meta, gaps, control, _r, _rm = arb
    (
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
    ) = bk_
    if ctr[shm.A_HELD_NOW] > 0:
        need = arbiter.drain(
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
        )
        if need != 0:
            return need
    arbiter.hole_check(t, ctr, hold_meta, gaps, control)
    events.channel_tick(ctr, control, gaps, ring, rhdr, clk, rts)
    return 0


# --- kernel sockets ---------------------------------------------------------------------------
SLOT = 2048  # bytes per receive slot (a MoldUDP64 packet fits one datagram)

# private loop state (int64): the pending batch
P_LINE = 0
P_I = 1
P_N = 2
P_RX = 3  # when recvmmsg returned (the stamp of a message the kernel did not stamp)
P_OFF = 4  # CLOCK_REALTIME - CLOCK_MONOTONIC then (kernel stamps are on CLOCK_REALTIME)
PSTATE_LEN = 8
CMSG_TS_LEN = CMSG_TS.itemsize
CMSG_LEVEL_AT = CMSG_TS.fields["level"][1]
CMSG_TYPE_AT = CMSG_TS.fields["type"][1]
CMSG_SEC_AT = CMSG_TS.fields["sw_sec"][1]
CMSG_NSEC_AT = CMSG_TS.fields["sw_nsec"][1]


def socket_buffers(batch: int) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray], np.ndarray]:
    """Receive slots, (iovecs, control buffers) and mmsghdrs for ``recvmmsg`` on two
    lines. Each message has room for the kernel's software receive stamp (``CMSG_TS``;
    the sockets ask for it with ``SO_TIMESTAMPING``). The caller keeps the second item
    alive: the mmsghdrs point into it."""
    rbuf = np.zeros((2, batch * SLOT), np.uint8)
    iov = np.zeros((2, batch), IOVEC)
    cbuf = np.zeros((2, batch), CMSG_TS)
    mm = np.zeros((2, batch), MMSGHDR)
    for ln in range(2):
        for i in range(batch):
            iov[ln, i]["base"] = rbuf[ln].ctypes.data + i * SLOT
            iov[ln, i]["len"] = SLOT
            mm[ln, i]["hdr"]["iov"] = iov.ctypes.data + (ln * batch + i) * IOVEC.itemsize
            mm[ln, i]["hdr"]["iovlen"] = 1
            mm[ln, i]["hdr"]["control"] = cbuf.ctypes.data + (ln * batch + i) * CMSG_TS.itemsize
            mm[ln, i]["hdr"]["controllen"] = CMSG_TS.itemsize
    return rbuf, (iov, cbuf), mm


@njit(cache=True, nogil=True, inline="always", _nrt=False)
def _sw_stamp(h, off, fallback):
    """The kernel's software receive stamp of one received message (``h``: its msghdr),
    moved from CLOCK_REALTIME to CLOCK_MONOTONIC by ``off`` (realtime - monotonic, read
    when the batch arrived); ``fallback`` when the kernel gave none."""
    c = h.control
    if h.controllen < CMSG_TS_LEN:
        return fallback
    if xsk.load_u32(c + CMSG_LEVEL_AT) != SOL_SOCKET:
        return fallback
    if xsk.load_u32(c + CMSG_TYPE_AT) != SCM_TIMESTAMPING:
        return fallback
    real = np.int64(xsk.load_u64(c + CMSG_SEC_AT)) * 1_000_000_000 + np.int64(
        xsk.load_u64(c + CMSG_NSEC_AT)
    )
    if real <= 0:
        return fallback
    return real - off


@njit(nogil=True, _nrt=False)
def _housekeeping(t_end, ts, arb, bk_):
    """Every 64 idle polls: the arbiter's clock work and the control block. Returns a loop
    status or a book ``NEED_*`` (as ``(status, need)``), ``(-1, 0)`` to keep polling."""
    ctr = arb[0]
    control = arb[4]
    ctr[shm.S_LOOPS] += 64
    t = now_ns(ts)
    need = _idle(t, arb, bk_)
    if need != 0:
        return OK, need
    if control[shm.C_STOP] != 0:
        return STOPPED, 0
    if control[shm.C_SNAP_REQ] != control[shm.C_SNAP_DONE]:
        return SNAPSHOT, 0
    if t >= t_end:
        return HOUSEKEEPING, 0
    return -1, 0


@njit(cache=True, nogil=True, _nrt=False)
def socket_loop(fds, mm, rbuf, pstate, budget_ns, session, arb, bk_, ts):
    """Poll both lines' UDP sockets (non-blocking ``recvmmsg``) and the recovery ring,
    handle every packet until stopped, a snapshot is requested, the book needs room, the
    halt policy stops us, or ``budget_ns`` passed. Returns ``(status, need)``."""
    ctr = arb[0]
    control = arb[4]
    batch = mm.shape[1]
    t_end = now_ns(ts) + budget_ns
    loops = 0
    while True:
        if pstate[P_I] < pstate[P_N]:  # finish the pending batch first
            ln = pstate[P_LINE]
            i = pstate[P_I]
            off = i * SLOT
            rx = _sw_stamp(mm[ln, i].hdr, pstate[P_OFF], pstate[P_RX])
            need, done = _packet(
                rbuf[ln], off, off + mm[ln, i].len, ln, rx, now_ns(ts), session, arb, bk_
            )
            if done:
                mm[ln, i].hdr.controllen = CMSG_TS_LEN  # the kernel wrote what it used
            pstate[P_I] = i + done
            if need != 0:
                return OK, need
            continue
        if control[shm.C_REC_HEAD] != control[shm.C_REC_TAIL]:
            need = service_recovery(now_ns(ts), session, arb, bk_)
            if need != 0:
                return (HALTED, 0) if need < 0 else (OK, need)
        got = 0
        for ln in range(2):
            n = _recvmmsg(fds[ln], mm[ln].ctypes.data, batch, MSG_DONTWAIT, 0)
            if n > 0:
                t = now_ns(ts)
                off = real_ns(ts) - t
                ctr[shm.S_RX_BATCHES] += 1
                for i in range(n):
                    count_rx(ctr, ln, mm[ln, i].len, _sw_stamp(mm[ln, i].hdr, off, t))
                pstate[P_LINE] = ln
                pstate[P_I] = 0
                pstate[P_N] = n
                pstate[P_RX] = t
                pstate[P_OFF] = off
                got += n
                break  # handle this batch, then poll again (lines alternate by arrival)
        if got:
            continue
        loops += 1
        if (loops & 63) == 0:
            status, need = _housekeeping(t_end, ts, arb, bk_)
            if status >= 0:
                return status, need


# --- AF_XDP ---------------------------------------------------------------------------------
ETH_P_IP = 0x0800
ETH_P_8021Q = 0x8100
ETH_P_8021AD = 0x88A8
# the XDP program's struct tw_meta ends where the frame starts; its rx_ns is read from there
RX_NS_AT = META.fields["rx_ns"][1] - META_SIZE

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


@njit(cache=True, nogil=True, _nrt=False)
def xdp_loop(ri, umem_a, umem_b, pstate, pend, budget_ns, session, arb, bk_, ts):
    """Poll both lines' AF_XDP rx rings (``ri[0]`` A, ``ri[1]`` B: ``dataplane.xsk``
    ring info) and the recovery ring, handle every packet in UMEM, give each frame back to
    the fill ring. Same returns as ``socket_loop``."""
    ctr = arb[0]
    control = arb[4]
    batch = pend.shape[0]
    t_end = now_ns(ts) + budget_ns
    loops = 0
    while True:
        if pstate[P_I] < pstate[P_N]:
            i = pstate[P_I]
            ln = pend[i, X_LINE]
            u = umem_a if ln == 0 else umem_b
            need, done = _packet(
                u,
                pend[i, X_START],
                pend[i, X_END],
                ln,
                pend[i, X_RX],
                now_ns(ts),
                session,
                arb,
                bk_,
            )
            if done:
                if xsk.fill_put(ri[ln], pend[i, X_FRAME]) == 0:
                    ctr[shm.S_RING_FULL] += 1
                pstate[P_I] = i + 1
            if need != 0:
                return OK, need
            continue
        if control[shm.C_REC_HEAD] != control[shm.C_REC_TAIL]:
            need = service_recovery(now_ns(ts), session, arb, bk_)
            if need != 0:
                return (HALTED, 0) if need < 0 else (OK, need)
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
                rx = np.int64(xsk.load_u64(r[xsk.RI_UMEM_BASE] + addr + RX_NS_AT))
                count_rx(ctr, ln, length, rx)
                start, end = udp_payload(u, addr, length)
                frame_ = xsk.frame_addr(r, addr)
                if start < 0:
                    ctr[ln * shm.LINE_STRIDE + shm.L_MALFORMED] += 1
                    if xsk.fill_put(r, frame_) == 0:
                        ctr[shm.S_RING_FULL] += 1
                    continue
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
            for ln in range(2):
                if xsk.fill_needs_wakeup(ri[ln]):
                    xsk.kick(ri[ln])
                    ctr[shm.S_WAKEUPS] += 1
            status, need = _housekeeping(t_end, ts, arb, bk_)
            if status >= 0:
                return status, need


@njit(cache=True, nogil=True)
def snapshot(sides, ladder, levels, stocks, out, out_stocks, control, ctr, rhdr):
    """Answer a level-snapshot request into ``out`` (the shared ``levels`` region) and
    ``out_stocks``, tagged with the last sequence it includes and the event ring's position
    right after it (between packets: the book and the ring agree)."""
    for i in range(stocks.shape[0]):
        out_stocks[i] = stocks[i]
    control[shm.C_SNAP_SEQ] = ctr[shm.A_NEXT] - 1
    end = ctr[shm.A_END_SEQ]
    control[shm.C_SNAP_EOS] = end if end > 0 and ctr[shm.A_NEXT] >= end else 0
    control[shm.C_SNAP_STATE] = (
        rhdr[events.P_LINE] | rhdr[events.P_LINE + 1] << 8 | rhdr[events.P_STALE] << 16
    )
    control[shm.C_SNAP_POS] = rhdr[events.H_WRITE]
    n = bk.count_levels(sides)
    if n > out.shape[0]:
        control[shm.C_SNAP_TRUNC] = 1
        control[shm.C_SNAP_ROWS] = 0
    else:
        bk.export_levels(sides, ladder, levels, out)
        control[shm.C_SNAP_TRUNC] = 0
        control[shm.C_SNAP_ROWS] = n
    control[shm.C_SNAP_DONE] = control[shm.C_SNAP_REQ]
