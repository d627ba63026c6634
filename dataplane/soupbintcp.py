"""SoupBinTCP 4.0 framing and the GLIMPSE Snapshot message: the one codec of the format,
used by the exchange's snapshot service, the appliance's client and the tests.

Every packet, either direction, is Packet Length (2 bytes, unsigned big-endian, counting
the type byte and the payload), Packet Type (1 ASCII byte), payload. The layouts are the
``*_LEN`` constants and the table ``FIXED_PAYLOAD`` below and nothing else:

- server -> client: ``+`` Debug (text), ``A`` Login Accepted (Session 10 alpha, Sequence
  Number 20 numeric), ``J`` Login Rejected (Reject Reason Code 1 alpha: ``A`` not
  authorized, ``S`` session not available), ``S`` Sequenced Data (one message), ``H``
  Server Heartbeat, ``Z`` End of Session (both empty).
- client -> server: ``+`` Debug, ``L`` Login Request (Username 6 alpha, Password 10
  alpha, Requested Session 10 alpha -- all spaces: the current session -- and Requested
  Sequence Number 20 numeric), ``U`` Unsequenced Data (a message), ``R`` Client
  Heartbeat, ``O`` Logout Request (both empty).

Alpha fields are ASCII, left-justified, space padded; numeric fields ASCII digits,
right-justified, space padded on the left. GLIMPSE's Snapshot message (carried as
sequenced data after the spin) is type ``M`` and an 8-byte big-endian sequence number.

Python side only (the control plane, not the hot path): ``pack`` and one builder per
packet type make bytes; ``Splitter`` turns a byte stream into whole packets and keeps a
partial tail for the next read; ``parse_*`` read a packet's fields. ``sequenced_stream``
turns a buffer of length-prefixed messages (Nasdaq's file framing) into the same
messages as Sequenced Data packets in one numpy pass, for a spin of a million orders.
Anything that is not what it claims to be -- a bad length, an unknown type, a short or
long payload, a field that does not fit -- raises ``SoupError`` (a ``ValueError``) saying
which and why.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

import numpy as np

# --- framing ------------------------------------------------------------------------------
LENGTH_LEN = 2  # the packet length field; it counts the type byte and the payload
TYPE_LEN = 1
MAX_PAYLOAD = 0xFFFF - TYPE_LEN

# packet types, server -> client
DEBUG = "+"
LOGIN_ACCEPTED = "A"
LOGIN_REJECTED = "J"
SEQUENCED = "S"
SERVER_HEARTBEAT = "H"
END_OF_SESSION = "Z"
# client -> server (and Debug)
LOGIN_REQUEST = "L"
UNSEQUENCED = "U"
CLIENT_HEARTBEAT = "R"
LOGOUT = "O"

SERVER_TYPES = frozenset(
    (DEBUG, LOGIN_ACCEPTED, LOGIN_REJECTED, SEQUENCED, SERVER_HEARTBEAT, END_OF_SESSION)
)
CLIENT_TYPES = frozenset((DEBUG, LOGIN_REQUEST, UNSEQUENCED, CLIENT_HEARTBEAT, LOGOUT))

NAMES = {
    DEBUG: "Debug",
    LOGIN_ACCEPTED: "Login Accepted",
    LOGIN_REJECTED: "Login Rejected",
    SEQUENCED: "Sequenced Data",
    SERVER_HEARTBEAT: "Server Heartbeat",
    END_OF_SESSION: "End of Session",
    LOGIN_REQUEST: "Login Request",
    UNSEQUENCED: "Unsequenced Data",
    CLIENT_HEARTBEAT: "Client Heartbeat",
    LOGOUT: "Logout Request",
}

# field widths
USER_LEN = 6
PASSWORD_LEN = 10
SESSION_LEN = 10
SEQ_NUM_LEN = 20
REASON_LEN = 1

# payload length of the types whose payload is fixed (the others: any length)
FIXED_PAYLOAD = {
    LOGIN_ACCEPTED: SESSION_LEN + SEQ_NUM_LEN,
    LOGIN_REJECTED: REASON_LEN,
    SERVER_HEARTBEAT: 0,
    END_OF_SESSION: 0,
    LOGIN_REQUEST: USER_LEN + PASSWORD_LEN + SESSION_LEN + SEQ_NUM_LEN,
    CLIENT_HEARTBEAT: 0,
    LOGOUT: 0,
}

# Login Rejected reason codes
NOT_AUTHORIZED = "A"
SESSION_NOT_AVAILABLE = "S"
REJECT_REASONS = {NOT_AUTHORIZED: "not authorized", SESSION_NOT_AVAILABLE: "session not available"}

# GLIMPSE Snapshot message (sequenced data): type, then the sequence, big-endian
SNAPSHOT = "M"
SNAPSHOT_SEQ_LEN = 8
SNAPSHOT_LEN = 1 + SNAPSHOT_SEQ_LEN
_SNAPSHOT = struct.Struct(">cQ")
_HEAD = struct.Struct(">Hc")


class SoupError(ValueError):
    """Bytes or a field value that SoupBinTCP cannot carry, or a packet that is not what
    it claims to be; the message says which and why."""


class Packet(NamedTuple):
    type: str  # one of the packet type characters above
    payload: bytes


class LoginRequest(NamedTuple):
    user: str
    password: str
    session: str  # "" = the current session (all spaces on the wire)
    seq: int


# --- fields ---------------------------------------------------------------------------------
def alpha(value: str | bytes, width: int, what: str = "field") -> bytes:
    """``value`` as a ``width``-byte alpha field (printable ASCII, space padded)."""
    raw = value.encode("ascii", "replace") if isinstance(value, str) else bytes(value)
    if len(raw) > width or not all(0x20 <= c < 0x7F for c in raw):
        raise SoupError(f"{what} {value!r} must be at most {width} printable ASCII characters")
    return raw.ljust(width, b" ")


def read_alpha(raw: bytes, what: str = "field") -> str:
    """An alpha field's value: its ASCII text without the padding."""
    if not all(0x20 <= c < 0x7F for c in raw):
        raise SoupError(f"{what} {bytes(raw)!r} is not printable ASCII")
    return bytes(raw).decode("ascii").rstrip(" ")


