"""Gap recovery from the exchange's re-request server (MoldUDP64 retransmission requests).

Contract with the consumer (``dataplane.shm``'s two recovery rings):

- The consumer declares a gap by pushing ``(first, count, detected_ns)`` into ``gaps``
  (``detected_ns`` on CLOCK_MONOTONIC, like ``time.monotonic_ns()``); the client pops it.
- Every answer packet the client accepts is handed back as-is (MoldUDP64 header included)
  as ``REC_DATA``; a range it gives up on as ``REC_LOST``. Entries go into ``recov`` in
  sequence order: an entry is released only when no sequence below its first one is still
  missing, so the consumer never has to hold a recovered packet ahead of its next sequence
  and never meets a ``REC_LOST`` ahead of data it still waits for. When the ring is full,
  entries wait here (counted) and go on a later iteration: nothing is dropped.
- The client never applies the policy (``control[C_POLICY]``, written by the appliance
  from ``RecoveryConfig.policy``); the consumer does, on ``REC_LOST``.

What the client does with the gaps:

- Coalesces a declared gap with every outstanding gap it overlaps or touches (the merged
  gap keeps the earliest detection time; counted ``coalesced``).
- Requests the missing sequences lowest first, at most ``max_per_request`` per request (the
  server's per-answer cap), at most one request every ``min_interval`` seconds and at most
  ``max_inflight`` unanswered requests at a time.
- Tracks, per gap, exactly which sequences arrived. An answer may be partial (the server
  caps messages, bytes and rate per answer): once a request got something and then nothing
  more for ``settle`` seconds, the rest is asked for again at once. A request with no
  answer at all within ``timeout * backoff**attempt`` is retried; after ``retries`` retries
  its still-missing part is given up. A gap older than ``slo`` (from its detection) gives
  up everything still missing.
- Rejects (counts, never forwards) answers of another session, answers that are malformed
  or too big for a ring slot, and answers covering no missing sequence -- split into
  ``duplicate`` (a range recently asked for, already filled: a late or repeated answer)
  and ``unrequested``.

Gap lifecycle (``TRANSITIONS``): ``open`` (sequences missing) -> ``releasing`` (nothing
missing: every sequence arrived or was given up; entries still to hand over) -> ``filled``
(handed over, nothing lost: its detection-to-filled latency goes into the histogram) or
``unrecoverable`` (part of it was given up). A declaration that adds sequences to a
``releasing`` gap reopens it.

Counters (``counters()``; mirrored into ``maps["recovery"]`` when the channel has that
region, for ``tickwire status`` and metrics in other processes, see ``read_shared``):
``COUNTERS`` below. Invariant: ``detected == filled + unrecoverable + coalesced +
outstanding``.
"""

from __future__ import annotations

import bisect
import collections
import heapq
import ipaddress
import select
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from dataplane import moldudp64 as mold
from dataplane import shm, sysabi

POLICIES = {"stale": shm.POLICY_STALE, "halt": shm.POLICY_HALT}


