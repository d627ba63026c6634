"""Hand-built ITCH 5.0 messages for tests, with ``struct`` (independent of the decoder).

Each builder returns the message bytes without the 2-byte framing; ``framed`` adds it.
"""

from __future__ import annotations

import struct


def framed(*msgs: bytes) -> bytes:
    return b"".join(struct.pack(">H", len(m)) + m for m in msgs)


def header(t: str, locate: int = 1, tracking: int = 0, ts: int = 0) -> bytes:
    return t.encode() + struct.pack(">HH", locate, tracking) + ts.to_bytes(6, "big")


def alpha(s: str, n: int = 8) -> bytes:
    return s.encode().ljust(n)


def S(code="O", **h):
    return header("S", **h) + code.encode()


def R(stock="AAPL", locate=1, **h):
    return (
        header("R", locate=locate, **h)
        + alpha(stock)
        + struct.pack(
            ">ccIcc2scccccIc",
            b"Q",
            b"N",
            100,
            b"N",
            b"C",
            b"Z ",
            b"P",
            b"N",
            b"N",
            b"1",
            b"N",
            0,
            b"N",
        )
    )


def H(stock="AAPL", state="T", reason="    ", **h):
    return header("H", **h) + alpha(stock) + state.encode() + b" " + reason.encode()


def A(ref, side, shares, price, stock="AAPL", **h):
    return header("A", **h) + struct.pack(
        ">Qc I8sI".replace(" ", ""), ref, side.encode(), shares, alpha(stock), price
    )


def F(ref, side, shares, price, stock="AAPL", mpid="GSCO", **h):
    return header("F", **h) + struct.pack(
        ">QcI8sI4s", ref, side.encode(), shares, alpha(stock), price, mpid.encode()
    )


def E(ref, shares, match=1, **h):
    return header("E", **h) + struct.pack(">QIQ", ref, shares, match)


def C(ref, shares, price, match=1, printable="Y", **h):
    return header("C", **h) + struct.pack(">QIQcI", ref, shares, match, printable.encode(), price)


def X(ref, shares, **h):
    return header("X", **h) + struct.pack(">QI", ref, shares)


def D(ref, **h):
    return header("D", **h) + struct.pack(">Q", ref)


def U(ref, new_ref, shares, price, **h):
    return header("U", **h) + struct.pack(">QQII", ref, new_ref, shares, price)


def P(shares, price, stock="AAPL", ref=0, side="B", match=1, **h):
    return header("P", **h) + struct.pack(
        ">QcI8sIQ", ref, side.encode(), shares, alpha(stock), price, match
    )


def Q(shares, price, stock="AAPL", match=1, cross="O", **h):
    return header("Q", **h) + struct.pack(
        ">Q8sIQc", shares, alpha(stock), price, match, cross.encode()
    )


def B(match, **h):
    return header("B", **h) + struct.pack(">Q", match)
