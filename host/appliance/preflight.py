"""``tickwire preflight``: check the live host against what provisioning promised.

Each stage is one Ansible role (``host.config.STAGES``) and one function here that looks at
the machine and returns checks: a name, whether it holds, what the host has, what the
configuration wants, and the fix (the playbook tag to re-run, or the command). The stage's
status follows from its checks, as in Firedancer's ``fdctl configure``:

    OK              every check holds
    PARTIAL         some hold
    NOT CONFIGURED  none holds
    SKIPPED         nothing to check: ``[host]`` promises nothing for this stage

Applying and undoing a stage is the Ansible role's job (``--tags STAGE``); this module only
reads. What to check comes from ``[host]`` (what provisioning promised) and ``[run]`` (the
feed interfaces, their queues, groups and ports, and the consumer core). One extra stage,
``runtime``, holds what ``tickwire run`` always needs (namespace, feed interfaces,
capabilities, locked memory, bpffs, the consumer core); it is never skipped.

The host is ready when every required stage is OK: ``runtime`` and the stages named in
``host.required`` (or, with ``--stage``, the stages asked for). A required stage that
``[host]`` promises nothing for is not OK: there is nothing to prove it.

Everything is read through a ``Host``: the roots of ``/proc``, ``/sys`` and ``/etc`` and the
ethtool reader are injectable, so the tests build fake trees. What ``ethtool -l/-g/-k/-n/-T``
would show comes from the kernel, not from ethtool's text: the SIOCETHTOOL ioctl through
``dataplane.ethtool`` (channels, rings, features, flow rules, timestamping). The names of
the offloads are the ones ``ethtool -k`` prints (``shown_features``), since that is what
``[host] offloads_off`` and the nic role's ``nic_offloads_off`` list.

``Host.live(netns)`` looks at a network namespace the way the appliance will see it: the
ioctls and ``net.*`` sysctls run with the thread switched into the namespace, and network
sysfs (``class/net``) is read through a helper process that ``ip netns exec`` left with the
namespace's own sysfs mounted (``/proc/PID/root/sys``).
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import glob
import os
import re
import shlex
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from dataplane import ethtool
from dataplane.ethtool import EthtoolError
from host import netns as nsmod
from host.config import STAGES, Config, cpulist, cpus_text

RUNTIME = "runtime"
ALL_STAGES = (RUNTIME, *STAGES)
OK, PARTIAL, NOT_CONFIGURED, SKIPPED = "OK", "PARTIAL", "NOT CONFIGURED", "SKIPPED"

# the Ansible role (playbook tag) that applies each stage
ROLE = {
    "hugepages": "hugepages",
    "cpu_isolation": "cpu_isolation",
    "irq_affinity": "irq_affinity",
    "nic": "nic",
    "sysctl": "sysctl",
    "ptp": "ptp",
    "service": "tickwire",
}

# <linux/capability.h>
CAP_NUMBERS = {
    "CAP_NET_ADMIN": 12,
    "CAP_NET_RAW": 13,
    "CAP_IPC_LOCK": 14,
    "CAP_SYS_ADMIN": 21,
    "CAP_SYS_NICE": 23,
    "CAP_PERFMON": 38,
    "CAP_BPF": 39,
}
# what the appliance needs, and all the systemd unit may grant
SERVICE_CAPS = (
    "CAP_BPF",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_SYS_NICE",
    "CAP_PERFMON",
)


class PreflightError(OSError):
    """The host is not ready for ``tickwire run``; the message lists what fails."""


def playbook(stage: str) -> str:
    return f"ansible-playbook -i INVENTORY ansible/provision.yml --tags {ROLE[stage]}"


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    have: str
    want: str
    fix: str = ""

    def as_json(self) -> dict:
        return {
            "name": self.name,
            "ok": self.ok,
            "have": self.have,
            "want": self.want,
            "fix": self.fix,
        }


@dataclass(frozen=True)
class StageResult:
    stage: str
    status: str
    required: bool
    checks: tuple[Check, ...] = ()

    @property
    def passed(self) -> bool:
        return self.status == OK

    @property
    def reboot_required(self) -> bool:
        return any(not c.ok and c.fix.startswith("reboot required") for c in self.checks)

    def as_json(self) -> dict:
        return {
            "stage": self.stage,
            "status": self.status,
            "required": self.required,
            "checks": [c.as_json() for c in self.checks],
        }


def status_of(checks: list[Check] | tuple[Check, ...]) -> str:
    if not checks:
        return SKIPPED
    passing = sum(c.ok for c in checks)
    return OK if passing == len(checks) else NOT_CONFIGURED if passing == 0 else PARTIAL


# --- parsing (pure functions of text) ---------------------------------------------------------
def mask_value(text: str) -> int:
    """A kernel hex cpumask ("00000000,00000003", "3", "c") as an integer."""
    return int(text.strip().replace(",", "") or "0", 16)


def param_cpus(value: str | None) -> frozenset[int] | None:
    """The CPUs of a kernel parameter value, flags dropped ("managed_irq,domain,2-3")."""
    if value is None:
        return None
    parts = [p for p in value.split(",") if p[:1].isdigit()]
    try:
        return cpulist(",".join(parts))
    except ValueError:
        return None


def parse_cmdline(text: str) -> dict[str, str]:
    """Kernel command line parameters: name -> value ("" for a bare flag; the last wins)."""
    params = {}
    for token in text.split():
        if token == "--":  # what follows belongs to init
            break
        name, _, value = token.partition("=")
        params[name] = value
    return params


def parse_grub(text: str) -> dict[str, str]:
    """Kernel parameters a GRUB defaults file puts on the command line."""
    params: dict[str, str] = {}
    for line in text.splitlines():
        m = re.match(r"\s*(?:export\s+)?GRUB_CMDLINE_LINUX(?:_DEFAULT)?=(.*)$", line)
        if m:
            try:
                words = shlex.split(m.group(1))
            except ValueError:
                continue
            for word in words:
                params.update(parse_cmdline(word))
    return params


# ``ethtool -k`` shows the old ethtool flags first, each by its long name, folding the
# features whose kernel names match its pattern (ethtool's common.c off_flag_def and
# netlink/features.c dump_features): one matching feature is shown under the flag's name,
# several by their own names after a line "flag: on|off" (on when any is on, never
# [fixed]); "udp-fragmentation-offload" is not shown (no kernel with netlink ethtool has it)
LEGACY_FLAGS = (
    ("rx-checksumming", "rx-checksum"),
    ("tx-checksumming", "tx-checksum-*"),
    ("scatter-gather", "tx-scatter-gather*"),
    ("tcp-segmentation-offload", "tx-tcp*-segmentation"),
    ("generic-segmentation-offload", "tx-generic-segmentation"),
    ("generic-receive-offload", "rx-gro"),
    ("large-receive-offload", "rx-lro"),
    ("rx-vlan-offload", "rx-vlan-hw-parse"),
    ("tx-vlan-offload", "tx-vlan-hw-insert"),
    ("ntuple-filters", "rx-ntuple-filter"),
    ("receive-hashing", "rx-hashing"),
    ("udp-fragmentation-offload", "tx-udp-fragmentation"),  # folded, never shown
)


def _fixed(f: ethtool.Feature) -> bool:
    return not f.available or f.never_changed


def shown_features(features: dict[str, ethtool.Feature]) -> dict[str, tuple[bool, bool]]:
    """The kernel's features as ``ethtool -k`` names them: name -> (on, fixed)."""
    out: dict[str, tuple[bool, bool]] = {}
    folded: set[str] = set()
    for long_name, pattern in LEGACY_FLAGS:
        match = [n for n in features if fnmatch.fnmatchcase(n, pattern)]
        folded.update(match)
        if long_name == "udp-fragmentation-offload":
            continue
        if len(match) == 1:
            f = features[match[0]]
            out[long_name] = (f.active, _fixed(f))
            continue
        out[long_name] = (any(features[n].active for n in match), False)
        for n in match:
            out[n] = (features[n].active, _fixed(features[n]))
    for n, f in features.items():
        if n not in folded:
            out[n] = (f.active, _fixed(f))
    return out


def current_channels(ch: ethtool.Channels) -> dict[str, int | None]:
    """The current RX, TX, Other, Combined counts; None for a kind the NIC does not have
    (``ethtool -l`` prints n/a)."""
    return {
        "RX": ch.rx if ch.max_rx else None,
        "TX": ch.tx if ch.max_tx else None,
        "Other": ch.other if ch.max_other else None,
        "Combined": ch.combined if ch.max_combined else None,
    }


