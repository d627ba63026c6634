"""The XDP steering program (bpf/steer.c), its loader (host/appliance/loader.py) and the Python
mirror of bpf/common.h (dataplane/xdpabi.py).

Unit tier (no root): the mirror against the header, argument validation. Lab tier (root,
a private netns lab, real XDP on veth): counting and passing with no AF_XDP socket,
malformed frames, native/generic modes, the metadata block, and every exit path leaving
the interfaces clean.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from dataplane import xdpabi as abi
from host import netns
from host.appliance import bpfsys, loader
from tests.helpers import wait_for
from tests.labnet import Receiver, built, private_lab

ROOT = Path(__file__).resolve().parents[1]
HEADER = ROOT / "bpf" / "common.h"
STEER = ROOT / "bpf" / "steer.c"


# --- the mirror (no root) ------------------------------------------------------------------
def _header_defines() -> dict[str, int]:
    text = HEADER.read_text()
    return {m[1]: int(m[2]) for m in re.finditer(r"^#define\s+(TW_\w+)\s+(\d+)\b", text, re.M)}


def test_mirror_has_every_integer_constant_of_the_header():
    defines = _header_defines()
    assert defines["TW_MAX_CHANNELS"] == 64 and defines["TW_MAX_QUEUES"] == 64
    for name, value in defines.items():
        assert getattr(abi, name.removeprefix("TW_")) == value, name
    mirrored = {
        n
        for n in dir(abi)
        if re.fullmatch(
            r"(MAX|G|S|LINE)_[A-Z_]+|META_SIZE|"
            r"STATS_BASE",
            n,
        )
        and isinstance(getattr(abi, n), int)
    }
    assert mirrored == {n.removeprefix("TW_") for n in defines}


@pytest.mark.needs("gcc")
def test_mirror_matches_the_compiled_header():
    cc = shutil.which("gcc")
    structs = {"tw_chan_key": abi.CHAN_KEY, "tw_chan_val": abi.CHAN_VAL, "tw_meta": abi.META}
    lines = [
        "#include <stdio.h>",
        "#include <stddef.h>",
        '#include "common.h"',
        '#define P(k, v) printf("\\"%s\\": %lld,\\n", k, (long long)(v))',
        "int main(void) {",
        'printf("{\\n");',
        'P("STATS_LEN", TW_STATS_LEN);',
    ]
    for name in _header_defines():
        lines.append(f'P("{name.removeprefix("TW_")}", {name});')
    for struct_name, dt in structs.items():
        lines.append(f'P("sizeof {struct_name}", sizeof(struct {struct_name}));')
        for field in dt.names:
            lines.append(f'P("{struct_name}.{field}", offsetof(struct {struct_name}, {field}));')
            lines.append(
                f'P("{struct_name}.{field} size", sizeof(((struct {struct_name} *)0)->{field}));'
            )
    lines += ['printf("\\"end\\": 0}\\n");', "return 0;", "}"]
    build = Path(os.environ.get("TMPDIR", "/tmp")) / f"twabi{os.getpid()}"
    build.mkdir(exist_ok=True)
    try:
        (build / "abi.c").write_text("\n".join(lines))
        subprocess.run(
            [
                cc,
                "-Wall",
                "-Werror",
                f"-I{HEADER.parent}",
                "-o",
                str(build / "abi"),
                str(build / "abi.c"),
            ],
            check=True,
            capture_output=True,
        )
        got = json.loads(
            subprocess.run([str(build / "abi")], check=True, capture_output=True, text=True).stdout
        )
    finally:
        shutil.rmtree(build)
    assert got["STATS_LEN"] == abi.STATS_LEN == 8 + 64 * 2 * 2
    for name in _header_defines():
        assert got[name.removeprefix("TW_")] == getattr(abi, name.removeprefix("TW_")), name
    for struct_name, dt in structs.items():
        assert got[f"sizeof {struct_name}"] == dt.itemsize, struct_name
        for field in dt.names:
            fdt, off = dt.fields[field][:2]
            assert got[f"{struct_name}.{field}"] == off, (struct_name, field)
            assert got[f"{struct_name}.{field} size"] == fdt.itemsize, (struct_name, field)
    assert abi.META.itemsize == abi.META_SIZE == 16


def test_program_declares_the_mirrored_maps():
    text = STEER.read_text()
    declared = set(re.findall(r"^BPF_\w+\((tw_\w+)", text, re.M))
    assert declared == {abi.MAP_CHANNELS, abi.MAP_IFSLOTS, abi.MAP_XSKS, abi.MAP_STATS}
    assert re.search(rf"^int {abi.PROG_NAME}\(struct xdp_md \*ctx\)", text, re.M)
    assert "XDP_DROP" not in text


def test_channel_key_is_in_network_byte_order():
    key = abi.chan_key(socket.inet_aton("239.77.1.1"), 26477)
    assert key.tobytes() == socket.inet_aton("239.77.1.1") + struct.pack("!H", 26477) + b"\0\0"
    assert abi.stat_index(63, abi.LINE_B, abi.S_BYTES) == abi.STATS_LEN - 1


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"interfaces": []}, "interfaces"),
        ({"interfaces": "feed-a"}, "interfaces"),
        ({"interfaces": ["feed-a", "feed-a"]}, "twice"),
        ({"mode": "fast"}, "mode"),
        ({"channels": [("239.1.1.1", 0, 1, "A")]}, "port"),
        ({"channels": [("239.1.1.1", 1, 64, "A")]}, "channel id"),
        ({"channels": [("239.1.1.1", 1, 1, "C")]}, "line"),
        ({"channels": [("not-an-ip", 1, 1, "A")]}, "IPv4"),
        ({"channels": [("239.1.1.1", 1, 1, "A"), ("239.1.1.1", 1, 2, "A")]}, "twice"),
        ({"channels": [("239.1.1.1", 1, 1, "A"), ("239.1.1.2", 1, 1, "A")]}, "twice"),
    ],
)
def test_bad_arguments_are_value_errors(kw, match):
    args = {"interfaces": ["feed-a"], "channels": [("239.1.1.1", 1, 1, "A")]} | kw
    with pytest.raises(ValueError, match=match):
        loader.Steering(**args)


# --- errors before any interface is touched --------------------------------------------------
@pytest.mark.needs("bcc")
def test_compile_failure_shows_the_compiler_message(tmp_path, monkeypatch, capfd):
    broken = tmp_path / "steer.c"
    broken.write_text(
        '#include "common.h"\nint tw_steer(struct xdp_md *ctx) { return no_such_thing; }\n'
    )
    monkeypatch.setattr(loader, "STEER_SRC", broken)
    with pytest.raises(loader.AttachError, match="does not compile.*no_such_thing") as e:
        loader.Steering(["lo"], [("239.1.1.1", 1, 1, "A")])
    assert e.value.errno == errno.EINVAL
    assert "no_such_thing" not in capfd.readouterr().err  # in the error, not on the terminal


UNPRIVILEGED = """
import os
os.setgroups([]); os.setgid(65534); os.setuid(65534)
from host.appliance.loader import AttachError, Steering
try:
    Steering(["lo"], [("239.1.1.1", 1, 1, "A")])