@dataclass(frozen=True)
class RecoveryConfig:
    # the re-request server (in the lab: line A's exchange-side address, port 26500)
    server_host: str = "10.77.1.1"
    server_port: int = 26500
    # MoldUDP64 session name (1-10 ASCII characters, space padded on the wire)
    session: str = "TICKWIRE01"
    # the server's per-answer message cap: requests are split at it
    max_per_request: int = 1000
    # seconds between two requests (throttle)
    min_interval: float = 0.001
    # seconds to wait for an answer before retrying; retry k waits timeout * backoff**k
    timeout: float = 0.05
    retries: int = 5
    backoff: float = 2.0
    # seconds from detection after which a gap's missing part is declared unrecoverable
    slo: float = 2.0
    # what the consumer does with an unrecoverable gap: "stale" (mark, go on) or "halt"
    policy: str = "stale"
    # seconds of quiet after an answer packet before the rest of a partial answer is asked
    settle: float = 0.005
    # requests without a complete answer at any time
    max_inflight: int = 8

    def __post_init__(self) -> None:
        try:
            addr = ipaddress.IPv4Address(self.server_host)
        except ValueError:
            raise ValueError(f"server_host: not an IPv4 address: {self.server_host!r}") from None
        if addr.is_multicast or addr.is_unspecified:
            raise ValueError(f"server_host: {self.server_host} is not a unicast address")
        if not 1 <= self.server_port <= 65535:
            raise ValueError(f"server_port: {self.server_port} is outside 1..65535")
        mold.session_bytes(self.session)  # raises ValueError naming the session
        if not 1 <= self.max_per_request <= mold.MAX_COUNT:
            raise ValueError(
                f"max_per_request: {self.max_per_request} is outside 1..{mold.MAX_COUNT}"
            )
        for name in ("min_interval", "settle"):
            if not 0 <= getattr(self, name) <= 60:
                raise ValueError(f"{name}: {getattr(self, name)} is outside 0..60 s")
        for name in ("timeout", "slo"):
            if not 0 < getattr(self, name) <= 3600:
                raise ValueError(f"{name}: {getattr(self, name)} is outside (0, 3600] s")
        if self.settle > self.timeout:
            raise ValueError(f"settle: {self.settle} must not exceed timeout ({self.timeout})")
        if not 0 <= self.retries <= 100:
            raise ValueError(f"retries: {self.retries} is outside 0..100")
        if not 1 <= self.backoff <= 10:
            raise ValueError(f"backoff: {self.backoff} is outside 1..10")
        if self.policy not in POLICIES:
            raise ValueError(f"policy: {self.policy!r} is not one of {', '.join(POLICIES)}")
        if not 1 <= self.max_inflight <= 1024:
            raise ValueError(f"max_inflight: {self.max_inflight} is outside 1..1024")

    @property
    def policy_code(self) -> int:
        """The ``control[C_POLICY]`` value for ``policy``."""
        return POLICIES[self.policy]


COUNTERS = (
    "detected",  # gap declarations popped from the gaps ring
    "coalesced",  # declarations merged into another outstanding gap
    "filled",  # gaps completely filled and handed over
    "unrecoverable",  # gaps with a part given up
    "unrecoverable_messages",  # sequences handed over as REC_LOST
    "lost_by_retries",  # ... of which after the retries ran out
    "lost_by_slo",  # ... of which because the gap's SLO passed
    "requested",  # request packets sent
    "retries",  # ... of which after a timeout
    "partials",  # partial answers whose rest was asked for again
    "answers",  # answer packets accepted (and forwarded)
    "messages_recovered",  # missing sequences those answers filled
    "rejected_answers",  # answer packets not forwarded, all reasons:
    "rejected_other_session",
    "rejected_malformed",  # short, blocks inconsistent, heartbeat/end, over a ring slot
    "rejected_unrequested",  # covering no missing sequence nor any recent request
    "rejected_duplicate",  # covering only sequences already filled (late or repeated)
    "send_errors",
    "bad_gaps",  # declarations with first < 1 or count < 1 (ignored)
    "ring_full",  # times the recov ring had no room (entries held, retried)
    "held",  # gauge: entries waiting to be handed over
    "outstanding",  # gauge: gaps not finished
    "outstanding_messages",  # gauge: sequences still missing
)

# --- the shared mirror (int64): what another process reads -------------------------------------
R_RUNNING = 0
R_ALIVE_NS = 1
R_POLICY = 2
R_COUNTERS = 8  # COUNTERS in order
R_HIST = 64  # the recovery-latency histogram (shm.LAT_BUCKETS, shm.lat_bucket's buckets)
SHARED_LEN = R_HIST + shm.LAT_BUCKETS
assert R_COUNTERS + len(COUNTERS) <= R_HIST


def read_shared(arr: np.ndarray) -> dict:
    """The client's state from its shared mirror (``maps["recovery"]``), any process."""
    a = np.array(arr[:SHARED_LEN])
    hist = a[R_HIST:]
    return {
        "running": bool(a[R_RUNNING]),
        "alive_ns": int(a[R_ALIVE_NS]),
        "policy": {v: k for k, v in POLICIES.items()}.get(int(a[R_POLICY]), "stale"),
        "counters": {k: int(a[R_COUNTERS + i]) for i, k in enumerate(COUNTERS)},
        "latency_ns": shm.percentiles(hist),
        "histogram": hist,
    }


