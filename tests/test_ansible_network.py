"""The network roles, ``nic`` and ``irq_affinity`` (ansible/roles/), applied for real.

Unit tier (no root): the roles' modules against a simulated ntuple-capable NIC (the paths
a veth cannot take: combined channels, rings, ntuple rules added, kept and replaced) and
IRQ discovery against fake sysfs/procfs trees in each driver's naming.

Lab tier (root, a private netns lab): ``provision.yml --tags network`` runs inside the
lab's appliance namespace against its veths (``ip netns exec NS ansible-playbook -c
local``), twice: the first run changes things and the second changes nothing; the
namespace then holds the channels, offloads and RPS/XPS masks the variables asked for;
veth's refusal of ntuple is a clear warning, or a clear failure when ntuple is required;
the boot-time re-apply scripts the roles install restore drifted settings; and ``tickwire
preflight`` reports the nic and irq_affinity stages not OK before and OK after. Nothing
outside the lab namespace is touched: the roles' install paths point into the test's
temporary directory, no packages are installed, irqbalance is left alone.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.labnet import built, private_lab

ROOT = Path(__file__).resolve().parents[1]
ANSIBLE = ROOT / "ansible"
VENV_BIN = Path(sys.executable).parent
PLAYBOOK = VENV_BIN / "ansible-playbook"
TICKWIRE = VENV_BIN / "tickwire"

OFFLOADS_OFF = [
    "generic-receive-offload",
    "large-receive-offload",
    "rx-gro-hw",
    "rx-gro-list",
    "rx-udp-gro-forwarding",
]


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


nicmod = _load("tickwire_nic", ANSIBLE / "roles/nic/library/tickwire_nic.py")
irqmod = _load("tickwire_irq", ANSIBLE / "roles/irq_affinity/library/tickwire_irq.py")


# --- unit: the nic module against a simulated NIC ---------------------------------------------
class FakeNic:
    """ethtool's view of an ntuple-capable NIC with combined channels (an ixgbe-like one)."""

    def __init__(self):
        self.combined, self.combined_max = 8, 16
        self.rings = {"rx": 512, "tx": 512}
        self.features = {
            "generic-receive-offload": [True, False],
            "large-receive-offload": [False, True],
            "rx-gro-hw": [True, True],
            "ntuple-filters": [False, False],
        }
        self.rules: dict[int, tuple[str, int, int]] = {}
        self.writes: list[list[str]] = []

    def __call__(self, argv):
        flag, args = argv[1], argv[3:]
        if flag == "-l":
            return (
                0,
                (
                    f"Channel parameters for x:\nPre-set maximums:\nRX:\t\tn/a\nTX:\t\tn/a\n"
                    f"Other:\t\t1\nCombined:\t{self.combined_max}\nCurrent hardware "
                    f"settings:\nRX:\t\tn/a\nTX:\t\tn/a\nOther:\t\t1\nCombined:\t"
                    f"{self.combined}\n"
                ),
                "",
            )
        if flag == "-g":
            return (
                0,
                (
                    "Ring parameters for x:\nPre-set maximums:\nRX:\t\t4096\nRX Mini:\tn/a\n"
                    "RX Jumbo:\tn/a\nTX:\t\t4096\nCurrent hardware settings:\n"
                    f"RX:\t\t{self.rings['rx']}\nRX Mini:\tn/a\nRX Jumbo:\tn/a\n"
                    f"TX:\t\t{self.rings['tx']}\n"
                ),
                "",
            )
        if flag == "-k":
            return (
                0,
                "Features for x:\n"
                + "".join(
                    f"{n}: {'on' if on else 'off'}{' [fixed]' if fixed else ''}\n"
                    for n, (on, fixed) in self.features.items()
                ),
                "",
            )
        if flag == "-n":
            text = f"16 RX rings available\nTotal {len(self.rules)} rules\n\n"
            for loc, (ip, port, q) in sorted(self.rules.items()):
                text += (
                    f"Filter: {loc}\n\tRule Type: UDP over IPv4\n\tSrc IP addr: 0.0.0.0 "
                    f"mask: 255.255.255.255\n\tDest IP addr: {ip} mask: 0.0.0.0\n\tTOS: "
                    f"0x0 mask: 0xff\n\tSrc port: 0 mask: 0xffff\n\tDest port: {port} "
                    f"mask: 0x0\n\tAction: Direct to queue {q}\n\n"
                )
            return 0, text, ""
        self.writes.append(argv[1:])
        if flag == "-L":
            self.combined = int(args[1])
        elif flag == "-G":
            for kind, n in zip(args[::2], args[1::2], strict=True):
                self.rings[kind] = int(n)
        elif flag == "-K":
            for name, value in zip(args[::2], args[1::2], strict=True):
                if not self.features[name][1]:
                    self.features[name][0] = value == "on"
        elif flag == "-N" and args[0] == "delete":
            del self.rules[int(args[1])]
        elif flag == "-N":
            if not self.features["ntuple-filters"][0]:
                return 1, "", "rmgr: Cannot insert RX class rule: Operation not supported"
            loc = min(self.rules, default=1024) - 1
            self.rules[loc] = (args[3], int(args[5]), int(args[7]))
        return 0, "", ""