except AttachError as e:
    print(e.errno, e.strerror)
"""


@pytest.mark.needs("bcc")
def test_without_privilege_it_says_run_as_root():
    if os.geteuid() == 0:  # drop to nobody in a child
        done = subprocess.run(
            [sys.executable, "-c", UNPRIVILEGED],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        code, _, message = done.stdout.strip().partition(" ")
        assert done.stderr == ""
    else:
        with pytest.raises(loader.AttachError) as e:
            loader.Steering(["lo"], [("239.1.1.1", 1, 1, "A")])
        code, message = str(e.value.errno), e.value.strerror
    assert int(code) == errno.EPERM and "run as root" in message


# --- the lab -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cfg():
    with built(private_lab("stg")) as c:
        yield c


@pytest.fixture
def appl(cfg):
    """The appliance namespace's name; after the test nothing may be attached there."""
    ns = cfg.lab.appliance_ns
    yield ns
    left = loader.attached(ns)
    for entry in left:  # clean up so one failure does not spread, then fail
        loader.detach(entry["ifname"], ns)
    assert left == []
    assert "prog/xdp" not in _ip_link(ns)


CHANNEL = 5  # both lines of one channel, so (channel, line) indexing is exercised
EXTRA = ("239.77.9.9", 30000, 63, "A")  # the last channel id, never sent to


