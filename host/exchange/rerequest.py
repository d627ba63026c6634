"""The exchange's re-request server: MoldUDP64 retransmission requests answered by unicast.

``workers`` threads, each with its own UDP socket on the same port (``SO_REUSEPORT``),
answer from the retained window (the last ``window`` published messages), at most
``max_messages`` messages and ``max_bytes`` bytes of packets per answer, and at most
``rate`` messages per second per requester address (a token bucket holding one second's
worth). Requests that are malformed, for another session, for sequences not yet
published, below the window, or over the rate are ignored and counted.
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from dataplane import moldudp64 as mold

if TYPE_CHECKING:
    from host.exchange.publisher import Session


# --- re-request server ----------------------------------------------------------------------
@dataclass(frozen=True)
class ServerConfig:
    port: int = 26500
    # messages retained for re-requests (the last N published)
    window: int = 1_000_000
    # caps per answer
    max_messages: int = 1000
    max_bytes: int = 64_000
    # messages per second per requester address (bucket of one second's worth)
    rate: float = 100_000.0
    workers: int = 2


SERVER_COUNTERS = (
    "requests",
    "answered",
    "partial",
    "messages",
    "packets",
    "bytes",
    "malformed",
    "other_session",
    "future",
    "outside_window",
    "rate_limited",
    "send_errors",
)


class ReRequestServer:
    """MoldUDP64 retransmission server over a session (see the module docstring)."""

    def __init__(
        self,
        session: Session,
        session_name: bytes,
        published: np.ndarray,
        cfg: ServerConfig,
        payload_limit: int,
        bind_ip: str = "0.0.0.0",
    ):
        self.session = session
        self.name = session_name
        self.published = published  # published[0]: highest sequence published so far
        self.cfg = cfg
        self.limit = payload_limit
        self.bind_ip = bind_ip
        self.counters = dict.fromkeys(SERVER_COUNTERS, 0)
        self._lock = threading.Lock()
        self._buckets: dict[str, list[float]] = {}
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._socks: list[socket.socket] = []

    def start(self) -> None:
        """Bind every worker's socket (in the caller's network namespace) and start them."""
        for i in range(self.cfg.workers):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            try:
                s.bind((self.bind_ip, self.cfg.port))
            except OSError as e:
                s.close()
                self.stop()
                raise OSError(
                    e.errno,
                    f"re-request server cannot bind {self.bind_ip}:{self.cfg.port}: {e.strerror}",
                ) from None
            s.settimeout(0.1)
            self._socks.append(s)
            t = threading.Thread(target=self._serve, args=(s,), name=f"rerequest-{i}", daemon=True)
            self._threads.append(t)
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()
        for s in self._socks:
            s.close()
        self._threads, self._socks = [], []

    def _count(self, **kw) -> None:
        with self._lock:
            for k, v in kw.items():
                self.counters[k] += v

    def _tokens(self, who: str, want: int) -> int:
        """Take up to ``want`` message tokens from ``who``'s bucket; returns how many."""
        now = time.monotonic()
        cap = self.cfg.rate
        with self._lock:
            b = self._buckets.setdefault(who, [cap, now])
            b[0] = min(cap, b[0] + (now - b[1]) * cap)
            b[1] = now
            got = int(min(want, b[0]))
            b[0] -= got
            return got

    def _serve(self, s: socket.socket) -> None:
        packets = np.zeros(self.cfg.max_messages, mold.PACKET)
        while not self._stop.is_set():
            try:
                data, addr = s.recvfrom(2048)
            except TimeoutError:
                continue
            except OSError:
                if self._stop.is_set():
                    return
                continue
            self._count(requests=1)
            try:
                self._answer(s, data, addr, packets)
            except OSError:  # e.g. the requester's address is unreachable: count, go on
                self._count(send_errors=1)

    def _answer(self, s, data, addr, packets) -> None:
        try:
            session, seq, count = mold.parse_request(data)
        except mold.MoldError:
            self._count(malformed=1)
            return
        if session != self.name:
            self._count(other_session=1)
            return
        top = int(self.published[0])
        if seq > top:
            self._count(future=1)
            return
        if seq < max(1, top - self.cfg.window + 1):
            self._count(outside_window=1)
            return
        want = min(count, self.cfg.max_messages, top - seq + 1)
        n = self._tokens(addr[0], want)
        if n == 0:
            self._count(rate_limited=1)
            return
        sess = self.session
        k = mold.pack(sess.offsets, seq - 1, seq - 1 + n, self.limit, packets)
        sent_msgs = sent_pkts = sent_bytes = 0
        mv = memoryview(sess.buf)
        for i in range(k):
            p = packets[i]
            size = mold.HEADER_LEN + int(p["end"] - p["start"])
            if sent_bytes + size > self.cfg.max_bytes:
                break
            hdr = mold.header(self.name, int(p["seq"]), int(p["count"]))
            s.sendmsg([hdr, mv[int(p["start"]) : int(p["end"])]], [], 0, addr)
            sent_msgs += int(p["count"])
            sent_pkts += 1
            sent_bytes += size
        if sent_msgs < n:  # tokens not spent on packets over the byte cap go back
            with self._lock:
                self._buckets[addr[0]][0] += n - sent_msgs
        self._count(
            answered=1,
            partial=int(sent_msgs < count),
            messages=sent_msgs,
            packets=sent_pkts,
            bytes=sent_bytes,
        )