# --- gap lifecycle --------------------------------------------------------------------------
OPEN = "open"
RELEASING = "releasing"
FILLED = "filled"
UNRECOVERABLE = "unrecoverable"
TRANSITIONS = {
    (OPEN, "covered"): RELEASING,  # every sequence arrived or was given up
    (RELEASING, "reopened"): OPEN,  # a new declaration added missing sequences
    (RELEASING, "released"): FILLED,  # all handed over, nothing given up
    (RELEASING, "released_lost"): UNRECOVERABLE,  # all handed over, something given up
}


# --- interval lists: sorted, disjoint, non-adjacent [start, end) --------------------------------
def _subtract(iv: list[list[int]], a: int, b: int) -> int:
    """Remove [a, b) from ``iv`` in place (rows may carry extra fields after the bounds);
    returns how many sequences were removed."""
    removed = 0
    out = []
    for row in iv:
        s, e = row[0], row[1]
        if e <= a or s >= b:
            out.append(row)
            continue
        removed += min(e, b) - max(s, a)
        if s < a:
            out.append([s, a, *row[2:]])
        if e > b:
            out.append([b, e, *row[2:]])
    iv[:] = out
    return removed


def _intersect(iv: list[list[int]], a: int, b: int) -> list[list[int]]:
    return [[max(r[0], a), min(r[1], b)] for r in iv if r[0] < b and r[1] > a]


def _union(iv: list[list[int]], a: int, b: int) -> None:
    """Add [a, b) to ``iv`` in place (merging touching intervals)."""
    out = []
    for s, e in iv:
        if e < a or s > b:
            out.append([s, e])
        else:
            a, b = min(a, s), max(b, e)
    out.append([a, b])
    out.sort()
    iv[:] = out


def _merge_pending(pending: list[list[int]]) -> list[list[int]]:
    """Sorted, with touching ranges of the same attempt joined (fewer, larger requests)."""
    out: list[list[int]] = []
    for s, e, attempt in sorted(pending):
        if out and out[-1][2] == attempt and out[-1][1] >= s:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e, attempt])
    return out


def _size(iv) -> int:
    return sum(r[1] - r[0] for r in iv)


@dataclass
class _Ask:
    first: int
    end: int
    attempt: int
    sent_ns: int
    deadline_ns: int
    progress_ns: int = 0  # last time an answer packet covered part of it


@dataclass
class _Gap:
    first: int
    end: int
    detected_ns: int
    missing: list[list[int]]  # sequences not yet arrived nor given up
    pending: list[list[int]]  # [start, end, attempt]: missing and not asked right now
    asks: list[_Ask] = field(default_factory=list)
    lost: int = 0
    reasons: set[str] = field(default_factory=set)
    state: str = OPEN

    def move(self, event: str) -> None:
        self.state = TRANSITIONS[(self.state, event)]


def _stderr_log(msg: str) -> None:
    print(f"tickwire recovery: {msg}", file=sys.stderr, flush=True)


