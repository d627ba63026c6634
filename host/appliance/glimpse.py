"""The appliance's GLIMPSE 5.0-style snapshot client over SoupBinTCP 4.0.

``fetch`` logs in to a snapshot service (the exchange's; in the lab ``tickwire sim
--glimpse-port``), takes the spin and returns it as a ``Spin``: the ITCH messages in the
file framing ``Book.feed`` takes, and the Snapshot message's sequence N (the last
multicast sequence the spin reflects: follow the feed from N + 1). While the spin runs
it sends a Client Heartbeat after ``heartbeat_s`` without sending, and treats
``silence_s`` without receiving anything (a Server Heartbeat will do) as a dropped
connection.

Every failure is one ``GlimpseError`` (an ``OSError``) whose message says what happened
and where, and whose ``reason`` names the kind: ``refused`` (Login Rejected, with the
code's meaning: "not authorized" or "session not available"), ``connect`` (connection
refused, host unreachable), ``dropped`` (the connection ended before the Snapshot
message, after K messages), ``silent``, ``malformed`` (not SoupBinTCP, or not an ITCH 5.0
message where one belongs), ``timeout`` (the whole fetch took longer than ``timeout``).
``fetch_retrying`` tries again with a doubling backoff; a login refused as not
authorized is not retried (the same credentials will not get better).

A Snapshot message followed by the connection's end without End of Session is taken as a
whole spin: everything the spin promises has arrived.
"""

from __future__ import annotations

import selectors
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from dataplane import soupbintcp as soup
from dataplane.itch import MSG_LEN


class GlimpseError(OSError):
    """A snapshot fetch that failed; ``reason`` is its kind (see the module docstring),
    ``messages`` the spin's messages received before it failed."""

    def __init__(self, message: str, reason: str, messages: int = 0, retryable: bool = True):
        super().__init__(message)
        self.reason = reason
        self.messages = messages
        self.retryable = retryable

    def __str__(self) -> str:
        return self.args[0]


@dataclass(frozen=True)
class Spin:
    messages: np.ndarray  # uint8: the spin's ITCH messages, each after a 2-byte length
    seq: int  # the Snapshot message's sequence: the last multicast sequence reflected
    count: int  # ITCH messages in ``messages``
    seconds: float  # from connecting to End of Session
    session: str = ""  # the session the service named in Login Accepted
    heartbeats: int = 0  # Server Heartbeats received