def _nic_params(**kw):
    p = {
        "interface": "lo",
        "channels": 4,
        "rx_ring": 2048,
        "tx_ring": 0,
        "offloads_off": [
            "generic-receive-offload",
            "large-receive-offload",
            "rx-gro-hw",
            "no-such-offload",
        ],
        "ntuple": True,
        "ntuple_required": True,
        "flows": [
            {"group": "233.54.12.1", "port": 26477, "queue": 2},
            {"group": "233.54.12.2", "port": 26478, "queue": 3},
        ],
    }
    p.update(kw)
    return p


def test_nic_module_sets_what_differs_then_nothing():
    nic = FakeNic()
    nic.rules[1023] = ("233.54.12.2", 26478, 0)  # steers line B to the wrong queue
    first = nicmod.apply(_nic_params(), nic, check=False)
    assert first["changed"] and first["ntuple_status"] == "installed"
    assert ["-L", "lo", "combined", "4"] in nic.writes and ["-G", "lo", "rx", "2048"] in nic.writes
    assert ["-K", "lo", "generic-receive-offload", "off"] in nic.writes
    assert ["-N", "lo", "delete", "1023"] in nic.writes
    assert sorted(nic.rules.values()) == [("233.54.12.1", 26477, 2), ("233.54.12.2", 26478, 3)]
    assert first["offloads_fixed"] == {"large-receive-offload": "off", "rx-gro-hw": "on"}
    assert first["offloads_absent"] == ["no-such-offload"]
    assert any("rx-gro-hw is on and fixed" in w for w in first["warnings"])
    nic.writes.clear()
    second = nicmod.apply(_nic_params(), nic, check=False)
    assert not second["changed"] and second["changes"] == [] and nic.writes == []


def test_nic_module_check_mode_writes_nothing():
    nic = FakeNic()
    res = nicmod.apply(_nic_params(), nic, check=True)
    assert res["changed"] and nic.writes == []


def test_nic_module_names_what_the_nic_cannot_take():
    nic = FakeNic()
    with pytest.raises(
        nicmod.NicError, match="nic_channels=32 is above the NIC's maximum of 16 combined"
    ):
        nicmod.apply(_nic_params(channels=32), nic, check=False)
    nic.features["ntuple-filters"] = [False, True]
    with pytest.raises(
        nicmod.NicError,
        match=r"lo refuses ntuple flow steering \(ntuple-filters: "
        r"off \[fixed\]\).*nic_ntuple_required is true",
    ):
        nicmod.apply(_nic_params(), nic, check=False)
    res = nicmod.apply(_nic_params(ntuple_required=False), nic, check=False)
    assert res["ntuple_status"] == "refused" and "lo refuses ntuple" in res["ntuple_message"]
    with pytest.raises(nicmod.NicError, match="nic_flows"):
        nicmod.apply(
            _nic_params(flows=[{"group": "not-an-ip", "port": 1, "queue": 0}]), nic, check=False
        )


