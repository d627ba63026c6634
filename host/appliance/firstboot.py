"""``tickwire firstboot``: the appliance image configures itself from the ``tickwire.toml``
the operator dropped on its ESP (``tickwire-firstboot.service``, before
``tickwire.service``).

1. The config is loaded and checked (``host.config``): missing or bad, the message says
   what to fix, on the console and in the journal, and the unit fails -- so
   ``tickwire.service`` (``Requires=`` it) does not start on a half-configured host.
2. ``[image.interfaces]``: systemd ``.link`` files name the feed interfaces (matched by MAC
   or kernel name) and ``.network`` files address them; applied now and at every boot.
3. The roles' booted-host half: ``provision.yml`` run locally with the role variables this
   config means (``role_variables``), the package tasks skipped (the image carries every
   package): NIC channels/rings/offloads/ntuple, IRQ affinity, hugepages, sysctl, CPU
   isolation's kernel command line, PTP from ``ethtool -T``, the appliance's own
   ``/etc/tickwire/tickwire.toml``, ``tickwire warm`` and the playbook's final preflight.
4. ``tickwire calibrate`` and ``tickwire preflight`` (kept in ``/var/lib/tickwire`` for
   ``tickwire status`` and the guest agent).
5. The kernel command line the roles wrote differs from the running one: reboot once if
   ``[image] reboot = true``, else say so and fail (nothing starts half-configured).

A boot whose config is the one already applied (same sha256) re-checks with preflight and
changes nothing; ``--force`` applies again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

from host import config

STATE_DIR = Path("/var/lib/tickwire")
STATE = STATE_DIR / "firstboot.json"
PREFLIGHT = STATE_DIR / "preflight.json"
PROVISION = Path("/opt/tickwire/provision")
ANSIBLE = Path("/opt/tickwire/ansible")
VENV = Path("/opt/tickwire/venv")
ETC_CONFIG = Path("/etc/tickwire/tickwire.toml")
NETWORKD = Path("/etc/systemd/network")
LOADER_ENTRY = "loader/entries/tickwire.conf"


class FirstBootError(RuntimeError):
    """First boot cannot configure this host; the message says what to fix."""


def say(msg: str) -> None:
    print(f"tickwire firstboot: {msg}", flush=True)


# --- the config, as the roles' variables -------------------------------------------------------
def _nodes(text: str) -> list[int]:
    return sorted(config.cpulist(text))


def role_variables(cfg: config.Config, raw: dict, wheel: str, numba_cpu: str) -> dict:
    """The Ansible variables that make the roles apply what ``cfg`` says (the inverse of
    ``tickwire.toml.j2``); ``raw`` is the file's TOML (its ``[run]`` keys are carried
    verbatim), ``[image.ansible]`` is added last and wins."""
    run, host = cfg.run, cfg.host
    lines = {
        f"tickwire_line_{letter.lower()}": {
            "interface": line.interface,
            "queue": line.queue,
            "group": line.group,
            "port": line.port,
            "address": line.address,
        }
        for letter, line in run.lines.items()
    }
    named = {
        "channel",
        "rx_mode",
        "xdp_mode",
        "core",
        "metrics",
        "recovery",
        "policy",
        "line_a",
        "line_b",
    }
    options = {k: v for k, v in raw.get("run", {}).items() if k not in named and k != "netns"}
    ifaces = sorted({run.line_a.interface, run.line_b.interface})
    flows = [
        {"interface": ln.interface, "group": ln.group, "port": ln.port, "queue": ln.queue}
        for ln in run.lines.values()
    ]
    queues = [
        {"interface": ln.interface, "queue": ln.queue, "cpu": run.core} for ln in run.lines.values()
    ]
    iso = bool(host.isolated_cpus)
    v = {
        # tickwire
        "tickwire_package": wheel,
        "tickwire_wheelhouse": "",
        "tickwire_service_started": False,  # systemd starts it after this unit
        "tickwire_channel": run.channel,
        "tickwire_rx_mode": run.rx_mode,
        "tickwire_xdp_mode": run.xdp_mode,
        "tickwire_core": run.core,
        "tickwire_metrics": run.metrics,
        "tickwire_recovery": run.recovery,
        "tickwire_policy": run.policy,
        "tickwire_run_options": options,
        "tickwire_feed_session": cfg.feed.session,
        "tickwire_preflight_required": list(host.required),
        "tickwire_numba_cpu": "" if numba_cpu == "native" else numba_cpu,
        **lines,
        # hugepages
        "hugepages_nodes": _nodes(host.hugepages_nodes),
        "hugepages_2m_per_node": host.hugepages_2m,
        "hugepages_1g_per_node": host.hugepages_1g,
        # cpu_isolation (first boot reboots, not the role)
        "cpu_isolation_isolated_cpus": host.isolated_cpus,
        "cpu_isolation_housekeeping_cpus": host.housekeeping_cpus,
        "cpu_isolation_reboot_allowed": False,
        "cpu_isolation_rcu_nocb_poll": host.rcu_nocb_poll,
        "cpu_isolation_nmi_watchdog_off": host.nmi_watchdog_off,
        "cpu_isolation_kthread_cpus": bool(host.kthread_cpus),
        "cpu_isolation_transparent_hugepage": host.transparent_hugepage,
        "cpu_isolation_workqueue_housekeeping": bool(host.workqueue_cpus),
        "cpu_isolation_ksm_off": host.ksm_off,
        "cpu_isolation_cpu_governor": host.cpu_governor,
        "cpu_isolation_idle_latency_us": host.idle_latency_us if iso else -1,
        # nic and irq_affinity
        "nic_interfaces": ifaces
        if (host.channels or host.rx_ring or host.offloads_off or host.ntuple)
        else [],
        "nic_channels": host.channels,
        "nic_rx_ring": host.rx_ring,
        "nic_offloads_off": list(host.offloads_off),
        "nic_ntuple": host.ntuple,
        "nic_flows": flows if host.ntuple else [],
        "irq_affinity_queues": queues if run.core >= 0 else [],
        "irq_affinity_placement": host.irq_placement,
        "irq_affinity_housekeeping_cpus": host.housekeeping_cpus,
        "irq_affinity_rps_mask": host.rps_mask,
        "irq_affinity_xps_mask": host.xps_mask,
        # ptp
        "ptp_interfaces": list(host.ptp_interfaces),
        "ptp_max_offset_ns": host.ptp_max_offset_ns,
    }
    if host.ptp_phc2sys_interface:  # else the role's default: the first PTP interface
        v["ptp_phc2sys_interface"] = host.ptp_phc2sys_interface
    if host.sysctl:
        v["sysctl_settings"] = dict(host.sysctl)
        v["sysctl_extra_settings"] = {}
    v.update(cfg.image.ansible)
    return v


def choose_numba_cpu(wanted: str) -> str:
    """``auto``: the image's generic cache under emulation (qemu without KVM: a native
    compile there takes many minutes and its cache fits no real host), else native."""
    if wanted != "auto":
        return wanted
    done = subprocess.run(["systemd-detect-virt"], capture_output=True, text=True)
    return "generic" if done.stdout.strip() == "qemu" else "native"


# --- interfaces ---------------------------------------------------------------------------------
def _find_interface(match: str) -> str | None:
    for dev in sorted(Path("/sys/class/net").iterdir()):
        if dev.name == match:
            return dev.name
        try:
            if (dev / "address").read_text().strip().lower() == match.lower():
                return dev.name
        except OSError:
            continue
    return None


def _write_if_changed(path: Path, text: str) -> bool:
    if path.exists() and path.read_text() == text:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return True


def configure_interfaces(interfaces: dict) -> list[str]:
    """``.link`` and ``.network`` files for each ``[image.interfaces]`` entry, applied now
    (rename, address). Returns what changed."""
    changed = []
    for name, spec in sorted(interfaces.items()):
        match, address = spec.get("match", ""), spec.get("address", "")
        how = f"MACAddress={match}" if ":" in match else f"OriginalName={match}"
        head = f"# tickwire firstboot: [image.interfaces.{name}]\n"
        link = f"{head}[Match]\n{how}\n\n[Link]\nName={name}\n"
        net = (
            f"# tickwire firstboot: [image.interfaces.{name}]\n[Match]\nName={name}\n\n[Network]\n"
            "LinkLocalAddressing=no\nIPv6AcceptRA=no\nConfigureWithoutCarrier=yes\n"
            + (f"Address={address}\n" if address else "")
        )
        if _write_if_changed(NETWORKD / f"10-tickwire-{name}.link", link):
            changed.append(f"{name}.link")
        if _write_if_changed(NETWORKD / f"20-tickwire-{name}.network", net):
            changed.append(f"{name}.network")
        current = _find_interface(match)
        if current is None:
            raise FirstBootError(
                f"image.interfaces.{name}: no interface matches {match!r} "
                f"(this host has {', '.join(sorted(os.listdir('/sys/class/net')))})"
            )
        if current != name:
            for argv in (
                ["ip", "link", "set", "dev", current, "down"],
                ["ip", "link", "set", "dev", current, "name", name],
            ):
                subprocess.run(argv, check=True, capture_output=True)
            changed.append(f"renamed {current} -> {name}")
        subprocess.run(["ip", "link", "set", "dev", name, "up"], check=True, capture_output=True)
    if interfaces:
        subprocess.run(["networkctl", "reload"], capture_output=True)
        for name in interfaces:
            subprocess.run(["networkctl", "reconfigure", name], capture_output=True)
        _wait_addresses(interfaces)
    return changed


def _wait_addresses(interfaces: dict, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    for name, spec in interfaces.items():
        address = spec.get("address", "").split("/")[0]
        while address:
            out = subprocess.run(
                ["ip", "-4", "-o", "addr", "show", "dev", name], capture_output=True, text=True
            ).stdout
            if f" {address}/" in out:
                break
            if time.monotonic() > deadline:
                raise FirstBootError(
                    f"{name}: systemd-networkd did not give it {address} within {timeout:.0f} s"
                )
            time.sleep(0.2)


# --- the steps ----------------------------------------------------------------------------------
def _playbook(variables: dict, work: Path) -> dict:
    """provision.yml on this host (connection local), package tasks skipped; the output
    streams to the console; returns the recap's counts."""
    (work / "vars.json").write_text(json.dumps(variables, indent=1))
    (work / "inventory.json").write_text(
        json.dumps(
            {
                "tickwire": {
                    "hosts": {
                        "localhost": {
                            "ansible_connection": "local",
                            "ansible_python_interpreter": "/usr/bin/python3",
                        }
                    }
                }
            }
        )
    )
    env = dict(
        os.environ,
        ANSIBLE_COLLECTIONS_PATH=str(ANSIBLE / "share"),
        ANSIBLE_NOCOLOR="1",
        ANSIBLE_DISPLAY_SKIPPED_HOSTS="false",
        ANSIBLE_DISPLAY_OK_HOSTS="true",
        ANSIBLE_RETRY_FILES_ENABLED="false",
        ANSIBLE_PIPELINING="true",  # one python per task, no module file copied
        ANSIBLE_LOCAL_TEMP=str(work / "tmp"),
        HOME=str(work),
    )
    argv = [
        str(ANSIBLE / "bin" / "ansible-playbook"),
        "-i",
        str(work / "inventory.json"),
        "provision.yml",
    ]
    argv += ["-e", f"@{work / 'vars.json'}", "--skip-tags", "packages"]
    proc = subprocess.Popen(
        argv, cwd=PROVISION, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    recap, failed = {}, []
    for line in proc.stdout:
        line = line.rstrip()
        if line.startswith(("TASK [", "RUNNING HANDLER [")):
            say(line.rstrip(" *"))
        elif (
            line.startswith(("changed:", "fatal:", "failed:"))
            or "msg" in line
            and line.startswith("ok:")
        ):
            say("  " + line[:300])
            if line.startswith(("fatal:", "failed:")):
                failed.append(line)
        elif line.startswith("localhost") and "ok=" in line:
            recap = dict(kv.split("=") for kv in line.split(":", 1)[1].split())
    proc.wait()
    if proc.returncode != 0 or failed:
        raise FirstBootError(
            f"the roles failed (ansible-playbook exited {proc.returncode}): "
            + "; ".join(failed)[:1500]
        )
    return {k: int(v) for k, v in recap.items()}


def _wheel() -> str:
    wheels = sorted(Path("/opt/tickwire/dist").glob("tickwire-*.whl"))
    if not wheels:
        raise FirstBootError("/opt/tickwire/dist holds no Tickwire wheel: the image is incomplete")
    return str(wheels[-1])


def _tickwire(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(VENV / "bin" / "tickwire"), *args], capture_output=True, text=True, env=env
    )