def _channels(cfg) -> list[tuple[str, int, int, str]]:
    a, b = cfg.lab.line_a, cfg.lab.line_b
    return [(a.group, a.port, CHANNEL, "A"), (b.group, b.port, CHANNEL, "B"), EXTRA]


def _ifaces(cfg) -> list[str]:
    return [cfg.lab.line_a.appliance_if, cfg.lab.line_b.appliance_if]


def _ip_link(ns: str) -> str:
    return subprocess.run(
        ["ip", "-n", ns, "-d", "link", "show"], check=True, capture_output=True, text=True
    ).stdout


def _udp_sender(cfg, letter: str) -> socket.socket:
    line = cfg.lab.lines[letter]
    with netns.entered(cfg.lab.exchange_ns):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((line.exchange_ip, 0))
    s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(line.exchange_ip))
    return s


def _frame_len(payload: int, vlan: bool = False) -> int:
    return 14 + (4 if vlan else 0) + 20 + 8 + payload


def _send_feed(cfg, counts: dict[str, list[int]]) -> dict[str, int]:
    """Send datagrams of the given payload sizes on each line; returns frame bytes."""
    sent = {}
    for letter, sizes in counts.items():
        line = cfg.lab.lines[letter]
        with contextlib.closing(_udp_sender(cfg, letter)) as s:
            for n in sizes:
                s.sendto(bytes([len(sent)]) * n, (line.group, line.port))
        sent[letter] = sum(_frame_len(n) for n in sizes)
    return sent


@pytest.mark.lab
@pytest.mark.needs("xdp")
def test_subscribed_traffic_is_counted_and_passed_without_a_socket(cfg, appl):
    """(a) and (c): native on veth; no AF_XDP socket, so everything reaches the kernel."""
    la = cfg.lab.line_a
    sizes = {"A": [1, 100, 1000, 1400, 7], "B": [50, 60, 70]}
    other_port = 40001  # no line uses it
    with netns.entered(appl):
        other = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    notices: list[str] = []
    rx = Receiver(cfg)
    try:
        other.bind(("", other_port))
        other.setsockopt(
            socket.IPPROTO_IP,
            socket.IP_ADD_MEMBERSHIP,
            socket.inet_aton(la.group) + socket.inet_aton(la.appliance_ip),
        )
        other.settimeout(5)
        with loader.Steering(_ifaces(cfg), _channels(cfg), log=notices.append, netns=appl) as st:
            assert st.mode == {la.appliance_if: "native", cfg.lab.line_b.appliance_if: "native"}
            assert notices == []
            progs = loader.attached(appl)
            assert sorted(p["ifname"] for p in progs) == sorted(_ifaces(cfg))
            assert {(p["mode"], p["prog_id"], p["prog_name"]) for p in progs} == {
                ("native", st.prog_id, abi.PROG_NAME)
            }
            assert "prog/xdp" in _ip_link(appl)
            assert st.xsk_slot(la.appliance_if, 0) != st.xsk_slot(cfg.lab.line_b.appliance_if, 0)

            sent = _send_feed(cfg, sizes)
            total = sum(len(v) for v in sizes.values())
            wait_for(lambda: len(rx.packets) == total, 20, "the kernel getting them all")
            assert sorted(len(p.data) for p in rx.line("A")) == sorted(sizes["A"])
            assert sorted(len(p.data) for p in rx.line("B")) == sorted(sizes["B"])
            stats = st.stats()
            assert stats["channels"] == {
                (CHANNEL, "A"): {"packets": len(sizes["A"]), "bytes": sent["A"]},
                (CHANNEL, "B"): {"packets": len(sizes["B"]), "bytes": sent["B"]},
                (63, "A"): {"packets": 0, "bytes": 0},
            }
            assert stats["no_socket"] == total
            assert (
                stats["redirected"],
                stats["malformed"],
                stats["meta_fail"],
                stats["no_slot"],
                stats["fragment"],
            ) == (0, 0, 0, 0, 0)

            # unsubscribed traffic keeps working: ping, unicast UDP, the group on another port
            before = stats["pass_other"]
            ping = subprocess.run(
                [
                    "ip",
                    "netns",
                    "exec",
                    cfg.lab.exchange_ns,
                    "ping",
                    "-c",
                    "2",
                    "-i",
                    "0.2",
                    "-W",
                    "2",
                    la.appliance_ip,
                ],
                capture_output=True,
                text=True,
            )
            assert ping.returncode == 0, ping.stdout + ping.stderr
            with contextlib.closing(_udp_sender(cfg, "A")) as s:
                s.sendto(b"unicast", (la.appliance_ip, other_port))
                assert other.recv(100) == b"unicast"
                s.sendto(b"same group, other port", (la.group, other_port))
                assert other.recv(100) == b"same group, other port"
            after = st.stats()
            assert after["pass_other"] >= before + 2 + 2  # echo requests and both datagrams
            assert after["channels"] == stats["channels"]
            assert after["no_socket"] == total
    finally:
        rx.close()
        other.close()


