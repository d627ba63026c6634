"""Provisioning (``ansible/``): lint, syntax, documentation, and a real apply.

The unprivileged tests run ``ansible-lint`` (profile production, offline) over the whole
tree, ``ansible-playbook --syntax-check`` on ``provision.yml`` with the example inventory,
and check the house rules a linter does not know: every public variable a role reads is
prefixed with its name and has a default, every default is summarised in
``ansible/README.md``, every template starts with the ``ansible_managed`` header.

The privileged test applies ``provision.yml`` for real, twice, over
``community.general.chroot`` to a Debian bookworm root made with debootstrap -- the way the
image is built -- with the example inventory (``--skip-tags network``: the feed interfaces
are not in a chroot). The root is the appliance image's (``host.image.debian``),
debootstrapped once and cached under ``~/.cache/tickwire/`` (keyed by suite, variant,
mirror and package list); each run works on a fresh copy, with only ``/proc`` mounted,
always unmounted in teardown. The first apply must
change things and fail nothing, the second must change nothing; then the files the roles
wrote are checked against the inventory, partly with the preflight's own parsers, and the
installed appliance runs inside the root (``tickwire --help``, ``tickwire preflight
--stage service``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from host import config
from host.appliance import preflight
from host.image import build as imagebuild
from host.image import debian
from tests.capabilities import MIRROR

REPO = Path(__file__).resolve().parents[1]
ANSIBLE = REPO / "ansible"
BIN = Path(sys.executable).parent
INVENTORY = ANSIBLE / "inventory" / "example.yml"
MY_ROLES = ("hugepages", "cpu_isolation", "sysctl", "ptp", "tickwire")


def _env(**extra: str) -> dict[str, str]:
    env = dict(
        os.environ,
        PATH=f"{BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}",
        ANSIBLE_NOCOLOR="1",
        ANSIBLE_FORCE_COLOR="0",
        PY_COLORS="0",
    )
    env.update(extra)
    return env


def _run(argv: list[str], timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kw)


def _roles() -> list[Path]:
    return sorted(p for p in (ANSIBLE / "roles").iterdir() if (p / "tasks").is_dir())


def _inventory_host() -> dict:
    return yaml.safe_load(INVENTORY.read_text())["tickwire"]["hosts"]["feed1"]


def _defaults(role: str) -> dict:
    return yaml.safe_load((ANSIBLE / "roles" / role / "defaults" / "main.yml").read_text()) or {}


# --- unprivileged ---------------------------------------------------------------------------
def test_syntax_check():
    r = _run(
        [str(BIN / "ansible-playbook"), "-i", str(INVENTORY), "provision.yml", "--syntax-check"],
        cwd=ANSIBLE,
        env=_env(),
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_lint_production_profile():
    r = _run(
        [str(BIN / "ansible-lint"), "--offline", "--profile", "production"],
        cwd=ANSIBLE,
        env=_env(ANSIBLE_LINT_SKIP_SCHEMA_UPDATE="1", NO_COLOR="1"),
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Profile 'production' was required, and it passed" in r.stdout + r.stderr


def test_roles_present_and_played():
    play = yaml.safe_load((ANSIBLE / "provision.yml").read_text())[0]
    played = {r["role"]: set(r["tags"]) for r in play["roles"]}
    for role in MY_ROLES:
        assert (ANSIBLE / "roles" / role / "defaults" / "main.yml").is_file(), role
        assert {role, "host"} <= played[role]
    final = play["post_tasks"][-1]
    assert final["ansible.builtin.import_role"] == {"name": "tickwire", "tasks_from": "preflight"}


_VAR = re.compile(r"\b([a-z][a-z0-9]*(?:_[a-z0-9]+)+)\b")


def test_public_variables_prefixed_and_defaulted():
    """A role's own variables (``<role>_...``) that its tasks, handlers and templates read
    all have a default; every default carries the role's prefix and a comment above it."""
    for path in _roles():
        role = path.name
        defaults = _defaults(role)
        for name in defaults:
            assert name.startswith(role + "_"), f"{role}: {name} lacks the {role}_ prefix"
        text = (path / "defaults" / "main.yml").read_text().splitlines()
        for i, line in enumerate(text):
            m = re.match(r"^([a-z][a-z0-9_]*):", line)
            if m:
                above = [t for t in text[max(0, i - 3) : i] if t.strip()]
                assert above and (
                    above[-1].lstrip().startswith("#") or re.match(r"^[a-z][a-z0-9_]*:", above[-1])
                ), f"{role}: {m.group(1)} has no comment above it"
        if role not in MY_ROLES:
            continue
        used: set[str] = set()
        for sub in ("tasks", "handlers", "templates"):
            for f in (path / sub).glob("*"):
                for line in f.read_text().splitlines():
                    line = re.sub(r"^\s*-?\s*[a-z_0-9]+:", "", line)  # a YAML key (module option)
                    used |= {v for v in _VAR.findall(line) if v.startswith(role + "_")}
        missing = sorted(v for v in used if v not in defaults)
        assert not missing, f"{role}: read without a default: {missing}"


def test_readme_summarises_every_variable():
    readme = (ANSIBLE / "README.md").read_text()
    for path in _roles():
        for name in _defaults(path.name):
            assert f"`{name}`" in readme, f"ansible/README.md does not mention {name}"


