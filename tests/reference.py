"""A plain, dict-based ITCH 5.0 order book: the reference the production book is checked against.

Written for clarity, not speed, and sharing no code with ``dataplane``: its own decoding
(``struct``, big-endian), its own length table. Outcomes follow the production book's
documented rules:

- ``A``/``F`` add (header locate, side, price, shares) at the back of the price level.
  A side other than B/S counts ``bad_side``, zero shares ``zero_shares``, a live ref
  ``dup_add``; each is ignored (checked in that order: the message first, then the book).
- ``E``/``C``/``X`` take stock, side and price from the resting order, never the header.
  Unknown ref: ``unknown_ref``. Zero shares: ``zero_shares``. More than rests:
  ``over_exec`` (E/C) or ``over_cancel`` (X) and the order is removed. Exactly what
  rests: removed. Less: reduced, keeping its place in the queue.
- ``D`` removes; unknown ref counts ``unknown_ref``.
- ``U`` with an unknown original counts ``unknown_ref`` and does nothing. Otherwise the
  original is removed, then the new order (original's locate and side, new price and
  shares) is added at the back of its level unless its ref is live (``dup_add``) or its
  shares are zero (``zero_shares``).
- ``R`` records the symbol; every other type leaves the book alone.
- An unknown type counts ``unknown_type``; a length not matching the type, or a zero-length
  message, counts ``bad_length``; both are skipped. Valid messages count ``msg_<type>``;
  ``messages`` counts every framed message.
"""

from __future__ import annotations

import hashlib
import struct

