"""Deterministic generator of synthetic Nasdaq TotalView-ITCH 5.0 sessions.

Contract
--------
``generate(n_messages, n_stocks, seed)`` returns a ``uint8`` array in the Nasdaq binary
file format (each message preceded by its 2-byte big-endian length) holding EXACTLY
``n_messages`` messages. The same arguments always give the same bytes; a different
``seed`` gives different bytes. Every message has the length the spec gives its type.

Session structure, in order: ``S O``; one ``R`` per stock (unique 1-8 letter symbols,
locates ``1..n_stocks-1`` plus one stock at locate 65,535); two each of ``L Y V W K J h
N O``; ``S S``; ``H`` (state ``T``) per stock; pre-market trading; ``I`` (NOII); ``S Q``; an
opening ``Q`` cross per stock; the continuous session; ``H T`` for any stock still halted;
closing ``I``; a closing ``Q`` cross per stock; ``S M``; ``S E``; ``S C``. Timestamps never
decrease and run from 04:00 to 20:00.

The book the session describes is always valid: ``E C X D U`` name live orders, never
take more shares than rest and never zero; ``A F U`` never reuse a live reference and
never carry zero shares; no book is ever locked or crossed after any message. An add
that would lock or cross is a marketable order: it executes (``E``, sometimes ``C``)
against the opposite side in price-time priority (best price, then smallest reference =
oldest), all executions sharing one timestamp, and only a remainder that no longer
crosses rests. A ``U`` never crosses (its price is pulled back). ``P`` trades carry order
reference 0 and side ``B``, as Nasdaq sends them.

Edge values present in every session (all sessions have at least 2,000 messages): order
references crossing 2^32, a stock priced about $300,000 (Price(4) raw above 2^31),
orders of more than 65,535 shares, a multi-order sweep (repeated timestamps), locate
65,535 with orders, a stock whose book becomes empty mid-session, and every message type
of the spec.

This module is the reference for testing the production decoder and book, so it shares
no code with ``dataplane``.
"""

from __future__ import annotations

import os
import random

import numba
import numpy as np

__all__ = ["generate", "write_session", "count_by_type", "min_messages"]

MIN_MESSAGES = 2_000
MAX_STOCKS = 9_999
CAP = 256  # most live orders one stock may hold
MAX_MSG_LEN = 50  # longest message type (I), without the 2-byte length prefix

_NS = 1_000_000_000
_HOUR = 3600 * _NS
_T_START = 4 * _HOUR
_T_OPEN = 9 * _HOUR + 30 * 60 * _NS
_T_CLOSE = 16 * _HOUR
_T_END = 20 * _HOUR

# st[]: scalar generator state
_POS, _NMSG, _TS, _REF, _MATCH, _TRACK, _END, _NHALT, _MATCH0 = range(9)
# sinfo[s, ]: per-stock state
_CNT, _MID, _TICK, _LOC, _HALT, _LO, _HI, _TGT = range(8)
# orders[s, k, ]: live orders of a stock, unordered (priority is price, then ref)
_OREF, _OSIDE, _OPX, _OSH = range(4)
_BUY, _SELL = 0, 1

_MPIDS = np.frombuffer(b"GSCOMSCOUBSSJPMSCDRGVIRTNITEETRF", dtype=np.uint8).reshape(-1, 4).copy()


def min_messages(n_stocks: int) -> int:
    """Smallest session ``generate`` accepts for ``n_stocks`` stocks."""
    return max(MIN_MESSAGES, 4 * n_stocks + 1_100)


# --------------------------------------------------------------------------- bytes


@numba.njit(cache=True, inline="always")
def _put(buf, p, v, n):
    for i in range(n):
        buf[p + n - 1 - i] = (v >> (8 * i)) & 0xFF


@numba.njit(cache=True)
def _msg(buf, st, mtype, length, locate):
    """Write length prefix and header; return the message's offset (header byte 0)."""
    p = st[_POS]
    buf[p] = (length >> 8) & 0xFF
    buf[p + 1] = length & 0xFF
    m = p + 2
    buf[m] = mtype
    _put(buf, m + 1, locate, 2)
    _put(buf, m + 3, st[_TRACK] & 0xFFFF, 2)
    st[_TRACK] += 1
    _put(buf, m + 5, st[_TS], 6)
    st[_POS] = m + length
    st[_NMSG] += 1
    return m


@numba.njit(cache=True, inline="always")
def _sym(buf, p, sym, s):
    for i in range(8):
        buf[p + i] = sym[s, i]


