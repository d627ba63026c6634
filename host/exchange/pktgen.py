"""The lab's in-kernel packet generator (``bpf/pktgen.c``, BPF_PROG_RUN live frames) and
its XDP_DROP sink -- the sender of ``tickwire bench rx``.

Why in the kernel: on this kind of machine a user-space sender (sendmmsg, Python or C)
tops out well below what the receive path can take, so it would measure itself. Running
an XDP program with ``BPF_PROG_RUN`` and ``BPF_F_TEST_XDP_LIVE_FRAMES`` turns every
repetition into a real frame: the program stamps a sequence number into a template
frame and returns ``XDP_TX``, which live-frames mode turns into a redirect *out of* the
ingress interface given in the context (the exchange end of a line, ``ex-a``); on a veth
that frame arrives on the peer (``feed-a``) like any received frame. The peer must be in
NAPI mode to take ``ndo_xdp_xmit`` frames: an XDP program attached there (the steering
program, the sink) does that, and so does GRO, which ``peer_napi`` turns on for the
kernel-socket path. On veth everything up to the receive queue -- the generator, the
peer's XDP program, the AF_XDP copy, the kernel's UDP stack -- runs on the sender's CPU.

``PacketGen(labcfg)``:
- ``use(frame)`` picks the template; ``heartbeat_frame``, ``data_frame`` build them:
  Ethernet (to the group's multicast MAC) / IPv4 (exchange address -> group, checksum
  set, DF) / UDP (no checksum) / MoldUDP64 with the config's session name.
  * ``heartbeat_frame``: a 64-byte frame (as XDP sees it, no FCS) carrying a MoldUDP64
    heartbeat (count 0, the next sequence), padded after the datagram: still valid
    MoldUDP64, and the smallest packet a feed sends. Its sequence does not advance.
  * ``data_frame(pairs)``: ``pairs`` ITCH ``A`` adds (stock locate 1, alternately bid
    and ask on distinct price levels, references 2^40 + i) followed by the ``D`` delete of
    each, so every packet leaves the book exactly as it found it (empty) and any number
    of packets keeps it bounded; ``FULL_PAIRS`` (23) makes a 1,377-byte payload with 46
    messages -- a full 1,400-byte packet.
- ``send(n, rate_pps=None)`` transmits exactly ``n`` frames (a budget the program
  counts down) and returns what it did. Each ``BPF_PROG_RUN`` call ends with an RCU grace
  period (~25 ms on a small VM, nothing sent meanwhile), so pacing cannot come from many
  small calls: a paced send is one long call whose repetitions the program drops until the
  next frame is due (``interval = 1e9 / rate_pps`` ns, a late sender catching up at most
  ``burst`` frames back to back); unpaced, every repetition transmits. The rate reported
  is measured by the program (first to last frame, ``bpf_ktime_get_ns``). The call runs
  in a worker thread that enters the exchange namespace (the ifindex is resolved there),
  pins itself to ``cpu`` and blocks SIGINT/SIGTERM (a signal would cut a call short);
  ``start`` does the same in the background. The spinning keeps ``cpu`` busy for the
  whole send: on a veth that CPU also carries the receive side's kernel work.
- The sequence stamped is contiguous across calls: ``reset(seq)`` sets the next one;
  data frames advance it by their message count.

``Sink(pg, ns, ifname)``: attaches ``tw_sink`` (count and XDP_DROP) in native mode to
an interface and detaches it on exit; ``packets()`` sums its per-CPU counter.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import signal
import socket
import struct
import subprocess
import threading
import time

import bpf
from dataplane import moldudp64 as mold
from dataplane.xdpabi import XDP_FLAGS_DRV_MODE, XDP_FLAGS_REPLACE, XDP_FLAGS_UPDATE_IF_NOEXIST
from host import netns
from host.appliance import bpfsys
from host.config import LabConfig

BPF_DIR = bpf.DIR
PKTGEN_SRC = BPF_DIR / "pktgen.c"
PROG_GEN = "tw_pktgen"
PROG_SINK = "tw_sink"

MAX_BATCH = 256  # the kernel's limit on batch_size in live-frames mode
MAX_REPEAT = (1 << 31) - 1
# --- mirror of bpf/pktgen.h (tests/test_bpfabi.py checks it against the header) ----------
MAP_STATE = "tw_pg_state"
MAP_SINK_STATS = "tw_sink_stats"
ST_NEXT_SEQ = 0  # sequence stamped into the next frame
ST_FRAMES = 1  # frames transmitted, all runs
ST_SHORT = 2  # template too short for a MoldUDP64 header: dropped
ST_BUDGET = 3  # frames still to transmit in this run
ST_INTERVAL = 4  # ns between frames (0: as fast as possible)
ST_DUE = 5  # ktime the next frame is due (0: now)
ST_BURST = 6  # ns a late sender may catch up at once
ST_FIRST = 7  # ktime of the run's first frame
ST_LAST = 8  # ktime of the run's last frame
ST_WAITS = 9  # repetitions dropped waiting for the next frame to be due
ST_IDLE = 10  # repetitions dropped after the budget was spent
STATE_LEN = 16

SRC_PORT = 26400
MIN_FRAME = 64
MOLD_AT = 14 + 20 + 8  # Ethernet, IPv4 (no options), UDP, then MoldUDP64 (TW_PG_MOLD)
FULL_PAIRS = 23  # 20 + 23 * (38 + 21) = 1,377 bytes of UDP payload, 46 messages
LOCATE = 1
REF_BASE = 1 << 40
MID_PRICE = 1_000_000  # $100.0000


class PktgenError(OSError):
    """The generator cannot be built, loaded or run; the message says why."""


# --- frames ---------------------------------------------------------------------------------
def _csum(data: bytes) -> int:
    s = sum(struct.unpack(f">{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def _multicast_mac(group: str) -> bytes:
    low = int(ipaddress.IPv4Address(group)) & 0x7FFFFF
    return bytes([0x01, 0x00, 0x5E]) + low.to_bytes(3, "big")


def frame(
    payload: bytes, src_ip: str, group: str, port: int, src_mac: bytes, pad_to: int = MIN_FRAME
) -> bytes:
    """Ethernet / IPv4 / UDP around ``payload``, zero-padded to ``pad_to`` bytes."""
    udp_len = 8 + len(payload)
    ip = bytearray(
        struct.pack(
            ">BBHHHBBH4s4s",
            0x45,
            0,
            20 + udp_len,
            0,
            0x4000,
            16,
            17,
            0,
            socket.inet_aton(src_ip),
            socket.inet_aton(group),
        )
    )
    ip[10:12] = _csum(bytes(ip)).to_bytes(2, "big")
    eth = _multicast_mac(group) + src_mac + b"\x08\x00"
    out = eth + bytes(ip) + struct.pack(">HHHH", SRC_PORT, port, udp_len, 0) + payload
    return out + bytes(max(0, pad_to - len(out)))


def _itch_header(t: bytes) -> bytes:
    return t + struct.pack(">HH", LOCATE, 0) + bytes(6)  # timestamp stamped at send


def itch_pairs(pairs: int) -> tuple[bytes, int]:
    """``pairs`` adds then their deletes, each with its 2-byte length: (blocks, count)."""
    adds, deletes = [], []
    for i in range(pairs):
        ref = REF_BASE + i
        side = b"B" if i % 2 == 0 else b"S"
        step = (i // 2 + 1) * 100
        price = MID_PRICE - step if side == b"B" else MID_PRICE + step
        add = _itch_header(b"A") + struct.pack(
            ">Qc I8sI".replace(" ", ""), ref, side, 100 + i, b"TWBENCH ", price
        )
        adds.append(struct.pack(">H", len(add)) + add)
        dele = _itch_header(b"D") + struct.pack(">Q", ref)
        deletes.append(struct.pack(">H", len(dele)) + dele)
    return b"".join(adds + deletes), 2 * pairs


def heartbeat_frame(line, session: str, src_mac: bytes = b"\x02\x00\x00\x00\x00\x01") -> bytes:
    """A 64-byte frame with a MoldUDP64 heartbeat on ``line`` (a ``LineConfig``)."""
    hb = mold.heartbeat(mold.session_bytes(session), 0)
    return frame(hb, line.exchange_ip, line.group, line.port, src_mac)


def data_frame(
    line, session: str, pairs: int = FULL_PAIRS, src_mac: bytes = b"\x02\x00\x00\x00\x00\x01"
) -> bytes:
    """A MoldUDP64 data packet of ``2 * pairs`` book-neutral ITCH messages."""
    blocks, count = itch_pairs(pairs)
    hdr = mold.header(mold.session_bytes(session), 0, count)
    return frame(hdr + blocks, line.exchange_ip, line.group, line.port, src_mac)


def frame_messages(f: bytes) -> int:
    """Message count of a template built here (0 for a heartbeat)."""
    return mold.unpack_header(f[MOLD_AT:])[2]


# --- the generator ---------------------------------------------------------------------------
def _load():
    try:
        from bcc import BPF
    except ImportError as e:
        raise PktgenError(
            errno.ENOPKG, f"bcc is not importable ({e}): install python3-bpfcc (make setup)"
        ) from None
    if os.geteuid() != 0:
        raise PktgenError(errno.EPERM, "the packet generator needs root (CAP_BPF, CAP_NET_ADMIN)")
    try:
        bpf = BPF(src_file=str(PKTGEN_SRC).encode(), cflags=[f"-I{BPF_DIR}"])  # pktgen.h
        gen = bpf.load_func(PROG_GEN.encode(), BPF.XDP)
        sink = bpf.load_func(PROG_SINK.encode(), BPF.XDP)
    except Exception as e:
        raise PktgenError(errno.EINVAL, f"cannot build or load {PKTGEN_SRC.name}: {e}") from None
    return bpf, gen.fd, sink.fd


def peer_napi(ns: str, ifname: str) -> None:
    """Turn GRO on for ``ifname`` in ``ns`` so the veth takes XDP-transmitted frames
    (``ndo_xdp_xmit`` needs NAPI on the receiving end) with no XDP program attached."""
    done = subprocess.run(
        ["ip", "netns", "exec", ns, "ethtool", "-K", ifname, "gro", "on"],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise PktgenError(
            errno.EOPNOTSUPP,
            f"cannot turn GRO on for {ns}/{ifname}: {done.stderr.strip() or done.stdout.strip()}",
        )


def _mac(ns: str, ifname: str) -> bytes:
    from pyroute2 import IPRoute

    with netns.entered(ns), IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=ifname)
        if not idx:
            raise PktgenError(errno.ENODEV, f"{ns}/{ifname} does not exist (tickwire lab up?)")
        addr = ipr.get_links(idx[0])[0].get_attr("IFLA_ADDRESS")
    return bytes.fromhex(addr.replace(":", ""))


class PacketGen:
    """Frames on line ``letter`` of a lab, from its exchange namespace (see module doc)."""

    def __init__(
        self,
        labcfg: LabConfig,
        letter: str = "A",
        session: str = "TICKWIRE01",
        cpu: int | None = None,
        batch: int = 64,
        burst: int = 4,
    ):
        if not 1 <= batch <= MAX_BATCH:
            raise ValueError(f"batch: {batch} is outside 1..{MAX_BATCH}")
        self.labcfg = labcfg
        self.line = labcfg.lines[letter]
        self.session = session
        self.cpu = cpu
        self.batch = batch
        self.burst = burst
        self.spin_rate: float | None = None
        self.ns = labcfg.exchange_ns
        self.src_mac = _mac(self.ns, self.line.exchange_if)
        with netns.entered(self.ns):
            self.ifindex = socket.if_nametoindex(self.line.exchange_if)
        self._bpf, self.gen_fd, self.sink_fd = _load()
        self._state = self._bpf[MAP_STATE.encode()]
        self._lock = threading.Lock()
        self.template = b""
        self.use(self.heartbeat())
        self.reset(1)

    # -- templates
    def heartbeat(self) -> bytes:
        return heartbeat_frame(self.line, self.session, self.src_mac)

    def data(self, pairs: int = FULL_PAIRS) -> bytes:
        return data_frame(self.line, self.session, pairs, self.src_mac)

    def use(self, template: bytes) -> None:
        if not 60 <= len(template) <= 3000:
            raise ValueError(f"template of {len(template)} bytes: 60..3000 allowed")
        self.template = bytes(template)
        self.messages = frame_messages(self.template)

    # -- state
    def _get(self, slot: int) -> int:
        return int(self._state[self._state.Key(slot)].value)

    def _set(self, slot: int, value: int) -> None:
        self._state[self._state.Key(slot)] = self._state.Leaf(int(value))

    def reset(self, seq: int = 1) -> None:
        """The next frame carries sequence ``seq``."""
        self._set(ST_NEXT_SEQ, seq)

    @property
    def next_seq(self) -> int:
        return self._get(ST_NEXT_SEQ)

    @property
    def frames(self) -> int:
        """Frames transmitted (all calls)."""
        return self._get(ST_FRAMES)

    # -- sending
    def _call(self, buf, ctx, repeat: int) -> float:
        t0 = time.monotonic()
        try:
            bpfsys.prog_run(
                self.gen_fd,
                buf,
                ctx=ctx,
                repeat=min(repeat, MAX_REPEAT),
                flags=bpfsys.BPF_F_TEST_XDP_LIVE_FRAMES,
                batch_size=self.batch,
            )
        except OSError as e:
            where = f"{self.ns}/{self.line.exchange_if}"
            raise PktgenError(
                e.errno, f"BPF_PROG_RUN (live frames) on {where}: {os.strerror(e.errno)}"
            ) from None
        return time.monotonic() - t0

    def _calibrate(self, buf, ctx) -> None:
        """Repetitions per second of a dropped (idle) run: sizes the calls of paced sends."""
        self._set(ST_BUDGET, 0)
        t_one = self._call(buf, ctx, 1)
        n = 1 << 21
        t_n = self._call(buf, ctx, n)
        self.spin_rate = n / max(t_n - t_one, 1e-3)

    def _send(self, n: int, rate_pps: float | None, burst: int | None, out: dict) -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        if self.cpu is not None:
            os.sched_setaffinity(0, {self.cpu})  # this thread only
        buf = self.template
        ctx = bpfsys.xdp_md(len(buf), self.ifindex)
        interval = 0 if not rate_pps else max(1, round(1e9 / rate_pps))
        calls = 0
        with self._lock, netns.entered(self.ns):
            if interval and self.spin_rate is None:
                self._calibrate(buf, ctx)
            first = self.frames
            waits0, idle0 = self._get(ST_WAITS), self._get(ST_IDLE)
            for slot, v in (
                (ST_INTERVAL, interval),
                (ST_DUE, 0),
                (ST_FIRST, 0),
                (ST_LAST, 0),
                (ST_BURST, interval * (burst or self.burst)),
                (ST_BUDGET, n),
            ):
                self._set(slot, v)
            t0 = time.monotonic()
            left = n
            while left > 0:
                # one long call: each call ends with an RCU grace period (milliseconds)
                # during which nothing is sent; the program spins through the waits
                repeat = left
                if interval:
                    repeat += int(left / rate_pps * self.spin_rate * 1.5) + self.batch
                self._call(buf, ctx, repeat)
                calls += 1
                left = self._get(ST_BUDGET)
            wall = time.monotonic() - t0
            sent = self.frames - first
            span = (self._get(ST_LAST) - self._get(ST_FIRST)) / 1e9
            waits = self._get(ST_WAITS) - waits0
            if interval and span > 0.01 and waits > 0:
                self.spin_rate = waits / span  # what this load leaves the spin: next call
            self._set(ST_INTERVAL, 0)
        rate = (sent - 1) / span if sent > 1 and span > 0 else 0.0
        out.update(
            sent=sent,
            seconds=span,
            wall_seconds=wall,
            calls=calls,
            rate_pps=rate,
            requested_pps=float(rate_pps or 0.0),
            next_seq=self.next_seq,
            waits=waits,
            idle=self._get(ST_IDLE) - idle0,
        )

    def start(self, n: int, rate_pps: float | None = None, burst: int | None = None) -> Sending:
        """Send in the background; ``.join()`` returns what ``send`` returns."""
        return Sending(self, n, rate_pps, burst)

    def send(self, n: int, rate_pps: float | None = None, burst: int | None = None) -> dict:
        """Send exactly ``n`` frames of the current template, at ``rate_pps`` frames/s or
        as fast as possible (a late sender catches up at most ``burst`` frames at once;
        default: the generator's). Returns ``sent`` (counted by the program), ``seconds``
        (first to last frame), ``rate_pps`` (achieved), ``requested_pps``,
        ``wall_seconds``, ``calls``, ``waits``/``idle`` (repetitions dropped pacing /
        after the budget), ``next_seq``."""
        return self.start(n, rate_pps).join()

    def sink(self, ns: str, ifname: str) -> Sink:
        return Sink(self, ns, ifname)

    def close(self) -> None:
        if self._bpf is not None:
            with contextlib.suppress(Exception):
                self._bpf.cleanup()
            self._bpf = None

    def __enter__(self) -> PacketGen:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Sending:
    """A ``send`` running in its own thread."""

    def __init__(self, pg: PacketGen, n: int, rate_pps: float | None, burst: int | None):
        if n < 0:
            raise ValueError(f"n: {n} frames")
        self.result: dict = {}
        self.error: BaseException | None = None

        def body():
            try:
                pg._send(n, rate_pps, burst, self.result)
            except BaseException as e:  # noqa: BLE001 - handed to join()
                self.error = e

        self.thread = threading.Thread(target=body, name="tw-pktgen", daemon=True)
        self.thread.start()

    def join(self) -> dict:
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.result


class Sink:
    """``tw_sink`` attached (native XDP) to ``ns``/``ifname`` for the ``with`` block."""

    def __init__(self, pg: PacketGen, ns: str, ifname: str):
        self.pg, self.ns, self.ifname = pg, ns, ifname
        self._stats = pg._bpf[MAP_SINK_STATS.encode()]
        self._idx = None

    def _link(self, fd: int, flags: int, expected: int | None = None) -> None:
        from pyroute2 import IPRoute, NetlinkError

        attrs = [("IFLA_XDP_FD", fd), ("IFLA_XDP_FLAGS", flags)]
        if expected is not None:
            attrs.append(("IFLA_XDP_EXPECTED_FD", expected))
        with netns.entered(self.ns), IPRoute() as ipr:
            if self._idx is None:
                found = ipr.link_lookup(ifname=self.ifname)
                if not found:
                    raise PktgenError(errno.ENODEV, f"{self.ns}/{self.ifname} does not exist")
                self._idx = found[0]
            try:
                ipr.link("set", index=self._idx, xdp={"attrs": attrs})
            except NetlinkError as e:
                raise PktgenError(e.code, f"XDP on {self.ns}/{self.ifname}: {e}") from None

    def packets(self) -> int:
        return int(sum(self._stats.getvalue(self._stats.Key(0))))

    def __enter__(self) -> Sink:
        self._link(self.pg.sink_fd, XDP_FLAGS_UPDATE_IF_NOEXIST | XDP_FLAGS_DRV_MODE)
        return self

    def __exit__(self, *exc) -> None:
        self._link(-1, XDP_FLAGS_DRV_MODE | XDP_FLAGS_REPLACE, expected=self.pg.sink_fd)