# Total message length (header included) per type, from the ITCH 5.0 spec table.
LENGTHS: dict[str, int] = {
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

ANOMALIES = (
    "dup_add",
    "unknown_ref",
    "over_exec",
    "over_cancel",
    "zero_shares",
    "bad_side",
    "unknown_type",
    "bad_length",
)

HEADER = struct.Struct(">cHH6s")  # type, locate, tracking, timestamp
ADD = struct.Struct(">QcI8sI")  # ref, side, shares, stock, price (offset 11)
EXEC = struct.Struct(">QI")  # ref, shares (offset 11) -- E, C and X alike
DELETE = struct.Struct(">Q")
REPLACE = struct.Struct(">QQII")  # orig ref, new ref, shares, price


def timestamp(msg: bytes) -> int:
    """Nanoseconds since midnight from a message header."""
    return int.from_bytes(msg[5:11], "big")


def frames(data: bytes):
    """Yield (offset of the length prefix, message) for each framed message.

    Raises ValueError naming the offset of a message whose prefix or body is truncated.
    """
    pos = 0
    end = len(data)
    while pos < end:
        if pos + 2 > end:
            raise ValueError(f"truncated length prefix at byte offset {pos}")
        (length,) = struct.unpack_from(">H", data, pos)
        if pos + 2 + length > end:
            raise ValueError(
                f"truncated message at byte offset {pos}: length {length}, "
                f"{end - pos - 2} bytes left"
            )
        yield pos, bytes(data[pos + 2 : pos + 2 + length])
        pos += 2 + length


class ReferenceBook:
    """Level-3 books for every stock, keyed by order reference."""

    def __init__(self) -> None:
        self.orders: dict[int, list] = {}  # ref -> [locate, side, price, shares]
        self.levels: dict[tuple[int, str, int], list[int]] = {}  # FIFO of refs
        self.symbols: dict[int, str] = {}
        self.counters: dict[str, int] = dict.fromkeys(ANOMALIES, 0)
        self.counters["messages"] = 0
        for t in LENGTHS:
            self.counters["msg_" + t] = 0
        # (locate, side) -> prices of its non-empty levels, so bbo need not scan everything
        self._prices: dict[tuple[int, str], set[int]] = {}

    # ------------------------------------------------------------------ book edits

    def _add(self, ref: int, locate: int, side: str, price: int, shares: int) -> None:
        if side not in ("B", "S"):
            self.counters["bad_side"] += 1
            return
        if shares == 0:
            self.counters["zero_shares"] += 1
            return
        if ref in self.orders:
            self.counters["dup_add"] += 1
            return
        self.orders[ref] = [locate, side, price, shares]
        key = (locate, side, price)
        if key not in self.levels:
            self.levels[key] = []
            self._prices.setdefault((locate, side), set()).add(price)
        self.levels[key].append(ref)

    def _remove(self, ref: int) -> None:
        locate, side, price, _ = self.orders.pop(ref)
        key = (locate, side, price)
        queue = self.levels[key]
        queue.remove(ref)
        if not queue:
            del self.levels[key]
            self._prices[(locate, side)].discard(price)

    def _reduce(self, ref: int, n: int, over: str) -> None:
        if ref not in self.orders:
            self.counters["unknown_ref"] += 1
            return
        if n == 0:
            self.counters["zero_shares"] += 1
            return
        remaining = self.orders[ref][3]
        if n > remaining:
            self.counters[over] += 1
            self._remove(ref)
        elif n == remaining:
            self._remove(ref)
        else:
            self.orders[ref][3] = remaining - n

    # ------------------------------------------------------------------ input

    def apply(self, msg: bytes) -> None:
        """Apply one message (no length prefix)."""
        self.counters["messages"] += 1
        if len(msg) == 0:
            self.counters["bad_length"] += 1
            return
        mtype = chr(msg[0])
        if mtype not in LENGTHS:
            self.counters["unknown_type"] += 1
            return
        if len(msg) != LENGTHS[mtype]:
            self.counters["bad_length"] += 1
            return
        self.counters["msg_" + mtype] += 1
        _, locate, _, _ = HEADER.unpack_from(msg, 0)

        if mtype in ("A", "F"):
            ref, side, shares, _, price = ADD.unpack_from(msg, 11)
            self._add(ref, locate, side.decode("latin-1"), price, shares)
        elif mtype in ("E", "C"):
            ref, shares = EXEC.unpack_from(msg, 11)
            self._reduce(ref, shares, "over_exec")
        elif mtype == "X":
            ref, shares = EXEC.unpack_from(msg, 11)
            self._reduce(ref, shares, "over_cancel")
        elif mtype == "D":
            (ref,) = DELETE.unpack_from(msg, 11)
            if ref not in self.orders:
                self.counters["unknown_ref"] += 1
            else:
                self._remove(ref)
        elif mtype == "U":
            orig, new, shares, price = REPLACE.unpack_from(msg, 11)
            if orig not in self.orders:
                self.counters["unknown_ref"] += 1
                return
            o_locate, o_side = self.orders[orig][0], self.orders[orig][1]
            self._remove(orig)
            self._add(new, o_locate, o_side, price, shares)
        elif mtype == "R":
            self.symbols[locate] = msg[11:19].decode("latin-1").rstrip(" ")

    def replay(self, data: bytes) -> ReferenceBook:
        """Apply every message of a file-format buffer; returns self."""
        for _, msg in frames(bytes(data)):
            self.apply(msg)
        return self

    # ------------------------------------------------------------------ queries

    def level_shares(self, locate: int, side: str, price: int) -> int:
        return sum(self.orders[r][3] for r in self.levels.get((locate, side, price), ()))

    def bbo(self, locate: int) -> tuple[int, int, int, int]:
        """(bid_px, bid_qty, ask_px, ask_qty); 0, 0 for an empty side."""
        bids = self._prices.get((locate, "B"))
        asks = self._prices.get((locate, "S"))
        bid_px = max(bids) if bids else 0
        ask_px = min(asks) if asks else 0
        bid_qty = self.level_shares(locate, "B", bid_px) if bids else 0
        ask_qty = self.level_shares(locate, "S", ask_px) if asks else 0
        return bid_px, bid_qty, ask_px, ask_qty

    def digest(self) -> str:
        """sha256 of 'locate,side,price,shares' lines, one per level, sorted ascending."""
        lines = sorted(
            (locate, side, price, self.level_shares(locate, side, price))
            for (locate, side, price) in self.levels
        )
        text = "".join(f"{lo},{si},{px},{sh}\n" for lo, si, px, sh in lines)
        return hashlib.sha256(text.encode("ascii")).hexdigest()

    def stocks(self) -> dict[str, dict]:
        per_locate: dict[int, int] = {}
        for locate, *_ in self.orders.values():
            per_locate[locate] = per_locate.get(locate, 0) + 1
        out: dict[str, dict] = {}
        for locate in sorted(set(self.symbols) | set(per_locate)):
            bid_px, bid_qty, ask_px, ask_qty = self.bbo(locate)
            out[str(locate)] = {
                "symbol": self.symbols.get(locate, ""),
                "bid_px": bid_px,
                "bid_qty": bid_qty,
                "ask_px": ask_px,
                "ask_qty": ask_qty,
                "orders": per_locate.get(locate, 0),
            }
        return out
