"""The netns lab: an exchange namespace and an appliance namespace joined by two veth
pairs, line A and line B (``tickwire lab up|down|status``).

``up`` is idempotent: it creates what is missing and corrects what drifted (addresses,
MTU, queue counts cannot change on a live veth, so a mismatch there is an error that says
to run ``down`` first). Both ends of each pair are created inside the lab's namespaces, so
the root namespace is never touched. ``down`` deletes the two namespaces named by the
prefix (which takes their veths with them) after stopping processes still running in
them, and nothing else. Multicast sent inside the lab never leaves it: the exchange
namespace has no interface but the two line ends and loopback.

Entering a namespace is ``host.netns`` (shared with the appliance's ``run.netns``).
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import time

from host import netns
from host.config import LabConfig

# A veth hands a packet to the peer's rx queue numbered like the tx queue it was sent on,
# so an end must never send on a queue its peer lacks (the kernel warns "feed-a received
# packet on queue 2, but number of RX queues is 2" and the packet skips RPS). The exchange
# end of a one-channel lab sends on one queue: whatever the appliance's NIC role sets the
# appliance end's channels to (at least one), every line lands on its rx queue 0, where
# the config's AF_XDP socket is. With ``lab.channels`` = N it sends on N, channel k's
# packets on queue k (host.exchange.txsteer), so each lands on the appliance end's rx
# queue k. The appliance end sends (IGMP, re-requests) on at most ``rx_queues``, as many
# as the exchange end receives on.
EXCHANGE_TX_QUEUES = 1


def exchange_tx_queues(cfg: LabConfig) -> int:
    """Tx queues of the lab's exchange ends: one, or one per channel."""
    return max(EXCHANGE_TX_QUEUES, cfg.channels)


class LabError(OSError):
    """The lab cannot be built, entered or removed; the message says why and what to do."""


def _require_root() -> None:
    if os.geteuid() != 0:
        raise LabError(
            errno.EPERM, "the lab needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN): run it with sudo"
        )


def _iproute(ns: str):
    from pyroute2 import IPRoute

    return IPRoute(netns=ns)


def _link(ipr, name: str):
    links = ipr.link_lookup(ifname=name)
    return links[0] if links else None


def _sysctl(ns: str, key: str, value: str) -> None:
    with netns.entered(ns):
        path = "/proc/sys/" + key.replace(".", "/")
        with open(path, "w") as f:
            f.write(value)


