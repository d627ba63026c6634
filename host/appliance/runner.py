"""``tickwire run``: the appliance process tree for one channel.

The parent (control plane) preflights, enters the configured network namespace, joins the
lines' multicast groups, attaches the XDP steering program (AF_XDP mode), creates the
shared memory, then forks the consumer and serves metrics until told to stop. The
consumer child pins itself to its core, opens its receive path -- one AF_XDP socket per
line on (interface, queue), registered in the program's XSKMAP, or kernel UDP sockets --
and runs the numba loop, returning to Python only to grow the book, answer a snapshot
request or stop. On SIGTERM/SIGINT (or at the end of session with ``until_eos``) the
parent asks the consumer to stop through shared memory, waits for its final report
(``final.json``: digest, counters), detaches XDP and exits; every exit path detaches.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import sys
import threading
import time
import traceback
from pathlib import Path

import numpy as np

from dataplane import shm
from host import netns
from host.config import Config, RunConfig

SO_RCVBUFFORCE = 33


class RunError(OSError):
    """The appliance cannot start or run; the message says why and what to do."""


def _log(msg: str) -> None:
    print(f"tickwire run: {msg}", file=sys.stderr, flush=True)


# --- preflight --------------------------------------------------------------------------------
def _check_interfaces(run: RunConfig) -> None:
    for letter, line in run.lines.items():
        try:  # not /sys/class/net: sysfs shows the namespace it was mounted in
            socket.if_nametoindex(line.interface)
        except OSError:
            raise RunError(errno.ENODEV, f"line {letter}: interface {line.interface} does "
                           f"not exist{' in ' + run.netns if run.netns else ''}") from None


# --- receive paths ----------------------------------------------------------------------------
def join_socket(line, bind: bool) -> socket.socket:
    """A UDP socket joined to the line's group on its interface (IGMP); bound to the group
    and port when it is also the receive socket."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if bind:
        s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 32 << 20)
        s.bind((line.group, line.port))
        s.setblocking(False)
    addr = line.address or "0.0.0.0"
    mreq = socket.inet_aton(line.group) + socket.inet_aton(addr)
    try:
        s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
    except OSError as e:
        s.close()
        raise RunError(e.errno, f"cannot join {line.group} on {line.interface} ({addr}): "
                       f"{e.strerror}") from None  # fmt: skip
    return s


def _compiled(dispatcher) -> bool:
    """Whether ``dispatcher`` compiled its code in this process rather than loading it from
    numba's cache (no cache at all counts as compiled)."""
    st = dispatcher.stats
    return bool(sum(st.cache_misses.values()) or not st.cache_hits)


def _loop_state(cfg: Config, maps: dict, book):
    """The consumer loops' ``arb`` tuple and a function building their ``bk_`` tuple (again
    after every growth of the book)."""
    from dataplane import arbiter

    hold_buf, hold_meta = arbiter.new_hold(cfg.run.hold_slots)
    arb = (maps["counters"], hold_buf, hold_meta, maps["gaps"], maps["control"], maps["recov"],
           maps["recov_meta"])  # fmt: skip
    touched = np.zeros(256, np.int64)

    def bk_():
        return (*book._state(), maps["bbo"], touched, maps["latency"])

    return arb, bk_


def _drive(cfg: Config, maps: dict, book, loop, dispatcher) -> str:
    """Run ``loop(arb, bk_, budget_ns)`` (a consumer loop bound to its receive path, which
    calls the numba ``dispatcher``) until it stops: grow the book when it asks, answer
    snapshots, keep the liveness stamp. Returns "stopped" or "halted"."""
    from dataplane import consumer as cs

    ctr, control = maps["counters"], maps["control"]
    arb, bk_ = _loop_state(cfg, maps, book)
    first, t0 = True, time.monotonic_ns()
    while True:
        status, need = loop(arb, bk_(), 0 if first else 50_000_000)
        if first:  # compiled now: only from here on is the consumer keeping up
            ctr[shm.S_START_NS] = time.monotonic_ns() - t0
            cached = not _compiled(dispatcher)
            ctr[shm.S_START_HOW] = shm.START_CACHED if cached else shm.START_COMPILED
            ctr[shm.S_RUNNING] = 1
            first = False
        if need:
            book._grow(need)
        elif status == cs.STOPPED:
            return "stopped"
        elif status == cs.HALTED:
            return "halted"
        elif status == cs.SNAPSHOT:
            cs.snapshot(book.sides, book.ladder, book.levels, maps["levels"], control)
        ctr[shm.S_ALIVE_NS] = time.monotonic_ns()


