"""Test-side network helpers: a private lab per module, a plain kernel-socket receiver of
both lines in the appliance namespace, a re-request client, and running ``tickwire sim``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from dataplane import moldudp64 as mold
from host import config, netns
from host.exchange import lab

SO_RCVBUFFORCE = 33  # <asm-generic/socket.h>; Python does not export it


def lab_or_skip() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: network namespaces and veth pairs (CAP_NET_ADMIN)")
    if not os.path.isdir("/proc/self/ns") or not os.path.exists("/proc/self/ns/net"):
        pytest.skip("no network namespace support in this kernel")


def private_lab(tag: str, **lab_kw) -> config.Config:
    """A config whose prefix no other lab (or parallel test run) uses."""
    prefix = f"t{tag[:3]}{os.getpid() % 100000:05d}"[:10]
    return config.with_lab(prefix=prefix, **lab_kw)


@contextlib.contextmanager
def built(cfg: config.Config):
    lab_or_skip()
    try:
        lab.up(cfg.lab)
        yield cfg
    finally:
        lab.down(cfg.lab)


@dataclasses.dataclass
class Packet:
    line: str
    t: float
    data: bytes

    @property
    def parsed(self):
        return mold.parse(self.data)


class Receiver:
    """Joins both lines' groups in the appliance namespace and records every packet."""

    def __init__(self, cfg: config.Config):
        self.cfg = cfg
        self.packets: list[Packet] = []
        self.socks: dict[str, socket.socket] = {}
        with netns.entered(cfg.lab.appliance_ns):
            for letter, line in cfg.lab.lines.items():
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 64 << 20)
                s.bind((line.group, line.port))
                mreq = socket.inet_aton(line.group) + socket.inet_aton(line.appliance_ip)
                s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
                s.setblocking(False)
                self.socks[letter] = s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        by_fd = {s.fileno(): letter for letter, s in self.socks.items()}
        while not self._stop.is_set():
            ready, _, _ = select.select(list(self.socks.values()), [], [], 0.05)
            for s in ready:
                while True:
                    try:
                        data = s.recv(65536)
                    except BlockingIOError:
                        break
                    self.packets.append(Packet(by_fd[s.fileno()], time.monotonic(), data))

    def wait_eos(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(any(p.line == ln and p.parsed[0] == mold.P_END for p in self.line(ln))
                   for ln in ("A", "B")):  # fmt: skip
                return
            time.sleep(0.05)
        raise AssertionError("no end-of-session on both lines within the timeout")

    def line(self, letter: str) -> list[Packet]:
        return [p for p in list(self.packets) if p.line == letter]

    def data(self, letter: str) -> list[tuple[int, int, bytes]]:
        """(seq, count, payload after the header) of every data packet on a line."""
        out = []
        for p in self.line(letter):
            st, seq, count, _, _ = p.parsed
            if st == mold.P_DATA:
                out.append((seq, count, p.data[mold.HEADER_LEN :]))
        return out

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        for s in self.socks.values():
            s.close()


class Requester:
    """A re-request client in the appliance namespace, on line ``letter``'s address."""

    def __init__(self, cfg: config.Config, letter: str = "A"):
        self.cfg = cfg
        line = cfg.lab.lines[letter]
        with netns.entered(cfg.lab.appliance_ns):
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self.sock.bind((line.appliance_ip, 0))
        self.server = (line.exchange_ip, cfg.lab.rerequest_port)
        self.session = mold.session_bytes(cfg.feed.session)

    def send_raw(self, data: bytes) -> None:
        self.sock.sendto(data, self.server)

    def ask(self, seq: int, count: int, session: bytes | None = None) -> Requester:
        self.send_raw(mold.request(session or self.session, seq, count))
        return self

    def collect(self, quiet: float = 0.5, limit: float = 10.0) -> list[bytes]:
        """Packets until none arrived for ``quiet`` seconds (or ``limit`` in all)."""
        out = []
        end = time.monotonic() + limit
        while time.monotonic() < end:
            ready, _, _ = select.select([self.sock], [], [], quiet)
            if not ready:
                break
            out.append(self.sock.recv(65536))
        return out

    def close(self) -> None:
        self.sock.close()


def sim_cmd(cfg_path: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "host.cli", "sim", "--config", cfg_path, "--json", *args]


def write_config(cfg: config.Config, path) -> str:
    lc = cfg.lab
    text = f'[lab]\nprefix = "{lc.prefix}"\nmtu = {lc.mtu}\nqueues = {lc.queues}\n' \
           f'[feed]\nsession = "{cfg.feed.session}"\n'  # fmt: skip
    path.write_text(text)
    return str(path)


def run_sim(cfg_path: str, *args: str, timeout: float = 120.0) -> dict:
    done = subprocess.run(sim_cmd(cfg_path, *args), capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


class SimProcess:
    """``tickwire sim`` in the background; ``finish()`` returns its JSON summary."""

    def __init__(self, cfg_path: str, *args: str):
        self.proc = subprocess.Popen(sim_cmd(cfg_path, *args), stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)  # fmt: skip

    def finish(self, terminate: bool = False, timeout: float = 120.0) -> dict:
        if terminate and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        out, err = self.proc.communicate(timeout=timeout)
        assert self.proc.returncode == 0, err
        return json.loads(out)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
