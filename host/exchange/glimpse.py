"""The exchange's GLIMPSE 5.0-style snapshot service over SoupBinTCP 4.0.

A late joiner logs in over TCP and gets the book as it stands: the state after the
multicast messages 1..N, where N is ``position()`` at its login (the publisher's highest
sequence so far; MoldUDP64 sequence k is the k-th ITCH message of the session file).

The spin, as Sequenced Data numbered from 1 (``Login Accepted`` announces 1):

1. every System Event ``S`` of 1..N, in order;
2. the latest Stock Directory ``R`` of each locate, by locate;
3. the latest Stock Trading Action ``H`` of each locate that had one, by locate; then
   the latest Reg SHO ``Y`` of each locate that had one, by locate;
4. an Add Order for every resting order, in time priority (the order it joined its
   level's queue: an ``A``/``F`` or a ``U``'s new reference joins at the back; executions
   and partial cancels keep the place): type ``A``, or ``F`` with the attribution when the
   order (or the order a ``U`` replaced) was added by an ``F``; its reference (a ``U``'s
   new one), side, stock, CURRENT shares and price; locate, tracking number and
   timestamp of the message that added it;
5. the Snapshot message ``M`` carrying N; then End of Session ``Z``, and the service
   closes the connection.

Messages 2-4 are copied or built from the session's own bytes (the original
timestamps). The state is rebuilt for each N by one numba pass over messages 1..N with
an order-reference hash table (references need not be dense), following exactly the
book's rules (``dataplane.book``: a duplicate add, an unknown reference, an over-execution
or a zero-share message has the outcome the book gives it), so ``Book.feed`` of the spin
equals ``Book.feed`` of messages 1..N level by level and queue by queue; the last spin is
cached by N.

Connections: one thread each (non-blocking socket, a selector), a listening thread, and
a small pool that builds spins (numba, GIL released) while the connection threads keep
heartbeating. Login Request first: wrong user or password -> Login Rejected ``A``, a
session other than this one (all spaces = this one) -> ``S``, then close. A Server
Heartbeat goes out after ``heartbeat_s`` without sending; Client Heartbeats are taken; a
client silent for ``silence_s`` is dropped; a Logout Request ends the connection.

Fault hooks (``ServerConfig``; ``tickwire sim --glimpse-refuse / --glimpse-drop-after``):
refuse the first ``refuse`` logins that would be accepted with ``S``; on the first
``drop_spins`` accepted logins, cut the connection after ``drop_after`` messages of the
spin (before the Snapshot message, never a ``Z``). ``hold_after`` (tests) pauses every
spin after that many messages until ``release()``. Everything is counted in ``counters``
(``SERVER_COUNTERS``), like the re-request server's.
"""

from __future__ import annotations

import selectors
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from numba import njit

from dataplane import soupbintcp as soup
from dataplane.itch import (
    HEADER_LEN,
    MSG_LEN,
    T_A,
    T_C,
    T_D,
    T_E,
    T_F,
    T_H,
    T_R,
    T_S,
    T_U,
    T_X,
    T_Y,
    rd_u16,
    rd_u32,
    rd_u64,
)

if TYPE_CHECKING:
    from host.exchange.publisher import Session


# --- configuration ------------------------------------------------------------------------
@dataclass(frozen=True)
class ServerConfig:
    # TCP port (0: any free port, see GlimpseServer.port)
    port: int = 0
    # the SoupBinTCP login this service accepts
    user: str = "tw"
    password: str = "tickwire"
    # a Server Heartbeat after this long without sending, s
    heartbeat_s: float = 1.0
    # a client that sends nothing (a heartbeat will do) for this long is dropped, s
    silence_s: float = 15.0
    # fault: answer the first ``refuse`` logins that would be accepted with Login Rejected S
    refuse: int = 0
    # fault: cut the first ``drop_spins`` spins after ``drop_after`` messages (-1: never)
    drop_after: int = -1
    drop_spins: int = 1
    # test hook: every spin pauses after this many messages until release() (-1: never)
    hold_after: int = -1
    # connections served at once; one more is closed at once (counted as "busy")
    max_clients: int = 64


