"""Load the XDP steering program (``bpf/steer.c``, bcc) and attach it (pyroute2).

``Steering(interfaces, channels)`` compiles and loads ``tw_steer``, fills ``tw_channels``
with the subscribed (group, port) -> (channel, line) entries, gives every interface its
range of XSKMAP slots, and attaches the program to every interface: native mode first,
generic (skb) mode when the driver has no native XDP (``mode="auto"``, one log line), or
exactly the mode asked for. It never replaces a program someone else attached
(``XDP_FLAGS_UPDATE_IF_NOEXIST``, and a check before trying) and detaches only its own
(``XDP_FLAGS_REPLACE`` with its program as the expected one) -- on ``close()`` /
``__exit__``, when attaching a later interface fails, at interpreter exit (``atexit``),
and on SIGTERM/SIGINT (handlers installed from the main thread detach, then hand the
signal on to what was there before: the default action kills the process with it).
A SIGKILL leaves the program attached: ``detach(ifname)`` removes it.

Namespaces: the interfaces are looked up in ``netns`` (a name under /var/run/netns) or,
when it is None, in the network namespace of the thread that creates the Steering (so
``with host.netns.entered(ns): Steering(...)`` works). Every netlink operation, including
the detach from a signal handler, runs with the calling thread switched into that
namespace for its duration, so it reaches the right interfaces from any thread.

AF_XDP sockets register in the XSKMAP ``xsks_map_fd`` at ``xsk_slot(ifname, queue)``.
Errors are ``AttachError`` (an ``OSError``: errno plus a message that says what to do);
bad arguments are ``ValueError``.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import ipaddress
import os
import signal
import socket
import threading
from collections.abc import Callable, Iterator

import bpf
from dataplane import xdpabi as abi
from host import netns
from host.appliance import bpfsys

BPF_DIR = bpf.DIR
STEER_SRC = BPF_DIR / "steer.c"

MODES = ("auto", "native", "generic")
_MODE_FLAGS = {
    "native": abi.XDP_FLAGS_DRV_MODE,
    "generic": abi.XDP_FLAGS_SKB_MODE,
    "offload": abi.XDP_FLAGS_HW_MODE,
}
_IP_OFF_ADVICE = {"native": "xdpdrv", "generic": "xdpgeneric", "offload": "xdpoffload"}

Log = Callable[[str], None]


class AttachError(OSError):
    """The program cannot be built, loaded, attached or detached; the message says why
    and what to do."""


# --- namespaces ----------------------------------------------------------------------------
_tls = threading.local()  # .depth: netlink operations in progress on this thread


def _open_ns(netns: str | None) -> int:
    """An fd of namespace ``netns`` (never created here), or of the calling thread's."""
    path = "/proc/thread-self/ns/net" if netns is None else f"/var/run/netns/{netns}"
    if netns is not None and (not netns or "/" in netns):
        raise ValueError(f"netns: {netns!r} is not a namespace name")
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise AttachError(
            errno.ENOENT,
            f"network namespace {netns} does not exist (is the lab up? tickwire lab up)",
        ) from None


_in_ns = netns.entered_fd  # the namespace is held by fd: it outlives a rename or deletion


@contextlib.contextmanager
def _critical() -> Iterator[None]:
    """A SIGTERM/SIGINT arriving inside waits for the outermost block to end (netlink
    calls, attaching all interfaces, detaching all of them), then is handled."""
    _tls.depth = getattr(_tls, "depth", 0) + 1
    try:
        yield
    finally:
        _tls.depth -= 1
        if _tls.depth == 0 and _pending and threading.current_thread() is threading.main_thread():
            _handle_signal(_pending.pop(0))


def _netlink(nsfd: int, fn):
    """``fn(ipr)`` with an IPRoute opened in namespace ``nsfd`` by the calling thread."""
    from pyroute2 import IPRoute

    with _critical(), _in_ns(nsfd), IPRoute(ext_ack=True) as ipr:
        return fn(ipr)