class RecoveryClient:
    """Recovers the consumer's declared gaps from the re-request server (module docstring).

    ``start()`` runs it in a thread; ``step()`` runs one iteration in the caller's thread
    (after ``open()``), for tests. The UDP socket is created by ``open()`` (called by
    ``start()``) in the calling thread's network namespace.
    """

    RECV_BATCH = 512  # answer packets taken per iteration at most
    POLL_S = 0.001  # the gaps ring is polled: at least this often
    RECENT_ASKS = 4096  # requests remembered to tell late answers from unrequested ones

    def __init__(
        self,
        cfg: RecoveryConfig,
        maps: dict,
        bind_ip: str = "0.0.0.0",
        log: Callable[[str], None] = _stderr_log,
        shared: np.ndarray | None = None,
    ):
        self.cfg = cfg
        self.maps = maps
        self.bind_ip = bind_ip
        self.log = log
        self.server = (cfg.server_host, cfg.server_port)
        self.session = mold.session_bytes(cfg.session)
        if shared is None:
            shared = maps.get("recovery")
        if shared is not None and len(shared) < SHARED_LEN:
            raise ValueError(
                f"the shared recovery region holds {len(shared)} int64, needs {SHARED_LEN}"
            )
        self._shared = shared
        self._hist = (
            shared[R_HIST:SHARED_LEN] if shared is not None else np.zeros(shm.LAT_BUCKETS, np.int64)
        )
        if shared is not None:
            shared[:SHARED_LEN] = 0
            shared[R_POLICY] = cfg.policy_code
        self._c = dict.fromkeys(COUNTERS, 0)
        self._snapshot = dict(self._c)
        self._gaps: list[_Gap] = []  # outstanding, disjoint and non-adjacent
        self._queue: list[tuple] = []  # heap: (first, order, kind, count, packet)
        self._order = 0
        self._blocked = False  # the ring refused the last push
        self._next_send_ns = 0
        self._recent: collections.deque = collections.deque(maxlen=self.RECENT_ASKS)
        self._sock: socket.socket | None = None
        self._buf = bytearray(65536)
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.error: BaseException | None = None

    # --- lifecycle ------------------------------------------------------------------------
    def open(self) -> None:
        """Create and bind the UDP socket (in the calling thread's network namespace)."""
        if self._sock is not None:
            return
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for opt in (sysabi.SO_RCVBUFFORCE, socket.SO_RCVBUF):
            try:  # answers come in bursts of up to max_inflight * max_per_request messages
                s.setsockopt(socket.SOL_SOCKET, opt, 8 << 20)
                break
            except OSError:  # SO_RCVBUFFORCE needs CAP_NET_ADMIN; SO_RCVBUF is capped
                continue
        try:
            s.bind((self.bind_ip, 0))
        except OSError as e:
            s.close()
            raise OSError(
                e.errno, f"recovery client cannot bind {self.bind_ip}: {e.strerror}"
            ) from None
        s.setblocking(False)
        self._sock = s

    @property
    def address(self) -> tuple[str, int]:
        """The (ip, port) answers come back to."""
        if self._sock is None:
            raise RuntimeError("recovery client not open")
        return self._sock.getsockname()

    def start(self) -> None:
        """Open the socket here, then run the client in a thread until ``stop()``."""
        self.open()
        self._stop.clear()
        self._set_running(1)
        self._thread = threading.Thread(target=self._run, name="recovery", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._queue:
            self.log(
                f"stopped with {len(self._queue)} recovered entries not handed over "
                "(the consumer's ring stayed full)"
            )
        self._mirror()
        self._set_running(0)

    def _set_running(self, v: int) -> None:
        if self._shared is not None:
            self._shared[R_RUNNING] = v

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                now = time.monotonic_ns()
                self.step(now)
                wait = self._next_event_ns(time.monotonic_ns())
                if self._sock is not None:
                    select.select([self._sock], [], [], wait / 1e9)
        except BaseException as e:  # noqa: BLE001 - reported, never silent
            self.error = e
            self.log(f"recovery client failed: {type(e).__name__}: {e}")
            self._set_running(0)

    def _next_event_ns(self, now: int) -> int:
        """Nanoseconds until something is due (at most POLL_S: the gaps ring is polled)."""
        due = now + int(self.POLL_S * 1e9)
        if self._queue and self._blocked:
            return due - now
        cfg = self.cfg
        can_send = len(self._inflight()) < cfg.max_inflight
        for g in self._gaps:
            if g.state != OPEN:
                continue
            due = min(due, g.detected_ns + int(cfg.slo * 1e9))
            if g.pending and can_send:
                due = min(due, self._next_send_ns)
            for a in g.asks:
                due = min(
                    due, a.progress_ns + int(cfg.settle * 1e9) if a.progress_ns else a.deadline_ns
                )
        return max(0, due - now)

    # --- one iteration -----------------------------------------------------------------------
    def step(self, now_ns: int | None = None) -> None:
        """One iteration: take declared gaps, answers, expire, send, hand over, finish."""
        if self._sock is None:
            raise RuntimeError("recovery client not open (call open() or start())")
        now = time.monotonic_ns() if now_ns is None else now_ns
        while (gap := shm.gap_pop(self.maps)) is not None:
            self._declare(*gap, now)
        self._receive(now)
        self._expire(now)
        self._send(now)
        for g in self._gaps:
            if g.state == OPEN and not g.missing:
                g.move("covered")
        self._release()
        self._finish(now)
        self._mirror(now)

    def _declare(self, first: int, count: int, detected_ns: int, now: int) -> None:
        c = self._c
        if first < 1 or count < 1:
            c["bad_gaps"] += 1
            self.log(f"ignored a gap declaration: first {first}, count {count}")
            return
        c["detected"] += 1
        if detected_ns <= 0 or detected_ns > now:
            detected_ns = now
        end = first + count
        touching = [g for g in self._gaps if g.first <= end and first <= g.end]
        if not touching:
            self._gaps.append(_Gap(first, end, detected_ns, [[first, end]], [[first, end, 0]]))
            self._gaps.sort(key=lambda g: g.first)
            return
        keep = touching[0]
        for g in touching[1:]:  # merge the others into keep
            keep.first, keep.end = min(keep.first, g.first), max(keep.end, g.end)
            keep.detected_ns = min(keep.detected_ns, g.detected_ns)
            for s, e in g.missing:
                _union(keep.missing, s, e)
            keep.pending = keep.pending + g.pending
            keep.asks += g.asks
            keep.lost += g.lost
            keep.reasons |= g.reasons
            if g.missing and keep.state == RELEASING:
                keep.move("reopened")
            self._gaps.remove(g)
        c["coalesced"] += len(touching)
        keep.first, keep.end = min(keep.first, first), max(keep.end, end)
        keep.detected_ns = min(keep.detected_ns, detected_ns)
        new = [[first, end]]
        for s, e in keep.missing:
            _subtract(new, s, e)
        for s, e in new:  # declared again: ask again (duplicates are harmless downstream)
            _union(keep.missing, s, e)
            keep.pending.append([s, e, 0])
        keep.pending = _merge_pending(keep.pending)
        if new and keep.state == RELEASING:
            keep.move("reopened")
        self._gaps.sort(key=lambda g: g.first)

    def _receive(self, now: int) -> None:
        c = self._c
        sock, buf = self._sock, self._buf
        for _ in range(self.RECV_BATCH):
            try:
                n, _addr = sock.recvfrom_into(buf)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # e.g. an ICMP error queued on the socket: nothing to read
                continue
            reason, seq, count = self._check(buf, n)
            if reason is None:
                filled = self._fill(seq, seq + count, now)
                if filled:
                    c["answers"] += 1
                    c["messages_recovered"] += filled
                    self._enqueue(seq, shm.REC_DATA, count, bytes(buf[:n]))
                    continue
                reason = "duplicate" if self._asked(seq, seq + count) else "unrequested"
            c["rejected_answers"] += 1
            c[f"rejected_{reason}"] += 1

    def _check(self, buf: bytearray, n: int) -> tuple[str | None, int, int]:
        """``(None, seq, count)`` for an answer of our session, or ``(reason, 0, 0)``."""
        status, seq, count = mold.parse_header(np.frombuffer(buf, np.uint8, n), 0, n)
        if status == mold.P_SHORT:
            return "malformed", 0, 0
        if buf[mold.SESSION_OFF : mold.SESSION_OFF + mold.SESSION_LEN] != self.session:
            return "other_session", 0, 0
        if n > shm.REC_SLOT_BYTES or status != mold.P_DATA:
            return "malformed", 0, 0
        return None, int(seq), int(count)

    def _asked(self, a: int, b: int) -> bool:
        return any(s < b and a < e for s, e in self._recent)

    def _fill(self, a: int, b: int, now: int) -> int:
        """Mark [a, b) arrived; returns how many missing sequences that filled."""
        total = 0
        gaps = self._gaps  # sorted by first, disjoint
        i = max(0, bisect.bisect_right(gaps, a, key=lambda g: g.first) - 1)
        for g in gaps[i:]:
            if g.first >= b:
                break
            if g.end <= a or not g.missing:
                continue
            got = _subtract(g.missing, a, b)
            if not got:
                continue
            total += got
            _subtract(g.pending, a, b)
            for ask in g.asks:
                if ask.first < b and a < ask.end:
                    ask.progress_ns = now
        return total

    def _expire(self, now: int) -> None:
        cfg, c = self.cfg, self._c
        slo_ns = int(cfg.slo * 1e9)
        settle_ns = int(cfg.settle * 1e9)
        for g in self._gaps:
            if g.state != OPEN:
                continue
            if now - g.detected_ns >= slo_ns:
                g.asks.clear()
                g.pending.clear()
                self._give_up(g, [list(r) for r in g.missing], "slo")
                continue
            keep = []
            for ask in g.asks:
                rest = _intersect(g.missing, ask.first, ask.end)
                for p in g.pending:
                    _subtract(rest, p[0], p[1])
                if not rest:
                    continue  # answered
                if ask.progress_ns and now - ask.progress_ns >= settle_ns:
                    g.pending += [[s, e, 0] for s, e in rest]  # partial: ask for the rest
                    c["partials"] += 1
                elif not ask.progress_ns and now >= ask.deadline_ns:
                    if ask.attempt >= cfg.retries:
                        self._give_up(g, rest, "retries")
                    else:
                        g.pending += [[s, e, ask.attempt + 1] for s, e in rest]
                else:
                    keep.append(ask)
            g.asks = keep
            g.pending = _merge_pending(g.pending)

    def _give_up(self, g: _Gap, ranges: list[list[int]], reason: str) -> None:
        c = self._c
        for s, e in ranges:
            for a, b in _intersect(g.missing, s, e):  # one REC_LOST per missing range
                _subtract(g.missing, a, b)
                _subtract(g.pending, a, b)
                n = b - a
                g.lost += n
                g.reasons.add(reason)
                c["unrecoverable_messages"] += n
                c[f"lost_by_{reason}"] += n
                self._enqueue(a, shm.REC_LOST, n, b"")

    def _inflight(self) -> list[_Ask]:
        return [a for g in self._gaps for a in g.asks]

    def _send(self, now: int) -> None:
        cfg, c = self.cfg, self._c
        inflight = len(self._inflight())
        interval_ns = int(cfg.min_interval * 1e9)
        for g in self._gaps:  # lowest sequences first
            while g.state == OPEN and g.pending:
                if inflight >= cfg.max_inflight or now < self._next_send_ns:
                    return
                s, e, attempt = g.pending[0]
                n = min(e - s, cfg.max_per_request)
                if s + n < e:
                    g.pending[0] = [s + n, e, attempt]
                else:
                    g.pending.pop(0)
                try:
                    self._sock.sendto(mold.request(self.session, s, n), self.server)
                except OSError:  # unreachable for now: the timeout retries it
                    c["send_errors"] += 1
                c["requested"] += 1
                if attempt:
                    c["retries"] += 1
                timeout_ns = int(cfg.timeout * cfg.backoff**attempt * 1e9)
                g.asks.append(_Ask(s, s + n, attempt, now, now + timeout_ns))
                self._recent.append((s, s + n))
                inflight += 1
                self._next_send_ns = now + interval_ns

    def _enqueue(self, first: int, kind: int, count: int, packet: bytes) -> None:
        self._order += 1
        heapq.heappush(self._queue, (first, self._order, kind, count, packet))

    def _low_water(self) -> int:
        """The lowest sequence still missing (entries at or below it may be handed over)."""
        for g in self._gaps:  # sorted by first, disjoint: the first with a hole has the lowest
            if g.missing:
                return g.missing[0][0]
        return 1 << 62

    def _release(self) -> None:
        low = self._low_water()
        q = self._queue
        while q and q[0][0] <= low:
            first, _o, kind, count, packet = q[0]
            if not shm.rec_push(self.maps, kind, first, count, packet):
                if not self._blocked:
                    self._c["ring_full"] += 1
                self._blocked = True
                return
            self._blocked = False
            heapq.heappop(q)

    def _finish(self, now: int) -> None:
        c = self._c
        next_entry = self._queue[0][0] if self._queue else 1 << 62
        done = [g for g in self._gaps if g.state == RELEASING and next_entry >= g.end]
        for g in done:
            self._gaps.remove(g)
            if g.lost:
                g.move("released_lost")
                c["unrecoverable"] += 1
                why = " and ".join(
                    sorted(
                        {"retries": "no answer after the retries", "slo": "its SLO passed"}[r]
                        for r in g.reasons
                    )
                )
                self.log(
                    f"gap {g.first}..{g.end - 1}: {g.lost} of {g.end - g.first} "
                    f"messages unrecoverable ({why}); policy {self.cfg.policy}"
                )
            else:
                g.move("released")
                c["filled"] += 1
                i = min(shm.lat_bucket.py_func(max(0, now - g.detected_ns)), shm.LAT_BUCKETS - 1)
                self._hist[i] += 1

    def _mirror(self, now: int | None = None) -> None:
        c = self._c
        c["held"] = len(self._queue)
        c["outstanding"] = len(self._gaps)
        c["outstanding_messages"] = sum(_size(g.missing) for g in self._gaps)
        self._snapshot = dict(c)  # what counters() shows: consistent, between iterations
        sh = self._shared
        if sh is None:
            return
        sh[R_ALIVE_NS] = time.monotonic_ns() if now is None else now
        sh[R_COUNTERS : R_COUNTERS + len(COUNTERS)] = [c[k] for k in COUNTERS]

    # --- reading ------------------------------------------------------------------------------
    def counters(self) -> dict[str, int]:
        """The counters (``COUNTERS``) as of the end of the last iteration."""
        return dict(self._snapshot)

    def latency(self) -> dict:
        """Detection-to-filled latency of filled gaps: p50/p99/p99.9 (ns) and count."""
        return shm.percentiles(np.array(self._hist))

    def status(self) -> dict:
        """The same shape as ``read_shared``."""
        hist = np.array(self._hist)
        return {
            "running": self._thread is not None and self.error is None,
            "alive_ns": time.monotonic_ns(),
            "policy": self.cfg.policy,
            "counters": self.counters(),
            "latency_ns": shm.percentiles(hist),
            "histogram": hist,
        }


# --- metrics ------------------------------------------------------------------------------------
def metric_families(channel: str, st: dict) -> Iterator:
    """Prometheus families for a ``status()`` / ``read_shared()`` dict (for a collector)."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    from host.appliance.metrics import latency_histogram

    c = st["counters"]
    ch = channel
    f = CounterMetricFamily(
        "tickwire_recovery_gaps", "Gaps by lifecycle event", labels=["channel", "stage"]
    )
    for ev in ("detected", "coalesced", "filled", "unrecoverable"):
        f.add_metric([ch, ev], float(c[ev]))
    yield f
    f = CounterMetricFamily(
        "tickwire_recovery_messages",
        "Sequences recovered or given up",
        labels=["channel", "outcome"],
    )
    f.add_metric([ch, "recovered"], float(c["messages_recovered"]))
    f.add_metric([ch, "lost_retries"], float(c["lost_by_retries"]))
    f.add_metric([ch, "lost_slo"], float(c["lost_by_slo"]))
    yield f
    for name, key, doc in (
        ("requests", "requested", "Re-request packets sent"),
        ("retries", "retries", "Re-requests sent after a timeout"),
        ("answers", "answers", "Answer packets accepted"),
        ("send_errors", "send_errors", "Re-requests the kernel refused"),
        ("ring_full", "ring_full", "Times the consumer's ring was full"),
    ):
        f = CounterMetricFamily(f"tickwire_recovery_{name}", doc, labels=["channel"])
        f.add_metric([ch], float(c[key]))
        yield f
    f = CounterMetricFamily(
        "tickwire_recovery_rejected_answers",
        "Answer packets rejected",
        labels=["channel", "reason"],
    )
    for r in ("other_session", "malformed", "unrequested", "duplicate"):
        f.add_metric([ch, r], float(c[f"rejected_{r}"]))
    yield f
    for name, key, doc in (
        ("outstanding_gaps", "outstanding", "Gaps not finished"),
        ("missing_messages", "outstanding_messages", "Sequences missing"),
        ("held_entries", "held", "Entries waiting for ring room"),
    ):
        g = GaugeMetricFamily(f"tickwire_recovery_{name}", doc, labels=["channel"])
        g.add_metric([ch], float(c[key]))
        yield g
    g = GaugeMetricFamily(
        "tickwire_recovery_policy_halt",
        "Unrecoverable-gap policy: 1 halt, 0 stale",
        labels=["channel"],
    )
    g.add_metric([ch], float(st["policy"] == "halt"))
    yield g
    yield latency_histogram(
        "tickwire_recovery_latency_seconds",
        "Gap detected to completely filled",
        ch,
        st["histogram"],
    )