@numba.njit(cache=True, inline="always")
def _fill(buf, p, n, c):
    for i in range(n):
        buf[p + i] = c


@numba.njit(cache=True)
def _adv(st, step, cap):
    """Advance the clock by 0..2*step ns, never past cap, never backwards."""
    t = st[_TS] + np.random.randint(0, 2 * step + 1)
    if t > cap:
        t = cap
    if t > st[_TS]:
        st[_TS] = t


@numba.njit(cache=True)
def _room(st):
    return st[_END] - st[_NHALT] - st[_NMSG]


@numba.njit(cache=True)
def _geom(p):
    """0, 1, 2, ... with P(k) = p (1-p)^k."""
    u = np.random.random()
    return int(np.log(1.0 - u) / np.log(1.0 - p))


@numba.njit(cache=True)
def _shares():
    u = np.random.random()
    if u < 0.004:
        return np.random.randint(65_536, 500_001)
    if u < 0.15:
        return np.random.randint(1, 100)
    return 100 * (1 + _geom(0.35))


# --------------------------------------------------------------------------- book


@numba.njit(cache=True)
def _best(orders, sinfo, s, side):
    """Index of the highest-priority order on one side of a stock, or -1."""
    best = -1
    bpx = 0
    bref = 0
    for k in range(sinfo[s, _CNT]):
        if orders[s, k, _OSIDE] != side:
            continue
        px = orders[s, k, _OPX]
        ref = orders[s, k, _OREF]
        if best < 0:
            better = True
        elif side == _BUY:
            better = px > bpx or (px == bpx and ref < bref)
        else:
            better = px < bpx or (px == bpx and ref < bref)
        if better:
            best = k
            bpx = px
            bref = ref
    return best


@numba.njit(cache=True)
def _remove(orders, sinfo, s, k):
    last = sinfo[s, _CNT] - 1
    for f in range(4):
        orders[s, k, f] = orders[s, last, f]
    sinfo[s, _CNT] = last


@numba.njit(cache=True)
def _emit_add(buf, st, sym, orders, sinfo, s, side, px, sh, mpid):
    ref = st[_REF]
    st[_REF] += 1
    if mpid:
        m = _msg(buf, st, ord("F"), 40, sinfo[s, _LOC])
        j = np.random.randint(0, _MPIDS.shape[0])
        for i in range(4):
            buf[m + 36 + i] = _MPIDS[j, i]
    else:
        m = _msg(buf, st, ord("A"), 36, sinfo[s, _LOC])
    _put(buf, m + 11, ref, 8)
    buf[m + 19] = ord("B") if side == _BUY else ord("S")
    _put(buf, m + 20, sh, 4)
    _sym(buf, m + 24, sym, s)
    _put(buf, m + 32, px, 4)
    k = sinfo[s, _CNT]
    orders[s, k, _OREF] = ref
    orders[s, k, _OSIDE] = side
    orders[s, k, _OPX] = px
    orders[s, k, _OSH] = sh
    sinfo[s, _CNT] = k + 1


@numba.njit(cache=True)
def _emit_exec(buf, st, orders, sinfo, s, k, n, use_c):
    st[_MATCH] += 1
    if use_c:
        m = _msg(buf, st, ord("C"), 36, sinfo[s, _LOC])
        buf[m + 31] = ord("Y") if np.random.random() < 0.8 else ord("N")
        # the print may be better than the order's limit (never worse); the book keeps
        # the order at the level it rests on
        px = orders[s, k, _OPX]
        tick = sinfo[s, _TICK]
        if np.random.random() < 0.3:
            if orders[s, k, _OSIDE] == _SELL:
                px += tick
            elif px > tick:
                px -= tick
        _put(buf, m + 32, px, 4)
    else:
        m = _msg(buf, st, ord("E"), 31, sinfo[s, _LOC])
    _put(buf, m + 11, orders[s, k, _OREF], 8)
    _put(buf, m + 19, n, 4)
    _put(buf, m + 23, st[_MATCH], 8)
    if n >= orders[s, k, _OSH]:
        _remove(orders, sinfo, s, k)
    else:
        orders[s, k, _OSH] -= n


@numba.njit(cache=True)
def _emit_cancel(buf, st, orders, sinfo, s, k, n):
    m = _msg(buf, st, ord("X"), 23, sinfo[s, _LOC])
    _put(buf, m + 11, orders[s, k, _OREF], 8)
    _put(buf, m + 19, n, 4)
    orders[s, k, _OSH] -= n


