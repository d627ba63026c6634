"""Full-depth (L3) price-time order books for every stock locate, in preallocated arrays.

Structure (all numpy arrays; the jitted functions take them as arguments):

- ``orders`` (``ORDER``): one row per live order: reference, remaining shares, its side
  (``sd`` = locate * 2 + side), its level (which holds the price), and ``prev``/``next``
  links of the level's FIFO queue. Row 0 (``SCRATCH``) is never an order: the FIFO links
  are updated without branches, and the write meant for a missing neighbour lands there.
- the order index is the row itself. Rows ``RING_BASE .. RING_BASE + ring - 1`` are a
  direct-mapped ring: the order with reference ``ref`` lives in row
  ``RING_BASE + (ref & (ring - 1))``, computed from the message alone, so the next
  message's order row is prefetched before its turn and a lookup is one load and a
  compare. Nasdaq assigns references in sequence, so new orders fill consecutive rows and
  the orders touched next (recent ones) sit together in cache. A row is free when its
  ``level`` is ``NIL``. An order whose ring row is taken by another live order (a
  long-resting one a ring length older, or references that are not sequential at all)
  goes to a spill row after the ring (free spill rows are chained through ``next``), found
  through ``htab`` (``HASH``): reference -> row, open addressing with linear probing and
  backward-shift deletion (no tombstones), kept at most half full. Each ring row counts
  in ``spill`` the live spilled orders that map to it, so a lookup reads the hash only
  when that count is non-zero. The ring doubles (off the hot path: every live order moves
  to its new row and the links are rewritten) when more than a quarter of its length has
  spilled, so it settles near the live span of references.
- ``levels`` (``LEVEL``): one row per non-empty price level: price, aggregate shares, order
  count, FIFO head and tail.
- ``ladder`` (``RUNG``) + ``sides`` (``SIDE``): per (locate, side) a sorted run of
  (key, level) in ``ladder[start:start+count]``, keys ascending with the best price last
  (bid key = price, ask key = 2^32-1 - price), so adds and removals near the top move few
  entries. A side of up to ``SCAN`` levels is searched with one vector compare (the ladder
  ends in ``SCAN`` rungs of padding so that read never leaves it), a longer one bisects.
  ``sides`` also caches the best level's price and shares (the BBO).
- ``stocks`` (``STOCK``): the symbol from the stock directory and the trading state.
- ``meta``: free-list heads, high-water marks, the hash shift and count, the live-order
  count and its limit, the ring's mask and its size limit.
- ``counters``: the decoder's counters (``dataplane.itch``) plus the book's anomalies.

Book semantics follow the ITCH 5.0 spec: ``A``/``F`` add at the back of the level's queue;
``E``/``C``/``X`` reduce the resting order (it leaves at zero); ``D`` removes it; ``U``
removes the original and adds the new reference with the original's stock and side at the
back of its level; everything else leaves the visible book alone. The stock, side and
price of ``E C X D U`` always come from the resting order, never from the message header.

Anomalies never corrupt a book; each has one defined, counted outcome:

===================  ================================================================
``B_DUP_ADD``        ``A``/``F``/``U`` whose new reference is already live: not added
                     (for ``U`` the original is still removed).
``B_UNKNOWN_REF``    ``E C X D U`` on a reference that is not live: ignored.
``B_OVER_EXEC``      ``E``/``C`` for more shares than rest: the order is removed.
``B_OVER_CANCEL``    ``X`` for more shares than rest: the order is removed.
``B_ZERO_SHARES``    an add/replace with 0 shares is not added; an ``E C X`` of 0 shares
                     is ignored.
``B_BAD_SIDE``       ``A``/``F`` with a side other than ``B``/``S``: ignored.
===================  ================================================================

Capacity: ``apply_stream`` checks, before it changes anything for a message, that the
message fits; if not it stops and returns a ``NEED_*`` status with the message's offset,
and the caller (``Book``) grows the array off the hot path and resumes at that offset. A
growth beyond the configured maximum, or an order past ``max_orders`` live ones, raises
``CapacityError``: never silent.
"""

from __future__ import annotations

import hashlib
import mmap
import platform

import llvmlite.binding as llvm
import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from dataplane import itch
from dataplane.itch import (
    HEADER_LEN,
    T_A,
    T_C,
    T_D,
    T_E,
    T_F,
    T_H,
    T_R,
    T_U,
    T_X,
    T_Y,
    TRUNCATED,
    count_frame,
    frame,
    rd_u16,
    rd_u32,
    rd_u64,
)

if platform.machine() in ("x86_64", "AMD64"):
    # The book writes selects where the outcome is a coin toss for a branch predictor (is
    # the order at the head of its queue? at the tail?). LLVM's x86 cmov converter turns a
    # select with a loaded operand back into a branch when it guesses that is cheaper; here
    # it is not (measured), so it is off for every function compiled after this import.
    llvm.set_option("tickwire", "-x86-cmov-converter=false")


def _item_ptr(context, builder, sig, args):
    """LLVM pointer to ``args[0][args[1]]`` (an array and an integer index, no wraparound)."""
    ary = context.make_array(sig.args[0])(context, builder, args[0])
    idx = context.cast(builder, args[1], sig.args[1], types.intp)
    return cgutils.get_item_pointer(context, builder, sig.args[0], ary, [idx], wraparound=False)


