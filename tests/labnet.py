"""Test-side network helpers: a private lab per module, a plain kernel-socket receiver of
both lines in the appliance namespace, a re-request client, running ``tickwire sim``, and
running ``tickwire run`` (the appliance) in the background.

A test using them is marked ``lab`` (``tests/conftest.py`` skips it, naming what is missing,
where this machine cannot build a lab); nothing here skips.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time

from dataplane import moldudp64 as mold
from dataplane import shm
from host import config, netns
from host.appliance import runner
from host.exchange import lab
from tests.helpers import free_port, wait_for

SO_RCVBUFFORCE = 33  # <asm-generic/socket.h>; Python does not export it


def private_lab(tag: str, **lab_kw) -> config.Config:
    """A config whose prefix no other lab (or parallel test run) uses."""
    prefix = f"t{tag[:3]}{os.getpid() % 100000:05d}"[:10]
    return config.with_lab(prefix=prefix, **lab_kw)


@contextlib.contextmanager
def built(cfg: config.Config):
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
        """Until an end-of-session packet has arrived on both lines."""
        wait_for(
            lambda: all(any(p.parsed[0] == mold.P_END for p in self.line(ln)) for ln in ("A", "B")),
            timeout,
            "end-of-session on both lines",
        )

    def wait_packets(self, counts: dict[str, int], timeout: float = 60.0) -> None:
        """Until ``counts[letter]`` packets have arrived on each line named, e.g. as many
        as the simulator's summary says it sent."""
        wait_for(
            lambda: all(len(self.line(ln)) >= n for ln, n in counts.items()),
            timeout,
            f"{counts} packets",
            lambda: {ln: len(self.line(ln)) for ln in counts},
        )

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


def receive_messages(sock: socket.socket, messages: int, timeout: float = 30.0) -> list[bytes]:
    """MoldUDP64 packets from ``sock`` until they carry ``messages`` messages in all: an
    answer's size is known to the test, and anything beyond it would show up at the head
    of the next one."""
    out: list[bytes] = []
    got = 0
    deadline = time.monotonic() + timeout
    while got < messages:
        ready, _, _ = select.select([sock], [], [], max(deadline - time.monotonic(), 0))
        if not ready:
            raise AssertionError(f"{got} of {messages} messages answered within {timeout} s")
        out.append(sock.recv(65536))
        got += mold.parse(out[-1])[2]
    return out


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

    def answer(self, messages: int, timeout: float = 30.0) -> list[bytes]:
        return receive_messages(self.sock, messages, timeout)

    def close(self) -> None:
        self.sock.close()


def sim_cmd(cfg_path: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "host.cli", "sim", "--config", cfg_path, "--json", *args]


def write_config(cfg: config.Config, path) -> str:
    lc = cfg.lab
    text = (
        f'[lab]\nprefix = "{lc.prefix}"\nmtu = {lc.mtu}\nqueues = {lc.queues}\n'
        + (f"channels = {lc.channels}\n" if lc.channels != 1 else "")
        + (f"glimpse_port = {lc.glimpse_port}\n" if lc.glimpse_port else "")
        + f'[feed]\nsession = "{cfg.feed.session}"\n'
    )
    path.write_text(text)
    return str(path)


def sent_counts(summary: dict) -> dict[str, int]:
    """Packets each line put on the wire (data, heartbeats, end of session), by the
    simulator's own count in its JSON summary."""
    return {
        ln: s["packets"] + s["heartbeats"] + s["end_of_session"]
        for ln, s in summary["lines"].items()
    }


