"""The Python mirror of ``bpf/common.h``: what the XDP steering program and user space
agree on (map names, struct layouts, the per-CPU statistics layout); and the XDP attach
flags of ``<linux/if_link.h>``, read from the header through the cffi module -- the one
definition every attach (the loader, AF_XDP sockets, the lab's packet generator) uses.

``tests/test_steer.py`` compiles a small C program against the header and checks every
constant, size and field offset here against it; change both together. Records are
numpy dtypes (``align=True``) so the hot path can view UMEM or map bytes directly.
``CHAN_KEY`` keeps group and port in network byte order, exactly as the kernel hashes
them; ``META`` is host byte order and sits ``META_SIZE`` bytes before a frame's data.
"""

from __future__ import annotations

import numpy as np

from dataplane._xsk import lib

# <linux/if_link.h>: IFLA_XDP_FLAGS
XDP_FLAGS_UPDATE_IF_NOEXIST = int(lib.XDP_FLAGS_UPDATE_IF_NOEXIST)
XDP_FLAGS_SKB_MODE = int(lib.XDP_FLAGS_SKB_MODE)
XDP_FLAGS_DRV_MODE = int(lib.XDP_FLAGS_DRV_MODE)
XDP_FLAGS_HW_MODE = int(lib.XDP_FLAGS_HW_MODE)
XDP_FLAGS_REPLACE = int(lib.XDP_FLAGS_REPLACE)

MAX_CHANNELS = 64
MAX_QUEUES = 64
MAX_IFACES = 16

LINE_A = 0
LINE_B = 1
LINE_LETTERS = ("A", "B")  # index = line number

# map names, as declared in bpf/steer.c
MAP_CHANNELS = "tw_channels"
MAP_IFSLOTS = "tw_ifslots"
MAP_XSKS = "tw_xsks"
MAP_STATS = "tw_stats"
PROG_NAME = "tw_steer"

CHAN_KEY = np.dtype([("group", ">u4"), ("port", ">u2"), ("pad", np.uint16)], align=True)
CHAN_VAL = np.dtype([("channel", np.uint32), ("line", np.uint32)], align=True)
META = np.dtype([("rx_ns", np.uint64), ("channel", np.uint32), ("line", np.uint32)], align=True)
META_SIZE = 16

# tw_stats: global counters (packet counts) ...
G_PASS_OTHER = 0  # not subscribed (non-IPv4, non-UDP, other group/port); passed
G_MALFORMED = 1  # truncated or invalid eth/vlan/ipv4/udp header; passed
G_NO_SOCKET = 2  # subscribed, no AF_XDP socket in the slot; passed to the kernel
G_META_FAIL = 3  # subscribed, bpf_xdp_adjust_meta failed; passed without metadata
G_FRAGMENT = 4  # IPv4 UDP fragment; passed, the kernel reassembles
G_REDIRECTED = 5  # subscribed and redirected to the XSKMAP
G_NO_SLOT = 6  # subscribed, the interface/queue has no XSKMAP slot; passed
G_RESERVED = 7
G_COUNT = 8
# the global counters' names in Steering.stats(), by index
GLOBAL_NAMES = (
    "pass_other",
    "malformed",
    "no_socket",
    "meta_fail",
    "fragment",
    "redirected",
    "no_slot",
)

# ... then packets and bytes per (channel, line)
STATS_BASE = 8
S_PACKETS = 0
S_BYTES = 1
STATS_LEN = STATS_BASE + MAX_CHANNELS * 2 * 2


def stat_index(channel: int, line: int, field: int) -> int:
    """Index in tw_stats of ``field`` (S_PACKETS or S_BYTES) of (channel, line)."""
    return STATS_BASE + (channel * 2 + line) * 2 + field


def chan_key(group: bytes, port: int) -> np.ndarray:
    """A one-record CHAN_KEY for a 4-byte packed IPv4 group (``socket.inet_aton``)."""
    key = np.zeros(1, CHAN_KEY)
    key["group"] = int.from_bytes(group, "big")
    key["port"] = port
    return key


def chan_val(channel: int, line: int) -> np.ndarray:
    val = np.zeros(1, CHAN_VAL)
    val["channel"] = channel
    val["line"] = line
    return val
