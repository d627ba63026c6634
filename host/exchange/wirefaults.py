"""Wire fault injection for the lab: ``bpf/fault.c`` on TC egress of the lines'
exchange-side interfaces (``tickwire lab fault``), driven through its maps.

One program instance serves a lab. It is compiled with bcc, and its program and maps are
pinned in bpffs under ``/sys/fs/bpf/tickwire/<prefix>/`` (``prog``, ``cfg``, ``stats``;
bpffs is mounted there first when it is not), so a later process -- another
``tickwire lab fault`` call, ``status``, ``lab down`` -- opens the same maps without
compiling anything. Attaching a line writes its slot of the ``cfg`` map (interface,
the line's group and port, no fault), zeroes its counters, adds a ``clsact`` qdisc to the
interface when it has none and a direct-action ``bpf`` filter (preference ``FILTER_PRIO``,
named ``tw_fault:<program id>``) on its egress hook. Detaching removes that filter, the
qdisc when no filter is left on it, the slot, and the pins once no line uses them.

Faults (see ``bpf/fault.c`` for the exact rules) apply to the line's multicast feed only
(every channel's, in a lab of several: they share the line's port, on groups of their own):
``drop_all``, ``cut`` (a window of CLOCK_MONOTONIC time, heartbeats included),
``drop_range`` (data packets carrying any sequence of the range) and ``loss`` (data
packets, with a probability). Every dropped packet is counted under one reason. They are
spelled and validated as the simulator's (``host.exchange.faultplan``, target WIRE):
``A:cut=200@1000``, ``B:drop=100-199``, ``AB:drop=all``, ``A:loss=1%``; the CLI's options
(``--cut 200``, ``--drop-range``, ``--loss``, ``--drop-all``) are the same specs.

Python API: ``WireFaults(labcfg, "A")`` (or ``"B"``, ``"AB"``) attaches, and is a context
manager that detaches on exit; module functions ``attach``, ``configure``, ``apply``
(specs), ``clear``, ``status``, ``detach`` and ``remove_all`` (what ``tickwire lab down``
calls) work across processes through the pins. ``tickwire lab fault``
(``host/exchange/cli.py``) is the CLI. Errors are ``FaultError`` (an ``OSError``: lab not
up, unknown line, cannot load or attach); bad fault values are ``FaultSpecError`` (a
``ValueError``).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import fcntl
import ipaddress
import json
import operator
import os
import time
from collections.abc import Iterator

import numpy as np

import bpf
from dataplane.sysabi import LIBC
from host import netns
from host.appliance import bpfsys
from host.appliance.bpfsys import brief, stderr_captured
from host.config import Config, LabConfig
from host.exchange import faultplan

BPF_DIR = bpf.DIR
FAULT_SRC = BPF_DIR / "fault.c"
PIN_ROOT = "/sys/fs/bpf/tickwire"
FILTER_PRIO = 7  # the filter's tc preference on the egress hook
TC_EGRESS = 0xFFFFFFF3  # TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_EGRESS)
TC_INGRESS = 0xFFFFFFF2

# --- mirror of bpf/fault.h (tests/test_bpfabi.py checks it against the header) -----------
PROG_NAME = "tw_fault"
MAP_CFG = "tw_fault_cfg"
MAP_STATS = "tw_fault_stats"
FAULT_LINES = 2
LINE_SLOTS = {"A": 0, "B": 1}
CFG_FIELDS = (
    "ifindex",
    "flags",
    "cut_start_ns",
    "cut_end_ns",
    "seq_first",
    "seq_last",
    "loss_threshold",
    "group",
    "port",
)
FAULT_CFG = np.dtype([(name, np.uint64) for name in CFG_FIELDS], align=True)
LOSS_ONE = 1 << 32  # loss_threshold that drops every data packet
FF_ALL = 1
FF_CUT = 2
FF_RANGE = 4
FF_LOSS = 8
FC_SEEN = 0
FC_PASSED = 1
FC_FEED = 2
FC_DROPPED_ALL = 3
FC_DROPPED_CUT = 4
FC_DROPPED_RANGE = 5
FC_DROPPED_RANDOM = 6
FC_DROPPED_MESSAGES = 7
FC_FIRST_DROPPED_SEQ = 8
FC_LAST_DROPPED_SEQ = 9
FC_LEN = 10
COUNTERS = (
    "seen",
    "passed",
    "feed",
    "dropped_all",
    "dropped_cut",
    "dropped_range",
    "dropped_random",
    "dropped_messages",
    "first_dropped_seq",
    "last_dropped_seq",
)


class FaultError(OSError):
    """Fault injection cannot be set up, changed or removed; the message says why and
    what to do."""


def _lab(cfg: Config | LabConfig) -> LabConfig:
    return cfg.lab if isinstance(cfg, Config) else cfg


def lines_of(spec: str | list[str] | tuple[str, ...]) -> list[str]:
    """``"A"``, ``"B"``, ``"AB"`` (or a list of letters) as a sorted list of letters."""
    letters = list(spec.upper()) if isinstance(spec, str) else [str(x).upper() for x in spec]
    if not letters or any(x not in LINE_SLOTS for x in letters):
        raise FaultError(errno.EINVAL, f"unknown line {spec!r}: expected A, B or AB")
    return sorted(set(letters))


# --- bpffs ---------------------------------------------------------------------------------
def _bpffs_mounted(path: str = "/sys/fs/bpf") -> bool:
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            if fields[4] == path and fields[sep + 1] == "bpf":
                return True
    return False


def _ensure_bpffs() -> None:
    if _bpffs_mounted():
        return
    # like tc(8) and bpftool: mount bpffs where everyone expects it
    if LIBC.mount(b"bpf", b"/sys/fs/bpf", b"bpf", 0, None) != 0:
        e = ctypes.get_errno()
        raise FaultError(
            e,
            f"cannot mount the BPF filesystem on /sys/fs/bpf: {os.strerror(e)}"
            + (" (run as root)" if e == errno.EPERM else ""),
        )


def pin_dir(labcfg: Config | LabConfig) -> str:
    """Where the lab's program and maps are pinned."""
    return f"{PIN_ROOT}/{_lab(labcfg).prefix}"


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    """Serialise attach/detach between processes: flock on the bpffs root, which (unlike
    the pin directories) is never removed."""
    fd = os.open(os.path.dirname(PIN_ROOT), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


# --- the pinned program and maps -----------------------------------------------------------
class FaultMaps:
    """File descriptors of a lab's pinned program and maps, and typed access to them."""

    def __init__(self, prefix: str, prog_fd: int, cfg_fd: int, stats_fd: int):
        self.prefix = prefix
        self.prog_fd, self.cfg_fd, self.stats_fd = prog_fd, cfg_fd, stats_fd
        self.prog_id = bpfsys.prog_info(prog_fd)[0]
        self._ncpu = bpfsys.possible_cpus()

    @property
    def filter_name(self) -> str:
        return f"{PROG_NAME}:{self.prog_id}"

    @classmethod
    def open(cls, prefix: str) -> FaultMaps | None:
        """The lab's pinned program, or None when nothing is pinned."""
        where = f"{PIN_ROOT}/{prefix}"
        if not os.path.exists(f"{where}/prog"):
            return None
        fds: list[int] = []
        try:
            for name in ("prog", "cfg", "stats"):
                fds.append(bpfsys.open_pinned(f"{where}/{name}"))
            return cls(prefix, *fds)
        except OSError as e:
            for fd in fds:
                os.close(fd)
            raise FaultError(
                e.errno,
                f"cannot open the pinned fault program in {where}: "
                f"{e.strerror}; remove it with: tickwire lab fault off",
            ) from None

    @classmethod
    def create(cls, prefix: str) -> FaultMaps:
        """Compile and load ``bpf/fault.c``, pin program and maps; the caller holds the lock."""
        _ensure_bpffs()
        where = f"{PIN_ROOT}/{prefix}"
        bpf = _compile()
        try:
            failure: Exception | None = None
            with stderr_captured() as err:
                try:
                    fn = bpf.load_func(PROG_NAME.encode(), type(bpf).SCHED_CLS)
                except Exception as e:
                    failure = e
            if failure is not None:
                raise FaultError(
                    errno.EINVAL,
                    f"the kernel verifier rejected {PROG_NAME}: "
                    f"{brief(err[0] if err else '', 3) or failure}",
                ) from None
            objs = (
                ("prog", fn.fd),
                ("cfg", bpf[MAP_CFG.encode()].map_fd),
                ("stats", bpf[MAP_STATS.encode()].map_fd),
            )
            try:
                os.makedirs(where, exist_ok=True)
                for name, fd in objs:
                    bpfsys.pin(fd, f"{where}/{name}")
            except OSError as e:
                _unpin(prefix)
                raise FaultError(
                    e.errno, f"cannot pin the fault program in {where}: {e.strerror}"
                ) from None
        finally:
            bpf.cleanup()  # the pins keep program and maps alive
        maps = cls.open(prefix)
        assert maps is not None
        return maps

    def close(self) -> None:
        for fd in (self.prog_fd, self.cfg_fd, self.stats_fd):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.prog_fd = self.cfg_fd = self.stats_fd = -1

    def __enter__(self) -> FaultMaps:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- cfg
    def config(self, letter: str) -> dict[str, int]:
        val = bpfsys.lookup(self.cfg_fd, _key(LINE_SLOTS[letter]), np.zeros(1, FAULT_CFG))
        return {name: int(val[0][name]) for name in CFG_FIELDS}

    def set_config(self, letter: str, **fields: int) -> dict[str, int]:
        """Change ``fields`` of the line's slot (one map update: the program sees either
        the old or the new configuration, never a mix of fields); returns the new one."""
        unknown = set(fields) - set(CFG_FIELDS)
        if unknown:
            raise ValueError(f"unknown fault configuration field(s): {sorted(unknown)}")
        cfg = self.config(letter)
        cfg.update(fields)
        val = np.zeros(1, FAULT_CFG)
        for name in CFG_FIELDS:
            val[0][name] = cfg[name]
        bpfsys.update(self.cfg_fd, _key(LINE_SLOTS[letter]), val)
        return cfg

    # -- counters
    def _per_cpu(self, idx: int) -> list[int]:
        val = bpfsys.lookup(self.stats_fd, _key(idx), np.zeros(self._ncpu, np.uint64))
        return [int(v) for v in val]

    def counters(self, letter: str) -> dict[str, int | None]:
        """The line's counters, summed over CPUs; ``dropped`` is every reason together,
        the sequence extremes are None until a data packet was dropped."""
        base = LINE_SLOTS[letter] * FC_LEN
        out: dict[str, int | None] = {}
        for i, name in enumerate(COUNTERS):
            per_cpu = self._per_cpu(base + i)
            if i == FC_FIRST_DROPPED_SEQ:
                out[name] = min((v for v in per_cpu if v), default=None)
            elif i == FC_LAST_DROPPED_SEQ:
                out[name] = max(per_cpu) or None
            else:
                out[name] = sum(per_cpu)
        out["dropped"] = sum(
            out[n] for n in ("dropped_all", "dropped_cut", "dropped_range", "dropped_random")
        )
        return out

    def reset_counters(self, letter: str) -> None:
        base = LINE_SLOTS[letter] * FC_LEN
        zeros = np.zeros(self._ncpu, np.uint64)
        for i in range(FC_LEN):
            bpfsys.update(self.stats_fd, _key(base + i), zeros)


def _key(index: int) -> np.ndarray:
    """An array map's key."""
    return np.array([index], np.uint32)


def _unpin(prefix: str) -> bool:
    where = f"{PIN_ROOT}/{prefix}"
    if not os.path.isdir(where):
        return False
    for name in ("prog", "cfg", "stats"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{where}/{name}")
    with contextlib.suppress(OSError):
        os.rmdir(where)
    with contextlib.suppress(OSError):
        os.rmdir(PIN_ROOT)  # only when no other lab has pins
    return True


# --- compiling -----------------------------------------------------------------------------
def _compile():
    try:
        from bcc import BPF
    except ImportError as e:
        raise FaultError(
            errno.ENOPKG, f"bcc is not importable ({e}): install python3-bpfcc (make setup)"
        ) from None
    failure: Exception | None = None
    with stderr_captured() as err:
        try:
            # no -D: parameters go in the maps; -I: fault.h
            bpf = BPF(src_file=str(FAULT_SRC).encode(), cflags=[f"-I{BPF_DIR}"])
        except Exception as e:
            failure = e
    if failure is not None:
        text = err[0] if err else ""
        if os.geteuid() != 0 or "Operation not permitted" in text:
            raise FaultError(
                errno.EPERM,
                "cannot load the fault program: run as root (needs CAP_BPF and CAP_NET_ADMIN)",
            ) from None
        raise FaultError(
            errno.EINVAL, f"{FAULT_SRC.name} does not build: {brief(text, 4) or failure}"
        ) from None
    return bpf


# --- tc ------------------------------------------------------------------------------------
def _netlink(labcfg: LabConfig, fn):
    """``fn(ipr)`` with an IPRoute of the lab's exchange namespace."""
    from pyroute2 import IPRoute

    ns = labcfg.exchange_ns
    if not netns.exists(ns):
        raise FaultError(
            errno.ENOENT, f"lab {labcfg.prefix} is not up (no namespace {ns}): run tickwire lab up"
        )
    with netns.entered(ns), IPRoute() as ipr:
        return fn(ipr)


def _ifindex(ipr, labcfg: LabConfig, letter: str) -> int:
    ifname = labcfg.lines[letter].exchange_if
    found = ipr.link_lookup(ifname=ifname)
    if not found:
        raise FaultError(
            errno.ENODEV,
            f"line {letter}: no interface {ifname} in {labcfg.exchange_ns} (run tickwire lab up)",
        )
    return found[0]


def _fault_filters(ipr, idx: int) -> list[tuple[int, int, str]]:
    """(handle, info, name) of every tw_fault filter on the egress hook of ``idx``."""
    out = []
    for f in ipr.get_filters(index=idx, parent=TC_EGRESS):
        opts = f.get_attr("TCA_OPTIONS")
        name = opts.get_attr("TCA_BPF_NAME") if opts is not None else None
        if (
            f.get_attr("TCA_KIND") == "bpf"
            and f["handle"]
            and name
            and name.split(":")[0] == PROG_NAME
        ):
            out.append((f["handle"], f["info"], name))
    return out


def _has_clsact(ipr, idx: int) -> bool:
    return any(q.get_attr("TCA_KIND") == "clsact" for q in ipr.get_qdiscs(index=idx))


def _netlink_error(what: str, e) -> FaultError:
    why = e.args[1] if len(e.args) > 1 else str(e)
    advice = " (run as root)" if e.code == errno.EPERM else ""
    return FaultError(e.code, f"{what}: {why}{advice}")


def _remove_filters(ipr, idx: int, where: str) -> bool:
    """Remove every tw_fault filter from ``idx``, then the clsact qdisc if it is empty;
    True when there was a filter."""
    from pyroute2 import NetlinkError

    found = _fault_filters(ipr, idx)
    for handle, info, _ in found:
        try:
            ipr.tc("del-filter", index=idx, handle=handle, parent=TC_EGRESS, info=info)
        except NetlinkError as e:
            if e.code != errno.ENOENT:
                raise _netlink_error(f"cannot remove the fault filter from {where}", e) from None
    if (
        _has_clsact(ipr, idx)
        and not any(ipr.get_filters(index=idx, parent=TC_EGRESS))
        and not any(ipr.get_filters(index=idx, parent=TC_INGRESS))
    ):
        with contextlib.suppress(NetlinkError):
            ipr.tc("del", "clsact", idx)
    return bool(found)


def _attached(ipr, labcfg: LabConfig, maps: FaultMaps, letter: str) -> bool:
    idx = _ifindex(ipr, labcfg, letter)
    ours = any(name == maps.filter_name for _, _, name in _fault_filters(ipr, idx))
    return ours and maps.config(letter)["ifindex"] == idx


# --- module API (works across processes) ---------------------------------------------------
def attach(labcfg: Config | LabConfig, lines: str | list[str] = "AB") -> list[str]:
    """Attach the fault program to ``lines`` (no fault armed); returns the letters newly
    attached (a line already attached keeps its faults and counters)."""
    from pyroute2 import NetlinkError

    lc, letters = _lab(labcfg), lines_of(lines)
    if not netns.exists(lc.exchange_ns):
        raise FaultError(
            errno.ENOENT,
            f"lab {lc.prefix} is not up (no namespace {lc.exchange_ns}): run tickwire lab up",
        )
    _ensure_bpffs()
    with _locked():
        maps = FaultMaps.open(lc.prefix) or FaultMaps.create(lc.prefix)
        with maps:

            def run(ipr) -> list[str]:
                done = []
                for letter in letters:
                    line = lc.lines[letter]
                    where = f"{lc.exchange_ns}/{line.exchange_if}"
                    idx = _ifindex(ipr, lc, letter)
                    if _attached(ipr, lc, maps, letter):
                        continue
                    _remove_filters(ipr, idx, where)  # a stale one, from older pins
                    fresh = dict.fromkeys(CFG_FIELDS, 0)
                    # several channels share a line's port on groups of their own: any group
                    group = int(ipaddress.IPv4Address(line.group)) if lc.channels == 1 else 0
                    fresh.update(ifindex=idx, group=group, port=line.port)
                    maps.set_config(letter, **fresh)
                    maps.reset_counters(letter)
                    try:
                        if not _has_clsact(ipr, idx):
                            ipr.tc("add", "clsact", idx)
                        ipr.tc(
                            "add-filter",
                            "bpf",
                            idx,
                            ":1",
                            fd=maps.prog_fd,
                            name=maps.filter_name,
                            parent=TC_EGRESS,
                            classid=1,
                            direct_action=True,
                            prio=FILTER_PRIO,
                        )
                    except NetlinkError as e:
                        maps.set_config(letter, ifindex=0, flags=0)
                        _remove_filters(ipr, idx, where)
                        raise _netlink_error(
                            f"cannot attach {PROG_NAME} to TC egress of {where}", e
                        ) from None
                    done.append(letter)
                return done

            try:
                return _netlink(lc, run)
            finally:
                if not any(maps.config(x)["ifindex"] for x in LINE_SLOTS):
                    _unpin(lc.prefix)  # nothing attached after a failure: leave no pins


def detach(labcfg: Config | LabConfig, lines: str | list[str] = "AB") -> list[str]:
    """Remove the fault program from ``lines`` (filter, empty clsact qdisc, the line's
    slot); unpins when no line is left. Returns the letters that were attached."""
    lc, letters = _lab(labcfg), lines_of(lines)
    if not os.path.isdir(pin_dir(lc)):
        if netns.exists(lc.exchange_ns):  # no pins, but maybe an orphaned filter

            def orphans(ipr) -> None:
                for letter in letters:
                    ifname = lc.lines[letter].exchange_if
                    for idx in ipr.link_lookup(ifname=ifname):
                        _remove_filters(ipr, idx, f"{lc.exchange_ns}/{ifname}")

            _netlink(lc, orphans)
        return []
    with _locked():
        maps = FaultMaps.open(lc.prefix)
        if maps is None:
            _unpin(lc.prefix)
            return []
        with maps:
            removed = []

            def run(ipr) -> None:
                for letter in letters:
                    idx = ipr.link_lookup(ifname=lc.lines[letter].exchange_if)
                    if idx and _remove_filters(
                        ipr, idx[0], f"{lc.exchange_ns}/{lc.lines[letter].exchange_if}"
                    ):
                        removed.append(letter)

            if netns.exists(lc.exchange_ns):
                _netlink(lc, run)
            for letter in letters:
                if (
                    maps.config(letter)["ifindex"]
                    and letter not in removed
                    and not netns.exists(lc.exchange_ns)
                ):
                    removed.append(letter)  # its namespace (and filter) went already
                maps.set_config(letter, **dict.fromkeys(CFG_FIELDS, 0))
            if not any(maps.config(x)["ifindex"] for x in LINE_SLOTS):
                _unpin(lc.prefix)
            return sorted(removed)


def remove_all(labcfg: Config | LabConfig) -> list[str]:
    """Everything fault injection left for this lab: both lines' filters and the pins.
    Safe when the lab or the pins are gone already (``tickwire lab down`` calls it before
    deleting the namespaces); returns what was removed, for a log line."""
    lc = _lab(labcfg)
    had_pins = os.path.isdir(pin_dir(lc))
    lines = detach(lc, "AB")
    if os.path.isdir(pin_dir(lc)):
        with _locked():
            _unpin(lc.prefix)
    out = [f"fault program on line {x}" for x in lines]
    if had_pins:
        out.append(f"pins in {pin_dir(lc)}")
    return out


def _maps_or_error(lc: LabConfig) -> FaultMaps:
    maps = FaultMaps.open(lc.prefix)
    if maps is None:
        raise FaultError(
            errno.ENOENT,
            f"no fault program on lab {lc.prefix}: set a fault "
            "first (tickwire lab fault A --cut 200)",
        )
    return maps


def _check_attached(lc: LabConfig, maps: FaultMaps, letters: list[str]) -> None:
    for letter in letters:
        if not maps.config(letter)["ifindex"]:
            raise FaultError(
                errno.ENOENT,
                f"line {letter} of lab {lc.prefix} has no fault "
                "program attached (tickwire lab fault "
                f"{letter} ... attaches it)",
            )


def _fault_fields(
    cfg: dict[str, int], *, cut=None, drop_range=None, loss=None, drop_all=None
) -> dict[str, int]:
    """The cfg fields that set the given faults (None: leave that fault as it is)."""
    new: dict[str, int] = {}
    flags = cfg["flags"]
    if cut is not None:
        ms, after_ms = faultplan.check_cut(*cut, f"cut={cut[0]}@{cut[1]}")
        start = time.monotonic_ns() + int(after_ms * 1e6)  # CLOCK_MONOTONIC = bpf_ktime
        new.update(cut_start_ns=start, cut_end_ns=start + int(ms * 1e6))
        flags |= FF_CUT
    if drop_range is not None:
        first, last = (operator.index(x) for x in drop_range)
        faultplan.check_range(first, last, f"drop={first}-{last}")
        new.update(seq_first=first, seq_last=last)
        flags |= FF_RANGE
    if loss is not None:
        faultplan.check_prob(loss, f"loss={loss}")
        new.update(loss_threshold=round(loss * LOSS_ONE))
        flags = flags | FF_LOSS if loss > 0 else flags & ~FF_LOSS
    if drop_all is not None:
        flags = flags | FF_ALL if drop_all else flags & ~FF_ALL
    new["flags"] = flags
    return new


def configure(
    labcfg: Config | LabConfig,
    lines: str | list[str] = "AB",
    *,
    cut: tuple[float, float] | None = None,
    drop_range: tuple[int, int] | None = None,
    loss: float | None = None,
    drop_all: bool | None = None,
) -> dict:
    """Arm faults on ``lines``, attaching first where needed; faults not named stay as
    they are. ``cut`` is (ms, after_ms): drop everything for ms milliseconds starting
    after_ms from now; ``drop_range`` is (first, last) sequence; ``loss`` a probability
    (0 turns it off); ``drop_all`` True/False. Returns ``status``."""
    lc, letters = _lab(labcfg), lines_of(lines)
    attach(lc, letters)
    with _maps_or_error(lc) as maps:
        for letter in letters:
            cfg = maps.config(letter)
            maps.set_config(
                letter,
                **_fault_fields(cfg, cut=cut, drop_range=drop_range, loss=loss, drop_all=drop_all),
            )
    return status(lc)


def clear(labcfg: Config | LabConfig, lines: str | list[str] = "AB") -> dict:
    """Disarm every fault on ``lines`` (the program stays attached, counters stay)."""
    lc, letters = _lab(labcfg), lines_of(lines)
    maps = FaultMaps.open(lc.prefix)
    if maps is not None:
        with maps:
            for letter in letters:
                if maps.config(letter)["ifindex"]:
                    maps.set_config(letter, flags=0)
    return status(lc)


def _describe(cfg: dict[str, int], now_ns: int) -> dict:
    flags = cfg["flags"]
    out: dict = {"drop_all": bool(flags & FF_ALL), "cut": None, "drop_range": None, "loss": None}
    if flags & FF_CUT:
        start, end = cfg["cut_start_ns"], cfg["cut_end_ns"]
        out["cut"] = {
            "ms": (end - start) / 1e6,
            "starts_in_ms": (start - now_ns) / 1e6,
            "ends_in_ms": (end - now_ns) / 1e6,
            "state": "pending" if now_ns < start else "active" if now_ns < end else "over",
        }
    if flags & FF_RANGE:
        out["drop_range"] = [cfg["seq_first"], cfg["seq_last"]]
    if flags & FF_LOSS:
        out["loss"] = cfg["loss_threshold"] / LOSS_ONE
    out["group"] = str(ipaddress.IPv4Address(cfg["group"])) if cfg["group"] else "any"
    out["port"] = cfg["port"] or "any"
    return out


def status(labcfg: Config | LabConfig) -> dict:
    """Per line: interface, attached, armed faults and counters (None when not pinned)."""
    lc = _lab(labcfg)
    out: dict = {
        "prefix": lc.prefix,
        "pinned": None,
        "lab_up": netns.exists(lc.exchange_ns),
        "lines": {},
    }
    maps = FaultMaps.open(lc.prefix) if os.path.isdir(pin_dir(lc)) else None
    now = time.monotonic_ns()
    attached: dict[str, bool] = dict.fromkeys(LINE_SLOTS, False)
    if maps is not None and out["lab_up"]:

        def run(ipr) -> None:
            for letter in LINE_SLOTS:
                if ipr.link_lookup(ifname=lc.lines[letter].exchange_if):
                    attached[letter] = _attached(ipr, lc, maps, letter)

        _netlink(lc, run)
    for letter, line in lc.lines.items():
        info: dict = {
            "interface": f"{lc.exchange_ns}/{line.exchange_if}",
            "attached": attached[letter],
            "faults": None,
            "counters": None,
        }
        if maps is not None and maps.config(letter)["ifindex"]:
            info["faults"] = _describe(maps.config(letter), now)
            info["counters"] = maps.counters(letter)
        out["lines"][letter] = info
    if maps is not None:
        out["pinned"] = pin_dir(lc)
        out["prog_id"] = maps.prog_id
        maps.close()
    return out


def status_text(st: dict) -> str:
    head = f"lab {st['prefix']} faults: "
    if not st["pinned"]:
        return head + "no fault program (tickwire lab fault A --cut 200 attaches one)"
    rows = [
        head
        + f"program {st['prog_id']}, pinned in {st['pinned']}"
        + ("" if st["lab_up"] else " (lab not up: tickwire lab fault off removes it)")
    ]
    for letter, info in st["lines"].items():
        if info["faults"] is None:
            rows.append(f"  line {letter} {info['interface']}: not attached")
            continue
        f, c = info["faults"], info["counters"]
        armed = []
        if f["drop_all"]:
            armed.append("drop all")
        if f["cut"]:
            cut = f["cut"]
            when = {
                "pending": f"starts in {cut['starts_in_ms']:.0f} ms",
                "active": f"{cut['ends_in_ms']:.0f} ms left",
                "over": "over",
            }
            armed.append(f"cut {cut['ms']:.0f} ms ({when[cut['state']]})")
        if f["drop_range"]:
            armed.append("drop {}-{}".format(*f["drop_range"]))
        if f["loss"] is not None:
            armed.append(f"loss {f['loss']:g}")
        state = "attached" if info["attached"] else "NOT attached (stale slot)"
        rows.append(
            f"  line {letter} {info['interface']} ({f['group']}:{f['port']}): {state};"
            f" faults: {', '.join(armed) or 'none'}"
        )
        seqs = (
            ""
            if c["first_dropped_seq"] is None
            else f", sequences {c['first_dropped_seq']}..{c['last_dropped_seq']}"
        )
        rows.append(
            f"    seen {c['seen']}, passed {c['passed']}, feed {c['feed']}; dropped "
            f"{c['dropped']} (all {c['dropped_all']}, cut {c['dropped_cut']}, range "
            f"{c['dropped_range']}, random {c['dropped_random']}; "
            f"{c['dropped_messages']} messages{seqs})"
        )
    return "\n".join(rows)


# --- the in-process API --------------------------------------------------------------------
class WireFaults:
    """The fault program on ``line`` ("A", "B" or "AB") of a lab: attached (or, when a
    ``tickwire lab fault`` call attached it already, taken over) on creation, detached --
    filter, qdisc and pins -- by ``detach()`` or at the end of a ``with`` block.

    Each fault method applies to every line of the instance, or to ``line`` when given;
    it changes only its own fault. ``stats()`` returns one line's counters, or a dict of
    them by letter when the instance has several lines and no ``line`` is given."""

    def __init__(self, labcfg: Config | LabConfig, line: str = "A"):
        self.lab = _lab(labcfg)
        self.lines = lines_of(line)
        self._detached = False
        attach(self.lab, self.lines)

    def __enter__(self) -> WireFaults:
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    def _set(self, line: str | None, **faults) -> None:
        letters = self.lines if line is None else lines_of(line)
        with _maps_or_error(self.lab) as maps:
            _check_attached(self.lab, maps, letters)
            for letter in letters:
                maps.set_config(letter, **_fault_fields(maps.config(letter), **faults))

    def cut(self, ms: float, after_ms: float = 0, line: str | None = None) -> None:
        """Drop every feed packet (heartbeats too) for ``ms`` ms from ``after_ms`` ms on."""
        self._set(line, cut=(ms, after_ms))

    def drop_range(self, first: int, last: int, line: str | None = None) -> None:
        """Drop every data packet carrying any of sequences ``first``..``last``."""
        self._set(line, drop_range=(first, last))

    def loss(self, probability: float, line: str | None = None) -> None:
        """Drop each data packet with ``probability`` (0: no random loss)."""
        self._set(line, loss=probability)

    def drop_all(self, on: bool = True, line: str | None = None) -> None:
        """Drop every feed packet while on."""
        self._set(line, drop_all=on)

    def match(
        self, group: str | None = None, port: int | None = None, line: str | None = None
    ) -> None:
        """Which packets are the feed (the only ones faults touch): destination ``group``
        and UDP ``port``, None = any. Attaching sets the line's own group and port."""
        if port is not None and not 1 <= port <= 65535:
            raise ValueError(f"port {port} is outside 1..65535")
        fields = {"group": int(ipaddress.IPv4Address(group)) if group else 0, "port": port or 0}
        with _maps_or_error(self.lab) as maps:
            for letter in self.lines if line is None else lines_of(line):
                maps.set_config(letter, **fields)

    def clear(self, line: str | None = None) -> None:
        """Disarm every fault (counters keep counting)."""
        letters = self.lines if line is None else lines_of(line)
        with _maps_or_error(self.lab) as maps:
            for letter in letters:
                maps.set_config(letter, flags=0)

    def reset_counters(self, line: str | None = None) -> None:
        with _maps_or_error(self.lab) as maps:
            for letter in self.lines if line is None else lines_of(line):
                maps.reset_counters(letter)

    def stats(self, line: str | None = None) -> dict:
        with _maps_or_error(self.lab) as maps:
            if line is not None:
                return maps.counters(lines_of(line)[0])
            if len(self.lines) == 1:
                return maps.counters(self.lines[0])
            return {letter: maps.counters(letter) for letter in self.lines}

    def detach(self) -> None:
        """Remove the program from the instance's lines (pins too once none is left).
        Idempotent."""
        if self._detached:
            return
        self._detached = True
        detach(self.lab, self.lines)


# --- CLI -----------------------------------------------------------------------------------
EPILOG = """fault examples (the exchange side of each line, TC egress; host/exchange/wirefaults.py):
  tickwire lab fault A --cut 200                 line A silent for 200 ms from now
  tickwire lab fault B --cut 100@500             line B silent 100 ms, starting in 500 ms
  tickwire lab fault A --drop-range 1000-1999    drop A's packets carrying those sequences
  tickwire lab fault AB --loss 0.01              each data packet lost with p = 0.01
  tickwire lab fault A --drop-all                line A dead (heartbeats too)
  tickwire lab fault A:loss=1% B:cut=200@1000    the fault specs tickwire sim --fault takes
  tickwire lab fault A drop=10-20 loss=0.5%      a spec without LINE: is on the LINE given
  tickwire lab fault status --json               faults armed and counters, per line
  tickwire lab fault clear                       disarm every fault (counters stay)
  tickwire lab fault off                         detach and unpin (lab down does it too)
"""
_WORDS = ("status", "clear", "off")
WIRE = faultplan.WIRE


def _option(kind: str, parse):
    """The argparse type of option ``--KIND``: its value as the fault grammar's
    ``KIND=VALUE`` (host.exchange.faultplan validates both spellings)."""

    def value(text: str):
        try:
            return parse(text, f"{kind}={text}")
        except faultplan.FaultSpecError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    value.__name__ = kind  # argparse names the type in its messages
    return value


def add_cli_arguments(p: argparse.ArgumentParser) -> None:
    """The words and options of ``tickwire lab fault`` (on its parser)."""
    p.add_argument(
        "fault_args",
        nargs="*",
        metavar="LINE|SPEC|status|clear|off",
        help="line A, B or AB (both, the default); fault specs [LINE:]KIND=ARGS as "
        "tickwire sim --fault takes them: cut=MS[@T], drop=FIRST-LAST, "
        "drop=all, loss=P or P%%; or status (the default without faults), "
        "clear or off",
    )
    g = p.add_argument_group(
        "fault options (tickwire lab fault LINE ...; each is a spec: --cut 200 is cut=200)"
    )
    g.add_argument(
        "--cut",
        metavar="MS[@AFTER]",
        type=_option("cut", lambda t, spec: faultplan.parse_cut(t, spec, WIRE)),
        help="drop everything for MS ms, starting AFTER ms from now (0)",
    )
    g.add_argument(
        "--drop-range",
        type=_option("drop", faultplan.parse_range),
        metavar="FIRST-LAST",
        help="drop data packets carrying any of these sequences",
    )
    g.add_argument(
        "--loss",
        type=_option("loss", faultplan.parse_prob),
        metavar="P",
        help="drop each data packet with probability P (0.01 or 1%%; 0: no loss)",
    )
    g.add_argument("--drop-all", action="store_true", help="drop every feed packet (drop=all)")


_SETTING = {"cut": "cut", "drop": "drop_range", "loss": "loss", "drop_all": "drop_all"}


def settings(faults: list[faultplan.Fault]) -> dict[str, dict]:
    """Wire faults as ``configure``'s keyword arguments, by line letter. A line has one
    fault of each kind at a time (one cut window, one range, one loss rate)."""
    out: dict[str, dict] = {}
    seen: dict[tuple[str, str], str] = {}
    for f in faults:
        if f.kind not in _SETTING:
            raise faultplan.FaultSpecError(f"fault {f.spec!r}: {f.kind} is not a wire fault")
        if (f.line, f.kind) in seen:
            raise faultplan.FaultSpecError(
                f"faults {seen[f.line, f.kind]!r} and {f.spec!r}: "
                f"line {f.line} has one {f.kind} fault at a time"
            )
        seen[f.line, f.kind] = f.spec
        value = {
            "cut": (f.ms, f.at_ms),
            "drop": (f.first, f.last),
            "loss": f.prob,
            "drop_all": True,
        }[f.kind]
        out.setdefault(f.line, {})[_SETTING[f.kind]] = value
    return out


def _arm(lc: LabConfig, per_line: dict[str, dict]) -> dict:
    for letter, kw in sorted(per_line.items()):
        configure(lc, letter, **kw)
    return status(lc)


def apply(labcfg: Config | LabConfig, specs: str | list[str]) -> dict:
    """Arm faults given as specs of the fault grammar (``"A:loss=1%"``, ``"AB:drop=5-9"``;
    a LINE is required), attaching where needed; each line's other faults stay as they
    are. Returns ``status``."""
    specs = [specs] if isinstance(specs, str) else specs
    faults = [f for spec in specs for f in faultplan.parse_fault(spec, WIRE)]
    return _arm(_lab(labcfg), settings(faults))


def cli_faults(words: list[str], **options) -> tuple[str, str | None, dict[str, dict]]:
    """``tickwire lab fault``'s words and (parsed) options as (lines, action or None,
    ``configure`` keywords by line letter). Options and specs without a LINE apply to
    the LINE word (AB without one); a spec's own LINE must agree with it."""
    line_word, action, specs = None, None, []
    for word in words:
        if word.lower() in _WORDS:
            if action is not None:
                raise FaultError(errno.EINVAL, f"{action} and {word.lower()}: one at a time")
            action = word.lower()
        elif word.upper() in ("A", "B", "AB", "BA"):
            line_word = "".join(lines_of(word))
        elif "=" in word:
            specs.append(word)
        else:
            raise FaultError(
                errno.EINVAL,
                f"unknown line, fault or action {word!r}: expected "
                "A, B or AB, fault specs like A:loss=1%, then status, clear or "
                "off",
            )
    options = {k: v for k, v in options.items() if v not in (None, False)}
    if action is not None and (options or specs):
        raise ValueError(f"lab fault {action} takes no fault options")
    lines = line_word or "AB"
    faults = []
    for spec in specs:
        got = faultplan.parse_fault(spec, WIRE, lines=lines)
        if line_word is not None and "".join(f.line for f in got) != line_word:
            raise faultplan.FaultSpecError(
                f"fault {spec!r} is not on line {line_word}, the LINE given"
            )
        faults += got
    per_line = settings(faults)
    for letter in lines_of(lines):
        for key, value in options.items():
            if key in per_line.get(letter, {}):
                raise faultplan.FaultSpecError(
                    f"--{key.replace('_', '-')} and a fault spec "
                    f"both set line {letter}'s {key}: one of them"
                )
            per_line.setdefault(letter, {})[key] = value
    return lines, action, per_line


def run_cli(
    labcfg: Config | LabConfig,
    words: list[str],
    *,
    cut: tuple[float, float] | None = None,
    drop_range: tuple[int, int] | None = None,
    loss: float | None = None,
    drop_all: bool = False,
    as_json: bool = False,
) -> int:
    """``tickwire lab fault [LINE] [SPEC ...] [status|clear|off]`` with the fault options
    as keywords: prints the resulting status (``as_json``: as JSON)."""
    lc = _lab(labcfg)
    lines, action, per_line = cli_faults(
        words, cut=cut, drop_range=drop_range, loss=loss, drop_all=drop_all
    )
    if action == "off":
        removed = detach(lc, lines)
        if as_json:
            print(json.dumps({"prefix": lc.prefix, "detached": removed}))
        else:
            print(
                f"lab {lc.prefix}: fault program detached from line(s) {', '.join(removed)}"
                if removed
                else f"lab {lc.prefix}: no fault program was attached"
            )
        return 0
    if action == "clear":
        st = clear(lc, lines)
    elif action == "status" or not per_line:
        st = status(lc)
    else:
        st = _arm(lc, per_line)
    print(json.dumps(st) if as_json else status_text(st))
    return 0