def _booted_decision(role: str) -> list[dict]:
    """The one rule every role decides "booted host or image root" by, with its facts
    prefixed by the role's name: an image root is what Ansible reports as a chroot; a
    booted host is one systemd runs (sd_booted(3): /run/systemd/system exists) that is
    not an image root."""
    p = f"__{role}_"
    return [
        {
            "name": "Find out whether the target is an image root (a chroot)",
            "ansible.builtin.setup": {"gather_subset": ["!all", "!min", "chroot"]},
            "when": "ansible_facts.is_chroot is not defined",
        },
        {
            "name": "Find out whether systemd runs the target",
            "ansible.builtin.stat": {"path": "/run/systemd/system"},
            "register": f"{p}systemd_dir",
        },
        {
            "name": "Remember whether the target is an image root and whether it is booted",
            "ansible.builtin.set_fact": {
                f"{p}image_root": "{{ ansible_facts.is_chroot | bool }}",
                f"{p}booted": (
                    f"{{{{ {p}systemd_dir.stat.exists and not (ansible_facts.is_chroot | bool) }}}}"
                ),
            },
        },
    ]


def _tasks(items: list | None):
    for task in items or []:
        yield task
        for key in ("block", "rescue", "always"):
            yield from _tasks(task.get(key))


_BOOT_FACT = re.compile(r"(booted|image_root)$")
_BOOT_SIGNS = re.compile(r"is_chroot|service_mgr|/run/systemd/system")


def test_every_role_decides_booted_by_the_same_rule():
    """Each role (and the tickwire role's preflight entry point) runs the same three tasks
    to decide; everything else reads only the facts they set, never the signs themselves."""
    for path in _roles():
        role, rule = path.name, _booted_decision(path.name)
        facts = set(rule[2]["ansible.builtin.set_fact"])
        for sub in ("tasks", "handlers"):
            for f in sorted((path / sub).glob("*.yml")):
                where = f"{role}/{sub}/{f.name}"
                tasks = list(_tasks(yaml.safe_load(f.read_text())))
                deciding = [t for t in tasks if t in rule]
                if sub == "tasks" and (f.name == "main.yml" or deciding):
                    assert deciding == rule, f"{where} does not decide by the rule"
                for t in tasks:
                    if t in rule:
                        continue
                    t = {k: v for k, v in t.items() if k not in ("block", "rescue", "always")}
                    for name in [*t.get("ansible.builtin.set_fact", {}), *t.get("vars", {})]:
                        assert not _BOOT_FACT.search(name), f"{where}: {t['name']} sets {name}"
                    text = yaml.safe_dump(t)
                    signs = set(_BOOT_SIGNS.findall(text))
                    assert not signs, f"{where}: {t['name']} decides by {signs} itself"
                    used = set(re.findall(r"\b__[a-z_]+_(?:booted|image_root)\b", text))
                    assert used <= facts, f"{where}: {t['name']} reads {used - facts}"
        for tpl in (path / "templates").glob("*"):
            signs = set(_BOOT_SIGNS.findall(tpl.read_text()))
            assert not signs, f"{role}/templates/{tpl.name} decides by {signs} itself"


def test_templates_start_with_ansible_managed():
    for tpl in (ANSIBLE / "roles").glob("*/templates/*.j2"):
        lines = tpl.read_text().splitlines()
        first = lines[1] if lines and lines[0].startswith("#!") else lines[0]
        assert first.strip() == "{{ ansible_managed | comment }}", tpl


def _render_config(tmp: Path, **overrides) -> config.Config:
    """The tickwire role's configuration template rendered by Ansible (connection local,
    no root) with every role's defaults under the example inventory's host variables (and
    ``overrides``), loaded as the appliance loads it."""
    hostvars = {}
    for role in _roles():
        hostvars.update(_defaults(role.name))
    hostvars.update(_inventory_host(), **overrides)
    hostvars.update(ansible_connection="local", ansible_python_interpreter=sys.executable)
    inventory = tmp / "inventory.yml"
    inventory.write_text(yaml.safe_dump({"all": {"hosts": {"feed1": hostvars}}}))
    out = tmp / "tickwire.toml"
    template = ANSIBLE / "roles/tickwire/templates/tickwire.toml.j2"
    task = {"ansible.builtin.template": {"src": str(template), "dest": str(out)}}
    play = [{"hosts": "feed1", "gather_facts": False, "tasks": [task]}]
    (tmp / "render.yml").write_text(yaml.safe_dump(play))
    r = _run(
        [str(BIN / "ansible-playbook"), "-i", str(inventory), str(tmp / "render.yml")],
        cwd=ANSIBLE,
        env=_env(),
    )
    assert r.returncode == 0, r.stdout + r.stderr
    return config.load(out)


def test_config_template_passes_the_hugepages_nodes(tmp_path):
    """Preflight checks pages on the nodes the hugepages role reserves them on."""
    cfg = _render_config(tmp_path)
    assert config.cpulist(cfg.host.hugepages_nodes) == set(_inventory_host()["hugepages_nodes"])
    cfg = _render_config(tmp_path, hugepages_nodes=[0, 1, 3])
    assert cfg.host.hugepages_nodes == "0,1,3"


def test_first_boot_role_variables_render_back_to_the_config(tmp_path):
    """The appliance image's first boot turns its tickwire.toml into role variables
    (host.appliance.firstboot.role_variables); the tickwire role's template must render them
    back into the same [run] and [feed] and the [host] promises the file made."""
    from host.appliance import firstboot
    from host.image import boot

    lab = tmp_path / "lab.toml"  # the lab's: [run] options beyond the template's own keys
    lab.write_text(boot.guest_config(boot.lab_config("twvm")))
    got = _render_config(
        tmp_path,
        **firstboot.role_variables(
            config.load(lab), tomllib.loads(lab.read_text()), "w", "generic"
        ),
    )
    assert got.run == config.load(lab).run and got.run.frames == 8192

    example = REPO / "image" / "tickwire.toml.example"
    want = config.load(example)
    raw = tomllib.loads(example.read_text())
    overrides = firstboot.role_variables(want, raw, "/opt/tickwire/dist/t.whl", "native")
    got = _render_config(tmp_path, **overrides)
    assert got.run == want.run and got.feed == want.feed
    for key in (
        "required",
        "hugepages_2m",
        "hugepages_nodes",
        "isolated_cpus",
        "housekeeping_cpus",
        "channels",
        "rx_ring",
        "offloads_off",
        "ntuple",
        "ptp_interfaces",
        "service",
        "irq_placement",
        "rps_mask",
        "xps_mask",
        "ptp_max_offset_ns",
    ):
        assert getattr(got.host, key) == getattr(want.host, key), key