def current_rings(r: ethtool.Rings) -> dict[str, int | None]:
    """The current RX and TX ring sizes (None: the NIC has no such ring, ``n/a``)."""
    return {"RX": r.rx if r.max_rx else None, "TX": r.tx if r.max_tx else None}


def steers(rule: ethtool.FlowRule, group: str, port: int, queue: int) -> bool:
    """``rule`` sends UDP to ``group``:``port`` (or to ``group``, any port) to ``queue``."""
    exact_ip = rule.dst_ip == group and rule.dst_ip_mask == "255.255.255.255"
    port_ok = rule.dst_port_mask == 0 or (rule.dst_port == port and rule.dst_port_mask == 0xFFFF)
    return exact_ip and port_ok and rule.flow_type == ethtool.UDP_V4_FLOW and rule.queue == queue


@dataclass(frozen=True)
class Timestamping:
    hardware: bool  # hardware transmit and receive timestamps with a PHC
    phc: int | None
    software: bool

    @classmethod
    def of(cls, ts: ethtool.TsInfo) -> Timestamping:
        caps = {name for name, bit in ethtool.SOF_TIMESTAMPING.items() if ts.so_timestamping & bit}
        phc = ts.phc_index if ts.phc_index >= 0 else None
        hw = {"hardware-transmit", "hardware-receive"} <= caps and phc is not None
        return cls(hw, phc, {"software-transmit", "software-receive"} <= caps)


def parse_unit(texts: list[str], section: str = "Service") -> dict[str, list[str]]:
    """Settings of a systemd unit and its drop-ins, in order: key -> values (an empty
    assignment resets the list, as systemd does)."""
    out: dict[str, list[str]] = {}
    for text in texts:
        current = None
        for raw in text.splitlines():
            line = raw.strip()
            if not line or line[0] in "#;":
                continue
            if line.startswith("["):
                current = line.strip("[]")
                continue
            if current != section or "=" not in line:
                continue
            key, _, value = line.partition("=")
            key, value = key.strip(), value.strip()
            if value == "":
                out[key] = []
            else:
                out.setdefault(key, []).append(value)
    return out


# IRQ names that carry a queue index: "mlx5_comp3@pci:...", "i40e-ens1f0-TxRx-3",
# "ens1f0-rx-3", "virtio2-input.0", "eth2-3" (sfc)
_IRQ_QUEUE = re.compile(r"(?:txrx|rx|tx|comp|input|output|queue|fp)[-_.]?(\d+)(?:@|$)", re.I)
_IRQ_NOT_QUEUE = re.compile(r"config|async|ctrl|misc|fw|link|event|cmd|aux", re.I)


def irq_queue(name: str) -> int | None:
    """The queue an IRQ named ``name`` serves, when its name says so."""
    if _IRQ_NOT_QUEUE.search(name):
        return None
    m = _IRQ_QUEUE.search(name) or re.search(r"-(\d+)$", name)
    return int(m.group(1)) if m else None


def parse_interrupts(text: str) -> dict[int, str]:
    """``/proc/interrupts``: IRQ number -> its name (the last column)."""
    out = {}
    for line in text.splitlines():
        m = re.match(r"\s*(\d+):\s.*\s(\S+)\s*$", line)
        if m:
            out[int(m.group(1))] = m.group(2)
    return out


