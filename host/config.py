"""Configuration: one TOML file, frozen dataclasses, validated at load.

Every table and key is checked: an unknown key, a wrong type or an out-of-range value
raises ``ConfigError`` naming the key (``lab.line_b.group: ...``). Missing keys take the
defaults below, so an empty file (or no file) is a working lab. ``[run]``'s lines have no
defaults (they are the host's, never the lab's): ``for_lab`` (``--lab``) writes the lab's
lines into it, and ``require_lines`` names the key a run still lacks.

```toml
[lab]
prefix = "tw"              # namespaces <prefix>-exch and <prefix>-appl
mtu = 1500

[lab.line_a]
group = "239.77.1.1"
port = 26477

[feed]
session = "TICKWIRE01"
```
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A configuration file or value that cannot be used; the message names the key."""


@dataclass(frozen=True)
class LineConfig:
    # multicast group and UDP port this line publishes on
    group: str
    port: int
    # exchange-side and appliance-side ends of the line's veth pair
    exchange_if: str
    appliance_if: str
    # point-to-point addresses of the two ends (the exchange end is the packets' source)
    exchange_ip: str
    appliance_ip: str
    prefixlen: int = 30


def _line(letter: str, octet: int) -> LineConfig:
    return LineConfig(
        group=f"239.77.{octet}.1",
        port=26476 + octet,
        exchange_if=f"ex-{letter}",
        appliance_if=f"feed-{letter}",
        exchange_ip=f"10.77.{octet}.1",
        appliance_ip=f"10.77.{octet}.2",
    )


@dataclass(frozen=True)
class LabConfig:
    # names every namespace this lab creates: <prefix>-exch, <prefix>-appl
    prefix: str = "tw"
    # MTU of both veth pairs
    mtu: int = 1500
    # RX/TX queues per veth end (AF_XDP binds one socket per queue); at least ``channels``
    queues: int = 1
    # channels published and received at once, on the same two veth pairs: channel k has
    # its own groups (line A's and B's group + k, same ports), its own rx queue k (the
    # exchange ends steer its packets there: host.exchange.txsteer), its own MoldUDP64
    # session and its own re-request server (rerequest_port + k)
    channels: int = 1
    line_a: LineConfig = field(default_factory=lambda: _line("a", 1))
    line_b: LineConfig = field(default_factory=lambda: _line("b", 2))
    # the re-request server's UDP port (it listens on every exchange-side address)
    rerequest_port: int = 26500
    # the GLIMPSE-style snapshot service's TCP port (tickwire sim; 0 = no service, the
    # default; --glimpse-port overrides it); it listens on every exchange-side address,
    # reached on line A's exchange address; channel k's on glimpse_port + k
    glimpse_port: int = 0
    # the SoupBinTCP login the snapshot service accepts: username (1-6 characters) and
    # password (1-10), printable ASCII without spaces
    glimpse_user: str = "tw"
    glimpse_password: str = "tickwire"

    @property
    def exchange_ns(self) -> str:
        return f"{self.prefix}-exch"

    @property
    def appliance_ns(self) -> str:
        return f"{self.prefix}-appl"

    @property
    def lines(self) -> dict[str, LineConfig]:
        return {"A": self.line_a, "B": self.line_b}

    @property
    def rx_queues(self) -> int:
        """Queues each veth end is created with: ``queues``, or one per channel."""
        return max(self.queues, self.channels)

    def channel_lines(self, k: int) -> dict[str, LineConfig]:
        """Lines A and B of the lab's channel ``k`` (0 = ``lines``): group + k."""
        return {
            letter: dataclasses.replace(line, group=str(ipaddress.IPv4Address(line.group) + k))
            for letter, line in self.lines.items()
        }


@dataclass(frozen=True)
class FeedConfig:
    # MoldUDP64 session name: up to 10 ASCII characters (padded with spaces on the wire)
    session: str = "TICKWIRE01"


@dataclass(frozen=True)
class RxLineConfig:
    """One line as the appliance receives it. No defaults: a host's lines are its own (the
    lab's are written by ``for_lab``, ``--lab``); ``require_lines`` names what is unset."""

    # interface the line arrives on, and the queue its packets land on
    interface: str = ""
    queue: int = 0
    # the line's multicast group and UDP port
    group: str = ""
    port: int = 0
    # address of ``interface`` used to join the group (IGMP); "" = let the kernel choose
    address: str = ""


@dataclass(frozen=True)
class RunConfig:
    # channel name: shared memory lives under /dev/shm/tickwire/<channel>/
    channel: str = "totalview"
    # network namespace to run in ("" = the current one); the lab's is <prefix>-appl
    netns: str = ""
    # "xdp" (AF_XDP), "socket" (kernel UDP sockets), or "auto" (xdp when it can attach)
    rx_mode: str = "auto"
    # XDP attach mode: "native", "generic", or "auto" (native, else generic)
    xdp_mode: str = "auto"
    # CPU the consumer process is pinned to (-1: not pinned)
    core: int = -1
    # packets taken from a ring (or recvmmsg) at a time
    batch: int = 64
    # AF_XDP rx and fill ring entries (power of two) and UMEM frames
    ring_size: int = 8192
    frames: int = 16384
    # seconds the consumer may take to come up: from numba's cache it takes a second or
    # two; a cold cache (fresh install, new CPU model) compiles it, about a minute
    start_timeout_s: float = 600.0
    # Prometheus endpoint "host:port" ("" = none)
    metrics: str = "127.0.0.1:9108"
    # order capacity the book starts with (it grows off the hot path when needed)
    orders: int = 1 << 20
    # arbitration: a hole in the sequence is declared a gap (and re-requested) when
    # neither line filled it within window_ms, or window_messages are held behind it
    window_ms: float = 2.0
    window_messages: int = 20_000
    # packets that can wait ahead of a hole (2 KiB each)
    hold_slots: int = 8192
    # an unrecoverable gap: "stale" (mark the books stale, keep going) or "halt"
    policy: str = "stale"
    # re-request server "host:port" ("" = none: every gap is unrecoverable); --lab sets it
    recovery: str = ""
    # recovery client: answer timeout, retries (backoff x2), per-gap SLO, request spacing,
    # the server's per-answer message cap
    recovery_timeout_ms: float = 50.0
    recovery_retries: int = 5
    recovery_slo_ms: float = 2000.0
    recovery_interval_ms: float = 1.0
    recovery_max_messages: int = 1000
    # the event ring (dataplane.events): publish every book change for local readers;
    # per-order events too (for clients keeping their own L3); ring slots (a power of two
    # >= 4096, 64 bytes each: 262144 = 16 MiB, about 80 ms of a busy feed behind the head)
    events: bool = True
    order_events: bool = False
    event_slots: int = 1 << 18
    # lines A and B (unset until given, or pointed at the lab by --lab)
    line_a: RxLineConfig = field(default_factory=RxLineConfig)
    line_b: RxLineConfig = field(default_factory=RxLineConfig)

    @property
    def lines(self) -> dict[str, RxLineConfig]:
        return {"A": self.line_a, "B": self.line_b}