# --- the real apply to an image root -----------------------------------------------------------
def _debootstrap_root() -> Path:
    """The appliance image's cached root (host.image.debian: one debootstrap per machine
    and package list, shared with ``make image``)."""
    try:
        return debian.debootstrap_root(MIRROR)
    except debian.DebianError as e:
        pytest.fail(str(e))


def _mounted_under(path: Path) -> list[str]:
    prefix = str(path.resolve())
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    return [p for p in points if p == prefix or p.startswith(prefix + "/")]


def _build_wheel(out: Path) -> Path:
    return imagebuild.build_wheel(out)


def _wheelhouse(wheel: Path) -> Path:
    return imagebuild.wheelhouse(wheel)


def _playbook(*extra: Path) -> dict:
    r = _run(
        [
            str(BIN / "ansible-playbook"),
            "-i",
            str(INVENTORY),
            "provision.yml",
            *(a for e in extra for a in ("-e", f"@{e}")),
            "--skip-tags",
            "network",
        ],
        cwd=ANSIBLE,
        timeout=420,
        env=_env(ANSIBLE_STDOUT_CALLBACK="json"),
    )
    try:
        out = json.loads(r.stdout)
    except ValueError:
        pytest.fail(
            f"ansible-playbook printed no JSON (rc {r.returncode}):\n"
            f"{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        )
    return out


def _changed_tasks(run: dict) -> list[str]:
    return [
        t["task"]["name"]
        for play in run["plays"]
        for t in play["tasks"]
        if any(h.get("changed") for h in t["hosts"].values())
    ]


def _failed_tasks(run: dict) -> list[str]:
    return [
        f"{t['task']['name']}: {h.get('msg', '')}"
        for play in run["plays"]
        for t in play["tasks"]
        for h in t["hosts"].values()
        if h.get("failed")
    ]


def _messages(run: dict) -> list[str]:
    out = []
    for play in run["plays"]:
        for t in play["tasks"]:
            for h in t["hosts"].values():
                for res in [h, *h.get("results", [])]:
                    if isinstance(res.get("msg"), str) and not res.get("skipped"):
                        out.append(res["msg"])
    return out


HOST_SYSCTLS = ("vm.swappiness", "net.core.busy_poll", "net.core.rmem_max", "vm.stat_interval")


def _host_sysctls() -> dict[str, str]:
    return {n: Path("/proc/sys", *n.split(".")).read_text().strip() for n in HOST_SYSCTLS}


@pytest.fixture(scope="module")
def applied(tmp_path_factory):
    """provision.yml applied twice to a fresh copy of the cached root: root, extra, run1,
    run2, and the build host's sysctls before and after. /proc is the only mount, removed in
    teardown; the copy is deleted after."""
    work = tmp_path_factory.mktemp("provision")
    cached = _debootstrap_root()
    root = work / "root"
    subprocess.run(["cp", "-a", "--reflink=auto", str(cached), str(root)], check=True)
    wheel = _build_wheel(work)
    house = _wheelhouse(wheel)
    extra = imagebuild.chroot_target(
        root, work / "chroot.yml", tickwire_package=str(wheel), tickwire_wheelhouse=str(house)
    )
    before = _host_sysctls()
    subprocess.run(["mount", "-t", "proc", "proc", str(root / "proc")], check=True)
    try:
        run1 = _playbook(extra)
        run2 = _playbook(extra) if not _failed_tasks(run1) else run1
        yield {
            "root": root,
            "extra": extra,
            "run1": run1,
            "run2": run2,
            "host_sysctls": (before, _host_sysctls()),
        }
    finally:
        if _run(["umount", str(root / "proc")]).returncode != 0:
            _run(["umount", "-l", str(root / "proc")])
        left = _mounted_under(root)
        assert not left, f"mounts left under the image root: {left}"
        shutil.rmtree(work, ignore_errors=True)


def _stats(run: dict) -> dict:
    return run["stats"]["feed1"]


# a real apply: root (chroot, mount), debootstrap, and the mirror both it and apt inside the
# root install from; no lab (no namespace is involved)
APPLY = pytest.mark.needs("root", "chroot", "debootstrap", "mirror")


@APPLY
def test_apply_twice_second_run_changes_nothing(applied):
    run1, run2 = applied["run1"], applied["run2"]
    assert not _failed_tasks(run1), _failed_tasks(run1)
    assert _stats(run1)["failures"] == 0 and _stats(run1)["unreachable"] == 0
    assert _stats(run1)["changed"] > 0
    assert not _failed_tasks(run2), _failed_tasks(run2)
    assert _stats(run2)["failures"] == 0
    assert _stats(run2)["changed"] == 0, f"second run changed: {_changed_tasks(run2)}"


@APPLY
def test_apply_never_touches_the_build_hosts_kernel(applied):
    before, after = applied["host_sysctls"]
    assert before == after
    # an image root is never probed, rebooted or started: the roles say so
    text = "\n".join(_messages(applied["run1"]))
    assert "not a booted system (image root)" in text
    assert "eno1: software timestamping (not probed: image root" in text


@APPLY
def test_kernel_command_line(applied):
    inv, root = _inventory_host(), applied["root"]
    params = preflight.parse_grub((root / "etc/default/grub.d/tickwire.cfg").read_text())
    iso = config.cpulist(inv["cpu_isolation_isolated_cpus"])
    hk = config.cpulist(inv["cpu_isolation_housekeeping_cpus"])
    for name in ("isolcpus", "nohz_full", "rcu_nocbs"):
        assert preflight.param_cpus(params[name]) == iso, name
    assert preflight.param_cpus(params["irqaffinity"]) == hk
    assert {"managed_irq", "domain"} <= set(params["isolcpus"].split(","))
    assert params["skew_tick"] == "1" and params["tsc"] == "reliable"
    # the rest of tuned cpu-partitioning's command line
    assert params["rcu_nocb_poll"] == "" and params["nmi_watchdog"] == "0"
    assert preflight.param_cpus(params["kthread_cpus"]) == hk
    assert (
        params["transparent_hugepage"]
        == _defaults("cpu_isolation")["cpu_isolation_transparent_hugepage"]
    )
    hp = preflight.parse_grub((root / "etc/default/grub.d/tickwire-hugepages.cfg").read_text())
    assert hp["hugepagesz"] == "1G"
    assert hp["hugepages"] == ",".join(
        f"{n}:{inv['hugepages_1g_per_node']}" for n in inv["hugepages_nodes"]
    )
    dropin = (root / "etc/systemd/system.conf.d/tickwire-cpu-isolation.conf").read_text()
    unit = preflight.parse_unit([dropin], "Manager")
    assert preflight.param_cpus(unit["CPUAffinity"][0]) == hk


@APPLY
def test_service_unit_least_privilege(applied):
    inv, root = _inventory_host(), applied["root"]
    unit = preflight.parse_unit([(root / "etc/systemd/system/tickwire.service").read_text()])
    six = set(preflight.SERVICE_CAPS)
    assert len(six) == 6
    assert set(unit["AmbientCapabilities"][0].split()) == six
    assert set(unit["CapabilityBoundingSet"][0].split()) == six
    assert unit["User"] == ["tickwire"] and unit["LimitMEMLOCK"] == ["infinity"]
    assert unit["Restart"] == ["on-failure"]
    assert unit["CPUAffinity"] == [str(inv["tickwire_core"])]
    assert unit["ExecStart"] == [
        "/opt/tickwire/venv/bin/tickwire run --config /etc/tickwire/tickwire.toml"
    ]
    assert (root / "etc/systemd/system/multi-user.target.wants/tickwire.service").is_symlink()
    passwd = (root / "etc/passwd").read_text()
    m = re.search(r"^tickwire:x:(\d+):(\d+):.*:/usr/sbin/nologin$", passwd, re.M)
    assert m
    # the service user owns the shared-memory root at every boot (tmpfiles.d), so it can
    # create its channel without root
    r = _run(["chroot", str(root), "systemd-tmpfiles", "--create", "/etc/tmpfiles.d/tickwire.conf"])
    assert r.returncode == 0, r.stdout + r.stderr
    st = (root / "dev/shm/tickwire").stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (int(m[1]), int(m[2]), 0o755)


@APPLY
def test_sysctl_file_holds_the_settings(applied):
    root = applied["root"]
    want = {**_defaults("sysctl")["sysctl_settings"], **_inventory_host()["sysctl_extra_settings"]}
    lines = (root / "etc/sysctl.d/90-tickwire.conf").read_text().splitlines()
    have = dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))
    assert {k.strip(): v.strip() for k, v in have.items()} == {k: str(v) for k, v in want.items()}