def _consumer_socket(cfg: Config, maps: dict, book, session: np.ndarray) -> str:
    from dataplane import consumer as cs

    run = cfg.run
    socks = [join_socket(line, bind=True) for line in run.lines.values()]
    fds = np.array([s.fileno() for s in socks], np.int64)
    rbuf, _iov, mm = cs.socket_buffers(run.batch)
    pstate = np.zeros(cs.PSTATE_LEN, np.int64)
    ts = np.zeros(2, np.int64)
    maps["counters"][shm.S_MODE] = shm.MODE_SOCKET
    try:
        loop = lambda arb, bk_, budget: cs.socket_loop(  # noqa: E731
            fds, mm, rbuf, pstate, budget, session, arb, bk_, ts)  # fmt: skip
        return _drive(cfg, maps, book, loop, cs.socket_loop)
    finally:
        maps["counters"][shm.S_RUNNING] = 0
        for s in socks:
            s.close()


def _consumer_xdp(cfg: Config, maps: dict, book, session: np.ndarray, map_fd: int,
                  slots: list[int]) -> str:  # fmt: skip
    from dataplane import consumer as cs
    from dataplane import xsk

    run = cfg.run
    socks = []
    try:
        for line, slot in zip(run.lines.values(), slots, strict=True):
            s = xsk.XskSocket(line.interface, line.queue, frames=run.frames,
                              rx_size=run.ring_size, fill_size=run.ring_size,
                              comp_size=64, rx_batch=run.batch)  # fmt: skip
            socks.append(s)
            s.register(map_fd, key=slot)
        if any(not s.umem.hugepages for s in socks):
            _log("UMEM in normal pages (no free 2 MiB hugepages)")
        ri = np.stack([s.ring_info for s in socks])
        umems = [s.umem.array for s in socks]
        maps["counters"][shm.S_MODE] = shm.MODE_XDP
        pstate = np.zeros(cs.PSTATE_LEN, np.int64)
        pend = np.zeros((run.batch, cs.X_COLS), np.int64)
        ts = np.zeros(2, np.int64)
        loop = lambda arb, bk_, budget: cs.xdp_loop(  # noqa: E731
            ri, umems[0], umems[1], pstate, pend, budget, session, arb, bk_, ts)  # fmt: skip
        return _drive(cfg, maps, book, loop, cs.xdp_loop)
    finally:
        maps["counters"][shm.S_RUNNING] = 0
        for s in socks:
            s.close()


