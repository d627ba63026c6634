"""``tickwire preflight``: every stage against fake /proc, /sys and /etc trees (with the
ethtool ioctls' answers as read on a real veth and as a multi-queue NIC gives them), the
report and exit codes, then for real in a private lab, and ``tickwire run``'s gate."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dataplane import ethtool
from host import cli, config
from host.appliance import preflight
from host.appliance.preflight import NOT_CONFIGURED, OK, PARTIAL, SKIPPED
from tests.labnet import built, private_lab, write_config

ROOT = Path(__file__).resolve().parents[1]


# --- what the kernel's ethtool ioctls answer --------------------------------------------------
def feat(on: bool, fixed: bool = False) -> ethtool.Feature:
    return ethtool.Feature(available=not fixed, requested=on, active=on, never_changed=False)


# a veth, as read on one in a scratch namespace (feature list shortened)
VETH_FEATURES = {
    "rx-checksum": feat(True),
    "tx-checksum-ipv4": feat(False, True),
    "tx-checksum-ip-generic": feat(True),
    "tx-scatter-gather": feat(True),
    "tx-tcp-segmentation": feat(True),
    "tx-generic-segmentation": feat(True),
    "rx-gro": feat(False),
    "rx-lro": feat(False, True),
    "rx-vlan-hw-parse": feat(True),
    "tx-vlan-hw-insert": feat(True),
    "rx-ntuple-filter": feat(False, True),
    "rx-hashing": feat(False, True),
    "rx-gro-hw": feat(False, True),
    "rx-gro-list": feat(False),
    "rx-udp-gro-forwarding": feat(False),
}
VETH_CHANNELS = ethtool.Channels(
    max_rx=2, max_tx=2, max_other=0, max_combined=0, rx=1, tx=1, other=0, combined=0
)
SOF = ethtool.SOF_TIMESTAMPING
VETH_TS = ethtool.TsInfo(
    phc_index=-1,
    so_timestamping=SOF["software-transmit"]
    | SOF["software-receive"]
    | SOF["software-system-clock"],
    tx_types=0,
    rx_filters=0,
)
# a multi-queue NIC with flow steering and a PTP hardware clock
NIC_TS = ethtool.TsInfo(
    phc_index=0,
    so_timestamping=sum(SOF.values()) - SOF["hardware-legacy-clock"],
    tx_types=3,
    rx_filters=3,
)


def nic_channels(n: int) -> ethtool.Channels:
    return ethtool.Channels(
        max_rx=0, max_tx=0, max_other=1, max_combined=63, rx=0, tx=0, other=1, combined=n
    )


def nic_rings(rx: int) -> ethtool.Rings:
    return ethtool.Rings(
        max_rx=8192,
        max_rx_mini=0,
        max_rx_jumbo=0,
        max_tx=8192,
        rx=rx,
        rx_mini=0,
        rx_jumbo=0,
        tx=1024,
    )


def udp_rule(loc: int, ip: str, port: int, queue: int | None) -> ethtool.FlowRule:
    return ethtool.FlowRule(loc, ethtool.UDP_V4_FLOW, ip, "255.255.255.255", port, 0xFFFF, queue)


def with_features(base: dict, **changes: ethtool.Feature) -> dict:
    return {**base, **{k.replace("_", "-"): v for k, v in changes.items()}}


NIC_FEATURES_TUNED = with_features(
    VETH_FEATURES, rx_ntuple_filter=feat(True), rx_checksum=feat(False)
)


class Tree:
    """A fake host under ``root``: proc/, sys/, etc/, netns/, and per interface what each
    ethtool read (``dataplane.ethtool`` function) answers."""

    def __init__(self, root: Path):
        self.root = root
        self.nics: dict[str, dict[str, object]] = {}
        self.interrupts: list[str] = ["           CPU0       CPU1       CPU2       CPU3"]
        self.write(
            "proc/self/status",
            "Name:\tpython3\nCpus_allowed_list:\t0-3\nCapEff:\t000001ffffffffff\n",
        )
        self.write(
            "proc/self/limits",
            "Limit                     Soft Limit           Hard "
            "Limit           Units     \nMax locked memory         8388608              "
            "8388608              bytes     \n",
        )
        self.write(
            "proc/mounts",
            "sysfs /sys sysfs rw,nosuid 0 0\n"
            "bpf /sys/fs/bpf bpf rw,relatime 0 0\n"
            "hugetlbfs /dev/hugepages hugetlbfs rw,relatime,pagesize=2M 0 0\n",
        )
        self.write("proc/cmdline", "BOOT_IMAGE=/vmlinuz root=/dev/sda1 ro quiet\n")
        self.write("sys/devices/system/cpu/online", "0-3\n")
        self.write("sys/devices/system/cpu/isolated", "\n")
        for name in ("netns", "etc"):
            (root / name).mkdir(exist_ok=True)
        self.veth("feed-a")
        self.veth("feed-b")

    def write(self, rel: str, text: str) -> Path:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return path

    def host(self) -> preflight.Host:
        r = self.root
        return preflight.Host(
            proc=r / "proc",
            sys=r / "sys",
            etc=r / "etc",
            netns_dir=r / "netns",
            ethtool=self.ethtool,
        )

    def ethtool(self, what: str, ifname: str):
        got = self.nics.get(ifname, {}).get(what)
        if got is None:
            got = ethtool.EthtoolError(errno.ENODEV, f"{ifname}: No such device")
        if isinstance(got, OSError):
            raise got
        return got

    def outputs(self, ifname: str, **readings) -> None:
        self.nics.setdefault(ifname, {}).update(readings)

    def fails(self, ifname: str, what: str, err: int = errno.EOPNOTSUPP) -> None:
        self.outputs(
            ifname, **{what: ethtool.EthtoolError(err, f"{ifname}: {what}: {os.strerror(err)}")}
        )

    def queues(self, ifname: str, n: int, rps: str = "0", xps: str = "0") -> None:
        for q in range(n):
            self.write(f"sys/class/net/{ifname}/queues/rx-{q}/rps_cpus", rps + "\n")
            self.write(f"sys/class/net/{ifname}/queues/tx-{q}/xps_cpus", xps + "\n")

    def veth(self, ifname: str) -> None:
        self.queues(ifname, 1)
        self.outputs(ifname, features=VETH_FEATURES, channels=VETH_CHANNELS, ts_info=VETH_TS)
        self.fails(ifname, "rings")
        self.fails(ifname, "flow_rules")

    def nic(
        self, ifname: str, pci: str, irqs: dict[int, tuple[str, str]], via_virtio: str = ""
    ) -> None:
        """A PCI NIC whose MSI-X IRQs are ``{irq: (name, smp_affinity_list)}``; with
        ``via_virtio`` the netdev's device is a virtio device under the PCI function."""
        func = self.root / "sys/devices/pci0000:00" / pci
        for irq, (name, cpus) in irqs.items():
            self.write(f"sys/devices/pci0000:00/{pci}/msi_irqs/{irq}", "msix\n")
            self.write(f"proc/irq/{irq}/smp_affinity_list", cpus + "\n")
            self.interrupts.append(f" {irq}:  10  0  0  0  IR-PCI-MSIX-{pci}  {irq}-edge  {name}")
        self.write("proc/interrupts", "\n".join(self.interrupts) + "\n")
        dev = func / via_virtio if via_virtio else func
        dev.mkdir(parents=True, exist_ok=True)
        (self.root / f"sys/class/net/{ifname}").mkdir(parents=True, exist_ok=True)
        (self.root / f"sys/class/net/{ifname}/device").symlink_to(dev)
        self.queues(ifname, 4)

    def process(self, pid: int, *argv: str) -> None:
        self.write(f"proc/{pid}/cmdline", "\0".join(argv) + "\0")