@APPLY
def test_config_loads_and_matches_the_inventory(applied):
    inv, root = _inventory_host(), applied["root"]
    cfg = config.load(root / "etc/tickwire/tickwire.toml")
    for letter in ("a", "b"):
        line, spec = getattr(cfg.run, f"line_{letter}"), inv[f"tickwire_line_{letter}"]
        assert (line.interface, line.queue, line.group, line.port, line.address) == (
            spec["interface"],
            spec["queue"],
            spec["group"],
            spec["port"],
            spec["address"],
        )
    assert cfg.run.core == inv["tickwire_core"]
    assert (cfg.run.rx_mode, cfg.run.xdp_mode) == (
        inv["tickwire_rx_mode"],
        inv["tickwire_xdp_mode"],
    )
    assert cfg.run.recovery == inv["tickwire_recovery"]
    h = cfg.host
    assert list(h.required) == inv["tickwire_preflight_required"]
    assert (h.hugepages_2m, h.hugepages_1g) == (
        inv["hugepages_2m_per_node"],
        inv["hugepages_1g_per_node"],
    )
    assert config.cpulist(h.hugepages_nodes) == set(inv["hugepages_nodes"])
    assert list(h.hugetlbfs) == [m["path"] for m in inv["hugepages_mounts"]]
    assert h.isolated_cpus == inv["cpu_isolation_isolated_cpus"]
    assert h.housekeeping_cpus == inv["cpu_isolation_housekeeping_cpus"]
    cpu = _defaults("cpu_isolation")
    assert (h.rcu_nocb_poll, h.nmi_watchdog_off, h.ksm_off) == (True, True, True)
    assert h.kthread_cpus == h.workqueue_cpus == inv["cpu_isolation_housekeeping_cpus"]
    assert h.transparent_hugepage == cpu["cpu_isolation_transparent_hugepage"]
    assert h.cpu_governor == cpu["cpu_isolation_cpu_governor"]
    assert h.idle_latency_us == cpu["cpu_isolation_idle_latency_us"]
    assert h.irq_placement == inv["irq_affinity_placement"]
    assert (h.rps_mask, h.xps_mask) == (inv["irq_affinity_rps_mask"], inv["irq_affinity_xps_mask"])
    assert (h.channels, h.rx_ring) == (inv["nic_channels"], inv["nic_rx_ring"])
    assert list(h.offloads_off) == inv["nic_offloads_off"] and h.ntuple is inv["nic_ntuple"]
    assert list(h.ptp_interfaces) == inv["ptp_interfaces"]
    assert h.service == "tickwire.service"
    sysctl = {**_defaults("sysctl")["sysctl_settings"], **inv["sysctl_extra_settings"]}
    assert h.sysctl == sysctl
    mode = (root / "etc/tickwire/tickwire.toml").stat()
    assert oct(mode.st_mode & 0o777) == "0o640"