# raw frames from the exchange side -----------------------------------------------------
def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def _ipv4(
    src: str,
    dst: str,
    payload: bytes,
    *,
    proto: int = 17,
    ihl: int = 5,
    tot_len: int | None = None,
    frag: int = 0,
    options: bytes = b"",
) -> bytes:
    tot = 4 * ihl + len(payload) if tot_len is None else tot_len
    hdr = (
        struct.pack(
            "!BBHHHBBH4s4s",
            0x40 | ihl,
            0,
            tot,
            1,
            frag,
            1,
            proto,
            0,
            socket.inet_aton(src),
            socket.inet_aton(dst),
        )
        + options
    )
    hdr = hdr[:10] + struct.pack("!H", _csum(hdr)) + hdr[12:]
    return hdr + payload


def _udp(dport: int, payload: bytes, length: int | None = None) -> bytes:
    return (
        struct.pack("!HHHH", 40000, dport, 8 + len(payload) if length is None else length, 0)
        + payload
    )


def _eth(proto: int, body: bytes, tags: tuple[int, ...] = ()) -> bytes:
    """dst (the group's MAC), src, one (TPID, TCI=100) per tag, ethertype, body."""
    hdr = bytes.fromhex("01005e4d0101") + bytes.fromhex("020000000001")
    hdr += b"".join(struct.pack("!HH", tpid, 100) for tpid in tags)
    return hdr + struct.pack("!H", proto) + body