# --- unit: IRQ discovery in each driver's naming ----------------------------------------------
INTERRUPTS = """\
  CPU0  CPU1  CPU2  CPU3
  24:  1  0  0  0  IO-APIC  5-edge  ACPI:Ged
 100:  0  0  0  0  IR-PCI-MSIX-0000:3b:00.0  0-edge  i40e-0000:3b:00.0:misc
 101:  900  0  0  0  IR-PCI-MSIX-0000:3b:00.0  1-edge  i40e-feed0-TxRx-0
 102:  0  900  0  0  IR-PCI-MSIX-0000:3b:00.0  2-edge  i40e-feed0-TxRx-1
 103:  0  0  900  0  IR-PCI-MSIX-0000:3b:00.0  3-edge  i40e-feed0-TxRx-2
 110:  0  0  0  0  IR-PCI-MSIX-0000:5e:00.0  0-edge  mlx5_async@pci:0000:5e:00.0
 111:  0  0  0  0  IR-PCI-MSIX-0000:5e:00.0  1-edge  mlx5_comp0@pci:0000:5e:00.0
 112:  0  0  0  0  IR-PCI-MSIX-0000:5e:00.0  2-edge  mlx5_comp1@pci:0000:5e:00.0
 120:  0  0  0  0  PCI-MSIX-0000:00:03.0  1-edge  virtio2-input.0
 121:  0  0  0  0  PCI-MSIX-0000:00:03.0  2-edge  virtio2-output.0
 122:  0  0  0  0  PCI-MSIX-0000:00:03.0  3-edge  virtio2-input.1
NMI:  0  0  0  0  Non-maskable interrupts
"""


@pytest.fixture
def fake_host(tmp_path):
    """A sysfs and procfs with an i40e (feed0), an mlx5 (feed1), a virtio-net (eth0) and a
    veth (feed-a), every IRQ on CPU 0-3."""
    sys_root, proc_root = tmp_path / "sys", tmp_path / "proc"
    devices = {
        "feed0": ("pci0000:3a/0000:3b:00.0", range(100, 104), 3),
        "feed1": ("pci0000:5d/0000:5e:00.0", range(110, 113), 2),
        "eth0": ("pci0000:00/0000:00:03.0/virtio2", range(120, 123), 2),
        "feed-a": (None, (), 2),
    }
    for ifname, (dev, irqs, nq) in devices.items():
        net = sys_root / "class/net" / ifname
        for q in range(nq):
            for kind, leaf in (("rx", "rps_cpus"), ("tx", "xps_cpus")):
                (net / "queues" / f"{kind}-{q}").mkdir(parents=True)
                (net / "queues" / f"{kind}-{q}" / leaf).write_text("00000000,00000000\n")
        if dev is None:
            continue
        devdir = sys_root / "devices" / dev
        msi = (devdir.parent if dev.endswith("virtio2") else devdir) / "msi_irqs"
        msi.mkdir(parents=True, exist_ok=True)
        devdir.mkdir(parents=True, exist_ok=True)
        for irq in irqs:
            (msi / str(irq)).write_text("msix\n")
        (net / "device").symlink_to(devdir)
    for line in INTERRUPTS.splitlines()[1:]:
        head = line.split(":")[0].strip()
        if head.isdigit():
            (proc_root / "irq" / head).mkdir(parents=True)
            (proc_root / "irq" / head / "smp_affinity_list").write_text("0-3\n")
    (proc_root / "interrupts").write_text(INTERRUPTS)
    return str(sys_root), str(proc_root)


@pytest.mark.parametrize(
    ("ifname", "queues", "want"),
    [
        ("feed0", [0, 2], {0: [(101, "i40e-feed0-TxRx-0")], 2: [(103, "i40e-feed0-TxRx-2")]}),
        ("feed1", [1], {1: [(112, "mlx5_comp1@pci:0000:5e:00.0")]}),
        ("eth0", [0], {0: [(120, "virtio2-input.0"), (121, "virtio2-output.0")]}),
    ],
)
def test_queue_irqs_are_found_in_each_drivers_naming(fake_host, ifname, queues, want):
    found, seen = irqmod.queue_irqs(ifname, queues, *fake_host)
    assert found == want and seen