SERVER_COUNTERS = (
    "connections",
    "logins_accepted",
    "logins_rejected",  # all Login Rejected sent: the three below
    "rejected_auth",
    "rejected_session",
    "refused",  # the refuse fault
    "spins",  # spins sent whole, End of Session included
    "messages",  # sequenced messages sent (the Snapshot message included)
    "bytes",
    "heartbeats",
    "client_heartbeats",
    "logouts",
    "drops",  # the drop_after fault
    "silent_clients",
    "disconnects",  # clients gone before the end of their spin
    "malformed",  # clients sending what is not SoupBinTCP, or not a login first
    "busy",
    "errors",  # a connection ended by an unexpected error (last_error says which)
)

CHUNK_MESSAGES = 4096  # sequenced messages handed to the socket at a time


# --- the state at N ----------------------------------------------------------------------
_HASH_MULT = np.uint64(0x9E3779B97F4A7C15)
_EMPTY = -1


@njit(cache=True, nogil=True)
def _count_adds(buf, offsets, n):
    """Order-creating messages among the first ``n``: the most rows the state needs."""
    c = 0
    for k in range(n):
        t = buf[offsets[k] + 2]
        if t == T_A or t == T_F or t == T_U:
            c += 1
    return c


@njit(cache=True, nogil=True, inline="always")
def _slot(keys, slots, shift, ref):
    """The hash index holding ``ref``, or the empty one where it would go (entries are
    never removed: a reference maps to its latest row, live or not)."""
    mask = keys.shape[0] - 1
    i = np.int64((ref * _HASH_MULT) >> np.uint64(shift))
    while slots[i] != _EMPTY and keys[i] != ref:
        i = (i + 1) & mask
    return i


@njit(cache=True, nogil=True)
def build_state(buf, offsets, n, keys, slots, shift, rows, last, events):
    """Apply messages ``0..n-1`` of the session to a reference-keyed order table.

    ``rows`` (``ROW``) gets one row per order ever added, in the order they were added
    (= time priority within any level); ``last[t, locate]`` the index of the latest
    message of type ``R`` (t=0), ``H`` (1), ``Y`` (2) for each locate (-1: none);
    ``events`` the System Event indices. The outcomes follow ``dataplane.book``'s rules.
    Returns ``(rows used, events used)``."""
    nrows = 0
    nev = 0
    for k in range(n):
        p = offsets[k] + 2
        t = buf[p]
        if offsets[k + 1] - p != MSG_LEN[t] or MSG_LEN[t] == 0:
            continue  # the book skips what it cannot frame
        q = p + HEADER_LEN
        if t == T_A or t == T_F:
            s = buf[q + 8]
            if s != 66 and s != 83:  # B, S
                continue
            shares = rd_u32(buf, q + 9)
            if shares == 0:
                continue
            ref = rd_u64(buf, q)
            i = _slot(keys, slots, shift, ref)
            if slots[i] != _EMPTY and rows[slots[i]].live:
                continue  # a live reference: not added
            r = rows[nrows]
            r.ref = ref
            r.msg = k
            r.origin = k
            r.shares = shares
            r.price = rd_u32(buf, q + 21)
            r.sd = rd_u16(buf, p + 1) * 2 + (1 if s == 83 else 0)
            r.live = 1
            keys[i] = ref
            slots[i] = nrows
            nrows += 1
        elif t == T_D or t == T_E or t == T_C or t == T_X:
            i = _slot(keys, slots, shift, rd_u64(buf, q))
            if slots[i] == _EMPTY or not rows[slots[i]].live:
                continue
            r = rows[slots[i]]
            take = np.int64(r.shares) if t == T_D else np.int64(rd_u32(buf, q + 8))
            if take == 0:
                continue
            if take >= r.shares:
                r.live = 0
            else:
                r.shares = r.shares - take
        elif t == T_U:
            i = _slot(keys, slots, shift, rd_u64(buf, q))
            if slots[i] == _EMPTY or not rows[slots[i]].live:
                continue
            old = rows[slots[i]]
            old.live = 0
            shares = rd_u32(buf, q + 16)
            if shares == 0:
                continue
            ref = rd_u64(buf, q + 8)
            j = _slot(keys, slots, shift, ref)
            if slots[j] != _EMPTY and rows[slots[j]].live:
                continue
            r = rows[nrows]
            r.ref = ref
            r.msg = k
            r.origin = old.origin
            r.shares = shares
            r.price = rd_u32(buf, q + 20)
            r.sd = old.sd
            r.live = 1
            keys[j] = ref
            slots[j] = nrows
            nrows += 1
        elif t == T_R:
            last[0, rd_u16(buf, p + 1)] = k
        elif t == T_H:
            last[1, rd_u16(buf, p + 1)] = k
        elif t == T_Y:
            last[2, rd_u16(buf, p + 1)] = k
        elif t == T_S:
            events[nev] = k
            nev += 1
    return nrows, nev