# --- program information (best effort: None when it cannot be read) -------------------------
def _prog_info(fd: int) -> tuple[int, str] | None:
    try:
        return bpfsys.prog_info(fd)
    except OSError:
        return None


def _prog_name(prog_id: int) -> str | None:
    """The name of loaded program ``prog_id`` (None without CAP_SYS_ADMIN)."""
    try:
        fd = bpfsys.prog_fd_by_id(prog_id)
    except OSError:
        return None
    try:
        info = _prog_info(fd)
        return info[1] if info else None
    finally:
        os.close(fd)


def _xdp_progs(link) -> list[tuple[str, int]]:
    """(mode, program id) of every XDP program on a link message."""
    xdp = link.get_attr("IFLA_XDP")
    if xdp is None:
        return []
    how = xdp.get_attr("IFLA_XDP_ATTACHED")
    ids = {
        m: xdp.get_attr(a)
        for m, a in (
            ("native", "IFLA_XDP_DRV_PROG_ID"),
            ("generic", "IFLA_XDP_SKB_PROG_ID"),
            ("offload", "IFLA_XDP_HW_PROG_ID"),
        )
    }
    single = {"xdp": "native", "xdpgeneric": "generic", "xdpoffload": "offload"}
    if how in single:
        mode = single[how]
        return [(mode, ids[mode] or xdp.get_attr("IFLA_XDP_PROG_ID"))]
    if how == "xdpmulti":
        return [(m, i) for m, i in ids.items() if i]
    return []


def _xdp_attrs(fd: int, flags: int, expected_fd: int | None = None) -> dict:
    attrs = [("IFLA_XDP_FD", fd), ("IFLA_XDP_FLAGS", flags)]
    if expected_fd is not None:
        attrs.append(("IFLA_XDP_EXPECTED_FD", expected_fd))
    return {"attrs": attrs}


def _where(ifname: str, netns: str | None) -> str:
    return f"{netns}/{ifname}" if netns else ifname


# --- public listing and cleanup ------------------------------------------------------------
def attached(netns: str | None = None) -> list[dict]:
    """Every XDP program attached in ``netns`` (None: the calling thread's namespace):
    one dict per (interface, mode) with ifname, ifindex, mode (native, generic or
    offload), prog_id and prog_name (None when it cannot be read)."""
    nsfd = _open_ns(netns)
    try:
        links = _netlink(
            nsfd,
            lambda ipr: [
                (ln["index"], ln.get_attr("IFLA_IFNAME"), _xdp_progs(ln)) for ln in ipr.get_links()
            ],
        )
    finally:
        os.close(nsfd)
    return [
        {"ifname": name, "ifindex": idx, "mode": mode, "prog_id": pid, "prog_name": _prog_name(pid)}
        for idx, name, progs in links
        for mode, pid in progs
    ]


def detach(ifname: str, netns: str | None = None) -> list[str]:
    """Remove whatever XDP program is attached to ``ifname`` (any owner, every mode);
    returns the modes it was attached in (empty: nothing was attached)."""
    from pyroute2 import NetlinkError

    nsfd = _open_ns(netns)
    try:

        def run(ipr):
            idx = _lookup(ipr, ifname, netns)
            progs = _xdp_progs(ipr.get_links(idx)[0])
            for mode, _ in progs:
                ipr.link("set", index=idx, xdp=_xdp_attrs(-1, _MODE_FLAGS[mode]))
            return [m for m, _ in progs]

        try:
            return _netlink(nsfd, run)
        except NetlinkError as e:
            raise AttachError(
                e.code,
                f"cannot detach XDP from {_where(ifname, netns)}: "
                f"{e.args[1] if len(e.args) > 1 else e}"
                + (" (run as root)" if e.code == errno.EPERM else ""),
            ) from None
    finally:
        os.close(nsfd)