def up(cfg: LabConfig, say=lambda msg: None) -> dict:
    """Create (or complete) the lab described by ``cfg``; returns ``status(cfg)``."""
    _require_root()
    from pyroute2 import NetlinkError
    from pyroute2 import netns as pr_netns

    for ns in (cfg.exchange_ns, cfg.appliance_ns):
        if not netns.exists(ns):
            pr_netns.create(ns)
            say(f"created namespace {ns}")
    for ns in (cfg.exchange_ns, cfg.appliance_ns):
        with _iproute(ns) as ipr:
            ipr.link("set", index=_link(ipr, "lo"), state="up")
    queues, ex_txq = cfg.rx_queues, exchange_tx_queues(cfg)
    for letter, line in cfg.lines.items():
        with _iproute(cfg.exchange_ns) as ipr:
            if _link(ipr, line.exchange_if) is None:
                try:
                    ipr.link(
                        "add",
                        ifname=line.exchange_if,
                        kind="veth",
                        num_rx_queues=queues,
                        num_tx_queues=ex_txq,
                        peer={
                            "ifname": line.appliance_if,
                            "net_ns_fd": cfg.appliance_ns,
                            "num_rx_queues": queues,
                            "num_tx_queues": queues,
                        },
                    )
                except NetlinkError as e:
                    raise LabError(
                        e.code,
                        f"cannot create line {letter} veth "
                        f"{line.exchange_if}/{line.appliance_if}: {e}",
                    ) from None
                say(
                    f"created line {letter}: {cfg.exchange_ns}/{line.exchange_if} <-> "
                    f"{cfg.appliance_ns}/{line.appliance_if}"
                )
        for ns, ifname, addr, txq in (
            (cfg.exchange_ns, line.exchange_if, line.exchange_ip, ex_txq),
            (cfg.appliance_ns, line.appliance_if, line.appliance_ip, queues),
        ):
            with _iproute(ns) as ipr:
                idx = _link(ipr, ifname)
                if idx is None:
                    raise LabError(
                        errno.ENOENT,
                        f"{ns}/{ifname} is missing but its veth "
                        f"peer exists: run tickwire lab down, then up",
                    )
                info = ipr.get_links(idx)[0]
                have = (info.get("IFLA_NUM_RX_QUEUES"), info.get("IFLA_NUM_TX_QUEUES"))
                if None not in have and have != (queues, txq):
                    raise LabError(
                        errno.EEXIST,
                        f"{ns}/{ifname} has {have[0]} rx and {have[1]} "
                        f"tx queues, the lab wants {queues} and {txq}: run "
                        "tickwire lab down, then up",
                    )
                if info.get("IFLA_MTU") != cfg.mtu:
                    ipr.link("set", index=idx, mtu=cfg.mtu)
                have = {(a.get("IFA_ADDRESS"), a["prefixlen"]) for a in ipr.get_addr(index=idx)}
                if (addr, line.prefixlen) not in have:
                    ipr.addr("add", index=idx, address=addr, prefixlen=line.prefixlen)
                ipr.link("set", index=idx, state="up")
        with _iproute(cfg.exchange_ns) as ipr:
            idx = _link(ipr, line.exchange_if)
            for k in range(cfg.channels):
                group = cfg.channel_lines(k)[letter].group
                ipr.route("replace", dst=f"{group}/32", oif=idx)
        # the feed's sources are on-link; strict reverse-path filtering would still drop
        # a line's packets if a route ever pointed the other way, so turn it off here
        _sysctl(cfg.appliance_ns, f"net.ipv4.conf.{line.appliance_if}.rp_filter", "0")
    _sysctl(cfg.appliance_ns, "net.ipv4.conf.all.rp_filter", "0")
    if cfg.channels > 1:
        from host.exchange import txsteer

        txsteer.attach(cfg)
        say(f"steering channel k's groups to queue k on {cfg.exchange_ns}'s line ends")
    deadline = time.monotonic() + 5.0  # carrier comes up a moment after both ends do
    while True:
        st = status(cfg)
        if st["up"] or time.monotonic() > deadline:
            return st
        time.sleep(0.02)


def _pids_in(ns: str) -> list[int]:
    """Processes whose network namespace is ``ns``."""
    from pyroute2 import netns as pr_netns

    return sorted(pr_netns.ns_pids().get(ns, []))


def down(cfg: LabConfig, say=lambda msg: None, grace: float = 3.0) -> list[str]:
    """Stop processes in the lab's namespaces and delete them; returns what was removed."""
    _require_root()
    from pyroute2 import netns as pr_netns

    removed = []
    for ns in (cfg.exchange_ns, cfg.appliance_ns):
        if not netns.exists(ns):
            continue
        pids = [p for p in _pids_in(ns) if p != os.getpid()]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while pids and time.monotonic() < deadline:
            pids = [p for p in pids if os.path.exists(f"/proc/{p}")]
            time.sleep(0.05)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if pids:
            say(f"killed {len(pids)} process(es) still in {ns}")
        pr_netns.remove(ns)
        removed.append(ns)
        say(f"removed namespace {ns}")
    return removed


def _interfaces(ns: str) -> list[dict]:
    out = []
    with _iproute(ns) as ipr:
        for link in ipr.get_links():
            name = link.get("IFLA_IFNAME")
            addrs = [
                f"{a.get('IFA_ADDRESS')}/{a['prefixlen']}"
                for a in ipr.get_addr(index=link["index"], family=2)
            ]
            out.append(
                {
                    "name": name,
                    "state": link.get("IFLA_OPERSTATE", "").lower(),
                    "mtu": link.get("IFLA_MTU"),
                    "queues": link.get("IFLA_NUM_RX_QUEUES"),
                    "addresses": addrs,
                }
            )
    return out


