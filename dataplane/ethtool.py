"""The ethtool ioctl (``SIOCETHTOOL``) on an interface of the calling thread's network
namespace, with the command numbers and structs of ``<linux/ethtool.h>`` (through the cffi
module ``dataplane._xsk``, one C helper for every command).

``channels(ifname)`` (what ``ethtool -l`` prints) and ``ts_info(ifname)`` (``ethtool -T``);
``rings`` (``-g``), ``features`` (``-k``) and ``flow_rules`` (``-n``) for ``tickwire
preflight``.
Each raises ``EthtoolError`` (an ``OSError`` with the kernel's errno: ``EOPNOTSUPP`` when
the driver does not implement the command, ``ENODEV`` without such an interface).
"""

from __future__ import annotations

import os
import socket
import sys
from typing import NamedTuple

from dataplane._xsk import ffi, lib

SIOCETHTOOL = int(lib.SIOCETHTOOL)
ETHTOOL_GCHANNELS = int(lib.ETHTOOL_GCHANNELS)
ETHTOOL_GET_TS_INFO = int(lib.ETHTOOL_GET_TS_INFO)
UDP_V4_FLOW, TCP_V4_FLOW, SCTP_V4_FLOW = lib.UDP_V4_FLOW, lib.TCP_V4_FLOW, lib.SCTP_V4_FLOW
RX_CLS_FLOW_DISC, RX_CLS_FLOW_WAKE = int(lib.RX_CLS_FLOW_DISC), int(lib.RX_CLS_FLOW_WAKE)
# the capabilities in TsInfo.so_timestamping, by the names ``ethtool -T`` prints
SOF_TIMESTAMPING = {
    "hardware-transmit": lib.SOF_TIMESTAMPING_TX_HARDWARE,
    "software-transmit": lib.SOF_TIMESTAMPING_TX_SOFTWARE,
    "hardware-receive": lib.SOF_TIMESTAMPING_RX_HARDWARE,
    "software-receive": lib.SOF_TIMESTAMPING_RX_SOFTWARE,
    "software-system-clock": lib.SOF_TIMESTAMPING_SOFTWARE,
    "hardware-legacy-clock": lib.SOF_TIMESTAMPING_SYS_HARDWARE,
    "hardware-raw-clock": lib.SOF_TIMESTAMPING_RAW_HARDWARE,
}


class EthtoolError(OSError):
    """An ethtool command failed on an interface; ``errno`` is the kernel's."""


def _check(rc: int, what: str) -> None:
    if rc < 0:
        raise EthtoolError(-rc, f"{what}: {os.strerror(-rc)}")


def _call(ifname: str, ctype: str, cmd: int, name: str):
    req = ffi.new(f"struct {ctype} *")
    req.cmd = cmd
    _check(lib.tw_ethtool(ifname.encode(), req), f"{ifname}: {name}")
    return req


class Channels(NamedTuple):
    max_rx: int
    max_tx: int
    max_other: int
    max_combined: int
    rx: int
    tx: int
    other: int
    combined: int


def channels(ifname: str) -> Channels:
    """The interface's queue (channel) counts and their maxima, ``ETHTOOL_GCHANNELS``."""
    c = _call(ifname, "ethtool_channels", ETHTOOL_GCHANNELS, "ETHTOOL_GCHANNELS")
    return Channels(
        c.max_rx,
        c.max_tx,
        c.max_other,
        c.max_combined,
        c.rx_count,
        c.tx_count,
        c.other_count,
        c.combined_count,
    )


class TsInfo(NamedTuple):
    phc_index: int  # the PTP hardware clock, /dev/ptpN (-1: none)
    so_timestamping: int  # SOF_TIMESTAMPING_* the interface supports
    tx_types: int
    rx_filters: int


def ts_info(ifname: str) -> TsInfo:
    """The interface's time-stamping capabilities, ``ETHTOOL_GET_TS_INFO``."""
    t = _call(ifname, "ethtool_ts_info", ETHTOOL_GET_TS_INFO, "ETHTOOL_GET_TS_INFO")
    return TsInfo(t.phc_index, t.so_timestamping, t.tx_types, t.rx_filters)


class Rings(NamedTuple):
    max_rx: int
    max_rx_mini: int
    max_rx_jumbo: int
    max_tx: int
    rx: int
    rx_mini: int
    rx_jumbo: int
    tx: int


def rings(ifname: str) -> Rings:
    """The interface's descriptor ring sizes and their maxima, ``ETHTOOL_GRINGPARAM``."""
    r = _call(ifname, "ethtool_ringparam", lib.ETHTOOL_GRINGPARAM, "ETHTOOL_GRINGPARAM")
    return Rings(
        r.rx_max_pending,
        r.rx_mini_max_pending,
        r.rx_jumbo_max_pending,
        r.tx_max_pending,
        r.rx_pending,
        r.rx_mini_pending,
        r.rx_jumbo_pending,
        r.tx_pending,
    )


class Feature(NamedTuple):
    available: bool  # the driver lets it be changed
    requested: bool  # what was last asked for
    active: bool
    never_changed: bool  # fixed by the core, whatever the driver says


