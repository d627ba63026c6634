"""AF_XDP sockets (libxdp through ``dataplane._xsk``) and their rings, driven from numba.

Python side, set-up only:

- ``Umem``: ``frames * frame_size`` bytes of packet memory, in 2 MiB hugepages when the
  pool has them, else in normal pages (``.hugepages`` says which and ``.hugepages_note``
  why; the caller reports it once), registered with the kernel together with its fill and
  completion rings. ``.array`` is a numpy ``uint8`` view of the whole area, ``.base`` its
  address. Create it in the network namespace of the interface it will be bound to.
- ``XskSocket``: one receive socket on ``(ifname, queue)``, copy mode unless asked for
  zero-copy, need-wakeup on, libxdp's own XDP program never loaded: an external program
  redirects into an XSKMAP, and ``register(map_fd[, key])`` puts this socket at its
  queue's slot (or at ``key``, for a map shared by several interfaces).
  It owns its ``Umem`` (or takes one created by the caller) and, at set-up, gives the kernel
  as many frames as the fill ring holds. Works when the calling thread has entered the
  interface's namespace (libxdp resolves the name and binds in the thread's namespace).
- Failures raise ``XskError`` (an ``OSError``) with the errno and advice.

Hot path, numba: ``sock.ring_info`` (``ri``) is an ``int64`` array of the rings' addresses,
masks and sizes, the UMEM's base and size, the frame size, the socket's fd, the cached ring
indices and a few counters, at the ``RI_*`` indices. The ``@njit`` functions below take
``ri`` and scalars only, allocate nothing, and follow libxdp's ``xsk.h`` ring protocol: the
other side's index is read with a load-acquire, our own index is published with a
store-release (descriptors are read before the consumer index moves on; fill addresses are
written before the producer index does). Ring indices are free-running ``u32`` counters;
``idx`` values returned here are such counters (``& mask`` picks the slot).

A receive loop::

    n, idx = rx_peek(ri, batch)
    for i in range(n):
        addr, length = rx_desc(ri, idx + i)     # addr: offset of the packet in the UMEM
        ...                                     # read umem[addr:addr + length]
        fill_put(ri, frame_addr(ri, addr))      # the frame goes back to the kernel
    rx_release(ri, n)
    if fill_needs_wakeup(ri):
        kick(ri)

The ``ri`` of a closed socket points at unmapped memory: stop the loop before ``close()``.
Drive a socket's rings either through ``ri`` or through libxdp's functions on the cffi ring
structs (``sock.rx``, ``umem.fill``), not both: each side keeps its own cached indices.
With ``frames <= fill_size`` (the default) the fill ring always has room for every frame
the kernel hands back, so recycling never fails.
"""

from __future__ import annotations

import errno as _errno
import mmap
import os
import resource
import time

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

try:
    from dataplane._xsk import ffi, lib
except ImportError as e:  # pragma: no cover - only when the build step was skipped
    raise ImportError(
        "dataplane._xsk (the cffi binding of libxdp) is not built: run `make setup`, "
        "which installs libxdp-dev/libbpf-dev and builds it"
    ) from e

from dataplane import ethtool
from dataplane.xdpabi import XDP_FLAGS_DRV_MODE, XDP_FLAGS_SKB_MODE

# --- constants from the headers (via the compiled binding) -----------------------------
XDP_COPY = int(lib.XDP_COPY)
XDP_ZEROCOPY = int(lib.XDP_ZEROCOPY)
XDP_USE_NEED_WAKEUP = int(lib.XDP_USE_NEED_WAKEUP)
XDP_RING_NEED_WAKEUP = int(lib.XDP_RING_NEED_WAKEUP)
XDP_PACKET_HEADROOM = int(lib.XDP_PACKET_HEADROOM)
XSK_LIBXDP_FLAGS__INHIBIT_PROG_LOAD = int(lib.XSK_LIBXDP_FLAGS__INHIBIT_PROG_LOAD)
XSK_RING_CONS__DEFAULT_NUM_DESCS = int(lib.XSK_RING_CONS__DEFAULT_NUM_DESCS)
XSK_UMEM__DEFAULT_FRAME_SIZE = int(lib.XSK_UMEM__DEFAULT_FRAME_SIZE)
_MSG_DONTWAIT = int(lib.MSG_DONTWAIT)