def _lookup(ipr, ifname: str, netns: str | None) -> int:
    found = ipr.link_lookup(ifname=ifname)
    if not found:
        raise AttachError(
            errno.ENODEV,
            f"no interface {ifname} in "
            f"{'namespace ' + netns if netns else 'this network namespace'}"
            " (is the lab up? tickwire lab up)",
        )
    return found[0]


# --- compiling -----------------------------------------------------------------------------
def _compile(log: Log):
    """Compile and load ``tw_steer``: (bcc BPF object, program fd owned by the caller)."""
    try:
        from bcc import BPF
    except ImportError as e:
        raise AttachError(
            errno.ENOPKG, f"bcc is not importable ({e}): install python3-bpfcc (make setup)"
        ) from None
    cflags = [f"-I{BPF_DIR}"]  # no -D text: every parameter goes through the maps
    with bpfsys.stderr_captured() as err:
        try:
            bpf = BPF(src_file=str(STEER_SRC).encode(), cflags=cflags)
        except Exception as e:
            failure = e
        else:
            failure = None
    text = err[0] if err else ""
    if failure is not None:
        denied = "could not open bpf map" in text and "Operation not permitted" in text
        if denied or ("error:" not in text and os.geteuid() != 0):
            raise AttachError(
                errno.EPERM,
                "cannot create the BPF maps: run as root (needs CAP_BPF and CAP_NET_ADMIN)",
            ) from None
        if "error:" in text:
            raise AttachError(
                errno.EINVAL, f"{STEER_SRC.name} does not compile: {bpfsys.brief(text)}"
            ) from None
        raise AttachError(
            errno.EINVAL, f"bcc could not build {STEER_SRC.name}: {bpfsys.brief(text) or failure}"
        ) from None
    if text.strip():
        log(f"bcc: {bpfsys.brief(text)}")
    with bpfsys.stderr_captured() as err:
        try:
            fn = bpf.load_func(abi.PROG_NAME.encode(), BPF.XDP)
        except Exception as e:
            failure = e
        else:
            failure = None
    if failure is not None:
        bpf.cleanup()
        text = err[0] if err else ""
        if "Operation not permitted" in text + str(failure):
            raise AttachError(
                errno.EPERM,
                f"cannot load {abi.PROG_NAME}: run as root (needs CAP_BPF and CAP_NET_ADMIN)",
            ) from None
        raise AttachError(
            errno.EINVAL,
            f"the kernel verifier rejected {abi.PROG_NAME}: "
            + (bpfsys.brief(text, 2, tail=6) or str(failure)),
        ) from None
    return bpf, os.dup(fn.fd)


# --- exit paths ----------------------------------------------------------------------------
_live: list[Steering] = []
_saved_handlers: dict[int, object] = {}
_pending: list[int] = []
_atexit_registered = False
_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _detach_all() -> None:
    for s in list(_live):
        with contextlib.suppress(Exception):
            s.close()


def _handle_signal(signum: int) -> None:
    prev = _saved_handlers.get(signum, signal.SIG_DFL)  # before the last close() restores it
    _detach_all()
    if callable(prev):
        prev(signum, None)  # e.g. default_int_handler: KeyboardInterrupt
    elif prev == signal.SIG_DFL:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)  # die of the signal, as without us


def _on_signal(signum: int, frame) -> None:
    if getattr(_tls, "depth", 0):
        _pending.append(signum)  # a netlink call is in progress here: finish it first
        return
    _handle_signal(signum)


def _forget_after_fork() -> None:
    """A forked child owns none of its parent's attachments: never detach them."""
    _live.clear()
    _pending.clear()


os.register_at_fork(after_in_child=_forget_after_fork)


def _register(s: Steering) -> None:
    global _atexit_registered
    _live.append(s)
    if not _atexit_registered:
        atexit.register(_detach_all)
        _atexit_registered = True
    if threading.current_thread() is not threading.main_thread():
        return  # only the main thread may install handlers; atexit and close() remain
    for sig in _SIGNALS:
        prev = signal.getsignal(sig)
        if prev is _on_signal or prev in (signal.SIG_IGN, None):
            continue  # ignored (or set outside Python): the signal does not end us
        _saved_handlers[sig] = prev
        signal.signal(sig, _on_signal)