# the provisioning stages ``tickwire preflight`` checks (one Ansible role each)
STAGES = ("hugepages", "cpu_isolation", "irq_affinity", "nic", "sysctl", "ptp", "service")


@dataclass(frozen=True)
class HostConfig:
    """What provisioning promised this host (Ansible's tickwire role templates it from the
    same inventory variables its other roles apply); ``tickwire preflight`` checks the live
    host against it. Every "not checked" default keeps a lab or a laptop runnable."""

    # stages that must pass before `tickwire run` starts (the others are only reported)
    required: tuple[str, ...] = ()
    # hugepages each NUMA node of hugepages_nodes must hold, by page size (0 = not checked)
    hugepages_2m: int = 0
    hugepages_1g: int = 0
    # the NUMA nodes that hold them, as a nodelist ("0", "0-1"): the hugepages role's
    # hugepages_nodes; the other nodes are not checked
    hugepages_nodes: str = "0"
    # hugetlbfs mount points that must be mounted
    hugetlbfs: tuple[str, ...] = ()
    # CPUs isolated for the consumers and the housekeeping CPUs, as cpulists ("" = not checked)
    isolated_cpus: str = ""
    housekeeping_cpus: str = ""
    # the rest of the cpu_isolation role, as tuned's cpu-partitioning profile has it. On the
    # kernel command line: rcu_nocb_poll, nmi_watchdog=0, kthread_cpus= this cpulist
    # ("" = not checked), transparent_hugepage= this mode (always, madvise, never; "" = not
    # checked, which also covers the run-time mode)
    rcu_nocb_poll: bool = False
    nmi_watchdog_off: bool = False
    kthread_cpus: str = ""
    transparent_hugepage: str = ""
    # at run time: the unbound and writeback workqueues' cpumask ("" = not checked), KSM
    # stopped, every cpufreq policy's governor ("" = not checked), and each isolated CPU's
    # PM QoS resume latency limit in microseconds (the C-state limit; 0 = polling only,
    # -1 = not checked)
    workqueue_cpus: str = ""
    ksm_off: bool = False
    cpu_governor: str = ""
    idle_latency_us: int = -1
    # where each feed queue's IRQ goes: "consumer" (run.core) or "housekeeping"
    irq_placement: str = "consumer"
    # RPS and XPS masks every feed queue must carry, hex cpumasks ("" = not checked, "0" = off)
    rps_mask: str = ""
    xps_mask: str = ""
    # feed NIC: channel count (combined, else rx) and rx ring entries (0 = not checked)
    channels: int = 0
    rx_ring: int = 0
    # offloads that must be off on the feed interfaces (`ethtool -k` names, e.g.
    # "generic-receive-offload")
    offloads_off: tuple[str, ...] = ()
    # each line's group and port must have an ntuple rule steering it to the line's queue
    ntuple: bool = False
    # sysctl values the host must hold, by dotted name
    sysctl: dict = field(default_factory=dict)
    # interfaces ptp4l/phc2sys serve
    ptp_interfaces: tuple[str, ...] = ()
    # the one of ptp_interfaces whose PTP time steers the system clock (phc2sys from its
    # PHC, ptp4l itself with software timestamps, or timemaster's chronyd); "" = none, and
    # then neither phc2sys nor "one program steers the clock" is checked
    ptp_phc2sys_interface: str = ""
    # the largest offset from the master (either sign) ptp4l may report, in nanoseconds
    ptp_max_offset_ns: int = 1000
    # the systemd unit that runs the appliance ("" = not checked)
    service: str = ""


@dataclass(frozen=True)
class ImageConfig:
    """What the appliance image's first boot (``tickwire firstboot``) does beyond applying
    ``[run]`` and ``[host]`` with the roles. Ignored everywhere else."""

    # reboot once when first boot changed the kernel command line (isolated cores, 1 GiB
    # pages); false: say that a reboot is needed and start nothing
    reboot: bool = False
    # numba's CPU model for the consumer: "native" (warm this CPU's cache at first boot),
    # "generic" (the image's build-time cache), "auto" (generic under emulation, else native)
    numba_cpu: str = "auto"
    # interfaces first boot names and addresses, a table per name:
    # [image.interfaces.feed-a] match = "52:54:00:12:34:56" (a MAC, or the name the kernel
    # gives it), address = "10.20.1.10/24" ("" = no address: multicast only)
    interfaces: dict = field(default_factory=dict)
    # more Ansible role variables, verbatim (e.g. hugepages_mounts, nic_flows)
    ansible: dict = field(default_factory=dict)


# [run] keys that belong to the whole process, never to one channel: one namespace, one
# receive path and XDP attach mode over every interface, one metrics endpoint, one start
# deadline (the channel's name is its table's ``name``)
PROCESS_KEYS = frozenset(("netns", "rx_mode", "xdp_mode", "metrics", "start_timeout_s", "channel"))


def channel_keys() -> tuple[str, ...]:
    """The keys a ``[[channel]]`` table may set: ``name``, ``session`` and every per-channel
    ``[run]`` key (RunConfig's fields but ``PROCESS_KEYS``)."""
    run = [f.name for f in dataclasses.fields(RunConfig) if f.name not in PROCESS_KEYS]
    return ("name", "session", *run)


@dataclass(frozen=True)
class ChannelConfig:
    """One ``[[channel]]`` table: a feed of its own (lines, core, queue, shared memory,
    metrics label) supervised by the same ``tickwire run`` as the others. Whatever it does
    not set it inherits from ``[run]`` (a line's keys one by one, from ``[run.line_a]``);
    ``channel_configs`` resolves it into a one-channel Config."""

    # the channel's name: its shared memory directory and its metrics label (run.channel)
    name: str
    # its MoldUDP64 session ("" = [feed] session)
    session: str = ""
    # the [run] keys the table sets, as written (line_a / line_b: their sub-tables' keys)
    run: dict = field(default_factory=dict)


@dataclass(frozen=True)
class WorldViewConfig:
    """``tickwire world``: one consolidated best bid and offer per symbol across channels
    (venues), served over gRPC (host/appliance/worldview.py)."""

    # gRPC endpoint "host:port" the world view serves on
    listen: str = "127.0.0.1:50551"
    # the channels (venues) it aggregates, by name; [] = every channel of this
    # configuration ([[channel]] tables, or run.channel; the lab's with --lab)
    channels: tuple[str, ...] = ()
    # tickers it keeps (1-8 characters); [] = every symbol of every venue
    symbols: tuple[str, ...] = ()
    # WatchBBO streams served at once (each holds a server thread); one more is refused
    max_watchers: int = 64
    # Prometheus endpoint "host:port" of the tickwire_world_* metrics ("" = none), e.g.
    # "127.0.0.1:9466"
    metrics: str = ""