def test_irq_module_places_queues_then_changes_nothing(fake_host):
    sys_root, proc_root = fake_host
    p = {
        "interface": "feed0",
        "queues": [{"queue": 0, "cpu": 2}, {"queue": 1, "cpu": 3}],
        "placement": "consumer",
        "rps_mask": "0",
        "xps_mask": "c",
        "sys_root": sys_root,
        "proc_root": proc_root,
    }
    res = irqmod.apply(p, check=False)
    assert res["changed"] and {(i["irq"], i["cpus"]) for i in res["irqs"]} == {
        (101, "2"),
        (102, "3"),
    }
    assert Path(proc_root, "irq/101/smp_affinity_list").read_text().strip() == "2"
    assert Path(proc_root, "irq/103/smp_affinity_list").read_text().strip() == "0-3"  # not listed
    assert Path(sys_root, "class/net/feed0/queues/tx-2/xps_cpus").read_text().strip() == "c"
    assert not irqmod.apply(p, check=False)["changed"]
    hk = dict(p, placement="housekeeping", housekeeping_cpus="0-1")
    assert irqmod.apply(hk, check=True)["changed"]
    assert Path(proc_root, "irq/101/smp_affinity_list").read_text().strip() == "2"  # check mode
    irqmod.apply(hk, check=False)
    assert Path(proc_root, "irq/102/smp_affinity_list").read_text().strip() == "0-1"


def test_irq_module_reports_veth_and_names_unknown_irqs(fake_host):
    sys_root, proc_root = fake_host
    res = irqmod.apply(
        {
            "interface": "feed-a",
            "queues": [{"queue": 0, "cpu": 1}],
            "rps_mask": "1",
            "sys_root": sys_root,
            "proc_root": proc_root,
        },
        check=False,
    )
    assert res["irqs"] == [] and "feed-a is a virtual interface" in res["notes"][0]
    with pytest.raises(
        irqmod.IrqError,
        match=r"feed1: no IRQ found for queue\(s\) 5; the "
        r"device's IRQs are named: mlx5_async@pci:0000:5e:00.0, mlx5_comp0",
    ):
        irqmod.apply(
            {
                "interface": "feed1",
                "queues": [{"queue": 5, "cpu": 1}],
                "sys_root": sys_root,
                "proc_root": proc_root,
            },
            check=False,
        )


def test_irq_discovery_on_this_hosts_own_nic():
    """Read-only: the first interface of this host with a PCI device and MSI vectors."""
    for ifname in sorted(os.listdir("/sys/class/net")):
        found = irqmod.device_irqs(ifname, "/sys")
        if found and found[1]:
            break
    else:
        pytest.skip("no network interface with MSI vectors in /sys/class/net")
    by_queue, seen = irqmod.queue_irqs(ifname, [0], "/sys", "/proc")
    assert by_queue[0], f"{ifname}: no IRQ recognised for queue 0 among {seen}"


# --- lab: the playbook for real in a namespace -------------------------------------------------
def _ns_run(ns: str, argv: list, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["ip", "netns", "exec", ns, *map(str, argv)],
        capture_output=True,
        text=True,
        timeout=300,
        **kw,
    )


def _ns_read(ns: str, path: str) -> str:
    return _ns_run(ns, ["cat", path]).stdout.strip()