@pytest.mark.lab
@pytest.mark.needs("xdp")
def test_malformed_and_odd_frames_are_counted_and_passed(cfg, appl):
    """(b): raw frames through the veth; nothing crashes, each lands in its counter."""
    la = cfg.lab.line_a
    src, grp = la.exchange_ip, la.group
    good_udp = _udp(la.port, b"m" * 32)
    good_ip = _ipv4(src, grp, good_udp)
    malformed = [
        _eth(0x8100, b"\x00\x64"),  # truncated VLAN tag
        _eth(0x0800, good_ip[:10]),  # truncated IPv4 header
        _eth(0x0800, _ipv4(src, grp, good_udp, ihl=4)),  # ihl below 5
        _eth(0x0800, _ipv4(src, grp, good_udp, ihl=7)[:24]),  # options cut off
        _eth(0x0800, _ipv4(src, grp, good_udp, tot_len=200)),  # longer than the frame
        _eth(0x0800, _ipv4(src, grp, good_udp, tot_len=10)),  # shorter than its header
        _eth(0x0800, _ipv4(src, grp, good_udp[:4], tot_len=24)),  # truncated UDP
        _eth(0x0800, _ipv4(src, grp, _udp(la.port, b"m" * 32, length=7))),  # udp len < 8
        _eth(0x0800, _ipv4(src, grp, _udp(la.port, b"m" * 32, length=41))),  # > IP payload
        _eth(0x0800, b"\x60" + good_ip[1:]),  # version 6 in an IPv4 ethertype
    ]
    fragments = [
        _eth(0x0800, _ipv4(src, grp, good_udp, frag=0x2000)),  # first fragment (MF)
        _eth(0x0800, _ipv4(src, grp, b"x" * 16, frag=0x0004)),  # a later fragment
    ]
    other = [
        _eth(0x86DD, b"\x60" + b"\0" * 60),  # IPv6
        _eth(0x0800, _ipv4(src, grp, b"\0" * 8, proto=1)),  # ICMP
        _eth(0x0800, good_ip, tags=(0x88A8, 0x8100)),  # two tags: only one is parsed
    ]
    with_options = _eth(0x0800, _ipv4(src, grp, good_udp, ihl=6, options=b"\x01" * 4))
    padded = _eth(0x0800, good_ip + b"\0" * 20)  # Ethernet padding after the datagram
    steered = [
        _eth(0x0800, good_ip, tags=(0x8100,)),  # 802.1Q tagged, subscribed
        _eth(0x0800, good_ip, tags=(0x88A8,)),  # 802.1AD tagged, subscribed
        with_options,
        padded,
    ]
    with loader.Steering(_ifaces(cfg), _channels(cfg), netns=appl) as st:
        before = st.stats()
        with netns.entered(cfg.lab.exchange_ns):
            raw = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        with contextlib.closing(raw):
            raw.bind((la.exchange_if, 0))
            for frame in malformed + fragments + other + steered:
                assert raw.send(frame) == len(frame)

        want_bytes = sum(len(f) for f in steered)

        def arrived() -> bool:
            s = st.stats()
            return (
                s["channels"][(CHANNEL, "A")]["packets"] == len(steered)
                and s["malformed"] == len(malformed)
                and s["fragment"] == len(fragments)
            )

        wait_for(arrived, 20, "the packets", st.stats)
        after = st.stats()
        assert after["malformed"] - before["malformed"] == len(malformed)
        assert after["fragment"] - before["fragment"] == len(fragments)
        assert after["pass_other"] - before["pass_other"] >= len(other)
        assert after["channels"][(CHANNEL, "A")] == {"packets": len(steered), "bytes": want_bytes}
        assert after["no_socket"] - before["no_socket"] == len(steered)
        assert after["meta_fail"] == after["no_slot"] == after["redirected"] == 0
        # and the interface still works
        ping = subprocess.run(
            [
                "ip",
                "netns",
                "exec",
                cfg.lab.exchange_ns,
                "ping",
                "-c",
                "1",
                "-W",
                "2",
                la.appliance_ip,
            ],
            capture_output=True,
        )
        assert ping.returncode == 0


# the metadata block, through BPF_PROG_TEST_RUN ---------------------------------------------
def _test_run(prog_fd: int, frame: bytes, ifindex: int) -> tuple[int, bytes]:
    """Run the program once on ``frame`` as if received on ``ifindex`` queue 0 (in the
    calling thread's namespace); returns (action, bytes from data_meta to data_end)."""
    data_out = bytearray(len(frame) + 256)
    run = bpfsys.prog_run(prog_fd, frame, ctx=bpfsys.xdp_md(len(frame), ifindex), data_out=data_out)
    return run.retval, bytes(data_out[: run.data_size_out])


@pytest.mark.lab
@pytest.mark.needs("xdp")
def test_metadata_sits_in_front_of_a_steered_frame(cfg, appl):
    la, lb = cfg.lab.line_a, cfg.lab.line_b
    frame = _eth(0x0800, _ipv4(lb.exchange_ip, lb.group, _udp(lb.port, b"payload")))
    with loader.Steering(_ifaces(cfg), _channels(cfg), netns=appl) as st:
        with netns.entered(appl):
            ifindex = socket.if_nametoindex(lb.appliance_if)
            t0 = time.monotonic_ns()
            act, out = _test_run(st.prog_fd, frame, ifindex)
            t1 = time.monotonic_ns()
            other = _eth(0x0800, _ipv4(la.exchange_ip, la.group, _udp(9, b"x")))
            act_other, out_other = _test_run(
                st.prog_fd, other, socket.if_nametoindex(la.appliance_if)
            )
        assert act == 2  # XDP_PASS: the redirect fell back, no socket in the slot
        assert len(out) == abi.META_SIZE + len(frame) and out[abi.META_SIZE :] == frame
        meta = np.frombuffer(out[: abi.META_SIZE], abi.META)[0]
        assert (int(meta["channel"]), int(meta["line"])) == (CHANNEL, abi.LINE_B)
        assert t0 <= int(meta["rx_ns"]) <= t1  # CLOCK_MONOTONIC, like time.monotonic_ns
        assert (act_other, out_other) == (2, other)  # not subscribed: no metadata
        assert st.stats()["channels"][(CHANNEL, "B")]["packets"] == 1