def numeric(value: int, width: int, what: str = "field") -> bytes:
    """``value`` as a ``width``-byte numeric field (ASCII digits, space padded on the left)."""
    text = str(value)
    if value < 0 or len(text) > width:
        raise SoupError(f"{what} {value} does not fit {width} ASCII digits")
    return text.rjust(width).encode("ascii")


def read_numeric(raw: bytes, what: str = "field") -> int:
    """A numeric field's value: digits right-justified, padded on the left with spaces."""
    text = bytes(raw).lstrip(b" ")
    if not text or not text.isdigit():
        raise SoupError(f"{what} {bytes(raw)!r} is not a right-justified ASCII number")
    return int(text)


# --- building packets ---------------------------------------------------------------------
def pack(kind: str, payload: bytes = b"") -> bytes:
    """One packet: length, type, payload (``payload`` checked against the type's fixed
    length, if it has one)."""
    if kind not in NAMES:
        raise SoupError(f"unknown SoupBinTCP packet type {kind!r}")
    want = FIXED_PAYLOAD.get(kind)
    if want is not None and len(payload) != want:
        raise SoupError(f"a {NAMES[kind]} payload is {want} bytes, not {len(payload)}")
    if len(payload) > MAX_PAYLOAD:
        raise SoupError(f"a payload of {len(payload)} bytes does not fit a packet")
    return _HEAD.pack(TYPE_LEN + len(payload), kind.encode("ascii")) + payload


def debug(text: str) -> bytes:
    return pack(DEBUG, text.encode("ascii", "replace"))