@APPLY
def test_hugepages_persistence(applied, tmp_path):
    inv, root = _inventory_host(), applied["root"]
    assert (
        root / "etc/systemd/system/sysinit.target.wants/tickwire-hugepages.service"
    ).is_symlink()
    fstab = [
        line.split()
        for line in (root / "etc/fstab").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    gid = next(
        line.split(":")[2]
        for line in (root / "etc/group").read_text().splitlines()
        if line.startswith("tickwire:")
    )
    for m in inv["hugepages_mounts"]:
        entry = next(e for e in fstab if e[1] == m["path"])
        assert entry[2] == "hugetlbfs"
        assert set(entry[3].split(",")) == {f"pagesize={m['pagesize']}", "mode=1770", f"gid={gid}"}
        assert (root / m["path"].lstrip("/")).is_dir()
    # the boot script, against a fake two-node sysfs: node 0 is filled, node 1 is not asked
    sysfs = tmp_path / "sys"
    for node in (0, 1):
        for size in ("2048kB", "1048576kB"):
            d = sysfs / f"devices/system/node/node{node}/hugepages/hugepages-{size}"
            d.mkdir(parents=True)
            (d / "nr_hugepages").write_text("0\n")
    r = _run(
        ["sh", str(root / "usr/local/sbin/tickwire-hugepages")],
        env={"TICKWIRE_SYSFS": str(sysfs), "PATH": "/usr/bin:/bin"},
    )
    assert r.returncode == 0, r.stderr
    node = sysfs / "devices/system/node"
    assert (node / "node0/hugepages/hugepages-2048kB/nr_hugepages").read_text().strip() == str(
        inv["hugepages_2m_per_node"]
    )
    assert (node / "node0/hugepages/hugepages-1048576kB/nr_hugepages").read_text().strip() == str(
        inv["hugepages_1g_per_node"]
    )
    assert (node / "node1/hugepages/hugepages-2048kB/nr_hugepages").read_text().strip() == "0"
    # a node whose pool is missing makes the unit fail, naming it
    shutil.rmtree(node / "node0/hugepages/hugepages-1048576kB")
    r = _run(
        ["sh", str(root / "usr/local/sbin/tickwire-hugepages")],
        env={"TICKWIRE_SYSFS": str(sysfs), "PATH": "/usr/bin:/bin"},
    )
    assert r.returncode == 1 and "node 0 has no 1048576 kB pool" in r.stderr


def _cpu_tuning_sysfs(root: Path) -> Path:
    """A fake 8-CPU sysfs holding the kernel's defaults for what the tuning unit sets."""
    files = {
        "devices/virtual/workqueue/cpumask": "ff",
        "bus/workqueue/devices/writeback/cpumask": "ff",
        "kernel/mm/ksm/run": "1",
        "kernel/mm/transparent_hugepage/enabled": "always [madvise] never",
    }
    for cpu in range(8):
        files[f"devices/system/cpu/cpufreq/policy{cpu}/scaling_governor"] = "schedutil"
        files[f"devices/system/cpu/cpu{cpu}/power/pm_qos_resume_latency_us"] = "0"
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text + "\n")
    return root


@APPLY
def test_cpu_tuning_unit_applies_records_and_restores(applied, tmp_path):
    """tickwire-cpu-tuning.service: enabled in the image; its ExecStart, run against a fake
    sysfs, sets tuned cpu-partitioning's run-time values, changes nothing the second time,
    and --restore puts back what it found."""
    inv, root = _inventory_host(), applied["root"]
    cpu = _defaults("cpu_isolation")
    unit_path = root / "etc/systemd/system/tickwire-cpu-tuning.service"
    unit = preflight.parse_unit([unit_path.read_text()])
    assert (
        root / "etc/systemd/system/multi-user.target.wants/tickwire-cpu-tuning.service"
    ).is_symlink()
    assert unit["Type"] == ["oneshot"] and unit["RemainAfterExit"] == ["yes"]
    assert "tickwire.service" in preflight.parse_unit([unit_path.read_text()], "Unit")["Before"][0]
    argv = unit["ExecStart"][0].split()
    assert argv[:3] == [
        "/usr/bin/python3",
        "/usr/local/libexec/tickwire/tickwire_cpu_tuning.py",
        "--boot",
    ]
    script = root / argv[1].lstrip("/")
    sysfs = _cpu_tuning_sysfs(tmp_path / "sys")
    record = tmp_path / "originals.json"
    run = [
        sys.executable,
        str(script),
        *argv[2:],
        "--sys-root",
        str(sysfs),
        "--record",
        str(record),
    ]
    r = _run(run)
    assert r.returncode == 0, r.stderr
    hk = config.cpulist(inv["cpu_isolation_housekeeping_cpus"])
    iso = config.cpulist(inv["cpu_isolation_isolated_cpus"])
    for rel in ("devices/virtual/workqueue/cpumask", "bus/workqueue/devices/writeback/cpumask"):
        assert preflight.mask_value((sysfs / rel).read_text()) == sum(1 << c for c in hk), rel
    assert (sysfs / "kernel/mm/ksm/run").read_text().strip() == "2"
    assert (sysfs / "kernel/mm/transparent_hugepage/enabled").read_text().strip() == cpu[
        "cpu_isolation_transparent_hugepage"
    ]
    for n in range(8):
        gov = sysfs / f"devices/system/cpu/cpufreq/policy{n}/scaling_governor"
        assert gov.read_text().strip() == cpu["cpu_isolation_cpu_governor"]
        qos = sysfs / f"devices/system/cpu/cpu{n}/power/pm_qos_resume_latency_us"
        want = str(cpu["cpu_isolation_idle_latency_us"]) if n in iso else "0"
        assert qos.read_text().strip() == want, n
    assert json.loads(record.read_text())["/sys/kernel/mm/ksm/run"] == "1"
    # the second boot finds everything in place
    r = _run(run)
    assert r.returncode == 0 and r.stdout.strip() == "tickwire-cpu-tuning: already tuned"
    # undo: the recorded kernel defaults come back, the record goes
    before = _cpu_tuning_sysfs(tmp_path / "before")
    r = _run(
        [
            sys.executable,
            str(script),
            "--boot",
            "--restore",
            "--sys-root",
            str(sysfs),
            "--record",
            str(record),
        ]
    )
    assert r.returncode == 0, r.stderr
    for path in before.rglob("*"):
        if path.is_file():
            have = (sysfs / path.relative_to(before)).read_text().strip()
            want = path.read_text().strip()
            assert have == want or want == f"always [{have}] never", path
    assert not record.exists()