@numba.njit(cache=True)
def _emit_delete(buf, st, orders, sinfo, s, k):
    m = _msg(buf, st, ord("D"), 19, sinfo[s, _LOC])
    _put(buf, m + 11, orders[s, k, _OREF], 8)
    _remove(orders, sinfo, s, k)


@numba.njit(cache=True)
def _near_px(sinfo, s, side):
    """A passive price near the stock's mid: bids at or below mid, asks above it."""
    d = _geom(0.25)
    if side == _BUY:
        t = sinfo[s, _MID] - d
    else:
        t = sinfo[s, _MID] + 1 + d
    if t < 1:
        t = 1
    return t * sinfo[s, _TICK]


@numba.njit(cache=True)
def _order(buf, st, sym, orders, sinfo, s, side, px, sh, mpid, c_frac):
    """Enter an order: sweep the opposite side while it crosses, rest any remainder.

    Executions share the current timestamp. Stops (dropping the remainder, as an
    immediate-or-cancel order would) when the message budget runs out.
    """
    opp = 1 - side
    while sh > 0:
        k = _best(orders, sinfo, s, opp)
        if k < 0:
            break
        opx = orders[s, k, _OPX]
        if (side == _BUY and opx > px) or (side == _SELL and opx < px):
            break
        if _room(st) < 1:
            return
        n = min(sh, orders[s, k, _OSH])
        _emit_exec(buf, st, orders, sinfo, s, k, n, np.random.random() < c_frac)
        sh -= n
    if sh > 0 and _room(st) >= 1 and sinfo[s, _CNT] < CAP:
        _emit_add(buf, st, sym, orders, sinfo, s, side, px, sh, mpid)


@numba.njit(cache=True)
def _random_add(buf, st, sym, orders, sinfo, s):
    side = np.random.randint(0, 2)
    if np.random.random() < 0.04:
        # marketable: priced through the mid, so it sweeps whatever rests there
        d = _geom(0.5)
        if side == _BUY:
            t = sinfo[s, _MID] + 1 + d
        else:
            t = max(1, sinfo[s, _MID] - d)
        px = t * sinfo[s, _TICK]
    else:
        px = _near_px(sinfo, s, side)
    _order(buf, st, sym, orders, sinfo, s, side, px, _shares(), np.random.random() < 0.1, 0.15)


@numba.njit(cache=True)
def _replace(buf, st, orders, sinfo, s, k):
    side = orders[s, k, _OSIDE]
    tick = sinfo[s, _TICK]
    px = _near_px(sinfo, s, side)
    o = _best(orders, sinfo, s, 1 - side)
    if o >= 0:
        opx = orders[s, o, _OPX]
        if side == _BUY and px >= opx:
            px = opx - tick
        elif side == _SELL and px <= opx:
            px = opx + tick
    if px < tick:
        _emit_delete(buf, st, orders, sinfo, s, k)
        return
    if np.random.random() < 0.3:
        sh = orders[s, k, _OSH]
    else:
        sh = _shares()
    new = st[_REF]
    st[_REF] += 1
    m = _msg(buf, st, ord("U"), 35, sinfo[s, _LOC])
    _put(buf, m + 11, orders[s, k, _OREF], 8)
    _put(buf, m + 19, new, 8)
    _put(buf, m + 27, sh, 4)
    _put(buf, m + 31, px, 4)
    orders[s, k, _OREF] = new
    orders[s, k, _OPX] = px
    orders[s, k, _OSH] = sh


@numba.njit(cache=True)
def _exec_top(buf, st, orders, sinfo, s, use_c):
    """A market order hitting the front of one side's best level; False if none rests."""
    side = np.random.randint(0, 2)
    k = _best(orders, sinfo, s, side)
    if k < 0:
        k = _best(orders, sinfo, s, 1 - side)
        if k < 0:
            return False
    sh = orders[s, k, _OSH]
    n = sh if (sh == 1 or np.random.random() < 0.5) else np.random.randint(1, sh)
    _emit_exec(buf, st, orders, sinfo, s, k, n, use_c)
    return True


@numba.njit(cache=True)
def _trade(buf, st, sym, sinfo, s):
    st[_MATCH] += 1
    m = _msg(buf, st, ord("P"), 44, sinfo[s, _LOC])
    _put(buf, m + 11, 0, 8)
    buf[m + 19] = ord("B")
    _put(buf, m + 20, _shares(), 4)
    _sym(buf, m + 24, sym, s)
    _put(buf, m + 32, sinfo[s, _MID] * sinfo[s, _TICK], 4)
    _put(buf, m + 36, st[_MATCH], 8)