def _group_routes(ns: str) -> list[dict]:
    out = []
    with _iproute(ns) as ipr:
        names = {ln["index"]: ln.get("IFLA_IFNAME") for ln in ipr.get_links()}
        for r in ipr.get_routes(family=2):
            dst = r.get("RTA_DST")
            if (
                dst
                and r["dst_len"] == 32
                and dst.split(".")[0].isdigit()
                and 224 <= int(dst.split(".")[0]) <= 239
            ):
                out.append({"group": dst, "dev": names.get(r.get("RTA_OIF"))})
    return out


def status(cfg: LabConfig) -> dict:
    """What of the lab exists: namespaces, interfaces, group routes, processes inside."""
    out = {"prefix": cfg.prefix, "up": True, "namespaces": {}}
    for role, ns in (("exchange", cfg.exchange_ns), ("appliance", cfg.appliance_ns)):
        if not netns.exists(ns):
            out["namespaces"][ns] = {"role": role, "exists": False}
            out["up"] = False
            continue
        info = {
            "role": role,
            "exists": True,
            "interfaces": _interfaces(ns),
            "processes": _pids_in(ns),
        }
        if role == "exchange":
            info["group_routes"] = _group_routes(ns)
        out["namespaces"][ns] = info
    if out["up"]:
        for line in cfg.lines.values():
            for ns, ifname in (
                (cfg.exchange_ns, line.exchange_if),
                (cfg.appliance_ns, line.appliance_if),
            ):
                ifs = {i["name"]: i for i in out["namespaces"][ns]["interfaces"]}
                if ifname not in ifs or ifs[ifname]["state"] not in ("up", "unknown"):
                    out["up"] = False
    if cfg.channels > 1:  # each channel on its queue: the steering on both exchange ends
        from host.exchange import txsteer

        out["channels"] = cfg.channels
        out["tx_steering"] = txsteer.attached(cfg) if netns.exists(cfg.exchange_ns) else []
        if len(out["tx_steering"]) < len(cfg.lines):
            out["up"] = False
    return out


def status_text(st: dict, cfg: LabConfig) -> str:
    lines = [f"lab {st['prefix']}: {'up' if st['up'] else 'not up'}"]
    for ns, info in st["namespaces"].items():
        if not info["exists"]:
            lines.append(f"  {ns} ({info['role']}): missing")
            continue
        lines.append(f"  {ns} ({info['role']})")
        for i in info["interfaces"]:
            if i["name"] == "lo":
                continue
            lines.append(
                f"    {i['name']:<10} {i['state']:<8} mtu {i['mtu']:<5} "
                f"queues {i['queues']}  {' '.join(i['addresses'])}"
            )
        for r in info.get("group_routes", []):
            lines.append(f"    route {r['group']} dev {r['dev']}")
        if info["processes"]:
            lines.append(f"    processes: {' '.join(map(str, info['processes']))}")
    if cfg.channels > 1:
        on = ", ".join(st.get("tx_steering", [])) or "nowhere"
        lines.append(f"  {cfg.channels} channels, channel k on queue k: tx steering on {on}")
    if st["up"]:
        for k in range(cfg.channels):
            head = f"  channel {k} " if cfg.channels > 1 else "  "
            for letter, line in cfg.channel_lines(k).items():
                lines.append(
                    f"{head}line {letter}: {line.group}:{line.port} from {line.exchange_ip}"
                )
        ports = str(cfg.rerequest_port)
        if cfg.channels > 1:
            ports = f"{ports}-{cfg.rerequest_port + cfg.channels - 1} (channel k: + k)"
        lines.append(f"  re-request server port {ports} on the exchange addresses")
    return "\n".join(lines)