def _ptp4l_global(conf: str) -> dict[str, str]:
    """The [global] settings of a ptp4l configuration (the last one wins, as in ptp4l)."""
    out, section = {}, ""
    for line in conf.splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line.strip("[]")
        elif line and not line.startswith("#") and section == "global":
            name, *value = line.split(None, 1)
            out[name] = value[0] if value else ""
    return out


@APPLY
def test_ptp_units(applied):
    """One PTP interface (the example's eno1): ptp4l@eno1 with its own management socket
    and domain; phc2sys@ installed, wired to that socket and domain, but not enabled
    (software timestamps in an image root: ptp4l steers the clock); no timemaster; the
    calibration service and its timer; the record of the clock services it disabled."""
    inv, root = _inventory_host(), applied["root"]
    etc = root / "etc/systemd/system"
    conf = (root / "etc/linuxptp/ptp4l-eno1.conf").read_text()
    assert re.search(r"^\[eno1\]$", conf, re.M)
    ptp4l = _ptp4l_global(conf)
    assert ptp4l["time_stamping"] == "software"
    assert ptp4l["domainNumber"] == str(inv["ptp_domain"])
    assert ptp4l["uds_address"] == "/var/run/ptp4l-eno1"
    assert ptp4l["slaveOnly"] == "1"
    wants = etc / "multi-user.target.wants"
    assert (wants / "ptp4l@eno1.service").is_symlink()
    assert not (wants / "phc2sys@eno1.service").exists()  # software: ptp4l steers the clock
    phc2sys = preflight.parse_unit([(etc / "phc2sys@.service").read_text()])["ExecStart"]
    assert phc2sys == [
        f"/usr/sbin/phc2sys -s %I -c CLOCK_REALTIME -n {inv['ptp_domain']} "
        "-z /var/run/ptp4l-%I -w -m -q"
    ]
    # one interface: no timemaster
    assert not (etc / "timemaster.service.d").exists()
    assert not (root / "etc/linuxptp/timemaster-tickwire.conf").exists()
    assert not (wants / "timemaster.service").exists()
    # tickwire calibrate once PTP is locked, after boot and hourly
    service = (etc / "tickwire-calibrate.service").read_text()
    unit = preflight.parse_unit([service], "Unit")
    assert unit["ConditionPathExists"] == [
        "/opt/tickwire/venv/bin/tickwire",
        "/etc/tickwire/tickwire.toml",
    ]
    svc = preflight.parse_unit([service])
    assert svc["Type"] == ["oneshot"]
    assert svc["ExecStart"] == [
        "/opt/tickwire/venv/bin/tickwire calibrate --config /etc/tickwire/tickwire.toml "
        f"--wait-ptp {_defaults('ptp')['ptp_calibrate_wait']}"
    ]
    timer = preflight.parse_unit([(etc / "tickwire-calibrate.timer").read_text()], "Timer")
    assert timer["OnBootSec"] == ["2min"] and timer["OnCalendar"] == ["hourly"]
    assert (etc / "timers.target.wants/tickwire-calibrate.timer").is_symlink()
    # the clock services it disabled, recorded once for the undo: each is disabled now
    record = json.loads((root / "var/lib/tickwire/ptp-disabled.json").read_text())
    assert set(record) == {"disabled"}
    assert set(record["disabled"]) <= set(_defaults("ptp")["ptp_conflicting_services"])
    for name, package in record["disabled"].items():
        assert package and not list(etc.glob(f"*.wants/{name}")), name
    # what preflight is told to check
    cfg = config.load(root / "etc/tickwire/tickwire.toml")
    assert (cfg.host.ptp_phc2sys_interface, cfg.host.ptp_max_offset_ns) == ("eno1", 1000)
    r = _run(
        [
            "chroot",
            str(root),
            "systemd-analyze",
            "verify",
            "--man=no",
            "/etc/systemd/system/tickwire-calibrate.service",
            "/etc/systemd/system/tickwire-calibrate.timer",
        ]
    )
    assert r.returncode == 0, r.stdout + r.stderr