@pytest.fixture
def tree(tmp_path) -> Tree:
    return Tree(tmp_path)


# the lines the fake hosts receive on (a run's lines have no defaults)
LINES = {
    "line_a": {"interface": "feed-a", "group": "239.77.1.1", "port": 26477},
    "line_b": {"interface": "feed-b", "group": "239.77.2.1", "port": 26478},
}


LINES_TOML = "".join(
    f"[run.{k}]\n" + "".join(f"{f} = {v!r}\n".replace("'", '"') for f, v in line.items())
    for k, line in LINES.items()
)


def cfg_of(host: dict | None = None, run: dict | None = None) -> config.Config:
    run = dict(run or {})
    lines = {k: {**v, **run.pop(k, {})} for k, v in LINES.items()}
    return config.from_dict({"host": host or {}, "run": {"core": 2, **lines, **run}})


NIC_RUN = {
    "line_a": {"interface": "ens1f0", "queue": 2},
    "line_b": {"interface": "ens1f0", "queue": 3},
}


def stage(tree: Tree, name: str, cfg: config.Config) -> preflight.StageResult:
    report = preflight.check(cfg, tree.host(), [name])
    assert [s.stage for s in report.stages] == [name]
    return report.stages[0]


def failing(result: preflight.StageResult) -> dict[str, preflight.Check]:
    return {c.name: c for c in result.checks if not c.ok}


# --- parsing ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "a,b,equal",
    [
        ("00000000,00000003", "3", True),
        ("0000000c", "c", True),
        ("00000000,00000000", "0", True),
        ("00000001,00000000", "100000000", True),
        ("3", "1", False),
        ("0", "f", False),
    ],
)
def test_masks_compare_as_numbers(a, b, equal):
    assert (preflight.mask_value(a) == preflight.mask_value(b)) is equal


def test_cpulists_drop_kernel_flags_and_print_canonically():
    assert preflight.param_cpus("managed_irq,domain,2-3,5") == {2, 3, 5}
    assert preflight.param_cpus("") == frozenset() and preflight.param_cpus(None) is None
    assert preflight.cpus_text({0, 1, 2, 3, 8, 10, 11}) == "0-3,8,10-11"
    assert preflight.parse_cmdline("ro isolcpus=2-3 quiet -- isolcpus=9") == {
        "ro": "",
        "isolcpus": "2-3",
        "quiet": "",
    }


def test_ethtool_readings_as_ethtool_shows_them():
    f = preflight.shown_features(VETH_FEATURES)
    assert f["generic-receive-offload"] == (False, False)
    assert f["large-receive-offload"] == (False, True) and f["rx-checksumming"] == (True, False)
    # several features under one old flag: the flag is on when any is, and never fixed
    assert f["tx-checksumming"] == (True, False) and f["tx-checksum-ipv4"] == (False, True)
    assert f["ntuple-filters"] == (False, True) and "rx-ntuple-filter" not in f
    assert f["rx-gro-hw"] == (False, True) and "udp-fragmentation-offload" not in f
    never = ethtool.Feature(available=True, requested=True, active=True, never_changed=True)
    assert preflight.shown_features({"rx-lro": never})["large-receive-offload"] == (True, True)
    assert preflight.current_channels(VETH_CHANNELS) == {
        "RX": 1,
        "TX": 1,
        "Other": None,
        "Combined": None,
    }
    assert preflight.current_channels(nic_channels(8))["Combined"] == 8
    assert preflight.current_rings(nic_rings(4096)) == {"RX": 4096, "TX": 1024}
    rule = udp_rule(1023, "239.1.1.1", 100, 2)
    assert preflight.steers(rule, "239.1.1.1", 100, 2)
    assert not preflight.steers(rule, "239.1.1.1", 100, 3)
    assert not preflight.steers(rule, "239.1.1.1", 101, 2)
    assert preflight.steers(rule._replace(dst_port=0, dst_port_mask=0), "239.1.1.1", 101, 2)
    assert not preflight.steers(rule._replace(dst_ip_mask="255.255.255.0"), "239.1.1.1", 100, 2)
    assert not preflight.steers(rule._replace(flow_type=ethtool.TCP_V4_FLOW), "239.1.1.1", 100, 2)
    hw, sw = preflight.Timestamping.of(NIC_TS), preflight.Timestamping.of(VETH_TS)
    assert (hw.hardware, hw.phc) == (True, 0) and (sw.hardware, sw.software) == (False, True)
    assert not preflight.Timestamping.of(NIC_TS._replace(phc_index=-1)).hardware


IRQ_NAMES = [  # (IRQ name, interface, its device name, queue)
    ("mlx5_comp3@pci:0000:3b:00.0", "ens1f0", "", 3),
    ("i40e-ens1f0-TxRx-2", "ens1f0", "", 2),
    ("ens1f0-rx-5", "ens1f0", "", 5),
    ("virtio2-input.0", "eth0", "virtio2", 0),
    ("virtio2-output.1", "eth0", "virtio2", 1),
    ("eth2-7", "eth2", "", 7),
    ("virtio2-config", "eth0", "virtio2", None),
    ("mlx5_async0@pci:0000:3b:00.0", "ens1f0", "", None),
    ("i40e-0000:3b:00.0:misc", "ens1f0", "", None),
]