# --- the host -----------------------------------------------------------------------------
class Host:
    """The machine as files under ``proc``, ``sys`` and ``etc`` plus an ethtool reader:
    ``ethtool(what, ifname)`` returns ``dataplane.ethtool.<what>(ifname)`` (``channels``,
    ``rings``, ``features``, ``flow_rules``, ``ts_info``) or raises ``EthtoolError``.

    ``net_sys`` is the sysfs that shows the feed interfaces (``sys`` unless the feeds live
    in another network namespace); ``enter()`` is a context manager that switches the
    calling thread to that namespace (for ``net.*`` sysctls); ``netns_dir`` holds the
    named namespaces; ``netns_error`` says why the namespace could not be looked into.
    """

    def __init__(
        self,
        proc: str | Path = "/proc",
        sys: str | Path = "/sys",
        etc: str | Path = "/etc",
        ethtool: Callable[[str, str], object] | None = None,
        net_sys: str | Path | None = None,
        netns_dir: str | Path = "/var/run/netns",
        enter: Callable[[], contextlib.AbstractContextManager] | None = None,
        netns: str = "",
        netns_error: str = "",
    ):
        self.proc, self.sys, self.etc = Path(proc), Path(sys), Path(etc)
        self.net_sys = Path(net_sys) if net_sys is not None else self.sys
        self.netns_dir = Path(netns_dir)
        self._ethtool = ethtool or self._kernel_ethtool
        self.enter = enter or contextlib.nullcontext
        self.netns = netns
        self.netns_error = netns_error

    @classmethod
    @contextlib.contextmanager
    def live(cls, netns: str = "") -> Iterator[Host]:
        """The running machine, with the feed interfaces looked at in ``netns``."""
        if not netns:
            yield cls()
            return

        if not nsmod.exists(netns):
            yield cls(netns=netns, netns_error=f"network namespace {netns} does not exist")
            return
        # ip netns exec mounts the namespace's own sysfs on /sys in a private mount
        # namespace; a process parked there lends it to us as /proc/PID/root/sys
        try:
            holder = subprocess.Popen(
                ["ip", "netns", "exec", netns, "sh", "-c", "echo ready; exec sleep 3600"],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        except OSError as e:
            yield cls(netns=netns, netns_error=f"cannot run ip netns exec: {e.strerror}")
            return
        try:
            if holder.stdout.readline() != "ready\n":
                holder.wait(timeout=10)
                reason = holder.stderr.read().strip().splitlines()
                yield cls(
                    netns=netns,
                    netns_error=f"cannot look into network namespace "
                    f"{netns}: {reason[-1] if reason else 'ip netns exec failed'}",
                )
                return
            yield cls(
                net_sys=f"/proc/{holder.pid}/root/sys",
                netns=netns,
                enter=lambda: nsmod.entered(netns),
            )
        finally:
            if holder.poll() is None:
                holder.kill()
            holder.wait()
            for f in (holder.stdout, holder.stderr):
                f.close()

    # files
    @staticmethod
    def read(path: str | Path) -> str | None:
        try:
            with open(path) as f:
                return f.read()
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as e:  # e.g. EINVAL reading xps_cpus of a single-queue device
            return f"<unreadable: {e.strerror}>"

    def proc_text(self, rel: str) -> str | None:
        return self.read(self.proc / rel)

    def sys_text(self, rel: str) -> str | None:
        return self.read(self.sys / rel)

    def net_path(self, ifname: str, rel: str = "") -> Path:
        return self.net_sys / "class" / "net" / ifname / rel

    def etc_path(self, path: str) -> Path:
        """``path`` (absolute, "/etc/..." or relative to /etc) under the etc root."""
        rel = path[len("/etc/") :] if path.startswith("/etc/") else path.lstrip("/")
        return self.etc / rel

    def interface_exists(self, ifname: str) -> bool:
        return not self.netns_error and self.net_path(ifname).exists()

    def sysctl(self, name: str) -> str | None:
        path = self.proc / "sys" / name.replace(".", "/")
        if name.startswith("net.") and self.netns:
            with self.enter():
                return self.read(path)
        return self.read(path)

    def _kernel_ethtool(self, what: str, ifname: str):
        with self.enter():  # the ioctl's socket belongs to the namespace it is opened in
            return getattr(ethtool, what)(ifname)

    def ethtool(self, what: str, ifname: str):
        if self.netns_error:
            raise EthtoolError(errno.ENOENT, self.netns_error)
        return self._ethtool(what, ifname)

    def processes(self) -> list[tuple[int, list[str]]]:
        """(pid, argv) of every process."""
        out = []
        for entry in sorted(glob.glob(str(self.proc / "[0-9]*"))):
            text = self.read(os.path.join(entry, "cmdline"))
            if text:
                out.append((int(os.path.basename(entry)), text.rstrip("\0").split("\0")))
        return out

    def mounts(self) -> list[tuple[str, str, str]]:
        """(mount point, type, options) from /proc/mounts."""
        out = []
        for line in (self.proc_text("mounts") or "").splitlines():
            parts = line.split()
            if len(parts) >= 4:
                out.append((parts[1].replace("\\040", " "), parts[2], parts[3]))
        return out

    def status_field(self, key: str) -> str | None:
        for line in (self.proc_text("self/status") or "").splitlines():
            name, _, value = line.partition(":")
            if name == key:
                return value.strip()
        return None

    def queue_irqs(self, ifname: str, queue: int) -> list[tuple[int, str]] | None:
        """(irq, name) serving ``queue`` of ``ifname``; None for a virtual interface (no
        device); [] when the device's IRQs name no such queue."""
        dev = self.net_path(ifname, "device")
        if not dev.exists():
            return None
        numbers: list[int] = []
        up = dev
        for _ in range(3):  # virtio-net: the PCI function one level up holds the MSI-X IRQs
            msi = up / "msi_irqs"
            if msi.is_dir():
                numbers = sorted(int(n) for n in os.listdir(msi) if n.isdigit())
                break
            up = up / ".."  # the kernel follows the link first: the physical parent
        if not numbers:
            legacy = self.read(dev / "irq")
            if legacy and legacy.strip().isdigit() and int(legacy) > 0:
                numbers = [int(legacy)]
        names = parse_interrupts(self.proc_text("interrupts") or "")
        if len(numbers) == 1 and queue == 0:
            return [(numbers[0], names.get(numbers[0], "?"))]
        return [(n, names[n]) for n in numbers if n in names and irq_queue(names[n]) == queue]


# --- stages -------------------------------------------------------------------------------
def _feed_interfaces(cfg: Config) -> list[str]:
    return list(dict.fromkeys(line.interface for line in cfg.run.lines.values()))


def _missing_interface(host: Host, ifname: str, stage: str) -> Check:
    where = f" in network namespace {host.netns}" if host.netns else ""
    return Check(
        f"{ifname} present",
        False,
        host.netns_error or f"interface {ifname} does not exist{where}",
        "present",
        playbook(stage),
    )


def _caps(host: Host) -> int | None:
    text = host.status_field("CapEff")
    return int(text, 16) if text else None


def _numa_checks(host: Host, cfg: Config) -> list[Check]:
    """Each feed NIC on the consumer core's NUMA node: packets DMA'd into another node's
    memory cross the interconnect on every read. A veth, a NIC without NUMA information
    (numa_node -1) or a host without NUMA nodes passes with a note."""
    core, checks = cfg.run.core, []
    links = glob.glob(str(host.sys / f"devices/system/cpu/cpu{core}/node[0-9]*"))
    core_node = int(os.path.basename(links[0])[4:]) if links else None
    for ifname in _feed_interfaces(cfg):
        if not host.interface_exists(ifname):
            continue  # "line X interface" says so
        text = host.read(host.net_path(ifname, "device/numa_node"))
        node = int(text) if text and text.strip().lstrip("-").isdigit() else None
        ok, want = True, f"CPU {core}'s node" + (f" ({core_node})" if core_node is not None else "")
        if not host.net_path(ifname, "device").exists():
            have = "no device (virtual interface): no NUMA node"
        elif node is None or node < 0:
            have = "numa_node -1: the platform gives no NUMA information"
        elif core_node is None:
            have = f"node {node}; CPU {core} is on no NUMA node (not a NUMA host)"
        else:
            ok, have = node == core_node, f"node {node}"
        cpus = (host.sys_text(f"devices/system/node/node{node}/cpulist") or "").strip()
        checks.append(
            Check(
                f"{ifname} NUMA node",
                ok,
                have,
                want,
                ""
                if ok
                else f"set run.core to a CPU of node {node}"
                + (f" ({cpus})" if cpus else "")
                + ", or put the feed on a NIC of node "
                + str(core_node),
            )
        )
    return checks


def check_runtime(host: Host, cfg: Config) -> list[Check]:
    """What ``tickwire run`` needs on any host: its namespace and feed interfaces, the
    capabilities, locked memory for the UMEM, bpffs for XDP, the consumer core."""
    run, checks = cfg.run, []
    if run.netns:
        exists = (host.netns_dir / run.netns).exists()
        checks.append(
            Check(
                "network namespace",
                exists,
                f"network namespace {run.netns} " + ("exists" if exists else "does not exist"),
                f"network namespace {run.netns} exists",
                "" if exists else "tickwire lab up (the lab), or: ip netns add NAME",
            )
        )
    where = f" in {run.netns}" if run.netns else ""
    for letter, line in run.lines.items():
        ok = host.interface_exists(line.interface)
        state = "exists" if ok else "does not exist"
        have = host.netns_error or f"interface {line.interface} {state}{where}"
        checks.append(
            Check(
                f"line {letter} interface",
                ok,
                have,
                f"interface {line.interface}{where}",
                "" if ok else f"check run.line_{letter.lower()}.interface",
            )
        )
    caps = _caps(host)
    need = list(SERVICE_CAPS) + (["CAP_SYS_ADMIN"] if run.netns else [])
    missing = [c for c in need if caps is None or not caps >> CAP_NUMBERS[c] & 1]
    checks.append(
        Check(
            "capabilities",
            not missing,
            "all held" if not missing else "missing " + ", ".join(missing),
            ", ".join(need) + (" (CAP_SYS_ADMIN: run.netns)" if run.netns else ""),
            "" if not missing else "run as root, or from the tickwire unit (AmbientCapabilities=)",
        )
    )
    if run.rx_mode != "socket":
        limit = None
        for line in (host.proc_text("self/limits") or "").splitlines():
            if line.startswith("Max locked memory"):
                limit = line.split()[3]
        umem = run.frames * 4096
        lock = caps is not None and bool(caps >> CAP_NUMBERS["CAP_IPC_LOCK"] & 1)
        ok = (
            lock
            or limit == "unlimited"
            or (limit is not None and limit.isdigit() and int(limit) >= umem)
        )
        have = "CAP_IPC_LOCK held" if lock else f"RLIMIT_MEMLOCK {limit or 'unknown'}"
        checks.append(
            Check(
                "locked memory",
                ok,
                have,
                f"CAP_IPC_LOCK, or RLIMIT_MEMLOCK >= {umem} bytes (UMEM)",
                "" if ok else "LimitMEMLOCK=infinity in the unit, or ulimit -l unlimited",
            )
        )
        bpffs = any(t == "bpf" and p == "/sys/fs/bpf" for p, t, _ in host.mounts())
        checks.append(
            Check(
                "bpffs",
                bpffs,
                "mounted on /sys/fs/bpf" if bpffs else "not mounted",
                "mounted on /sys/fs/bpf",
                "" if bpffs else "mount -t bpf bpf /sys/fs/bpf",
            )
        )
    if run.core >= 0:
        online = param_cpus((host.sys_text("devices/system/cpu/online") or "").strip()) or set()
        allowed = param_cpus(host.status_field("Cpus_allowed_list")) or set()
        # an operator's shell may not see the isolated CPUs (systemd CPUAffinity=), yet run
        # pins itself there with sched_setaffinity: only an offline CPU is a failure
        ok = run.core in online
        note = (
            ""
            if not allowed or run.core in allowed
            else f" (outside this shell's affinity {cpus_text(allowed)}; run pins itself)"
        )
        checks.append(
            Check(
                "consumer core",
                ok,
                f"CPU {run.core} " + ("online" if ok else "offline") + note,
                f"CPU {run.core} online",
                "" if ok else "set run.core to an online CPU",
            )
        )
        checks += _numa_checks(host, cfg)
        if cfg.host.isolated_cpus:
            iso = cpulist(cfg.host.isolated_cpus)
            ok = run.core in iso
            checks.append(
                Check(
                    "consumer core isolated",
                    ok,
                    f"CPU {run.core}" + ("" if ok else " not") + " in "
                    f"host.isolated_cpus {cfg.host.isolated_cpus}",
                    f"run.core in {cfg.host.isolated_cpus}",
                    "" if ok else "set run.core to an isolated CPU",
                )
            )
    return checks


_PAGE_SIZES = (("2048kB", "2 MB", "hugepages_2m"), ("1048576kB", "1 GB", "hugepages_1g"))


def check_hugepages(host: Host, cfg: Config) -> list[Check]:
    """Pages on each node of ``host.hugepages_nodes`` (the nodes the hugepages role
    reserves on; the others are not looked at), read where its boot script writes them: a
    node's own pool, or for node 0 without one (no NUMA) the global pool."""
    h, fix, checks = cfg.host, playbook("hugepages"), []
    numa = host.sys / "devices/system/node"
    for size, label, key in _PAGE_SIZES:
        want = getattr(h, key)
        if not want:
            continue
        for n in sorted(cpulist(h.hugepages_nodes)):
            node, pool = f"node{n}", numa / f"node{n}/hugepages/hugepages-{size}"
            if n == 0 and not pool.is_dir():
                node, pool = "host", host.sys / "kernel/mm/hugepages" / f"hugepages-{size}"
            text = host.read(pool / "nr_hugepages")
            have = int(text) if text and text.strip().isdigit() else None
            ok = have is not None and have >= want
            if have is not None:
                seen = str(have)
            elif n and not (numa / node).is_dir():
                seen = f"no NUMA node {n}"
            else:
                seen = f"no {label} pages in this kernel"
            checks.append(
                Check(
                    f"{label} pages on {node}",
                    ok,
                    seen,
                    f">= {want}",
                    ""
                    if ok
                    else fix
                    + (
                        " (1 GB pages are reserved at boot: reboot after)"
                        if size == "1048576kB"
                        else ""
                    ),
                )
            )
    mounts = {p: (t, o) for p, t, o in host.mounts()}
    for point in h.hugetlbfs:
        fstype, opts = mounts.get(point, ("", ""))
        ok = fstype == "hugetlbfs"
        size = next((o for o in opts.split(",") if o.startswith("pagesize=")), "")
        have = (
            f"hugetlbfs {size}".strip() if ok else (f"{fstype} mount" if fstype else "not mounted")
        )
        checks.append(Check(f"hugetlbfs {point}", ok, have, "hugetlbfs mounted", "" if ok else fix))
    return checks


def _bootloader_params(host: Host) -> tuple[dict[str, str], str]:
    """Kernel parameters the bootloader config adds, and the file that adds them."""
    params: dict[str, str] = {}
    where = ""
    files = [host.etc / "default/grub", *sorted((host.etc / "default/grub.d").glob("*.cfg"))]
    for path in files:
        found = parse_grub(host.read(path) or "")
        if found:
            params.update(found)
            where = "/etc/" + str(path.relative_to(host.etc))
    return params, where


def _systemd_cpu_affinity(host: Host) -> str | None:
    texts = [host.read(host.etc / "systemd/system.conf") or ""]
    drop = sorted((host.etc / "systemd/system.conf.d").glob("*.conf"))
    texts += [host.read(p) or "" for p in drop]
    values = parse_unit(texts, "Manager").get("CPUAffinity")
    return " ".join(values) if values else None


def _env_file(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        m = re.match(r"\s*([A-Z_]+)=(.*)$", line)
        if m:
            try:
                words = shlex.split(m.group(2))
            except ValueError:
                continue
            out[m.group(1)] = words[0] if words else ""
    return out


def _cmdline_values(cfg: Config) -> list[tuple[str, str]]:
    """Kernel parameters ``[host]`` promises with an exact value ("" for a bare flag)."""
    h = cfg.host
    out = [("rcu_nocb_poll", "")] if h.rcu_nocb_poll else []
    if h.nmi_watchdog_off:
        out.append(("nmi_watchdog", "0"))
    if h.transparent_hugepage:
        out.append(("transparent_hugepage", h.transparent_hugepage))
    return out


def _selected(text: str) -> str:
    """The bracketed choice of a sysfs selector ("always madvise [never]" -> "never")."""
    return next((w[1:-1] for w in text.split() if w[:1] == "[" and w[-1:] == "]"), text.strip())


def _cpu_tuning(host: Host, cfg: Config, iso: frozenset[int] | None, fix: str) -> list[Check]:
    """tuned cpu-partitioning's run-time settings (the cpu_isolation role's
    tickwire-cpu-tuning.service): workqueue masks, KSM, THP, governor, idle latency."""
    h, checks = cfg.host, []
    fix = f"{fix} (or: systemctl restart tickwire-cpu-tuning.service)"
    if h.workqueue_cpus:
        want = cpulist(h.workqueue_cpus)
        for rel, what in (
            ("devices/virtual/workqueue/cpumask", "unbound workqueues"),
            ("bus/workqueue/devices/writeback/cpumask", "writeback workqueue"),
        ):
            text = host.sys_text(rel)
            try:
                mask = mask_value(text) if text is not None else None
            except ValueError:
                mask = None
            have = frozenset(c for c in range((mask or 0).bit_length()) if mask >> c & 1)
            ok = mask is not None and have == want
            checks.append(
                Check(
                    f"{what} CPUs",
                    ok,
                    f"absent: no /sys/{rel}" if text is None else cpus_text(have) or "none",
                    cpus_text(want),
                    "" if ok else fix,
                )
            )
    if h.ksm_off:
        text = host.sys_text("kernel/mm/ksm/run")
        run = text.strip() if text is not None else None
        ok = run in (None, "0", "2")
        shown = {None: "no KSM in this kernel", "0": "stopped", "2": "stopped, pages unmerged"}
        checks.append(
            Check("KSM off", ok, shown.get(run, f"run={run}"), "run=0 or 2", "" if ok else fix)
        )
    if h.transparent_hugepage:
        text = host.sys_text("kernel/mm/transparent_hugepage/enabled")
        mode = _selected(text) if text is not None else None
        ok = mode == h.transparent_hugepage or (mode is None and h.transparent_hugepage == "never")
        checks.append(
            Check(
                "transparent hugepages",
                ok,
                mode or "no transparent hugepages in this kernel",
                h.transparent_hugepage,
                "" if ok else fix,
            )
        )
    if h.cpu_governor:
        policies = sorted(glob.glob(str(host.sys / "devices/system/cpu/cpufreq/policy*")))
        govs = {
            os.path.basename(p): (host.read(Path(p) / "scaling_governor") or "?").strip()
            for p in policies
        }
        wrong = {p: g for p, g in govs.items() if g != h.cpu_governor}
        if not govs:
            have = "no cpufreq policies (no cpufreq driver: a VM, or the firmware decides)"
        elif wrong:
            have = ", ".join(f"{p} {g}" for p, g in sorted(wrong.items()))
        else:
            have = f"{h.cpu_governor} on {len(govs)} policies"
        checks.append(
            Check("cpufreq governor", not wrong, have, h.cpu_governor, "" if not wrong else fix)
        )
    if h.idle_latency_us >= 0 and iso:
        # the kernel shows a limit of 0 as "n/a" and no limit as "0"
        want = "n/a" if h.idle_latency_us == 0 else str(h.idle_latency_us)
        bad = []
        for cpu in sorted(iso):
            text = host.sys_text(f"devices/system/cpu/cpu{cpu}/power/pm_qos_resume_latency_us")
            value = text.strip() if text is not None else "absent"
            ok = value == "n/a" or (value.isdigit() and 0 < int(value) <= h.idle_latency_us)
            if not ok:
                bad.append(f"CPU {cpu} {'no limit' if value == '0' else value}")
        checks.append(
            Check(
                "isolated CPUs' idle latency limit (C-states)",
                not bad,
                ", ".join(bad) if bad else f"<= {want} us on CPUs {cpus_text(iso)}",
                f"pm_qos_resume_latency_us {want} on CPUs {cpus_text(iso)}",
                "" if not bad else fix,
            )
        )
    return checks


def check_cpu_isolation(host: Host, cfg: Config) -> list[Check]:
    h, fix, checks = cfg.host, playbook("cpu_isolation"), []
    iso = cpulist(h.isolated_cpus) if h.isolated_cpus else None
    hk = cpulist(h.housekeeping_cpus) if h.housekeeping_cpus else None
    tuning = h.workqueue_cpus or h.ksm_off or h.cpu_governor or h.idle_latency_us >= 0
    if not iso and not hk and not h.kthread_cpus and not _cmdline_values(cfg) and not tuning:
        return []
    booted = parse_cmdline(host.proc_text("cmdline") or "")
    boot, boot_file = _bootloader_params(host)
    wanted: list[tuple[str, frozenset[int]]] = []
    if iso:
        wanted += [("isolcpus", iso), ("nohz_full", iso), ("rcu_nocbs", iso)]
    if hk:
        wanted.append(("irqaffinity", hk))
    if h.kthread_cpus:
        wanted.append(("kthread_cpus", cpulist(h.kthread_cpus)))
    for param, want in wanted:
        have = booted.get(param)
        ok = param_cpus(have) == want
        step = fix
        if not ok and param_cpus(boot.get(param)) == want:
            step = (
                f"reboot required: {boot_file} has {param}={boot[param]}, the running "
                "kernel was booted without it"
            )
        checks.append(
            Check(
                f"kernel command line {param}",
                ok,
                "absent" if have is None else f"{param}={have}",
                f"{param}={cpus_text(want)}",
                "" if ok else step,
            )
        )
    for param, want in _cmdline_values(cfg):
        have, shown = booted.get(param), f"{param}={want}" if want else param
        ok = have == want
        step = fix
        if not ok and boot.get(param) == want:
            step = (
                f"reboot required: {boot_file} has {shown}, the running kernel was booted "
                "without it"
            )
        checks.append(
            Check(
                f"kernel command line {param}",
                ok,
                "absent" if have is None else (f"{param}={have}" if have else param),
                shown,
                "" if ok else step,
            )
        )
    if iso:
        for name, param in (("isolated", "isolcpus"), ("nohz_full", "nohz_full")):
            text = host.sys_text(f"devices/system/cpu/{name}")
            have = param_cpus(text.strip()) if text is not None else None
            ok = have == iso
            step = f"reboot with {param}={cpus_text(iso)} ({fix})"
            if param_cpus(boot.get(param)) == iso:
                step = f"reboot required: {boot_file} has {param}={boot[param]}"
            checks.append(
                Check(
                    f"kernel {name} CPUs",
                    ok,
                    "absent (kernel without this feature)"
                    if text is None
                    else (cpus_text(have) if have else "none"),
                    cpus_text(iso),
                    "" if ok else step,
                )
            )
    if hk:
        value = _systemd_cpu_affinity(host)
        have = param_cpus(",".join(value.split())) if value else None
        ok = have == hk
        checks.append(
            Check(
                "systemd CPUAffinity (housekeeping)",
                ok,
                value or "not set",
                cpus_text(hk),
                "" if ok else fix,
            )
        )
    if iso:
        running = [
            pid for pid, argv in host.processes() if os.path.basename(argv[0]) == "irqbalance"
        ]
        env = _env_file(host.read(host.etc / "default/irqbalance") or "")
        banned = param_cpus(env.get("IRQBALANCE_BANNED_CPULIST"))
        if banned is None and env.get("IRQBALANCE_BANNED_CPUS"):
            mask = mask_value(env["IRQBALANCE_BANNED_CPUS"])
            banned = frozenset(c for c in range(mask.bit_length()) if mask >> c & 1)
        ok = not running or (banned is not None and iso <= banned)
        have = (
            "not running"
            if not running
            else f"running, banned CPUs {cpus_text(banned) if banned else 'none'}"
        )
        checks.append(
            Check(
                "irqbalance keeps off isolated CPUs",
                ok,
                have,
                f"not running, or IRQBALANCE_BANNED_CPULIST covering {cpus_text(iso)}",
                "" if ok else fix,
            )
        )
    checks += _cpu_tuning(host, cfg, iso, fix)
    return checks


def check_irq_affinity(host: Host, cfg: Config) -> list[Check]:
    h, run, fix, checks = cfg.host, cfg.run, playbook("irq_affinity"), []
    target: frozenset[int] | None = None
    placement = False
    if h.irq_placement == "consumer" and h.isolated_cpus:
        placement = True
        target = frozenset({run.core}) if run.core >= 0 else None
    elif h.irq_placement == "housekeeping" and h.housekeeping_cpus:
        placement = True
        target = cpulist(h.housekeeping_cpus)
    if not placement and not h.rps_mask and not h.xps_mask:
        return []
    for line in run.lines.values():
        ifname, q = line.interface, line.queue
        if not host.interface_exists(ifname):
            checks.append(_missing_interface(host, ifname, "irq_affinity"))
            continue
        if placement:
            name = f"{ifname} queue {q} IRQ on {h.irq_placement} CPUs"
            irqs = host.queue_irqs(ifname, q)
            if target is None:
                checks.append(
                    Check(
                        name,
                        False,
                        "run.core not set",
                        "the consumer core",
                        "set run.core (the consumer's isolated CPU)",
                    )
                )
            elif irqs is None:
                checks.append(
                    Check(name, True, "no device IRQs (virtual interface)", cpus_text(target))
                )
            elif not irqs:
                checks.append(
                    Check(name, False, f"no IRQ named for queue {q}", cpus_text(target), fix)
                )
            for irq, irq_name in irqs or ():
                text = host.proc_text(f"irq/{irq}/smp_affinity_list")
                have = param_cpus(text.strip()) if text else None
                ok = (
                    bool(have)
                    and have <= target
                    and (h.irq_placement != "consumer" or have == target)
                )
                checks.append(
                    Check(
                        f"{name} (IRQ {irq} {irq_name})",
                        ok,
                        cpus_text(have) if have else "unknown",
                        cpus_text(target),
                        "" if ok else fix,
                    )
                )
        for kind, mask, rel in (
            ("RPS", h.rps_mask, f"queues/rx-{q}/rps_cpus"),
            ("XPS", h.xps_mask, f"queues/tx-{q}/xps_cpus"),
        ):
            if not mask:
                continue
            path = host.net_path(ifname, rel)
            text = host.read(path)
            if text is None and path.exists():
                # the kernel refuses to show XPS of a device with a single tx queue
                text, shown = "0", "0 (single tx queue: no XPS)"
            else:
                shown = "no such queue" if text is None else text.strip()
            try:
                have = mask_value(text) if text is not None else None
            except ValueError:
                have = None
            ok = have is not None and have == mask_value(mask)
            checks.append(
                Check(
                    f"{ifname} {kind} mask {rel.split('/')[1]}", ok, shown, mask, "" if ok else fix
                )
            )
    return checks


def _ethtool(host: Host, what: str, ifname: str):
    """(the reading, "") or (None, why not)."""
    try:
        return host.ethtool(what, ifname), ""
    except OSError as e:
        why = e.strerror if host.netns_error or not e.errno else os.strerror(e.errno)
        return None, f"unsupported: {why}"


def check_nic(host: Host, cfg: Config) -> list[Check]:
    h, run, fix, checks = cfg.host, cfg.run, playbook("nic"), []
    if not (h.channels or h.rx_ring or h.offloads_off or h.ntuple):
        return []
    for ifname in _feed_interfaces(cfg):
        if not host.interface_exists(ifname):
            checks.append(_missing_interface(host, ifname, "nic"))
            continue
        if h.channels:
            got, err = _ethtool(host, "channels", ifname)
            ch = current_channels(got) if got is not None else {}
            kind = "combined" if ch.get("Combined") else "rx"
            n = ch.get("Combined") or ch.get("RX")
            ok = n == h.channels
            checks.append(
                Check(
                    f"{ifname} channels",
                    ok,
                    err or f"{kind} {n}",
                    f"{h.channels}",
                    "" if ok else fix,
                )
            )
        if h.rx_ring:
            got, err = _ethtool(host, "rings", ifname)
            n = current_rings(got)["RX"] if got is not None else None
            ok = n == h.rx_ring
            checks.append(
                Check(f"{ifname} rx ring", ok, err or str(n), str(h.rx_ring), "" if ok else fix)
            )
        features: dict[str, tuple[bool, bool]] = {}
        ferr = ""
        if h.offloads_off or h.ntuple:
            got, ferr = _ethtool(host, "features", ifname)
            features = shown_features(got) if got is not None else {}
        for name in h.offloads_off:
            state = features.get(name)
            ok = state is not None and not state[0]
            if state is None:
                have = ferr or "no such feature"
            else:
                have = ("on" if state[0] else "off") + (" [fixed]" if state[1] else "")
            step = f"{fix} (or: ethtool -K {ifname} {name} off)"
            if state is not None and state[0] and state[1]:
                step = f"{name} is fixed on by the driver: use another NIC or driver"
            checks.append(Check(f"{ifname} {name}", ok, have, "off", "" if ok else step))
        if h.ntuple:
            state = features.get("ntuple-filters")
            on = state is not None and state[0]
            checks.append(
                Check(
                    f"{ifname} ntuple-filters",
                    on,
                    ferr or ("no such feature" if state is None else "on" if on else "off"),
                    "on",
                    "" if on else fix,
                )
            )
            got, err = _ethtool(host, "flow_rules", ifname)
            rules = got or []
            for letter, line in run.lines.items():
                if line.interface != ifname:
                    continue
                hit = next((r for r in rules if steers(r, line.group, line.port, line.queue)), None)
                same = [r for r in rules if r.dst_ip == line.group]
                have = err or (
                    f"rule {hit.location}"
                    if hit
                    else f"rule {same[0].location} to queue {same[0].queue}"
                    if same
                    else "no rule"
                )
                checks.append(
                    Check(
                        f"{ifname} ntuple rule line {letter}",
                        hit is not None,
                        have,
                        f"udp4 dst-ip {line.group} dst-port {line.port} -> queue {line.queue}",
                        ""
                        if hit
                        else f"{fix} (or: ethtool -N {ifname} flow-type udp4 dst-ip "
                        f"{line.group} dst-port {line.port} action {line.queue})",
                    )
                )
    return checks


def _plain(value) -> str:
    return " ".join(str(value).split())


def check_sysctl(host: Host, cfg: Config) -> list[Check]:
    checks = []
    for name, want in cfg.host.sysctl.items():
        text = host.sysctl(name)
        have = _plain(text) if text is not None else None
        ok = have is not None and have == _plain(want)
        checks.append(
            Check(
                name,
                ok,
                "absent" if have is None else have,
                _plain(want),
                "" if ok else f'{playbook("sysctl")} (or: sysctl -w {name}="{_plain(want)}")',
            )
        )
    return checks


# ptp: what the running linuxptp programs were told (their command lines and the ptp4l
# configuration files they read, with ptp4l's own precedence), then what ptp4l itself
# says over its management socket (pmc): the port's state and the offset from the master.
_PTP4L_UDS = "/var/run/ptp4l"  # ptp4l's (and phc2sys's -z) default uds_address
# short options of ptp4l 3.1 and phc2sys 3.1 that take a value (their getopt strings)
_PTP4L_VALUED = set("fipl")
_PHC2SYS_VALUED = set("cdfsEPISFRNOLMiunzlt")
# what preflight asks ptp4l: the interface of each port, its state, the clock's offset
_PMC_QUERIES = (
    "GET PORT_PROPERTIES_NP",
    "GET PORT_DATA_SET",
    "GET CURRENT_DATA_SET",
    "GET TIME_STATUS_NP",
)
# daemons that steer CLOCK_REALTIME on their own (besides linuxptp's programs)
_CLOCK_DAEMONS = ("chronyd", "ntpd", "systemd-timesyncd", "openntpd")


@dataclass(frozen=True)
class PmcReply:
    """One management response as pmc prints it: the answering port (``portIdentity``,
    "clockid-portnumber"), the TLV (``PORT_DATA_SET``...; None for an error status) and
    its fields, as text."""

    port: str
    tlv: str | None
    fields: dict[str, str]


_PMC_HEAD = re.compile(
    r"^\t(?P<port>\S+) seq \d+ (?P<action>[A-Z_]+) (?P<kind>\S+)(?: (?P<tlv>\S+))?\s*$"
)
_PMC_FIELD = re.compile(r"^\t\t(?P<key>\S+)(?:\s+(?P<value>.*?))?\s*$")


def parse_pmc(text: str) -> list[PmcReply]:
    """The responses in pmc's output (``pmc -u -b 0 'GET ...'``), in order. Lines that are
    not part of a response ("sending: GET ...", "sorry, ... not supported yet") are
    skipped; a request nobody answered (no ptp4l at the socket, another domain) leaves no
    response at all."""
    replies: list[PmcReply] = []
    current: PmcReply | None = None
    for line in text.splitlines():
        head = _PMC_HEAD.match(line)
        if head:
            tlv = head["tlv"] if head["kind"] == "MANAGEMENT" else None
            current = PmcReply(head["port"], tlv, {})
            replies.append(current)
            continue
        field_ = _PMC_FIELD.match(line)
        if field_ and current is not None:
            current.fields[field_["key"]] = field_["value"] or ""
            continue
        current = None
    return replies


@dataclass(frozen=True)
class PtpPort:
    """One ptp4l port as pmc reports it, with its clock's view of the master."""

    port: str  # portIdentity
    interface: str | None  # PORT_PROPERTIES_NP (None when not asked)
    state: str | None  # portState: SLAVE, MASTER, LISTENING, UNCALIBRATED, FAULTY, ...
    offset_ns: float | None  # offsetFromMaster (CURRENT_DATA_SET), else TIME_STATUS_NP's
    gm_present: bool | None
    gm_identity: str | None


def pmc_port(replies: list[PmcReply], ifname: str) -> PtpPort | None:
    """The port of ``replies`` that serves ``ifname``: named by PORT_PROPERTIES_NP, or the
    only port that answered PORT_DATA_SET. None when no answer names it."""
    props = [r for r in replies if r.tlv == "PORT_PROPERTIES_NP"]
    data = [r for r in replies if r.tlv == "PORT_DATA_SET"]
    named = [r for r in props if r.fields.get("interface") == ifname]
    if named:
        port, interface = named[0].fields.get("portIdentity", named[0].port), ifname
    elif not props and len(data) == 1:
        port, interface = data[0].fields.get("portIdentity", data[0].port), None
    else:
        return None
    state = next(
        (r.fields.get("portState") for r in data if r.fields.get("portIdentity", r.port) == port),
        named[0].fields.get("portState") if named else None,
    )
    current = next((r.fields for r in replies if r.tlv == "CURRENT_DATA_SET"), {})
    status = next((r.fields for r in replies if r.tlv == "TIME_STATUS_NP"), {})
    offset = None
    for text in (current.get("offsetFromMaster"), status.get("master_offset")):
        try:
            offset = float(text)
            break
        except (TypeError, ValueError):
            continue
    present = status.get("gmPresent")
    return PtpPort(
        port=port,
        interface=interface,
        state=state,
        offset_ns=offset,
        gm_present=None if present is None else present == "true",
        gm_identity=status.get("gmIdentity"),
    )


def _pmc(uds: str, domain: int) -> tuple[str, str]:
    """pmc's output for ``_PMC_QUERIES`` sent to the ptp4l at ``uds`` in ``domain``, and
    why pmc could not run ("" when it ran: an unanswered query only prints "sending")."""
    args = ["-u", "-b", "0", "-s", uds, "-d", str(domain), *_PMC_QUERIES]
    for pmc in ("pmc", "/usr/sbin/pmc"):  # a service's PATH may lack /usr/sbin
        try:
            done = subprocess.run([pmc, *args], capture_output=True, text=True, timeout=10)
            break
        except FileNotFoundError:
            continue
        except subprocess.TimeoutExpired:
            return "", "pmc did not answer within 10 s"
    else:
        return "", "pmc is not installed (apt install linuxptp)"
    if done.returncode != 0:
        why = [line for line in done.stderr.splitlines() if line.strip()]
        hint = " (run as root)" if os.geteuid() != 0 else ""
        return "", f"pmc failed: {why[-1] if why else f'exit {done.returncode}'}{hint}"
    return done.stdout, ""


def _options(argv: list[str], valued: set[str]) -> tuple[dict[str, str], list[str], list[str]]:
    """A linuxptp command line as getopt_long reads it: ``(long options, short flags in
    order, values of -i)``; short options with a value are returned as ``-X`` keys of the
    long-option dict (the last one wins)."""
    long: dict[str, str] = {}
    flags: list[str] = []
    ifaces: list[str] = []
    i = 1
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg.startswith("--") and len(arg) > 2:
            name, eq, value = arg[2:].partition("=")
            if not eq and i < len(argv):
                value, i = argv[i], i + 1
            long[name] = value
            continue
        if not arg.startswith("-") or len(arg) < 2:
            continue
        for k, ch in enumerate(arg[1:], start=1):
            if ch not in valued:
                flags.append(ch)
                continue
            value = arg[k + 1 :]
            if not value and i < len(argv):
                value, i = argv[i], i + 1
            if ch == "i":
                ifaces.append(value)
            long[f"-{ch}"] = value
            break
    return long, flags, ifaces


def _process_file(host: Host, pid: int, path: str) -> str | None:
    """A file a process named on its command line, as that process sees it (its root and
    working directory under /proc), else an /etc path under the host's etc root."""
    rel = path.lstrip("/")
    base = "root" if path.startswith("/") else "cwd"
    text = host.read(host.proc / str(pid) / base / rel)
    if text is None and path.startswith("/etc/"):
        text = host.read(host.etc_path(path))
    return None if text is None or text.startswith("<unreadable") else text


def _ptp4l_file(text: str) -> tuple[dict[str, str], set[str]]:
    """A ptp4l configuration file as ptp4l 3.1 reads it: the [global] options (the last
    setting wins; no trailing comments) and the port sections."""
    options: dict[str, str] = {}
    ports: set[str] = set()
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1].strip()
            if section not in ("global", "unicast_master_table"):
                ports.add(section)
            continue
        if section == "global":
            name, *value = line.split(None, 1)
            options[name] = value[0].strip() if value else ""
    return options, ports


@dataclass(frozen=True)
class _Ptp4l:
    """A running ptp4l: what it serves and how, from its command line and configuration."""

    pid: int
    interfaces: frozenset[str]
    mode: str  # time_stamping: hardware, software, legacy, ...
    domain: int
    uds: str
    servo: str  # clock_servo: pi, linreg, ntpshm (timemaster's software mode), nullf
    free_running: bool
    config: str | None  # its -f file


def _ptp4l_setup(host: Host, pid: int, argv: list[str]) -> _Ptp4l:
    """What the ptp4l with command line ``argv`` runs: its interfaces (-i and the port
    sections of its -f file), timestamping, domain, management socket and servo. Command
    line options win over the file, as in ptp4l."""
    long, flags, ifaces = _options(argv, _PTP4L_VALUED)
    conf = long.pop("-f", None)
    options, ports = _ptp4l_file(_process_file(host, pid, conf) or "") if conf else ({}, set())
    options.update((k, v) for k, v in long.items() if not k.startswith("-"))
    for flag, mode in (("H", "hardware"), ("S", "software"), ("L", "legacy")):
        if flag in flags:
            options["time_stamping"] = mode
    try:
        domain = int(options.get("domainNumber", "0"))
    except ValueError:
        domain = -1
    return _Ptp4l(
        pid=pid,
        interfaces=frozenset(ifaces) | ports,
        mode=options.get("time_stamping", "hardware"),
        domain=domain,
        uds=options.get("uds_address", _PTP4L_UDS),
        servo=options.get("clock_servo", "pi"),
        free_running=options.get("free_running", "0") not in ("0", ""),
        config=conf,
    )


def _parent(host: Host, pid: int) -> str:
    """The program name of ``pid``'s parent ("" when unknown)."""
    status = host.proc_text(f"{pid}/status") or ""
    m = re.search(r"^PPid:\s*(\d+)", status, re.M)
    argv = (host.proc_text(f"{m[1]}/cmdline") or "").split("\0") if m else [""]
    return os.path.basename(argv[0])


def _phc2sys_serves(argv: list[str], p: _Ptp4l, ifname: str, phc: int | None) -> bool:
    """Whether the phc2sys with command line ``argv`` follows ptp4l ``p`` on ``ifname``:
    wired to its socket (-z) in its domain (-n), and taking ``ifname``'s clock (-s, by
    name or /dev/ptpN) or every port ptp4l reports (-a)."""
    long, flags, _ = _options(argv, _PHC2SYS_VALUED)
    source = long.get("-s")
    wired = long.get("-z", _PTP4L_UDS) == p.uds and long.get("-n", "0") == str(p.domain)
    return wired and ("a" in flags or source in (ifname, f"/dev/ptp{phc}"))


def _steers_realtime(host: Host, pid: int, argv: list[str]) -> bool:
    """Whether the process adjusts CLOCK_REALTIME itself: phc2sys into it (not into
    chronyd's SHM refclock), ptp4l with software stamps and a servo of its own, or an
    NTP daemon allowed to set the clock."""
    name = os.path.basename(argv[0])
    if name == "phc2sys":
        long, flags, _ = _options(argv, _PHC2SYS_VALUED)
        if long.get("-E") == "ntpshm":
            return False
        return (
            "r" in flags if "a" in flags else long.get("-c", "CLOCK_REALTIME") == "CLOCK_REALTIME"
        )
    if name == "ptp4l":
        p = _ptp4l_setup(host, pid, argv)
        return p.mode == "software" and p.servo != "ntpshm" and not p.free_running
    if name == "chronyd":
        return "-x" not in argv
    return name in _CLOCK_DAEMONS


_PORT_STATE_HINTS = {
    "LISTENING": "no master heard: check that the PTP network reaches {ifname} (VLAN, "
    "multicast, transport) in domain {domain}",
    "MASTER": "{ifname} hears no better clock, so this host acts as master: check that the "
    "grandmaster reaches it in domain {domain}",
    "PRE_MASTER": "{ifname} is about to act as master: no better clock heard in domain {domain}",
    "GRAND_MASTER": "this host is the grandmaster of domain {domain}",
    "UNCALIBRATED": "a master is selected but the servo has not locked yet: wait a minute",
    "PASSIVE": "another port of this ptp4l is the slave",
    "FAULTY": "the port is faulty (link down, or timestamping failed)",
    "DISABLED": "the port is disabled",
    "INITIALIZING": "ptp4l is starting",
}


def check_ptp(host: Host, cfg: Config) -> list[Check]:
    """ptp4l on each PTP interface, asked over its own management socket (pmc) for the
    port's state (SLAVE) and the offset from the master (within
    ``host.ptp_max_offset_ns``); phc2sys following the interface that steers the system
    clock (``host.ptp_phc2sys_interface``) when it has a PHC; and exactly one program
    steering CLOCK_REALTIME. ptp4l's socket and domain come from its own configuration, so
    the same checks read a ptp4l@IF unit's instance and timemaster's."""
    fix, checks = playbook("ptp"), []
    if not cfg.host.ptp_interfaces:
        return []
    procs = host.processes()
    named = [(pid, argv, os.path.basename(argv[0])) for pid, argv in procs if argv and argv[0]]
    ptp4l = [_ptp4l_setup(host, pid, argv) for pid, argv, name in named if name == "ptp4l"]
    phc2sys = [(pid, argv) for pid, argv, name in named if name == "phc2sys"]
    steering = cfg.host.ptp_phc2sys_interface
    limit = cfg.host.ptp_max_offset_ns
    for ifname in cfg.host.ptp_interfaces:
        got, err = _ethtool(host, "ts_info", ifname)
        ts = Timestamping.of(got) if got is not None else None
        want_mode = "hardware" if ts and ts.hardware else "software"
        why = (
            ""
            if ts and ts.hardware
            else (
                f" ({ifname} has no hardware timestamping)"
                if ts
                else f" (ethtool -T {ifname}: {err})"
            )
        )
        serving = [p for p in ptp4l if ifname in p.interfaces]
        ok = any(p.mode == want_mode for p in serving)
        p = next((p for p in serving if p.mode == want_mode), serving[0] if serving else None)
        checks.append(
            Check(
                f"ptp4l on {ifname}",
                ok,
                f"running (pid {p.pid}), {p.mode} timestamping" if p else "not running",
                f"running, {want_mode} timestamping{why}",
                "" if ok else fix,
            )
        )
        if p is not None:
            checks.extend(_port_checks(host, p, ifname, limit))
        if ts and ts.hardware and ifname == steering:
            sync = [
                pid
                for pid, argv in phc2sys
                if p is not None and _phc2sys_serves(argv, p, ifname, ts.phc)
            ]
            wired = f" (-z {p.uds} -n {p.domain})" if p else ""
            checks.append(
                Check(
                    f"phc2sys from {ifname}",
                    bool(sync),
                    f"running (pid {sync[0]})" if sync else "not running",
                    f"running: system clock from {ifname}'s PHC (ptp{ts.phc}){wired}",
                    "" if sync else fix,
                )
            )
    if steering:
        steerers = [
            f"{name} (pid {pid})"
            for pid, argv, name in named
            if name in ("phc2sys", "ptp4l", *_CLOCK_DAEMONS) and _steers_realtime(host, pid, argv)
        ]
        ok = len(steerers) == 1
        checks.append(
            Check(
                "one program steers the system clock",
                ok,
                ", ".join(steerers) or "none",
                f"one: from {steering}'s PTP time (phc2sys, ptp4l itself with software "
                "timestamps, or timemaster's chronyd)",
                ""
                if ok
                else f"stop and disable all but one (systemctl disable --now UNIT); {fix}"
                if steerers
                else fix,
            )
        )
    return checks


def _port_checks(host: Host, p: _Ptp4l, ifname: str, limit: int) -> list[Check]:
    """The port state and offset checks of ``ifname`` from ptp4l ``p``'s answers to pmc."""
    unit = "timemaster" if _parent(host, p.pid) == "timemaster" else f"ptp4l@{ifname}"
    ask = f"pmc -u -b 0 -s {p.uds} -d {p.domain} 'GET PORT_DATA_SET'"
    look = f"{ask}; journalctl -u {unit}"
    # timemaster's software mode leaves the clock to chronyd: ptp4l's servo (ntpshm)
    # only hands it samples, so its port stays UNCALIBRATED while the time is good
    states = ("SLAVE", "UNCALIBRATED") if p.servo == "ntpshm" else ("SLAVE",)
    want = "SLAVE" + (" or UNCALIBRATED (ntpshm servo: chronyd steers)" if len(states) > 1 else "")
    name = f"{ifname} port state"
    text, error = _pmc(p.uds, p.domain)
    if error:
        return [Check(name, False, error, want, look)]
    port = pmc_port(parse_pmc(text), ifname)
    if port is None or port.state is None:
        return [
            Check(
                name,
                False,
                f"no answer from ptp4l (pid {p.pid}) at {p.uds} in domain {p.domain}",
                want,
                f"systemctl status {unit}; {look}",
            )
        ]
    gm = (
        f", grandmaster {port.gm_identity}"
        if port.gm_present and port.gm_identity
        else ", no grandmaster"
        if port.gm_present is False
        else ""
    )
    ok = port.state in states
    hint = _PORT_STATE_HINTS.get(port.state, "see the journal")
    checks = [
        Check(
            name,
            ok,
            f"{port.state}{gm}",
            want,
            "" if ok else f"{hint.format(ifname=ifname, domain=p.domain)}: {look}",
        )
    ]
    if ok:
        off = port.offset_ns
        ok = off is not None and abs(off) <= limit
        checks.append(
            Check(
                f"{ifname} offset from master",
                ok,
                "unknown" if off is None else f"{off:+,.0f} ns",
                f"|offset| <= {limit:,} ns",
                ""
                if ok
                else f"wait for ptp4l to converge ('master offset' in journalctl -u {unit}); "
                f"if it stays out, check the network path and timestamping, or raise [host] "
                f"ptp_max_offset_ns (the ptp role's ptp_max_offset_ns)",
            )
        )
    return checks


def _unit_texts(host: Host, service: str) -> list[str] | None:
    base = host.etc / "systemd/system" / service
    main = host.read(base)
    if main is None:
        return None
    drop = sorted(Path(str(base) + ".d").glob("*.conf"))
    return [main, *(host.read(p) or "" for p in drop)]


def check_service(host: Host, cfg: Config) -> list[Check]:
    svc, fix = cfg.host.service, playbook("service")
    if not svc:
        return []
    texts = _unit_texts(host, svc)
    if texts is None:
        return [
            Check(
                f"{svc} unit",
                False,
                "no unit file in /etc/systemd/system",
                f"/etc/systemd/system/{svc}",
                fix,
            )
        ]
    unit = parse_unit(texts)
    want = set(SERVICE_CAPS)
    checks = [
        Check(f"{svc} unit", True, f"/etc/systemd/system/{svc}", f"/etc/systemd/system/{svc}")
    ]
    for key in ("AmbientCapabilities", "CapabilityBoundingSet"):
        values = unit.get(key)
        have = {c.upper() for v in values or () for c in v.split()} if values else None
        ok = have == want
        checks.append(
            Check(
                f"{svc} {key}",
                ok,
                " ".join(sorted(have))
                if have
                else "not set (all capabilities)"
                if key == "CapabilityBoundingSet"
                else "not set",
                " ".join(sorted(want)),
                "" if ok else fix,
            )
        )
    if cfg.run.core >= 0:
        values = unit.get("CPUAffinity")
        have = param_cpus(",".join(" ".join(values).split())) if values else None
        ok = have == frozenset({cfg.run.core})
        checks.append(
            Check(
                f"{svc} CPUAffinity",
                ok,
                " ".join(values) if values else "not set",
                str(cfg.run.core),
                "" if ok else fix,
            )
        )
    wants = sorted(glob.glob(str(host.etc / "systemd/system/*.wants" / svc)))
    enabled = any(os.path.lexists(p) for p in wants)
    checks.append(
        Check(
            f"{svc} enabled",
            enabled,
            "enabled (" + os.path.basename(os.path.dirname(wants[0])) + ")"
            if enabled
            else "not enabled",
            "enabled",
            "" if enabled else f"systemctl enable {svc} ({fix})",
        )
    )
    return checks


STAGE_CHECKS: dict[str, Callable[[Host, Config], list[Check]]] = {
    RUNTIME: check_runtime,
    "hugepages": check_hugepages,
    "cpu_isolation": check_cpu_isolation,
    "irq_affinity": check_irq_affinity,
    "nic": check_nic,
    "sysctl": check_sysctl,
    "ptp": check_ptp,
    "service": check_service,
}


# --- the report ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Report:
    stages: tuple[StageResult, ...] = field(default_factory=tuple)

    @property
    def failing(self) -> list[StageResult]:
        return [s for s in self.stages if s.required and not s.passed]

    @property
    def ready(self) -> bool:
        return not self.failing

    def as_json(self) -> dict:
        return {"ready": self.ready, "stages": [s.as_json() for s in self.stages]}


def check(cfg: Config, host: Host, stages: list[str] | tuple[str, ...] | None = None) -> Report:
    """Run the stages (all, in ``ALL_STAGES`` order, when None). Required: ``runtime`` and
    ``host.required``; when ``stages`` are named, exactly those."""
    names = ALL_STAGES if not stages else [s for s in ALL_STAGES if s in stages]
    for s in stages or ():
        if s not in ALL_STAGES:
            raise ValueError(f"preflight: no stage {s!r} (stages: {', '.join(ALL_STAGES)})")
    required = set(stages) if stages else {RUNTIME, *cfg.host.required}
    results = []
    for name in names:
        checks = tuple(STAGE_CHECKS[name](host, cfg))
        results.append(StageResult(name, status_of(checks), name in required, checks))
    return Report(tuple(results))


def text(report: Report) -> str:
    """One line per stage, the failing checks (what differs, the fix) under it, a verdict."""
    lines = []
    for s in report.stages:
        notes = []
        if s.required:
            notes.append("required")
        if s.status == SKIPPED:
            notes.append("nothing promised in [host]" if s.stage != RUNTIME else "")
            if s.required:
                notes.append("but there is nothing to check")
        if s.reboot_required:
            notes.append("reboot required")
        lines.append(f"{s.status:<15} {s.stage:<14} {', '.join(n for n in notes if n)}".rstrip())
        for c in s.checks:
            if c.ok:
                continue
            lines.append(f"    {c.name}: have {c.have}; want {c.want}")
            if c.fix:
                lines.append(f"        fix: {c.fix}")
    failing = report.failing
    if not failing:
        lines.append("host ready")
    else:
        lines.append(
            f"host NOT ready: {len(failing)} required stage(s) failing "
            f"({', '.join(s.stage for s in failing)})"
        )
    return "\n".join(lines)


def summary(report: Report) -> str:
    """One line: the verdict and, per failing required stage, its failing checks."""
    if report.ready:
        counts: dict[str, int] = {}
        for s in report.stages:
            counts[s.status] = counts.get(s.status, 0) + 1
        return "host ready (" + ", ".join(f"{n} {k}" for k, n in counts.items()) + ")"
    parts = []
    for s in report.failing:
        bad = [f"{c.name}: {c.have}" for c in s.checks if not c.ok]
        detail = "; ".join(bad[:3]) + (f"; +{len(bad) - 3} more" if len(bad) > 3 else "")
        if s.status == SKIPPED:
            detail = "required, but [host] promises nothing to check"
        parts.append(f"{s.stage} {s.status} ({detail})")
    return "host NOT ready: " + "; ".join(parts)


def require(cfg: Config, log: Callable[[str], None]) -> Report:
    """The gate of ``tickwire run``: PreflightError unless every required stage is OK."""
    with Host.live(cfg.run.netns) as host:
        report = check(cfg, host)
    if not report.ready:
        raise PreflightError(
            f"preflight: {summary(report)} -- fix the host (tickwire "
            "preflight says how), or pass --skip-preflight"
        )
    log(f"preflight: {summary(report)}")
    return report