# Defaults: 8192-entry rings ride out VM/scheduler stalls without starving the fill ring.
DEFAULT_RING = 8192
DEFAULT_FRAMES = 8192
DEFAULT_BATCH = 64
HUGEPAGE = 2 << 20
_MAP_HUGETLB = getattr(mmap, "MAP_HUGETLB", 0x40000)  # <asm-generic/mman-common.h>
_MAP_POPULATE = getattr(mmap, "MAP_POPULATE", 0x8000)

# --- ring_info layout ----------------------------------------------------------------------
# Each ring takes 8 slots: its producer/consumer/ring/flags addresses, mask, size, and the
# cached producer/consumer indices (libxdp's cached_prod/cached_cons, same meaning: for a
# producer ring cached_cons is the kernel's consumer + size).
_PRODUCER, _CONSUMER, _RING, _FLAGS, _MASK, _SIZE, _CACHED_PROD, _CACHED_CONS = range(8)
RI_RX = 0  # rx ring (kernel produces descriptors, we consume)
RI_FQ = 8  # fill ring (we produce frame addresses, the kernel consumes)
RI_CQ = 16  # completion ring (kernel produces, we consume; idle on a receive-only socket)

RI_RX_PRODUCER, RI_RX_CONSUMER, RI_RX_RING, RI_RX_FLAGS = 0, 1, 2, 3
RI_RX_MASK, RI_RX_SIZE, RI_RX_CACHED_PROD, RI_RX_CACHED_CONS = 4, 5, 6, 7
RI_FQ_PRODUCER, RI_FQ_CONSUMER, RI_FQ_RING, RI_FQ_FLAGS = 8, 9, 10, 11
RI_FQ_MASK, RI_FQ_SIZE, RI_FQ_CACHED_PROD, RI_FQ_CACHED_CONS = 12, 13, 14, 15
RI_CQ_PRODUCER, RI_CQ_CONSUMER, RI_CQ_RING, RI_CQ_FLAGS = 16, 17, 18, 19
RI_CQ_MASK, RI_CQ_SIZE, RI_CQ_CACHED_PROD, RI_CQ_CACHED_CONS = 20, 21, 22, 23
RI_UMEM_BASE = 24  # address of the UMEM (what rx addresses are offsets into)
RI_UMEM_SIZE = 25  # bytes registered: frames * frame_size
RI_FRAME_SIZE = 26  # power of two (aligned mode)
RI_FD = 27  # the AF_XDP socket's fd
RI_RX_BATCH = 28  # configured receive batch (read by consumer loops, not by the ring ops)
RI_FILL_BATCH = 29  # configured refill batch
RI_KICKS = 30  # kick() calls
RI_KICK_ERRORS = 31  # kick() calls that failed (the last errno is in RI_KICK_ERRNO)
RI_KICK_ERRNO = 32
RI_LEN = 40

_U32 = 0xFFFFFFFF


# --- errors --------------------------------------------------------------------------------
class XskError(OSError):
    """An AF_XDP set-up step failed; ``errno`` is the kernel's, ``advice`` says what to do."""

    def __init__(self, err: int, what: str, advice: str = ""):
        self.advice = advice or ADVICE.get(err, "")
        text = f"{what}: {os.strerror(err)}"
        if self.advice:
            text += f" ({self.advice})"
        super().__init__(err, text)