class Provision:
    """Runs ``provision.yml --tags network`` in the lab's appliance namespace."""

    def __init__(self, cfg, tmp: Path):
        self.ns, self.tmp = cfg.lab.appliance_ns, tmp
        ncpu = os.cpu_count() or 1
        self.cpu = 1 if ncpu > 1 else 0
        self.inventory = tmp / "inventory.yml"
        self.inventory.write_text(
            json.dumps(
                {
                    "tickwire": {
                        "hosts": {
                            "localhost": {
                                "ansible_connection": "local",
                                "ansible_python_interpreter": sys.executable,
                                "ansible_become": False,
                            }
                        }
                    }
                }
            )
        )
        lines = cfg.lab.lines
        self.vars = {
            "nic_interfaces": ["feed-a", "feed-b"],
            "nic_channels": 2,
            "nic_offloads_off": OFFLOADS_OFF,
            "nic_ntuple": True,
            "nic_ntuple_required": False,
            "nic_flows": [
                {
                    "interface": "feed-a",
                    "group": lines["A"].group,
                    "port": lines["A"].port,
                    "queue": 0,
                },
                {
                    "interface": "feed-b",
                    "group": lines["B"].group,
                    "port": lines["B"].port,
                    "queue": 1,
                },
            ],
            "nic_packages": [],
            "nic_persist_script": str(tmp / "libexec/tickwire_nic.py"),
            "nic_persist_config": str(tmp / "etc/nic.json"),
            "nic_persist_unit_dir": str(tmp / "units"),
            "irq_affinity_queues": [
                {"interface": "feed-a", "queue": 0, "cpu": self.cpu},
                {"interface": "feed-b", "queue": 1, "cpu": self.cpu},
            ],
            "irq_affinity_placement": "consumer",
            "irq_affinity_rps_mask": "1",
            "irq_affinity_xps_mask": "1",
            "irq_affinity_disable_irqbalance": False,
            "irq_affinity_persist_script": str(tmp / "libexec/tickwire_irq.py"),
            "irq_affinity_persist_config": str(tmp / "etc/irq_affinity.json"),
            "irq_affinity_persist_unit_dir": str(tmp / "units"),
        }

    def run(self, *flags: str, **overrides) -> tuple[subprocess.CompletedProcess, dict, float]:
        varfile = self.tmp / "vars.json"
        varfile.write_text(json.dumps(dict(self.vars, **overrides)))
        env = dict(
            os.environ,
            ANSIBLE_STDOUT_CALLBACK="json",
            ANSIBLE_NOCOLOR="1",
            ANSIBLE_HOME=str(self.tmp / "ansible-home"),
            ANSIBLE_LOCAL_TEMP=str(self.tmp / "ansible-tmp"),
            ANSIBLE_REMOTE_TEMP=str(self.tmp / "ansible-tmp"),
            ANSIBLE_RETRY_FILES_ENABLED="0",
            ANSIBLE_PYTHON_INTERPRETER=sys.executable,
        )
        t0 = time.monotonic()
        done = _ns_run(
            self.ns,
            [
                PLAYBOOK,
                "-i",
                self.inventory,
                "provision.yml",
                "--tags",
                "network",
                "-e",
                f"@{varfile}",
                *flags,
            ],
            cwd=ANSIBLE,
            env=env,
        )
        took = time.monotonic() - t0
        try:
            out = json.loads(done.stdout[done.stdout.index("{") :])
        except ValueError:
            raise AssertionError(
                f"no JSON from ansible-playbook:\n{done.stdout}\n{done.stderr}"
            ) from None
        return done, out, took


def _stats(out: dict) -> dict:
    return out["stats"]["localhost"]


def _task(out: dict, name: str) -> dict:
    for play in out["plays"]:
        for task in play["tasks"]:
            if task["task"]["name"].split(" : ", 1)[-1] == name:
                return task["hosts"]["localhost"]
    raise AssertionError(f"no task {name!r} in the run")


TUNE = "Tune each feed interface (channels, rings, offloads, flow rules)"


def _preflight(cfg_path: Path, ns: str, *stages: str) -> dict:
    args = [TICKWIRE, "preflight", "--config", cfg_path, "--json"]
    for s in stages:
        args += ["--stage", s]
    done = _ns_run(ns, args)
    assert done.stdout.strip(), done.stderr
    return json.loads(done.stdout)


def _stage(report: dict, name: str) -> dict:
    return next(s for s in report["stages"] if s["stage"] == name)


def _host_config(cfg, path: Path, cpu: int) -> Path:
    """A config whose [run] is the lab's two lines and whose [host] promises what the
    playbook's variables applied (isolated_cpus only so that preflight checks the queues'
    IRQ placement, which on a veth is "no device IRQs")."""
    a, b = cfg.lab.line_a, cfg.lab.line_b
    offloads = ", ".join(f'"{n}"' for n in OFFLOADS_OFF)
    path.write_text(f"""\
[lab]
prefix = "{cfg.lab.prefix}"
queues = {cfg.lab.queues}

[run]
netns = "{cfg.lab.appliance_ns}"
core = {cpu}

[run.line_a]
interface = "{a.appliance_if}"
queue = 0
group = "{a.group}"
port = {a.port}

[run.line_b]
interface = "{b.appliance_if}"
queue = 1
group = "{b.group}"
port = {b.port}

[host]
isolated_cpus = "{cpu}"
irq_placement = "consumer"
rps_mask = "1"
xps_mask = "1"
channels = 2
offloads_off = [{offloads}]
ntuple = false
""")
    return path


