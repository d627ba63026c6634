"""``tickwire image boot IMAGE [--lab] [--check SESSION]``: the appliance image in qemu.

The image is booted from a private copy (its first boot writes to the disk; the image
stays as built) under UEFI (OVMF, systemd-boot). With ``--lab`` two multi-queue
virtio-net NICs are backed by tap devices in an exchange namespace of their own
(``<prefix>-exch``), so the simulator's lines A and B reach the guest through a real NIC
driver (virtio_net: XDP in driver mode), and a ``tickwire.toml`` for those lines is
dropped on the copy's ESP -- the operator's path, by ``mcopy``. The serial console goes to
``console.log`` (its tail is shown on failure); the guest's state is read from a
virtio-serial port its ``tickwire agent`` answers (no network login, no keys).

KVM: tried, with a deadline, by booting the image's kernel to its first panic (no root
given); nested KVM here hangs in early boot, so it falls back to TCG
(``-accel tcg,thread=multi``). ``/dev/kvm`` existing proves nothing.

``--check SESSION``: wait until ``tickwire.service`` is active and the guest's preflight
is ready, publish SESSION on A and B, wait for the end of session, and pass only if the
guest's books have the digest of ``tickwire book SESSION``, its XDP programs are attached
in driver mode, and no message was lost (every sequence taken, none unrecoverable).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from host import config, netns, signals
from host.image import build

OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
QEMU = "qemu-system-x86_64"
MACS = {"A": "52:54:00:77:00:0a", "B": "52:54:00:77:00:0b"}
AGENT_PORT = "org.tickwire.agent"


class BootError(RuntimeError):
    """The image did not boot, or the check failed; the message says what happened."""


@dataclass(frozen=True)
class BootOptions:
    image: Path
    lab: bool = False
    check: Path | None = None
    config: Path | None = None  # a tickwire.toml to put on the ESP (--lab writes one)
    raw_config: Path | None = None  # put on the ESP unchecked (first boot's own checks)
    reuse_disk: bool = False  # boot ``image`` itself (a disk that booted before), no copy
    prefix: str = "twvm"
    memory_mib: int = 2048
    cpus: int = 2
    queues: int = 2
    accel: str = "auto"  # auto (KVM if it boots, else TCG), kvm, tcg
    ready_timeout: float = 1800.0
    check_timeout: float = 600.0
    work: Path | None = None  # kept after the run when given (console.log, disk)


# --- the lab's side: an exchange namespace whose lines are the guest's taps ------------------
def lab_config(prefix: str) -> config.Config:
    """The lab config for the image: lines A and B on taps ``<prefix>-a``/``-b`` in the
    exchange namespace; their guest ends are named feed-a/feed-b by first boot."""
    cfg = config.with_lab(prefix=prefix)
    lines = {
        f"line_{k.lower()}": dataclasses.replace(ln, exchange_if=f"{prefix}-{k.lower()}")
        for k, ln in cfg.lab.lines.items()
    }
    return config.validate(dataclasses.replace(cfg, lab=dataclasses.replace(cfg.lab, **lines)))


def guest_config(cfg: config.Config) -> str:
    """The ``tickwire.toml`` the operator would write for this guest on the lab's lines."""
    lab = cfg.lab
    out = [
        "# tickwire.toml for the appliance image on the lab's lines (tickwire image boot --lab)",
        f'[feed]\nsession = "{cfg.feed.session}"\n',
        "[run]",
        'channel = "totalview"',
        'rx_mode = "xdp"',
        'xdp_mode = "native"',
        'metrics = "127.0.0.1:9108"',
        f'recovery = "{lab.line_a.exchange_ip}:{lab.rerequest_port}"',
        "frames = 8192",
        "ring_size = 4096",
    ]
    for letter, ln in lab.lines.items():
        out += [
            f"\n[run.line_{letter.lower()}]",
            f'interface = "{ln.appliance_if}"',
            "queue = 0",
            f'group = "{ln.group}"',
            f"port = {ln.port}",
            f'address = "{ln.appliance_ip}"',
        ]
    out += [
        "\n[host]",
        'required = ["hugepages", "nic", "sysctl", "service"]',
        "hugepages_2m = 128",
        'hugepages_nodes = "0"',
        # the taps spread flows over their queues; one channel puts every line on queue 0,
        # where the AF_XDP socket is (virtio-net has no ntuple steering)
        "channels = 1",
        'offloads_off = ["generic-receive-offload"]',
        'service = "tickwire.service"',
        "\n[host.sysctl]",
        '"net.core.rmem_max" = 268435456',
        '"vm.swappiness" = 1',
        "\n[image]",
        'numba_cpu = "auto"',
        "reboot = false",
    ]
    for letter, ln in lab.lines.items():
        out += [
            f"\n[image.interfaces.{ln.appliance_if}]",
            f'match = "{MACS[letter]}"',
            f'address = "{ln.appliance_ip}/{ln.prefixlen}"',
        ]
    return "\n".join(out) + "\n"