ADVICE = {
    _errno.EBUSY: "queue already has an AF_XDP socket or a zero-copy user",
    _errno.EPERM: "needs root (CAP_NET_ADMIN, CAP_NET_RAW)",
    _errno.EACCES: "needs root (CAP_NET_ADMIN, CAP_NET_RAW)",
    _errno.EOPNOTSUPP: "mode not supported: try copy mode / generic XDP",
    _errno.ENOMEM: "UMEM too large for locked memory: raise RLIMIT_MEMLOCK",
    _errno.ENODEV: "no such interface in this network namespace: enter the interface's "
    "namespace first",
    _errno.ENXIO: "no such interface in this network namespace: enter the interface's "
    "namespace first",
    _errno.EINVAL: "invalid argument: queue id beyond the interface's queues, a ring size "
    "that is not a power of two, or a frame size/flag the kernel rejects",
    _errno.EAFNOSUPPORT: "this kernel has no AF_XDP sockets (CONFIG_XDP_SOCKETS)",
}


def _check(rc: int, what: str) -> int:
    """libxdp returns 0 or a non-negative value on success, a negative errno on failure."""
    if rc < 0:
        raise XskError(-rc, what)
    return rc


def _power_of_two(name: str, value: int) -> int:
    value = int(value)
    if value <= 0 or value & (value - 1):
        raise ValueError(f"{name} must be a power of two, got {value}")
    return value


def _raise_memlock() -> None:
    """UMEM pages are pinned and, without CAP_IPC_LOCK, charged to RLIMIT_MEMLOCK."""
    if os.geteuid() != 0:
        return
    try:
        resource.setrlimit(
            resource.RLIMIT_MEMLOCK, (resource.RLIM_INFINITY, resource.RLIM_INFINITY)
        )
    except (ValueError, OSError):
        pass  # the bind reports ENOMEM with advice if it matters


