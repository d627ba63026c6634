"""The bpf(2) system call and what every bcc-loading module of the control plane shares.

bcc covers loading; a few things it does not (pinning, reading maps by fd from another
process, program info by id, ``BPF_PROG_TEST_RUN`` on crafted frames) go through
``sys_bpf`` with the kernel's attribute structs below. ``stderr_captured`` and ``brief``
turn libbcc/clang's diagnostics (written straight to fd 2) into one-line errors.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import platform
import sys
import tempfile
from collections.abc import Iterator

_libc = ctypes.CDLL(None, use_errno=True)
NR_BPF = {"x86_64": 321, "aarch64": 280}.get(platform.machine())

BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_UPDATE_ELEM = 2
BPF_OBJ_PIN = 6
BPF_OBJ_GET = 7
BPF_PROG_TEST_RUN = 10
BPF_PROG_GET_FD_BY_ID = 13
BPF_OBJ_GET_INFO_BY_FD = 15


class ElemAttr(ctypes.Structure):
    _fields_ = [("map_fd", ctypes.c_uint32), ("pad", ctypes.c_uint32),
                ("key", ctypes.c_uint64), ("value", ctypes.c_uint64),
                ("flags", ctypes.c_uint64)]  # fmt: skip


class ObjAttr(ctypes.Structure):
    _fields_ = [("pathname", ctypes.c_uint64), ("bpf_fd", ctypes.c_uint32),
                ("file_flags", ctypes.c_uint32), ("path_fd", ctypes.c_int32),
                ("pad", ctypes.c_uint32)]  # fmt: skip


class InfoAttr(ctypes.Structure):
    _fields_ = [("bpf_fd", ctypes.c_uint32), ("info_len", ctypes.c_uint32),
                ("info", ctypes.c_uint64)]  # fmt: skip


class FdByIdAttr(ctypes.Structure):
    _fields_ = [("id", ctypes.c_uint32), ("next_id", ctypes.c_uint32),
                ("open_flags", ctypes.c_uint32)]  # fmt: skip


class TestRunAttr(ctypes.Structure):
    """``BPF_PROG_TEST_RUN`` arguments (tests run programs on crafted frames)."""

    __test__ = False  # not a pytest class
    _fields_ = [("prog_fd", ctypes.c_uint32), ("retval", ctypes.c_uint32),
                ("data_size_in", ctypes.c_uint32), ("data_size_out", ctypes.c_uint32),
                ("data_in", ctypes.c_uint64), ("data_out", ctypes.c_uint64),
                ("repeat", ctypes.c_uint32), ("duration", ctypes.c_uint32),
                ("ctx_size_in", ctypes.c_uint32), ("ctx_size_out", ctypes.c_uint32),
                ("ctx_in", ctypes.c_uint64), ("ctx_out", ctypes.c_uint64),
                ("flags", ctypes.c_uint32), ("cpu", ctypes.c_uint32),
                ("batch_size", ctypes.c_uint32), ("pad", ctypes.c_uint32)]  # fmt: skip


def sys_bpf(cmd: int, attr: ctypes.Structure) -> int:
    """bpf(2); returns its result, raises ``OSError`` with the errno on failure."""
    if NR_BPF is None:
        raise OSError(errno.ENOSYS, f"no bpf(2) system call number for {platform.machine()}")
    r = _libc.syscall(NR_BPF, cmd, ctypes.byref(attr), ctypes.sizeof(attr))
    if r < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return r


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


def brief(text: str, lines: int = 6) -> str:
    """The first ``lines`` non-empty lines of a compiler's output, on one line."""
    keep = [ln for ln in text.strip().splitlines() if ln.strip()]
    if len(keep) > lines:
        keep = keep[:lines] + [f"... ({len(keep) - lines} more lines)"]
    return " | ".join(keep)