def login_accepted(session: str | bytes, seq: int) -> bytes:
    """Login Accepted: the session and the sequence number of the next sequenced message."""
    return pack(
        LOGIN_ACCEPTED,
        alpha(session, SESSION_LEN, "session") + numeric(seq, SEQ_NUM_LEN, "sequence number"),
    )


def login_rejected(code: str) -> bytes:
    """Login Rejected with reason ``code`` (``NOT_AUTHORIZED`` or ``SESSION_NOT_AVAILABLE``)."""
    if code not in REJECT_REASONS:
        raise SoupError(f"reject reason {code!r} is not one of {', '.join(REJECT_REASONS)}")
    return pack(LOGIN_REJECTED, code.encode("ascii"))


def sequenced(message: bytes) -> bytes:
    return pack(SEQUENCED, bytes(message))


def unsequenced(message: bytes) -> bytes:
    return pack(UNSEQUENCED, bytes(message))


SERVER_HEARTBEAT_PACKET = pack(SERVER_HEARTBEAT)
END_OF_SESSION_PACKET = pack(END_OF_SESSION)
CLIENT_HEARTBEAT_PACKET = pack(CLIENT_HEARTBEAT)
LOGOUT_PACKET = pack(LOGOUT)


def login_request(user: str, password: str, session: str = "", seq: int = 1) -> bytes:
    """Login Request; ``session`` "" asks for the current session; ``seq`` 1 = from the
    start, 0 = from now."""
    return pack(
        LOGIN_REQUEST,
        alpha(user, USER_LEN, "username")
        + alpha(password, PASSWORD_LEN, "password")
        + alpha(session, SESSION_LEN, "session")
        + numeric(seq, SEQ_NUM_LEN, "requested sequence number"),
    )


def snapshot_message(seq: int) -> bytes:
    """GLIMPSE's Snapshot message (the payload of a Sequenced Data packet)."""
    if not 0 <= seq < 1 << (8 * SNAPSHOT_SEQ_LEN):
        raise SoupError(f"snapshot sequence {seq} does not fit {SNAPSHOT_SEQ_LEN} bytes")
    return _SNAPSHOT.pack(SNAPSHOT.encode("ascii"), seq)


# --- reading packets ----------------------------------------------------------------------
def _fixed(p: Packet, kind: str) -> bytes:
    if p.type != kind:
        raise SoupError(f"expected a {NAMES[kind]} packet, got type {p.type!r}")
    if len(p.payload) != FIXED_PAYLOAD[kind]:
        raise SoupError(
            f"a {NAMES[kind]} payload is {FIXED_PAYLOAD[kind]} bytes, not {len(p.payload)}"
        )
    return p.payload


def parse_login_accepted(p: Packet) -> tuple[str, int]:
    """``(session, next sequence number)``."""
    b = _fixed(p, LOGIN_ACCEPTED)
    return (
        read_alpha(b[:SESSION_LEN], "session"),
        read_numeric(b[SESSION_LEN:], "sequence number"),
    )


def parse_login_rejected(p: Packet) -> str:
    """The reject reason code (``A`` or ``S``)."""
    code = _fixed(p, LOGIN_REJECTED).decode("ascii", "replace")
    if code not in REJECT_REASONS:
        raise SoupError(f"reject reason {code!r} is not one of {', '.join(REJECT_REASONS)}")
    return code


def parse_login_request(p: Packet) -> LoginRequest:
    b = _fixed(p, LOGIN_REQUEST)
    u, w, s = USER_LEN, USER_LEN + PASSWORD_LEN, USER_LEN + PASSWORD_LEN + SESSION_LEN
    return LoginRequest(
        read_alpha(b[:u], "username"),
        read_alpha(b[u:w], "password"),
        read_alpha(b[w:s], "session"),
        read_numeric(b[s:], "requested sequence number"),
    )


def is_snapshot_message(message: bytes) -> bool:
    return len(message) > 0 and message[0] == ord(SNAPSHOT)


