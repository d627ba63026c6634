"""Network namespaces, shared by the appliance (``run.netns``) and the lab.

``entered(name)`` switches the calling thread into a named namespace for a ``with`` block
(sockets and netlink handles opened inside stay in that namespace afterwards);
``enter(name)`` moves the calling thread for good (a freshly forked process: the process).
The switch itself is ``pyroute2.netns.setns`` on an open namespace file, so a namespace is
never created by accident (flags 0).
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator

from pyroute2 import netns as _pr_netns

RUN_DIR = _pr_netns.NETNS_RUN_DIR


class NetnsError(OSError):
    """A namespace cannot be found or entered; the message says why and what to do."""


def path(name: str) -> str:
    """The namespace file ``ip netns`` (and pyroute2) bind-mount for ``name``."""
    return os.path.join(RUN_DIR, name)


def exists(name: str) -> bool:
    return os.path.exists(path(name))


def _setns(fd: int) -> None:
    try:
        _pr_netns.setns(fd, flags=0)
    except OSError as e:
        raise NetnsError(
            e.errno,
            f"cannot switch network namespace: {os.strerror(e.errno)}"
            + (" (run as root)" if e.errno == errno.EPERM else ""),
        ) from None


def _open(name: str) -> int:
    if not exists(name):
        raise NetnsError(
            errno.ENOENT, f"network namespace {name} does not exist (run: tickwire lab up)"
        )
    return os.open(path(name), os.O_RDONLY | os.O_CLOEXEC)


@contextlib.contextmanager
def entered_fd(nsfd: int) -> Iterator[None]:
    """Run the block with the calling thread in the namespace open as ``nsfd`` (nothing
    to switch when it is the thread's own)."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        a, b = os.fstat(home), os.fstat(nsfd)
        if (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino):
            yield
            return
        _setns(nsfd)
        try:
            yield
        finally:
            _setns(home)
    finally:
        os.close(home)


@contextlib.contextmanager
def entered(name: str) -> Iterator[None]:
    """Run the block with the calling thread in network namespace ``name``."""
    target = _open(name)
    try:
        with entered_fd(target):
            yield
    finally:
        os.close(target)


def enter(name: str) -> None:
    """Move the calling thread (for a fresh process: the process) into ``name`` for good."""
    fd = _open(name)
    try:
        _setns(fd)
    finally:
        os.close(fd)
