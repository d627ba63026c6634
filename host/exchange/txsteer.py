"""The lab's queue steering: with several channels (``lab.channels``), channel k's packets
must arrive on the appliance end's rx queue k, where that channel's AF_XDP sockets are --
what a NIC's ntuple rules do on a host. A veth delivers to the peer's rx queue numbered
like the tx queue a packet was sent on, so ``bpf/txsteer.c`` on TC egress of each line's
exchange end sends every channel's (group, port) on tx queue k.

``attach(lab)`` compiles the program (bcc), fills its map from the lab's channels, and
puts it on each line's exchange end as a direct-action ``bpf`` filter (preference
``FILTER_PRIO``, named ``tw_txsteer:<program id>``) under a ``clsact`` qdisc, replacing
one attached before. The filter holds the program and the program its map, so nothing is
pinned: deleting the filter, or the lab's namespaces, frees both. It sits before the
fault program (``host.exchange.wirefaults``, a higher preference) and lets it run after
it. ``detach(lab)`` removes it (and the qdisc when no filter is left); ``attached(lab)``
says where it is. Errors are ``SteerError`` (an ``OSError``).
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import socket

import bpf
from dataplane import xdpabi
from host import netns
from host.appliance.bpfsys import brief, prog_info, stderr_captured
from host.config import LabConfig

SRC = bpf.DIR / "txsteer.c"
PROG_NAME = "tw_txsteer"
MAP_QUEUES = "tw_txq"
FILTER_PRIO = 5  # before the fault program's (wirefaults.FILTER_PRIO = 7)
TC_EGRESS = 0xFFFFFFF3  # TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_EGRESS)
TC_INGRESS = 0xFFFFFFF2


class SteerError(OSError):
    """The queue steering cannot be built, attached or removed; the message says why."""


def entries(lab: LabConfig) -> list[tuple[str, int, int]]:
    """(group, port, tx queue) of every line of every channel of the lab."""
    return [
        (line.group, line.port, k)
        for k in range(lab.channels)
        for line in lab.channel_lines(k).values()
    ]


def _compile():
    try:
        from bcc import BPF
    except ImportError as e:
        raise SteerError(
            errno.ENOPKG, f"bcc is not importable ({e}): install python3-bpfcc (make setup)"
        ) from None
    failure: Exception | None = None
    with stderr_captured() as err:
        try:
            prog = BPF(src_file=str(SRC).encode(), cflags=[f"-I{bpf.DIR}"])
            fn = prog.load_func(PROG_NAME.encode(), BPF.SCHED_CLS)
        except Exception as e:
            failure = e
    if failure is not None:
        text = err[0] if err else ""
        if os.geteuid() != 0 or "Operation not permitted" in text:
            raise SteerError(
                errno.EPERM, "cannot load the queue steering: run as root (CAP_BPF, CAP_NET_ADMIN)"
            ) from None
        raise SteerError(
            errno.EINVAL, f"{SRC.name} does not build or load: {brief(text, 4) or failure}"
        ) from None
    return prog, fn


def _filters(ipr, idx: int) -> list[tuple[int, int]]:
    """(handle, info) of every tw_txsteer filter on the egress hook of ``idx``."""
    out = []
    for f in ipr.get_filters(index=idx, parent=TC_EGRESS):
        opts = f.get_attr("TCA_OPTIONS")
        name = opts.get_attr("TCA_BPF_NAME") if opts is not None else None
        if f.get_attr("TCA_KIND") == "bpf" and f["handle"] and name:
            if name.split(":")[0] == PROG_NAME:
                out.append((f["handle"], f["info"]))
    return out


def _remove(ipr, idx: int) -> bool:
    """Our filters off ``idx``, and its clsact qdisc once no filter is left on it."""
    from pyroute2 import NetlinkError

    found = _filters(ipr, idx)
    for handle, info in found:
        with contextlib.suppress(NetlinkError):
            ipr.tc("del-filter", index=idx, handle=handle, parent=TC_EGRESS, info=info)
    hooks = (TC_EGRESS, TC_INGRESS)
    if found and not any(any(ipr.get_filters(index=idx, parent=h)) for h in hooks):
        with contextlib.suppress(NetlinkError):
            ipr.tc("del", "clsact", idx)
    return bool(found)


def _links(ipr, lab: LabConfig) -> dict[str, int]:
    out = {}
    for letter, line in lab.lines.items():
        found = ipr.link_lookup(ifname=line.exchange_if)
        if not found:
            raise SteerError(
                errno.ENODEV,
                f"line {letter}: no interface {line.exchange_if} in {lab.exchange_ns} "
                "(run tickwire lab up)",
            )
        out[line.exchange_if] = found[0]
    return out


def _in_exchange(lab: LabConfig, fn):
    from pyroute2 import IPRoute

    if not netns.exists(lab.exchange_ns):
        raise SteerError(errno.ENOENT, f"lab {lab.prefix} is not up (no {lab.exchange_ns})")
    with netns.entered(lab.exchange_ns), IPRoute() as ipr:
        return fn(ipr)


def attach(lab: LabConfig) -> list[str]:
    """Steer every channel of ``lab`` to its queue on each line's exchange end (an earlier
    steering replaced); returns the interfaces."""
    from pyroute2 import NetlinkError

    table = entries(lab)
    for group, port, queue in table:
        if queue >= lab.channels:  # the exchange ends send on lab.channels tx queues
            raise ValueError(f"{group}:{port}: queue {queue} past the lab's {lab.channels}")
    prog, fn = _compile()
    try:
        txq = prog[MAP_QUEUES.encode()]
        for group, port, queue in table:
            key = xdpabi.chan_key(socket.inet_aton(str(ipaddress.IPv4Address(group))), port)
            txq[txq.Key.from_buffer_copy(key.tobytes())] = txq.Leaf(queue)
        name = f"{PROG_NAME}:{prog_info(fn.fd)[0]}"

        def run(ipr) -> list[str]:
            done = []
            for ifname, idx in _links(ipr, lab).items():
                _remove(ipr, idx)
                try:
                    ipr.tc("add", "clsact", idx)
                except NetlinkError as e:
                    if e.code != errno.EEXIST:  # the fault program's, say
                        raise SteerError(e.code, f"cannot add clsact to {ifname}: {e}") from None
                try:
                    ipr.tc(
                        "add-filter",
                        "bpf",
                        idx,
                        ":1",
                        fd=fn.fd,
                        name=name,
                        parent=TC_EGRESS,
                        classid=1,
                        direct_action=True,
                        prio=FILTER_PRIO,
                    )
                except NetlinkError as e:
                    _remove(ipr, idx)
                    raise SteerError(
                        e.code, f"cannot attach {PROG_NAME} to TC egress of {ifname}: {e}"
                    ) from None
                done.append(ifname)
            return done

        return _in_exchange(lab, run)
    finally:
        prog.cleanup()  # the filters keep program and map alive


def detach(lab: LabConfig) -> list[str]:
    """Remove the steering from the lab's exchange ends; returns where it was."""
    if not netns.exists(lab.exchange_ns):
        return []

    def run(ipr) -> list[str]:
        out = []
        for line in lab.lines.values():
            for idx in ipr.link_lookup(ifname=line.exchange_if):
                if _remove(ipr, idx):
                    out.append(line.exchange_if)
        return out

    return _in_exchange(lab, run)


def attached(lab: LabConfig) -> list[str]:
    """The lab's exchange ends the steering is attached to."""
    if not netns.exists(lab.exchange_ns):
        return []

    def run(ipr) -> list[str]:
        return [
            line.exchange_if
            for line in lab.lines.values()
            for idx in ipr.link_lookup(ifname=line.exchange_if)
            if _filters(ipr, idx)
        ]

    return _in_exchange(lab, run)