@dataclass(frozen=True)
class FeedServerConfig:
    """``tickwire serve``: the event rings over WebSocket (``tw-v1`` frames,
    host/appliance/feed.py) to remote clients."""

    # the address it listens on ("0.0.0.0": every interface of its namespace)
    listen: str = "0.0.0.0"
    port: int = 8765
    # the tokens a client may present (``Authorization: Bearer <token>``), and/or a file of
    # them, one a line ("#" comments); neither: no token needed
    tokens: tuple[str, ...] = ()
    token_file: str = ""
    # TLS (wss://) when both are set: PEM certificate (chain) and its private key
    tls_cert: str = ""
    tls_key: str = ""
    # connections served at once; one more is refused (HTTP 503)
    max_clients: int = 64
    # frames a client's send queue holds beyond the socket's buffer: full = evicted
    queue_frames: int = 1024
    # a client whose socket has taken nothing for this long is evicted
    stall_timeout_s: float = 5.0
    # a heartbeat frame after this long without a frame
    heartbeat_s: float = 1.0
    # events kept per channel for from_seq replays (a power of two, >= 4096)
    retention_events: int = 1 << 20
    # the channels served; [] = every channel of this configuration
    channels: tuple[str, ...] = ()
    # Prometheus endpoint "host:port" of the tickwire_feed_* metrics ("" = none)
    metrics: str = ""
    # the world view's gRPC endpoint "host:port" (tickwire world), served as the channel
    # "world": its consolidated quotes ("" = no world channel)
    world: str = ""


@dataclass(frozen=True)
class JournalConfig:
    """The message journal (host/appliance/journal.py): every message taken, in sequence,
    in segment files on local disk, written by a process of its own, never the consumer."""

    # journal the messages taken
    enabled: bool = False
    # the journals' directory (an absolute path)
    dir: str = "/var/lib/tickwire/journal"
    # "none" (the kernel writes back when it likes), "interval" (fdatasync at most every
    # sync_interval_s), "every" (fdatasync after each batch written)
    sync: str = "interval"
    sync_interval_s: float = 1.0
    # a segment file rolls at this size, MiB (1..65536)
    segment_mb: int = 256
    # retention, whole oldest segments, never the one being written: past this total size,
    # GiB (0 = no limit; else at least one segment), or once a segment's newest record is
    # older than this many days (0 = keep)
    retain_gb: float = 0.0
    retain_days: float = 0.0
    # the message ring between the consumer and the journal writer, MiB (a power of two,
    # 1..4096): the writer may fall this far behind before the journal gets a hole
    ring_mb: int = 64


@dataclass(frozen=True)
class SnapshotConfig:
    """Book snapshots (host/appliance/snapshot.py): the consumer's whole book at a message
    boundary, with its sequence and digest, taken by a fork of the consumer."""

    # take snapshots (on demand with `tickwire snapshot`, and every interval_s)
    enabled: bool = False
    # the snapshots' directory (an absolute path): <dir>/<channel>/<session>/
    dir: str = "/var/lib/tickwire/snapshots"
    # seconds between timed snapshots; 0 = on demand only
    interval_s: float = 0.0
    # snapshots kept per channel and session, newest first (older ones are deleted)
    keep: int = 3


@dataclass(frozen=True)
class GlimpseConfig:
    """The exchange's snapshot service (GLIMPSE 5.0 over SoupBinTCP 4.0) a consumer logs in
    to when it starts mid-session (host/appliance/restart.py)."""

    # host:port of the service; "" = none (a late start asks the re-request server for all)
    address: str = ""
    user: str = ""  # SoupBinTCP login: up to 6 characters
    password: str = ""  # up to 10 characters
    # logins tried (a refusal, a drop mid-spin, no answer), with a doubling backoff
    attempts: int = 5
    backoff_s: float = 0.5
    # one try's limit: the login's answer, then each packet of the spin
    timeout_s: float = 30.0
    # a restart's restored books more than this many messages behind the spin take the
    # spin instead; closer, the re-request server fills the difference
    prefer_over: int = 50_000


@dataclass(frozen=True)
class Config:
    lab: LabConfig = field(default_factory=LabConfig)
    feed: FeedConfig = field(default_factory=FeedConfig)
    run: RunConfig = field(default_factory=RunConfig)
    host: HostConfig = field(default_factory=HostConfig)
    image: ImageConfig = field(default_factory=ImageConfig)
    feed_server: FeedServerConfig = field(default_factory=FeedServerConfig)
    world_view: WorldViewConfig = field(default_factory=WorldViewConfig)
    journal: JournalConfig = field(default_factory=JournalConfig)
    snapshot: SnapshotConfig = field(default_factory=SnapshotConfig)
    glimpse: GlimpseConfig = field(default_factory=GlimpseConfig)
    # [[channel]] tables; none: one channel, [run] itself (channel_configs)
    channel: tuple[ChannelConfig, ...] = ()


_CPULIST = re.compile(r"^\d+(-\d+)?(,\d+(-\d+)?)*$")
_HEXMASK = re.compile(r"^[0-9a-fA-F]+(,[0-9a-fA-F]+)*$")
_MAX_NUMNODES = 1 << 10  # the kernel's largest NODES_SHIFT
_SYSCTL = re.compile(r"^[a-z0-9_]+(\.[A-Za-z0-9_-]+)+$")


def cpulist(text: str) -> frozenset[int]:
    """The CPUs of a kernel cpulist ("0-3,8"); "" is none. Raises ValueError."""
    cpus: set[int] = set()
    for part in filter(None, text.strip().split(",")):
        lo, _, hi = part.partition("-")
        first, last = int(lo), int(hi or lo)
        if last < first:
            raise ValueError(f"{part!r} runs backwards")
        cpus.update(range(first, last + 1))
    return frozenset(cpus)