def _exchange_up(cfg: config.Config) -> None:
    from pyroute2 import netns as pr_netns

    ns = cfg.lab.exchange_ns
    if netns.exists(ns):
        raise BootError(
            f"namespace {ns} exists: another image boot runs, or a dead one left it "
            f"(ip netns delete {ns})"
        )
    pr_netns.create(ns)
    from pyroute2 import IPRoute

    with IPRoute(netns=ns) as ipr:
        ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")


def _taps_up(cfg: config.Config, timeout: float = 30.0) -> None:
    """Address the taps qemu created in the exchange namespace; route each group out of
    its line's tap."""
    from pyroute2 import IPRoute

    deadline = time.monotonic() + timeout
    with IPRoute(netns=cfg.lab.exchange_ns) as ipr:
        for ln in cfg.lab.lines.values():
            while not ipr.link_lookup(ifname=ln.exchange_if):
                if time.monotonic() > deadline:
                    raise BootError(
                        f"qemu did not create tap {ln.exchange_if} within {timeout:.0f} s"
                    )
                time.sleep(0.05)
            idx = ipr.link_lookup(ifname=ln.exchange_if)[0]
            ipr.addr("add", index=idx, address=ln.exchange_ip, prefixlen=ln.prefixlen)
            ipr.link("set", index=idx, state="up", mtu=cfg.lab.mtu)
            ipr.route("replace", dst=f"{ln.group}/32", oif=idx)


def _exchange_down(cfg: config.Config) -> None:
    from pyroute2 import netns as pr_netns

    with contextlib.suppress(Exception):
        pr_netns.remove(cfg.lab.exchange_ns)


# --- qemu -------------------------------------------------------------------------------------
def _extract(disk: Path, esp_path: str, dest: Path) -> None:
    off = build.esp_offset(disk)
    subprocess.run(
        ["mcopy", "-o", "-i", f"{disk}@@{off}", f"::{esp_path}", str(dest)],
        check=True,
        capture_output=True,
    )


