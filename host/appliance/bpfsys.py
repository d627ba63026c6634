"""BPF objects through libbpf, and what every bcc-loading module of the control plane shares.

bcc compiles and loads programs and creates their maps; what it does not do -- pinning,
opening a pinned object or one by id from another process, program information, map
access by fd, ``BPF_PROG_RUN`` on crafted or live frames -- goes through libbpf's calls,
bound (with the kernel's structs and constants read from the headers) in the cffi module
``dataplane._xsk``. Every call here raises ``BpfError`` (an ``OSError`` with the kernel's
errno) on failure, through one ``_check``.

Keys and values are anything with the buffer protocol (bytes, bytearray, numpy arrays);
a value read is written into the buffer given, which must hold the map's value size (per
CPU maps: ``possible_cpus()`` values, each rounded up to 8 bytes).

``stderr_captured`` and ``brief`` turn libbcc/clang's diagnostics (written straight to
fd 2) into one-line errors.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys
import tempfile
from collections.abc import Iterator
from typing import NamedTuple

from dataplane._xsk import ffi, lib

BPF_ANY = int(lib.BPF_ANY)
BPF_NOEXIST = int(lib.BPF_NOEXIST)
BPF_EXIST = int(lib.BPF_EXIST)
BPF_F_TEST_XDP_LIVE_FRAMES = int(lib.BPF_F_TEST_XDP_LIVE_FRAMES)


class BpfError(OSError):
    """A libbpf call failed; ``errno`` is the kernel's, the message names the call."""


def _check(rc: int, what: str) -> int:
    """``rc`` of a libbpf call (>= 0, or a negative errno): raise ``BpfError`` if < 0."""
    if rc < 0:
        raise BpfError(-rc, f"{what}: {os.strerror(-rc)}")
    return rc


# --- objects: pins, ids, information -------------------------------------------------------
def pin(fd: int, path: str) -> None:
    """Pin program or map ``fd`` at ``path`` (in a mounted bpffs)."""
    _check(lib.bpf_obj_pin(fd, os.fsencode(path)), f"pin {path}")


def open_pinned(path: str) -> int:
    """A new fd of the object pinned at ``path`` (the caller closes it)."""
    return _check(lib.bpf_obj_get(os.fsencode(path)), f"open {path}")


def prog_fd_by_id(prog_id: int) -> int:
    """A new fd of loaded program ``prog_id`` (needs CAP_SYS_ADMIN)."""
    return _check(lib.bpf_prog_get_fd_by_id(prog_id), f"program {prog_id}")


def map_fd_by_id(map_id: int) -> int:
    """A new fd of map ``map_id`` (needs CAP_SYS_ADMIN)."""
    return _check(lib.bpf_map_get_fd_by_id(map_id), f"map {map_id}")


def _info(fd: int, ctype: str):
    info = ffi.new(f"struct {ctype} *")
    size = ffi.new("__u32 *", ffi.sizeof(info[0]))
    _check(lib.bpf_obj_get_info_by_fd(fd, info, size), f"{ctype} of fd {fd}")
    return info


def prog_info(fd: int) -> tuple[int, str]:
    """(id, name) of program ``fd``."""
    info = _info(fd, "bpf_prog_info")
    return int(info.id), ffi.string(info.name).decode(errors="replace")


def map_info(fd: int) -> tuple[int, str]:
    """(id, name) of map ``fd``."""
    info = _info(fd, "bpf_map_info")
    return int(info.id), ffi.string(info.name).decode(errors="replace")


def possible_cpus() -> int:
    """How many values a per-CPU map holds per key."""
    return _check(lib.libbpf_num_possible_cpus(), "possible CPUs")


# --- maps ------------------------------------------------------------------------------------
def lookup(fd: int, key, value):
    """Read the value of ``key`` into ``value`` (a writable buffer); returns ``value``."""
    out = ffi.from_buffer(value, require_writable=True)
    _check(lib.bpf_map_lookup_elem(fd, ffi.from_buffer(key), out), f"lookup in map fd {fd}")
    return value