@pytest.mark.lab
@pytest.mark.needs("xdp", "afxdp")
def test_steered_frames_reach_an_af_xdp_socket_with_metadata(cfg, appl):
    """The whole path: a socket on line B's interface, registered at that interface's
    slot (line A's interface owns slot 0, so B's queue 0 is not key 0), gets exactly line
    B's datagrams, each with its tw_meta 16 bytes before it in the UMEM; line A, with no
    socket, still goes to the kernel."""
    from dataplane import xsk

    la, lb = cfg.lab.line_a, cfg.lab.line_b
    sizes = [8, 100, 333, 1200, 64]
    with loader.Steering(_ifaces(cfg), _channels(cfg), netns=appl) as st:
        slot = st.xsk_slot(lb.appliance_if, 0)
        assert slot == 1 and st.xsk_slot(la.appliance_if, 0) == 0
        with netns.entered(appl):
            sock = xsk.XskSocket(
                lb.appliance_if,
                0,
                frames=64,
                fill_size=64,
                comp_size=64,
                rx_size=64,
                hugepages=False,
            )
        with sock:
            sock.register(st.xsks_map_fd, slot)
            ri, umem = sock.ring_info, sock.umem.array
            t0 = time.monotonic_ns()
            sent = _send_feed(cfg, {"B": sizes, "A": [10, 20]})
            got: list[tuple[bytes, np.void]] = []
            deadline = time.monotonic() + 5
            while len(got) < len(sizes) and time.monotonic() < deadline:
                n, idx = xsk.rx_peek(ri, 64)
                for i in range(n):
                    addr, length = xsk.rx_desc(ri, idx + i)
                    meta = np.frombuffer(umem[addr - abi.META_SIZE : addr].tobytes(), abi.META)
                    got.append((umem[addr : addr + length].tobytes(), meta[0]))
                    _, fidx = xsk.fill_reserve(ri, 1)
                    xsk.fill_addr_set(ri, fidx, xsk.frame_addr(ri, addr))
                    xsk.fill_submit(ri, 1)
                xsk.rx_release(ri, n)
                if not n:
                    time.sleep(0.005)
            t1 = time.monotonic_ns()
        assert sorted(len(frame) - 42 for frame, _ in got) == sorted(sizes)
        for frame, meta in got:
            assert frame[30:34] == socket.inet_aton(lb.group)  # IPv4 destination
            assert (int(meta["channel"]), int(meta["line"])) == (CHANNEL, abi.LINE_B)
            assert t0 <= int(meta["rx_ns"]) <= t1
        wait_for(lambda: st.stats()["no_socket"] == 2, 20, "no_socket == 2", st.stats)
        stats = st.stats()
        assert stats["redirected"] == len(sizes)
        assert stats["channels"][(CHANNEL, "B")] == {"packets": len(sizes), "bytes": sent["B"]}
        assert stats["channels"][(CHANNEL, "A")] == {"packets": 2, "bytes": sent["A"]}


# modes ------------------------------------------------------------------------------------
@pytest.mark.lab
@pytest.mark.needs("xdp")
def test_forced_generic_mode(cfg, appl):
    """(c): generic (skb) mode on request, and it counts the same way."""
    with loader.Steering(_ifaces(cfg), _channels(cfg), mode="generic", netns=appl) as st:
        assert set(st.mode.values()) == {"generic"}
        assert {p["mode"] for p in loader.attached(appl)} == {"generic"}
        assert "xdpgeneric" in _ip_link(appl)
        rx = Receiver(cfg)
        try:
            sent = _send_feed(cfg, {"A": [10, 20]})
            wait_for(lambda: len(rx.line("A")) == 2, 20, "2 packets on A")
        finally:
            rx.close()
        assert st.stats()["channels"][(CHANNEL, "A")] == {"packets": 2, "bytes": sent["A"]}