@numba.njit(cache=True)
def _broken(buf, st, sinfo, s):
    m = _msg(buf, st, ord("B"), 19, sinfo[s, _LOC])
    lo = st[_MATCH0] + 1
    hi = st[_MATCH]
    mt = hi if hi <= lo else np.random.randint(max(lo, hi - 1000), hi + 1)
    _put(buf, m + 11, mt, 8)


@numba.njit(cache=True)
def _action(buf, st, sym, sinfo, s, state):
    m = _msg(buf, st, ord("H"), 25, sinfo[s, _LOC])
    _sym(buf, m + 11, sym, s)
    buf[m + 19] = state
    buf[m + 20] = ord(" ")
    if state == ord("H"):
        buf[m + 21] = ord("T")
        buf[m + 22] = ord("1")
        buf[m + 23] = ord(" ")
        buf[m + 24] = ord(" ")
    else:
        _fill(buf, m + 21, 4, ord(" "))


@numba.njit(cache=True)
def _cross(buf, st, sym, sinfo, s, ctype):
    st[_MATCH] += 1
    m = _msg(buf, st, ord("Q"), 40, sinfo[s, _LOC])
    _put(buf, m + 11, np.random.randint(100, 2_000_000), 8)
    _sym(buf, m + 19, sym, s)
    _put(buf, m + 27, sinfo[s, _MID] * sinfo[s, _TICK], 4)
    _put(buf, m + 31, st[_MATCH], 8)
    buf[m + 39] = ctype


@numba.njit(cache=True)
def _noii(buf, st, sym, sinfo, s, ctype):
    m = _msg(buf, st, ord("I"), 50, sinfo[s, _LOC])
    paired = np.random.randint(0, 1_000_000)
    imb = np.random.randint(0, 200_000)
    _put(buf, m + 11, paired, 8)
    _put(buf, m + 19, imb, 8)
    buf[m + 27] = ord("N") if imb == 0 else (ord("B") if np.random.random() < 0.5 else ord("S"))
    _sym(buf, m + 28, sym, s)
    px = sinfo[s, _MID] * sinfo[s, _TICK]
    _put(buf, m + 36, px, 4)
    _put(buf, m + 40, px, 4)
    _put(buf, m + 44, px, 4)
    buf[m + 48] = ctype
    buf[m + 49] = ord("L") if np.random.random() < 0.5 else ord(" ")


@numba.njit(cache=True)
def _system(buf, st, code):
    m = _msg(buf, st, ord("S"), 12, 0)
    buf[m + 11] = code


@numba.njit(cache=True)
def _directory(buf, st, sym, sinfo, s):
    m = _msg(buf, st, ord("R"), 39, sinfo[s, _LOC])
    _sym(buf, m + 11, sym, s)
    u = np.random.random()
    buf[m + 19] = ord("Q") if u < 0.5 else (ord("G") if u < 0.7 else ord("N"))
    buf[m + 20] = ord("N")
    _put(buf, m + 21, 100, 4)
    buf[m + 25] = ord("N")
    buf[m + 26] = ord("C")
    buf[m + 27] = ord("Z")
    buf[m + 28] = ord(" ")
    buf[m + 29] = ord("P")
    buf[m + 30] = ord("N")
    buf[m + 31] = ord("N")
    buf[m + 32] = ord("1") if np.random.random() < 0.3 else ord("2")
    buf[m + 33] = ord("N")
    _put(buf, m + 34, 0, 4)
    buf[m + 38] = ord("N")