# --- UMEM ----------------------------------------------------------------------------------
class Umem:
    """Packet memory plus its fill and completion rings (``xsk_umem__create``)."""

    def __init__(
        self,
        frames: int = DEFAULT_FRAMES,
        frame_size: int = XSK_UMEM__DEFAULT_FRAME_SIZE,
        fill_size: int = DEFAULT_RING,
        comp_size: int = DEFAULT_RING,
        hugepages: bool = True,
    ):
        if int(frames) <= 0:
            raise ValueError(f"frames must be positive, got {frames}")
        self.frames = int(frames)
        self.frame_size = _power_of_two("frame_size", frame_size)
        self.fill_size = _power_of_two("fill_size", fill_size)
        self.comp_size = _power_of_two("comp_size", comp_size)
        self.size = self.frames * self.frame_size
        self._umem = ffi.NULL
        self._users = 0
        self._map, self.hugepages, self.hugepages_note = _map_area(self.size, hugepages)
        self.array = np.frombuffer(self._map, dtype=np.uint8, count=self.size)
        self.base = int(self.array.ctypes.data)
        _raise_memlock()
        self.fill = ffi.new("struct xsk_ring_prod *")
        self.comp = ffi.new("struct xsk_ring_cons *")
        cfg = ffi.new("struct xsk_umem_config *")
        cfg.fill_size, cfg.comp_size = self.fill_size, self.comp_size
        cfg.frame_size, cfg.frame_headroom, cfg.flags = self.frame_size, 0, 0
        pp = ffi.new("struct xsk_umem **")
        try:
            _check(
                lib.xsk_umem__create(
                    pp, ffi.cast("void *", self.base), self.size, self.fill, self.comp, cfg
                ),
                f"UMEM of {self.frames} x {self.frame_size} B",
            )
        except BaseException:
            self._unmap()
            raise
        self._umem = pp[0]

    @property
    def fd(self) -> int:
        return int(lib.xsk_umem__fd(self._umem))

    def _unmap(self) -> None:
        self.array = None
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:
                pass  # a caller still holds a view; the mapping goes with the last one
            self._map = None

    def close(self) -> None:
        if self._umem != ffi.NULL:
            if self._users:
                raise XskError(_errno.EBUSY, "UMEM delete", "close its socket first")
            _check(lib.xsk_umem__delete(self._umem), "UMEM delete")
            self._umem = ffi.NULL
        self._unmap()

    def __enter__(self) -> Umem:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _map_area(size: int, hugepages: bool) -> tuple[mmap.mmap, bool, str]:
    """Anonymous private memory: hugepages first, normal pages when the pool is empty."""
    base = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_POPULATE
    prot = mmap.PROT_READ | mmap.PROT_WRITE
    note = "not requested"
    if hugepages:
        length = -(-size // HUGEPAGE) * HUGEPAGE
        try:
            return (
                mmap.mmap(-1, length, flags=base | _MAP_HUGETLB, prot=prot),
                True,
                f"{length // HUGEPAGE} x 2 MiB hugepages",
            )
        except OSError as e:
            note = (
                f"no {length // HUGEPAGE} free 2 MiB hugepages ({os.strerror(e.errno)}; "
                "set vm.nr_hugepages): UMEM in normal pages"
            )
    return mmap.mmap(-1, size, flags=base, prot=prot), False, note


# --- the socket ----------------------------------------------------------------------------
class XskSocket:
    """One receive-only AF_XDP socket bound to ``(ifname, queue)``.

    ``umem``: a ``Umem`` made by the caller (in the interface's namespace), else one of
    ``frames x frame_size`` with ``fill_size``/``comp_size`` rings is made and owned.
    ``rx_size``: rx ring entries. ``zerocopy``: bind with ``XDP_ZEROCOPY`` (default copy
    mode: what veth and generic XDP support). ``need_wakeup``: bind with
    ``XDP_USE_NEED_WAKEUP``. ``xdp_mode``: the attach mode recorded in the config
    (libxdp's program is never loaded). ``rx_batch``/``fill_batch``: stored in
    ``ring_info`` for consumer loops. ``prefill``: put ``min(frames, fill_size)`` frames
    into the fill ring now (``.filled`` says how many). ``busy_timeout``: how long an
    EBUSY bind is retried (see ``_create``) before it is reported.
    """

    def __init__(
        self,
        ifname: str,
        queue: int = 0,
        umem: Umem | None = None,
        *,
        rx_size: int = DEFAULT_RING,
        frames: int = DEFAULT_FRAMES,
        frame_size: int = XSK_UMEM__DEFAULT_FRAME_SIZE,
        fill_size: int = DEFAULT_RING,
        comp_size: int = DEFAULT_RING,
        zerocopy: bool = False,
        need_wakeup: bool = True,
        xdp_mode: str = "native",
        rx_batch: int = DEFAULT_BATCH,
        fill_batch: int = DEFAULT_BATCH,
        hugepages: bool = True,
        prefill: bool = True,
        busy_timeout: float = 1.0,
    ):
        if xdp_mode not in ("native", "skb"):
            raise ValueError(f"xdp_mode must be 'native' or 'skb', got {xdp_mode!r}")
        if int(queue) < 0:
            raise ValueError(f"queue must be >= 0, got {queue}")
        if rx_batch <= 0 or fill_batch <= 0:
            raise ValueError("rx_batch and fill_batch must be positive")
        self.ifname, self.queue = ifname, int(queue)
        self.rx_size = _power_of_two("rx_size", rx_size)
        self.zerocopy = bool(zerocopy)
        self._xsk = ffi.NULL
        self._owns_umem = umem is None
        if umem is None:
            umem = Umem(frames, frame_size, fill_size, comp_size, hugepages)
        elif umem._users:
            raise ValueError("this Umem already backs a socket: one Umem per (interface, queue)")
        self.umem = umem
        try:
            self._create(need_wakeup, xdp_mode, busy_timeout)
        except BaseException:
            if self._owns_umem:
                umem.close()
            raise
        umem._users += 1
        self.ring_info = self._ring_info(rx_batch, fill_batch)
        self.filled = 0
        if prefill:
            self.filled = int(_prime_fill(self.ring_info, min(umem.frames, umem.fill_size)))

    def _create(self, need_wakeup: bool, xdp_mode: str, busy_timeout: float) -> None:
        cfg = ffi.new("struct xsk_socket_config *")
        cfg.rx_size, cfg.tx_size = self.rx_size, 0
        cfg.libxdp_flags = XSK_LIBXDP_FLAGS__INHIBIT_PROG_LOAD
        cfg.xdp_flags = XDP_FLAGS_DRV_MODE if xdp_mode == "native" else XDP_FLAGS_SKB_MODE
        cfg.bind_flags = (XDP_ZEROCOPY if self.zerocopy else XDP_COPY) | (
            XDP_USE_NEED_WAKEUP if need_wakeup else 0
        )
        self.rx = ffi.new("struct xsk_ring_cons *")
        pp = ffi.new("struct xsk_socket **")
        mode = "zero-copy" if self.zerocopy else "copy"
        what = f"AF_XDP socket on {self.ifname} queue {self.queue} ({mode} mode)"
        # A socket closed a moment ago frees its queue in deferred kernel work (~20 ms
        # here), so a bind right after a close can see EBUSY: retry that for a while.
        deadline = time.monotonic() + busy_timeout
        while True:
            rc = lib.xsk_socket__create(
                pp, self.ifname.encode(), self.queue, self.umem._umem, self.rx, ffi.NULL, cfg
            )
            if rc != -_errno.EBUSY or time.monotonic() >= deadline:
                break
            time.sleep(0.002)
        if rc == -_errno.EINVAL:
            try:
                ch = ethtool.channels(self.ifname)
            except OSError:
                ch = None  # no ethtool on this driver: the plain advice
            if ch is not None:
                raise XskError(
                    _errno.EINVAL,
                    what,
                    ADVICE[_errno.EINVAL] + f"; ethtool -l "
                    f"{self.ifname}: {ch.rx} rx, {ch.combined} combined",
                )
        _check(rc, what)
        self._xsk = pp[0]

    def _ring_info(self, rx_batch: int, fill_batch: int) -> np.ndarray:
        ri = np.zeros(RI_LEN, np.int64)
        out = ffi.new("__u64[]", int(lib.TW_RING_INFO_LEN))
        for base, fn, ring in (
            (RI_RX, lib.tw_cons_info, self.rx),
            (RI_FQ, lib.tw_prod_info, self.umem.fill),
            (RI_CQ, lib.tw_cons_info, self.umem.comp),
        ):
            fn(ring, out)
            ri[base : base + 8] = list(out)
        ri[RI_UMEM_BASE] = self.umem.base
        ri[RI_UMEM_SIZE] = self.umem.size
        ri[RI_FRAME_SIZE] = self.umem.frame_size
        ri[RI_FD] = self.fd
        ri[RI_RX_BATCH] = rx_batch
        ri[RI_FILL_BATCH] = fill_batch
        return ri

    @property
    def fd(self) -> int:
        return int(lib.xsk_socket__fd(self._xsk))

    def register(self, map_fd: int, key: int | None = None) -> None:
        """Put this socket in an XSKMAP: at its queue id (``xsk_socket__update_xskmap``),
        or at ``key`` when the map is shared by several interfaces' queues."""
        slot = self.queue if key is None else int(key)
        what = f"XSKMAP update (map fd {map_fd}, key {slot})"
        if key is None:
            rc = lib.xsk_socket__update_xskmap(self._xsk, int(map_fd))
        else:
            rc = lib.bpf_map_update_elem(
                int(map_fd), ffi.new("__u32 *", slot), ffi.new("int *", self.fd), 0
            )
        if rc == -_errno.E2BIG:
            raise XskError(-rc, what, "key beyond the XSKMAP's max_entries")
        if rc in (-_errno.EBADF, -_errno.EINVAL):
            raise XskError(-rc, what, "map_fd is not an open XSKMAP")
        _check(rc, what)

    def statistics(self) -> dict[str, int]:
        """The kernel's ``XDP_STATISTICS`` for this socket (drops, empty fill ring, ...)."""
        st = ffi.new("struct xdp_statistics *")
        _check(lib.tw_statistics(self.fd, st), "XDP_STATISTICS")
        return {
            k: int(getattr(st, k))
            for k in (
                "rx_dropped",
                "rx_invalid_descs",
                "tx_invalid_descs",
                "rx_ring_full",
                "rx_fill_ring_empty_descs",
                "tx_ring_empty_descs",
            )
        }

    def close(self) -> None:
        """Delete the socket, then the UMEM if this socket owns it."""
        if self._xsk != ffi.NULL:
            lib.xsk_socket__delete(self._xsk)
            self._xsk = ffi.NULL
            self.umem._users -= 1
        if self._owns_umem and self.umem is not None:
            self.umem.close()
        self.umem = None

    def __enter__(self) -> XskSocket:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --- raw memory access for numba --------------------------------------------------------------
def _ptr(builder, addr, bits):
    return builder.inttoptr(addr, ir.IntType(bits).as_pointer())


@intrinsic
def load_acquire_u32(typingctx, addr):
    """``__atomic_load_n((u32 *)addr, __ATOMIC_ACQUIRE)``, zero-extended."""
    if not isinstance(addr, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        v = builder.load_atomic(_ptr(builder, args[0], 32), "acquire", 4)
        return builder.zext(v, ir.IntType(64))

    return types.int64(addr), codegen


@intrinsic
def load_relaxed_u32(typingctx, addr):
    """A monotonic (relaxed) atomic load: never hoisted out of a loop, no barrier."""
    if not isinstance(addr, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        v = builder.load_atomic(_ptr(builder, args[0], 32), "monotonic", 4)
        return builder.zext(v, ir.IntType(64))

    return types.int64(addr), codegen


@intrinsic
def store_release_u32(typingctx, addr, value):
    """``__atomic_store_n((u32 *)addr, value, __ATOMIC_RELEASE)``."""
    if not (isinstance(addr, types.Integer) and isinstance(value, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        v = builder.trunc(context.cast(builder, args[1], sig.args[1], types.int64), ir.IntType(32))
        builder.store_atomic(v, _ptr(builder, args[0], 32), "release", 4)
        return context.get_dummy_value()

    return types.none(addr, value), codegen


@intrinsic
def load_u32(typingctx, addr):
    if not isinstance(addr, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        return builder.zext(builder.load(_ptr(builder, args[0], 32), align=4), ir.IntType(64))

    return types.int64(addr), codegen


@intrinsic
def load_u64(typingctx, addr):
    if not isinstance(addr, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        return builder.load(_ptr(builder, args[0], 64), align=8)

    return types.int64(addr), codegen


@intrinsic
def store_u64(typingctx, addr, value):
    if not (isinstance(addr, types.Integer) and isinstance(value, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        v = context.cast(builder, args[1], sig.args[1], types.int64)
        builder.store(v, _ptr(builder, args[0], 64), align=8)
        return context.get_dummy_value()

    return types.none(addr, value), codegen


def call_by_symbol(builder, name, ret, params, values):
    """Call the C function ``name`` declared by its symbol (resolved in the process when
    the code is loaded, so functions using it stay cacheable, unlike a ctypes/cffi function
    pointer baked in as a constant). ``values`` are LLVM values: an i64 given for a pointer
    parameter is converted with inttoptr, a wider integer than its parameter truncated.
    Returns the result sign-extended to i64."""
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, params), name)
    conv = []
    for v, t in zip(values, params, strict=True):
        if isinstance(t, ir.PointerType) and isinstance(v.type, ir.IntType):
            v = builder.inttoptr(v, t)
        elif isinstance(t, ir.IntType) and v.type.width > t.width:
            v = builder.trunc(v, t)
        conv.append(v)
    rc = builder.call(fn, conv)
    return rc if ret.width == 64 else builder.sext(rc, ir.IntType(64))


@intrinsic
def _recvfrom_dontwait(typingctx, fd):
    """``recvfrom(fd, NULL, 0, MSG_DONTWAIT, NULL, NULL)``: 0 or a negative errno."""
    if not isinstance(fd, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        i32, i64, i8p = ir.IntType(32), ir.IntType(64), ir.IntType(8).as_pointer()
        fd64 = context.cast(builder, args[0], sig.args[0], types.int64)
        rc = call_by_symbol(
            builder,
            "recvfrom",
            i64,
            [i32, i8p, i64, i32, i8p, i32.as_pointer()],
            [
                fd64,
                ir.Constant(i8p, None),
                ir.Constant(i64, 0),
                ir.Constant(i32, _MSG_DONTWAIT),
                ir.Constant(i8p, None),
                ir.Constant(i32.as_pointer(), None),
            ],
        )
        errloc = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(i32.as_pointer(), []), "__errno_location"
        )
        out = cgutils.alloca_once_value(builder, ir.Constant(i64, 0))
        with builder.if_then(builder.icmp_signed("<", rc, ir.Constant(i64, 0)), likely=False):
            err = builder.load(builder.call(errloc, []))
            builder.store(builder.neg(builder.sext(err, i64)), out)
        return builder.load(out)

    return types.int64(fd), codegen


# --- ring operations (numba) -----------------------------------------------------------------
@njit(cache=True, nogil=True, inline="always", _nrt=False)
def _cons_peek(ri, r, max_n):
    entries = (ri[r + _CACHED_PROD] - ri[r + _CACHED_CONS]) & _U32
    if entries == 0:
        ri[r + _CACHED_PROD] = load_acquire_u32(ri[r + _PRODUCER])
        entries = (ri[r + _CACHED_PROD] - ri[r + _CACHED_CONS]) & _U32
    n = min(entries, max_n)
    idx = ri[r + _CACHED_CONS]
    if n > 0:
        ri[r + _CACHED_CONS] = (idx + n) & _U32
    return n, idx


@njit(cache=True, nogil=True, inline="always", _nrt=False)
def _cons_release(ri, r, n):
    cons = ri[r + _CONSUMER]
    store_release_u32(cons, load_relaxed_u32(cons) + n)


@njit(cache=True, nogil=True, inline="always", _nrt=False)
def _prod_free(ri, r):
    ri[r + _CACHED_CONS] = (load_acquire_u32(ri[r + _CONSUMER]) + ri[r + _SIZE]) & _U32
    return (ri[r + _CACHED_CONS] - ri[r + _CACHED_PROD]) & _U32


@njit(cache=True, nogil=True, inline="always", _nrt=False)
def rx_peek(ri, max_n):
    """Up to ``max_n`` received descriptors: ``(n, idx)``, read them at ``idx .. idx+n-1``."""
    return _cons_peek(ri, RI_RX, max_n)


@njit(cache=True, nogil=True, inline="always", _nrt=False)
def rx_desc(ri, idx):
    """``(addr, len)`` of the descriptor at ring index ``idx``; addr is a UMEM offset."""
    p = ri[RI_RX_RING] + (idx & ri[RI_RX_MASK]) * 16  # struct xdp_desc {u64 addr; u32 len; ..}
    return load_u64(p), load_u32(p + 8)


@njit(cache=True, nogil=True, inline="always", _nrt=False)
def rx_release(ri, n):
    """Hand ``n`` peeked descriptors back to the kernel (after their frames were read)."""
    _cons_release(ri, RI_RX, n)


@njit(cache=True, nogil=True, inline="always", _nrt=False)
def frame_addr(ri, addr):
    """The start of the frame holding UMEM offset ``addr`` (aligned mode)."""
    return addr & ~(ri[RI_FRAME_SIZE] - 1)


@njit(cache=True, nogil=True, inline="always", _nrt=False)
def fill_free(ri):
    """Free slots in the fill ring now (re-reads the kernel's consumer index)."""
    return _prod_free(ri, RI_FQ)


@njit(cache=True, nogil=True, inline="always", _nrt=False)
def fill_reserve(ri, n):
    """Reserve up to ``n`` fill slots: ``(got, idx)``; fill them, then ``fill_submit``."""
    free = (ri[RI_FQ_CACHED_CONS] - ri[RI_FQ_CACHED_PROD]) & _U32
    if free < n:
        free = _prod_free(ri, RI_FQ)
    got = min(free, n)
    idx = ri[RI_FQ_CACHED_PROD]
    ri[RI_FQ_CACHED_PROD] = (idx + got) & _U32
    return got, idx


@njit(cache=True, nogil=True, inline="always", _nrt=False)
def fill_addr_set(ri, idx, addr):
    """Write frame address ``addr`` (a UMEM offset) into reserved fill slot ``idx``."""
    store_u64(ri[RI_FQ_RING] + (idx & ri[RI_FQ_MASK]) * 8, addr)


@njit(cache=True, nogil=True, inline="always", _nrt=False)
def fill_submit(ri, n):
    """Publish ``n`` reserved and written fill slots to the kernel."""
    prod = ri[RI_FQ_PRODUCER]
    store_release_u32(prod, load_relaxed_u32(prod) + n)


@njit(cache=True, nogil=True, inline="always", _nrt=False)
def fill_put(ri, addr):
    """Give one frame back to the kernel; 1 if it went in, 0 if the fill ring is full."""
    got, idx = fill_reserve(ri, 1)
    if got == 0:
        return 0
    fill_addr_set(ri, idx, addr)
    fill_submit(ri, 1)
    return 1


@njit(cache=True, nogil=True, inline="always", _nrt=False)
def fill_needs_wakeup(ri):
    """True when the kernel asks for a ``kick`` to see new fill entries (need-wakeup)."""
    return (load_relaxed_u32(ri[RI_FQ_FLAGS]) & XDP_RING_NEED_WAKEUP) != 0


@njit(cache=True, nogil=True, inline="always", _nrt=False)
def kick(ri):
    """Wake the kernel's receive side: a non-blocking zero-length ``recvfrom``.

    Returns 0 or a negative errno (EAGAIN, EBUSY, ENOBUFS and ENETDOWN are transient);
    counts calls and failures in ``ri``.
    """
    ri[RI_KICKS] += 1
    rc = _recvfrom_dontwait(ri[RI_FD])
    if rc < 0:
        ri[RI_KICK_ERRORS] += 1
        ri[RI_KICK_ERRNO] = -rc
    return rc


@njit(cache=True, nogil=True, inline="always", _nrt=False)
def comp_peek(ri, max_n):
    """Completion ring (transmit side): up to ``max_n`` finished frames, ``(n, idx)``."""
    return _cons_peek(ri, RI_CQ, max_n)


@njit(cache=True, nogil=True, inline="always", _nrt=False)
def comp_addr(ri, idx):
    return load_u64(ri[RI_CQ_RING] + (idx & ri[RI_CQ_MASK]) * 8)


@njit(cache=True, nogil=True, inline="always", _nrt=False)
def comp_release(ri, n):
    _cons_release(ri, RI_CQ, n)


@njit(cache=True, nogil=True, _nrt=False)
def _prime_fill(ri, frames):
    """Put frames ``0 .. frames-1`` into the fill ring; returns how many went in."""
    got, idx = fill_reserve(ri, frames)
    size = ri[RI_FRAME_SIZE]
    for i in range(got):
        fill_addr_set(ri, idx + i, i * size)
    fill_submit(ri, got)
    return got


@njit(cache=True, nogil=True, _nrt=False)
def rx_drop(ri, max_n):
    """Receive up to ``max_n`` packets and recycle their frames unread (a drop benchmark,
    and the shape of every consumer loop): returns how many were received. A frame the
    fill ring has no room for is dropped from circulation (never with frames <= fill_size).
    """
    n, idx = rx_peek(ri, max_n)
    if n == 0:
        if fill_needs_wakeup(ri):
            kick(ri)
        return 0
    got, fidx = fill_reserve(ri, n)
    for i in range(n):
        addr, _ = rx_desc(ri, idx + i)
        if i < got:
            fill_addr_set(ri, fidx + i, frame_addr(ri, addr))
    fill_submit(ri, got)
    rx_release(ri, n)
    if fill_needs_wakeup(ri):
        kick(ri)
    return n
