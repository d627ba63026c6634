"""Nasdaq TotalView-ITCH 5.0 decoder, numba-compiled, straight from a uint8 buffer.

Contract
- Input is a numpy ``uint8`` array holding messages in Nasdaq's framing: a 2-byte big-endian
  length, then that many bytes of message. The same framing is used by the historical files
  and by MoldUDP64 message blocks, so one decoder serves both.
- Nothing here raises on bad input. Framing problems come back as status codes and are
  counted in the caller's ``counters`` array: an unknown type, or a length different from the
  spec's length for that type, is counted and skipped (the framing length still lets the walk
  continue); a message or length prefix running past the end of the buffer stops the walk and
  reports the byte offset of its length prefix (``TRUNCATED``).
- No Python object is made per message: the readers return machine integers, and
  ``decode_into`` fills one row of a preallocated structured array (``RECORD``).

The book (``dataplane.book``) uses the same readers and framing walk on its hot path; the
record form exists for tests, tools and anything that wants every field of every type.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

# --- message types and their total lengths (header included), from the spec ---------
MSG_LENGTHS: dict[str, int] = {
    "S": 12,
    "R": 39,
    "H": 25,
    "Y": 20,
    "L": 26,
    "V": 35,
    "W": 12,
    "K": 28,
    "J": 35,
    "h": 21,
    "A": 36,
    "F": 40,
    "E": 31,
    "C": 36,
    "X": 23,
    "D": 19,
    "U": 35,
    "P": 44,
    "Q": 40,
    "B": 19,
    "I": 50,
    "N": 20,
    "O": 48,
}

MSG_LEN = np.zeros(256, np.int64)  # type byte -> length; 0 = not an ITCH 5.0 type
for _t, _n in MSG_LENGTHS.items():
    MSG_LEN[ord(_t)] = _n

HEADER_LEN = 11

# type bytes as integer constants (numba folds module-level ints)
T_S = 83
T_R = 82
T_H = 72
T_Y = 89
T_L = 76
T_V = 86
T_W = 87
T_K = 75
T_J = 74
T_h = 104
T_A = 65
T_F = 70
T_E = 69
T_C = 67
T_X = 88
T_D = 68
T_U = 85
T_P = 80
T_Q = 81
T_B = 66
T_I = 73
T_N = 78
T_O = 79

# --- framing status codes --------------------------------------------------------------
OK = 0
UNKNOWN_TYPE = 1
BAD_LENGTH = 2
TRUNCATED = 3

# --- counters: one int64 array shared by decoder and book ------------------------------
# indices 0..255 count valid messages by type byte; named counters follow.
C_MESSAGES = 256  # every framed message, valid or not
C_UNKNOWN_TYPE = 257
C_BAD_LENGTH = 258
N_DECODER_COUNTERS = 259
COUNTERS_LEN = 320  # room for the book's counters (dataplane.book) and later stages


def new_counters() -> np.ndarray:
    return np.zeros(COUNTERS_LEN, np.int64)


# --- big-endian readers ------------------------------------------------------------------
# One unaligned load + bswap each, emitted directly as LLVM IR: numba's own element access
# adds a negative-index fix-up per byte, which stops LLVM from merging byte loads.
def _be_loader(nbytes: int):
    bits = 8 * nbytes

    @intrinsic
    def load(typingctx, arr, idx):
        if not (
            isinstance(arr, types.Array)
            and arr.dtype == types.uint8
            and isinstance(idx, types.Integer)
        ):
            return None
        rtype = types.uint64 if nbytes == 8 else types.int64

        def codegen(context, builder, sig, args):
            ary = context.make_array(sig.args[0])(context, builder, args[0])
            idx64 = context.cast(builder, args[1], sig.args[1], types.int64)
            ptr = builder.gep(ary.data, [idx64])
            ity = ir.IntType(bits)
            value = builder.load(builder.bitcast(ptr, ity.as_pointer()), align=1)
            if nbytes > 1:
                value = builder.call(builder.module.declare_intrinsic("llvm.bswap", [ity]), [value])
            return builder.zext(value, ir.IntType(64)) if nbytes < 8 else value

        return rtype(arr, idx), codegen

    return load


_ld16 = _be_loader(2)
_ld32 = _be_loader(4)
_ld64 = _be_loader(8)


@njit(cache=True, nogil=True, inline="always", _nrt=False)
def rd_u16(b, p):
    return _ld16(b, p)


@njit(cache=True, nogil=True, inline="always", _nrt=False)
def rd_u32(b, p):
    return _ld32(b, p)


@njit(cache=True, nogil=True, inline="always", _nrt=False)
def rd_u48(b, p):
    return (_ld16(b, p) << 32) | _ld32(b, p + 2)


@njit(cache=True, nogil=True, inline="always", _nrt=False)
def rd_u64(b, p):
    """Unsigned 64-bit (order references, match numbers, 8-byte share counts)."""
    return _ld64(b, p)


@njit(cache=True, nogil=True, inline="always", _nrt=False)
def rd_alpha8(b, p):
    """An 8-byte Alpha field (Stock) packed big-endian into a uint64."""
    return _ld64(b, p)


@njit(cache=True, nogil=True, inline="always", _nrt=False)
def frame(b, pos, end):
    """Validate the message framed at ``pos``.

    Returns ``(status, length)``: ``length`` is the framing length (message bytes after the
    2-byte prefix), so ``pos + 2 + length`` is the next message whenever status is not
    ``TRUNCATED``.
    """
    if pos + 2 > end:
        return TRUNCATED, 0
    n = rd_u16(b, pos)
    if pos + 2 + n > end:
        return TRUNCATED, n
    if n == 0:
        return BAD_LENGTH, 0
    want = MSG_LEN[b[pos + 2]]
    if want == 0:
        return UNKNOWN_TYPE, n
    if want != n:
        return BAD_LENGTH, n
    return OK, n


@njit(cache=True, nogil=True, inline="always", _nrt=False)
def count_frame(counters, status, t):
    """Account one framed message (valid ones by type)."""
    counters[C_MESSAGES] += 1
    if status == OK:
        counters[t] += 1
    elif status == UNKNOWN_TYPE:
        counters[C_UNKNOWN_TYPE] += 1
    else:
        counters[C_BAD_LENGTH] += 1


# --- full decode into a record ---------------------------------------------------------
# One structured row holds any message; each type fills the fields FIELDS names for it.
RECORD = np.dtype(
    [
        ("type", np.uint8),
        ("locate", np.uint16),
        ("tracking", np.uint16),
        ("timestamp", np.uint64),
        ("order_ref", np.uint64),
        ("new_order_ref", np.uint64),
        ("match", np.uint64),
        ("side", np.uint8),
        ("shares", np.uint64),
        ("price", np.uint32),
        ("stock", np.uint64),  # 8 ASCII bytes, big-endian packed
        ("attribution", np.uint32),  # F attribution, L MPID (4 ASCII bytes packed)
        ("printable", np.uint8),
        ("cross_type", np.uint8),
        ("event_code", np.uint8),
        # R stock directory
        ("market_category", np.uint8),
        ("financial_status", np.uint8),
        ("round_lot_size", np.uint32),
        ("round_lots_only", np.uint8),
        ("issue_classification", np.uint8),
        ("issue_subtype", np.uint16),
        ("authenticity", np.uint8),
        ("short_sale_threshold", np.uint8),
        ("ipo_flag", np.uint8),
        ("luld_tier", np.uint8),
        ("etp_flag", np.uint8),
        ("etp_leverage", np.uint32),
        ("inverse", np.uint8),
        # H, Y, L, W, h, N
        ("trading_state", np.uint8),
        ("reserved", np.uint8),
        ("reason", np.uint32),
        ("reg_sho_action", np.uint8),
        ("primary_mm", np.uint8),
        ("mm_mode", np.uint8),
        ("participant_state", np.uint8),
        ("breached_level", np.uint8),
        ("market_code", np.uint8),
        ("halt_action", np.uint8),
        ("interest_flag", np.uint8),
        # V (Price(8)), K, J, I, O
        ("level1", np.uint64),
        ("level2", np.uint64),
        ("level3", np.uint64),
        ("release_time", np.uint32),
        ("release_qualifier", np.uint8),
        ("upper_price", np.uint32),
        ("lower_price", np.uint32),
        ("extension", np.uint32),
        ("paired_shares", np.uint64),
        ("imbalance_shares", np.uint64),
        ("imbalance_direction", np.uint8),
        ("far_price", np.uint32),
        ("near_price", np.uint32),
        ("variation", np.uint8),
        ("open_eligibility", np.uint8),
        ("near_time", np.uint64),
    ],
    align=True,
)

_COMMON = ("type", "locate", "tracking", "timestamp")
FIELDS: dict[str, tuple[str, ...]] = {
    "S": ("event_code",),
    "R": (
        "stock",
        "market_category",
        "financial_status",
        "round_lot_size",
        "round_lots_only",
        "issue_classification",
        "issue_subtype",
        "authenticity",
        "short_sale_threshold",
        "ipo_flag",
        "luld_tier",
        "etp_flag",
        "etp_leverage",
        "inverse",
    ),
    "H": ("stock", "trading_state", "reserved", "reason"),
    "Y": ("stock", "reg_sho_action"),
    "L": ("attribution", "stock", "primary_mm", "mm_mode", "participant_state"),
    "V": ("level1", "level2", "level3"),
    "W": ("breached_level",),
    "K": ("stock", "release_time", "release_qualifier", "price"),
    "J": ("stock", "price", "upper_price", "lower_price", "extension"),
    "h": ("stock", "market_code", "halt_action"),
    "A": ("order_ref", "side", "shares", "stock", "price"),
    "F": ("order_ref", "side", "shares", "stock", "price", "attribution"),
    "E": ("order_ref", "shares", "match"),
    "C": ("order_ref", "shares", "match", "printable", "price"),
    "X": ("order_ref", "shares"),
    "D": ("order_ref",),
    "U": ("order_ref", "new_order_ref", "shares", "price"),
    "P": ("order_ref", "side", "shares", "stock", "price", "match"),
    "Q": ("shares", "stock", "price", "match", "cross_type"),
    "B": ("match",),
    "I": (
        "paired_shares",
        "imbalance_shares",
        "imbalance_direction",
        "stock",
        "far_price",
        "near_price",
        "price",
        "cross_type",
        "variation",
    ),
    "N": ("stock", "interest_flag"),
    "O": (
        "stock",
        "open_eligibility",
        "price",
        "upper_price",
        "near_price",
        "near_time",
        "lower_price",
        "extension",
    ),
}
# O: Min Allowable Price -> price, Max Allowable -> upper_price, Lower/Upper Collar ->
#    lower_price/extension (named for their position; see decode_into).
# I: Current Reference Price -> price.   J: Reference Price -> price.
_ALPHA_FIELDS = {"stock": 8, "attribution": 4}
_CHAR_FIELDS = {
    "type",
    "side",
    "printable",
    "cross_type",
    "event_code",
    "market_category",
    "financial_status",
    "round_lots_only",
    "issue_classification",
    "authenticity",
    "short_sale_threshold",
    "ipo_flag",
    "luld_tier",
    "etp_flag",
    "inverse",
    "trading_state",
    "reserved",
    "reg_sho_action",
    "primary_mm",
    "mm_mode",
    "participant_state",
    "breached_level",
    "market_code",
    "halt_action",
    "interest_flag",
    "release_qualifier",
    "imbalance_direction",
    "variation",
    "open_eligibility",
}


@njit(cache=True, nogil=True)
def decode_into(b, p, out, i):
    """Decode the (already validated) message starting at ``b[p]`` into ``out[i]``."""
    r = out[i]
    t = b[p]
    r.type = t
    r.locate = rd_u16(b, p + 1)
    r.tracking = rd_u16(b, p + 3)
    r.timestamp = rd_u48(b, p + 5)
    q = p + HEADER_LEN
    if t == T_A or t == T_F or t == T_P:
        r.order_ref = rd_u64(b, q)
        r.side = b[q + 8]
        r.shares = rd_u32(b, q + 9)
        r.stock = rd_alpha8(b, q + 13)
        r.price = rd_u32(b, q + 21)
        if t == T_F:
            r.attribution = rd_u32(b, q + 25)
        elif t == T_P:
            r.match = rd_u64(b, q + 25)
    elif t == T_E or t == T_C:
        r.order_ref = rd_u64(b, q)
        r.shares = rd_u32(b, q + 8)
        r.match = rd_u64(b, q + 12)
        if t == T_C:
            r.printable = b[q + 20]
            r.price = rd_u32(b, q + 21)
    elif t == T_X:
        r.order_ref = rd_u64(b, q)
        r.shares = rd_u32(b, q + 8)
    elif t == T_D:
        r.order_ref = rd_u64(b, q)
    elif t == T_U:
        r.order_ref = rd_u64(b, q)
        r.new_order_ref = rd_u64(b, q + 8)
        r.shares = rd_u32(b, q + 16)
        r.price = rd_u32(b, q + 20)
    elif t == T_S:
        r.event_code = b[q]
    elif t == T_R:
        r.stock = rd_alpha8(b, q)
        r.market_category = b[q + 8]
        r.financial_status = b[q + 9]
        r.round_lot_size = rd_u32(b, q + 10)
        r.round_lots_only = b[q + 14]
        r.issue_classification = b[q + 15]
        r.issue_subtype = rd_u16(b, q + 16)
        r.authenticity = b[q + 18]
        r.short_sale_threshold = b[q + 19]
        r.ipo_flag = b[q + 20]
        r.luld_tier = b[q + 21]
        r.etp_flag = b[q + 22]
        r.etp_leverage = rd_u32(b, q + 23)
        r.inverse = b[q + 27]
    elif t == T_H:
        r.stock = rd_alpha8(b, q)
        r.trading_state = b[q + 8]
        r.reserved = b[q + 9]
        r.reason = rd_u32(b, q + 10)
    elif t == T_Y:
        r.stock = rd_alpha8(b, q)
        r.reg_sho_action = b[q + 8]
    elif t == T_L:
        r.attribution = rd_u32(b, q)
        r.stock = rd_alpha8(b, q + 4)
        r.primary_mm = b[q + 12]
        r.mm_mode = b[q + 13]
        r.participant_state = b[q + 14]
    elif t == T_V:
        r.level1 = rd_u64(b, q)
        r.level2 = rd_u64(b, q + 8)
        r.level3 = rd_u64(b, q + 16)
    elif t == T_W:
        r.breached_level = b[q]
    elif t == T_K:
        r.stock = rd_alpha8(b, q)
        r.release_time = rd_u32(b, q + 8)
        r.release_qualifier = b[q + 12]
        r.price = rd_u32(b, q + 13)
    elif t == T_J:
        r.stock = rd_alpha8(b, q)
        r.price = rd_u32(b, q + 8)
        r.upper_price = rd_u32(b, q + 12)
        r.lower_price = rd_u32(b, q + 16)
        r.extension = rd_u32(b, q + 20)
    elif t == T_h:
        r.stock = rd_alpha8(b, q)
        r.market_code = b[q + 8]
        r.halt_action = b[q + 9]
    elif t == T_Q:
        r.shares = rd_u64(b, q)
        r.stock = rd_alpha8(b, q + 8)
        r.price = rd_u32(b, q + 16)
        r.match = rd_u64(b, q + 20)
        r.cross_type = b[q + 28]
    elif t == T_B:
        r.match = rd_u64(b, q)
    elif t == T_I:
        r.paired_shares = rd_u64(b, q)
        r.imbalance_shares = rd_u64(b, q + 8)
        r.imbalance_direction = b[q + 16]
        r.stock = rd_alpha8(b, q + 17)
        r.far_price = rd_u32(b, q + 25)
        r.near_price = rd_u32(b, q + 29)
        r.price = rd_u32(b, q + 33)
        r.cross_type = b[q + 37]
        r.variation = b[q + 38]
    elif t == T_N:
        r.stock = rd_alpha8(b, q)
        r.interest_flag = b[q + 8]
    elif t == T_O:
        r.stock = rd_alpha8(b, q)
        r.open_eligibility = b[q + 8]
        r.price = rd_u32(b, q + 9)  # minimum allowable price
        r.upper_price = rd_u32(b, q + 13)  # maximum allowable price
        r.near_price = rd_u32(b, q + 17)
        r.near_time = rd_u64(b, q + 21)
        r.lower_price = rd_u32(b, q + 29)  # lower collar
        r.extension = rd_u32(b, q + 33)  # upper collar


@njit(cache=True, nogil=True)
def decode_stream(b, pos, end, out, counters):
    """Decode every valid message of ``b[pos:end]`` into ``out`` (one row each).

    Returns ``(status, pos, n)``: ``n`` rows written; ``status`` is ``OK`` when the walk
    reached ``end`` or ``out`` is full (then ``pos`` is where to resume), or ``TRUNCATED``
    with ``pos`` at the broken message's length prefix.
    """
    n = 0
    while pos < end and n < out.shape[0]:
        status, length = frame(b, pos, end)
        if status == TRUNCATED:
            return TRUNCATED, pos, n
        t = b[pos + 2] if length > 0 else 0
        count_frame(counters, status, t)
        if status == OK:
            decode_into(b, pos + 2, out, n)
            n += 1
        pos += 2 + length
    return OK, pos, n


@njit(cache=True, nogil=True, _nrt=False)
def walk_checksum(b, pos, end, counters):
    """Decode-only pass over the book-relevant fields (the benchmark's decode tier).

    Reads exactly what the book path reads for each type and folds it into a checksum,
    so the work cannot be optimised away. Returns ``(status, pos, checksum)``.
    """
    acc = np.uint64(0)
    while pos < end:
        status, length = frame(b, pos, end)
        if status == TRUNCATED:
            return TRUNCATED, pos, acc
        p = pos + 2
        t = b[p] if length > 0 else 0
        count_frame(counters, status, t)
        if status == OK:
            q = p + HEADER_LEN
            acc ^= np.uint64(rd_u16(b, p + 1))
            if t == T_A or t == T_F:
                acc += rd_u64(b, q) ^ np.uint64(b[q + 8] + rd_u32(b, q + 9) + rd_u32(b, q + 21))
            elif t == T_E or t == T_C or t == T_X:
                acc += rd_u64(b, q) ^ np.uint64(rd_u32(b, q + 8))
            elif t == T_D:
                acc += rd_u64(b, q)
            elif t == T_U:
                acc += rd_u64(b, q) ^ rd_u64(b, q + 8)
                acc += np.uint64(rd_u32(b, q + 16) + rd_u32(b, q + 20))
        pos = p + length
    return OK, pos, acc


# --- Python-side helpers (tools and tests; not the hot path) -------------------------
def _field_value(name: str, value: int):
    if name in _ALPHA_FIELDS:
        width = _ALPHA_FIELDS[name]
        return int(value).to_bytes(width, "big").decode("ascii", "replace")
    if name in _CHAR_FIELDS:
        return chr(int(value))
    return int(value)


def as_dict(row) -> dict:
    """One decoded record as a dict holding only its type's fields (chars as str)."""
    t = chr(int(row["type"]))
    names = _COMMON + FIELDS[t]
    return {name: _field_value(name, row[name]) for name in names}


class TruncatedInput(ValueError):
    """A message or length prefix runs past the end of the input."""

    def __init__(self, offset: int):
        super().__init__(f"truncated ITCH input: message at byte offset {offset} runs past the end")
        self.offset = offset


def decode(data, counters: np.ndarray | None = None) -> list[dict]:
    """Decode every valid message of a framed buffer into dicts (tests and tools only)."""
    buf = np.frombuffer(data, np.uint8) if not isinstance(data, np.ndarray) else data
    counters = new_counters() if counters is None else counters
    out = np.zeros(max(1, len(buf) // (2 + 12) + 1), RECORD)
    status, pos, n = decode_stream(buf, 0, len(buf), out, counters)
    if status == TRUNCATED:
        raise TruncatedInput(int(pos))
    return [as_dict(out[i]) for i in range(n)]