@pytest.fixture(scope="module")
def applied(tmp_path_factory):
    """The lab, the preflight before provisioning, and the playbook run twice."""
    if shutil.which("ethtool") is None or not PLAYBOOK.exists():
        pytest.skip("needs ethtool and ansible-playbook (pip install -e .[provision])")
    tmp = tmp_path_factory.mktemp("network")
    cfg = private_lab("ans", queues=4)
    with built(cfg):
        ns = cfg.lab.appliance_ns
        for ifname in ("feed-a", "feed-b"):  # a real NIC's defaults: receive aggregation on
            done = _ns_run(
                ns, ["ethtool", "-K", ifname, "generic-receive-offload", "on", "rx-gro-list", "on"]
            )
            assert done.returncode == 0, done.stderr
        prov = Provision(cfg, tmp)
        host_cfg = _host_config(cfg, tmp / "tickwire.toml", prov.cpu)
        before = _preflight(host_cfg, ns, "nic", "irq_affinity")
        check = prov.run("--check")
        checked = {i: _ns_run(ns, ["ethtool", "-l", i]).stdout for i in ("feed-a", "feed-b")}
        runs = [prov.run(), prov.run()]
        yield {
            "cfg": cfg,
            "ns": ns,
            "prov": prov,
            "runs": runs,
            "before": before,
            "host_cfg": host_cfg,
            "check": check,
            "checked": checked,
        }


@pytest.mark.lab
def test_first_run_changes_and_second_changes_nothing(applied):
    (done1, out1, _), (done2, out2, _) = applied["runs"]
    assert done1.returncode == 0, done1.stdout[-3000:]
    assert _stats(out1)["failures"] == 0 and _stats(out1)["changed"] > 0
    assert done2.returncode == 0, done2.stdout[-3000:]
    changed = [
        t["task"]["name"]
        for p in out2["plays"]
        for t in p["tasks"]
        if t["hosts"].get("localhost", {}).get("changed")
    ]
    assert _stats(out2)["failures"] == 0 and _stats(out2)["changed"] == 0, changed


@pytest.mark.lab
def test_check_mode_reports_changes_and_makes_none(applied):
    done, out, _ = applied["check"]
    assert done.returncode == 0 and _stats(out)["changed"] > 0, done.stdout[-3000:]
    for ifname, text in applied["checked"].items():
        assert nicmod.parse_channels(text)["current"]["rx"] == 4, ifname
    tune = _task(out, TUNE)
    assert any("rx channels 4 -> 2" in c for item in tune["results"] for c in item["changes"])


@pytest.mark.lab
def test_the_namespace_holds_what_the_variables_asked_for(applied):
    ns = applied["ns"]
    for ifname in ("feed-a", "feed-b"):
        feats = nicmod.parse_features(_ns_run(ns, ["ethtool", "-k", ifname]).stdout)
        assert not any(feats[n][0] for n in OFFLOADS_OFF), {n: feats[n] for n in OFFLOADS_OFF}
        ch = nicmod.parse_channels(_ns_run(ns, ["ethtool", "-l", ifname]).stdout)
        assert ch["current"]["rx"] == 2 and ch["current"]["tx"] == 2 and ch["max"]["rx"] == 4
        queues = _ns_run(ns, ["ls", f"/sys/class/net/{ifname}/queues"]).stdout.split()
        assert queues == ["rx-0", "rx-1", "tx-0", "tx-1"]
        for q in (0, 1):
            base = f"/sys/class/net/{ifname}/queues"
            assert irqmod.mask_value(_ns_read(ns, f"{base}/rx-{q}/rps_cpus")) == 1
            assert irqmod.mask_value(_ns_read(ns, f"{base}/tx-{q}/xps_cpus")) == 1
    # the root namespace's /sys shows no feed-a: the test ran nothing outside the lab
    assert not os.path.exists("/sys/class/net/feed-a")