@numba.njit(cache=True)
def _misc(buf, st, sym, sinfo, n_stocks):
    """Two each of L Y V W K J h N O, on random stocks."""
    for _ in range(2):
        s = np.random.randint(0, n_stocks)
        loc = sinfo[s, _LOC]
        px = sinfo[s, _MID] * sinfo[s, _TICK]
        m = _msg(buf, st, ord("L"), 26, loc)
        j = np.random.randint(0, _MPIDS.shape[0])
        for i in range(4):
            buf[m + 11 + i] = _MPIDS[j, i]
        _sym(buf, m + 15, sym, s)
        buf[m + 23] = ord("Y")
        buf[m + 24] = ord("N")
        buf[m + 25] = ord("A")

        m = _msg(buf, st, ord("Y"), 20, loc)
        _sym(buf, m + 11, sym, s)
        buf[m + 19] = ord("0")

        m = _msg(buf, st, ord("V"), 35, 0)
        _put(buf, m + 11, 3_500_000_000_000, 8)
        _put(buf, m + 19, 3_200_000_000_000, 8)
        _put(buf, m + 27, 2_800_000_000_000, 8)

        m = _msg(buf, st, ord("W"), 12, 0)
        buf[m + 11] = ord("1")

        m = _msg(buf, st, ord("K"), 28, loc)
        _sym(buf, m + 11, sym, s)
        _put(buf, m + 19, 9 * 3600 + 45 * 60, 4)
        buf[m + 23] = ord("A")
        _put(buf, m + 24, px, 4)

        m = _msg(buf, st, ord("J"), 35, loc)
        _sym(buf, m + 11, sym, s)
        _put(buf, m + 19, px, 4)
        _put(buf, m + 23, px + px // 10, 4)
        _put(buf, m + 27, px - px // 10, 4)
        _put(buf, m + 31, 1, 4)

        m = _msg(buf, st, ord("h"), 21, loc)
        _sym(buf, m + 11, sym, s)
        buf[m + 19] = ord("Q")
        buf[m + 20] = ord("T")

        m = _msg(buf, st, ord("N"), 20, loc)
        _sym(buf, m + 11, sym, s)
        buf[m + 19] = ord("B")

        m = _msg(buf, st, ord("O"), 48, loc)
        _sym(buf, m + 11, sym, s)
        buf[m + 19] = ord("Y")
        _put(buf, m + 20, px - px // 5, 4)
        _put(buf, m + 24, px + px // 5, 4)
        _put(buf, m + 28, px, 4)
        _put(buf, m + 32, st[_TS] + 5 * _HOUR, 8)
        _put(buf, m + 40, px - px // 10, 4)
        _put(buf, m + 44, px + px // 10, 4)


@numba.njit(cache=True)
def _pick(cumw):
    return np.searchsorted(cumw, np.random.random() * cumw[-1], side="right")


@numba.njit(cache=True)
def _walk(sinfo, s):
    if np.random.random() < 0.15:
        mid = sinfo[s, _MID] + (1 if np.random.random() < 0.5 else -1)
        if sinfo[s, _LO] <= mid <= sinfo[s, _HI]:
            sinfo[s, _MID] = mid


# --------------------------------------------------------------------------- session


@numba.njit(cache=True)
def _step(buf, st, sym, orders, sinfo, cumw, step, t_cap):
    """One event on a random stock (busy stocks more often); one or more messages."""
    room = _room(st)
    _adv(st, step, t_cap)
    s = _pick(cumw)
    _walk(sinfo, s)
    cnt = sinfo[s, _CNT]
    if sinfo[s, _HALT]:
        # halted: only cancels, until it resumes
        if cnt == 0 or np.random.random() < 0.1:
            _action(buf, st, sym, sinfo, s, ord("T"))
            sinfo[s, _HALT] = 0
            st[_NHALT] -= 1
        else:
            _emit_delete(buf, st, orders, sinfo, s, np.random.randint(0, cnt))
        return
    tgt = sinfo[s, _TGT]
    if cnt >= CAP - 1:
        p_add = 0.0
    elif cnt < tgt // 2:
        p_add = 0.62
    elif cnt < tgt:
        p_add = 0.5
    else:
        p_add = 0.33
    if cnt == 0 or np.random.random() < p_add:
        _random_add(buf, st, sym, orders, sinfo, s)
        return
    u = np.random.random()
    k = np.random.randint(0, cnt)
    if u < 0.55:
        _emit_delete(buf, st, orders, sinfo, s, k)
    elif u < 0.73:
        _replace(buf, st, orders, sinfo, s, k)
    elif u < 0.80:
        sh = orders[s, k, _OSH]
        if sh > 1:
            _emit_cancel(buf, st, orders, sinfo, s, k, np.random.randint(1, sh))
        else:
            _emit_delete(buf, st, orders, sinfo, s, k)
    elif u < 0.90:
        _exec_top(buf, st, orders, sinfo, s, np.random.random() < 0.2)
    elif u < 0.95:
        _trade(buf, st, sym, sinfo, s)
    elif u < 0.953:
        _broken(buf, st, sinfo, s)
    elif u < 0.954 and st[_NHALT] < 8 and room >= 2:
        _action(buf, st, sym, sinfo, s, ord("H"))
        sinfo[s, _HALT] = 1
        st[_NHALT] += 1
    elif u < 0.955 and cnt <= min(room, 60):
        # everything pulled: the book goes empty on both sides, then refills
        while sinfo[s, _CNT] > 0:
            _emit_delete(buf, st, orders, sinfo, s, sinfo[s, _CNT] - 1)
    else:
        _emit_delete(buf, st, orders, sinfo, s, k)


@numba.njit(cache=True)
def _session(buf, n_messages, seed, sym, sinfo, cumw, ref0, n_pre, s_busy, s_exp, s_edge):
    np.random.seed(seed)
    n = sym.shape[0]
    orders = np.zeros((n, CAP, 4), dtype=np.int64)
    st = np.zeros(9, dtype=np.int64)
    st[_TS] = _T_START + np.random.randint(0, 1_000_000)
    st[_REF] = ref0
    st[_MATCH] = np.random.randint(1, 1_000_000)
    st[_MATCH0] = st[_MATCH]
    st[_TRACK] = np.random.randint(0, 65_536)
    n_noii = min(n, 10)
    n_close = n_noii + n + 3  # closing NOII, closing crosses, S M, S E, S C

    # ---- preamble: 04:00
    _system(buf, st, ord("O"))
    for s in range(n):
        _adv(st, 2_000, _T_START + _NS)
        _directory(buf, st, sym, sinfo, s)
    _misc(buf, st, sym, sinfo, n)
    _adv(st, 2_000, _T_START + _NS)
    _system(buf, st, ord("S"))
    for s in range(n):
        _adv(st, 2_000, _T_START + 2 * _NS)
        _action(buf, st, sym, sinfo, s, ord("T"))

    # ---- pre-market trading: 04:00 .. 09:25
    st[_END] = st[_NMSG] + n_pre
    t_pre = _T_OPEN - 5 * 60 * _NS
    step = (t_pre - st[_TS]) // (n_pre + 1)
    tick = sinfo[s_exp, _TICK]
    for side in (_BUY, _SELL, _BUY, _SELL):  # the ~$300,000 stock: raw prices > 2^31
        _adv(st, step, t_pre)
        _order(
            buf,
            st,
            sym,
            orders,
            sinfo,
            s_exp,
            side,
            _near_px(sinfo, s_exp, side),
            100 * np.random.randint(1, 5),
            False,
            0.0,
        )
    _adv(st, step, t_pre)  # one order above 65,535 shares
    _order(
        buf,
        st,
        sym,
        orders,
        sinfo,
        s_busy,
        _BUY,
        _near_px(sinfo, s_busy, _BUY),
        np.random.randint(65_536, 250_000),
        False,
        0.0,
    )
    for side in (_BUY, _SELL):  # orders at locate 65,535
        _adv(st, step, t_pre)
        _order(
            buf,
            st,
            sym,
            orders,
            sinfo,
            s_edge,
            side,
            _near_px(sinfo, s_edge, side),
            100 * np.random.randint(1, 10),
            False,
            0.0,
        )
    while _room(st) > 0:
        _step(buf, st, sym, orders, sinfo, cumw, step, t_pre)

    # ---- opening: NOII 09:25 .. 09:30, S Q, opening crosses
    st[_TS] = max(st[_TS], t_pre)
    for _ in range(n_noii):
        _adv(st, 20 * _NS, _T_OPEN - _NS)
        _noii(buf, st, sym, sinfo, _pick(cumw), ord("O"))
    st[_TS] = max(st[_TS], _T_OPEN)
    _system(buf, st, ord("Q"))
    for s in range(n):
        _adv(st, 1_000, _T_OPEN + _NS)
        _cross(buf, st, sym, sinfo, s, ord("O"))

    st[_END] = n_messages - n_close
    t_main = _T_CLOSE - _NS
    step = (t_main - st[_TS]) // max(1, st[_END] - st[_NMSG])

    # ---- scripted events, so every session has them however short
    # a sweep of two or more resting asks (repeated timestamps), remainder rests as bid
    s = s_busy
    tick = sinfo[s, _TICK]
    for j in (s_busy, s_edge):  # halted pre-market: resume first
        if sinfo[j, _HALT]:
            _action(buf, st, sym, sinfo, j, ord("T"))
            sinfo[j, _HALT] = 0
            st[_NHALT] -= 1
    while sinfo[s, _CNT] > CAP - 4:
        _emit_delete(buf, st, orders, sinfo, s, np.random.randint(0, sinfo[s, _CNT]))
    k = _best(orders, sinfo, s, _SELL)
    if k >= 0:
        pa = orders[s, k, _OPX]
    else:
        pa = (sinfo[s, _MID] + 1) * tick
        kb = _best(orders, sinfo, s, _BUY)
        if kb >= 0 and pa <= orders[s, kb, _OPX]:
            pa = orders[s, kb, _OPX] + tick
    for _ in range(2):
        _adv(st, step, t_main)
        _order(buf, st, sym, orders, sinfo, s, _SELL, pa, 100 * np.random.randint(1, 6), False, 0.0)
    total = 0
    for j in range(sinfo[s, _CNT]):
        if orders[s, j, _OSIDE] == _SELL and orders[s, j, _OPX] <= pa:
            total += orders[s, j, _OSH]
    _adv(st, step, t_main)
    _order(buf, st, sym, orders, sinfo, s, _BUY, pa, total + 100, False, 0.0)
    # F, X, U on one order; C, P, B, D
    _adv(st, step, t_main)
    _order(buf, st, sym, orders, sinfo, s, _SELL, pa + 5 * tick, 300, True, 0.0)
    k = sinfo[s, _CNT] - 1
    _adv(st, step, t_main)
    _emit_cancel(buf, st, orders, sinfo, s, k, 100)
    _adv(st, step, t_main)
    _replace(buf, st, orders, sinfo, s, k)
    _adv(st, step, t_main)
    _exec_top(buf, st, orders, sinfo, s, True)
    _adv(st, step, t_main)
    _trade(buf, st, sym, sinfo, s)
    _adv(st, step, t_main)
    _broken(buf, st, sinfo, s)
    _adv(st, step, t_main)
    _emit_delete(buf, st, orders, sinfo, s, np.random.randint(0, sinfo[s, _CNT]))
    # an empty-book moment at locate 65,535 (it got orders pre-market)
    s = s_edge
    _adv(st, step, t_main)
    if sinfo[s, _CNT] == 0:
        _order(buf, st, sym, orders, sinfo, s, _BUY, _near_px(sinfo, s, _BUY), 100, False, 0.0)
    while sinfo[s, _CNT] > 0:
        _emit_delete(buf, st, orders, sinfo, s, sinfo[s, _CNT] - 1)

    # ---- continuous session: 09:30 .. 16:00
    while _room(st) > 0:
        _step(buf, st, sym, orders, sinfo, cumw, step, t_main)

    # ---- close
    st[_END] = n_messages
    for s in range(n):
        if sinfo[s, _HALT]:
            _action(buf, st, sym, sinfo, s, ord("T"))
            sinfo[s, _HALT] = 0
            st[_NHALT] -= 1
    for _ in range(n_noii):
        _adv(st, 1_000_000, t_main)
        _noii(buf, st, sym, sinfo, _pick(cumw), ord("C"))
    st[_TS] = max(st[_TS], _T_CLOSE)
    for s in range(n):
        _adv(st, 1_000, _T_CLOSE + _NS)
        _cross(buf, st, sym, sinfo, s, ord("C"))
    _adv(st, 1_000_000, _T_CLOSE + 2 * _NS)
    _system(buf, st, ord("M"))
    st[_TS] = max(st[_TS], _T_END)
    _system(buf, st, ord("E"))
    st[_TS] += 1_000_000
    _system(buf, st, ord("C"))
    return st[_POS], st[_NMSG]


# --------------------------------------------------------------------------- setup


def _symbols(n: int, rng: random.Random) -> np.ndarray:
    """n unique symbols of 1-8 uppercase letters (both extremes present), space padded."""
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    lengths = [1, 2, 3, 3, 4, 4, 4, 5, 6, 7, 8]
    seen: set[str] = set()
    out = np.full((n, 8), ord(" "), dtype=np.uint8)
    for i in range(n):
        if i == 0:
            length = 1
        elif i == n - 1:
            length = 8
        else:
            length = rng.choice(lengths)
        while True:
            name = "".join(rng.choice(letters) for _ in range(length))
            if name not in seen:
                break
            length = max(length, 3)  # 1- and 2-letter names run out
        seen.add(name)
        out[i, : len(name)] = np.frombuffer(name.encode(), dtype=np.uint8)
    return out


def _check_args(n_messages: int, n_stocks: int) -> None:
    if not isinstance(n_stocks, int | np.integer) or not 1 <= n_stocks <= MAX_STOCKS:
        raise ValueError(f"n_stocks must be an integer in 1..{MAX_STOCKS}, got {n_stocks!r}")
    if not isinstance(n_messages, int | np.integer) or n_messages < min_messages(n_stocks):
        raise ValueError(
            f"n_messages must be an integer >= {min_messages(n_stocks)} "
            f"for n_stocks={n_stocks}, got {n_messages!r}"
        )


def generate(n_messages: int, n_stocks: int = 100, seed: int = 1) -> np.ndarray:
    """A session of exactly ``n_messages`` messages over ``n_stocks`` stocks, file format.

    Raises ``ValueError`` when ``n_stocks`` is outside 1..9,999 or ``n_messages`` is
    below ``min_messages(n_stocks)`` (2,000, or 4 * n_stocks + 1,100 if larger).
    """
    _check_args(n_messages, n_stocks)
    n_messages = int(n_messages)
    n = int(n_stocks)
    rng = random.Random(f"itchgen:{seed}:{n}")
    sym = _symbols(n, rng)

    sinfo = np.zeros((n, 8), dtype=np.int64)
    sinfo[:, _LOC] = np.arange(1, n + 1)
    sinfo[n - 1, _LOC] = 65_535
    sinfo[:, _TICK] = 100  # one cent in Price(4)
    for s in range(n):
        sinfo[s, _MID] = int(200 * 400 ** rng.random())  # $2 .. $800, in cents
    s_busy = 0
    s_exp = n // 2
    s_edge = n - 1
    sinfo[s_exp, _MID] = 30_000_000 + rng.randrange(-100_000, 100_000)  # ~$300,000
    sinfo[:, _LO] = np.maximum(20, sinfo[:, _MID] // 2)
    sinfo[:, _HI] = sinfo[:, _MID] * 2
    sinfo[s_exp, _LO] = 25_000_000  # keeps raw prices in 2^31 .. 2^32 - 1
    sinfo[s_exp, _HI] = 40_000_000

    # skewed activity: Zipf-like weights over a shuffled ranking, stock 0 the busiest
    ranks = list(range(n))
    rng.shuffle(ranks)
    ranks[ranks.index(0)] = ranks[0]
    ranks[0] = 0
    w = 1.0 / (np.asarray(ranks, dtype=np.float64) + 1.0) ** 1.1
    sinfo[:, _TGT] = (5 + 200 * (w / w.max()) ** 0.7).astype(np.int64)
    cumw = np.cumsum(w)

    fixed = 1 + n + 18 + 1 + n + min(n, 10) + 1 + n + 40 + min(n, 10) + n + 3
    free = n_messages - fixed  # messages left for trading; at least ~1,000
    n_pre = max(20, free // 20)
    # refs start just below 2^32, close enough that even the shortest session crosses it
    ref0 = 2**32 - min(7_296, max(16, free // 50))

    buf = np.empty(n_messages * (MAX_MSG_LEN + 2), dtype=np.uint8)
    seed64 = int(seed) % 2**32
    pos, count = _session(
        buf, n_messages, seed64, sym, sinfo, cumw, ref0, n_pre, s_busy, s_exp, s_edge
    )
    if count != n_messages:  # a broken invariant of this module, not bad input
        raise RuntimeError(f"generated {count} messages, wanted {n_messages}")
    return buf[:pos].copy()


@numba.njit(cache=True)
def _count(buf):
    counts = np.zeros(256, dtype=np.int64)
    p = 0
    n = buf.shape[0]
    while p < n:
        if p + 2 > n:
            return counts, p
        length = (np.int64(buf[p]) << 8) | np.int64(buf[p + 1])
        if p + 2 + length > n:
            return counts, p
        if length > 0:
            counts[buf[p + 2]] += 1
        p += 2 + length
    return counts, -1


def count_by_type(buf: np.ndarray) -> dict[str, int]:
    """Messages per type letter, walking the 2-byte length framing.

    Raises ``ValueError`` naming the offset of a truncated message's length prefix.
    """
    arr = np.frombuffer(buf, dtype=np.uint8) if not isinstance(buf, np.ndarray) else buf
    counts, bad = _count(np.ascontiguousarray(arr, dtype=np.uint8))
    if bad >= 0:
        raise ValueError(f"truncated message at byte offset {bad}")
    return {chr(t): int(c) for t, c in enumerate(counts) if c}


def write_session(
    path: str | os.PathLike, n_messages: int, n_stocks: int = 100, seed: int = 1
) -> dict:
    """Generate a session and write it to ``path``; return its statistics."""
    buf = generate(n_messages, n_stocks, seed)
    with open(path, "wb") as f:
        f.write(buf.tobytes())
    by_type = count_by_type(buf)
    return {"messages": sum(by_type.values()), "bytes": int(buf.size), "by_type": by_type}