@njit(cache=True, nogil=True, inline="always")
def _put(out, w, v, nbytes):
    for i in range(nbytes):
        out[w + nbytes - 1 - i] = (v >> (8 * i)) & 0xFF


@njit(cache=True, nogil=True)
def _copy(buf, offsets, k, out, w, starts, m):
    """Message ``k`` of the session, framing included, to ``out[w:]`` as message ``m``."""
    starts[m] = w
    a = offsets[k]
    b = offsets[k + 1]
    out[w : w + b - a] = buf[a:b]
    return w + b - a


@njit(cache=True, nogil=True)
def _spin_size(buf, offsets, rows, nrows, last, events, nev):
    """``(bytes, messages)`` of the spin's ITCH part."""
    size = 0
    count = 0
    for e in range(nev):
        size += offsets[events[e] + 1] - offsets[events[e]]
        count += 1
    for t in range(3):
        for loc in range(last.shape[1]):
            k = last[t, loc]
            if k >= 0:
                size += offsets[k + 1] - offsets[k]
                count += 1
    for r in range(nrows):
        if rows[r].live:
            size += 2 + MSG_LEN[buf[offsets[rows[r].origin] + 2]]
            count += 1
    return size, count


@njit(cache=True, nogil=True)
def write_spin(buf, offsets, rows, nrows, last, events, nev, out, starts):
    """The spin's ITCH messages, framed (2-byte length + message), into ``out``;
    ``starts[m]`` is message m's offset. Returns the messages written."""
    w = 0
    m = 0
    for e in range(nev):
        w = _copy(buf, offsets, events[e], out, w, starts, m)
        m += 1
    for t in range(3):
        for loc in range(last.shape[1]):
            if last[t, loc] >= 0:
                w = _copy(buf, offsets, last[t, loc], out, w, starts, m)
                m += 1
    for i in range(nrows):
        r = rows[i]
        if not r.live:
            continue
        o = offsets[r.origin] + 2  # the A/F that began this order (attribution, stock)
        a = offsets[r.msg] + 2  # the A/F/U that put it where it rests (tracking, time)
        t = buf[o]
        n = MSG_LEN[t]
        starts[m] = w
        _put(out, w, n, 2)
        p = w + 2
        out[p] = t
        _put(out, p + 1, r.sd >> 1, 2)
        out[p + 3 : p + 11] = buf[a + 3 : a + 11]  # tracking number, timestamp
        q = p + HEADER_LEN
        _put(out, q, r.ref, 8)
        out[q + 8] = 83 if r.sd & 1 else 66
        _put(out, q + 9, r.shares, 4)
        out[q + 13 : q + 21] = buf[o + HEADER_LEN + 13 : o + HEADER_LEN + 21]  # stock
        _put(out, q + 21, r.price, 4)
        if t == T_F:
            out[q + 25 : q + 29] = buf[o + HEADER_LEN + 25 : o + HEADER_LEN + 29]
        w = p + n
        m += 1
    starts[m] = w
    return m


ROW = np.dtype(
    [
        ("ref", np.uint64),
        ("msg", np.int64),  # the message that put the order where it rests (A, F or U)
        ("origin", np.int64),  # the A/F that began it (before any U)
        ("shares", np.int64),
        ("price", np.int64),
        ("sd", np.int64),  # locate * 2 + side (0 buy, 1 sell)
        ("live", np.uint8),
    ],
    align=True,
)
N_LOCATES = 65536