@pytest.mark.lab
@pytest.mark.needs("xdp")
def test_auto_falls_back_to_generic_once_and_native_says_why(cfg, appl):
    """Loopback has no native XDP: auto falls back with one log line; native refuses."""
    notices: list[str] = []
    with loader.Steering(["lo"], _channels(cfg), log=notices.append, netns=appl) as st:
        assert st.mode == {"lo": "generic"}
        assert len(notices) == 1 and "generic" in notices[0] and "lo" in notices[0]
    with pytest.raises(loader.AttachError, match="use mode generic") as e:
        loader.Steering(["lo"], _channels(cfg), mode="native", netns=appl)
    assert e.value.errno == errno.EOPNOTSUPP


# every exit path leaves nothing attached -------------------------------------------------
@pytest.mark.lab
@pytest.mark.needs("xdp")
def test_exception_inside_the_block_detaches(cfg, appl):
    """(d)"""
    with pytest.raises(RuntimeError, match="boom"):
        with loader.Steering(_ifaces(cfg), _channels(cfg), netns=appl):
            assert len(loader.attached(appl)) == 2
            raise RuntimeError("boom")
    assert loader.attached(appl) == []  # the fixture checks ip -d link too


@pytest.mark.lab
@pytest.mark.needs("xdp")
@pytest.mark.parametrize(
    ("second", "mode", "code"),
    [
        ("nosuch0", "auto", errno.ENODEV),  # the interface does not exist
        ("lo", "native", errno.EOPNOTSUPP),  # the kernel refuses the attach itself
    ],
)
def test_failure_on_the_second_interface_detaches_the_first(cfg, appl, second, mode, code):
    """(d): the first interface was attached when the second failed."""
    first = cfg.lab.line_a.appliance_if
    with pytest.raises(loader.AttachError) as e:
        loader.Steering([first, second], _channels(cfg), mode=mode, netns=appl)
    assert e.value.errno == code and second in str(e.value)
    assert loader.attached(appl) == []


HOLDER = """
import sys
from host.appliance.loader import Steering
ns, a, b, group, port = sys.argv[1:6]
s = Steering([a, b], [(group, int(port), 1, "A")], netns=ns)
print(" ".join(sorted(s.mode.values())), flush=True)
sys.stdin.readline()  # blocks until the test signals, or closes stdin to let it exit
"""


@pytest.mark.lab
@pytest.mark.needs("xdp")
@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT", "exit"])
def test_a_process_holding_steering_leaves_nothing_when_it_ends(cfg, appl, how):
    """(e): a signal (the default action still ends the process with that signal), or
    a plain exit without close() (atexit)."""
    la = cfg.lab.line_a
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, appl, *_ifaces(cfg), la.group, str(la.port)],
        cwd=ROOT,
        # a shell that started the tests in the background left SIGINT ignored, and a
        # process inherits that: give the holder the default a service starts with
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().split() == ["native", "native"], proc.stderr.read()
        assert len(loader.attached(appl)) == 2
        if how == "exit":
            _, err = proc.communicate(input="\n", timeout=30)
            assert proc.returncode == 0, err
        else:
            sig = getattr(signal, how)
            proc.send_signal(sig)
            try:  # detaching goes through netlink in the lab's namespace: slow when loaded
                code = proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
                raise AssertionError(f"not ended by {how}: {proc.communicate()[1]}") from None
            assert code == -sig
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            pipe.close()
    assert loader.attached(appl) == []