def put_config(disk: Path, toml: Path, check: bool = True) -> None:
    """Write ``toml`` as ``tickwire.toml`` on the ESP of ``disk`` (checked first unless
    ``check`` is false)."""
    if check:
        config.load(toml)
    off = build.esp_offset(disk)
    done = subprocess.run(
        ["mcopy", "-o", "-i", f"{disk}@@{off}", str(toml), "::/tickwire.toml"],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise BootError(f"cannot write tickwire.toml to {disk}'s ESP: {done.stderr.strip()}")


_KVM: dict[str, bool] = {}


def kvm_usable(disk: Path, work: Path, deadline: float = 25.0) -> bool:
    """Boot the image's kernel under KVM with no root: a working KVM reaches the kernel's
    panic in a second or two; nested KVM here hangs in early boot. Cached per process."""
    if "kvm" in _KVM:
        return _KVM["kvm"]
    ok = False
    if os.access("/dev/kvm", os.R_OK | os.W_OK):
        kernel = work / "probe-vmlinuz"
        _extract(disk, "/tickwire/vmlinuz", kernel)
        argv = [
            QEMU,
            "-accel",
            "kvm",
            "-machine",
            "q35",
            "-m",
            "256",
            "-display",
            "none",
            "-no-reboot",
        ]
        argv += [
            "-nodefaults",
            "-serial",
            "stdio",
            "-kernel",
            str(kernel),
            "-append",
            "console=ttyS0 panic=-1",
        ]
        # qemu makes its stdin non-blocking; never let it have (and change) the caller's
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        try:
            out, _ = proc.communicate(timeout=deadline)
            ok = b"Kernel panic" in out or b"VFS: Unable to mount root" in out
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        kernel.unlink(missing_ok=True)
    _KVM["kvm"] = ok
    return ok


def qemu_argv(
    opts: BootOptions, disk: Path, vars_fd: Path, agent_sock: Path, console: Path, accel: str
) -> list[str]:
    argv = [
        QEMU,
        "-name",
        "tickwire",
        "-machine",
        "q35",
        "-m",
        str(opts.memory_mib),
        "-smp",
        str(opts.cpus),
    ]
    if accel == "kvm":
        argv += ["-accel", "kvm", "-cpu", "host"]
    else:
        argv += ["-accel", "tcg,thread=multi", "-cpu", "max"]
    argv += ["-display", "none", "-monitor", "none", "-serial", f"file:{console}", "-nodefaults"]
    argv += ["-drive", f"if=pflash,format=raw,readonly=on,file={OVMF_CODE}"]
    argv += ["-drive", f"if=pflash,format=raw,file={vars_fd}"]
    argv += ["-drive", f"file={disk},format=raw,if=virtio,cache=unsafe"]
    argv += [
        "-device",
        "virtio-serial-pci",
        "-chardev",
        f"socket,id=agent,path={agent_sock},server=on,wait=off",
    ]
    argv += ["-device", f"virtserialport,chardev=agent,name={AGENT_PORT}"]
    argv += ["-device", "virtio-rng-pci"]
    if opts.lab:
        vectors = 2 * opts.queues + 2
        for letter in ("A", "B"):
            tap = f"{opts.prefix}-{letter.lower()}"
            argv += [
                "-netdev",
                f"tap,id=n{letter},ifname={tap},script=no,downscript=no,queues={opts.queues},vhost=off",
            ]
            argv += [
                "-device",
                f"virtio-net-pci,netdev=n{letter},mac={MACS[letter]},mq=on,vectors={vectors},"
                "guest_tso4=off,guest_tso6=off,guest_ecn=off,guest_ufo=off",
            ]
    return argv


class Agent:
    """The host end of the guest agent's virtio-serial port."""

    def __init__(self, path: Path):
        self.path = path
        self.sock: socket.socket | None = None
        self.buf = b""

    def ask(self, request: str, timeout: float = 60.0) -> dict | None:
        """The answer to ``request``, or None when the agent is not (yet) answering."""
        try:
            if self.sock is None:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.connect(str(self.path))
                self.buf = b""
            self.sock.settimeout(timeout)
            self.sock.sendall(request.encode() + b"\n")
            while b"\n" not in self.buf:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise ConnectionError("closed")
                self.buf += chunk
        except (OSError, ConnectionError):
            self.close()
            return None
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def console_tail(console: Path, lines: int = 40) -> str:
    try:
        text = console.read_bytes().decode(errors="replace")
    except OSError:
        return "(no console output)"
    return "\n".join([ln for ln in text.replace("\r", "").splitlines() if ln.strip()][-lines:])


# --- the boot ----------------------------------------------------------------------------------
def _wait_ready(
    opts: BootOptions, proc, agent: Agent, console: Path, t0: float, say, last_state: dict
) -> dict:
    """Poll the agent until tickwire.service is active (or first boot failed)."""
    last, deadline = "", time.monotonic() + opts.ready_timeout
    while True:
        if proc.poll() is not None:
            raise BootError(f"qemu exited ({proc.returncode}) before the appliance was ready")
        if time.monotonic() > deadline:
            raise BootError(f"the appliance was not ready within {opts.ready_timeout:.0f} s")
        st = agent.ask("state", timeout=30)
        if st is not None:
            last_state.clear()
            last_state.update(st)
            fb = st["units"]["tickwire-firstboot.service"]
            svc = st["units"]["tickwire.service"]
            if fb.get("ActiveState") == "failed":
                raise BootError(
                    "first boot failed: "
                    + ((st.get("firstboot") or {}).get("result") or "see the console")
                )
            consumer = (st.get("status") or {}).get("consumer") or {}
            if svc.get("ActiveState") == "active" and consumer.get("running"):
                st["ready_s"] = round(time.monotonic() - t0, 1)
                return st
            if svc.get("ActiveState") == "failed" or int(svc.get("NRestarts") or 0) >= 3:
                journal = "\n".join(st.get("journal") or [])
                raise BootError(
                    f"tickwire.service failed ({svc.get('Result')}, "
                    f"{svc.get('NRestarts')} restarts):\n{journal}"
                )
        now = _progress(console)
        if now and now != last:
            say(now)
            last = now
        time.sleep(2)


def _progress(console: Path) -> str:
    try:
        text = console.read_bytes().decode(errors="replace").replace("\r", "")
    except OSError:
        return ""
    for line in reversed(text.splitlines()):
        if "tickwire firstboot:" in line or "Reached target" in line or "Started" in line:
            return line.strip()[-160:]
    return ""


def boot(opts: BootOptions, say=lambda msg: None) -> dict:
    """Boot ``opts.image``; with ``opts.check`` run the session check. Returns the result
    (``ok`` True when every check passed)."""
    if os.geteuid() != 0:
        raise BootError("image boot needs root (taps in a network namespace, the image's ESP)")
    if shutil.which(QEMU) is None or not OVMF_CODE.exists():
        raise BootError(f"needs {QEMU} and OVMF ({OVMF_CODE}): make setup installs them")
    if opts.check and not opts.lab:
        raise BootError("--check publishes on the lab's lines: give --lab too")
    work = opts.work or Path(tempfile.mkdtemp(prefix="twvm-"))
    work.mkdir(parents=True, exist_ok=True)
    keep = opts.work is not None
    disk, console = work / "disk.img", work / "console.log"
    if opts.reuse_disk:
        disk = opts.image
    else:
        say(f"copying {opts.image} (the boot writes to the copy)")
        argv = ["cp", "--sparse=always", "--reflink=auto", str(opts.image), str(disk)]
        subprocess.run(argv, check=True)
    shutil.copy(OVMF_VARS, work / "ovmf-vars.fd")
    cfg = lab_config(opts.prefix)
    if opts.reuse_disk:
        pass  # its ESP holds the config it booted with before
    elif opts.raw_config is not None:
        put_config(disk, opts.raw_config, check=False)
    elif opts.config is not None:
        put_config(disk, opts.config)
    elif opts.lab:
        (work / "tickwire.toml").write_text(guest_config(cfg))
        put_config(disk, work / "tickwire.toml")
    accel = opts.accel
    if accel == "auto":
        accel = "kvm" if kvm_usable(disk, work) else "tcg"
    say(
        f"accelerator: {accel}"
        + (
            " (KVM did not boot a kernel within its deadline)"
            if opts.accel == "auto" and accel == "tcg"
            else ""
        )
    )
    result: dict = {"ok": False, "accel": accel, "console": str(console)}
    agent = Agent(work / "agent.sock")
    last_state: dict = {}
    proc = None
    with contextlib.ExitStack() as stack:
        stack.enter_context(signals.stopping(_interrupted))  # cleanup runs on SIGTERM too
        if opts.lab:
            _exchange_up(cfg)
            stack.callback(_exchange_down, cfg)
        argv = qemu_argv(opts, disk, work / "ovmf-vars.fd", work / "agent.sock", console, accel)
        if opts.lab:
            argv = ["ip", "netns", "exec", cfg.lab.exchange_ns, *argv]
        t0 = time.monotonic()
        proc = subprocess.Popen(  # stdin: see kvm_usable
            argv,
            stdin=subprocess.DEVNULL,
            stdout=open(work / "qemu.log", "wb"),
            stderr=subprocess.STDOUT,
        )
        stack.callback(_stop_qemu, proc)
        stack.callback(agent.close)
        try:
            if opts.lab:
                _taps_up(cfg)
            st = _wait_ready(opts, proc, agent, console, t0, say, last_state)
            result.update(ready_s=st["ready_s"], firstboot=st.get("firstboot"), xdp=st.get("xdp"))
            say(f"ready in {st['ready_s']} s: tickwire.service active, consumer running")
            pf = _preflight(agent, say)
            result["preflight"] = {
                "ready": pf.get("ready"),
                "exit": pf.get("exit"),
                "stages": {s["stage"]: s["status"] for s in pf.get("stages", [])},
            }
            _require_ready(pf)
            if opts.check:
                result.update(_check(opts, cfg, agent, work, say))
            else:
                result["ok"] = True
        except BootError as e:
            result["error"] = str(e)
            result["units"] = last_state.get("units")
            result["firstboot"] = last_state.get("firstboot")
            result["console_tail"] = console_tail(console)
    if not keep and result["ok"] and not opts.reuse_disk:
        shutil.rmtree(work, ignore_errors=True)
    else:
        result["work"] = str(work)
    return result


def _interrupted() -> None:
    raise BootError("interrupted (SIGTERM or SIGINT): qemu stopped, namespace removed")


def _stop_qemu(proc) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# the guest runs ``tickwire preflight`` in a fresh interpreter while its consumer warms up;
# under TCG on a loaded host that has taken minutes
PREFLIGHT_TIMEOUT = 300.0


def _preflight(agent: Agent, say) -> dict:
    """The guest's preflight once it is ready, or its last answer after three tries (a
    stage may read a state the service is still settling into right after it came up)."""
    pf: dict = {}
    for attempt in range(3):
        if attempt:
            say(f"preflight not ready yet: {_not_ok(pf)}; asking again")
            time.sleep(10)
        pf = agent.ask("preflight", timeout=PREFLIGHT_TIMEOUT) or {}
        if pf.get("ready"):
            break
    return pf


def _not_ok(pf: dict) -> str:
    if not pf:
        return "no answer"
    bad = [f"{s['stage']} {s['status']}" for s in pf.get("stages", []) if s["status"] != "OK"]
    return ", ".join(bad) or pf.get("error", "not ready")


def _require_ready(pf: dict) -> None:
    if not pf:
        raise BootError(f"the guest's preflight did not answer within {PREFLIGHT_TIMEOUT:.0f} s")
    if not pf.get("ready"):
        raise BootError(f"the guest's preflight is not ready: {json.dumps(pf)[:1500]}")


def _check(opts: BootOptions, cfg: config.Config, agent: Agent, work: Path, say) -> dict:
    from host.appliance import replay

    out: dict = {}
    say("offline: tickwire book SESSION")
    book, replayed = replay.replay_file(str(opts.check))
    want, messages = book.digest(), replayed.messages
    cfg_path = work / "exchange.toml"
    lab = cfg.lab
    cfg_path.write_text(
        f'[lab]\nprefix = "{lab.prefix}"\n'
        + "".join(
            f'[lab.line_{k.lower()}]\ngroup = "{ln.group}"\nport = {ln.port}\n'
            f'exchange_if = "{ln.exchange_if}"\n'
            f'appliance_if = "{ln.appliance_if}"\nexchange_ip = "{ln.exchange_ip}"\n'
            f'appliance_ip = "{ln.appliance_ip}"\n'
            f"prefixlen = {ln.prefixlen}\n"
            for k, ln in lab.lines.items()
        )
        + f'[feed]\nsession = "{cfg.feed.session}"\n'
    )
    say(f"publishing {opts.check} on lines A and B")
    sim = [
        sys.executable,
        "-m",
        "host.cli",
        "sim",
        "--config",
        str(cfg_path),
        "--json",
        "--session",
        str(opts.check),
    ]
    done = subprocess.run(
        sim + ["--rate", "20000", "--eos-for", "3"],
        capture_output=True,
        text=True,
        timeout=opts.check_timeout,
    )
    if done.returncode != 0:
        raise BootError(f"the simulator failed: {done.stderr.strip()[-1500:]}")
    published = json.loads(done.stdout)
    deadline = time.monotonic() + 120
    while True:
        st = agent.ask("state", timeout=30) or {}
        c = (st.get("status") or {}).get("consumer") or {}
        if c.get("end_seq") and c.get("next_seq", 0) >= c["end_seq"]:
            break
        if time.monotonic() > deadline:
            raise BootError(
                f"the guest did not take the whole session within 120 s: {json.dumps(c)[:1200]}"
            )
        time.sleep(1)
    got = agent.ask("digest", timeout=120) or {"error": "the agent did not answer"}
    modes = st.get("xdp") or {}
    out.update(
        digest=got.get("digest"),
        digest_error=got.get("error"),
        expected_digest=want,
        xdp=modes,
        messages=messages,
        counters={
            k: c.get(k)
            for k in (
                "taken",
                "next_seq",
                "end_seq",
                "gaps_declared",
                "unrecoverable_gaps",
                "unrecoverable_messages",
                "stale",
            )
        },
        lines={
            k: {n: v.get(n) for n in ("packets", "messages", "duplicates", "malformed")}
            for k, v in c.get("lines", {}).items()
        },
        published={k: v.get("packets") for k, v in published.get("lines", {}).items()},
    )
    problems = []
    if got.get("digest") != want:
        problems.append(f"digest {got.get('digest')} != tickwire book's {want}")
    if not modes or any(m != "native" for m in modes.values()):
        problems.append(f"XDP not in driver (native) mode on every feed interface: {modes}")
    if c.get("unrecoverable_messages") or c.get("stale") or c.get("taken") != messages:
        problems.append(
            f"messages lost: taken {c.get('taken')} of {messages}, "
            f"unrecoverable {c.get('unrecoverable_messages')}"
        )
    out["problems"] = problems
    out["ok"] = not problems
    say("check: " + ("OK" if not problems else "; ".join(problems)))
    return out