@APPLY
def test_appliance_runs_inside_the_root(applied):
    root = applied["root"]
    r = _run(["chroot", str(root), "/opt/tickwire/venv/bin/tickwire", "--help"])
    assert r.returncode == 0, r.stderr
    assert "usage: tickwire" in r.stdout
    # bcc from Debian's python3-bpfcc is visible to the virtualenv
    r = _run(
        [
            "chroot",
            str(root),
            "/opt/tickwire/venv/bin/python",
            "-c",
            "import bcc, numba, dataplane._xsk, host.appliance.loader; "
            "print(host.appliance.loader.STEER_SRC.is_file())",
        ]
    )
    assert r.returncode == 0 and r.stdout.strip() == "True", r.stdout + r.stderr
    # the preflight's own view of the unit the role wrote
    r = _run(
        [
            "chroot",
            str(root),
            "/opt/tickwire/venv/bin/tickwire",
            "preflight",
            "--config",
            "/etc/tickwire/tickwire.toml",
            "--stage",
            "service",
            "--json",
        ]
    )
    report = json.loads(r.stdout)
    (service,) = [s for s in report["stages"] if s["stage"] == "service"]
    assert service["status"] == "OK", service
    # every unit the roles installed parses
    r = _run(
        [
            "chroot",
            str(root),
            "systemd-analyze",
            "verify",
            "--man=no",
            "/etc/systemd/system/tickwire.service",
            "/etc/systemd/system/tickwire-hugepages.service",
            "/etc/systemd/system/tickwire-cpu-tuning.service",
            "ptp4l@eno1.service",
            "phc2sys@eno1.service",
        ]
    )
    assert r.returncode == 0, r.stdout + r.stderr


# --- undo: last in this file, since it takes apart the root the tests above look at ---------
@pytest.fixture(scope="module")
def undone(applied):
    """The same root after two more runs with every role's ``<role>_state: absent``."""
    absent = applied["root"].parent / "absent.yml"
    absent.write_text(yaml.safe_dump({f"{role}_state": "absent" for role in MY_ROLES}))
    run3 = _playbook(applied["extra"], absent)
    run4 = _playbook(applied["extra"], absent) if not _failed_tasks(run3) else run3
    return {**applied, "run3": run3, "run4": run4}


@APPLY
def test_undo_removes_what_apply_installed_and_is_idempotent(undone):
    run3, run4, root = undone["run3"], undone["run4"], undone["root"]
    assert not _failed_tasks(run3), _failed_tasks(run3)
    assert _stats(run3)["changed"] > 0
    assert not _failed_tasks(run4), _failed_tasks(run4)
    assert _stats(run4)["changed"] == 0, f"second undo changed: {_changed_tasks(run4)}"
    gone = [
        "etc/default/grub.d/tickwire.cfg",
        "etc/default/grub.d/tickwire-hugepages.cfg",
        "etc/systemd/system.conf.d/tickwire-cpu-isolation.conf",
        "etc/systemd/system/tickwire-cpu-tuning.service",
        "etc/systemd/system/multi-user.target.wants/tickwire-cpu-tuning.service",
        "usr/local/libexec/tickwire/tickwire_cpu_tuning.py",
        "etc/sysctl.d/90-tickwire.conf",
        "etc/systemd/system/tickwire-hugepages.service",
        "usr/local/sbin/tickwire-hugepages",
        "etc/systemd/system/sysinit.target.wants/tickwire-hugepages.service",
        "etc/systemd/system/ptp4l@.service",
        "etc/systemd/system/phc2sys@.service",
        "etc/linuxptp/ptp4l-eno1.conf",
        "etc/systemd/system/multi-user.target.wants/ptp4l@eno1.service",
        "etc/systemd/system/tickwire.service",
        "etc/systemd/system/multi-user.target.wants/tickwire.service",
        "etc/tickwire/tickwire.toml",
        "opt/tickwire",
        "etc/tmpfiles.d/tickwire.conf",
    ]
    left = [p for p in gone if os.path.lexists(root / p)]
    assert not left, f"undo left: {left}"
    assert "hugetlbfs" not in (root / "etc/fstab").read_text()


# --- ptp: its undo, and several interfaces (timemaster) with a time service to give back ------
@APPLY
def test_ptp_undo_removes_the_calibration_and_the_record(undone):
    root = undone["root"]
    etc = root / "etc/systemd/system"
    for rel in (
        "tickwire-calibrate.service",
        "tickwire-calibrate.timer",
        "timers.target.wants/tickwire-calibrate.timer",
        "timemaster.service.d",
    ):
        assert not os.path.lexists(etc / rel), rel
    assert not (root / "var/lib/tickwire/ptp-disabled.json").exists()
    assert any(m.startswith("ptp: undone") for m in _messages(undone["run3"]))


def _ptp_playbook(*extra: Path) -> dict:
    """provision.yml with only the ptp role (``--tags ptp``)."""
    r = _run(
        [
            str(BIN / "ansible-playbook"),
            "-i",
            str(INVENTORY),
            "provision.yml",
            *(a for e in extra for a in ("-e", f"@{e}")),
            "--tags",
            "ptp",
        ],
        cwd=ANSIBLE,
        timeout=420,
        env=_env(ANSIBLE_STDOUT_CALLBACK="json"),
    )
    try:
        return json.loads(r.stdout)
    except ValueError:
        pytest.fail(f"ansible-playbook printed no JSON (rc {r.returncode}):\n{r.stderr[-3000:]}")


def _in_root(root: Path, *argv: str) -> str:
    return _run(["chroot", str(root), *argv]).stdout.strip()


def _installed(root: Path, package: str) -> bool:
    return _in_root(root, "dpkg-query", "-W", "-f=${Status}", package) == "install ok installed"