def _validate_host(host: HostConfig) -> None:
    for stage in host.required:
        if stage not in STAGES:
            raise ConfigError(f"host.required: {stage!r} is not a stage ({', '.join(STAGES)})")
    for key in ("hugepages_2m", "hugepages_1g", "channels", "rx_ring"):
        if not 0 <= getattr(host, key) <= 1 << 20:
            raise ConfigError(f"host.{key}: {getattr(host, key)} is outside 0..1048576")
    for key in ("isolated_cpus", "housekeeping_cpus", "kthread_cpus", "workqueue_cpus"):
        text = getattr(host, key)
        if text and not _CPULIST.match(text):
            raise ConfigError(f'host.{key}: {text!r} is not a cpulist (e.g. "2-5,7")')
    if host.transparent_hugepage not in ("", "always", "madvise", "never"):
        raise ConfigError(
            f"host.transparent_hugepage: {host.transparent_hugepage!r} is not one of "
            'always, madvise, never (or "")'
        )
    if host.cpu_governor and not re.match(r"^[a-z][a-z0-9_]{0,15}$", host.cpu_governor):
        raise ConfigError(f"host.cpu_governor: {host.cpu_governor!r} is not a cpufreq governor")
    if not -1 <= host.idle_latency_us <= 1 << 20:
        raise ConfigError(
            f"host.idle_latency_us: {host.idle_latency_us} is outside -1..1048576 microseconds"
        )
    if host.idle_latency_us >= 0 and not host.isolated_cpus:
        raise ConfigError("host.idle_latency_us: applies to host.isolated_cpus, which is empty")
    if (
        host.isolated_cpus
        and host.housekeeping_cpus
        and (cpulist(host.isolated_cpus) & cpulist(host.housekeeping_cpus))
    ):
        raise ConfigError("host.housekeeping_cpus: overlaps host.isolated_cpus")
    if host.irq_placement not in ("consumer", "housekeeping"):
        raise ConfigError(
            f"host.irq_placement: {host.irq_placement!r} is not one of consumer, housekeeping"
        )
    for key in ("rps_mask", "xps_mask"):
        text = getattr(host, key)
        if text and not _HEXMASK.match(text):
            raise ConfigError(f'host.{key}: {text!r} is not a hex cpumask (e.g. "0", "c")')
    if not _CPULIST.match(host.hugepages_nodes):
        raise ConfigError(
            f"host.hugepages_nodes: {host.hugepages_nodes!r} is not a nodelist of at least "
            'one NUMA node (e.g. "0", "0-1")'
        )
    try:
        nodes = cpulist(host.hugepages_nodes)
    except ValueError as e:
        raise ConfigError(f"host.hugepages_nodes: {e}") from None
    if max(nodes) >= _MAX_NUMNODES:
        raise ConfigError(f"host.hugepages_nodes: node {max(nodes)} is outside 0..1023")
    for path in host.hugetlbfs:
        if not path.startswith("/"):
            raise ConfigError(f"host.hugetlbfs: {path!r} is not an absolute path")
    for name, value in host.sysctl.items():
        if not _SYSCTL.match(name) or not isinstance(value, (int, str)) or isinstance(value, bool):
            raise ConfigError(
                f"host.sysctl.{name}: expected a dotted name with an integer or string value"
            )
    for name in host.ptp_interfaces:
        if not _IFNAME.match(name):
            raise ConfigError(f"host.ptp_interfaces: {name!r} is not a valid interface name")
    if host.ptp_phc2sys_interface and host.ptp_phc2sys_interface not in host.ptp_interfaces:
        raise ConfigError(
            f"host.ptp_phc2sys_interface: {host.ptp_phc2sys_interface!r} is not one of "
            "host.ptp_interfaces"
        )
    if not 1 <= host.ptp_max_offset_ns <= 1_000_000_000:
        raise ConfigError(
            f"host.ptp_max_offset_ns: {host.ptp_max_offset_ns} is outside 1..1000000000"
        )
    if host.service and not re.match(r"^[A-Za-z0-9@_.-]+\.service$", host.service):
        raise ConfigError(f"host.service: {host.service!r} is not a systemd service unit name")


_MAC = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")


def _validate_image(image: ImageConfig) -> None:
    if image.numba_cpu not in ("auto", "native", "generic"):
        raise ConfigError(
            f"image.numba_cpu: {image.numba_cpu!r} is not one of auto, native, generic"
        )
    for name, spec in image.interfaces.items():
        key = f"image.interfaces.{name}"
        if not _IFNAME.match(name):
            raise ConfigError(f"{key}: {name!r} is not a valid interface name (1-15 characters)")
        if not isinstance(spec, dict) or set(spec) - {"match", "address"}:
            raise ConfigError(f"{key}: expected a table with match and address")
        match = spec.get("match", "")
        if not isinstance(match, str) or not (_MAC.match(match) or _IFNAME.match(match)):
            raise ConfigError(
                f"{key}.match: {match!r} is neither a MAC address nor an interface name"
            )
        address = spec.get("address", "")
        if address:
            try:
                iface = ipaddress.IPv4Interface(address)
            except ValueError:
                raise ConfigError(
                    f"{key}.address: {address!r} is not an IPv4 address/prefix"
                ) from None
            if "/" not in address or iface.ip.is_multicast or iface.ip.is_unspecified:
                raise ConfigError(
                    f"{key}.address: {address!r} must be a unicast address with its prefix length"
                )
    for name in image.ansible:
        if not re.match(r"^[a-z][a-z0-9_]*$", name):
            raise ConfigError(f"image.ansible.{name}: not an Ansible variable name")


_PREFIX = re.compile(r"^[a-z][a-z0-9]{0,9}$")
_CHANNEL = re.compile(r"^[A-Za-z0-9_-]{1,32}$")
_IFNAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,14}$")


def _check_ip(key: str, text: str, multicast: bool = False) -> None:
    try:
        addr = ipaddress.IPv4Address(text)
    except ValueError:
        raise ConfigError(f"{key}: not an IPv4 address: {text!r}") from None
    if multicast and not addr.is_multicast:
        raise ConfigError(f"{key}: {text} is not a multicast group (224.0.0.0/4)")
    if not multicast and (addr.is_multicast or addr.is_unspecified):
        raise ConfigError(f"{key}: {text} is not a unicast address")


def _check_port(key: str, port: int) -> None:
    if not 1 <= port <= 65535:
        raise ConfigError(f"{key}: port {port} is outside 1..65535")