@intrinsic
def prefetch(typingctx, arr, idx):
    """Hint the CPU to fetch ``arr[idx]`` into cache (``llvm.prefetch``; never faults)."""
    if not (isinstance(arr, types.Array) and isinstance(idx, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        ptr = _item_ptr(context, builder, sig, args)
        i8p = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
        builder.call(
            fn,
            [
                builder.bitcast(ptr, i8p),
                ir.Constant(i32, 0),
                ir.Constant(i32, 3),
                ir.Constant(i32, 1),
            ],
        )
        return context.get_dummy_value()

    return types.none(arr, idx), codegen


SCAN = 16  # sides up to this many levels are searched branch-free; the ladder is padded by it


def _low_bits(builder, n):
    """``(1 << n) - 1`` for ``0 <= n < 64``: a mask of the first ``n`` lanes, as an i64."""
    i64 = ir.IntType(64)
    return builder.sub(builder.shl(ir.Constant(i64, 1), n), ir.Constant(i64, 1))


def _popcount(builder, v):
    return builder.call(builder.module.declare_intrinsic("llvm.ctpop", [v.type]), [v])


def _lane_mask(builder, bits):
    """The low ``SCAN`` bits of the i64 ``bits`` as a ``<SCAN x i1>`` lane mask."""
    return builder.bitcast(
        builder.trunc(bits, ir.IntType(SCAN)), ir.VectorType(ir.IntType(1), SCAN)
    )


@intrinsic
def count_below(typingctx, ladder, start, count, key):
    """How many of the ``count`` (<= ``SCAN``) rungs from ``ladder[start]`` have a key below
    ``key``: one vector load of ``SCAN`` rungs, compare, mask by ``count``, popcount.
    Reads ``SCAN`` rungs whatever ``count`` is (the ladder is padded for it)."""
    if not (
        isinstance(ladder, types.Array)
        and isinstance(start, types.Integer)
        and isinstance(count, types.Integer)
        and isinstance(key, types.Integer)
    ):
        return None

    def codegen(context, builder, sig, args):
        ptr = _item_ptr(context, builder, sig, args)
        i64 = ir.IntType(64)
        vt = ir.VectorType(i64, SCAN)
        rungs = builder.load(builder.bitcast(ptr, vt.as_pointer()), align=4)
        keys = builder.and_(rungs, ir.Constant(vt, [0xFFFFFFFF] * SCAN))  # key: low half
        k = context.cast(builder, args[3], sig.args[3], types.uint64)
        below = builder.icmp_unsigned("<", keys, _lanes(builder, vt, k))
        bits = builder.zext(builder.bitcast(below, ir.IntType(SCAN)), i64)
        n = context.cast(builder, args[2], sig.args[2], types.int64)
        return _popcount(builder, builder.and_(bits, _low_bits(builder, n)))

    return types.int64(ladder, start, count, key), codegen


def _masked_store(builder, value, ptr, mask):
    """``llvm.masked.store``: write the lanes of ``value`` where ``mask`` is set (the others
    are neither written nor touched, so they never fault)."""
    vt = value.type
    fnty = ir.FunctionType(ir.VoidType(), [vt, ptr.type, ir.IntType(32), mask.type])
    name = f"llvm.masked.store.v{vt.count}i{vt.element.width}.p0"
    fn = cgutils.get_or_insert_function(builder.module, fnty, name)
    builder.call(fn, [value, ptr, ir.Constant(ir.IntType(32), 4), mask])


def _lanes(builder, vt, v):
    """``v`` (an integer of the vector's element type) in every lane of ``vt``."""
    i32 = ir.IntType(32)
    one = builder.insert_element(ir.Constant(vt, ir.Undefined), v, ir.Constant(i32, 0))
    return builder.shuffle_vector(
        one,
        ir.Constant(vt, ir.Undefined),
        ir.Constant(ir.VectorType(i32, vt.count), [0] * vt.count),
    )


def _load_run(context, builder, sig, args):
    """For the ladder intrinsics ``(ladder, start, count, j, ...)``: the ``SCAN`` rungs from
    ``ladder[start]`` as a ``<SCAN x i64>`` (key in the low half), their pointer, and
    ``count`` and ``j`` as i64."""
    vt = ir.VectorType(ir.IntType(64), SCAN)
    vptr = builder.bitcast(_item_ptr(context, builder, sig, args), vt.as_pointer())
    n = context.cast(builder, args[2], sig.args[2], types.int64)
    j = context.cast(builder, args[3], sig.args[3], types.int64)
    return vt, vptr, builder.load(vptr, align=4), n, j


def _store_lanes(builder, value, vptr, lo, hi):
    """Write lanes ``lo..hi-1`` of ``value`` to ``vptr`` (one masked store)."""
    bits = builder.and_(_low_bits(builder, hi), builder.not_(_low_bits(builder, lo)))
    _masked_store(builder, value, vptr, _lane_mask(builder, bits))


def _ladder_args_ok(ladder, ints):
    return isinstance(ladder, types.Array) and all(isinstance(x, types.Integer) for x in ints)


@intrinsic
def ladder_insert(typingctx, ladder, start, count, j, key, level):
    """Insert rung ``(key, level)`` at ``ladder[start + j]`` of a run of ``count`` (<
    ``SCAN``) rungs, moving rungs ``j..count-1`` up by one: one vector load, a lane
    shuffle and one masked store of lanes ``j..count``, no loop to mispredict."""
    if not _ladder_args_ok(ladder, (start, count, j, key, level)):
        return None

    def codegen(context, builder, sig, args):
        i32, i64 = ir.IntType(32), ir.IntType(64)
        vt, vptr, rungs, n, j = _load_run(context, builder, sig, args)
        k = builder.zext(builder.trunc(args[4], i32), i64)
        lv = builder.zext(builder.trunc(args[5], i32), i64)
        rung = _lanes(builder, vt, builder.or_(k, builder.shl(lv, ir.Constant(i64, 32))))
        up = builder.shuffle_vector(
            rungs, rung, ir.Constant(ir.VectorType(i32, SCAN), [SCAN] + list(range(SCAN - 1)))
        )
        lane = ir.Constant(vt, list(range(SCAN)))
        value = builder.select(builder.icmp_signed("==", lane, _lanes(builder, vt, j)), rung, up)
        _store_lanes(builder, value, vptr, j, builder.add(n, ir.Constant(i64, 1)))
        return context.get_dummy_value()

    return types.none(ladder, start, count, j, key, level), codegen


@intrinsic
def ladder_delete(typingctx, ladder, start, count, j):
    """Remove the rung at ``ladder[start + j]`` of a run of ``count`` (<= ``SCAN``) rungs,
    moving rungs ``j+1..count-1`` down by one: a vector load, a shuffle, a masked store of
    lanes ``j..count-2``."""
    if not _ladder_args_ok(ladder, (start, count, j)):
        return None

    def codegen(context, builder, sig, args):
        vt, vptr, rungs, n, j = _load_run(context, builder, sig, args)
        down = builder.shuffle_vector(
            rungs,
            ir.Constant(vt, ir.Undefined),
            ir.Constant(ir.VectorType(ir.IntType(32), SCAN), list(range(1, SCAN)) + [SCAN - 1]),
        )
        _store_lanes(builder, down, vptr, j, builder.sub(n, ir.Constant(ir.IntType(64), 1)))
        return context.get_dummy_value()

    return types.none(ladder, start, count, j), codegen


N_LOCATES = 65536
BID = 0
ASK = 1
SIDE_OF = np.full(256, 2, np.uint8)  # buy/sell indicator byte -> BID, ASK, or 2: invalid
SIDE_OF[ord("B")] = BID
SIDE_OF[ord("S")] = ASK
NIL = -1
SCRATCH = 0  # order row 0 is never an order: branch-free links write there instead of nowhere

ORDER = np.dtype(
    [
        ("ref", np.uint64),
        ("shares", np.uint32),
        ("sd", np.uint32),
        ("level", np.int32),
        ("prev", np.int32),
        ("next", np.int32),
        ("spill", np.int32),
    ],
    align=True,
)  # 32 bytes; sd = locate * 2 + side, the price is its level's
RING_BASE = SCRATCH + 1  # rows RING_BASE .. RING_BASE + ring - 1 are the reference ring
LEVEL = np.dtype(
    [
        ("price", np.uint32),
        ("count", np.int32),
        ("shares", np.int64),
        ("head", np.int32),
        ("tail", np.int32),
    ],
    align=True,
)
SIDE = np.dtype(
    [
        ("start", np.int32),
        ("count", np.int32),
        ("cap", np.int32),
        ("best_px", np.uint32),
        ("best_qty", np.int64),
        ("_spare", np.int64),
    ],
    align=True,
)  # 32 bytes (_spare is padding): a stock's bid and ask share one cache line
RUNG = np.dtype([("key", np.uint32), ("level", np.int32)], align=True)  # 8 bytes
HASH = np.dtype([("key", np.uint64), ("slot", np.int64)], align=True)
STOCK = np.dtype(
    [("symbol", np.uint64), ("named", np.uint8), ("state", np.uint8), ("regsho", np.uint8)],
    align=True,
)

# meta indices
M_ORDER_FREE = 0
M_ORDER_HWM = 1
M_LEVEL_FREE = 2
M_LEVEL_HWM = 3
M_LADDER_BUMP = 4
M_HASH_COUNT = 5
M_HASH_SHIFT = 6
M_LIVE = 7  # live orders, both tiers (M_HASH_COUNT: those in spill rows and the hash)
M_RING_MAX = 8  # the ring may double while it is shorter than this
M_RING_MASK = 9  # ring rows - 1 (a power of two - 1)
M_MAX_LIVE = 10  # most live orders (max_orders)
META_LEN = 16

# book counters, after the decoder's in the shared counters array
B_DUP_ADD = itch.N_DECODER_COUNTERS + 0
B_UNKNOWN_REF = itch.N_DECODER_COUNTERS + 1
B_OVER_EXEC = itch.N_DECODER_COUNTERS + 2
B_OVER_CANCEL = itch.N_DECODER_COUNTERS + 3
B_ZERO_SHARES = itch.N_DECODER_COUNTERS + 4
B_BAD_SIDE = itch.N_DECODER_COUNTERS + 5
B_GROWTHS = itch.N_DECODER_COUNTERS + 6
# D, E, C, X: where the share count sits after the header (a D has none: its reference's
# first bytes are read and ignored), and the counter of a reduction past what is left
SHARES_AT = np.zeros(256, np.int64)
OVER_OF = np.full(256, B_OVER_EXEC, np.int64)
for _t in (T_E, T_C, T_X):
    SHARES_AT[_t] = 8
OVER_OF[T_X] = B_OVER_CANCEL
ANOMALIES = {
    "dup_add": B_DUP_ADD,
    "unknown_ref": B_UNKNOWN_REF,
    "over_exec": B_OVER_EXEC,
    "over_cancel": B_OVER_CANCEL,
    "zero_shares": B_ZERO_SHARES,
    "bad_side": B_BAD_SIDE,
}

# apply_stream statuses (itch.OK and itch.TRUNCATED keep their meaning)
NEED_ORDERS = 10  # max_orders live: fails loudly
NEED_LEVELS = 11
NEED_LADDER = 12
NEED_HASH = 13
NEED_RING = 14
NEED_SPILL = 15

LADDER_MIN_CAP = 8
HASH_MULT = np.uint64(0x9E3779B97F4A7C15)


@njit(cache=True, nogil=True, inline="always", _nrt=False)
def _u(i):
    """``i`` as an unsigned index. Every hot-path index is non-negative by construction,
    and numba wraps signed indices around (a compare and a select on the array's length,
    which must then stay in a register) on every access; unsigned ones it does not."""
    return np.uint64(i)


# --- order index: orders live in the reference ring; the hash finds what spills -----------
@njit(cache=True, nogil=True, inline="always", _nrt=False)
def _home(key, shift):
    return np.int64((key * HASH_MULT) >> np.uint64(shift))


@njit(cache=True, nogil=True, inline="always", _nrt=False)
def _ring_mask(meta):
    """The ring's row mask. It changes only when the ring grows, off the hot path, so
    ``apply_stream`` reads it once and hands it down (as ``rm``): a value in a register,
    not a load from ``meta`` at every use (``meta`` is written per message, so LLVM
    cannot hoist that load itself)."""
    return np.uint64(meta[M_RING_MASK])


@njit(cache=True, nogil=True, inline="always", _nrt=False)
def _ring_row(rm, ref):
    """The ring row of ``ref`` (``rm``: ``_ring_mask``): computed from the reference alone,
    so it can be prefetched before the message is looked at."""
    return RING_BASE + np.int64(ref & rm)


@njit(cache=True, nogil=True, inline="always", _nrt=False)
def ht_find(htab, shift, key):
    """Return ``(order row or NIL, table index of the entry or of the empty probe end)``."""
    mask = htab.shape[0] - 1
    i = _home(key, shift)
    while True:
        e = htab[_u(i)]
        if e.slot < 0:
            return NIL, i
        if e.key == key:
            return e.slot, i
        i = (i + 1) & mask


@njit(cache=True, nogil=True, inline="always", _nrt=False)
def ht_remove_at(htab, shift, i):
    """Delete entry ``i`` and shift later members of its cluster back (no tombstones)."""
    mask = htab.shape[0] - 1
    j = i
    while True:
        j = (j + 1) & mask
        if htab[_u(j)].slot < 0:
            break
        k = _home(htab[_u(j)].key, shift)
        if i <= j:
            stays = i < k and k <= j
        else:
            stays = i < k or k <= j
        if not stays:
            htab[_u(i)].key = htab[_u(j)].key
            htab[_u(i)].slot = htab[_u(j)].slot
            i = j
    htab[_u(i)].slot = NIL


@njit(cache=True, nogil=True, inline="always", _nrt=False)
def ht_insert(htab, shift, key, slot):
    """Put ``key -> slot`` into a table known not to hold ``key`` (growth, rebuilds)."""
    mask = htab.shape[0] - 1
    i = _home(key, shift)
    while htab[_u(i)].slot >= 0:
        i = (i + 1) & mask
    htab[_u(i)].key = key
    htab[_u(i)].slot = slot


@njit(cache=True, nogil=True)
def ht_rehash(old, new, shift):
    """Move every entry of ``old`` into the empty table ``new`` (growth, off the hot path)."""
    for j in range(old.shape[0]):
        if old[j].slot >= 0:
            ht_insert(new, shift, old[j].key, old[j].slot)


# apply_stream's fast path: a message's length must equal FAST_LEN[type] (an unknown
# type's is -1, which no length equals), and FAST_SLACK bytes from its length prefix must be
# in the buffer: the longest message (50) plus the next one's prefix and header reads
FAST_LEN = np.where(itch.MSG_LEN > 0, itch.MSG_LEN, -1).astype(np.int64)
FAST_SLACK = 2 + int(itch.MSG_LEN.max()) + 2 + HEADER_LEN + 8

IN_RING = -1  # ``ix_find``'s location of an order held by its ring row


@njit(cache=True, nogil=True, inline="always", _nrt=False)
def ix_find(orders, htab, meta, ref, rm):
    """Return ``(order row or NIL, where)``: ``where`` is ``IN_RING`` for an order in its
    ring row, else the hash index of its entry (or of the empty probe end)."""
    r = _ring_row(rm, ref)
    od = orders[_u(r)]
    if od.ref == ref and od.level != NIL:
        return r, IN_RING
    if od.spill == 0:
        return NIL, IN_RING
    return ht_find(htab, meta[M_HASH_SHIFT], ref)


@njit(cache=True, nogil=True)
def relocate_orders(old, old_hwm, new, new_mask, remap, levels, level_hwm, htab, shift):
    """Move every live order of ``old[:old_hwm]`` into the empty ``new`` whose ring has
    ``new_mask + 1`` rows (ring growth, off the hot path): to its ring row, or else to the
    next spill row and the empty ``htab``. Rewrites the FIFO links and the level heads and
    tails through ``remap`` (old row -> new row). Returns ``(spilled, new spill hwm)``.
    Ring rows come first, so the orders the old ring held never collide in the new one."""
    hwm = RING_BASE + new_mask + 1
    spilled = 0
    remap[SCRATCH] = SCRATCH
    for o in range(RING_BASE, old_hwm):
        if old[o].level == NIL:
            continue
        ref = old[o].ref
        r = RING_BASE + np.int64(ref & np.uint64(new_mask))
        if new[r].level == NIL:
            dst = r
        else:
            dst = hwm
            hwm += 1
            ht_insert(htab, shift, ref, dst)
            new[r].spill += 1
            spilled += 1
        new[dst].ref = ref
        new[dst].shares = old[o].shares
        new[dst].sd = old[o].sd
        new[dst].level = old[o].level
        remap[o] = dst
    for o in range(RING_BASE, old_hwm):
        if old[o].level == NIL:
            continue
        p = old[o].prev
        n = old[o].next
        new[remap[o]].prev = remap[p] if p != NIL else NIL
        new[remap[o]].next = remap[n] if n != NIL else NIL
    for lv in range(level_hwm):
        if levels[_u(lv)].count > 0:
            levels[_u(lv)].head = remap[levels[_u(lv)].head]
            levels[_u(lv)].tail = remap[levels[_u(lv)].tail]
    return spilled, hwm


# --- ladder -----------------------------------------------------------------------------
@njit(cache=True, nogil=True, inline="always", _nrt=False)
def _lower_bound(ladder, start, count, key):
    """First index in ``ladder[start:start+count]`` whose key is >= ``key``.

    Up to ``SCAN`` rungs (nearly every side) ``count_below`` answers with one vector
    compare: no data-dependent branch to mispredict. Longer sides bisect.
    """
    if count <= SCAN:
        return count_below(ladder, start, count, key)
    lo = 0
    hi = count
    while lo < hi:
        mid = (lo + hi) >> 1
        if ladder[_u(start + mid)].key < key:
            lo = mid + 1
        else:
            hi = mid
    return lo


ASK_KEY_BASE = 0xFFFFFFFF  # ask key = base - price: ascending keys, best price last


@njit(cache=True, nogil=True, inline="always", _nrt=False)
def _side_key(side, price):
    return np.int64(price) if side == BID else ASK_KEY_BASE - np.int64(price)


@njit(cache=True, nogil=True, inline="always", _nrt=False)
def _refresh_bbo(sides, ladder, levels, sd):
    s = sides[_u(sd)]
    if s.count > 0:
        lv = ladder[_u(s.start + s.count - 1)].level
        s.best_px = levels[_u(lv)].price
        s.best_qty = levels[_u(lv)].shares
    else:
        s.best_px = 0
        s.best_qty = 0


@njit(cache=True, nogil=True, inline="always", _nrt=False)
def _fits_add(sides, ladder, orders, levels, htab, meta, sd, ref, rm):
    """0 when an add of ``ref`` to side ``sd`` fits the arrays as they are, else the
    NEED_* status."""
    if meta[M_LIVE] >= meta[M_MAX_LIVE]:
        return NEED_ORDERS
    if meta[M_LEVEL_FREE] == NIL and meta[M_LEVEL_HWM] >= levels.shape[0]:
        return NEED_LEVELS
    s = sides[_u(sd)]
    if s.count == s.cap:
        newcap = max(LADDER_MIN_CAP, 2 * s.cap)
        if meta[M_LADDER_BUMP] + newcap > ladder.shape[0] - SCAN:
            return NEED_LADDER
    if orders[_u(_ring_row(rm, ref))].level != NIL:  # its ring row is taken: it would spill
        if 4 * (meta[M_HASH_COUNT] + 1) > meta[M_RING_MASK] + 1 and (
            meta[M_RING_MASK] + 1 < meta[M_RING_MAX]
        ):
            return NEED_RING
        if meta[M_ORDER_FREE] == NIL and meta[M_ORDER_HWM] >= orders.shape[0]:
            return NEED_SPILL
        if 2 * (meta[M_HASH_COUNT] + 1) > htab.shape[0]:
            return NEED_HASH
    return 0


@njit(cache=True, nogil=True, inline="always", _nrt=False)
def _add(orders, levels, sides, ladder, htab, meta, counters, ref, sd, price, shares, rm):
    """Add a visible order to side ``sd`` (capacity already checked by ``_fits_add``).
    Returns the level row it joined, or ``NIL`` when it was not added (a live reference)."""
    r = _ring_row(rm, ref)
    ring = orders[_u(r)]
    shift = meta[M_HASH_SHIFT]
    if ring.level == NIL:  # the ring row is free: the order goes there
        if ring.spill != 0:  # unless the reference is live in the hash already
            found, _ = ht_find(htab, shift, ref)
            if found != NIL:
                counters[B_DUP_ADD] += 1
                return NIL
        o = r
        hi = IN_RING
    else:  # taken: a duplicate, or an order that spills to a spill row and the hash
        if ring.ref == ref:
            counters[B_DUP_ADD] += 1
            return NIL
        found, hi = ht_find(htab, shift, ref)
        if found != NIL:
            counters[B_DUP_ADD] += 1
            return NIL
        o = meta[M_ORDER_FREE]
        if o != NIL:
            meta[M_ORDER_FREE] = orders[_u(o)].next
        else:
            o = meta[M_ORDER_HWM]
            meta[M_ORDER_HWM] = o + 1
        htab[_u(hi)].key = ref
        htab[_u(hi)].slot = o
        ring.spill += 1
        meta[M_HASH_COUNT] += 1
    s = sides[_u(sd)]
    key = _side_key(sd & 1, price)
    j = _lower_bound(ladder, s.start, s.count, key)
    if j < s.count and ladder[_u(s.start + j)].key == key:
        # the level exists, so it has a tail: the order joins behind it
        lv = ladder[_u(s.start + j)].level
        tail = levels[_u(lv)].tail
        orders[_u(tail)].next = o
        levels[_u(lv)].tail = o
        levels[_u(lv)].count += 1
        levels[_u(lv)].shares += shares
    else:
        if s.count == s.cap:  # relocate this side's run to a bigger segment at the bump
            newcap = max(LADDER_MIN_CAP, 2 * s.cap)
            dst = meta[M_LADDER_BUMP]
            for k in range(s.count):
                ladder[_u(dst + k)] = ladder[_u(s.start + k)]
            s.start = dst
            s.cap = newcap
            meta[M_LADDER_BUMP] = dst + newcap
        lv = meta[M_LEVEL_FREE]
        if lv != NIL:
            meta[M_LEVEL_FREE] = levels[_u(lv)].head
        else:
            lv = meta[M_LEVEL_HWM]
            meta[M_LEVEL_HWM] = lv + 1
        # a new level holds just this order: written whole, nothing read back
        levels[_u(lv)].price = price
        levels[_u(lv)].count = 1
        levels[_u(lv)].shares = shares
        levels[_u(lv)].head = o
        levels[_u(lv)].tail = o
        tail = NIL
        if s.count < SCAN:
            ladder_insert(ladder, s.start, s.count, j, key, lv)
        else:
            base = s.start
            k = s.count
            while k > j:
                ladder[_u(base + k)] = ladder[_u(base + k - 1)]
                k -= 1
            ladder[_u(base + j)].key = key
            ladder[_u(base + j)].level = lv
        s.count += 1
    od = orders[_u(o)]
    od.ref = ref
    od.shares = shares
    od.sd = sd
    od.level = lv
    od.next = NIL
    od.prev = tail
    meta[M_LIVE] += 1
    top = j == s.count - 1  # landed on the best level (the last rung), known without a load
    px = s.best_px
    qty = s.best_qty
    s.best_px = price if top else px  # selects, not branches: a coin toss to predict
    s.best_qty = levels[_u(lv)].shares if top else qty
    return lv


@njit(cache=True, nogil=True, inline="always", _nrt=False)
def _remove(orders, levels, sides, ladder, htab, meta, o, hi):
    """Remove live order row ``o`` found at ``hi`` (``ix_find``); drop its level if
    emptied. Returns the level row (read at once: a freed row is reused by the next add)."""
    od = orders[_u(o)]
    lv = od.level
    p = od.prev
    n = od.next
    orders[_u(p if p != NIL else SCRATCH)].next = n  # branch-free unlink, as in _add
    orders[_u(n if n != NIL else SCRATCH)].prev = p
    head = levels[_u(lv)].head
    tail = levels[_u(lv)].tail
    levels[_u(lv)].head = n if p == NIL else head
    levels[_u(lv)].tail = p if n == NIL else tail
    levels[_u(lv)].count -= 1
    levels[_u(lv)].shares -= od.shares
    sd = np.int64(od.sd)
    s = sides[_u(sd)]
    price = levels[_u(lv)].price
    at_top = s.best_px == price  # the order is live, so its side is not empty
    if p == NIL and n == NIL:  # it was its level's only order (known from its own row)
        key = _side_key(sd & 1, price)
        j = _lower_bound(ladder, s.start, s.count, key)
        if s.count <= SCAN:
            ladder_delete(ladder, s.start, s.count, j)
        else:
            base = s.start
            for k in range(j, s.count - 1):
                ladder[_u(base + k)] = ladder[_u(base + k + 1)]
        s.count -= 1
        levels[_u(lv)].head = meta[M_LEVEL_FREE]
        meta[M_LEVEL_FREE] = lv
        if at_top:
            _refresh_bbo(sides, ladder, levels, sd)
    else:
        qty = s.best_qty
        s.best_qty = levels[_u(lv)].shares if at_top else qty
    od.level = NIL  # the row is free
    if hi != IN_RING:  # a spill row: out of the hash, back on the spill free list
        ht_remove_at(htab, meta[M_HASH_SHIFT], hi)
        orders[_u(_ring_row(_ring_mask(meta), od.ref))].spill -= 1
        meta[M_HASH_COUNT] -= 1
        od.next = meta[M_ORDER_FREE]
        meta[M_ORDER_FREE] = o
    meta[M_LIVE] -= 1
    return lv


@njit(cache=True, nogil=True, inline="always", _nrt=False)
def _reduce(orders, levels, sides, ladder, htab, meta, counters, b, q, t, rm):
    """D, E, C or X at ``b[q:]`` (past the header): delete, or execute or cancel ``n``
    shares of the order its reference names. One path for the four (half of a feed), so
    the type dispatch has one coin toss fewer; a delete is a reduction by all it has.
    Returns ``(level, n)``: the order's level row and the shares taken off it, or
    ``(NIL, 0)`` when the message changed nothing."""
    o, hi = ix_find(orders, htab, meta, rd_u64(b, q), rm)
    if o == NIL:
        counters[B_UNKNOWN_REF] += 1
        return NIL, 0
    return _reduce_at(orders, levels, sides, ladder, htab, meta, counters, b, q, t, o, hi)


@njit(cache=True, nogil=True, inline="always", _nrt=False)
def _reduce_at(orders, levels, sides, ladder, htab, meta, counters, b, q, t, o, hi):
    """``_reduce`` of the live order row ``o`` found at ``hi`` (``ix_find``)."""
    rest = np.int64(orders[_u(o)].shares)
    given = np.int64(rd_u32(b, q + SHARES_AT[t]))  # a delete has no count: unused there
    n = rest if t == T_D else given
    if n == 0:
        counters[B_ZERO_SHARES] += 1
        return NIL, 0
    if n >= rest:
        counters[_u(OVER_OF[t])] += np.int64(n > rest)
        return _remove(orders, levels, sides, ladder, htab, meta, o, hi), rest
    od = orders[_u(o)]
    od.shares = rest - n
    lv = od.level
    levels[_u(lv)].shares -= n
    s = sides[_u(np.int64(od.sd))]
    qty = s.best_qty  # the best level is the only one cached
    s.best_qty = levels[_u(lv)].shares if s.best_px == levels[_u(lv)].price else qty
    return lv, n


@njit(cache=True, nogil=True, inline="always", _nrt=False)
def apply_message(b, p, t, orders, levels, sides, ladder, htab, stocks, meta, counters, rm):
    """Apply one validated message at ``b[p]`` of type ``t``. Returns 0 or a NEED_* status
    (then nothing was changed)."""
    q = p + HEADER_LEN
    if t == T_A or t == T_F:
        side = np.int64(SIDE_OF[b[_u(q + 8)]])  # a table, not a coin-toss branch per side
        if side > ASK:
            counters[B_BAD_SIDE] += 1
            return 0
        shares = rd_u32(b, q + 9)
        if shares == 0:
            counters[B_ZERO_SHARES] += 1
            return 0
        sd = np.int64(rd_u16(b, p + 1)) * 2 + side
        ref = rd_u64(b, q)
        need = _fits_add(sides, ladder, orders, levels, htab, meta, sd, ref, rm)
        if need != 0:
            return need
        _add(
            orders,
            levels,
            sides,
            ladder,
            htab,
            meta,
            counters,
            ref,
            sd,
            rd_u32(b, q + 21),
            shares,
            rm,
        )
    elif t == T_D or t == T_E or t == T_C or t == T_X:
        _reduce(orders, levels, sides, ladder, htab, meta, counters, b, q, t, rm)
    elif t == T_U:
        o, hi = ix_find(orders, htab, meta, rd_u64(b, q), rm)
        if o == NIL:
            counters[B_UNKNOWN_REF] += 1
            return 0
        sd = np.int64(orders[_u(o)].sd)
        new_ref = rd_u64(b, q + 8)
        need = _fits_add(sides, ladder, orders, levels, htab, meta, sd, new_ref, rm)
        if need != 0:
            return need
        _remove(orders, levels, sides, ladder, htab, meta, o, hi)
        shares = rd_u32(b, q + 16)
        if shares == 0:
            counters[B_ZERO_SHARES] += 1
            return 0
        _add(
            orders,
            levels,
            sides,
            ladder,
            htab,
            meta,
            counters,
            new_ref,
            sd,
            rd_u32(b, q + 20),
            shares,
            rm,
        )
    elif t == T_R:
        locate = rd_u16(b, p + 1)
        stocks[_u(locate)].symbol = rd_u64(b, q)
        stocks[_u(locate)].named = 1
    elif t == T_H:
        locate = rd_u16(b, p + 1)
        stocks[_u(locate)].state = b[_u(q + 8)]
    elif t == T_Y:
        stocks[_u(rd_u16(b, p + 1))].regsho = b[_u(q + 8)]
    return 0


@njit(cache=True, nogil=True, _nrt=False)
def apply_stream(b, pos, end, orders, levels, sides, ladder, htab, stocks, meta, counters):
    """Decode and apply every message of ``b[pos:end]`` (2-byte length framing).

    Returns ``(status, pos)``: ``itch.OK`` with ``pos == end``; ``itch.TRUNCATED`` with
    ``pos`` at the length prefix of a message running past ``end``; or a ``NEED_*`` status
    with ``pos`` at the message that did not fit (not applied, not counted).
    """
    rm = _ring_mask(meta)
    while pos < end:
        if pos + FAST_SLACK <= end:
            # The common case in one compare: the message and the next one's header are in
            # the buffer, and its length is its type's (an unknown type's FAST_LEN matches
            # no length). Anything else takes the general path below, which says why.
            length = np.int64(rd_u16(b, pos))
            p = pos + 2
            t = b[_u(p)]
            if length == FAST_LEN[t]:
                nxt = p + length + 2
                prefetch(orders, _ring_row(rm, rd_u64(b, nxt + HEADER_LEN)))
                prefetch(sides, 2 * np.int64(rd_u16(b, nxt + 1)))
                need = apply_message(
                    b, p, t, orders, levels, sides, ladder, htab, stocks, meta, counters, rm
                )
                if need != 0:
                    return need, pos
                counters[itch.C_MESSAGES] += 1
                counters[_u(t)] += 1
                pos = p + length
                continue
        status, length = frame(b, pos, end)
        if status == TRUNCATED:
            return TRUNCATED, pos
        p = pos + 2
        t = b[_u(p)] if length > 0 else 0
        # Overlap the next message's cache misses with this message's work: the order row
        # its reference names and its stock's two sides. Any type will do: a masked row is
        # always in the ring, a locate always has sides, and a prefetch never faults.
        nxt = p + length + 2
        if nxt + HEADER_LEN + 8 <= end:
            prefetch(orders, _ring_row(rm, rd_u64(b, nxt + HEADER_LEN)))
            prefetch(sides, 2 * np.int64(rd_u16(b, nxt + 1)))
        if status == itch.OK:
            need = apply_message(
                b, p, t, orders, levels, sides, ladder, htab, stocks, meta, counters, rm
            )
            if need != 0:
                return need, pos
        count_frame(counters, status, t)
        pos = p + length
    return itch.OK, pos


# --- growth (off the hot path) ----------------------------------------------------------
@njit(cache=True, nogil=True)
def _compact_ladder(sides, old, new):
    """Repack every side's run into ``new`` with room to grow; returns the new bump."""
    dst = 0
    for sd in range(sides.shape[0]):
        s = sides[sd]
        if s.count == 0:
            s.start = 0
            s.cap = 0
            continue
        cap = LADDER_MIN_CAP
        while cap < 2 * s.count:
            cap *= 2
        for k in range(s.count):
            new[dst + k] = old[s.start + k]
        s.start = dst
        s.cap = cap
        dst += cap
    return dst


@njit(cache=True, nogil=True)
def _ladder_needed(sides):
    total = 0
    for sd in range(sides.shape[0]):
        c = sides[sd].count
        if c > 0:
            cap = LADDER_MIN_CAP
            while cap < 2 * c:
                cap *= 2
            total += cap
    return total


# --- queries and export (off the hot path) -----------------------------------------------
@njit(cache=True, nogil=True)
def depth(sides, ladder, levels, locate, side, out):
    """Top levels of one side, best first, into ``out[:, 0:3]`` = (price, shares, orders).

    Returns how many rows were written (at most ``out.shape[0]``)."""
    s = sides[locate * 2 + side]
    n = min(s.count, out.shape[0])
    for k in range(n):
        lv = ladder[s.start + s.count - 1 - k].level
        out[k, 0] = levels[lv].price
        out[k, 1] = levels[lv].shares
        out[k, 2] = levels[lv].count
    return n


@njit(cache=True, nogil=True)
def side_orders(sides, ladder, levels, out):
    """``out[sd]``: live orders on side ``sd``, summed over its levels (the hot path keeps
    no per-side count: nothing on it needs one)."""
    for sd in range(sides.shape[0]):
        s = sides[sd]
        n = 0
        for k in range(s.count):
            n += levels[ladder[s.start + k].level].count
        out[sd] = n


@njit(cache=True, nogil=True)
def count_levels(sides):
    total = 0
    for sd in range(sides.shape[0]):
        total += sides[sd].count
    return total


@njit(cache=True, nogil=True)
def export_levels(sides, ladder, levels, out):
    """Every non-empty level as rows (locate, side, price, shares, orders) in digest order:
    locate, then bid before ask, then price ascending."""
    r = 0
    for sd in range(sides.shape[0]):
        s = sides[sd]
        for k in range(s.count):
            idx = k if sd % 2 == BID else s.count - 1 - k
            lv = ladder[s.start + idx].level
            out[r, 0] = sd // 2
            out[r, 1] = sd % 2
            out[r, 2] = levels[lv].price
            out[r, 3] = levels[lv].shares
            out[r, 4] = levels[lv].count
            r += 1
    return r


@njit(cache=True, nogil=True)
def _put_int(buf, w, v):
    if v == 0:
        buf[w] = 48
        return w + 1
    n = 0
    x = v
    while x > 0:
        n += 1
        x //= 10
    x = v
    for k in range(n - 1, -1, -1):
        buf[w + k] = 48 + x % 10
        x //= 10
    return w + n


@njit(cache=True, nogil=True)
def digest_text(rows, buf):
    """Write the digest text (``locate,side,price,shares\\n`` per level) into ``buf``."""
    w = 0
    for r in range(rows.shape[0]):
        w = _put_int(buf, w, rows[r, 0])
        buf[w] = 44
        buf[w + 1] = 66 if rows[r, 1] == BID else 83
        buf[w + 2] = 44
        w = _put_int(buf, w + 3, rows[r, 2])
        buf[w] = 44
        w = _put_int(buf, w + 1, rows[r, 3])
        buf[w] = 10
        w += 1
    return w


# --- invariant checker (tests, diagnostics) ----------------------------------------------
CHECK_MESSAGES = {
    1: "ladder keys not strictly ascending",
    2: "level price disagrees with its ladder key",
    3: "empty level left on the ladder",
    4: "FIFO link broken (prev/next disagree)",
    5: "order on a level belongs elsewhere (level, stock or side)",
    6: "non-positive live quantity",
    7: "level order count differs from its queue",
    8: "level aggregate differs from the sum of its orders",
    9: "FIFO tail differs from the last order",
    10: "cached BBO differs from the best level",
    # 11 (a side's own live-order count) is gone: the side keeps none
    12: "crossed or locked book",
    13: "order index entry points at a wrong or dead order",
    14: "order index count differs from the live orders",
    15: "live order not reachable through the order index",
    16: "ring spill count differs from the hash entries mapping there",
}


@njit(cache=True, nogil=True)
def check_invariants(orders, levels, sides, ladder, htab, meta, allow_crossed):
    """First broken invariant as ``(code, locate, side, detail)``; code 0 when all hold."""
    live = 0
    for sd in range(sides.shape[0]):
        s = sides[sd]
        side = sd % 2
        locate = sd // 2
        in_side = 0
        for k in range(s.count):
            rung = ladder[s.start + k]
            if k > 0 and ladder[s.start + k - 1].key >= rung.key:
                return 1, locate, side, k
            lv = rung.level
            if _side_key(side, levels[lv].price) != rung.key:
                return 2, locate, side, levels[lv].price
            if levels[lv].count <= 0:
                return 3, locate, side, levels[lv].price
            o = levels[lv].head
            prev = NIL
            n = 0
            total = 0
            while o != NIL and n <= levels[lv].count:
                od = orders[o]
                if od.prev != prev:
                    return 4, locate, side, o
                if o < RING_BASE or od.level != lv or od.sd != sd:
                    return 5, locate, side, o
                if od.shares <= 0:
                    return 6, locate, side, o
                total += od.shares
                n += 1
                prev = o
                o = od.next
            if n != levels[lv].count or o != NIL:
                return 7, locate, side, levels[lv].price
            if total != levels[lv].shares or total <= 0:
                return 8, locate, side, levels[lv].price
            if levels[lv].tail != prev:
                return 9, locate, side, levels[lv].price
            in_side += n
        if s.count > 0:
            top = ladder[s.start + s.count - 1].level
            if s.best_px != levels[top].price or s.best_qty != levels[top].shares:
                return 10, locate, side, s.best_px
        elif s.best_px != 0 or s.best_qty != 0:
            return 10, locate, side, s.best_px
        live += in_side
        if side == ASK and not allow_crossed:
            b = sides[sd - 1]
            if b.count > 0 and s.count > 0 and b.best_px >= s.best_px:
                return 12, locate, side, b.best_px
    ring = meta[M_RING_MASK] + 1
    spill_start = RING_BASE + ring
    indexed = 0
    hashed = 0
    for o in range(RING_BASE, spill_start):
        if orders[o].level != NIL:
            indexed += 1
            if _ring_row(_ring_mask(meta), orders[o].ref) != o:
                return 13, -1, -1, o
    spill = np.zeros(ring, np.int64)
    for i in range(htab.shape[0]):
        e = htab[i]
        if e.slot >= 0:
            hashed += 1
            if (
                e.slot < spill_start
                or e.slot >= meta[M_ORDER_HWM]
                or orders[e.slot].level == NIL
                or orders[e.slot].ref != e.key
            ):
                return 13, -1, -1, e.slot
            spill[_ring_row(_ring_mask(meta), e.key) - RING_BASE] += 1
    for i in range(ring):
        if spill[i] != orders[RING_BASE + i].spill:
            return 16, -1, -1, i
    for o in range(RING_BASE, meta[M_ORDER_HWM]):
        if orders[o].level != NIL:
            if o >= spill_start:
                indexed += 1
            found, _ = ix_find(orders, htab, meta, orders[o].ref, _ring_mask(meta))
            if found != o:
                return 15, -1, -1, o
    if indexed != live or indexed != meta[M_LIVE] or hashed != meta[M_HASH_COUNT]:
        return 14, -1, -1, indexed
    return 0, -1, -1, 0


# --- the Python face ----------------------------------------------------------------------
class CapacityError(MemoryError):
    """A book structure would have to grow past its configured maximum."""


def _symbol(packed: int) -> str:
    return int(packed).to_bytes(8, "big").decode("ascii", "replace").rstrip(" \x00")


HUGE = 2 << 20  # arrays this big go in transparent huge pages where the kernel allows it


def zeros(n: int, dtype) -> np.ndarray:
    """``np.zeros(n, dtype)`` starting on a 64-byte cache-line boundary. numpy aligns to 16
    bytes: half the 32-byte order and side rows would straddle two lines, and every
    access to them touch both. An array of ``HUGE`` bytes or more is an anonymous mapping
    (page-aligned, zero-filled) advised to transparent huge pages: the order ring is
    reached at random, and in 4 KiB pages most of those reaches also miss the TLB."""
    dtype = np.dtype(dtype)
    size = n * dtype.itemsize
    if size >= HUGE:
        mm = mmap.mmap(-1, -(-size // HUGE) * HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if hasattr(mmap, "MADV_HUGEPAGE"):
            try:
                mm.madvise(mmap.MADV_HUGEPAGE)
            except OSError:  # THP off ("never"): 4 KiB pages, as before
                pass
        return np.frombuffer(mm, dtype, count=n)
    raw = np.zeros(size + 64, np.uint8)
    off = -raw.ctypes.data % 64
    return raw[off : off + size].view(dtype)


class Book:
    """All books of one feed: arrays plus the growth policy around ``apply_stream``.

    Initial sizes are hints; each structure doubles when a message needs more room (off
    the hot path, counted in ``B_GROWTHS``) up to ``max_orders``-derived limits, past which
    ``CapacityError`` is raised; more than ``max_orders`` live orders is refused the same
    way. ``ring`` (default: ``orders`` rounded up to a power of two) is the reference
    ring's length, ``spill`` (default: an eighth of that) the spill rows for orders whose
    ring row is taken, ``hash`` (default: twice ``spill``) the hash that finds them.
    """

    def __init__(
        self,
        orders: int = 1 << 16,
        levels: int = 1 << 14,
        ladder: int = 1 << 16,
        max_orders: int = 1 << 28,
        counters: np.ndarray | None = None,
        ring: int | None = None,
        spill: int | None = None,
        hash: int | None = None,
    ):
        self.max_orders = max_orders
        ring = _pow2(orders if ring is None else ring)
        spill = max(16, ring // 8 if spill is None else spill)
        self.orders = zeros(RING_BASE + ring + spill, ORDER)
        self.orders["level"] = NIL
        self.levels = zeros(levels, LEVEL)
        self.sides = zeros(2 * N_LOCATES, SIDE)
        self.ladder = zeros(ladder + SCAN, RUNG)
        bits = (_pow2(2 * spill if hash is None else hash)).bit_length() - 1
        self.htab = zeros(1 << bits, HASH)
        self.htab["slot"] = NIL
        self.stocks = zeros(N_LOCATES, STOCK)
        self.meta = np.zeros(META_LEN, np.int64)
        self.meta[M_ORDER_FREE] = NIL
        self.meta[M_ORDER_HWM] = RING_BASE + ring
        self.meta[M_LEVEL_FREE] = NIL
        self.meta[M_HASH_SHIFT] = 64 - bits
        self.meta[M_RING_MAX] = _pow2(4 * max_orders)
        self.meta[M_RING_MASK] = ring - 1
        self.meta[M_MAX_LIVE] = max_orders
        self.counters = itch.new_counters() if counters is None else counters

    @property
    def ring(self) -> int:
        """The reference ring's length (rows)."""
        return int(self.meta[M_RING_MASK]) + 1

    @property
    def spill_rows(self) -> int:
        return len(self.orders) - RING_BASE - self.ring

    @classmethod
    def sized_like(cls, other: Book) -> Book:
        """An empty book with ``other``'s current room (benchmarks: no growth while timed)."""
        return cls(
            orders=other.ring,
            levels=len(other.levels),
            ladder=len(other.ladder) - SCAN,
            ring=other.ring,
            spill=other.spill_rows,
            hash=len(other.htab),
            max_orders=other.max_orders,
        )

    def take(self, other: Book) -> None:
        """Become ``other`` (its arrays and limits), keeping this book's counters: a
        consumer that restored or joined its books mid-session keeps the object its loop
        and its final report hold."""
        counters = self.counters
        self.__dict__.update(other.__dict__)
        self.counters = counters

    @classmethod
    def for_capacity(cls, orders: int, counters: np.ndarray | None = None) -> Book:
        """The book ``tickwire run`` allocates for ``run.orders`` initial orders."""
        return cls(
            orders=orders,
            levels=max(1 << 14, orders // 4),
            ladder=max(1 << 16, orders // 2),
            counters=counters,
        )

    # -- feeding --
    def arrays(self):
        """The book's arrays, in the order the jitted apply functions take them (again after
        every ``grow``, which may replace them)."""
        return (
            self.orders,
            self.levels,
            self.sides,
            self.ladder,
            self.htab,
            self.stocks,
            self.meta,
            self.counters,
        )

    def feed(
        self, buf: np.ndarray, start: int = 0, end: int | None = None, partial_ok: bool = False
    ) -> int:
        """Apply every message of ``buf[start:end]``; returns the offset where it stopped.

        A message running past ``end`` raises ``itch.TruncatedInput`` unless
        ``partial_ok`` (then its offset is returned, for the caller to resume with more
        bytes)."""
        end = len(buf) if end is None else end
        pos = start
        while True:
            status, pos = apply_stream(buf, pos, end, *self.arrays())
            if status == itch.OK:
                return pos
            if status == TRUNCATED:
                if partial_ok:
                    return pos
                raise itch.TruncatedInput(pos)
            self.grow(status)

    def grow(self, need: int) -> None:
        """Make the room an apply function asked for (its ``NEED_*`` status), off the hot
        path. Raises ``CapacityError`` past ``max_orders``."""
        if need == NEED_ORDERS:
            raise CapacityError(
                f"live orders would exceed the configured maximum of {self.max_orders}"
            )
        self.counters[B_GROWTHS] += 1
        if need == NEED_SPILL:
            room = self.spill_rows
            if 2 * room > self.max_orders:
                raise CapacityError(
                    f"spill rows would exceed the configured maximum of {self.max_orders}"
                )
            new = zeros(len(self.orders) + room, ORDER)
            new[: len(self.orders)] = self.orders
            new["level"][len(self.orders) :] = NIL
            self.orders = new
        elif need == NEED_LEVELS:
            self.levels = self._doubled(self.levels, self.max_orders, "price levels")
        elif need == NEED_LADDER:
            room = len(self.ladder) - SCAN  # the padding is not room
            size = max(2 * room, 2 * _ladder_needed(self.sides) + LADDER_MIN_CAP)
            if size > 4 * self.max_orders:
                raise CapacityError(f"price ladder would exceed {4 * self.max_orders} entries")
            new = zeros(size + SCAN, RUNG)
            self.meta[M_LADDER_BUMP] = _compact_ladder(self.sides, self.ladder, new)
            self.ladder = new
        elif need == NEED_HASH:
            size = 2 * len(self.htab)
            if size > 4 * self.max_orders:
                raise CapacityError(f"order index would exceed {4 * self.max_orders} entries")
            new = zeros(size, HASH)
            new["slot"] = NIL
            shift = 64 - (size.bit_length() - 1)
            ht_rehash(self.htab, new, shift)
            self.htab = new
            self.meta[M_HASH_SHIFT] = shift
        elif need == NEED_RING:  # more than a quarter of the ring spilled: double it
            ring = 2 * self.ring
            new = zeros(RING_BASE + ring + self.spill_rows, ORDER)
            new["level"] = NIL
            htab = zeros(len(self.htab), HASH)
            htab["slot"] = NIL
            remap = np.full(len(self.orders), NIL, np.int32)
            spilled, hwm = relocate_orders(
                self.orders,
                self.meta[M_ORDER_HWM],
                new,
                ring - 1,
                remap,
                self.levels,
                self.meta[M_LEVEL_HWM],
                htab,
                self.meta[M_HASH_SHIFT],
            )
            self.orders, self.htab = new, htab
            self.meta[M_RING_MASK] = ring - 1
            self.meta[M_HASH_COUNT] = spilled
            self.meta[M_ORDER_HWM] = hwm
            self.meta[M_ORDER_FREE] = NIL
        else:  # pragma: no cover - a status apply_stream never returns
            raise AssertionError(f"unknown book status {need}")

    @staticmethod
    def _doubled(arr: np.ndarray, limit: int, what: str) -> np.ndarray:
        """``arr`` with twice the room."""
        if 2 * len(arr) > limit:
            raise CapacityError(f"{what} would exceed the configured maximum of {limit}")
        new = zeros(2 * len(arr), arr.dtype)
        new[: len(arr)] = arr
        return new

    # -- queries --
    @property
    def live_orders(self) -> int:
        return int(self.meta[M_LIVE])

    def bbo(self, locate: int) -> tuple[int, int, int, int]:
        b = self.sides[2 * locate]
        a = self.sides[2 * locate + 1]
        return int(b["best_px"]), int(b["best_qty"]), int(a["best_px"]), int(a["best_qty"])

    def depth(self, locate: int, side: int, n: int = 5) -> list[tuple[int, int, int]]:
        out = np.zeros((n, 3), np.int64)
        k = depth(self.sides, self.ladder, self.levels, locate, side, out)
        return [tuple(int(x) for x in out[i]) for i in range(k)]

    def order(self, ref: int) -> dict | None:
        o, _ = ix_find(self.orders, self.htab, self.meta, np.uint64(ref), _ring_mask(self.meta))
        if o == NIL:
            return None
        od = self.orders[o]
        sd = int(od["sd"])
        return {
            "ref": int(od["ref"]),
            "locate": sd // 2,
            "side": "BS"[sd % 2],
            "price": int(self.levels[int(od["level"])]["price"]),
            "shares": int(od["shares"]),
        }

    def queue(self, locate: int, side: int, price: int) -> list[int]:
        """References resting at one level, in time priority (oldest first)."""
        s = self.sides[2 * locate + side]
        start, count = int(s["start"]), int(s["count"])
        keys = self.ladder["key"][start : start + count]
        key = _key(side, price)
        j = int(np.searchsorted(keys, key))
        if j == count or keys[j] != key:
            return []
        refs, o = [], int(self.levels[int(self.ladder["level"][start + j])]["head"])
        while o != NIL:
            refs.append(int(self.orders[o]["ref"]))
            o = int(self.orders[o]["next"])
        return refs

    def levels_table(self) -> np.ndarray:
        """Every non-empty level, rows (locate, side, price, shares, orders), digest order."""
        out = np.zeros((count_levels(self.sides), 5), np.int64)
        export_levels(self.sides, self.ladder, self.levels, out)
        return out

    def digest(self) -> str:
        rows = self.levels_table()
        buf = np.zeros(max(1, 48 * len(rows)), np.uint8)
        n = digest_text(rows, buf)
        return hashlib.sha256(buf[:n].tobytes()).hexdigest()

    def stocks_summary(self) -> dict[str, dict]:
        """Per locate (decimal string) named by the directory or holding orders: symbol,
        best bid/ask price and aggregate shares (0, 0 when empty), live orders."""
        per_side = np.zeros(self.sides.shape[0], np.int64)
        side_orders(self.sides, self.ladder, self.levels, per_side)
        orders = per_side.reshape(N_LOCATES, 2).sum(axis=1)
        wanted = np.nonzero((self.stocks["named"] != 0) | (orders > 0))[0]
        out = {}
        for loc in wanted.tolist():
            bp, bq, ap, aq = self.bbo(loc)
            out[str(loc)] = {
                "symbol": _symbol(self.stocks[loc]["symbol"]) if self.stocks[loc]["named"] else "",
                "bid_px": bp,
                "bid_qty": bq,
                "ask_px": ap,
                "ask_qty": aq,
                "orders": int(orders[loc]),
            }
        return out

    def anomalies(self) -> dict[str, int]:
        return {name: int(self.counters[i]) for name, i in ANOMALIES.items()}

    def check(self, allow_crossed: bool = False) -> str | None:
        """The first broken invariant as one line, or None when every invariant holds."""
        code, locate, side, detail = check_invariants(
            self.orders, self.levels, self.sides, self.ladder, self.htab, self.meta, allow_crossed
        )
        if code == 0:
            return None
        where = f"locate {locate} side {'BS'[side]}" if locate >= 0 else "order index"
        return f"{CHECK_MESSAGES[code]} ({where}, detail {detail})"


def _pow2(n: int) -> int:
    """The smallest power of two >= ``n`` (at least 16)."""
    return 1 << max(4, int(n - 1).bit_length())


def _key(side: int, price: int) -> int:
    return price if side == BID else ASK_KEY_BASE - price