def _unregister(s: Steering) -> None:
    with contextlib.suppress(ValueError):
        _live.remove(s)
    if _live or threading.current_thread() is not threading.main_thread():
        return
    for sig, prev in list(_saved_handlers.items()):
        if signal.getsignal(sig) is _on_signal:
            signal.signal(sig, prev)
        del _saved_handlers[sig]


# --- the steering program ------------------------------------------------------------------
def _validate_channels(channels) -> list[tuple[str, int, int, str]]:
    out, keys, ids = [], set(), set()
    for entry in channels:
        try:
            group, port, channel, line = entry
        except (TypeError, ValueError):
            raise ValueError(f"channel {entry!r}: expected (group, port, channel, line)") from None
        try:
            addr = ipaddress.IPv4Address(group)
        except ValueError:
            raise ValueError(f"channel {entry!r}: {group!r} is not an IPv4 address") from None
        if not isinstance(port, int) or not 1 <= port <= 65535:
            raise ValueError(f"channel {entry!r}: port {port!r} is outside 1..65535")
        if not isinstance(channel, int) or not 0 <= channel < abi.MAX_CHANNELS:
            raise ValueError(
                f"channel {entry!r}: channel id {channel!r} is outside 0..{abi.MAX_CHANNELS - 1}"
            )
        if line not in abi.LINE_LETTERS:
            raise ValueError(f"channel {entry!r}: line {line!r} is not 'A' or 'B'")
        if (addr, port) in keys:
            raise ValueError(f"channel {entry!r}: {group}:{port} is subscribed twice")
        if (channel, line) in ids:
            raise ValueError(f"channel {entry!r}: channel {channel} line {line} is used twice")
        keys.add((addr, port))
        ids.add((channel, line))
        out.append((str(addr), port, channel, line))
    if len(out) > abi.MAX_CHANNELS:
        raise ValueError(f"channels: {len(out)} entries, at most {abi.MAX_CHANNELS}")
    return out