@pytest.mark.lab
@pytest.mark.needs("xdp")
def test_refuses_to_replace_a_program_it_did_not_attach(cfg, appl, monkeypatch):
    """(f): another Steering, or anyone else's program, stays where it is."""
    la = cfg.lab.line_a
    with loader.Steering([la.appliance_if], _channels(cfg), netns=appl) as first:
        with pytest.raises(loader.AttachError, match="does not replace") as e:
            loader.Steering([la.appliance_if], _channels(cfg), netns=appl)
        assert e.value.errno == errno.EBUSY
        progs = loader.attached(appl)
        assert [(p["ifname"], p["prog_id"]) for p in progs] == [(la.appliance_if, first.prog_id)]
    # someone else's program, in generic mode: auto must not try around it either
    from bcc import BPF
    from pyroute2 import IPRoute

    foreign = BPF(text=b"int other(struct xdp_md *ctx) { return XDP_PASS; }")
    try:
        fn = foreign.load_func(b"other", BPF.XDP)
        with netns.entered(appl), IPRoute() as ipr:
            idx = ipr.link_lookup(ifname=la.appliance_if)[0]
            ipr.link(
                "set",
                index=idx,
                xdp={"attrs": [("IFLA_XDP_FD", fn.fd), ("IFLA_XDP_FLAGS", abi.XDP_FLAGS_SKB_MODE)]},
            )
        for mode in ("auto", "native", "generic"):
            with pytest.raises(loader.AttachError, match="does not replace"):
                loader.Steering([la.appliance_if], _channels(cfg), mode=mode, netns=appl)
            assert [(p["prog_name"], p["mode"]) for p in loader.attached(appl)] == [
                ("other", "generic")
            ]
        # without the loader's own check, the kernel refuses (UPDATE_IF_NOEXIST), and the
        # clean-up after the failed attach leaves the other program alone (REPLACE + expected)
        with monkeypatch.context() as m:
            m.setattr(loader, "_xdp_progs", lambda link: [])
            for mode in ("auto", "native", "generic"):
                with pytest.raises(loader.AttachError, match="does not replace") as e:
                    loader.Steering([la.appliance_if], _channels(cfg), mode=mode, netns=appl)
                assert e.value.errno in (errno.EBUSY, errno.EEXIST)
        assert [(p["prog_name"], p["mode"]) for p in loader.attached(appl)] == [
            ("other", "generic")
        ]
        assert loader.detach(la.appliance_if, appl) == ["generic"]
        assert loader.detach(la.appliance_if, appl) == []
    finally:
        with contextlib.suppress(Exception):
            loader.detach(la.appliance_if, appl)
        foreign.cleanup()


@pytest.mark.lab
@pytest.mark.needs("xdp")
def test_works_from_a_thread_inside_the_namespace(cfg, appl):
    """host.exchange.lab.entered switches only the calling thread; the loader follows it, and a
    close() from another thread still reaches the namespace."""
    box: dict = {}

    def attach():
        try:
            with netns.entered(appl):
                box["st"] = loader.Steering(_ifaces(cfg), _channels(cfg))
        except BaseException as e:  # handed to the test thread
            box["err"] = e

    t = threading.Thread(target=attach)
    t.start()
    t.join()
    assert "err" not in box, box.get("err")
    st = box["st"]
    try:
        assert len(loader.attached(appl)) == 2
        assert all(p["ifname"] not in _ifaces(cfg) for p in loader.attached(None))
    finally:
        st.close()
    assert loader.attached(appl) == []


def test_missing_namespace_is_a_clear_error():
    with pytest.raises(loader.AttachError, match="does not exist") as e:
        loader.attached("tw-no-such-ns")
    assert e.value.errno == errno.ENOENT
    assert not os.path.exists("/var/run/netns/tw-no-such-ns")  # looked up, never created


def test_verifier_rejections_show_the_reason_at_the_end_of_the_log():
    """A verifier states why it rejects a program on the last lines of a long log; the
    loader's one-line error keeps those (found when Debian 12's 6.1 rejected tw_steer)."""
    from host.appliance import bpfsys

    log = "\n".join(
        ["bpf: Failed to load program: Invalid argument", "0: R1=ctx() R10=fp0"]
        + [f"{i}: (bf) r{i % 9} = r1" for i in range(1, 40)]
        + ["84: (0f) r4 += r3", "math between pkt pointer and register with unbounded min value"]
    )
    line = bpfsys.brief(log, 2, tail=2)
    assert line.startswith("bpf: Failed to load program") and "... (39 more lines)" in line
    assert line.endswith(
        "84: (0f) r4 += r3 | math between pkt pointer and register with unbounded min value"
    )
    assert bpfsys.brief("a\nb", 2, tail=6) == "a | b"