def run_sim(cfg_path: str, *args: str, timeout: float = 120.0) -> dict:
    done = subprocess.run(sim_cmd(cfg_path, *args), capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


class SimProcess:
    """``tickwire sim`` in the background; ``finish()`` returns its JSON summary."""

    def __init__(self, cfg_path: str, *args: str):
        self.proc = subprocess.Popen(
            sim_cmd(cfg_path, *args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )

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


# --- the appliance ------------------------------------------------------------------------
_channels = itertools.count()


class Appliance:
    """``tickwire run --lab`` in the background, with its own channel and metrics port."""

    def __init__(
        self,
        cfg,
        tmp_path,
        mode: str,
        *extra: str,
        until_eos: bool = True,
        run_extra: str = "",
        wrap: tuple[str, ...] = (),
        owner: int | None = None,
        channel: str | None = None,
        wait: bool = True,
    ):
        self.channel = channel or f"test{os.getpid()}{mode}{next(_channels)}"
        self.port = free_port()
        self.netns = cfg.lab.appliance_ns
        self.cfg_path = tmp_path / "run.toml"
        write_config(cfg, self.cfg_path)
        with open(self.cfg_path, "a") as f:
            f.write(
                f'[run]\nchannel = "{self.channel}"\nmetrics = "127.0.0.1:{self.port}"\n'
                + run_extra
            )
        if owner is not None:  # as Ansible's tmpfiles entry hands the service user its root
            cdir = shm.channel_dir(self.channel)
            cdir.mkdir(parents=True, exist_ok=True)
            os.chown(cdir, owner, owner)
        args = [
            *wrap,
            sys.executable,
            "-m",
            "host.cli",
            "run",
            "--config",
            str(self.cfg_path),
            "--lab",
            "--mode",
            mode,
            "--json",
            *extra,
        ]
        if until_eos:
            args.append("--until-eos")
        self.proc = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self.reader = None
        if wait:
            self.wait_running()

    def scrape(self, timeout: float = 60.0) -> str:
        """The run's metrics page (waiting for its endpoint to come up)."""
        import urllib.error
        import urllib.request

        def get():
            try:
                url = f"http://127.0.0.1:{self.port}/metrics"  # in the run's namespace
                with netns.entered(self.netns), urllib.request.urlopen(url, timeout=10) as r:
                    return r.read().decode()
            except (urllib.error.URLError, ConnectionError):
                return None

        return wait_for(get, timeout, "the run's metrics endpoint")

    def wait_running(self) -> None:
        try:
            # a run with an empty numba cache compiles the whole consumer first: about a
            # minute, more on a slow moment of this VM; the run gives up at its own
            # run.start_timeout_s (600 s) and says so
            self.reader = runner.wait_consumer(self.channel, self.proc, timeout=620)
        except BaseException:
            self.kill()  # the run never came up: no process, no shared memory left behind
            raise

    def wait_counters(self, condition, what: str, timeout: float = 60.0) -> dict:
        """The consumer's counters once ``condition(counters)`` holds."""

        def met():
            c = self.reader.counters()
            return c if condition(c) else None

        return wait_for(met, timeout, what, self.reader.counters)

    def wait_taken(self, n: int, timeout: float = 60.0) -> dict:
        return self.wait_counters(lambda c: c["taken"] >= n, f"{n} messages taken", timeout)

    def finish(self, terminate: bool = False, timeout: float = 120, rc: int = 0) -> dict:
        if terminate:
            self.proc.send_signal(signal.SIGTERM)
        out, err = self.proc.communicate(timeout=timeout)
        assert self.proc.returncode == rc, err
        self.stderr = err
        return json.loads(out)

    def kill(self) -> None:
        """Stop the run if it is still up: SIGTERM first, so it detaches its XDP programs
        (a SIGKILLed run leaves them on the lab's links, and every later run there
        refuses to replace them), SIGKILL only if it does not exit."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shm.remove(self.channel)


def run_session(cfg, tmp_path, mode: str, *sim_args: str, **appliance_kw) -> tuple[dict, dict]:
    """One ``tickwire run`` (``Appliance`` keywords) through one ``tickwire sim`` with
    ``sim_args``, both to the end; returns (the run's summary, the simulator's)."""
    app = Appliance(cfg, tmp_path, mode, **appliance_kw)
    try:
        sim = run_sim(write_config(cfg, tmp_path / "sim.toml"), *sim_args)
        return app.finish(), sim
    finally:
        app.kill()