class Steering:
    """The steering program attached to ``interfaces`` for ``channels``, a list of
    (group, port, channel id, line letter); ``mode`` is auto, native or generic;
    ``log`` receives one-line notices (the generic fallback)."""

    def __init__(
        self,
        interfaces: list[str],
        channels: list[tuple[str, int, int, str]],
        mode: str = "auto",
        log: Log | None = None,
        netns: str | None = None,
    ):
        if mode not in MODES:
            raise ValueError(f"mode: {mode!r} is not one of {', '.join(MODES)}")
        if isinstance(interfaces, str) or not interfaces:
            raise ValueError("interfaces: expected a non-empty list of interface names")
        if len(set(interfaces)) != len(interfaces):
            raise ValueError(f"interfaces: {interfaces} names one twice")
        if len(interfaces) > abi.MAX_IFACES:
            raise ValueError(f"interfaces: at most {abi.MAX_IFACES}")
        for name in interfaces:
            if not isinstance(name, str) or not 0 < len(name) < 16 or "/" in name:
                raise ValueError(f"interfaces: {name!r} is not an interface name")
        self.channels = _validate_channels(channels)
        self.interfaces = list(interfaces)
        self.netns = netns
        self.requested_mode = mode
        self.mode: dict[str, str] = {}  # interface -> native | generic, once attached
        self.log: Log = log or (lambda msg: None)
        self._attached: dict[str, tuple[int, int]] = {}  # ifname -> (ifindex, mode flag)
        self._slots: dict[str, tuple[int, int]] = {}  # ifname -> (first slot, queues)
        self._bpf = None
        self._prog_fd = -1
        self._closed = False
        self._pid = os.getpid()
        self.prog_id: int | None = None
        self._nsfd = _open_ns(netns)
        with _critical():
            try:
                self._bpf, self._prog_fd = _compile(self.log)
                info = _prog_info(self._prog_fd)
                self.prog_id = info[0] if info else None
                self._fill_channels()
                _register(self)
                next_slot = 0
                for ifname in self.interfaces:
                    next_slot = self._attach(ifname, next_slot)
            except BaseException:
                self.close()
                raise

    # -- setup
    def _fill_channels(self) -> None:
        table = self._bpf[abi.MAP_CHANNELS.encode()]
        for group, port, channel, line in self.channels:
            key = abi.chan_key(socket.inet_aton(group), port)
            val = abi.chan_val(channel, abi.LINE_LETTERS.index(line))
            table[table.Key.from_buffer_copy(key.tobytes())] = table.Leaf.from_buffer_copy(
                val.tobytes()
            )

    def _attach(self, ifname: str, first_slot: int) -> int:
        from pyroute2 import NetlinkError

        where = _where(ifname, self.netns)

        def probe(ipr):
            idx = _lookup(ipr, ifname, self.netns)
            link = ipr.get_links(idx)[0]
            return idx, link.get_attr("IFLA_NUM_RX_QUEUES") or 1, _xdp_progs(link)

        idx, queues, progs = _netlink(self._nsfd, probe)
        if progs:
            mode, pid = progs[0]
            raise AttachError(
                errno.EBUSY,
                f"{where} already has XDP program {pid} "
                f"({_prog_name(pid) or 'name unknown'}, {mode} mode); tickwire "
                "does not replace it: detach it first (ip link set dev "
                f"{ifname} {_IP_OFF_ADVICE[mode]} off)",
            )
        if first_slot + queues > abi.MAX_QUEUES:
            raise AttachError(
                errno.E2BIG,
                f"{where}: {queues} rx queues do not fit the "
                f"{abi.MAX_QUEUES} AF_XDP slots left over by the other "
                "interfaces; reduce the queue count (ethtool -L)",
            )
        slots = self._bpf[abi.MAP_IFSLOTS.encode()]
        slots[slots.Key(idx)] = slots.Leaf(first_slot)
        self._slots[ifname] = (first_slot, queues)

        tries = ["native", "generic"] if self.requested_mode == "auto" else [self.requested_mode]
        for mode in tries:
            flag = _MODE_FLAGS[mode]
            attrs = _xdp_attrs(self._prog_fd, abi.XDP_FLAGS_UPDATE_IF_NOEXIST | flag)
            try:
                # recorded first: whatever ends this process from here on detaches it
                self._attached[ifname] = (idx, flag)
                _netlink(self._nsfd, lambda ipr, a=attrs: ipr.link("set", index=idx, xdp=a))
            except NetlinkError as e:
                del self._attached[ifname]
                why = e.args[1] if len(e.args) > 1 else str(e)
                if e.code == errno.EOPNOTSUPP and mode == "native" and len(tries) > 1:
                    self.log(
                        f"{where}: no native XDP in its driver ({why}); using generic "
                        "mode, which copies every packet (slower)"
                    )
                    continue
                raise self._attach_error(where, ifname, mode, e.code, why) from None
            self.mode[ifname] = mode
            return first_slot + queues
        raise AssertionError("unreachable")

    def _attach_error(self, where: str, ifname: str, mode: str, code: int, why: str):
        if code == errno.EOPNOTSUPP:
            advice = (
                "its driver has no native XDP: use mode generic"
                if mode == "native"
                else "XDP is not available on it"
            )
        elif code in (errno.EBUSY, errno.EEXIST):
            advice = (
                "another XDP program is attached (ip -d link show dev "
                f"{ifname}); tickwire does not replace it: detach it first"
            )
        elif code == errno.EPERM:
            advice = "run as root (needs CAP_NET_ADMIN)"
        elif mode == "native":
            advice = (
                "native XDP refused this interface's setup (MTU, queues): fix that "
                "or use mode generic"
            )
        else:
            advice = "see the kernel's reason"
        return AttachError(
            code, f"cannot attach {abi.PROG_NAME} to {where} in {mode} mode: {why}; {advice}"
        )

    # -- teardown
    def _detach_one(self, ifname: str) -> str | None:
        from pyroute2 import NetlinkError

        idx, flag = self._attached[ifname]
        attrs = _xdp_attrs(-1, abi.XDP_FLAGS_REPLACE | flag, expected_fd=self._prog_fd)

        def run(ipr) -> bool:
            try:
                ipr.link("set", index=idx, xdp=attrs)
            except NetlinkError as e:
                if e.code != errno.EEXIST:
                    raise
                # ours is not the program attached (an attach that failed, or a replacement)
                return bool(_xdp_progs(ipr.get_links(idx)[0]))
            return False

        where = _where(ifname, self.netns)
        try:
            if _netlink(self._nsfd, run):
                self.log(f"{where}: another XDP program replaced {abi.PROG_NAME}; left it")
        except NetlinkError as e:
            if e.code == errno.ENODEV:
                return None  # the interface (or its namespace) is gone, our program with it
            return f"{where}: {e}"
        except AttachError as e:
            return f"{where}: {e.strerror}"
        return None

    def close(self) -> None:
        """Detach from every interface (only our program), free the maps. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if os.getpid() != self._pid:  # a forked child: the attachments are the parent's
            self._attached.clear()
        failed = []
        with _critical():
            self._teardown(failed)
        if failed:
            raise AttachError(
                errno.EIO,
                "could not detach " + "; ".join(failed) + " (tickwire status shows what is left)",
            )

    def _teardown(self, failed: list[str]) -> None:
        try:
            for ifname in list(self._attached):
                problem = self._detach_one(ifname)
                del self._attached[ifname]
                if problem:
                    failed.append(problem)
        finally:
            _unregister(self)
            if self._prog_fd >= 0:
                os.close(self._prog_fd)
                self._prog_fd = -1
            if self._bpf is not None:
                with contextlib.suppress(Exception):
                    self._bpf.cleanup()
                atexit.unregister(self._bpf.cleanup)  # bcc's own: it would keep it alive
            os.close(self._nsfd)

    def __enter__(self) -> Steering:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self.close()
        except AttachError as e:
            if exc is None:
                raise
            self.log(str(e))  # do not hide the exception that ended the block

    # -- use
    @property
    def prog_fd(self) -> int:
        """fd of the loaded tw_steer program (valid until close)."""
        return self._prog_fd

    @property
    def xsks_map_fd(self) -> int:
        """fd of tw_xsks: an AF_XDP socket on (ifname, queue) goes in ``xsk_slot``."""
        return self._bpf[abi.MAP_XSKS.encode()].map_fd

    def xsk_slot(self, ifname: str, queue: int) -> int:
        first, queues = self._slots[ifname]
        if not 0 <= queue < queues:
            raise ValueError(f"queue {queue}: {ifname} has queues 0..{queues - 1}")
        return first + queue

    def stats(self) -> dict:
        """Counters summed over CPUs: the global ones by name (xdpabi.GLOBAL_NAMES) and
        ``channels`` {(channel, line letter): {"packets": n, "bytes": n}}."""
        table = self._bpf[abi.MAP_STATS.encode()]

        def total(i: int) -> int:
            return int(sum(v for v in table.getvalue(table.Key(i))))

        out: dict = {name: total(i) for i, name in enumerate(abi.GLOBAL_NAMES)}
        out["channels"] = {}
        for _, _, channel, line in self.channels:
            n = abi.LINE_LETTERS.index(line)
            out["channels"][(channel, line)] = {
                "packets": total(abi.stat_index(channel, n, abi.S_PACKETS)),
                "bytes": total(abi.stat_index(channel, n, abi.S_BYTES)),
            }
        return out
