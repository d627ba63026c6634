"""``tickwire run``: the appliance process tree, for one channel or several.

The parent (control plane) preflights, enters the configured network namespace, joins the
lines' multicast groups, attaches the XDP steering program (AF_XDP mode), creates the
shared memory, then forks the consumer and serves metrics until told to stop. The
consumer child pins itself to its core, opens its receive path -- one AF_XDP socket per
line on (interface, queue), registered in the program's XSKMAP, or kernel UDP sockets --
and runs the numba loop, returning to Python only to grow the book, answer a snapshot
request or stop. On SIGTERM/SIGINT (or at the end of session with ``until_eos``) the
parent asks the consumer to stop through shared memory, waits for its final report
(``final.json``: digest, counters), detaches XDP and exits; every exit path detaches.

With ``[[channel]]`` tables (``host.config.channel_configs``) one parent supervises every
channel: one steering program over every channel's interfaces with every channel's
(group, port) entries (channel id = the table's index), and per channel its shared
memory, its consumer (pinned to its core, its sockets on its queues) and its recovery
client; one metrics endpoint (``metrics.Merged``: each family once, a ``channel`` label
per series). A consumer that dies is an error naming its channel; ``until_eos`` waits
for every channel. The summary of one channel is as it always was; of several,
``{"channels": {name: summary}}``.
"""

from __future__ import annotations

import contextlib
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

from dataplane import events, msgring, shm, sysabi
from host import netns, signals
from host.config import (
    Config,
    RunConfig,
    channel_configs,
    check_cores,
    host_port,
    require_lines,
)


class RunError(OSError):
    """The appliance cannot start or run; the message says why and what to do."""

    def __str__(self) -> str:  # the message, without "[Errno N]" before it
        return self.strerror if self.errno is not None and self.strerror else super().__str__()


def log(msg: str) -> None:
    """The appliance's log line (stderr, ``tickwire run: ...``)."""
    print(f"tickwire run: {msg}", file=sys.stderr, flush=True)


# --- preflight --------------------------------------------------------------------------------
def _check_interfaces(run: RunConfig) -> None:
    for letter, line in run.lines.items():
        try:  # not /sys/class/net: sysfs shows the namespace it was mounted in
            socket.if_nametoindex(line.interface)
        except OSError:
            raise RunError(
                errno.ENODEV,
                f"line {letter}: interface {line.interface} does "
                f"not exist{' in ' + run.netns if run.netns else ''}",
            ) from None