def warm_consumer(cfg: Config, modes: tuple[str, ...] = ("xdp", "socket"), log=None) -> dict:
    """Compile the consumer loops of ``modes`` into numba's cache (``NUMBA_CACHE_DIR``) for
    this configuration, without a network or a feed: the next ``tickwire run`` on this host
    loads them in a second instead of compiling for about a minute. The argument types are
    built as a run builds them, so the cache entry is the one a run looks up. Returns
    ``{mode: {"seconds", "how"}}`` ("compiled", or "cache" when it was warm already)."""
    import shutil
    import tempfile

    from numba import typeof

    from dataplane import consumer as cs
    from dataplane import moldudp64 as mold
    from dataplane import xsk
    from dataplane.book import Book

    run = cfg.run
    root = Path(tempfile.mkdtemp(prefix="tickwire-warm"))
    out = {}
    try:
        maps = shm.create("warm", root=root)
        book = Book.for_capacity(run.orders, counters=maps["counters"][shm.BOOK_BASE :])
        session = np.frombuffer(mold.session_bytes(cfg.feed.session), np.uint8).copy()
        arb, bk_ = _loop_state(cfg, maps, book)
        pstate, ts = np.zeros(cs.PSTATE_LEN, np.int64), np.zeros(2, np.int64)
        for mode in modes:
            if mode == "xdp":  # the shapes of two sockets' ring info and UMEM (see xsk)
                ri = np.zeros((2, xsk.RI_LEN), np.int64)
                umem = np.zeros(64, np.uint8)
                pend = np.zeros((run.batch, cs.X_COLS), np.int64)
                disp, args = cs.xdp_loop, (ri, umem, umem, pstate, pend, 0, session, arb, bk_(), ts)
            else:
                rbuf, _iov, mm = cs.socket_buffers(run.batch)
                fds = np.zeros(2, np.int64)
                disp, args = cs.socket_loop, (fds, mm, rbuf, pstate, 0, session, arb, bk_(), ts)
            if log:
                log(f"{mode} consumer: compiling (about a minute unless cached)")
            t0 = time.monotonic()
            disp.compile(tuple(typeof(a) for a in args))
            how = "compiled" if _compiled(disp) else "cache"
            out[mode] = {"seconds": time.monotonic() - t0, "how": how}
            if log:
                log(f"{mode} consumer: {how} in {out[mode]['seconds']:.1f} s")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return out


def _child(cfg: Config, mode: str, map_fd: int, maps: dict, slots: list[int]) -> int:
    """The consumer process: pin, receive, book; write final.json; never returns."""
    from dataplane import moldudp64 as mold
    from dataplane.book import Book

    run = cfg.run
    cdir = shm.channel_dir(run.channel)
    code = 0
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if run.core >= 0:
            os.sched_setaffinity(0, {run.core})
        maps["counters"][shm.S_PID] = os.getpid()
        maps["counters"][shm.S_CPU] = run.core
        book = Book.for_capacity(run.orders, counters=maps["counters"][shm.BOOK_BASE :])
        session = np.frombuffer(mold.session_bytes(cfg.feed.session), np.uint8).copy()
        if mode == "xdp":
            how = _consumer_xdp(cfg, maps, book, session, map_fd, slots)
        else:
            how = _consumer_socket(cfg, maps, book, session)
        final = {"ended": how, "digest": book.digest(), "live_orders": book.live_orders,
                 "check": book.check(allow_crossed=True),
                 "stocks": len(book.stocks_summary())}  # fmt: skip
        (cdir / "final.json").write_text(json.dumps(final))
    except BaseException as e:  # noqa: BLE001 - reported to the parent, then exit
        code = 1
        (cdir / "error.txt").write_text(f"{type(e).__name__}: {e}\n{traceback.format_exc()}")
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def xdp_stats(steering) -> dict:
    """The steering program's counters as ``{"lines": {letter: {packets, bytes}},
    "passed": {reason: n}, "redirected": n}`` (JSON- and metrics-ready)."""
    st = steering.stats()
    lines = {letter: dict(v) for (_ch, letter), v in st.get("channels", {}).items()}
    passed = {k: int(v) for k, v in st.items() if k not in ("channels", "redirected")}
    return {"lines": lines, "passed": passed, "redirected": int(st.get("redirected", 0))}