def update(fd: int, key, value, flags: int = BPF_ANY) -> None:
    """Write ``value`` at ``key`` (one update: a program sees the old or the new value)."""
    _check(
        lib.bpf_map_update_elem(fd, ffi.from_buffer(key), ffi.from_buffer(value), flags),
        f"update of map fd {fd}",
    )


def delete(fd: int, key) -> bool:
    """Delete ``key``; False when it was not there."""
    rc = lib.bpf_map_delete_elem(fd, ffi.from_buffer(key))
    if rc == -errno.ENOENT:
        return False
    _check(rc, f"delete in map fd {fd}")
    return True


def next_key(fd: int, key, out) -> bool:
    """Write the key after ``key`` (None: the first key) into ``out``; False at the end."""
    rc = lib.bpf_map_get_next_key(
        fd,
        ffi.NULL if key is None else ffi.from_buffer(key),
        ffi.from_buffer(out, require_writable=True),
    )
    if rc == -errno.ENOENT:
        return False
    _check(rc, f"next key of map fd {fd}")
    return True


# --- running a program -----------------------------------------------------------------------
class ProgRun(NamedTuple):
    retval: int  # the program's return value (of the last repetition)
    data_size_out: int  # bytes written to data_out
    duration: int  # average ns per repetition


def xdp_md(length: int, ingress_ifindex: int, rx_queue_index: int = 0):
    """An XDP context for ``prog_run``: a frame of ``length`` bytes received on
    (``ingress_ifindex``, ``rx_queue_index``) of the calling thread's namespace."""
    return ffi.new(
        "struct xdp_md *",
        {
            "data": 0,
            "data_end": length,
            "ingress_ifindex": ingress_ifindex,
            "rx_queue_index": rx_queue_index,
        },
    )


def prog_run(
    prog_fd: int,
    data,
    *,
    ctx=None,
    data_out=None,
    repeat: int = 1,
    flags: int = 0,
    batch_size: int = 0,
) -> ProgRun:
    """``BPF_PROG_RUN`` of ``prog_fd`` on ``data`` (a buffer), ``repeat`` times, with an
    optional context (``xdp_md``); the frame the program leaves is written into
    ``data_out`` (a writable buffer) when given. ``flags`` and ``batch_size`` as the
    kernel takes them (``BPF_F_TEST_XDP_LIVE_FRAMES``: every repetition a real frame)."""
    opts = ffi.new("struct bpf_test_run_opts *")
    opts.sz = ffi.sizeof("struct bpf_test_run_opts")
    data_in = ffi.from_buffer(data)
    opts.data_in, opts.data_size_in = data_in, len(data_in)
    if data_out is not None:
        out = ffi.from_buffer(data_out, require_writable=True)
        opts.data_out, opts.data_size_out = out, len(out)
    if ctx is not None:
        opts.ctx_in, opts.ctx_size_in = ctx, ffi.sizeof(ctx[0])
    opts.repeat, opts.flags, opts.batch_size = repeat, flags, batch_size
    _check(lib.bpf_prog_test_run_opts(prog_fd, opts), f"BPF_PROG_RUN of program fd {prog_fd}")
    return ProgRun(int(opts.retval), int(opts.data_size_out), int(opts.duration))


# --- bcc's diagnostics -----------------------------------------------------------------------
@contextlib.contextmanager
def stderr_captured() -> Iterator[list[str]]:
    """Collect what libbcc and clang write to fd 2 (they bypass sys.stderr)."""
    out: list[str] = []
    with tempfile.TemporaryFile() as tmp:
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(tmp.fileno(), 2)
        try:
            yield out
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            out.append(tmp.read().decode(errors="replace"))


def brief(text: str, lines: int = 6, tail: int = 0) -> str:
    """The first ``lines`` non-empty lines of a compiler's output (and its last ``tail``:
    a verifier states its reason at the end of its log), on one line."""
    keep = [ln for ln in text.strip().splitlines() if ln.strip()]
    if len(keep) > lines + tail:
        skipped = len(keep) - lines - tail
        keep = keep[:lines] + [f"... ({skipped} more lines)"] + (keep[-tail:] if tail else [])
    return " | ".join(keep)