# --- receive paths ----------------------------------------------------------------------------
def join_socket(line, bind: bool) -> socket.socket:
    """A UDP socket joined to the line's group on its interface (IGMP); bound to the group
    and port when it is also the receive socket."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if bind:
        s.setsockopt(socket.SOL_SOCKET, sysabi.SO_RCVBUFFORCE, 32 << 20)
        # the kernel's software receive stamp on every datagram (the consumer's rx stamp)
        s.setsockopt(
            socket.SOL_SOCKET,
            sysabi.SO_TIMESTAMPING,
            sysabi.SOF_TIMESTAMPING_RX_SOFTWARE | sysabi.SOF_TIMESTAMPING_SOFTWARE,
        )
        s.bind((line.group, line.port))
        s.setblocking(False)
    addr = line.address or "0.0.0.0"
    mreq = socket.inet_aton(line.group) + socket.inet_aton(addr)
    try:
        s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
    except OSError as e:
        s.close()
        raise RunError(
            e.errno, f"cannot join {line.group} on {line.interface} ({addr}): {e.strerror}"
        ) from None
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
    arb = (
        maps["counters"],
        hold_buf,
        hold_meta,
        maps["gaps"],
        maps["control"],
        maps["recov"],
        maps["recov_meta"],
    )
    touched = np.zeros(256, np.int64)
    ring = maps["ring"] if "ring" in maps else events.Ring.off()
    msgs = maps["msgs"] if "msgs" in maps else msgring.off()
    # map the ring's pages into this process now (a fork inherits the mapping, not its page
    # table entries): the first lap must not take a fault per page; nothing reads it yet
    pages = ring[0].view(np.uint8)[::4096]
    pages[:] = pages.copy()

    def bk_():
        return (*book.arrays(), maps["bbo"], touched, maps["latency"], *ring, *msgs)

    return arb, bk_


def _drive(cfg: Config, maps: dict, book, loop, dispatcher) -> str:
    """Run ``loop(arb, bk_, budget_ns)`` (a consumer loop bound to its receive path, which
    calls the numba ``dispatcher``) until it stops: grow the book when it asks, answer
    snapshots (the levels for readers; the whole book, forked, with ``[snapshot]``), keep
    the liveness stamp. Returns "stopped" or "halted". First the books begin: empty,
    restored or joined (``restart.begin``; the sockets are open, so what the feed sends
    meanwhile waits in their receive rings)."""
    from host.appliance import restart

    restart.begin(cfg, maps, book, log)
    arb, bk_ = _loop_state(cfg, maps, book)
    taker = None
    if cfg.snapshot.enabled:
        from host.appliance import snapshot

        taker = snapshot.Taker(cfg.run.channel, cfg.feed.session, cfg.snapshot, maps)
    try:
        return _drive_loop(maps, book, loop, dispatcher, arb, bk_, taker)
    finally:
        if taker is not None:
            taker.finish()


def _drive_loop(maps: dict, book, loop, dispatcher, arb, bk_, taker) -> str:
    from dataplane import consumer as cs

    ctr, control = maps["counters"], maps["control"]
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
            book.grow(need)
        elif status == cs.STOPPED:
            return "stopped"
        elif status == cs.HALTED:
            return "halted"
        elif status == cs.SNAPSHOT:
            cs.snapshot(
                book.sides,
                book.ladder,
                book.levels,
                book.stocks,
                maps["levels"],
                maps["stocks"],
                control,
                ctr,
                bk_()[12],
            )
        if taker is not None and not need:
            taker.poll(book)  # between packets: every message up to A_NEXT - 1 is in
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
            fds, mm, rbuf, pstate, budget, session, arb, bk_, ts
        )
        return _drive(cfg, maps, book, loop, cs.socket_loop)
    finally:
        maps["counters"][shm.S_RUNNING] = 0
        for s in socks:
            s.close()


def _consumer_xdp(
    cfg: Config, maps: dict, book, session: np.ndarray, map_fd: int, slots: list[int]
) -> str:
    from dataplane import consumer as cs
    from dataplane import xsk

    run = cfg.run
    socks = []
    try:
        for line, slot in zip(run.lines.values(), slots, strict=True):
            s = xsk.XskSocket(
                line.interface,
                line.queue,
                frames=run.frames,
                rx_size=run.ring_size,
                fill_size=run.ring_size,
                comp_size=64,
                rx_batch=run.batch,
            )
            socks.append(s)
            s.register(map_fd, key=slot)
        if any(not s.umem.hugepages for s in socks):
            log("UMEM in normal pages (no free 2 MiB hugepages)")
        ri = np.stack([s.ring_info for s in socks])
        umems = [s.umem.array for s in socks]
        maps["counters"][shm.S_MODE] = shm.MODE_XDP
        pstate = np.zeros(cs.PSTATE_LEN, np.int64)
        pend = np.zeros((run.batch, cs.X_COLS), np.int64)
        ts = np.zeros(2, np.int64)
        loop = lambda arb, bk_, budget: cs.xdp_loop(  # noqa: E731
            ri, umems[0], umems[1], pstate, pend, budget, session, arb, bk_, ts
        )
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
        final = {
            "ended": how,
            "digest": book.digest(),
            "live_orders": book.live_orders,
            "check": book.check(allow_crossed=True),
            "stocks": len(book.stocks_summary()),
        }
        (cdir / "final.json").write_text(json.dumps(final))
    except BaseException as e:  # noqa: BLE001 - reported to the parent, then exit
        code = 1
        (cdir / "error.txt").write_text(f"{type(e).__name__}: {e}\n{traceback.format_exc()}")
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def xdp_stats(steering, channel: int = 0, shared: bool = True) -> dict:
    """The steering program's counters for channel id ``channel`` as ``{"lines": {letter:
    {packets, bytes}}, "passed": {reason: n}, "redirected": n}`` (JSON- and metrics-ready);
    the program-wide ``passed`` and ``redirected`` only when ``shared``."""
    st = steering.stats()
    lines = {letter: dict(v) for (ch, letter), v in st.get("channels", {}).items() if ch == channel}
    if not shared:
        return {"lines": lines}
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

    host, port = host_port(run.recovery, "run.recovery")
    rc = recovery.RecoveryConfig(
        server_host=host,
        server_port=port,
        session=cfg.feed.session,
        max_per_request=run.recovery_max_messages,
        min_interval=run.recovery_interval_ms / 1e3,
        timeout=run.recovery_timeout_ms / 1e3,
        retries=run.recovery_retries,
        slo=run.recovery_slo_ms / 1e3,
        policy=run.policy,
    )
    client = recovery.RecoveryClient(rc, maps, log=log, shared=maps["recovery"])
    client.start()
    log(f"recovery from {run.recovery}")
    return client


class _Consumer:
    """The forked consumer process; ``pid`` is 0 once it is reaped (``status``: how it
    ended, as ``os.waitpid`` says)."""

    def __init__(self, pid: int):
        self.pid = pid
        self.status: int | None = None

    def exited(self) -> bool:
        """Whether it has exited (reaped here if it just did)."""
        if self.pid:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.pid, self.status = 0, status
        return not self.pid

    def kill(self) -> None:
        if self.pid:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
            self.pid = 0


def _create_channel(cfg: Config) -> dict:
    """The channel's shared memory, reset for a run: no report of an earlier consumer, the
    next sequence 1, the arbitration window and the gap policy in the control block."""
    run = cfg.run
    maps = shm.create(run.channel)
    for name in ("final.json", "error.txt", "start.json"):
        (shm.channel_dir(run.channel) / name).unlink(missing_ok=True)
    maps["counters"][shm.A_NEXT] = 1
    ctl = maps["control"]
    ctl[shm.C_WINDOW_NS] = int(run.window_ms * 1e6)
    ctl[shm.C_WINDOW_MSGS] = run.window_messages
    ctl[shm.C_POLICY] = shm.POLICY_HALT if run.policy == "halt" else shm.POLICY_STALE
    # events off: a minimal ring whose header says so (a reader gets that, not an old ring)
    maps["ring"] = events.Ring.create(
        run.channel,
        run.event_slots if run.events else events.MIN_SLOTS,
        order_events=run.order_events,
        on=run.events,
        base_seq=-1,  # the consumer says where its books begin (host.appliance.restart)
    ).arrays()
    j = cfg.journal
    maps["msgs"] = msgring.create(run.channel, j.ring_mb << 20, on=j.enabled)
    return maps


class _Channel:
    """One channel under the supervisor: its configuration (a one-channel Config), its
    steering id (``index``) and, once running, its shared memory, consumer and recovery."""

    def __init__(self, index: int, cfg: Config, log, several: bool):
        self.index = index
        self.cfg = cfg
        self.run = cfg.run
        self.name = cfg.run.channel
        self.log = (lambda msg: log(f"channel {self.name}: {msg}")) if several else log
        self.who = f"channel {self.name}: " if several else ""
        self.maps: dict = {}
        self.consumer: _Consumer | None = None
        self.recovery = None
        self.xdp_stats: dict | None = None
        self.eos_at: float | None = None
        self.journal = None  # the journal writer's process

    @property
    def cdir(self) -> Path:
        return shm.channel_dir(self.name)

    def eos_reached(self, grace: float) -> bool:
        """The end of session seen and every sequence taken (or ``grace`` s past it)."""
        c = self.maps["counters"]
        if c[shm.A_END_SEQ] <= 0:
            return False
        self.eos_at = self.eos_at or time.monotonic()
        return c[shm.A_NEXT] >= c[shm.A_END_SEQ] or time.monotonic() - self.eos_at > grace


class Appliance:
    """Run the channels of ``cfg`` (one, or its ``[[channel]]`` tables) until stopped;
    ``run()`` returns the summary."""

    def __init__(self, cfg: Config, log=log):
        self.cfg = cfg
        self.log = log
        self._stop = False
        self.mode = None
        self.steering = None
        cfgs = channel_configs(cfg)
        self.channels = [_Channel(i, c, log, len(cfgs) > 1) for i, c in enumerate(cfgs)]
        self.several = len(self.channels) > 1

    @property
    def recovery(self):
        """The (first) channel's recovery client."""
        return self.channels[0].recovery

    def stop(self) -> None:
        """Ask ``run()`` to stop the consumers and return (SIGTERM and SIGINT call it)."""
        self._stop = True

    def run(
        self,
        until_eos: bool = False,
        eos_grace: float = 2.0,
        duration: float | None = None,
        ready=None,
    ) -> dict:
        """Receive until ``stop()``, a consumer's exit, the end of session with
        ``until_eos`` (on every channel: every sequence taken, or ``eos_grace`` s after it
        was seen), or ``duration`` s; ``ready()`` is called once every consumer keeps up.
        Every way out stops the consumers and detaches XDP; the summary is returned on the
        regular ones."""
        # what the host must offer (capabilities, not root; namespace, interfaces, core) is
        # preflight's runtime stage, which `tickwire run` checks before it gets here; unset
        # lines, cores this host lacks, entering the namespace and finding the interfaces
        # still fail with one line
        for ch in self.channels:
            require_lines(ch.run, at=f"channel[{ch.index}]" if self.cfg.channel else "run")
        check_cores([ch.cfg for ch in self.channels])
        run = self.channels[0].run  # the process-wide keys are [run]'s in every channel
        t0 = time.monotonic()
        with contextlib.ExitStack() as stack:  # undone in reverse: consumers first, XDP last
            stack.enter_context(signals.stopping(self.stop))
            if run.netns:
                netns.enter(run.netns)
            for ch in self.channels:
                _check_interfaces(ch.run)
            for ch in self.channels:
                ch.maps = _create_channel(ch.cfg)
            self.mode = self._attach(stack)
            for ch in self.channels:
                ch.consumer = self._start_consumer(stack, ch)
            self._serve_metrics(stack)
            for ch in self.channels:
                self._wait_running(ch)
            for ch in self.channels:
                self._start_journal(stack, ch)
            for ch in self.channels:
                ch.recovery = start_recovery(ch.cfg, ch.maps, ch.log)
                stack.callback(ch.recovery.stop)
            if ready is not None:
                ready()
            self._watch(t0, until_eos, eos_grace, duration)
            for ch in self.channels:
                ch.maps["control"][shm.C_STOP] = 1
            for ch in self.channels:
                self._reap(ch)
        seconds = time.monotonic() - t0
        out = {ch.name: self._summary(ch, seconds) for ch in self.channels}
        return {"channels": out} if self.several else out[self.channels[0].name]

    def _start_journal(self, stack: contextlib.ExitStack, ch: _Channel) -> None:
        """The channel's journal writer (``[journal] enabled``), stopped -- after the
        consumer, which the stack stops first -- when the run ends: it drains the message
        ring and closes the journal."""
        from host.appliance import journalwriter

        j = ch.cfg.journal
        if not j.enabled:
            return
        session = ch.cfg.feed.session
        ch.journal = journalwriter.start(ch.name, j, session)
        where = journalwriter.journal_dir(j, ch.name, session)
        ch.log(f"journal: {where} (sync {j.sync}), writer pid {ch.journal.pid}")

        def end(ch=ch) -> None:
            code = journalwriter.stop(ch.journal)
            if code != 0:
                st = journalwriter.read_stats(ch.name) or {}
                ch.log(
                    f"journal writer ended badly ({'killed' if code is None else code}): "
                    f"{st.get('error', 'no report')}"
                )

        stack.callback(end)

    def _attach(self, stack: contextlib.ExitStack) -> str:
        """The receive path: "xdp" with the steering program attached to every channel's
        lines' interfaces until ``stack`` closes, else "socket" (asked for, or ``rx_mode =
        "auto"`` falling back, said once)."""
        run = self.channels[0].run
        if run.rx_mode == "socket":
            return "socket"
        try:
            from host.appliance import loader

            entries = [
                (line.group, line.port, ch.index, letter)
                for ch in self.channels
                for letter, line in ch.run.lines.items()
            ]
            ifaces = sorted({ln.interface for ch in self.channels for ln in ch.run.lines.values()})
            with contextlib.ExitStack() as attempt:
                steering = attempt.enter_context(
                    loader.Steering(ifaces, entries, mode=run.xdp_mode, log=self.log)
                )
                import dataplane.xsk  # noqa: F401 - fail here, not in the child

                stack.enter_context(attempt.pop_all())
        except Exception as e:  # noqa: BLE001 - auto falls back, xdp reports
            if run.rx_mode == "xdp":
                raise RunError(
                    getattr(e, "errno", None) or errno.EOPNOTSUPP,
                    f"AF_XDP receive path unavailable: {e}",
                ) from None
            self.log(f"AF_XDP unavailable ({e}); receiving with kernel UDP sockets")
            return "socket"
        self.steering = steering
        # The loader's signal handlers would detach at the signal: ours again on top, so the
        # consumers stop first and the stack detaches after them, keeping the final XDP
        # counters. (The loader's atexit hook covers an exit that never unwinds the stack.)
        stack.enter_context(signals.stopping(self.stop))
        stack.callback(self._keep_xdp_stats)
        return "xdp"

    def _keep_xdp_stats(self) -> None:
        for ch in self.channels:
            try:
                ch.xdp_stats = xdp_stats(self.steering, ch.index)
            except Exception:  # noqa: BLE001 - a signal may have detached it already
                ch.xdp_stats = None

    def _start_consumer(self, stack: contextlib.ExitStack, ch: _Channel) -> _Consumer:
        """Join the channel's lines' groups (IGMP) and fork its consumer; when ``stack``
        closes, a consumer still running is killed and the channel marked not running."""
        run, maps = ch.run, ch.maps
        map_fd, slots = -1, []
        if self.mode == "xdp":  # the AF_XDP sockets receive; these sockets only join
            for line in run.lines.values():
                stack.enter_context(join_socket(line, bind=False))
            map_fd = self.steering.xsks_map_fd
            slots = [
                self.steering.xsk_slot(line.interface, line.queue) for line in run.lines.values()
            ]
        pid = os.fork()
        if pid == 0:
            _child(ch.cfg, self.mode, map_fd, maps, slots)
        consumer = _Consumer(pid)

        def end() -> None:
            consumer.kill()
            maps["counters"][shm.S_RUNNING] = 0  # whatever happened to the consumer

        stack.callback(end)
        where = f"core {run.core}" if run.core >= 0 else "any core"
        ifs = ", ".join(
            f"{k}={v.interface}" + (f" queue {v.queue}" if self.several else "")
            for k, v in run.lines.items()
        )
        ch.log(f"consumer pid {pid} on {where}, {self.mode} mode, lines {ifs}")
        return consumer

    def _serve_metrics(self, stack: contextlib.ExitStack) -> None:
        """Prometheus on ``run.metrics`` ("" = none) until ``stack`` closes: one collector
        per channel, each family exposed once. The steering program's pass counters are
        the whole program's: they go with the first channel only."""
        run = self.channels[0].run
        if not run.metrics:
            return
        from host.appliance import metrics

        steering = self.steering
        collectors = []
        for ch in self.channels:
            stats = (
                None
                if steering is None
                else (lambda ch=ch: xdp_stats(steering, ch.index, shared=ch.index == 0))
            )

            def rec(ch=ch):
                r = ch.recovery
                return r.status() if r is not None and hasattr(r, "status") else None

            collectors.append(metrics.ConsumerCollector(ch.name, ch.maps, stats, recovery=rec))
            if ch.cfg.journal.enabled:
                collectors.append(metrics.JournalCollector(ch.name))
        server = metrics.serve(run.metrics, *collectors)
        stack.callback(server.shutdown)
        self.log(
            f"metrics on http://{run.metrics}/metrics" + (f" (in {run.netns})" if run.netns else "")
        )

    def _watch(
        self,
        t0: float,
        until_eos: bool,
        eos_grace: float,
        duration: float | None,
    ) -> None:
        """Until ``stop()``, a consumer's exit, the end of session on every channel
        (``until_eos``) or ``duration``: log the lines' health as it changes."""
        from host.appliance.linehealth import LineHealth

        health = {ch.name: (LineHealth(), set()) for ch in self.channels}
        next_health = 0.0
        while not self._stop:
            if time.monotonic() >= next_health:
                next_health = time.monotonic() + 0.1
                for ch in self.channels:
                    self._observe(ch, *health[ch.name])
            if any(ch.consumer.exited() for ch in self.channels):
                return
            if until_eos and all(ch.eos_reached(eos_grace) for ch in self.channels):
                return
            if duration is not None and time.monotonic() - t0 >= duration:
                return
            time.sleep(0.02)

    @staticmethod
    def _observe(ch: _Channel, health, heard: set) -> None:
        """Log a channel's lines' health when it changes; tell its consumer."""
        maps = ch.maps
        for k, (letter, h) in enumerate(health.observe(maps["counters"]).items()):
            if h["changed"] and (h["state"] != "up" or letter in heard):
                ch.log(f"line {letter}: {h['state']}")
            if h["state"] in events.LINE_CODE:  # the consumer announces changes
                maps["control"][shm.C_LINE_STATE + k] = events.LINE_CODE[h["state"]]
            if h["state"] == "up":
                heard.add(letter)

    def _wait_running(self, ch: _Channel) -> None:
        """Wait for the channel's consumer loop to come up: loaded from numba's cache it
        takes a second or two; with a cold cache (a fresh install, a new CPU) it is
        compiled, which takes about a minute, reported as it goes. Past
        ``run.start_timeout_s`` it is killed."""
        consumer = ch.consumer
        timeout = ch.run.start_timeout_s
        t0 = time.monotonic()
        deadline, next_note = t0 + timeout, t0 + 10.0
        ctr = ch.maps["counters"]
        while not ctr[shm.S_RUNNING]:
            if consumer.exited():
                err = ch.cdir / "error.txt"
                why = err.read_text().splitlines()[0] if err.exists() else "no report"
                raise RunError(errno.EIO, f"{ch.who}the consumer failed to start: {why}")
            if time.monotonic() > deadline:
                consumer.kill()
                raise RunError(
                    errno.ETIMEDOUT,
                    f"{ch.who}the consumer did not start within {timeout:g} s "
                    "(run.start_timeout_s)",
                )
            now = time.monotonic()
            if now >= next_note:
                cache = os.environ.get("NUMBA_CACHE_DIR", "numba's default cache")
                ch.log(
                    f"consumer still starting after {now - t0:.0f} s (compiling: nothing "
                    f"usable in {cache} yet)"
                )
                next_note = now + 15.0
            time.sleep(0.01)
        how = "compiled" if ctr[shm.S_START_HOW] == shm.START_COMPILED else "from numba's cache"
        ch.log(f"consumer running after {ctr[shm.S_START_NS] / 1e9:.1f} s ({how})")

    def _reap(self, ch: _Channel, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ch.consumer.exited():
                return
            time.sleep(0.01)
        ch.consumer.kill()
        raise RunError(errno.ETIMEDOUT, f"{ch.who}the consumer did not stop within 30 s (killed)")

    def _summary(self, ch: _Channel, seconds: float) -> dict:
        reader = shm.Reader(ch.name, maps=ch.maps)
        out = {
            "channel": ch.name,
            "mode": self.mode,
            "seconds": seconds,
            **reader.counters(),
            "latency_ns": reader.latency(),
        }
        err = ch.cdir / "error.txt"
        if err.exists():
            raise RunError(
                errno.EIO,
                f"channel {ch.name}: the consumer failed: {err.read_text().splitlines()[0]}",
            )
        final = ch.cdir / "final.json"
        if final.exists():
            out.update(json.loads(final.read_text()))
        elif ch.consumer.status is not None and ch.consumer.status != 0:
            st = ch.consumer.status
            _mark_dead(ch, st)
            raise RunError(
                errno.EIO,
                f"channel {ch.name}: the consumer died ({shm.died_how(st)}) with no report, "
                f"after {out['taken']:,} messages (next sequence {out['next_seq']:,}); its "
                "books are stale until rebuilt",
            )
        from host.appliance import restart

        start = restart.started(ch.name)
        if start is not None and start.get("began") not in (None, "empty"):
            out["start"] = start
        if ch.journal is not None:
            from host.appliance import journalwriter

            out["journal"] = journalwriter.read_stats(ch.name)
        if ch.xdp_stats:
            out["xdp"] = ch.xdp_stats
        if ch.recovery is not None:
            out["recovery"] = ch.recovery.counters()
            out["recovery_latency_ns"] = ch.recovery.latency()
        return out


def _mark_dead(ch: _Channel, status: int) -> None:
    """Say in the channel's shared memory that its consumer died (``status``: its wait
    status) and its books are stale: what ``tickwire status`` and the metrics show until a
    consumer rebuilds them."""
    ctr, ctl = ch.maps["counters"], ch.maps["control"]
    ctr[shm.S_DIED] = status + 1
    ctr[shm.S_RUNNING] = 0
    ctl[shm.C_STALE] = 1


def summary_text(s: dict) -> str:
    """The run's summary for people: one channel's, or a block per channel."""
    if "channels" in s:
        return "\n".join(_channel_text(c) for c in s["channels"].values())
    return _channel_text(s)


def _channel_text(s: dict) -> str:
    lines = [
        f"channel {s['channel']} ({s['mode']}): {s['taken']:,} messages taken, next "
        f"sequence {s['next_seq']:,}, {s['seconds']:.1f} s"
    ]
    lines.append(
        f"  gaps: {s['gaps_declared']:,} declared ({s['gap_declared_messages']:,} "
        f"messages), {s['unrecoverable_gaps']:,} unrecoverable "
        f"({s['unrecoverable_messages']:,} messages skipped)"
        f"{'; BOOKS STALE' if s['stale'] else ''}"
        f"{'; HALTED' if s['halted'] else ''}"
    )
    st = s.get("start")
    if st:
        j = st.get("join") or {}
        tries = f", {j['attempts']} login(s) to the snapshot service" if j else ""
        lines.append(
            f"  books began {st['began']} at sequence {st['seq']:,} in {st['seconds']:.2f} s{tries}"
        )
    for letter, ln in s["lines"].items():
        if letter == "recovery" and not ln["packets"]:
            continue
        lines.append(
            f"  line {letter}: {ln['packets']:,} packets, {ln['messages']:,} messages, "
            f"{ln['first']:,} first, {ln['duplicates']:,} duplicates dropped, "
            f"{ln['malformed']:,} malformed"
        )
    lat = s["latency_ns"]
    if lat.get("count"):
        lines.append(
            f"  receive to book: p50 {lat['p50'] / 1e3:.1f} us, p99 "
            f"{lat['p99'] / 1e3:.1f} us, p99.9 {lat['p99.9'] / 1e3:.1f} us "
            f"({lat['count']:,} packets)"
        )
    if "digest" in s:
        lines.append(
            f"  book: {s['live_orders']:,} live orders, {s['stocks']:,} stocks, "
            f"digest {s['digest'][:16]}…"
        )
    return "\n".join(lines)