def parse_snapshot_message(message: bytes) -> int:
    """The sequence number a Snapshot message carries."""
    if len(message) != SNAPSHOT_LEN or message[0] != ord(SNAPSHOT):
        raise SoupError(
            f"a Snapshot message is type {SNAPSHOT!r} and {SNAPSHOT_LEN} bytes, "
            f"not {bytes(message[:1])!r} and {len(message)}"
        )
    return _SNAPSHOT.unpack(bytes(message))[1]


class Splitter:
    """Bytes in, whole packets out: ``feed`` returns every packet completed by the bytes
    given so far and keeps a partial tail for the next call. ``types`` are the packet
    types this end may receive (``SERVER_TYPES`` at a client, ``CLIENT_TYPES`` at a
    server); anything else, a zero length or a fixed-length type announcing another
    length raises ``SoupError`` as soon as its header is in."""

    def __init__(self, types: frozenset[str] = SERVER_TYPES | CLIENT_TYPES):
        self._types = frozenset(ord(t) for t in types)
        self._fixed = {ord(t): n for t, n in FIXED_PAYLOAD.items()}
        self._buf = bytearray()
        self.packets = 0  # whole packets returned so far

    @property
    def pending(self) -> int:
        """Bytes of an incomplete packet held for the next ``feed``."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[Packet]:
        buf = self._buf
        buf += data
        out: list[Packet] = []
        pos, end = 0, len(buf)
        try:
            while end - pos >= LENGTH_LEN:
                n = (buf[pos] << 8) | buf[pos + 1]
                if n == 0:
                    raise SoupError("packet length 0: a packet holds at least its type byte")
                if end - pos < LENGTH_LEN + TYPE_LEN:
                    break
                t = buf[pos + LENGTH_LEN]
                if t not in self._types:
                    raise SoupError(
                        f"unknown packet type {chr(t)!r} (0x{t:02x}) here; expected one of "
                        f"{', '.join(sorted(chr(x) for x in self._types))}"
                    )
                want = self._fixed.get(t)
                if want is not None and n - TYPE_LEN != want:
                    raise SoupError(
                        f"a {NAMES[chr(t)]} payload is {want} bytes, not {n - TYPE_LEN}"
                    )
                if end - pos < LENGTH_LEN + n:
                    break
                start = pos + LENGTH_LEN + TYPE_LEN
                out.append(Packet(chr(t), bytes(buf[start : pos + LENGTH_LEN + n])))
                pos += LENGTH_LEN + n
        finally:
            del buf[:pos]
            self.packets += len(out)
        return out


# --- bulk: a spin's messages as Sequenced Data packets ------------------------------------
def sequenced_stream(framed: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Messages in Nasdaq's file framing (2-byte big-endian length, message) as Sequenced
    Data packets, in one numpy pass.

    ``offsets[i]`` is message i's length prefix in ``framed`` and ``offsets[-1]`` the end.
    Returns ``(stream, starts)``: the packets' bytes and ``starts[i]``, packet i's offset
    in ``stream`` (``starts[-1]``: the end), so a sender can cut it at packet boundaries.
    """
    offsets = np.asarray(offsets, np.int64)
    n = len(offsets) - 1
    base = offsets[0] if n >= 0 else 0
    rel = offsets - base
    lengths = np.diff(offsets) - LENGTH_LEN
    if n > 0 and (lengths.min() < 0 or lengths.max() > MAX_PAYLOAD):
        raise SoupError("a framed message does not fit a Sequenced Data packet")
    body = np.asarray(framed[base : offsets[-1]], np.uint8)
    # the type byte goes between each length and its message; lengths grow by one
    stream = np.insert(body, rel[:-1] + LENGTH_LEN, np.uint8(ord(SEQUENCED)))
    starts = rel + np.arange(n + 1, dtype=np.int64)
    plen = lengths + TYPE_LEN
    stream[starts[:-1]] = plen >> 8
    stream[starts[:-1] + 1] = plen & 0xFF
    return stream, starts