def host_port(text: str, key: str) -> tuple[str, int]:
    """``"host:port"`` as (host, port): the one parser of endpoints in configuration
    (``run.metrics``, ``run.recovery``). Raises ``ConfigError`` naming ``key``."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ConfigError(f"{key}: {text!r} must be host:port")
    _check_port(key, int(port))
    return host, int(port)


def _validate_line(key: str, line: LineConfig) -> None:
    _check_ip(f"{key}.group", line.group, multicast=True)
    _check_port(f"{key}.port", line.port)
    for name in ("exchange_if", "appliance_if"):
        if not _IFNAME.match(getattr(line, name)):
            raise ConfigError(f"{key}.{name}: not a valid interface name (1-15 characters)")
    _check_ip(f"{key}.exchange_ip", line.exchange_ip)
    _check_ip(f"{key}.appliance_ip", line.appliance_ip)
    if not 8 <= line.prefixlen <= 30:
        raise ConfigError(f"{key}.prefixlen: {line.prefixlen} is outside 8..30")
    net_x = ipaddress.IPv4Interface(f"{line.exchange_ip}/{line.prefixlen}").network
    net_a = ipaddress.IPv4Interface(f"{line.appliance_ip}/{line.prefixlen}").network
    if net_x != net_a or line.exchange_ip == line.appliance_ip:
        raise ConfigError(
            f"{key}: exchange_ip and appliance_ip must be two addresses of one "
            f"/{line.prefixlen} network"
        )


def _validate_run(run: RunConfig, at: str = "run") -> None:
    """Check ``run``; errors name its keys under ``at`` (``run``, or ``channel[1]``)."""
    if not _CHANNEL.match(run.channel):
        raise ConfigError(
            f"{at}.channel: {run.channel!r} must be letters, digits, - or _ (1-32 characters)"
        )
    for name, value, allowed in (
        ("rx_mode", run.rx_mode, ("auto", "xdp", "socket")),
        ("xdp_mode", run.xdp_mode, ("auto", "native", "generic")),
    ):
        if value not in allowed:
            raise ConfigError(f"{at}.{name}: {value!r} is not one of {', '.join(allowed)}")
    if run.core < -1 or run.core >= 4096:
        raise ConfigError(f"{at}.core: {run.core} is not a CPU number (or -1)")
    if not 1 <= run.batch <= 1024:
        raise ConfigError(f"{at}.batch: {run.batch} is outside 1..1024")
    if run.ring_size < 64 or run.ring_size & (run.ring_size - 1) or run.ring_size > 1 << 16:
        raise ConfigError(f"{at}.ring_size: {run.ring_size} must be a power of two, 64..65536")
    if run.frames < run.ring_size or run.frames > 1 << 20:
        raise ConfigError(
            f"{at}.frames: {run.frames} must be at least ring_size and at most 1048576"
        )
    if not 1 <= run.start_timeout_s <= 3600:
        raise ConfigError(f"{at}.start_timeout_s: {run.start_timeout_s} is outside 1..3600")
    if run.policy not in ("stale", "halt"):
        raise ConfigError(f"{at}.policy: {run.policy!r} is not one of stale, halt")
    if not 0 < run.window_ms <= 60_000:
        raise ConfigError(f"{at}.window_ms: {run.window_ms} is outside (0, 60000]")
    if run.window_messages < 1:
        raise ConfigError(f"{at}.window_messages: {run.window_messages} must be positive")
    if not 16 <= run.hold_slots <= 1 << 20:
        raise ConfigError(f"{at}.hold_slots: {run.hold_slots} is outside 16..1048576")
    es = run.event_slots
    if es < 1024 or es & (es - 1) or es > 1 << 26:
        raise ConfigError(f"{at}.event_slots: {es} must be a power of two, 1024..67108864")
    if run.recovery:
        _check_ip(f"{at}.recovery", host_port(run.recovery, f"{at}.recovery")[0])
    for name in ("recovery_timeout_ms", "recovery_slo_ms", "recovery_interval_ms"):
        if getattr(run, name) < 0:
            raise ConfigError(f"{at}.{name}: must not be negative")
    if run.recovery_retries < 0 or run.recovery_max_messages < 1:
        raise ConfigError(f"{at}.recovery_retries must be >= 0 and {at}.recovery_max_messages >= 1")
    if run.orders < 16 or run.orders > 1 << 28:
        raise ConfigError(f"{at}.orders: {run.orders} is outside 16..268435456")
    if run.metrics:
        _check_ip(f"{at}.metrics", host_port(run.metrics, f"{at}.metrics")[0])
    for letter, line in run.lines.items():  # what is set; require_lines asks for the rest
        key = f"{at}.line_{letter.lower()}"
        if line.interface and not _IFNAME.match(line.interface):
            raise ConfigError(f"{key}.interface: not a valid interface name")
        if not 0 <= line.queue < 64:
            raise ConfigError(f"{key}.queue: {line.queue} is outside 0..63")
        if line.group:
            _check_ip(f"{key}.group", line.group, multicast=True)
        if line.port:
            _check_port(f"{key}.port", line.port)
        if line.address:
            _check_ip(f"{key}.address", line.address)
    a, b = run.line_a, run.line_b
    if a.group and a.port and (a.group, a.port) == (b.group, b.port):
        raise ConfigError(f"{at}.line_b: lines A and B must use different group/port pairs")
    if a.interface and (a.interface, a.queue) == (b.interface, b.queue):
        raise ConfigError(
            f"{at}.line_b: lines A and B both arrive on {a.interface} queue "
            f"{a.queue}; the consumer takes each line from its own (interface, "
            "queue): steer B to another queue or interface"
        )


def validate(cfg: Config) -> Config:
    lab = cfg.lab
    if not _PREFIX.match(lab.prefix):
        raise ConfigError(
            f"lab.prefix: {lab.prefix!r} must be a lower-case letter followed "
            "by up to 9 letters or digits"
        )
    if not 576 <= lab.mtu <= 9000:
        raise ConfigError(f"lab.mtu: {lab.mtu} is outside 576..9000")
    if not 1 <= lab.queues <= 16:
        raise ConfigError(f"lab.queues: {lab.queues} is outside 1..16")
    _validate_line("lab.line_a", lab.line_a)
    _validate_line("lab.line_b", lab.line_b)
    a, b = lab.line_a, lab.line_b
    if (a.group, a.port) == (b.group, b.port):
        raise ConfigError("lab.line_b: lines A and B must use different group/port pairs")
    if a.exchange_if == b.exchange_if or a.appliance_if == b.appliance_if:
        raise ConfigError("lab.line_b: lines A and B must use different interfaces")
    na = ipaddress.IPv4Interface(f"{a.exchange_ip}/{a.prefixlen}").network
    nb = ipaddress.IPv4Interface(f"{b.exchange_ip}/{b.prefixlen}").network
    if na.overlaps(nb):
        raise ConfigError("lab.line_b: lines A and B must be on separate networks")
    _check_port("lab.rerequest_port", lab.rerequest_port)
    _validate_lab_glimpse(lab)
    _validate_lab_channels(lab)
    _validate_run(cfg.run)
    _validate_channels(cfg)
    _validate_host(cfg.host)
    _validate_image(cfg.image)
    _validate_feed_server(cfg.feed_server)
    _validate_world_view(cfg.world_view)
    _validate_journal(cfg.journal)
    _validate_snapshot(cfg.snapshot)
    _validate_glimpse(cfg.glimpse)
    _check_session("feed.session", cfg.feed.session)
    return cfg


def _validate_glimpse(g: GlimpseConfig) -> None:
    if g.address:
        host_port(g.address, "glimpse.address")
    if len(g.user) > 6 or not g.user.isascii():
        raise ConfigError(f"glimpse.user: {g.user!r} is not up to 6 ASCII characters")
    if len(g.password) > 10 or not g.password.isascii():
        raise ConfigError("glimpse.password: not up to 10 ASCII characters")
    if not 1 <= g.attempts <= 1000:
        raise ConfigError(f"glimpse.attempts: {g.attempts} is outside 1..1000")
    for key in ("backoff_s", "timeout_s"):
        if not 0 < getattr(g, key) <= 3600:
            raise ConfigError(f"glimpse.{key}: {getattr(g, key)} is outside (0, 3600]")
    if g.prefer_over < 0:
        raise ConfigError(f"glimpse.prefer_over: {g.prefer_over} is negative")


def _validate_snapshot(sn: SnapshotConfig) -> None:
    if not os.path.isabs(sn.dir):
        raise ConfigError(f"snapshot.dir: {sn.dir!r} is not an absolute path")
    if not 0 <= sn.interval_s <= 86400:
        raise ConfigError(f"snapshot.interval_s: {sn.interval_s} is outside 0..86400")
    if not 1 <= sn.keep <= 1000:
        raise ConfigError(f"snapshot.keep: {sn.keep} is outside 1..1000")


def _validate_journal(j: JournalConfig) -> None:
    if not j.dir.startswith("/"):
        raise ConfigError(f"journal.dir: {j.dir!r} is not an absolute path")
    if j.sync not in ("none", "interval", "every"):
        raise ConfigError(f"journal.sync: {j.sync!r} is not one of none, interval, every")
    if not 0 < j.sync_interval_s <= 3600:
        raise ConfigError(f"journal.sync_interval_s: {j.sync_interval_s} is outside (0, 3600]")
    if not (1 <= j.ring_mb <= 4096 and j.ring_mb & (j.ring_mb - 1) == 0):
        raise ConfigError(f"journal.ring_mb: {j.ring_mb} is not a power of two in 1..4096")
    if not 1 <= j.segment_mb <= 1 << 16:
        raise ConfigError(f"journal.segment_mb: {j.segment_mb} is outside 1..65536")
    for key, what in (("retain_gb", "no limit"), ("retain_days", "keep")):
        v = getattr(j, key)
        if not 0 <= v < float("inf"):  # NaN too
            raise ConfigError(f"journal.{key}: {v} must be a number, 0 or more (0 = {what})")
    if 0 < j.retain_gb * 1024 < j.segment_mb:
        raise ConfigError(
            f"journal.retain_gb: {j.retain_gb} GiB is less than one segment "
            f"(journal.segment_mb = {j.segment_mb} MiB)"
        )


def _validate_world_view(wv: WorldViewConfig) -> None:
    host, port = host_port(wv.listen, "world_view.listen")
    try:  # 0.0.0.0: every interface
        if ipaddress.IPv4Address(host).is_multicast:
            raise ValueError
    except ValueError:
        raise ConfigError(
            f"world_view.listen: {host!r} is not a unicast IPv4 address (or 0.0.0.0)"
        ) from None
    seen: set[str] = set()
    for name in wv.channels:
        if not _CHANNEL.match(name):
            raise ConfigError(
                f"world_view.channels: {name!r} must be letters, digits, - or _ (1-32 characters)"
            )
        if name in seen:
            raise ConfigError(f"world_view.channels: {name!r} is listed twice")
        seen.add(name)
    for sym in wv.symbols:
        if not (1 <= len(sym) <= 8 and sym.isascii() and sym.isprintable() and " " not in sym):
            raise ConfigError(f"world_view.symbols: {sym!r} is not a ticker (1-8 characters)")
    if not 1 <= wv.max_watchers <= 4096:
        raise ConfigError(f"world_view.max_watchers: {wv.max_watchers} is outside 1..4096")
    if wv.metrics and host_port(wv.metrics, "world_view.metrics")[1] == port:
        raise ConfigError(f"world_view.metrics: port {port} is world_view.listen's")


def world_view_channels(cfg: Config) -> list[str]:
    """The venues ``tickwire world`` aggregates: ``world_view.channels``, or every channel
    of ``cfg`` (``channel_configs``)."""
    return list(cfg.world_view.channels) or [c.run.channel for c in channel_configs(cfg)]


def _validate_feed_server(fs: FeedServerConfig) -> None:
    try:
        if ipaddress.IPv4Address(fs.listen).is_multicast:
            raise ValueError
    except ValueError:
        raise ConfigError(
            f"feed_server.listen: {fs.listen!r} is not a unicast IPv4 address (or 0.0.0.0)"
        ) from None
    _check_port("feed_server.port", fs.port)
    for t in fs.tokens:
        if not t or not t.isascii() or not t.isprintable() or " " in t:
            raise ConfigError("feed_server.tokens: a token must be printable ASCII, no spaces")
    if bool(fs.tls_cert) != bool(fs.tls_key):
        key = "tls_key" if fs.tls_cert else "tls_cert"
        raise ConfigError(f"feed_server.{key}: TLS needs both tls_cert and tls_key")
    if not 1 <= fs.max_clients <= 100_000:
        raise ConfigError(f"feed_server.max_clients: {fs.max_clients} is outside 1..100000")
    if not 1 <= fs.queue_frames <= 1 << 20:
        raise ConfigError(f"feed_server.queue_frames: {fs.queue_frames} is outside 1..1048576")
    for key in ("stall_timeout_s", "heartbeat_s"):
        if not 0 < getattr(fs, key) <= 3600:
            raise ConfigError(f"feed_server.{key}: {getattr(fs, key)} is outside (0, 3600]")
    r = fs.retention_events
    if r < 4096 or r & (r - 1) or r > 1 << 28:
        raise ConfigError(
            f"feed_server.retention_events: {r} is not a power of two in 4096..268435456"
        )
    for name in fs.channels:
        if not _CHANNEL.match(name):
            raise ConfigError(
                f"feed_server.channels: {name!r} must be letters, digits, - or _ (1-32 characters)"
            )
    if len(set(fs.channels)) != len(fs.channels):
        raise ConfigError("feed_server.channels: a channel is listed twice")
    if fs.metrics:
        host_port(fs.metrics, "feed_server.metrics")
    if fs.world:
        host_port(fs.world, "feed_server.world")
        if "world" in fs.channels:
            raise ConfigError(
                "feed_server.channels: 'world' is the world view's channel (feed_server.world)"
            )


def feed_server_tokens(fs: FeedServerConfig) -> frozenset[str]:
    """``tokens`` and the lines of ``token_file``. Raises ``ConfigError`` naming the key."""
    tokens = set(fs.tokens)
    if fs.token_file:
        try:
            text = Path(fs.token_file).read_text()
        except OSError as e:
            raise ConfigError(f"feed_server.token_file: {fs.token_file}: {e.strerror}") from None
        for line in text.splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                tokens.add(line)
    return frozenset(tokens)


def _validate_lab_glimpse(lab: LabConfig) -> None:
    if lab.glimpse_port != 0:  # 0: no service
        _check_port("lab.glimpse_port", lab.glimpse_port)
        if lab.glimpse_port + lab.channels - 1 > 65535:
            raise ConfigError(
                f"lab.glimpse_port: channel {lab.channels - 1}'s snapshot service would "
                f"listen on {lab.glimpse_port + lab.channels - 1}, outside 1..65535"
            )
    for key, most in (("glimpse_user", 6), ("glimpse_password", 10)):
        text = getattr(lab, key)
        if not (1 <= len(text) <= most and text.isascii() and text.isprintable()) or " " in text:
            raise ConfigError(
                f"lab.{key}: {text!r} must be 1-{most} printable ASCII characters, no spaces"
            )


def _validate_lab_channels(lab: LabConfig) -> None:
    if not 1 <= lab.channels <= 16:
        raise ConfigError(f"lab.channels: {lab.channels} is outside 1..16")
    if lab.rerequest_port + lab.channels - 1 > 65535:
        raise ConfigError(
            f"lab.rerequest_port: channel {lab.channels - 1}'s server would listen on "
            f"{lab.rerequest_port + lab.channels - 1}, outside 1..65535"
        )
    seen: dict[tuple[str, int], str] = {}
    for k in range(lab.channels):
        try:
            lines = lab.channel_lines(k)
        except ValueError:  # past 255.255.255.255
            raise ConfigError(
                f"lab.channels: channel {k}'s groups run past 255.255.255.255"
            ) from None
        for letter, line in lines.items():
            key = f"lab.line_{letter.lower()}.group"
            if not ipaddress.IPv4Address(line.group).is_multicast:
                raise ConfigError(f"{key}: channel {k}'s group {line.group} is not multicast")
            g = (line.group, line.port)
            if g in seen:
                raise ConfigError(
                    f"{key}: channel {k} line {letter} and {seen[g]} would share "
                    f"{line.group}:{line.port} (channel k's groups are line A's and B's + k)"
                )
            seen[g] = f"channel {k} line {letter}"


def _build(cls, key: str, table: Any, defaults: Any):
    """Build dataclass ``cls`` from a TOML table over ``defaults`` (an instance)."""
    if not isinstance(table, dict):
        raise ConfigError(f"{key}: expected a table, got {type(table).__name__}")
    names = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for k, v in table.items():
        sub = f"{key}.{k}" if key else k
        if k not in names:
            raise ConfigError(f"{sub}: unknown key (known: {', '.join(sorted(names))})")
        current = getattr(defaults, k)
        if cls is Config and k == "channel":
            values[k] = _channel_tables(v)
        elif dataclasses.is_dataclass(current):
            values[k] = _build(type(current), sub, v, current)
        else:
            want = type(current)
            if want is int and (isinstance(v, bool) or not isinstance(v, int)):
                raise ConfigError(f"{sub}: expected an integer, got {v!r}")
            if want is str and not isinstance(v, str):
                raise ConfigError(f"{sub}: expected a string, got {v!r}")
            if want is float and (isinstance(v, bool) or not isinstance(v, (int, float))):
                raise ConfigError(f"{sub}: expected a number, got {v!r}")
            if want is bool and not isinstance(v, bool):
                raise ConfigError(f"{sub}: expected true or false, got {v!r}")
            if want is tuple and not (isinstance(v, list) and all(isinstance(x, str) for x in v)):
                raise ConfigError(f"{sub}: expected a list of strings, got {v!r}")
            if want is dict and not isinstance(v, dict):
                raise ConfigError(f"{sub}: expected a table, got {v!r}")
            values[k] = want(v)
    return dataclasses.replace(defaults, **values)


def _channel_tables(tables: Any) -> tuple[ChannelConfig, ...]:
    """``[[channel]]`` tables as ChannelConfigs: keys known, values of the right types (a
    value's range is checked by ``validate``, once inherited keys are filled in)."""
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise ConfigError("channel: expected [[channel]] tables")
    known = channel_keys()
    out = []
    for i, table in enumerate(tables):
        at = f"channel[{i}]"
        for k in table:
            if k in PROCESS_KEYS:
                raise ConfigError(
                    f"{at}.{k}: belongs to the whole process, not to one channel: set it "
                    "in [run]"
                    + (" (a channel's name is its table's name)" if k == "channel" else "")
                )
            if k not in known:
                raise ConfigError(f"{at}.{k}: unknown key (known: {', '.join(sorted(known))})")
        if "name" not in table:
            raise ConfigError(f"{at}.name: not set (every channel needs a name)")
        for k in ("name", "session"):
            if not isinstance(table.get(k, ""), str):
                raise ConfigError(f"{at}.{k}: expected a string, got {table[k]!r}")
        run = {k: v for k, v in table.items() if k not in ("name", "session")}
        _build(RunConfig, at, run, RunConfig())  # types, and the line sub-tables' keys
        out.append(ChannelConfig(name=table["name"], session=table.get("session", ""), run=run))
    return tuple(out)


def _channel_run(cfg: Config, i: int) -> RunConfig:
    """Channel ``i``'s RunConfig: its table over ``[run]``, named after the table."""
    spec = cfg.channel[i]
    run = _build(RunConfig, f"channel[{i}]", spec.run, cfg.run)
    return dataclasses.replace(run, channel=spec.name)


def channel_configs(cfg: Config) -> list[Config]:
    """One Config per channel, each with ``run`` that channel's (``run.channel`` its name)
    and ``feed.session`` its session: ``[cfg]`` itself when it has no ``[[channel]]``."""
    if not cfg.channel:
        return [cfg]
    return [
        dataclasses.replace(
            cfg,
            run=_channel_run(cfg, i),
            feed=dataclasses.replace(cfg.feed, session=spec.session or cfg.feed.session),
            channel=(),
        )
        for i, spec in enumerate(cfg.channel)
    ]


def _check_session(key: str, s: str) -> None:
    if not (1 <= len(s) <= 10 and s.isascii() and s.isprintable()):
        raise ConfigError(f"{key}: {s!r} must be 1-10 printable ASCII characters")


def _validate_channels(cfg: Config) -> None:
    """Each ``[[channel]]`` table, resolved, and what channels may not share."""
    names: dict[str, int] = {}
    for i, spec in enumerate(cfg.channel):
        at = f"channel[{i}]"
        if not _CHANNEL.match(spec.name):
            raise ConfigError(
                f"{at}.name: {spec.name!r} must be letters, digits, - or _ (1-32 characters)"
            )
        if spec.name in names:
            raise ConfigError(
                f"{at}.name: {spec.name!r} is channel[{names[spec.name]}]'s name too; "
                "each channel needs its own (it names its shared memory and metrics)"
            )
        names[spec.name] = i
        if spec.session:
            _check_session(f"{at}.session", spec.session)
        _validate_run(_channel_run(cfg, i), at)
    if cfg.channel:
        runs = [c.run for c in channel_configs(cfg)]
        _check_shared(runs, [f"channel[{i}]" for i in range(len(runs))])


def _check_shared(runs: list[RunConfig], ats: list[str]) -> None:
    """Refuse two channels on one core, one (interface, queue) or one (group, port)."""
    cores: dict[int, int] = {}
    queues: dict[tuple[str, int], tuple[int, str]] = {}
    groups: dict[tuple[str, int], tuple[int, str]] = {}
    for i, run in enumerate(runs):
        if run.core >= 0:
            if run.core in cores:
                raise ConfigError(
                    f"{ats[i]}.core: channels {runs[cores[run.core]].channel} and "
                    f"{run.channel} are both pinned to core {run.core}; each channel's "
                    "consumer needs a core of its own"
                )
            cores[run.core] = i
        for letter, line in run.lines.items():
            at = f"{ats[i]}.line_{letter.lower()}"
            if line.interface:
                q = (line.interface, line.queue)
                j, other = queues.setdefault(q, (i, letter))
                if j != i:
                    raise ConfigError(
                        f"{at}: channels {runs[j].channel} (line {other}) and {run.channel} "
                        f"(line {letter}) both arrive on {line.interface} queue {line.queue}; "
                        "each channel needs queues of its own (one AF_XDP socket per queue): "
                        "steer its groups to another queue"
                    )
            if line.group and line.port:
                g = (line.group, line.port)
                j, other = groups.setdefault(g, (i, letter))
                if j != i:
                    raise ConfigError(
                        f"{at}: channels {runs[j].channel} (line {other}) and {run.channel} "
                        f"(line {letter}) both use {line.group}:{line.port}; each channel's "
                        "lines need groups of their own"
                    )


def cpus_text(cpus) -> str:
    """A set of CPUs as a canonical cpulist (``{0, 1, 2, 5}``: "0-2,5"); "" for none."""
    out, run = [], []
    for c in sorted(cpus):
        if run and c == run[-1] + 1:
            run.append(c)
            continue
        if run:
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [c]
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(out)


def check_cores(cfgs: list[Config], cpus: set[int] | frozenset[int] | None = None) -> None:
    """Refuse channels (``channel_configs``) that ask for more cores than this host gives
    this process (``cpus``, default its affinity): a pinned core it cannot use, or more
    pinned consumers than CPUs. Checked where the consumers start (``tickwire run``), not
    at load: a configuration may be written on one host for another."""
    cpus = set(os.sched_getaffinity(0) if cpus is None else cpus)
    pinned = [c.run for c in cfgs if c.run.core >= 0]
    several = len(cfgs) > 1
    for run in pinned:
        if run.core not in cpus:
            who = f"channel {run.channel}: core" if several else "run.core:"
            raise ConfigError(
                f"{who} {run.core} is not a CPU this host offers (CPUs {cpus_text(cpus)})"
            )
    if len(pinned) > len(cpus):
        raise ConfigError(
            f"channels {', '.join(r.channel for r in pinned)}: {len(pinned)} pinned "
            f"consumers, but this host offers {len(cpus)} CPUs ({cpus_text(cpus)})"
        )


def from_dict(data: dict) -> Config:
    return validate(_build(Config, "", data, Config()))


def with_lab(cfg: Config | None = None, **changes) -> Config:
    """``cfg`` (the defaults when None) with ``[lab]`` fields changed, validated: e.g. a
    private lab for a test or a benchmark, ``with_lab(prefix="tb123")``."""
    cfg = cfg or Config()
    return validate(dataclasses.replace(cfg, lab=dataclasses.replace(cfg.lab, **changes)))


# what each key of a [run] line is, for the error when it is unset
_LINE_KEYS = {
    "interface": "the interface the line arrives on",
    "group": "the line's multicast group",
    "port": "the line's UDP port",
}


def require_lines(
    run: RunConfig, keys: tuple[str, ...] = ("interface", "group", "port"), at: str = "run"
) -> None:
    """Raise ``ConfigError`` naming the first of ``keys`` a line of ``run`` leaves unset:
    ``[run]`` has no lines of its own (``--lab`` takes the lab's). ``at`` names the table
    (``channel[1]`` for a channel's)."""
    for letter, line in run.lines.items():
        for key in keys:
            if not getattr(line, key):
                raise ConfigError(
                    f"{at}.line_{letter.lower()}.{key}: not set ({_LINE_KEYS[key]}"
                    "; --lab uses the lab's lines)"
                )


def require_channel_lines(
    cfg: Config, keys: tuple[str, ...] = ("interface", "group", "port")
) -> list[Config]:
    """``channel_configs(cfg)``, each with its lines set (``require_lines``)."""
    cfgs = channel_configs(cfg)
    for i, c in enumerate(cfgs):
        require_lines(c.run, keys, f"channel[{i}]" if cfg.channel else "run")
    return cfgs


@dataclass(frozen=True)
class LabChannel:
    """Channel k of the lab, as the simulator publishes it and ``--lab`` receives it."""

    name: str
    session: str
    # the appliance-side rx queue its packets arrive on (k)
    queue: int
    # lines A and B (the lab's, with groups + k)
    lines: dict
    # its re-request server's port (lab.rerequest_port + k)
    rerequest_port: int


def lab_channels(cfg: Config) -> list[LabChannel]:
    """The lab's ``lab.channels`` channels. Channel k takes its name and session from the
    k-th ``[[channel]]`` table when there is one; otherwise channel 0 is ``run.channel``
    on ``[feed] session`` (a one-channel lab is today's), channel k ``ch<k>`` on session
    ``TICKWIRE<k+1>`` (TICKWIRE02, ...)."""
    out = []
    for k in range(cfg.lab.channels):
        spec = cfg.channel[k] if k < len(cfg.channel) else None
        name = spec.name if spec else (cfg.run.channel if k == 0 else f"ch{k}")
        session = spec.session if spec and spec.session else ""
        session = session or (cfg.feed.session if k == 0 else f"TICKWIRE{k + 1:02d}")
        out.append(
            LabChannel(name, session, k, cfg.lab.channel_lines(k), cfg.lab.rerequest_port + k)
        )
    return out


def for_lab(cfg: Config) -> Config:
    """``cfg`` with its ``[run]`` pointed at the lab: the appliance namespace and the
    appliance ends of the lab's lines (groups, ports, addresses from ``[lab]``)."""
    lines = {}
    for letter, line in cfg.lab.lines.items():
        old = cfg.run.lines[letter]
        lines[f"line_{letter.lower()}"] = dataclasses.replace(
            old,
            interface=line.appliance_if,
            group=line.group,
            port=line.port,
            address=line.appliance_ip,
        )
    recovery = cfg.run.recovery or f"{cfg.lab.line_a.exchange_ip}:{cfg.lab.rerequest_port}"
    run = dataclasses.replace(cfg.run, netns=cfg.lab.appliance_ns, recovery=recovery, **lines)
    if cfg.lab.channels == 1 and not cfg.channel:
        glimpse = cfg.glimpse
        if cfg.lab.glimpse_port and not glimpse.address:  # the simulator's snapshot service
            glimpse = dataclasses.replace(
                glimpse,
                address=f"{cfg.lab.line_a.exchange_ip}:{cfg.lab.glimpse_port}",
                user=cfg.lab.glimpse_user,
                password=cfg.lab.glimpse_password,
            )
        return validate(dataclasses.replace(cfg, run=run, glimpse=glimpse))
    # several channels (or [[channel]] tables): one table per lab channel, each on its
    # groups, its queue and its re-request server; a table's own keys stay
    n = cfg.lab.channels
    if len(cfg.channel) > n:
        raise ConfigError(
            f"channel[{n}]: the lab has {n} channel{'s' if n > 1 else ''} (lab.channels), "
            f"the configuration {len(cfg.channel)}"
        )
    tables = []
    for lc in lab_channels(cfg):
        own = cfg.channel[lc.queue].run if lc.queue < len(cfg.channel) else {}
        table = dict(own)
        for letter, line in lc.lines.items():
            key = f"line_{letter.lower()}"
            table[key] = {
                **own.get(key, {}),
                "interface": line.appliance_if,
                "queue": lc.queue,
                "group": line.group,
                "port": line.port,
                "address": line.appliance_ip,
            }
        table.setdefault("recovery", f"{cfg.lab.line_a.exchange_ip}:{lc.rerequest_port}")
        tables.append(ChannelConfig(name=lc.name, session=lc.session, run=table))
    return validate(dataclasses.replace(cfg, run=run, channel=tuple(tables)))


def load(path: str | Path | None = None, prefix: str | None = None) -> Config:
    """Load and validate ``path`` (defaults only when None); ``prefix`` overrides lab.prefix."""
    data: dict = {}
    if path is not None:
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such configuration file") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML: {e}") from None
    cfg = _build(Config, "", data, Config())
    if prefix is not None:
        cfg = dataclasses.replace(cfg, lab=dataclasses.replace(cfg.lab, prefix=prefix))
    try:
        return validate(cfg)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path else str(e)) from None
