"""AF_XDP binding (dataplane.xsk): real sockets on the lab's line A, fed by a test-only XDP
program (tests/xdp_redirect_all.c) that stamps 16 bytes of metadata and redirects UDP to the
line's port into an XSKMAP. Every packet is received by numba loops that use nothing but the
numba ring API. Also: the ring operations on simulated rings (no root), the error paths, and
the compiled ring code's LLVM IR (no allocation, acquire/release on the ring indices).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from numba import njit

from dataplane import xdpabi, xsk
from host import netns
from tests.helpers import wait_for
from tests.labnet import built, private_lab

HERE = Path(__file__).resolve().parent
MARKER = 0x7E57C0DE
AF_XDP = 44  # <linux/socket.h>; Python does not export it


# --- numba consumers: only the ring API and the UMEM array ------------------------------------
# state slots
S_RECEIVED, S_BAD, S_NOFILL, S_WAKEUPS, S_HELD = 0, 1, 2, 3, 4
REFILL_NONE, REFILL_BATCH, REFILL_ONE = 0, 1, 2


@njit(nogil=True, inline="always")
def _le(umem, off, n):
    v = 0
    for k in range(n):
        v |= np.int64(umem[off + k]) << (8 * k)
    return v


@njit(nogil=True)
def consume(ri, umem, batch, refill, payload, lens, rx_ns, marker, queue, frame, held, state):
    """One pass: receive up to ``batch`` packets, copy each UDP payload to ``payload[seq]``
    (seq = its first 4 bytes), record its metadata and frame, give frames back per
    ``refill`` (or keep them in ``held``). Returns the number received."""
    n, idx = xsk.rx_peek(ri, batch)
    if n > 0 and refill == REFILL_BATCH:
        got, fidx = xsk.fill_reserve(ri, n)
        state[S_NOFILL] += n - got
    else:
        got, fidx = 0, 0
    for i in range(n):
        addr, length = xsk.rx_desc(ri, idx + i)
        ok = (
            length >= 46
            and umem[addr + 12] == 0x08
            and umem[addr + 13] == 0x00
            and umem[addr + 14] == 0x45
            and umem[addr + 23] == 17
        )
        ulen = ((np.int64(umem[addr + 38]) << 8) | umem[addr + 39]) - 8 if ok else 0
        if ok and 4 <= ulen <= length - 42 and ulen <= payload.shape[1]:
            seq = _le(umem, addr + 42, 4)
            if seq < payload.shape[0] and lens[seq] < 0:
                for k in range(ulen):
                    payload[seq, k] = umem[addr + 42 + k]
                lens[seq] = ulen
                rx_ns[seq] = _le(umem, addr - 16, 8)
                marker[seq] = _le(umem, addr - 8, 4)
                queue[seq] = _le(umem, addr - 4, 4)
                frame[seq] = xsk.frame_addr(ri, addr)
                state[S_RECEIVED] += 1
            else:
                state[S_BAD] += 1
        else:
            state[S_BAD] += 1
        f = xsk.frame_addr(ri, addr)
        if refill == REFILL_BATCH:
            if i < got:
                xsk.fill_addr_set(ri, fidx + i, f)
        elif refill == REFILL_ONE:
            if xsk.fill_put(ri, f) == 0:
                state[S_NOFILL] += 1
        else:
            held[state[S_HELD]] = f
            state[S_HELD] += 1
    if refill == REFILL_BATCH and got > 0:
        xsk.fill_submit(ri, got)
    if n > 0:
        xsk.rx_release(ri, n)
    if refill != REFILL_NONE and xsk.fill_needs_wakeup(ri):
        state[S_WAKEUPS] += 1
        xsk.kick(ri)
    return n


@njit(nogil=True)
def give_back(ri, held, count):
    """Return ``held[:count]`` to the fill ring in one batch; kick if the kernel asks."""
    got, idx = xsk.fill_reserve(ri, count)
    for i in range(got):
        xsk.fill_addr_set(ri, idx + i, held[i])
    xsk.fill_submit(ri, got)
    woke = xsk.fill_needs_wakeup(ri)
    rc = xsk.kick(ri) if woke else 0
    return got, woke, rc


class Capture:
    """Preallocated outputs for ``consume`` and a Python loop around it."""

    def __init__(
        self,
        sock: xsk.XskSocket,
        n: int,
        maxlen: int = 512,
        batch: int = 32,
        refill: int = REFILL_BATCH,
    ):
        self.sock, self.n, self.batch, self.refill = sock, n, batch, refill
        self.payload = np.zeros((n, maxlen), np.uint8)
        self.lens = np.full(n, -1, np.int64)
        self.rx_ns = np.zeros(n, np.int64)
        self.marker = np.zeros(n, np.int64)
        self.queue = np.zeros(n, np.int64)
        self.frame = np.full(n, -1, np.int64)
        self.held = np.zeros(sock.umem.frames, np.int64)
        self.state = np.zeros(8, np.int64)

    def step(self) -> int:
        return consume(
            self.sock.ring_info,
            self.sock.umem.array,
            self.batch,
            self.refill,
            self.payload,
            self.lens,
            self.rx_ns,
            self.marker,
            self.queue,
            self.frame,
            self.held,
            self.state,
        )

    def run(self, until: int, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while self.state[S_RECEIVED] < until and time.monotonic() < deadline:
            if self.step() == 0:
                time.sleep(0)


class FakeClock:
    """Stands in for the ``time`` module: ``sleep`` advances ``now`` and is counted."""

    def __init__(self):
        self.now, self.sleeps = 0.0, 0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds
        self.sleeps += 1


def payload_of(seq: int) -> bytes:
    length = 8 + (seq * 37) % 300
    return seq.to_bytes(4, "little") + bytes((seq * 7 + k) & 0xFF for k in range(length - 4))


# --- the lab rig: lab up, XDP program on feed-a, a sender in the exchange namespace ----------
class Rig:
    def __init__(self, cfg, bpf):
        self.cfg, self.bpf = cfg, bpf
        self.line = cfg.lab.line_a
        self.map_fd = bpf[b"xsks"].map_fd
        with netns.entered(cfg.lab.exchange_ns):
            self.tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self.tx.setsockopt(
                socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(self.line.exchange_ip)
            )

    def socket(self, key: int | None = None, **kw) -> xsk.XskSocket:
        with netns.entered(self.cfg.lab.appliance_ns):
            s = xsk.XskSocket(self.line.appliance_if, 0, **kw)
        try:
            s.register(self.map_fd, key)
        except BaseException:
            s.close()
            raise
        return s

    def send(self, seqs) -> None:
        for seq in seqs:
            self.tx.sendto(payload_of(seq), (self.line.group, self.line.port))

    def counts(self) -> list[int]:
        table = self.bpf[b"counts"]
        return [int(table[table.Key(i)].value) for i in range(4)]


def _xdp(ipr, idx: int, fd: int) -> None:
    ipr.link(
        "set",
        index=idx,
        xdp={"attrs": [("IFLA_XDP_FD", fd), ("IFLA_XDP_FLAGS", xdpabi.XDP_FLAGS_DRV_MODE)]},
    )


@pytest.fixture(scope="module")
def rig():
    from bcc import BPF
    from pyroute2 import IPRoute

    cfg = private_lab("xsk")
    with built(cfg):
        line = cfg.lab.line_a
        bpf = BPF(
            src_file=str(HERE / "xdp_redirect_all.c").encode(),
            cflags=[f"-DPORT={int(line.port)}", f"-DMARKER={MARKER}"],
        )
        try:
            fn = bpf.load_func(b"xdp_redirect_all", BPF.XDP)
            with IPRoute(netns=cfg.lab.appliance_ns) as ipr:
                idx = ipr.link_lookup(ifname=line.appliance_if)[0]
                _xdp(ipr, idx, fn.fd)
                try:
                    r = Rig(cfg, bpf)
                    yield r
                    r.tx.close()
                finally:
                    _xdp(ipr, idx, -1)
        finally:
            bpf.cleanup()


# --- lab tests -------------------------------------------------------------------------------
@pytest.mark.lab
@pytest.mark.needs("xdp", "afxdp")
def test_packets_arrive_exact_with_metadata(rig):
    n = 200
    with rig.socket(frames=256, fill_size=256, comp_size=256, rx_size=256) as s:
        assert s.filled == 256
        before = rig.counts()
        cap = Capture(s, n)
        t0 = time.monotonic_ns()
        rig.send(range(n))
        cap.run(until=n)
        t1 = time.monotonic_ns()
        after = rig.counts()
        cap.step()  # anything already in the ring (the count says nothing more was sent)
        stats = s.statistics()
    assert cap.state[S_RECEIVED] == n and cap.state[S_BAD] == 0, cap.state
    for seq in range(n):
        want = payload_of(seq)
        assert cap.lens[seq] == len(want)
        assert bytes(cap.payload[seq, : len(want)]) == want, seq
    assert (cap.marker == MARKER).all()
    assert (cap.queue == 0).all()
    assert ((cap.rx_ns >= t0) & (cap.rx_ns <= t1)).all()
    assert (np.diff(cap.rx_ns) >= 0).all()  # one queue, one ring: arrival order is send order
    assert after[2] - before[2] == n and after[1] == before[1]  # redirected, metadata taken
    assert stats["rx_dropped"] == 0 and stats["rx_fill_ring_empty_descs"] == 0


@pytest.mark.lab
@pytest.mark.needs("xdp", "afxdp")
def test_frames_are_recycled_many_times_without_loss(rig):
    frames, n, window = 64, 64 * 25, 48
    with rig.socket(frames=frames, fill_size=frames, comp_size=frames, rx_size=frames) as s:
        cap = Capture(s, n, batch=16, refill=REFILL_ONE)
        errors = []

        def sender():
            try:
                deadline = time.monotonic() + 60
                for seq in range(n):
                    # moderate rate: never more packets in flight than free frames
                    while seq - cap.state[S_RECEIVED] >= window:
                        if time.monotonic() > deadline:
                            raise TimeoutError(f"consumer stuck at {cap.state[S_RECEIVED]}")
                        time.sleep(0.0002)
                    rig.send([seq])
            except BaseException as e:  # reported by the main thread
                errors.append(e)

        t = threading.Thread(target=sender)
        t.start()
        cap.run(until=n, timeout=60)
        t.join()
        cap.step()  # anything already in the ring: a duplicate would show in S_RECEIVED
        stats = s.statistics()
    assert not errors, errors
    assert cap.state[S_RECEIVED] == n and cap.state[S_BAD] == 0 and cap.state[S_NOFILL] == 0
    assert all(bytes(cap.payload[q, : cap.lens[q]]) == payload_of(q) for q in range(n))
    used, per_frame = np.unique(cap.frame, return_counts=True)
    assert len(used) == frames  # every frame went round ...
    assert per_frame.min() >= n // frames - 1  # ... about n / frames times each
    assert set(used.tolist()) == {i * 4096 for i in range(frames)}
    assert stats["rx_dropped"] == 0 and stats["rx_fill_ring_empty_descs"] == 0


@pytest.mark.lab
@pytest.mark.needs("xdp", "afxdp")
def test_rx_drop_receives_and_recycles(rig):
    # registered at an explicit key (bpf_map_update_elem), as a shared map needs
    with rig.socket(key=0, frames=32, fill_size=32, comp_size=32, rx_size=32) as s:
        ri = s.ring_info
        total = 0
        for burst in range(10):
            rig.send(range(burst * 20, burst * 20 + 20))
            deadline = time.monotonic() + 5
            while total < (burst + 1) * 20 and time.monotonic() < deadline:
                total += xsk.rx_drop(ri, 64)
        assert total == 200
        assert xsk.fill_free(ri) == 0  # every frame is back in the fill ring


@pytest.mark.lab
@pytest.mark.needs("xdp", "afxdp")
def test_need_wakeup_path(rig):
    frames = 16
    with rig.socket(frames=frames, fill_size=frames, comp_size=frames, rx_size=frames) as s:
        ri = s.ring_info
        flags = ctypes.c_uint32.from_address(int(ri[xsk.RI_FQ_FLAGS]))
        assert bool(xsk.fill_needs_wakeup(ri)) == bool(flags.value & xsk.XDP_RING_NEED_WAKEUP)
        assert xsk.kick(ri) == 0 and ri[xsk.RI_KICKS] == 1 and ri[xsk.RI_KICK_ERRORS] == 0
        # 1. hold every frame: the fill ring runs dry and the kernel drops what follows
        cap = Capture(s, 64, refill=REFILL_NONE)
        rig.send(range(frames))
        cap.run(until=frames)
        assert cap.state[S_RECEIVED] == frames
        assert xsk.fill_free(ri) == frames  # all frames are out of the ring
        sent = rig.counts()[2]
        rig.send(range(frames, frames + 8))
        # the program redirected all 8 (the kernel then had no frame to put them in)
        wait_for(lambda: rig.counts()[2] == sent + 8, 20, "8 more redirects", rig.counts)
        cap.step()
        assert cap.state[S_RECEIVED] == frames  # nothing could arrive
        assert s.statistics()["rx_fill_ring_empty_descs"] >= 1
        # 2. the kernel asks for a wakeup (a zero-copy driver sets this bit; copy mode
        #    never does, so set it as one would): giving frames back must kick
        flags.value |= xsk.XDP_RING_NEED_WAKEUP
        assert xsk.fill_needs_wakeup(ri)
        got, woke, rc = give_back(ri, cap.held, int(cap.state[S_HELD]))
        assert (got, bool(woke), rc) == (frames, True, 0)
        assert ri[xsk.RI_KICKS] == 2 and ri[xsk.RI_KICK_ERRORS] == 0
        cap.state[S_HELD] = 0
        # 3. a consumer loop that refills sees the request too, and traffic flows again
        cap.refill = REFILL_BATCH
        for k in range(3):  # bursts no larger than the frames the kernel holds
            first = frames + 8 + 8 * k
            rig.send(range(first, first + 8))
            cap.run(until=frames + 8 * (k + 1))
        flags.value &= ~xsk.XDP_RING_NEED_WAKEUP
        assert not xsk.fill_needs_wakeup(ri)
        assert cap.state[S_RECEIVED] == frames + 24 and cap.state[S_BAD] == 0
        assert cap.state[S_WAKEUPS] >= 1 and ri[xsk.RI_KICK_ERRORS] == 0
        assert (cap.lens[frames : frames + 8] == -1).all()  # the dropped ones stay missing


@pytest.mark.lab
@pytest.mark.needs("xdp", "afxdp")
def test_bad_arguments_raise_xsk_error_with_errno(rig, monkeypatch):
    small = dict(frames=16, fill_size=16, comp_size=16, rx_size=16)
    line = rig.line
    with netns.entered(rig.cfg.lab.appliance_ns):
        with pytest.raises(xsk.XskError) as e:
            xsk.XskSocket("nosuch0", 0, **small)
        assert e.value.errno == errno.ENODEV and "namespace" in str(e.value)
        with pytest.raises(xsk.XskError) as e:  # line A's other end is in the exchange ns
            xsk.XskSocket(line.exchange_if, 0, **small)
        assert e.value.errno == errno.ENODEV
        with pytest.raises(xsk.XskError) as e:
            xsk.XskSocket(line.appliance_if, rig.cfg.lab.queues + 3, **small)
        assert e.value.errno == errno.EINVAL and "queue" in str(e.value)
        assert f"ethtool -l {line.appliance_if}: {rig.cfg.lab.queues} rx" in str(e.value)
        with pytest.raises(xsk.XskError) as e:  # veth has no zero-copy
            xsk.XskSocket(line.appliance_if, 0, zerocopy=True, **small)
        assert e.value.errno == errno.EOPNOTSUPP and "copy mode" in e.value.advice
        with xsk.XskSocket(line.appliance_if, 0, **small) as first:
            clock = FakeClock()  # the retry loop's time: no wall clock in the assertion
            monkeypatch.setattr(xsk, "time", clock)
            with pytest.raises(xsk.XskError) as e:
                xsk.XskSocket(line.appliance_if, 0, busy_timeout=0.2, **small)
            monkeypatch.undo()
            assert clock.sleeps >= 2 and clock.now >= 0.2  # retried for busy_timeout ...
            assert e.value.errno == errno.EBUSY  # ... then reported
            assert e.value.advice == "queue already has an AF_XDP socket or a zero-copy user"
            with pytest.raises(xsk.XskError) as e:
                first.register(1 << 20)
            assert e.value.errno == errno.EBADF
            with pytest.raises(xsk.XskError) as e:  # the test map has 64 entries
                first.register(rig.map_fd, key=64)
            assert e.value.errno == errno.E2BIG and "max_entries" in e.value.advice
            with pytest.raises(ValueError, match="already backs a socket"):
                xsk.XskSocket(line.appliance_if, 0, first.umem)
        # the queue is free again once the first socket is closed (the kernel releases it
        # in deferred work: the default busy_timeout rides that out)
        xsk.XskSocket(line.appliance_if, 0, **small).close()
        xsk.XskSocket(line.appliance_if, 0, **small).close()
    with pytest.raises(ValueError, match="power of two"):
        xsk.XskSocket(line.appliance_if, 0, rx_size=1000)


@pytest.mark.needs("root", "afxdp")
def test_unprivileged_caller_gets_eperm_with_advice():
    script = textwrap.dedent("""
        import json, os
        os.setgroups([]); os.setresgid(65534, 65534, 65534); os.setresuid(65534, 65534, 65534)
        from dataplane import xsk
        try:
            xsk.Umem(frames=16, fill_size=16, comp_size=16)
            print(json.dumps({"errno": 0}))
        except xsk.XskError as e:
            print(json.dumps({"errno": e.errno, "advice": e.advice}))
    """)
    cache = tempfile.mkdtemp(prefix="xsk-numba-")  # numba needs a cache dir nobody can use
    try:
        os.chmod(cache, 0o777)
        done = subprocess.run(
            [sys.executable, "-c", script],
            capture_output=True,
            text=True,
            cwd=str(HERE.parent),
            timeout=120,
            env={**os.environ, "NUMBA_CACHE_DIR": cache},
        )
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out == {"errno": errno.EPERM, "advice": "needs root (CAP_NET_ADMIN, CAP_NET_RAW)"}


@contextlib.contextmanager
def _hugepages(count: int):
    path = "/proc/sys/vm/nr_hugepages"
    old = open(path).read().strip()
    try:
        with open(path, "w") as f:
            f.write(str(int(old) + count))
        yield
    finally:
        with open(path, "w") as f:
            f.write(old)


@pytest.mark.needs("root", "afxdp")
def test_umem_in_hugepages_when_available_else_normal_pages():
    with xsk.Umem(frames=16, fill_size=16, comp_size=16, hugepages=False) as u:
        assert not u.hugepages and u.hugepages_note == "not requested"
    free_path = Path("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages")
    if not free_path.exists():
        pytest.skip("no 2 MiB hugepage pool (/sys/kernel/mm/hugepages/hugepages-2048kB)")
    with _hugepages(2):
        free = int(free_path.read_text())
        if free < 1:
            pytest.skip("the kernel could not set aside a 2 MiB hugepage (memory fragmented)")
        with xsk.Umem(frames=512, fill_size=512, comp_size=512) as u:  # exactly 2 MiB
            assert u.hugepages and u.base % xsk.HUGEPAGE == 0
            u.array[:] = 7  # the whole area is mapped and writable
            assert u.array.size == 512 * 4096
        if free > 16:
            return  # a provisioned pool: asking for more than it holds would take too long
        # more than the pool holds: normal pages, and the note says why
        frames = (free + 1) * 512
        with xsk.Umem(frames=frames, fill_size=512, comp_size=512) as u:
            assert not u.hugepages and "vm.nr_hugepages" in u.hugepages_note


# --- no root needed ---------------------------------------------------------------------------
class FakeRings:
    """An rx and a fill ring in plain memory, laid out like the kernel's, for the ring ops."""

    def __init__(self, size: int = 8, start: int = 0):
        self.mem = np.zeros(4096, np.uint64)
        base = int(self.mem.ctypes.data)
        self.ri = ri = np.zeros(xsk.RI_LEN, np.int64)
        for r, off in ((xsk.RI_RX, 0), (xsk.RI_FQ, 16384)):
            ri[r + 0], ri[r + 1], ri[r + 3] = base + off, base + off + 64, base + off + 128
            ri[r + 2], ri[r + 4], ri[r + 5] = base + off + 256, size - 1, size
        self.u32 = np.frombuffer(self.mem, np.uint32)
        self.desc = np.frombuffer(self.mem, np.uint64)
        for r, off in ((xsk.RI_RX, 0), (xsk.RI_FQ, 16384)):
            self.u32[off // 4] = self.u32[(off + 64) // 4] = start  # producer, consumer
            ri[r + 6] = start
            ri[r + 7] = start
        ri[xsk.RI_FQ_CACHED_CONS] = (start + size) & 0xFFFFFFFF  # libxdp: consumer + size
        ri[xsk.RI_FRAME_SIZE] = 2048
        self.size = size

    def kernel_rx(self, addr: int, length: int) -> None:
        prod = int(self.u32[0])
        slot = (256 + (prod & (self.size - 1)) * 16) // 8
        self.desc[slot] = addr
        self.u32[(slot + 1) * 2] = length
        self.u32[0] = (prod + 1) & 0xFFFFFFFF

    def kernel_fill_take(self) -> int:
        cons = int(self.u32[(16384 + 64) // 4])
        addr = int(self.desc[(16384 + 256) // 8 + (cons & (self.size - 1))])
        self.u32[(16384 + 64) // 4] = (cons + 1) & 0xFFFFFFFF
        return addr


@pytest.mark.parametrize("start", [0, 0xFFFFFFFD])  # the u32 indices wrap mid-test
def test_ring_ops_on_simulated_rings(start):
    f = FakeRings(8, start)
    ri = f.ri
    assert xsk.rx_peek(ri, 4) == (0, start)
    for k in range(5):
        f.kernel_rx(k * 2048 + 256, 60 + k)
    n, idx = xsk.rx_peek(ri, 3)
    assert (n, idx) == (3, start)
    assert [xsk.rx_desc(ri, idx + i) for i in range(3)] == [(256, 60), (2304, 61), (4352, 62)]
    assert xsk.rx_peek(ri, 8) == (2, (start + 3) & 0xFFFFFFFF)  # the cached rest
    assert int(f.u32[16]) == start  # nothing released yet
    xsk.rx_release(ri, 5)
    assert int(f.u32[16]) == (start + 5) & 0xFFFFFFFF
    assert xsk.rx_peek(ri, 8)[0] == 0
    assert xsk.frame_addr(ri, 4352 + 99) == 4096
    # fill: the ring holds 8; a reserve beyond that is cut to what is free
    assert xsk.fill_free(ri) == 8
    got, idx = xsk.fill_reserve(ri, 6)
    assert (got, idx) == (6, start)
    for i in range(got):
        xsk.fill_addr_set(ri, idx + i, i * 2048)
    assert int(f.u32[16384 // 4]) == start  # not visible before submit
    xsk.fill_submit(ri, got)
    assert int(f.u32[16384 // 4]) == (start + 6) & 0xFFFFFFFF
    assert xsk.fill_reserve(ri, 5)[0] == 2
    xsk.fill_submit(ri, 0)
    ri[xsk.RI_FQ_CACHED_PROD] = (start + 6) & 0xFFFFFFFF  # cancel that reservation
    assert xsk.fill_put(ri, 6 * 2048) == 1 and xsk.fill_put(ri, 7 * 2048) == 1
    assert xsk.fill_put(ri, 0) == 0 and xsk.fill_free(ri) == 0  # full
    assert [f.kernel_fill_take() for _ in range(3)] == [0, 2048, 4096]
    assert xsk.fill_free(ri) == 3
    assert xsk.fill_put(ri, 3 * 2048) == 1
    assert not xsk.fill_needs_wakeup(ri)
    f.u32[(16384 + 128) // 4] = xsk.XDP_RING_NEED_WAKEUP
    assert xsk.fill_needs_wakeup(ri)


def test_kick_reports_errno_without_raising():
    f = FakeRings()
    f.ri[xsk.RI_FD] = 1 << 20  # not an open fd
    assert xsk.kick(f.ri) == -errno.EBADF
    assert (f.ri[xsk.RI_KICKS], f.ri[xsk.RI_KICK_ERRORS], f.ri[xsk.RI_KICK_ERRNO]) == (
        1,
        1,
        errno.EBADF,
    )


def test_binding_constants_come_from_the_headers():
    lib = xsk.lib
    assert (lib.XDP_COPY, lib.XDP_ZEROCOPY, lib.XDP_USE_NEED_WAKEUP) == (2, 4, 8)
    assert (lib.XDP_FLAGS_SKB_MODE, lib.XDP_FLAGS_DRV_MODE) == (2, 4)
    assert lib.XDP_PACKET_HEADROOM == 256 and lib.XDP_RING_NEED_WAKEUP == 1
    assert lib.XSK_LIBXDP_FLAGS__INHIBIT_PROG_LOAD == 1
    assert lib.XSK_UMEM__DEFAULT_FRAME_SIZE == 4096
    ffi = xsk.ffi
    assert ffi.sizeof("struct xdp_desc") == 16
    assert ffi.offsetof("struct xsk_ring_cons", "producer") == 16
    # the C wrappers of libxdp's inline ring functions agree with the numba ring ops
    f = FakeRings(8, 0xFFFFFFFE)
    ring = ffi.new("struct xsk_ring_cons *")
    ring.cached_prod = ring.cached_cons = 0xFFFFFFFE
    ring.mask, ring.size = 7, 8
    ring.producer = ffi.cast("uint32_t *", int(f.ri[xsk.RI_RX_PRODUCER]))
    ring.consumer = ffi.cast("uint32_t *", int(f.ri[xsk.RI_RX_CONSUMER]))
    ring.ring = ffi.cast("void *", int(f.ri[xsk.RI_RX_RING]))
    for k in range(3):
        f.kernel_rx(k * 4096 + 256, 100 + k)
    idx = ffi.new("uint32_t *")
    assert lib.xsk_ring_cons__peek(ring, 8, idx) == 3
    desc = lib.xsk_ring_cons__rx_desc(ring, (idx[0] + 2) & 0xFFFFFFFF)
    assert (desc.addr, desc.len) == (8448, 102)
    n, i0 = xsk.rx_peek(f.ri, 8)
    assert (n, i0) == (3, idx[0]) and xsk.rx_desc(f.ri, i0 + 2) == (8448, 102)


def test_ethtool_commands_come_from_the_headers_and_fail_with_the_errno():
    from dataplane import ethtool

    # the uapi numbers (<linux/sockios.h>, <linux/ethtool.h>), through the compiled binding
    assert (ethtool.SIOCETHTOOL, ethtool.ETHTOOL_GCHANNELS) == (0x8946, 0x3C)
    assert ethtool.ETHTOOL_GET_TS_INFO == 0x41
    assert xsk.ffi.sizeof("struct ethtool_channels") == 36
    with pytest.raises(ethtool.EthtoolError) as e:
        ethtool.channels("tw-no-such0")
    assert e.value.errno == errno.ENODEV and "tw-no-such0: ETHTOOL_GCHANNELS" in str(e.value)
    assert ethtool.ts_info("lo").phc_index == -1  # software time stamps only


IR_SCRIPT = textwrap.dedent(
    r"""
    import json, re
    import numpy as np
    from numba import njit, types
    from dataplane import xsk

    from tests.irscan import allocating_control, scan

    def ring_scan(dispatcher):
        calls, text = scan(dispatcher)
        return {
            "calls": calls,
            "acquire": bool(re.search(r"load atomic i32, (i32\*|ptr) [^,]+ acquire", text)),
            "release": bool(re.search(r"store atomic i32 [^,]+, (i32\*|ptr) [^,]+ release",
                                      text)),
            "recvfrom": "@recvfrom(" in text,
        }

    @njit(nogil=True, _nrt=False)
    def every_op(ri, umem):
        total = 0
        n, idx = xsk.rx_peek(ri, 64)
        for i in range(n):
            addr, length = xsk.rx_desc(ri, idx + i)
            total += umem[addr] + length
            xsk.fill_put(ri, xsk.frame_addr(ri, addr))
        xsk.rx_release(ri, n)
        got, fidx = xsk.fill_reserve(ri, xsk.fill_free(ri))
        for i in range(got):
            xsk.fill_addr_set(ri, fidx + i, 0)
        xsk.fill_submit(ri, got)
        c, cidx = xsk.comp_peek(ri, 8)
        for i in range(c):
            total += xsk.comp_addr(ri, cidx + i)
        xsk.comp_release(ri, c)
        if xsk.fill_needs_wakeup(ri):
            total += xsk.kick(ri)
        return total

    every_op.compile((types.int64[::1], types.uint8[::1]))
    xsk.rx_drop.compile((types.int64[::1], types.int64))
    print(json.dumps({"every_op": ring_scan(every_op), "rx_drop": ring_scan(xsk.rx_drop),
                      "control": ring_scan(allocating_control())}))
    """
)


def test_ring_ops_compile_without_allocation_and_with_acquire_release(tmp_path):
    env = {"NUMBA_CACHE_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, "-c", IR_SCRIPT],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        cwd=str(HERE.parent),
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert any(k.startswith("NRT_") for k in result["control"]["calls"]), result["control"]
    for name in ("every_op", "rx_drop"):
        r = result[name]
        assert r["calls"] == {}, (name, r)
        assert r["acquire"] and r["release"] and r["recvfrom"], (name, r)


def test_ring_info_layout_is_dense_and_named():
    names = {k: v for k, v in vars(xsk).items() if k.startswith("RI_") and k != "RI_LEN"}
    slots = [v for k, v in names.items() if k not in ("RI_RX", "RI_FQ", "RI_CQ")]
    assert len(set(slots)) == len(slots) and max(slots) < xsk.RI_LEN
