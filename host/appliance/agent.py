"""``tickwire agent``: read-only state of this host over a virtio-serial port, for the host
that runs the appliance image in qemu (``tickwire image boot``) -- no SSH, no keys.

One request a line, one JSON answer a line. Requests are fixed words; none runs anything
the requester names:

- ``state``: first boot's record, the units' states, the running consumer's counters and
  line health (``tickwire status``), each feed interface's XDP attach mode, uptime.
- ``preflight``: ``tickwire preflight --config /etc/tickwire/tickwire.toml --json`` now.
- ``digest``: the live books' digest (a level snapshot taken by the consumer between
  packets; same definition as ``tickwire book``).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

from host import config
from host.appliance import firstboot


def _unit(name: str) -> dict:
    done = subprocess.run(
        ["systemctl", "show", name, "-p", "ActiveState,SubState,Result,ExecMainStatus,NRestarts"],
        capture_output=True,
        text=True,
    )
    return dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)


def _journal(unit: str, lines: int = 30) -> list[str]:
    done = subprocess.run(
        ["journalctl", "-u", unit, "-n", str(lines), "-o", "cat", "--no-pager"],
        capture_output=True,
        text=True,
    )
    return done.stdout.splitlines()


def _config() -> config.Config | None:
    try:
        return config.load(firstboot.ETC_CONFIG)
    except config.ConfigError:
        return None


def state() -> dict:
    from host.appliance import status

    cfg = _config()
    doc: dict = {
        "uptime_s": float(Path("/proc/uptime").read_text().split()[0]),
        "cmdline": Path("/proc/cmdline").read_text().strip(),
        "firstboot": json.loads(firstboot.STATE.read_text()) if firstboot.STATE.exists() else None,
        "units": {u: _unit(u) for u in ("tickwire-firstboot.service", "tickwire.service")},
    }
    if doc["units"]["tickwire.service"].get("SubState") != "running":
        doc["journal"] = _journal("tickwire.service")
    if cfg is not None:
        ifaces = sorted({cfg.run.line_a.interface, cfg.run.line_b.interface})
        doc["channel"] = cfg.run.channel
        try:
            doc["status"] = status.collect(cfg.run.channel)
        except Exception as e:  # noqa: BLE001 - reported, the agent keeps answering
            doc["status"] = {"error": f"{type(e).__name__}: {e}"}
        attached = (doc["status"].get("xdp") or []) if isinstance(doc["status"], dict) else []
        # each feed interface's attach mode as the kernel reports it: native (driver),
        # generic (skb) or offload; "none" when nothing is attached
        doc["xdp"] = {name: "none" for name in ifaces}
        for entry in attached:
            if entry["ifname"] in doc["xdp"]:
                doc["xdp"][entry["ifname"]] = entry["mode"]
    return doc


def preflight() -> dict:
    done = subprocess.run(
        [
            str(firstboot.VENV / "bin" / "tickwire"),
            "preflight",
            "--config",
            str(firstboot.ETC_CONFIG),
            "--json",
        ],
        capture_output=True,
        text=True,
    )
    try:
        return {"exit": done.returncode, **json.loads(done.stdout)}
    except ValueError:
        return {"exit": done.returncode, "error": done.stderr.strip()[-1000:]}


def digest() -> dict:
    from dataplane import shm

    cfg = _config()
    if cfg is None:
        return {"error": "no usable /etc/tickwire/tickwire.toml"}
    reader = shm.Reader(cfg.run.channel)
    # the consumer answers between packets; under emulation that can take a while
    return {"digest": reader.digest(timeout=60.0), "counters": reader.counters()}


REQUESTS = {"state": state, "preflight": preflight, "digest": digest}


def answer(request: str) -> dict:
    fn = REQUESTS.get(request.strip())
    if fn is None:
        return {"error": f"unknown request {request.strip()!r} (known: {', '.join(REQUESTS)})"}
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - an answer, never a dead agent
        return {"error": f"{type(e).__name__}: {e}"}


def serve(port: str) -> None:
    """Answer requests on ``port`` (a virtio-serial device) until killed."""
    fd = os.open(port, os.O_RDWR | os.O_NOCTTY)
    buf = b""
    while True:
        chunk = os.read(fd, 4096)
        if not chunk:  # the host side is not connected: wait for it
            time.sleep(0.5)
            continue
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            reply = json.dumps(answer(line.decode(errors="replace")), default=str) + "\n"
            data = reply.encode()
            while data:
                data = data[os.write(fd, data) :]