def _preflight() -> dict:
    done = _tickwire("preflight", "--config", str(ETC_CONFIG), "--json")
    try:
        result = json.loads(done.stdout)
    except ValueError:
        raise FirstBootError(
            f"tickwire preflight printed no JSON: {done.stderr.strip()[-800:]}"
        ) from None
    result["exit"] = done.returncode
    PREFLIGHT.write_text(json.dumps(result, indent=1))
    return result


def _next_cmdline(esp: Path) -> str | None:
    try:
        text = (esp / LOADER_ENTRY).read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("options "):
            return line.removeprefix("options ").strip()
    return None


def run(esp: Path, force: bool = False) -> dict:
    """First boot; returns the state it recorded. Raises ``FirstBootError``."""
    t0 = time.monotonic()
    path = esp / "tickwire.toml"
    if not path.exists():
        raise FirstBootError(
            f"no {path}: write this host's configuration there (an example is "
            f"{esp / 'tickwire.toml.example'}; image/README.md explains it), then reboot"
        )
    data = path.read_bytes()
    try:
        cfg = config.load(path)
        config.require_lines(cfg.run)
    except config.ConfigError as e:
        raise FirstBootError(f"the configuration cannot be used: {e}") from None
    import tomllib

    raw = tomllib.loads(data.decode())
    sha = hashlib.sha256(data).hexdigest()
    state = json.loads(STATE.read_text()) if STATE.exists() else {}
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    if not force and state.get("config_sha256") == sha and state.get("result") == "configured":
        say(
            f"configured from this tickwire.toml (sha256 {sha[:12]}) at {state.get('at')}: "
            "nothing to change"
        )
        changed = configure_interfaces(cfg.image.interfaces)
        pf = _preflight()
        state.update(
            boots=state.get("boots", 1) + 1,
            second_boot={"interfaces_changed": changed, "preflight_ok": pf["exit"] == 0},
        )
        STATE.write_text(json.dumps(state, indent=1))
        if pf["exit"] != 0:
            raise FirstBootError("preflight fails on this boot: " + _failing(pf))
        return state
    say(f"configuring this host from {path} (sha256 {sha[:12]})")
    state = {"config_sha256": sha, "result": "configuring", "boots": 1}
    STATE.write_text(json.dumps(state, indent=1))
    changed = configure_interfaces(cfg.image.interfaces)
    say(f"interfaces: {', '.join(changed) or 'as configured'}")
    numba_cpu = choose_numba_cpu(cfg.image.numba_cpu)
    say(f"numba: {numba_cpu} CPU model for the consumer's cache")
    work = STATE_DIR / "firstboot"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    recap = _playbook(role_variables(cfg, raw, _wheel(), numba_cpu), work)
    say(f"roles applied: {recap}")
    env = dict(os.environ, NUMBA_CACHE_DIR="/var/cache/tickwire/numba")
    cal = _tickwire("calibrate", "--config", str(ETC_CONFIG), "--json", env=env)
    say("calibrate: " + ("done" if cal.returncode == 0 else f"failed: {cal.stderr.strip()[-300:]}"))
    pf = _preflight()
    state.update(
        interfaces=changed,
        numba_cpu=numba_cpu,
        roles=recap,
        calibrate_ok=cal.returncode == 0,
        preflight_ok=pf["exit"] == 0,
        seconds=round(time.monotonic() - t0, 1),
        at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )
    if pf["exit"] != 0:
        state["result"] = "preflight failed"
        STATE.write_text(json.dumps(state, indent=1))
        raise FirstBootError("preflight fails after the roles ran: " + _failing(pf))
    want = _next_cmdline(esp)
    have = Path("/proc/cmdline").read_text().strip()
    if want and _args(want) != _args(have):
        state["result"] = "reboot required"
        state["next_cmdline"] = want
        STATE.write_text(json.dumps(state, indent=1))
        if cfg.image.reboot and state.get("rebooted_for") != want:
            state["rebooted_for"] = want
            STATE.write_text(json.dumps(state, indent=1))
            say(f"rebooting once for the new kernel command line: {want}")
            subprocess.run(["systemctl", "reboot", "--no-block"])
            raise FirstBootError("rebooting for the new kernel command line")
        raise FirstBootError(
            f"the kernel command line changed ({want}); set [image] reboot = true or reboot by hand"
        )
    state["result"] = "configured"
    STATE.write_text(json.dumps(state, indent=1))
    say(f"configured in {state['seconds']} s; tickwire.service may start")
    return state


def _args(cmdline: str) -> list[str]:
    """A kernel command line's arguments, less the ``initrd=`` systemd-boot adds."""
    return [a for a in cmdline.split() if not a.startswith("initrd=")]


def _failing(pf: dict) -> str:
    bad = [
        f"{st['stage']}: {c['name']}: have {c['have']}, want {c['want']}"
        + (f" (fix: {c['fix']})" if c.get("fix") else "")
        for st in pf.get("stages", [])
        if st.get("required")
        for c in st.get("checks", [])
        if not c.get("ok")
    ]
    return "; ".join(bad)[:1500] or json.dumps(pf)[:800]
