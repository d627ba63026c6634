"""The hot path's clocks: ``CLOCK_MONOTONIC`` (vDSO ``clock_gettime``, the clock the XDP
program's ``bpf_ktime_get_ns`` reads) and the TSC (``rdtscp``).

``stamp`` is the one way the consumer stamps an event: with an invariant TSC and a stored
calibration (``tickwire calibrate``: the TSC's Hz against ``CLOCK_MONOTONIC``) it reads the
TSC and puts it on ``CLOCK_MONOTONIC``'s scale (``mono_base + (tsc - tsc_base) * ns_per_tick``,
the base pair taken together when the ring is created); otherwise it calls
``clock_gettime``. Either way every stamp is nanoseconds on one scale, so a receive stamp
from the kernel and a publish stamp from the TSC subtract. The clock's parameters live in
the event ring's header (``dataplane.events``), where readers find them.
"""

from __future__ import annotations

import platform

import llvmlite.binding as llvm
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from dataplane import xsk

CLOCK_REALTIME = 0
CLOCK_MONOTONIC = 1
HAS_TSC = platform.machine() in ("x86_64", "AMD64")
llvm.initialize_native_asmparser()  # rdtscp is inline assembly: LLVM must parse it


# libc is called by symbol name (xsk.call_by_symbol): a ctypes function pointer would be
# baked into the code as a constant, and numba refuses to cache such a function -- every
# start of the consumer would compile its loops from scratch (about a minute).
def int64_args(context, builder, sig, args):
    return [context.cast(builder, v, t, types.int64) for v, t in zip(args, sig.args, strict=True)]


@intrinsic
def clock_gettime(typingctx, clock, addr):
    """``clock_gettime(clock, (struct timespec *)addr)``."""
    if not isinstance(clock, types.Integer) or not isinstance(addr, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        i32, i8p = ir.IntType(32), ir.IntType(8).as_pointer()
        return xsk.call_by_symbol(
            builder, "clock_gettime", i32, [i32, i8p], int64_args(context, builder, sig, args)
        )

    return types.int64(clock, addr), codegen


@intrinsic
def rdtscp(typingctx):
    """The TSC, read with ``rdtscp`` (it waits for the instructions before it)."""

    def codegen(context, builder, sig, args):
        fnty = ir.FunctionType(ir.IntType(64), [])
        return builder.asm(
            fnty,
            "rdtscp\n\tshlq $$32, %rdx\n\torq %rdx, %rax",
            "={rax},~{rcx},~{rdx},~{dirflag},~{fpsr},~{flags}",
            [],
            side_effect=True,
        )

    return types.int64(), codegen


@njit(cache=True, nogil=True, inline="always", _nrt=False)
def now_ns(ts):
    """CLOCK_MONOTONIC in ns; ``ts``: int64[2] scratch."""
    clock_gettime(CLOCK_MONOTONIC, ts.ctypes.data)
    return ts[0] * 1_000_000_000 + ts[1]


@njit(cache=True, nogil=True, inline="always", _nrt=False)
def real_ns(ts):
    """CLOCK_REALTIME in ns (the kernel's software receive stamps are on it)."""
    clock_gettime(CLOCK_REALTIME, ts.ctypes.data)
    return ts[0] * 1_000_000_000 + ts[1]