@pytest.mark.lab
def test_veth_refusing_ntuple_is_a_clear_warning(applied):
    _, out1, _ = applied["runs"][0]
    tune = _task(out1, TUNE)
    for item in tune["results"]:
        assert item["ntuple_status"] == "refused", item
        assert any(
            f"{item['item']} refuses ntuple flow steering (ntuple-filters: off [fixed])" in w
            and "continuing without it" in w
            for w in tune["warnings"]
        ), tune["warnings"]
        assert item["offloads_fixed"]["large-receive-offload"] == "off"
    active = _task(out1, "Record whether the flow-steering rules are in place")
    assert active["ansible_facts"]["nic_ntuple_active"] is False
    irq = _task(out1, "Place each feed queue's IRQs and set the RPS/XPS masks")
    for item in irq["results"]:
        assert (
            f"{item['item']} is a virtual interface (no device): it has no IRQs" in item["notes"][0]
        )


@pytest.mark.lab
def test_veth_refusing_required_ntuple_fails_clearly(applied):
    done, out, _ = applied["prov"].run(nic_ntuple_required=True)
    assert done.returncode != 0 and _stats(out)["failures"] == 1
    msgs = [item.get("msg", "") for item in _task(out, TUNE)["results"]]
    assert all(
        "ntuple flow steering refused: " in m
        and "refuses ntuple flow steering" in m
        and "nic_ntuple_required is true" in m
        for m in msgs
    ), msgs


@pytest.mark.lab
def test_boot_scripts_restore_drifted_settings(applied):
    """What the roles installed for boot (script, settings; unit) puts back a driver reset."""
    ns, tmp = applied["ns"], applied["prov"].tmp
    units = tmp / "units"
    for unit in ("tickwire-nic.service", "tickwire-irq-affinity.service"):
        text = (units / unit).read_text()
        assert text.startswith("#") and "--boot" in text
        assert r"sys-subsystem-net-devices-feed\x2da.device" in text
        assert (units / "multi-user.target.wants" / unit).resolve() == units / unit
    # drift: a reset NIC comes back with aggregation on, all queues, RPS off
    assert _ns_run(ns, ["ethtool", "-K", "feed-a", "generic-receive-offload", "on"]).returncode == 0
    assert _ns_run(ns, ["ethtool", "-L", "feed-b", "rx", "4", "tx", "4"]).returncode == 0
    _ns_run(ns, ["sh", "-c", "echo 0 > /sys/class/net/feed-a/queues/rx-1/rps_cpus"])
    for script, conf in (("tickwire_nic.py", "nic.json"), ("tickwire_irq.py", "irq_affinity.json")):
        done = _ns_run(ns, [sys.executable, tmp / "libexec" / script, "--boot", tmp / "etc" / conf])
        assert done.returncode == 0, done.stderr
        assert re.search(r"(offloads off|channels|rps_cpus)", done.stdout), done.stdout
    feats = nicmod.parse_features(_ns_run(ns, ["ethtool", "-k", "feed-a"]).stdout)
    assert feats["generic-receive-offload"][0] is False
    channels = nicmod.parse_channels(_ns_run(ns, ["ethtool", "-l", "feed-b"]).stdout)
    assert channels["current"]["rx"] == 2
    assert irqmod.mask_value(_ns_read(ns, "/sys/class/net/feed-a/queues/rx-1/rps_cpus")) == 1
    done, out, _ = applied["prov"].run()  # and Ansible agrees nothing is left to do
    assert done.returncode == 0 and _stats(out)["changed"] == 0


@pytest.mark.lab
def test_preflight_is_not_ok_before_and_ok_after(applied):
    before = applied["before"]
    for stage in ("nic", "irq_affinity"):
        assert _stage(before, stage)["status"] != "OK", _stage(before, stage)
    after = _preflight(applied["host_cfg"], applied["ns"], "nic", "irq_affinity")
    for stage in ("nic", "irq_affinity"):
        assert _stage(after, stage)["status"] == "OK", _stage(after, stage)
