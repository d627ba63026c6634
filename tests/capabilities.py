"""What this machine lets the tests do, each probed for real once per session.

``missing(names)`` returns the reason the first unavailable capability of ``names`` (its
prerequisites first) is unavailable, or None; ``tests/conftest.py`` turns the ``needs``
and ``lab`` markers into that skip. A probe does the smallest real thing the tests will do:
it creates and deletes a namespace, attaches an XDP program to a veth in a throwaway
namespace, fetches the mirror's release file through apt -- never just "is the binary on
PATH".
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket
import subprocess
from collections.abc import Callable

from host.image.debian import SUITE, apt_mirror  # the image root's Debian and mirror

MIRROR = apt_mirror()
AF_XDP = 44  # <linux/socket.h>; Python does not export it


def _root() -> str | None:
    uid = os.geteuid()
    return None if uid == 0 else f"needs root (running as uid {uid})"


@contextlib.contextmanager
def _throwaway_netns(tag: str):
    from pyroute2 import netns

    name = f"twprobe{tag}{os.getpid()}"
    netns.create(name)
    try:
        yield name
    finally:
        netns.remove(name)


def _netns() -> str | None:
    try:
        with _throwaway_netns("ns"):
            pass
    except Exception as e:  # noqa: BLE001 -- any failure means no namespaces for us
        return f"needs network namespaces: creating one failed ({e})"
    return None


def _bpffs() -> str | None:
    with open("/proc/self/mounts") as f:
        mounts = [line.split() for line in f]
    if any(m[1] == "/sys/fs/bpf" and m[2] == "bpf" for m in mounts):
        return None
    return "needs bpffs at /sys/fs/bpf (mount -t bpf bpf /sys/fs/bpf)"


def _bcc() -> str | None:
    try:
        import bcc  # noqa: F401
    except ImportError as e:
        return f"needs bcc (python3-bpfcc): {e}"
    return None


XDP_PASS_PROGRAM = b"int pass(struct xdp_md *ctx) { return XDP_PASS; }"


def _xdp() -> str | None:
    """A trivial program compiled by bcc and attached in native mode to a veth."""
    from bcc import BPF
    from pyroute2 import IPRoute

    from host import netns

    try:
        with _throwaway_netns("xdp") as ns:
            with IPRoute(netns=ns) as ipr:
                ipr.link("add", ifname="twp0", kind="veth", peer="twp1")
                for name in ("twp0", "twp1"):
                    ipr.link("set", index=ipr.link_lookup(ifname=name)[0], state="up")
            bpf = BPF(text=XDP_PASS_PROGRAM)
            try:
                fn = bpf.load_func(b"pass", BPF.XDP)
                with netns.entered(ns):
                    bpf.attach_xdp(b"twp0", fn, BPF.XDP_FLAGS_DRV_MODE)
                    bpf.remove_xdp(b"twp0", BPF.XDP_FLAGS_DRV_MODE)
            finally:
                bpf.cleanup()
    except Exception as e:  # noqa: BLE001
        return f"needs XDP: attaching a trivial program to a veth failed ({e})"
    return None


def _afxdp() -> str | None:
    try:
        socket.socket(AF_XDP, socket.SOCK_RAW).close()
    except OSError as e:
        return f"needs AF_XDP sockets: socket(AF_XDP) failed ({e.strerror})"
    try:
        from dataplane import xsk  # noqa: F401
    except Exception as e:  # noqa: BLE001
        return f"needs AF_XDP: the libxdp binding dataplane.xsk is not importable ({e})"
    return None


def _tool(*argv: str) -> Callable[[], str | None]:
    def probe() -> str | None:
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired) as e:
            return f"needs {argv[0]}: `{' '.join(argv)}` failed ({e})"
        if done.returncode != 0:
            return f"needs {argv[0]}: `{' '.join(argv)}` exited {done.returncode}"
        return None

    return probe


def _mirror() -> str | None:
    """The Debian mirror's release file, fetched by apt itself (its proxy settings too)."""
    import tempfile

    if MIRROR is None:
        return f"needs a Debian mirror for {SUITE} in apt's sources (/etc/apt)"
    with tempfile.TemporaryDirectory() as tmp:
        argv = [
            "/usr/lib/apt/apt-helper",
            "-o",
            "Acquire::http::Timeout=10",
            "-o",
            "Acquire::Retries=0",
            "download-file",
            f"{MIRROR}/dists/{SUITE}/InRelease",
            os.path.join(tmp, "InRelease"),
        ]
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as e:
            return f"needs the package mirror {MIRROR}: apt-helper failed ({e})"
    if done.returncode != 0:
        why = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        return f"needs the package mirror {MIRROR}: apt cannot reach it ({why[0]})"
    return None


# name -> (prerequisites, probe); prerequisites are checked first, so a skip names the
# most basic thing missing
CAPABILITIES: dict[str, tuple[tuple[str, ...], Callable[[], str | None]]] = {
    "root": ((), _root),
    "netns": (("root",), _netns),
    "bpffs": ((), _bpffs),
    "bcc": ((), _bcc),
    "xdp": (("root", "netns", "bcc"), _xdp),
    "afxdp": (("root",), _afxdp),
    "gcc": ((), _tool("gcc", "--version")),
    "setpriv": ((), _tool("setpriv", "--version")),
    "chroot": ((), _tool("chroot", "--version")),
    "debootstrap": ((), _tool("debootstrap", "--version")),
    "qemu": ((), _tool("qemu-system-x86_64", "--version")),
    "mirror": ((), _mirror),
}


@functools.cache
def probe(name: str) -> str | None:
    """Why ``name`` is unavailable (its prerequisites included), or None; probed once."""
    prereqs, run = CAPABILITIES[name]
    for p in prereqs:
        if (why := probe(p)) is not None:
            return why
    return run()


def missing(names) -> str | None:
    for name in names:
        if (why := probe(name)) is not None:
            return why
    return None