class _Fetch:
    """One fetch's state; ``run`` returns the ``Spin`` or raises ``GlimpseError``."""

    def __init__(self, host, port, user, password, session, timeout, heartbeat_s, silence_s):
        self.where = f"snapshot service {host}:{port}"
        self.addr = (host, port)
        self.login = soup.login_request(user, password, session, 1)
        self.timeout = timeout
        self.heartbeat_s = heartbeat_s
        self.silence_s = silence_s
        self.split = soup.Splitter(soup.SERVER_TYPES)
        self.out = bytearray()  # the spin's ITCH messages, framed
        self.count = 0
        self.heartbeats = 0
        self.accepted: str | None = None  # the session Login Accepted named
        self.snapshot: int | None = None
        self.ended = False

    def fail(self, what: str, reason: str, retryable: bool = True) -> GlimpseError:
        return GlimpseError(f"{self.where}: {what}", reason, self.count, retryable)

    def _stage(self) -> str:
        if self.accepted is None:
            return "before answering the login"
        return f"after {self.count} messages, before the snapshot message"

    def run(self) -> Spin:
        t0 = time.monotonic()
        deadline = t0 + self.timeout
        try:
            sock = socket.create_connection(self.addr, timeout=max(0.001, self.timeout))
        except ConnectionRefusedError:
            raise self.fail("connection refused (is the service running?)", "connect") from None
        except TimeoutError:
            raise self.fail(
                f"timed out: no connection within {self.timeout:g} s", "timeout"
            ) from None
        except OSError as e:
            raise self.fail(f"cannot connect: {e.strerror or e}", "connect") from None
        with sock, selectors.DefaultSelector() as sel:
            self._session(sock, sel, deadline)
        seconds = time.monotonic() - t0
        return Spin(
            messages=np.frombuffer(bytes(self.out), np.uint8),
            seq=int(self.snapshot),
            count=self.count,
            seconds=seconds,
            session=self.accepted or "",
            heartbeats=self.heartbeats,
        )

    def _session(self, sock: socket.socket, sel: selectors.BaseSelector, deadline: float):
        sock.setblocking(False)
        sel.register(sock, selectors.EVENT_READ)
        pending = memoryview(self.login)
        last_rx = last_tx = time.monotonic()
        while not self.ended:
            now = time.monotonic()
            if now >= deadline:
                raise self.fail(f"timed out after {self.timeout:g} s, {self._stage()}", "timeout")
            if now - last_rx >= self.silence_s:
                raise self.fail(
                    f"silent for {self.silence_s:g} s {self._stage()}: connection dropped",
                    "silent",
                )
            if not pending and self.accepted is not None and now - last_tx >= self.heartbeat_s:
                pending = memoryview(soup.CLIENT_HEARTBEAT_PACKET)
            sel.modify(sock, selectors.EVENT_READ | (selectors.EVENT_WRITE if pending else 0))
            wait = min(deadline - now, self.silence_s - (now - last_rx))
            if self.accepted is not None and not pending:
                wait = min(wait, self.heartbeat_s - (now - last_tx))
            for _, ev in sel.select(max(0.0, wait)):
                if ev & selectors.EVENT_WRITE and pending:
                    try:
                        n = sock.send(pending)
                    except BlockingIOError:
                        n = 0
                    except OSError as e:
                        raise self._lost(e) from None
                    pending = pending[n:]
                    last_tx = time.monotonic()
                if ev & selectors.EVENT_READ:
                    try:
                        data = sock.recv(1 << 20)
                    except BlockingIOError:
                        continue
                    except OSError as e:
                        raise self._lost(e) from None
                    if not data:
                        self._closed()
                        return
                    last_rx = time.monotonic()
                    self._take(data)

    def _lost(self, e: OSError) -> GlimpseError:
        if self.snapshot is not None:  # everything promised is here; see the docstring
            return self.fail("reset after the snapshot message", "dropped")
        what = "reset" if isinstance(e, ConnectionResetError) else (e.strerror or str(e))
        return self.fail(f"connection dropped ({what}) {self._stage()}", "dropped")

    def _closed(self) -> None:
        if self.snapshot is not None:
            self.ended = True  # a whole spin without its End of Session
            return
        if self.accepted is None:
            raise self.fail("closed the connection before answering the login", "dropped")
        raise self.fail(f"connection dropped {self._stage()}", "dropped")

    def _take(self, data: bytes) -> None:
        try:
            packets = self.split.feed(data)
        except soup.SoupError as e:
            raise self.fail(
                f"malformed packet after {self.count} messages: {e}", "malformed"
            ) from None
        out = self.out
        for p in packets:
            t = p.type
            if t == soup.SEQUENCED and self.accepted is not None and self.snapshot is None:
                msg = p.payload
                n = len(msg)
                if n and MSG_LEN[msg[0]] == n:
                    out += n.to_bytes(2, "big")
                    out += msg
                    self.count += 1
                    continue
                self._other_sequenced(msg)
            elif t == soup.SERVER_HEARTBEAT:
                self.heartbeats += 1
            elif t == soup.DEBUG:
                continue
            elif t == soup.LOGIN_REJECTED and self.accepted is None:
                code = self._parse(soup.parse_login_rejected, p)
                raise self.fail(
                    f"login refused: {soup.REJECT_REASONS[code]} (reject code {code})",
                    "refused",
                    retryable=code != soup.NOT_AUTHORIZED,
                )
            elif t == soup.LOGIN_ACCEPTED and self.accepted is None:
                session, seq = self._parse(soup.parse_login_accepted, p)
                if seq != 1:
                    raise self.fail(
                        f"malformed: the login was accepted from sequence {seq}, not 1",
                        "malformed",
                    )
                self.accepted = session
            elif t == soup.END_OF_SESSION and self.accepted is not None:
                if self.snapshot is None:
                    raise self.fail(
                        f"ended the session after {self.count} messages without a snapshot message",
                        "dropped",
                    )
                self.ended = True
                return
            else:
                if self.accepted is None:
                    where = "before the login answer"
                elif self.snapshot is not None:
                    where = "after the snapshot message"
                else:
                    where = f"after {self.count} messages"
                raise self.fail(
                    f"malformed: unexpected {soup.NAMES[t]} packet {where}", "malformed"
                )

    def _other_sequenced(self, msg: bytes) -> None:
        """A sequenced message that is not an ITCH 5.0 message: the Snapshot message, or
        an error."""
        if soup.is_snapshot_message(msg):
            self.snapshot = self._parse(soup.parse_snapshot_message, msg)
            return
        kind = repr(chr(msg[0])) if msg else "(empty)"
        raise self.fail(
            f"malformed: sequenced message {self.count + 1} (type {kind}, {len(msg)} bytes) "
            "is neither an ITCH 5.0 message nor the snapshot message",
            "malformed",
        )

    def _parse(self, parse, arg):
        try:
            return parse(arg)
        except soup.SoupError as e:
            raise self.fail(f"malformed packet: {e}", "malformed") from None


def fetch(
    host: str,
    port: int,
    user: str,
    password: str,
    session: str = "",
    timeout: float = 60.0,
    heartbeat_s: float = 1.0,
    silence_s: float = 15.0,
) -> Spin:
    """Log in to the snapshot service at ``host:port`` and take one spin (``session`` ""
    = the service's current session). ``timeout`` bounds the whole fetch. Raises
    ``GlimpseError``; bad credentials that SoupBinTCP cannot carry raise ``SoupError``."""
    f = _Fetch(host, port, user, password, session, timeout, heartbeat_s, silence_s)
    return f.run()


def fetch_retrying(
    host: str,
    port: int,
    user: str,
    password: str,
    session: str = "",
    timeout: float = 60.0,
    attempts: int = 5,
    backoff_s: float = 0.5,
    max_backoff_s: float = 8.0,
    on_retry: Callable[[int, GlimpseError], None] | None = None,
    heartbeat_s: float = 1.0,
    silence_s: float = 15.0,
) -> Spin:
    """``fetch``, tried up to ``attempts`` times: after failed attempt k (1-based)
    ``on_retry(k, error)`` is called, then the next waits ``backoff_s``, doubling each
    time up to ``max_backoff_s``. Raises the last error when the attempts run out, and at
    once an error that retrying cannot mend (a login refused as not authorized)."""
    if attempts < 1:
        raise ValueError(f"attempts must be at least 1, not {attempts}")
    wait = backoff_s
    for attempt in range(1, attempts + 1):
        try:
            return fetch(host, port, user, password, session, timeout, heartbeat_s, silence_s)
        except GlimpseError as e:
            if attempt == attempts or not e.retryable:
                raise
            if on_retry is not None:
                on_retry(attempt, e)
        time.sleep(wait)
        wait = min(2 * wait, max_backoff_s)
    raise AssertionError("unreachable")  # pragma: no cover