def features(ifname: str) -> dict[str, Feature]:
    """The interface's netdev features by their kernel names (``ETH_SS_FEATURES``:
    ``ETHTOOL_GSSET_INFO``, ``ETHTOOL_GSTRINGS``, ``ETHTOOL_GFEATURES``)."""
    name = ifname.encode()
    info = ffi.new("struct ethtool_sset_info *", {"data": 1})
    info.cmd, info.sset_mask = lib.ETHTOOL_GSSET_INFO, 1 << lib.ETH_SS_FEATURES
    _check(lib.tw_ethtool(name, info), f"{ifname}: ETHTOOL_GSSET_INFO")
    n = info.data[0] if info.sset_mask else 0
    width = lib.ETH_GSTRING_LEN
    strings = ffi.new("struct ethtool_gstrings *", {"data": n * width})
    strings.cmd, strings.string_set, strings.len = lib.ETHTOOL_GSTRINGS, lib.ETH_SS_FEATURES, n
    _check(lib.tw_ethtool(name, strings), f"{ifname}: ETHTOOL_GSTRINGS")
    blocks = ffi.new("struct ethtool_gfeatures *", {"features": (n + 31) // 32})
    blocks.cmd, blocks.size = lib.ETHTOOL_GFEATURES, (n + 31) // 32
    _check(lib.tw_ethtool(name, blocks), f"{ifname}: ETHTOOL_GFEATURES")
    raw = ffi.buffer(strings.data, n * width)
    out = {}
    for i in range(n):
        label = bytes(raw[i * width : (i + 1) * width]).split(b"\0", 1)[0].decode()
        if not label:
            continue
        b, bit = blocks.features[i // 32], 1 << (i % 32)
        out[label] = Feature(
            bool(b.available & bit),
            bool(b.requested & bit),
            bool(b.active & bit),
            bool(b.never_changed & bit),
        )
    return out


class FlowRule(NamedTuple):
    """An IPv4 flow-steering rule. Masks are the kernel's: set bits must match (``ethtool
    -n`` prints their complement)."""

    location: int
    flow_type: int  # UDP_V4_FLOW, TCP_V4_FLOW, ... (FLOW_EXT, FLOW_MAC_EXT, FLOW_RSS cleared)
    dst_ip: str
    dst_ip_mask: str
    dst_port: int | None  # TCP, UDP and SCTP rules only
    dst_port_mask: int | None
    queue: int | None  # None: drop, wake-on-LAN, a VF's queue or an RSS context's


_PORTS = {
    "tcp_ip4_spec": lib.TCP_V4_FLOW,
    "udp_ip4_spec": lib.UDP_V4_FLOW,
    "sctp_ip4_spec": lib.SCTP_V4_FLOW,
}
_IPV4 = {*_PORTS.values(), lib.AH_V4_FLOW, lib.ESP_V4_FLOW, lib.IPV4_USER_FLOW}


def _ip(be32: int) -> str:
    return socket.inet_ntoa(be32.to_bytes(4, sys.byteorder))


def _port(be16: int) -> int:
    return socket.ntohs(be16)


def flow_rules(ifname: str) -> list[FlowRule]:
    """The interface's IPv4 flow-steering (ntuple) rules, ``ETHTOOL_GRXCLSRLCNT``,
    ``ETHTOOL_GRXCLSRLALL`` and ``ETHTOOL_GRXCLSRULE`` (other flow types are left out)."""
    name = ifname.encode()
    count = ffi.new("struct ethtool_rxnfc *")
    count.cmd = lib.ETHTOOL_GRXCLSRLCNT
    _check(lib.tw_ethtool(name, count), f"{ifname}: ETHTOOL_GRXCLSRLCNT")
    n = count.rule_cnt
    every = ffi.new("struct ethtool_rxnfc *", {"rule_locs": n})
    every.cmd, every.data, every.rule_cnt = lib.ETHTOOL_GRXCLSRLALL, count.data, n
    _check(lib.tw_ethtool(name, every), f"{ifname}: ETHTOOL_GRXCLSRLALL")
    out = []
    for loc in sorted(every.rule_locs[i] for i in range(every.rule_cnt)):
        one = ffi.new("struct ethtool_rxnfc *")
        one.cmd, one.fs.location = lib.ETHTOOL_GRXCLSRULE, loc
        _check(lib.tw_ethtool(name, one), f"{ifname}: ETHTOOL_GRXCLSRULE {loc}")
        fs = one.fs
        kind = fs.flow_type & ~(lib.FLOW_EXT | lib.FLOW_MAC_EXT | lib.FLOW_RSS)
        if kind not in _IPV4:
            continue
        ports = next((k for k, v in _PORTS.items() if v == kind), None)
        h, m = getattr(fs.h_u, ports or "tcp_ip4_spec"), getattr(fs.m_u, ports or "tcp_ip4_spec")
        cookie = int(fs.ring_cookie)
        vf = (cookie & lib.ETHTOOL_RX_FLOW_SPEC_RING_VF) >> lib.ETHTOOL_RX_FLOW_SPEC_RING_VF_OFF
        plain = (
            cookie not in (RX_CLS_FLOW_DISC, RX_CLS_FLOW_WAKE)
            and not vf
            and not (fs.flow_type & lib.FLOW_RSS)
        )
        out.append(
            FlowRule(
                loc,
                kind,
                _ip(h.ip4dst),
                _ip(m.ip4dst),
                _port(h.pdst) if ports else None,
                _port(m.pdst) if ports else None,
                cookie & lib.ETHTOOL_RX_FLOW_SPEC_RING if plain else None,
            )
        )
    return out