def spin_messages(buf: np.ndarray, offsets: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The spin's ITCH messages (steps 1-4) for the state after the first ``n`` messages of
    a session (``buf``, ``offsets`` as ``publisher.Session``): ``(framed, starts)``, the
    messages in the file framing ``Book.feed`` takes and each one's offset (the last
    entry: the end)."""
    adds = int(_count_adds(buf, offsets, n))
    bits = max(4, (2 * adds + 1).bit_length())
    keys = np.empty(1 << bits, np.uint64)
    slots = np.full(1 << bits, _EMPTY, np.int64)
    rows = np.empty(max(adds, 1), ROW)
    last = np.full((3, N_LOCATES), -1, np.int64)
    events = np.empty(max(n, 1), np.int64)
    nrows, nev = build_state(buf, offsets, n, keys, slots, 64 - bits, rows, last, events)
    size, count = _spin_size(buf, offsets, rows, nrows, last, events, nev)
    out = np.empty(size, np.uint8)
    starts = np.empty(count + 1, np.int64)
    write_spin(buf, offsets, rows, nrows, last, events, nev, out, starts)
    return out, starts


@dataclass(frozen=True)
class Spin:
    """One spin ready to send: Sequenced Data packets (the ITCH messages, then the
    Snapshot message), cut at packet boundaries by ``starts``."""

    n: int  # the last multicast sequence reflected
    stream: np.ndarray
    starts: np.ndarray  # packet i at stream[starts[i]:starts[i + 1]]

    @property
    def messages(self) -> int:
        """Sequenced messages, the Snapshot message included."""
        return len(self.starts) - 1


def build_spin(buf: np.ndarray, offsets: np.ndarray, n: int) -> Spin:
    framed, starts = spin_messages(buf, offsets, n)
    snap = soup.snapshot_message(n)
    framed = np.concatenate([framed, np.frombuffer(len(snap).to_bytes(2, "big") + snap, np.uint8)])
    starts = np.append(starts, len(framed))
    stream, pkt = soup.sequenced_stream(framed, starts)
    return Spin(n, stream, pkt)


# --- the server ----------------------------------------------------------------------------
class GlimpseServer:
    """The snapshot service over ``session`` (see the module docstring). ``position()``
    gives N at each login; ``session_name`` is the SoupBinTCP session (the channel's
    MoldUDP64 session name)."""

    def __init__(
        self,
        session: Session,
        session_name: str | bytes,
        position: Callable[[], int],
        cfg: ServerConfig,
        bind_ip: str = "0.0.0.0",
    ):
        self.session = session
        name = session_name.decode("ascii") if isinstance(session_name, bytes) else session_name
        self.name = name.rstrip(" ")
        self._wire_name = soup.alpha(self.name, soup.SESSION_LEN, "session")
        self.position = position
        self.cfg = cfg
        self.bind_ip = bind_ip
        self.port = cfg.port
        self.counters = dict.fromkeys(SERVER_COUNTERS, 0)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._released = threading.Event()
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._conns: dict[int, threading.Thread] = {}
        self._accepted = 0  # logins that passed the checks (refused ones included)
        self._spun = 0  # logins accepted
        self._pool: ThreadPoolExecutor | None = None
        self._cache: tuple[int, Future] | None = None
        self.last_error = ""

    # -- life cycle --
    def start(self) -> None:
        """Bind and listen (in the caller's network namespace), compile the builder, and
        start accepting."""
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((self.bind_ip, self.cfg.port))
        except OSError as e:
            s.close()
            raise OSError(
                e.errno,
                f"snapshot service cannot bind {self.bind_ip}:{self.cfg.port}: {e.strerror}",
            ) from None
        s.listen(64)
        s.settimeout(0.1)
        self.port = s.getsockname()[1]
        self._listener = s
        build_spin(self.session.buf, self.session.offsets, 0)  # compile (or load) now
        self._pool = ThreadPoolExecutor(2, thread_name_prefix="glimpse-build")
        self._thread = threading.Thread(target=self._accept, name="glimpse", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._released.set()
        if self._thread is not None:
            self._thread.join()
        for t in list(self._conns.values()):
            t.join()
        if self._listener is not None:
            self._listener.close()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        self._thread, self._listener, self._pool = None, None, None

    def release(self) -> None:
        """Let spins held by ``hold_after`` go on (a test hook)."""
        self._released.set()

    def _count(self, **kw) -> None:
        with self._lock:
            for k, v in kw.items():
                self.counters[k] += v

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                sock, addr = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stop.is_set():
                    return
                continue
            self._count(connections=1)
            with self._lock:
                busy = len(self._conns) >= self.cfg.max_clients
            if busy:
                self._count(busy=1)
                sock.close()
                continue
            t = threading.Thread(
                target=self._serve, args=(sock,), name=f"glimpse-{addr[0]}:{addr[1]}", daemon=True
            )
            with self._lock:
                self._conns[id(t)] = t
            t.start()

    def _serve(self, sock: socket.socket) -> None:
        try:
            _Connection(self, sock).run()
        except OSError:  # reset, broken pipe: the client went away
            self._count(disconnects=1)
        except Exception as e:  # a bug: this connection ends, the service goes on
            self.last_error = f"{type(e).__name__}: {e}"
            self._count(errors=1)
        finally:
            sock.close()
            with self._lock:
                self._conns.pop(id(threading.current_thread()), None)

    # -- logins and spins --
    def login(self, req: soup.LoginRequest) -> tuple[str | None, bool]:
        """Judge a login: ``(reject code or None, drop this spin)``."""
        if req.user != self.cfg.user or req.password != self.cfg.password:
            self._count(logins_rejected=1, rejected_auth=1)
            return soup.NOT_AUTHORIZED, False
        if req.session not in ("", self.name):
            self._count(logins_rejected=1, rejected_session=1)
            return soup.SESSION_NOT_AVAILABLE, False
        with self._lock:
            self._accepted += 1
            refused = self._accepted <= self.cfg.refuse
            if not refused:
                self._spun += 1
                drop = self.cfg.drop_after >= 0 and self._spun <= self.cfg.drop_spins
        if refused:
            self._count(logins_rejected=1, refused=1)
            return soup.SESSION_NOT_AVAILABLE, False
        self._count(logins_accepted=1)
        return None, drop

    def spin(self) -> Future:
        """The spin at the current position, built in the pool (cached by N)."""
        n = int(self.position())
        with self._lock:
            if self._cache is not None and self._cache[0] == n:
                return self._cache[1]
            fut = self._pool.submit(build_spin, self.session.buf, self.session.offsets, n)
            self._cache = (n, fut)
            return fut

    def held(self, sent: int) -> bool:
        return 0 <= self.cfg.hold_after <= sent and not self._released.is_set()


LINGER_S = 2.0  # after the last byte: how long to wait for the client to close first


class _Connection:
    """One client, from its login to the end of its spin: a state machine driven by a
    selector on its non-blocking socket. States: ``login`` (waiting for the Login
    Request), ``rejecting`` (Login Rejected queued), ``building`` (Login Accepted sent or
    queued, the spin in the pool), ``spinning``, ``ending`` (End of Session queued)."""

    def __init__(self, server: GlimpseServer, sock: socket.socket):
        self.srv = server
        self.cfg = server.cfg
        self.sock = sock
        self.split = soup.Splitter(soup.CLIENT_TYPES)
        self.state = "login"
        self.out = memoryview(b"")  # bytes handed to the socket next
        self.out_msgs = 0  # sequenced messages in self.out
        self.fut: Future | None = None
        self.spin: Spin | None = None
        self.sent = 0  # sequenced messages of the spin sent
        self.limit = -1  # the drop fault: cut after this many (-1: never)
        now = time.monotonic()
        self.last_rx = now
        self.last_tx = now

    def run(self) -> None:
        self.sock.setblocking(False)
        sel = selectors.DefaultSelector()
        sel.register(self.sock, selectors.EVENT_READ)
        writing = False
        try:
            while not self.srv._stop.is_set():
                now = time.monotonic()
                if now - self.last_rx >= self.cfg.silence_s:
                    self.srv._count(silent_clients=1)
                    return
                if not self.out:
                    done = self._next(now)
                    if done is not None:
                        if done:
                            self._linger(sel)
                        return
                want = bool(self.out)
                if want != writing:
                    events = selectors.EVENT_READ | (selectors.EVENT_WRITE if want else 0)
                    sel.modify(self.sock, events)
                    writing = want
                for _, ev in sel.select(self._wait(now)):
                    if ev & selectors.EVENT_READ and not self._read():
                        return
                    if ev & selectors.EVENT_WRITE:
                        self._write()
        finally:
            sel.close()

    def _wait(self, now: float) -> float:
        """How long the selector may sleep: to the next heartbeat or silence deadline, and
        briefly while a spin is being built or held (nothing wakes the selector then)."""
        t = min(
            self.cfg.silence_s - (now - self.last_rx),
            self.cfg.heartbeat_s - (now - self.last_tx),
            0.1,
        )
        if self.state == "building" or (self.state == "spinning" and not self.out):
            t = min(t, 0.005)
        return max(t, 0.0)

    def _linger(self, sel: selectors.BaseSelector) -> None:
        """Half-close, then read (and discard) until the client closes or ``LINGER_S``
        passes: closing with unread bytes from the client would reset the connection,
        and a reset may discard what the client has not read yet."""
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            return
        sel.modify(self.sock, selectors.EVENT_READ)
        deadline = time.monotonic() + LINGER_S
        while not self.srv._stop.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            if sel.select(min(left, 0.1)):
                try:
                    if not self.sock.recv(65536):
                        return
                except BlockingIOError:
                    continue
                except OSError:
                    return

    def _next(self, now: float) -> bool | None:
        """With nothing queued: queue the next bytes, or wait (None); or end the
        connection (True: gently, False: at once)."""
        if self.state == "rejecting":
            return True
        if self.state == "ending":
            self.srv._count(spins=1)
            return True
        if self.state == "building" and self.fut.done():
            self.spin = self.fut.result()
            self.state = "spinning"
            if self.limit >= 0:
                self.limit = min(self.limit, self.spin.messages - 1)  # never the M
        if self.state == "spinning":
            if self.sent == self.limit:
                self.srv._count(drops=1)
                return True
            total = self.spin.messages
            if self.sent == total:
                self._queue(soup.END_OF_SESSION_PACKET)
                self.state = "ending"
                return None
            if not self.srv.held(self.sent):
                stop = min(total, self.sent + CHUNK_MESSAGES)
                if self.limit >= 0:
                    stop = min(stop, self.limit)
                hold = self.cfg.hold_after
                if 0 <= hold and self.sent < hold and not self.srv._released.is_set():
                    stop = min(stop, hold)
                st = self.spin.starts
                self._queue(self.spin.stream[st[self.sent] : st[stop]], stop - self.sent)
                return None
        if self.state != "login" and now - self.last_tx >= self.cfg.heartbeat_s:
            self._queue(soup.SERVER_HEARTBEAT_PACKET)
            self.srv._count(heartbeats=1)
        return None

    def _queue(self, data, messages: int = 0) -> None:
        self.out = memoryview(data).cast("B")
        self.out_msgs = messages

    def _write(self) -> None:
        try:
            n = self.sock.send(self.out)
        except BlockingIOError:
            return
        self.last_tx = time.monotonic()
        self.srv._count(bytes=n)
        self.out = self.out[n:]
        if not self.out:
            self.sent += self.out_msgs
            self.srv._count(messages=self.out_msgs)
            self.out_msgs = 0

    def _read(self) -> bool:
        """Take what the client sent; False: close the connection now."""
        try:
            data = self.sock.recv(65536)
        except BlockingIOError:
            return True
        if not data:
            if self.state not in ("ending", "rejecting"):
                self.srv._count(disconnects=1)
            return False
        self.last_rx = time.monotonic()
        try:
            packets = self.split.feed(data)
        except soup.SoupError:
            self.srv._count(malformed=1)
            return False
        for p in packets:
            if p.type == soup.CLIENT_HEARTBEAT:
                self.srv._count(client_heartbeats=1)
            elif p.type == soup.LOGOUT:
                self.srv._count(logouts=1)
                return False
            elif self.state == "login":
                if p.type != soup.LOGIN_REQUEST:
                    self.srv._count(malformed=1)  # the Login Request comes first
                    return False
                if not self._login(p):
                    return False
            elif p.type not in (soup.DEBUG, soup.UNSEQUENCED):  # a second login
                self.srv._count(malformed=1)
                return False
        return True

    def _login(self, p: soup.Packet) -> bool:
        try:
            req = soup.parse_login_request(p)
        except soup.SoupError:
            self.srv._count(malformed=1)
            return False
        code, drop = self.srv.login(req)
        if code is not None:
            self._queue(soup.login_rejected(code))
            self.state = "rejecting"
            return True
        self.limit = self.cfg.drop_after if drop else -1
        self.fut = self.srv.spin()
        self.state = "building"
        self._queue(soup.login_accepted(self.srv._wire_name, 1))
        return True