@pytest.mark.parametrize("name,ifname,devname,queue", IRQ_NAMES)
def test_irq_names_give_their_queue(name, ifname, devname, queue):
    assert preflight.irq_queue(name) == queue


@pytest.mark.parametrize("name,ifname,devname,queue", IRQ_NAMES)
def test_irq_affinity_role_places_the_irqs_preflight_checks(name, ifname, devname, queue):
    """The irq_affinity role's module runs on the target without Tickwire installed, so it
    carries its own IRQ-name matcher: it must agree with the preflight's, or the role would
    place one set of IRQs and preflight check another."""
    import importlib.util

    path = ROOT / "ansible/roles/irq_affinity/library/tickwire_irq.py"
    spec = importlib.util.spec_from_file_location("tickwire_irq", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.queue_of(name, ifname, devname, own=True) == queue


# --- runtime ---------------------------------------------------------------------------------
def test_runtime_ok_on_a_ready_host(tree):
    r = stage(tree, "runtime", cfg_of())
    assert r.status == OK and r.required
    assert {c.name for c in r.checks} >= {
        "line A interface",
        "line B interface",
        "capabilities",
        "locked memory",
        "bpffs",
        "consumer core",
    }


def test_runtime_is_never_skipped_and_names_what_is_missing(tree):
    r = stage(
        tree,
        "runtime",
        cfg_of(run={"line_a": {"interface": "nope0"}, "core": -1, "rx_mode": "socket"}),
    )
    assert r.status == PARTIAL
    assert "nope0 does not exist" in failing(r)["line A interface"].have
    assert "bpffs" not in {c.name for c in r.checks}  # the socket path needs neither
    assert "locked memory" not in {c.name for c in r.checks}


def test_runtime_capabilities_memlock_and_core(tree):
    tree.write("proc/self/status", "Cpus_allowed_list:\t0-1\nCapEff:\t0000000000000000\n")
    tree.write("proc/mounts", "sysfs /sys sysfs rw 0 0\n")
    r = stage(tree, "runtime", cfg_of(host={"isolated_cpus": "3"}))
    bad = failing(r)
    assert "CAP_BPF" in bad["capabilities"].have and "8388608" in bad["locked memory"].have
    assert bad["bpffs"].have == "not mounted"
    assert "consumer core" not in bad  # CPU 2 is online; outside the shell's 0-1 is a note
    assert (
        "outside this shell's affinity 0-1" in {c.name: c for c in r.checks}["consumer core"].have
    )
    assert "not in host.isolated_cpus 3" in bad["consumer core isolated"].have
    assert r.status == PARTIAL  # the interfaces are there
    tree.write("sys/devices/system/cpu/online", "0-1\n")
    assert "offline" in failing(stage(tree, "runtime", cfg_of()))["consumer core"].have


def test_runtime_feed_nic_on_the_consumer_cores_numa_node(tree):
    """Each feed NIC's numa_node must be run.core's node; veth and -1 pass with a note."""
    tree.nic("ens1f0", "0000:3b:00.0", {91: ("i40e-ens1f0-TxRx-0", "2")})
    tree.write("sys/devices/pci0000:00/0000:3b:00.0/numa_node", "1\n")
    for cpu, node in ((1, 0), (2, 1)):
        (tree.root / f"sys/devices/system/cpu/cpu{cpu}/node{node}").mkdir(parents=True)
    tree.write("sys/devices/system/node/node0/cpulist", "0-1\n")
    tree.write("sys/devices/system/node/node1/cpulist", "2-3\n")
    r = stage(tree, "runtime", cfg_of(run=NIC_RUN))
    (numa,) = [c for c in r.checks if c.name == "ens1f0 NUMA node"]
    assert numa.ok and numa.have == "node 1" and numa.want == "CPU 2's node (1)"
    r = stage(tree, "runtime", cfg_of(run={**NIC_RUN, "core": 1}))
    numa = failing(r)["ens1f0 NUMA node"]
    assert numa.have == "node 1" and numa.want == "CPU 1's node (0)"
    assert numa.fix.startswith("set run.core to a CPU of node 1 (2-3)")
    # no NUMA information from the platform: a note, not a failure
    tree.write("sys/devices/pci0000:00/0000:3b:00.0/numa_node", "-1\n")
    r = stage(tree, "runtime", cfg_of(run={**NIC_RUN, "core": 1}))
    numa = {c.name: c for c in r.checks}["ens1f0 NUMA node"]
    assert numa.ok and numa.have.startswith("numa_node -1")
    # a veth has no device, so no node
    r = stage(tree, "runtime", cfg_of())
    checks = {c.name: c for c in r.checks}
    assert checks["feed-a NUMA node"].ok and "virtual interface" in checks["feed-a NUMA node"].have


def test_runtime_missing_namespace(tree):
    cfg = cfg_of(run={"netns": "nosuch"})
    host = preflight.Host(
        proc=tree.root / "proc",
        sys=tree.root / "sys",
        netns_dir=tree.root / "netns",
        netns="nosuch",
        netns_error="network namespace nosuch does not exist",
    )
    r = preflight.check(cfg, host, ["runtime"]).stages[0]
    bad = failing(r)
    assert "nosuch does not exist" in bad["network namespace"].have
    assert "nosuch does not exist" in bad["line A interface"].have
    assert "CAP_SYS_ADMIN" in r.checks[[c.name for c in r.checks].index("capabilities")].want


# --- hugepages -------------------------------------------------------------------------------
def _nodes(tree: Tree, counts_2m: list[int], counts_1g: list[int] | None = None) -> None:
    for n, count in enumerate(counts_2m):
        base = f"sys/devices/system/node/node{n}/hugepages"
        tree.write(f"{base}/hugepages-2048kB/nr_hugepages", f"{count}\n")
        tree.write(
            f"{base}/hugepages-1048576kB/nr_hugepages",
            f"{(counts_1g or [0] * len(counts_2m))[n]}\n",
        )


def test_hugepages_every_status(tree):
    assert stage(tree, "hugepages", cfg_of()).status == SKIPPED
    _nodes(tree, [1024, 1024], [2, 2])
    promise = {
        "hugepages_2m": 512,
        "hugepages_1g": 2,
        "hugepages_nodes": "0-1",
        "hugetlbfs": ["/dev/hugepages"],
    }
    r = stage(tree, "hugepages", cfg_of(promise))
    assert r.status == OK and len(r.checks) == 5  # 2 sizes x 2 nodes + a mount
    _nodes(tree, [1024, 0], [2, 0])
    r = stage(tree, "hugepages", cfg_of(promise))
    assert r.status == PARTIAL
    assert set(failing(r)) == {"2 MB pages on node1", "1 GB pages on node1"}
    assert "--tags hugepages" in failing(r)["2 MB pages on node1"].fix
    _nodes(tree, [0, 0])
    tree.write("proc/mounts", "hugetlbfs /mnt/huge1g hugetlbfs rw,pagesize=1024M 0 0\n")
    r = stage(tree, "hugepages", cfg_of({"hugepages_2m": 16, "hugetlbfs": ["/dev/hugepages"]}))
    assert (
        r.status == NOT_CONFIGURED and failing(r)["hugetlbfs /dev/hugepages"].have == "not mounted"
    )


def test_hugepages_without_numa_nodes_uses_the_global_count(tree):
    tree.write("sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages", "64\n")
    r = stage(tree, "hugepages", cfg_of({"hugepages_2m": 64}))
    assert r.status == OK and r.checks[0].name == "2 MB pages on host"


def test_hugepages_only_on_the_nodes_the_role_reserves_on(tree):
    """The hugepages role reserves on hugepages_nodes only; preflight looks only there."""
    _nodes(tree, [512, 0], [2, 0])  # a two-node host, pages reserved on node 0 only
    promise = {"hugepages_2m": 512, "hugepages_1g": 2}
    r = stage(tree, "hugepages", cfg_of({**promise, "hugepages_nodes": "0"}))
    assert r.status == OK
    assert [c.name for c in r.checks] == ["2 MB pages on node0", "1 GB pages on node0"]
    assert stage(tree, "hugepages", cfg_of(promise)).status == OK  # node 0 is the default
    r = stage(tree, "hugepages", cfg_of({**promise, "hugepages_nodes": "1"}))
    assert r.status == NOT_CONFIGURED
    assert set(failing(r)) == {"2 MB pages on node1", "1 GB pages on node1"}
    r = stage(tree, "hugepages", cfg_of({**promise, "hugepages_nodes": "0,2"}))
    assert r.status == PARTIAL and failing(r)["2 MB pages on node2"].have == "no NUMA node 2"


# --- cpu_isolation ---------------------------------------------------------------------------
ISO = {"isolated_cpus": "2-3", "housekeeping_cpus": "0-1"}


def _isolated_host(tree: Tree) -> None:
    tree.write(
        "proc/cmdline",
        "BOOT_IMAGE=/vmlinuz ro isolcpus=managed_irq,domain,2-3 "
        "nohz_full=2-3 rcu_nocbs=2,3 irqaffinity=0-1 quiet\n",
    )
    tree.write("sys/devices/system/cpu/isolated", "2-3\n")
    tree.write("sys/devices/system/cpu/nohz_full", "2-3\n")
    tree.write("etc/systemd/system.conf.d/tickwire.conf", "[Manager]\nCPUAffinity=0 1\n")
    tree.write("etc/default/irqbalance", "IRQBALANCE_BANNED_CPULIST=2-3\n")
    tree.process(812, "/usr/sbin/irqbalance", "--foreground")


def test_cpu_isolation_ok(tree):
    assert stage(tree, "cpu_isolation", cfg_of()).status == SKIPPED
    _isolated_host(tree)
    r = stage(tree, "cpu_isolation", cfg_of(ISO))
    assert r.status == OK and len(r.checks) == 8


def test_cpu_isolation_reboot_required(tree):
    _isolated_host(tree)
    tree.write("proc/cmdline", "BOOT_IMAGE=/vmlinuz ro quiet\n")
    tree.write("sys/devices/system/cpu/isolated", "\n")
    (tree.root / "sys/devices/system/cpu/nohz_full").unlink()
    tree.write("etc/default/grub", 'GRUB_CMDLINE_LINUX_DEFAULT="quiet"\n')
    tree.write(
        "etc/default/grub.d/tickwire.cfg",
        'GRUB_CMDLINE_LINUX="$GRUB_CMDLINE_LINUX '
        'isolcpus=managed_irq,domain,2-3 nohz_full=2-3 rcu_nocbs=2-3 irqaffinity=0-1"\n',
    )
    r = stage(tree, "cpu_isolation", cfg_of(ISO))
    assert r.status == PARTIAL and r.reboot_required  # systemd and irqbalance are done
    bad = failing(r)
    assert bad["kernel command line isolcpus"].have == "absent"
    assert bad["kernel command line isolcpus"].fix.startswith(
        "reboot required: /etc/default/grub.d/tickwire.cfg"
    )
    assert bad["kernel nohz_full CPUs"].have.startswith("absent")
    assert "reboot required" in preflight.text(
        preflight.check(cfg_of(ISO), tree.host(), ["cpu_isolation"])
    )


def test_cpu_isolation_not_configured(tree):
    tree.process(812, "/usr/sbin/irqbalance", "--foreground")
    tree.write("etc/default/irqbalance", "#IRQBALANCE_BANNED_CPULIST=\n")
    r = stage(tree, "cpu_isolation", cfg_of(ISO))
    assert r.status == NOT_CONFIGURED and not r.reboot_required
    assert failing(r)["irqbalance keeps off isolated CPUs"].have == "running, banned CPUs none"
    assert "--tags cpu_isolation" in failing(r)["kernel command line nohz_full"].fix


def test_irqbalance_banned_mask_and_absence(tree):
    _isolated_host(tree)
    tree.write("etc/default/irqbalance", 'IRQBALANCE_BANNED_CPUS="0000000c"\n')
    assert stage(tree, "cpu_isolation", cfg_of(ISO)).status == OK
    tree.write("etc/default/irqbalance", 'IRQBALANCE_BANNED_CPUS="00000004"\n')
    assert set(failing(stage(tree, "cpu_isolation", cfg_of(ISO)))) == {
        "irqbalance keeps off isolated CPUs"
    }
    (tree.root / "proc/812/cmdline").unlink()  # not running: nothing to ban
    assert stage(tree, "cpu_isolation", cfg_of(ISO)).status == OK


# the rest of tuned cpu-partitioning, as the tickwire role's template promises it
TUNED_ARGS = {"rcu_nocb_poll": True, "nmi_watchdog_off": True, "kthread_cpus": "0-1"}
TUNED_RUN = {"workqueue_cpus": "0-1", "ksm_off": True, "cpu_governor": "performance"}
TUNED_ARGS_TEXT = "rcu_nocb_poll kthread_cpus=0,1 nmi_watchdog=0 transparent_hugepage=never"


def _tuned_host(tree: Tree) -> None:
    """What the cpu_isolation role and tickwire-cpu-tuning.service leave on a 4-CPU host."""
    _isolated_host(tree)
    cmdline = (tree.root / "proc/cmdline").read_text().replace(" quiet", " " + TUNED_ARGS_TEXT)
    tree.write("proc/cmdline", cmdline)
    tree.write("sys/devices/virtual/workqueue/cpumask", "00000003\n")
    tree.write("sys/bus/workqueue/devices/writeback/cpumask", "3\n")
    tree.write("sys/kernel/mm/ksm/run", "2\n")
    tree.write("sys/kernel/mm/transparent_hugepage/enabled", "always madvise [never]\n")
    for cpu in range(4):
        tree.write(f"sys/devices/system/cpu/cpufreq/policy{cpu}/scaling_governor", "performance\n")
        limit = "3" if cpu in (2, 3) else "0"  # "0": no limit on the housekeeping CPUs
        tree.write(f"sys/devices/system/cpu/cpu{cpu}/power/pm_qos_resume_latency_us", limit + "\n")


def test_cpu_isolation_tuned_kernel_arguments(tree):
    promise = {**ISO, **TUNED_ARGS, "transparent_hugepage": "never"}
    _tuned_host(tree)
    r = stage(tree, "cpu_isolation", cfg_of(promise))
    assert r.status == OK, failing(r)
    names = {c.name for c in r.checks}
    assert {
        "kernel command line rcu_nocb_poll",
        "kernel command line nmi_watchdog",
        "kernel command line kthread_cpus",
        "kernel command line transparent_hugepage",
        "transparent hugepages",
    } <= names
    # written for the next boot, not in the running kernel: reboot required, for each
    tree.write(
        "proc/cmdline",
        "ro isolcpus=managed_irq,domain,2-3 nohz_full=2-3 rcu_nocbs=2,3 irqaffinity=0-1 "
        "nmi_watchdog=1\n",
    )
    r = stage(tree, "cpu_isolation", cfg_of(promise))
    bad = failing(r)
    assert set(bad) == {
        "kernel command line rcu_nocb_poll",
        "kernel command line nmi_watchdog",
        "kernel command line kthread_cpus",
        "kernel command line transparent_hugepage",
    }
    assert bad["kernel command line nmi_watchdog"].have == "nmi_watchdog=1"
    assert bad["kernel command line rcu_nocb_poll"].have == "absent"
    assert (
        not r.reboot_required
        and "--tags cpu_isolation" in bad["kernel command line rcu_nocb_poll"].fix
    )
    tree.write(
        "etc/default/grub.d/tickwire.cfg",
        f'GRUB_CMDLINE_LINUX_DEFAULT="$GRUB_CMDLINE_LINUX_DEFAULT {TUNED_ARGS_TEXT}"\n',
    )
    r = stage(tree, "cpu_isolation", cfg_of(promise))
    assert r.reboot_required
    assert all(
        c.fix.startswith("reboot required: /etc/default/grub.d/tickwire.cfg")
        for c in failing(r).values()
    )
    # nothing promised, nothing looked at
    assert stage(tree, "cpu_isolation", cfg_of()).status == SKIPPED


def test_cpu_isolation_run_time_settings(tree):
    promise = {**ISO, **TUNED_RUN, "transparent_hugepage": "never", "idle_latency_us": 3}
    _tuned_host(tree)
    (tree.root / "proc/cmdline").write_text("ro\n")  # only the run-time half promised below
    run_only = {**TUNED_RUN, "isolated_cpus": "2-3", "idle_latency_us": 3}
    r = stage(tree, "cpu_isolation", cfg_of(run_only))
    tuned = {
        "unbound workqueues CPUs",
        "writeback workqueue CPUs",
        "KSM off",
        "cpufreq governor",
        "isolated CPUs' idle latency limit (C-states)",
    }
    assert tuned <= {c.name for c in r.checks} and not tuned & set(failing(r))
    _tuned_host(tree)
    assert stage(tree, "cpu_isolation", cfg_of(promise)).status == OK
    # the kernel's own defaults: every run-time check fails, naming what it found
    tree.write("sys/devices/virtual/workqueue/cpumask", "f\n")
    (tree.root / "sys/bus/workqueue/devices/writeback/cpumask").unlink()
    tree.write("sys/kernel/mm/ksm/run", "1\n")
    tree.write("sys/kernel/mm/transparent_hugepage/enabled", "[always] madvise never\n")
    tree.write("sys/devices/system/cpu/cpufreq/policy3/scaling_governor", "schedutil\n")
    tree.write("sys/devices/system/cpu/cpu2/power/pm_qos_resume_latency_us", "0\n")
    tree.write("sys/devices/system/cpu/cpu3/power/pm_qos_resume_latency_us", "20\n")
    r = stage(tree, "cpu_isolation", cfg_of(promise))
    bad = failing(r)
    assert set(bad) == tuned | {"transparent hugepages"}
    assert bad["unbound workqueues CPUs"].have == "0-3"
    assert bad["writeback workqueue CPUs"].have.startswith("absent")
    assert bad["KSM off"].have == "run=1"
    assert bad["transparent hugepages"].have == "always"
    assert bad["cpufreq governor"].have == "policy3 schedutil"
    assert bad["isolated CPUs' idle latency limit (C-states)"].have == "CPU 2 no limit, CPU 3 20"
    assert "tickwire-cpu-tuning.service" in bad["KSM off"].fix
    # a stricter limit holds; a kernel without KSM or cpufreq (a VM) has nothing to set
    tree.write("sys/devices/system/cpu/cpu2/power/pm_qos_resume_latency_us", "n/a\n")
    tree.write("sys/devices/system/cpu/cpu3/power/pm_qos_resume_latency_us", "1\n")
    (tree.root / "sys/kernel/mm/ksm/run").unlink()
    for cpu in range(4):
        (tree.root / f"sys/devices/system/cpu/cpufreq/policy{cpu}/scaling_governor").unlink()
        (tree.root / f"sys/devices/system/cpu/cpufreq/policy{cpu}").rmdir()
    r = stage(tree, "cpu_isolation", cfg_of(promise))
    checks = {c.name: c for c in r.checks}
    for name in ("KSM off", "cpufreq governor", "isolated CPUs' idle latency limit (C-states)"):
        assert checks[name].ok, checks[name]
    assert checks["KSM off"].have == "no KSM in this kernel"
    assert checks["cpufreq governor"].have.startswith("no cpufreq policies")


# --- irq_affinity ----------------------------------------------------------------------------
def test_irq_affinity_on_the_consumer_core(tree):
    promise = {
        "isolated_cpus": "2-3",
        "irq_placement": "consumer",
        "rps_mask": "0",
        "xps_mask": "0",
    }
    assert (
        stage(
            tree, "irq_affinity", cfg_of({"isolated_cpus": "2-3", "irq_placement": "housekeeping"})
        ).status
        == SKIPPED
    )
    tree.nic(
        "ens1f0",
        "0000:3b:00.0",
        {
            90: ("i40e-0000:3b:00.0:misc", "0-1"),
            91: ("i40e-ens1f0-TxRx-0", "0"),
            92: ("i40e-ens1f0-TxRx-1", "1"),
            93: ("i40e-ens1f0-TxRx-2", "2"),
            94: ("i40e-ens1f0-TxRx-3", "2"),
        },
    )
    tree.write("sys/class/net/ens1f0/queues/rx-2/rps_cpus", "00000000,00000000\n")
    r = stage(tree, "irq_affinity", cfg_of(promise, NIC_RUN))
    assert r.status == OK, failing(r)
    assert [c.name for c in r.checks][:1] == [
        "ens1f0 queue 2 IRQ on consumer CPUs (IRQ 93 i40e-ens1f0-TxRx-2)"
    ]
    tree.write("proc/irq/94/smp_affinity_list", "0-3\n")
    tree.write("sys/class/net/ens1f0/queues/tx-3/xps_cpus", "00000000,00000004\n")
    r = stage(tree, "irq_affinity", cfg_of(promise, NIC_RUN))
    assert r.status == PARTIAL
    bad = failing(r)
    assert bad["ens1f0 queue 3 IRQ on consumer CPUs (IRQ 94 i40e-ens1f0-TxRx-3)"].have == "0-3"
    assert bad["ens1f0 XPS mask tx-3"].have == "00000000,00000004"
    assert "--tags irq_affinity" in bad["ens1f0 XPS mask tx-3"].fix


def test_irq_affinity_housekeeping_virtio_layout(tree):
    # virtio-net: the netdev's device is virtioN, the MSI-X IRQs belong to its PCI parent
    tree.nic(
        "eth1",
        "0000:00:03.0",
        {
            37: ("virtio2-config", "0-3"),
            38: ("virtio2-input.0", "3"),
            39: ("virtio2-output.0", "2"),
            40: ("virtio2-input.1", "3"),
            41: ("virtio2-output.1", "3"),
        },
        via_virtio="virtio2",
    )
    run = {"line_a": {"interface": "eth1", "queue": 0}, "line_b": {"interface": "eth1", "queue": 1}}
    promise = {"housekeeping_cpus": "0-1", "irq_placement": "housekeeping"}
    r = stage(tree, "irq_affinity", cfg_of(promise, run))
    assert r.status == NOT_CONFIGURED and len(r.checks) == 4  # input and output per queue
    for irq in (38, 39, 40, 41):
        tree.write(f"proc/irq/{irq}/smp_affinity_list", "0-1\n")
    assert stage(tree, "irq_affinity", cfg_of(promise, run)).status == OK


def test_virtual_interfaces_have_no_irqs(tree):
    r = stage(tree, "irq_affinity", cfg_of({"isolated_cpus": "2-3"}))
    assert r.status == OK
    assert {c.have for c in r.checks} == {"no device IRQs (virtual interface)"}
    r = stage(tree, "irq_affinity", cfg_of({"isolated_cpus": "2-3"}, {"core": -1}))
    assert r.status == NOT_CONFIGURED and r.checks[0].have == "run.core not set"


def test_rps_masks_compare_numerically(tree):
    tree.write("sys/class/net/feed-a/queues/rx-0/rps_cpus", "00000000,00000003\n")
    tree.write("sys/class/net/feed-b/queues/rx-0/rps_cpus", "00000000,00000001\n")
    r = stage(tree, "irq_affinity", cfg_of({"rps_mask": "3"}))
    assert r.status == PARTIAL and set(failing(r)) == {"feed-b RPS mask rx-0"}


# --- nic -------------------------------------------------------------------------------------
NIC_PROMISE = {
    "channels": 8,
    "rx_ring": 4096,
    "ntuple": True,
    "offloads_off": ["generic-receive-offload", "large-receive-offload", "rx-checksumming"],
}


def _tuned_nic(tree: Tree) -> None:
    tree.nic("ens1f0", "0000:3b:00.0", {})
    tree.outputs(
        "ens1f0",
        channels=nic_channels(8),
        rings=nic_rings(4096),
        features=NIC_FEATURES_TUNED,
        flow_rules=[udp_rule(1023, "239.77.1.1", 26477, 2), udp_rule(1022, "239.77.2.1", 26478, 3)],
    )


def test_nic_ok_partial_skipped(tree):
    assert stage(tree, "nic", cfg_of()).status == SKIPPED
    _tuned_nic(tree)
    r = stage(tree, "nic", cfg_of(NIC_PROMISE, NIC_RUN))
    assert r.status == OK, failing(r)
    assert len(r.checks) == 8  # channels, ring, 3 offloads, ntuple feature, 2 rules
    tree.outputs(
        "ens1f0",
        features=with_features(NIC_FEATURES_TUNED, rx_gro=feat(True)),
        flow_rules=[udp_rule(1023, "239.77.1.1", 26477, 5)],
    )
    r = stage(tree, "nic", cfg_of(NIC_PROMISE, NIC_RUN))
    bad = failing(r)
    assert r.status == PARTIAL
    assert set(bad) == {
        "ens1f0 generic-receive-offload",
        "ens1f0 ntuple rule line A",
        "ens1f0 ntuple rule line B",
    }
    assert bad["ens1f0 ntuple rule line A"].have == "rule 1023 to queue 5"
    assert bad["ens1f0 ntuple rule line B"].have == "no rule"
    assert (
        "ethtool -N ens1f0 flow-type udp4 dst-ip 239.77.2.1 dst-port 26478 action 3"
        in bad["ens1f0 ntuple rule line B"].fix
    )


def test_nic_not_configured_on_a_veth(tree):
    # the veth has no rings or ntuple rules: the kernel says "Operation not supported"
    promise = {"rx_ring": 4096, "ntuple": True, "offloads_off": ["rx-checksumming"]}
    r = stage(tree, "nic", cfg_of(promise))
    assert r.status == NOT_CONFIGURED
    bad = failing(r)
    assert bad["feed-a rx ring"].have == "unsupported: Operation not supported"
    assert bad["feed-a ntuple-filters"].have == "off"
    assert bad["feed-a ntuple rule line A"].have == "unsupported: Operation not supported"
    assert bad["feed-b rx-checksumming"].have == "on"


def test_nic_fixed_offload_and_missing_interface(tree):
    tree.outputs("feed-a", features=with_features(VETH_FEATURES, rx_lro=feat(True, True)))
    r = stage(
        tree,
        "nic",
        cfg_of({"offloads_off": ["large-receive-offload"]}, {"line_b": {"interface": "gone0"}}),
    )
    bad = failing(r)
    assert r.status == NOT_CONFIGURED
    assert "fixed on by the driver" in bad["feed-a large-receive-offload"].fix
    assert bad["gone0 present"].have == "interface gone0 does not exist"


# --- sysctl ----------------------------------------------------------------------------------
def test_sysctl_every_status(tree):
    assert stage(tree, "sysctl", cfg_of()).status == SKIPPED
    tree.write("proc/sys/net/core/busy_poll", "50\n")
    tree.write("proc/sys/net/ipv4/tcp_rmem", "4096\t131072\t6291456\n")
    tree.write("proc/sys/vm/swappiness", "60\n")
    promise = {"net.core.busy_poll": 50, "net.ipv4.tcp_rmem": "4096 131072  6291456"}
    assert stage(tree, "sysctl", cfg_of({"sysctl": promise})).status == OK
    promise["vm.swappiness"] = 10
    r = stage(tree, "sysctl", cfg_of({"sysctl": promise}))
    assert r.status == PARTIAL and failing(r)["vm.swappiness"].have == "60"
    assert 'sysctl -w vm.swappiness="10"' in failing(r)["vm.swappiness"].fix
    r = stage(tree, "sysctl", cfg_of({"sysctl": {"vm.swappiness": 1, "net.core.nope": 1}}))
    assert r.status == NOT_CONFIGURED and failing(r)["net.core.nope"].have == "absent"


# --- ptp: tests/test_ptp.py (the stage asks ptp4l over its socket with pmc) ---------------


# --- service ---------------------------------------------------------------------------------
UNIT = """# Ansible managed
[Unit]
Description=Tickwire feed handler

[Service]
ExecStart=/opt/tickwire/bin/tickwire run --config /etc/tickwire/tickwire.toml
AmbientCapabilities=CAP_BPF CAP_NET_ADMIN CAP_NET_RAW
AmbientCapabilities=CAP_IPC_LOCK CAP_SYS_NICE CAP_PERFMON
CapabilityBoundingSet=CAP_BPF CAP_NET_ADMIN CAP_NET_RAW CAP_IPC_LOCK CAP_SYS_NICE CAP_PERFMON
CPUAffinity=2

[Install]
WantedBy=multi-user.target
"""


def test_service_every_status(tree):
    assert stage(tree, "service", cfg_of()).status == SKIPPED
    promise = {"service": "tickwire.service"}
    r = stage(tree, "service", cfg_of(promise))
    assert r.status == NOT_CONFIGURED and "--tags tickwire" in r.checks[0].fix
    tree.write("etc/systemd/system/tickwire.service", UNIT)
    r = stage(tree, "service", cfg_of(promise))
    assert r.status == PARTIAL and set(failing(r)) == {"tickwire.service enabled"}
    wants = tree.root / "etc/systemd/system/multi-user.target.wants"
    wants.mkdir(parents=True)
    (wants / "tickwire.service").symlink_to("/etc/systemd/system/tickwire.service")
    assert stage(tree, "service", cfg_of(promise)).status == OK
    # a drop-in that widens the bounding set, and the wrong core
    tree.write(
        "etc/systemd/system/tickwire.service.d/override.conf",
        "[Service]\nCapabilityBoundingSet=CAP_SYS_ADMIN\n",
    )
    r = stage(tree, "service", cfg_of(promise, {"core": 3}))
    bad = failing(r)
    assert set(bad) == {"tickwire.service CapabilityBoundingSet", "tickwire.service CPUAffinity"}
    assert "CAP_SYS_ADMIN" in bad["tickwire.service CapabilityBoundingSet"].have
    tree.write(
        "etc/systemd/system/tickwire.service.d/override.conf",
        "[Service]\nCapabilityBoundingSet=\nAmbientCapabilities=\n",
    )
    r = stage(tree, "service", cfg_of(promise))
    assert failing(r)["tickwire.service AmbientCapabilities"].have == "not set"


# --- the report, text, JSON and exit codes ---------------------------------------------------
def test_ready_follows_the_required_stages(tree):
    cfg = cfg_of({"sysctl": {"vm.swappiness": 10}})
    tree.write("proc/sys/vm/swappiness", "60\n")
    report = preflight.check(cfg, tree.host())
    assert [s.stage for s in report.stages] == list(preflight.ALL_STAGES)
    assert report.ready  # sysctl fails but is not required
    cfg = cfg_of({"sysctl": {"vm.swappiness": 10}, "required": ["sysctl"]})
    report = preflight.check(cfg, tree.host())
    assert not report.ready and [s.stage for s in report.failing] == ["sysctl"]
    # a required stage with nothing to check proves nothing
    report = preflight.check(cfg_of({"required": ["nic"]}), tree.host())
    assert [(s.stage, s.status) for s in report.failing] == [("nic", SKIPPED)]
    # --stage: exactly the listed stages, all required
    report = preflight.check(cfg_of(), tree.host(), ["hugepages"])
    assert [(s.stage, s.required, s.status) for s in report.stages] == [
        ("hugepages", True, SKIPPED)
    ] and not report.ready
    with pytest.raises(ValueError, match="no stage 'bogus'"):
        preflight.check(cfg_of(), tree.host(), ["bogus"])


@contextlib.contextmanager
def _fake_live(monkeypatch, tree: Tree):
    monkeypatch.setattr(
        preflight.Host,
        "live",
        classmethod(lambda cls, netns="": contextlib.nullcontext(tree.host())),
    )
    yield


def test_cli_text_json_and_exit_codes(tree, tmp_path, monkeypatch, capsys):
    tree.write("proc/sys/vm/swappiness", "60\n")
    path = tmp_path / "t.toml"
    path.write_text(
        "[run]\ncore = 2\n" + LINES_TOML + '[host]\nrequired = ["sysctl"]\n'
        '[host.sysctl]\n"vm.swappiness" = 60\n'
    )
    with _fake_live(monkeypatch, tree):
        assert cli.main(["preflight", "--config", str(path)]) == 0
        out = capsys.readouterr().out.splitlines()
        assert out[0].split() == ["OK", "runtime", "required"]
        assert out[-1] == "host ready"
        assert "SKIPPED         hugepages      nothing promised in [host]" in out
        tree.write("proc/sys/vm/swappiness", "10\n")
        assert cli.main(["preflight", "--config", str(path), "--json"]) == 1
        doc = json.loads(capsys.readouterr().out)
        assert set(doc) == {"ready", "stages"} and doc["ready"] is False
        sysctl = [s for s in doc["stages"] if s["stage"] == "sysctl"][0]
        assert sysctl == {
            "stage": "sysctl",
            "status": "NOT CONFIGURED",
            "required": True,
            "checks": [
                {
                    "name": "vm.swappiness",
                    "ok": False,
                    "have": "10",
                    "want": "60",
                    "fix": sysctl["checks"][0]["fix"],
                }
            ],
        }
        assert "--tags sysctl" in sysctl["checks"][0]["fix"]
        assert cli.main(["preflight", "--config", str(path)]) == 1
        text = capsys.readouterr().out
        assert "    vm.swappiness: have 10; want 60" in text
        assert text.rstrip().endswith("host NOT ready: 1 required stage(s) failing (sysctl)")
        assert cli.main(["preflight", "--config", str(path), "--stage", "runtime"]) == 0
        capsys.readouterr()
        path.write_text('[host]\nrequired = ["nope"]\n')
        assert cli.main(["preflight", "--config", str(path)]) == 2
        err = capsys.readouterr().err
        assert "host.required" in err and err.count("\n") == 1
        assert cli.main(["preflight", "--stage", "bogus"]) == 2


def test_cli_on_this_host(tmp_path):
    """The real Host: a sysctl promise checked through /proc/sys (no root needed)."""
    value = Path("/proc/sys/vm/swappiness").read_text().strip()
    path = tmp_path / "h.toml"
    path.write_text(f'[host.sysctl]\n"vm.swappiness" = {value}\n')
    done = _tickwire("preflight", "--config", str(path), "--stage", "sysctl", "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads(done.stdout)["stages"][0]["status"] == OK
    path.write_text(f'[host.sysctl]\n"vm.swappiness" = {int(value) + 1}\n')
    done = _tickwire("preflight", "--config", str(path), "--stage", "sysctl")
    assert done.returncode == 1 and "NOT CONFIGURED  sysctl" in done.stdout


# --- for real, in a private lab --------------------------------------------------------------
@pytest.fixture(scope="module")
def labcfg():
    cfg = private_lab("pfl")
    with built(cfg):
        yield cfg


def _tickwire(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "host.cli", *args], capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.lab
def test_lab_preflight_is_ready(labcfg, tmp_path):
    path = write_config(labcfg, tmp_path / "lab.toml")
    done = _tickwire("preflight", "--config", path, "--lab", "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    doc = json.loads(done.stdout)
    status = {s["stage"]: s["status"] for s in doc["stages"]}
    assert doc["ready"] is True and status.pop("runtime") == OK
    assert set(status.values()) == {SKIPPED}


@pytest.mark.lab
def test_lab_preflight_looks_inside_the_namespace(labcfg, tmp_path):
    """feed-a exists only in the appliance namespace: its sysfs (RPS/XPS), its
    per-interface sysctl and ethtool are all read there."""
    path = write_config(labcfg, tmp_path / "lab.toml")
    ifname = labcfg.lab.line_a.appliance_if
    with open(path, "a") as f:
        f.write(
            f'[host]\nrequired = ["nic"]\nrps_mask = "0"\nxps_mask = "00000000"\n'
            f'offloads_off = ["rx-checksumming", "generic-segmentation-offload"]\n'
            f'[host.sysctl]\n"net.ipv4.conf.{ifname}.rp_filter" = 0\n'
        )
    done = _tickwire("preflight", "--config", path, "--lab", "--json")
    assert done.returncode == 1, done.stdout + done.stderr
    doc = json.loads(done.stdout)
    stages = {s["stage"]: s for s in doc["stages"]}
    assert doc["ready"] is False and stages["runtime"]["status"] == OK
    assert stages["irq_affinity"]["status"] == OK and stages["sysctl"]["status"] == OK
    assert stages["nic"]["status"] == NOT_CONFIGURED and stages["nic"]["required"] is True
    assert {(c["name"], c["have"]) for c in stages["nic"]["checks"]} >= {
        (f"{ifname} rx-checksumming", "on"),
        (f"{ifname} generic-segmentation-offload", "on"),
    }
    # GRO is already off on a fresh veth: one promise kept of three
    text = (
        open(path)
        .read()
        .replace(
            '"generic-segmentation-offload"',
            '"generic-segmentation-offload", "generic-receive-offload"',
        )
    )
    Path(path).write_text(text)
    done = _tickwire("preflight", "--config", path, "--lab", "--stage", "nic")
    assert done.returncode == 1 and done.stdout.startswith("PARTIAL         nic")
    assert f"{ifname} generic-segmentation-offload: have on; want off" in done.stdout


@pytest.fixture
def channel(request):
    """A channel name of this test's own; its shared memory is removed afterwards."""
    from dataplane import shm

    name = f"pf{request.node.name[9:12]}{os.getpid()}"
    yield name
    shm.remove(name)


@pytest.mark.lab
def test_run_refuses_a_failing_required_stage(labcfg, tmp_path, channel):
    path = write_config(labcfg, tmp_path / "run.toml")
    with open(path, "a") as f:
        f.write(
            f'[run]\nchannel = "{channel}"\nmetrics = ""\n'
            '[host]\nrequired = ["nic"]\noffloads_off = ["rx-checksumming"]\n'
        )
    done = _tickwire("run", "--config", path, "--lab", "--mode", "socket", "--duration", "1")
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and "nic NOT CONFIGURED" in done.stderr
    assert "rx-checksumming: on" in done.stderr and "--skip-preflight" in done.stderr
    done = _tickwire(
        "run",
        "--config",
        path,
        "--lab",
        "--mode",
        "socket",
        "--duration",
        "1",
        "--json",
        "--skip-preflight",
    )
    assert done.returncode == 0, done.stderr
    assert "preflight skipped" in done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1])["mode"] == "socket"


@pytest.mark.lab
def test_run_logs_the_preflight_summary(labcfg, tmp_path, channel):
    path = write_config(labcfg, tmp_path / "run.toml")
    with open(path, "a") as f:
        f.write(f'[run]\nchannel = "{channel}"\nmetrics = ""\n')
    done = _tickwire(
        "run", "--config", path, "--lab", "--mode", "socket", "--duration", "1", "--json"
    )
    assert done.returncode == 0, done.stderr
    assert "tickwire run: preflight: host ready (1 OK, 7 SKIPPED)" in done.stderr