def wait_consumer(channel: str, proc, timeout: float = 120.0) -> shm.Reader:
    """Wait until the consumer of ``channel`` -- started by ``proc``, a ``tickwire run``
    subprocess -- is running (compiled, keeping up); returns a reader on it. Raises
    ``RunError`` when ``proc`` exits first or the timeout passes."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            reader = shm.Reader(channel)
            if reader.counters()["running"]:
                return reader
        except FileNotFoundError:
            pass
        if proc.poll() is not None:
            why = proc.stderr.read().strip() if proc.stderr else ""
            raise RunError(errno.EIO, f"tickwire run exited: {why}")
        if time.monotonic() > deadline:
            raise RunError(errno.ETIMEDOUT, f"the consumer did not start within {timeout:g} s")
        time.sleep(0.02)


class NoRecovery:
    """No re-request server configured: every declared gap is unrecoverable at once."""

    def __init__(self, maps: dict):
        self.maps = maps
        self._stop = threading.Event()
        self.lost = 0
        self._t = threading.Thread(target=self._run, daemon=True, name="no-recovery")
        self._t.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            gap = shm.gap_pop(self.maps)
            if gap is None:
                time.sleep(0.001)
                continue
            first, count, _ = gap
            while not shm.rec_push(self.maps, shm.REC_LOST, first, count):
                time.sleep(0.001)
            self.lost += 1

    def stop(self) -> None:
        self._stop.set()
        self._t.join()

    def counters(self) -> dict:
        return {"detected": self.lost, "unrecoverable": self.lost, "server": None}

    def latency(self) -> dict:
        return {}


def start_recovery(cfg: Config, maps: dict, log):
    """The recovery client for ``run.recovery`` (or ``NoRecovery``), started."""
    run = cfg.run
    if not run.recovery:
        log("no re-request server configured: gaps are unrecoverable (run.recovery)")
        return NoRecovery(maps)
    from host.appliance import recovery

    host, _, port = run.recovery.rpartition(":")
    rc = recovery.RecoveryConfig(
        server_host=host, server_port=int(port), session=cfg.feed.session,
        max_per_request=run.recovery_max_messages,
        min_interval=run.recovery_interval_ms / 1e3, timeout=run.recovery_timeout_ms / 1e3,
        retries=run.recovery_retries, slo=run.recovery_slo_ms / 1e3, policy=run.policy,
    )  # fmt: skip
    client = recovery.RecoveryClient(rc, maps, log=log, shared=maps["recovery"])
    client.start()
    log(f"recovery from {run.recovery}")
    return client


class Appliance:
    """Run one channel until stopped; ``run()`` returns the summary."""

    def __init__(self, cfg: Config, log=_log):
        self.cfg = cfg
        self.log = log
        self._stop = False
        self.mode = None
        self.steering = None
        self.recovery = None

    def stop(self, *_args) -> None:
        self._stop = True

    def _choose_mode(self) -> str:
        run = self.cfg.run
        if run.rx_mode == "socket":
            return "socket"
        try:
            from host.appliance import loader

            channels = [(line.group, line.port, 0, letter) for letter, line in run.lines.items()]
            ifaces = sorted({line.interface for line in run.lines.values()})
            self.steering = loader.Steering(ifaces, channels, mode=run.xdp_mode, log=self.log)
            self.steering.__enter__()
            import dataplane.xsk  # noqa: F401 - fail here, not in the child
            return "xdp"
        except Exception as e:  # noqa: BLE001 - auto falls back, xdp reports
            if self.steering is not None:
                self.steering.__exit__(None, None, None)
                self.steering = None
            if run.rx_mode == "xdp":
                raise RunError(getattr(e, "errno", None) or errno.EOPNOTSUPP,
                               f"AF_XDP receive path unavailable: {e}") from None  # fmt: skip
            self.log(f"AF_XDP unavailable ({e}); receiving with kernel UDP sockets")
            return "socket"

    def run(self, until_eos: bool = False, eos_grace: float = 2.0, duration: float | None = None,
            ready=None) -> dict:  # fmt: skip
        # what the host must offer (capabilities, not root; namespace, interfaces, core) is
        # host.appliance.preflight's runtime stage, which `tickwire run` checks before it gets here;
        # entering the namespace and finding the interfaces still fail with one clear line
        cfg, run = self.cfg, self.cfg.run
        if run.netns:
            netns.enter(run.netns)
        _check_interfaces(run)
        cdir = shm.channel_dir(run.channel)
        maps = shm.create(run.channel)
        for name in ("final.json", "error.txt"):
            (cdir / name).unlink(missing_ok=True)
        maps["counters"][shm.A_NEXT] = 1
        ctl = maps["control"]
        ctl[shm.C_WINDOW_NS] = int(run.window_ms * 1e6)
        ctl[shm.C_WINDOW_MSGS] = run.window_messages
        ctl[shm.C_POLICY] = shm.POLICY_HALT if run.policy == "halt" else shm.POLICY_STALE
        joins: list[socket.socket] = []
        server = None
        pid = 0
        t0 = time.monotonic()
        try:
            self.mode = self._choose_mode()
            if self.steering is not None and threading.current_thread() is threading.main_thread():
                # The loader's handlers would detach at the signal; we stop the consumer
                # first and detach in the finally below (keeping the final XDP counters).
                # Its atexit hook still covers an exit that never reaches the finally.
                signal.signal(signal.SIGTERM, self.stop)
                signal.signal(signal.SIGINT, self.stop)
            if self.mode == "xdp":
                joins = [join_socket(line, bind=False) for line in run.lines.values()]
                map_fd = self.steering.xsks_map_fd
                slots = [self.steering.xsk_slot(line.interface, line.queue)
                         for line in run.lines.values()]  # fmt: skip
            else:
                map_fd, slots = -1, []
            pid = os.fork()
            if pid == 0:
                _child(cfg, self.mode, map_fd, maps, slots)
            where = f"core {run.core}" if run.core >= 0 else "any core"
            ifs = ", ".join(f"{k}={v.interface}" for k, v in run.lines.items())
            self.log(f"consumer pid {pid} on {where}, {self.mode} mode, lines {ifs}")
            if run.metrics:
                from host.appliance import metrics

                stats = None
                if self.steering is not None:
                    steering = self.steering
                    stats = lambda: xdp_stats(steering)  # noqa: E731
                def rec():
                    r = self.recovery
                    return r.status() if r is not None and hasattr(r, "status") else None

                server = metrics.serve(run.metrics, metrics.ConsumerCollector(
                    run.channel, maps, stats, recovery=rec))  # fmt: skip
                self.log(f"metrics on http://{run.metrics}/metrics"
                         + (f" (in {run.netns})" if run.netns else ""))  # fmt: skip
            try:
                self._wait_running(maps, pid)
                self.recovery = start_recovery(cfg, maps, self.log)
            except RunError:
                pid = 0  # reaped, or killed by _wait_running's caller below
                raise
            if ready is not None:
                ready()
            eos_at = None
            from host.appliance.linehealth import LineHealth

            health, next_health, heard = LineHealth(), 0.0, set()
            while not self._stop:
                if time.monotonic() >= next_health:  # line health changes, logged
                    next_health = time.monotonic() + 0.1
                    for letter, h in health.observe(maps["counters"]).items():
                        if h["changed"] and (h["state"] != "up" or letter in heard):
                            self.log(f"line {letter}: {h['state']}")
                        if h["state"] == "up":
                            heard.add(letter)
                done, _ = os.waitpid(pid, os.WNOHANG)
                if done:
                    pid = 0
                    break
                c = maps["counters"]
                if until_eos and c[shm.A_END_SEQ] > 0:
                    eos_at = eos_at or time.monotonic()
                    if c[shm.A_NEXT] >= c[shm.A_END_SEQ] or time.monotonic() - eos_at > eos_grace:
                        break
                if duration is not None and time.monotonic() - t0 >= duration:
                    break
                time.sleep(0.02)
            maps["control"][shm.C_STOP] = 1
            if pid:
                self._reap(pid)
                pid = 0
        finally:
            if pid:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            maps["counters"][shm.S_RUNNING] = 0  # whatever happened to the consumer
            if getattr(self, "recovery", None) is not None:
                self.recovery.stop()
            if server is not None:
                server.shutdown()
            for s in joins:
                s.close()
            if self.steering is not None:
                try:
                    self.xdp_stats = xdp_stats(self.steering)
                except Exception:  # noqa: BLE001 - a signal may have detached it already
                    self.xdp_stats = None
                self.steering.__exit__(None, None, None)
        return self._summary(maps, cdir, time.monotonic() - t0)

    def _wait_running(self, maps, pid: int) -> None:
        """Wait for the consumer loop to come up: loaded from numba's cache it takes a
        second or two; with a cold cache (a fresh install, a new CPU) it is compiled, which
        takes about a minute, reported as it goes. Past ``run.start_timeout_s`` it is
        killed."""
        timeout = self.cfg.run.start_timeout_s
        t0 = time.monotonic()
        deadline, next_note = t0 + timeout, t0 + 10.0
        cdir = shm.channel_dir(self.cfg.run.channel)
        ctr = maps["counters"]
        while not ctr[shm.S_RUNNING]:
            done, _ = os.waitpid(pid, os.WNOHANG)
            if done:
                err = cdir / "error.txt"
                why = err.read_text().splitlines()[0] if err.exists() else "no report"
                raise RunError(errno.EIO, f"the consumer failed to start: {why}")
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                raise RunError(errno.ETIMEDOUT, f"the consumer did not start within {timeout:g} s "
                               "(run.start_timeout_s)")  # fmt: skip
            now = time.monotonic()
            if now >= next_note:
                cache = os.environ.get("NUMBA_CACHE_DIR", "numba's default cache")
                self.log(f"consumer still starting after {now - t0:.0f} s (compiling: nothing "
                         f"usable in {cache} yet)")  # fmt: skip
                next_note = now + 15.0
            time.sleep(0.01)
        how = "compiled" if ctr[shm.S_START_HOW] == shm.START_COMPILED else "from numba's cache"
        self.log(f"consumer running after {ctr[shm.S_START_NS] / 1e9:.1f} s ({how})")

    def _reap(self, pid: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            done, _ = os.waitpid(pid, os.WNOHANG)
            if done:
                return
            time.sleep(0.01)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise RunError(errno.ETIMEDOUT, "the consumer did not stop within 30 s (killed)")

    def _summary(self, maps, cdir: Path, seconds: float) -> dict:
        reader = shm.Reader(self.cfg.run.channel, maps=maps)
        out = {"channel": self.cfg.run.channel, "mode": self.mode, "seconds": seconds,
               **reader.counters(), "latency_ns": reader.latency()}  # fmt: skip
        err = cdir / "error.txt"
        if err.exists():
            raise RunError(errno.EIO, f"the consumer failed: {err.read_text().splitlines()[0]}")
        final = cdir / "final.json"
        if final.exists():
            out.update(json.loads(final.read_text()))
        if getattr(self, "xdp_stats", None):
            out["xdp"] = self.xdp_stats
        if getattr(self, "recovery", None) is not None:
            out["recovery"] = self.recovery.counters()
            out["recovery_latency_ns"] = self.recovery.latency()
        return out


def summary_text(s: dict) -> str:
    lines = [f"channel {s['channel']} ({s['mode']}): {s['taken']:,} messages taken, next "
             f"sequence {s['next_seq']:,}, {s['seconds']:.1f} s"]  # fmt: skip
    lines.append(f"  gaps: {s['gaps_declared']:,} declared ({s['gap_declared_messages']:,} "
                 f"messages), {s['lost_events']:,} unrecoverable ({s['gap_messages']:,} "
                 f"messages skipped){'; BOOKS STALE' if s['stale'] else ''}"
                 f"{'; HALTED' if s['halted'] else ''}")  # fmt: skip
    for letter, ln in s["lines"].items():
        if letter == "recovery" and not ln["packets"]:
            continue
        lines.append(f"  line {letter}: {ln['packets']:,} packets, {ln['messages']:,} messages, "
                     f"{ln['first']:,} first, {ln['duplicates']:,} duplicates dropped, "
                     f"{ln['malformed']:,} malformed")  # fmt: skip
    lat = s["latency_ns"]
    if lat.get("count"):
        lines.append(f"  receive to book: p50 {lat['p50'] / 1e3:.1f} us, p99 "
                     f"{lat['p99'] / 1e3:.1f} us, p99.9 {lat['p99.9'] / 1e3:.1f} us "
                     f"({lat['count']:,} packets)")  # fmt: skip
    if "digest" in s:
        lines.append(f"  book: {s['live_orders']:,} live orders, {s['stocks']:,} stocks, "
                     f"digest {s['digest'][:16]}…")  # fmt: skip
    return "\n".join(lines)