@pytest.fixture(scope="module")
def timesyncd_root(tmp_path_factory):
    """A fresh copy of the cached root with systemd-timesyncd installed and enabled (the
    time service Debian recommends) instead of the image's chrony: what the ptp role
    disables, and its undo gives back.
    Only /proc is mounted, and unmounted in teardown."""
    work = tmp_path_factory.mktemp("ptp")
    root = work / "root"
    subprocess.run(["cp", "-a", "--reflink=auto", str(_debootstrap_root()), str(root)], check=True)
    extra = imagebuild.chroot_target(root, work / "chroot.yml")
    subprocess.run(["mount", "-t", "proc", "proc", str(root / "proc")], check=True)
    try:
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        for argv in (  # the image's root has chrony: this one starts from timesyncd alone
            ["apt-get", "update", "-q"],
            ["apt-get", "purge", "-y", "-q", "chrony"],
            ["apt-get", "install", "-y", "-q", "--no-install-recommends", "systemd-timesyncd"],
        ):
            r = _run(["chroot", str(root), *argv], env=env)
            assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        yield {"root": root, "work": work, "extra": extra}
    finally:
        if _run(["umount", str(root / "proc")]).returncode != 0:
            _run(["umount", "-l", str(root / "proc")])
        left = _mounted_under(root)
        assert not left, f"mounts left under the image root: {left}"
        shutil.rmtree(work, ignore_errors=True)


def _timemaster_sections(text: str) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    current: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("["):
            current = out.setdefault(line.strip("[]"), {})
        elif line.strip() and not line.startswith("#"):
            name, _, value = line.partition(" ")
            current[name] = value
    return out


@APPLY
def test_ptp_timemaster_then_one_interface_then_undo_gives_the_time_service_back(
    timesyncd_root,
):
    root, work, extra = timesyncd_root["root"], timesyncd_root["work"], timesyncd_root["extra"]
    etc = root / "etc/systemd/system"
    assert _in_root(root, "systemctl", "is-enabled", "systemd-timesyncd.service") == "enabled"
    several = work / "several.yml"
    several.write_text(
        yaml.safe_dump(
            {
                "ptp_interfaces": ["eno1", "eno2"],
                "ptp_interface_domains": {"eno2": 24},
                "ptp_phc2sys_interface": "eno2",
            }
        )
    )
    run1 = _ptp_playbook(extra, several)
    assert not _failed_tasks(run1), _failed_tasks(run1)
    run2 = _ptp_playbook(extra, several)
    assert not _failed_tasks(run2) and _stats(run2)["changed"] == 0, _changed_tasks(run2)
    # the record, written before the first change: timesyncd was enabled, from its package
    record = json.loads((root / "var/lib/tickwire/ptp-disabled.json").read_text())
    assert record == {"disabled": {"systemd-timesyncd.service": "systemd-timesyncd"}}
    # timemaster runs chronyd, whose package replaced timesyncd's; chrony.service stays off
    assert _installed(root, "chrony") and not _installed(root, "systemd-timesyncd")
    assert _in_root(root, "systemctl", "is-enabled", "chrony.service") == "disabled"
    assert _in_root(root, "systemctl", "is-enabled", "timemaster.service") == "enabled"
    dropin = preflight.parse_unit([(etc / "timemaster.service.d/tickwire.conf").read_text()])
    assert dropin["ExecStart"] == ["/usr/sbin/timemaster -f /etc/linuxptp/timemaster-tickwire.conf"]
    sections = _timemaster_sections((root / "etc/linuxptp/timemaster-tickwire.conf").read_text())
    # one section per interface; only the steering one is selectable
    assert sections["ptp_domain 0"] == {"interfaces": "eno1", "ntp_options": "noselect"}
    assert sections["ptp_domain 24"] == {"interfaces": "eno2", "ntp_options": "prefer"}
    assert sections["timemaster"] == {"ntp_program": "chronyd"}
    assert not list(root.glob("etc/linuxptp/ptp4l-*.conf"))
    assert not list(etc.glob("*.wants/ptp4l@*")) and not (etc / "ptp4l@.service").exists()

    # back to one interface: timemaster goes, ptp4l@eno1 comes
    one = work / "one.yml"
    one.write_text(yaml.safe_dump({"ptp_interfaces": ["eno1"]}))
    run3 = _ptp_playbook(extra, one)
    assert not _failed_tasks(run3), _failed_tasks(run3)
    assert _in_root(root, "systemctl", "is-enabled", "timemaster.service") == "disabled"
    assert not (etc / "timemaster.service.d").exists()
    assert not (root / "etc/linuxptp/timemaster-tickwire.conf").exists()
    assert _in_root(root, "systemctl", "is-enabled", "ptp4l@eno1.service") == "enabled"

    # undo: everything goes, and the time service the role disabled comes back
    absent = work / "absent.yml"
    absent.write_text(yaml.safe_dump({"ptp_interfaces": ["eno1"], "ptp_state": "absent"}))
    run4 = _ptp_playbook(extra, absent)
    assert not _failed_tasks(run4), _failed_tasks(run4)
    run5 = _ptp_playbook(extra, absent)
    assert not _failed_tasks(run5) and _stats(run5)["changed"] == 0, _changed_tasks(run5)
    assert _installed(root, "systemd-timesyncd") and not _installed(root, "chrony")
    assert _in_root(root, "systemctl", "is-enabled", "systemd-timesyncd.service") == "enabled"
    assert not (root / "var/lib/tickwire/ptp-disabled.json").exists()
    assert not list(etc.glob("*.wants/ptp4l@*")) and not (etc / "ptp4l@.service").exists()
    assert not (etc / "tickwire-calibrate.timer").exists()
    text = "\n".join(_messages(run4))
    assert "clock services enabled again: systemd-timesyncd.service" in text
