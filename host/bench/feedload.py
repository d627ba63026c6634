"""The feed bench's clients: ``N`` WebSocket connections in one process (picows on uvloop),
each following one subscription of a ``tickwire serve`` channel (or of the library fan-out,
``host.bench.fanout``) and timing every event it gets.

Run as ``python -m host.bench.feedload URL --clients N [--stalled K] --channel C`` (the bench
starts it in the lab's exchange namespace, across line A). It prints ``ready`` on stderr once
every connection is up, then follows until each live connection has its ``END`` frame (the
end of session) or ``--seconds`` pass, and prints one JSON object.

Latency of an event = the client's clock when the frame holding it was handed to the
listener, minus the event's publish stamp (``rx_ns + apply_dt + pub_dt``: the moment the
consumer put it in the ring). The client's clock is the ring's own (``events.read_ns`` on the
ring's header in ``/dev/shm``: the TSC when the consumer uses it, else CLOCK_MONOTONIC): the
bench runs on one host, so ring-to-client latency is one clock minus itself. Channel events
(no receive stamp) are not timed. The histogram is ``dataplane.shm``'s (1/8 resolution).

A stalled connection (``--stalled``) subscribes like the others, then stops reading (its
transport's ``pause_reading``, and a 4 KiB receive buffer): the server should evict it. At
the end it reads again to learn how it was told (the error frame, when it got through).

Each connection checks the stream's contract as it goes (every ``EVENTS`` frame starts where
the last one ended) and counts breaks; the result also says per connection how it ended.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
import time

import numpy as np
from numba import njit
from picows import WSListener, WSMsgType, ws_connect

from dataplane import events as ev
from dataplane import shm
from host.appliance import feedwire as fw

HDR = fw.HEADER.size
_RX = fw.WIRE_EVENT.fields["rx_ns"][1]
_APPLY = fw.WIRE_EVENT.fields["apply_dt"][1]
_PUB = fw.WIRE_EVENT.fields["pub_dt"][1]
_WIRE = fw.WIRE_EVENT.itemsize


@njit(cache=True, nogil=True)
def _account(buf, count, hdr, clk, ts, hist):
    """Time the ``count`` events of an ``EVENTS`` frame ``buf`` (header included) against the
    ring's clock now; returns how many were timed."""
    now = ev.stamp(hdr, clk, ts)
    timed = 0
    for k in range(count):
        o = HDR + k * _WIRE
        rx = np.int64(0)
        for b in range(8):
            rx |= np.int64(buf[o + _RX + b]) << (8 * b)
        if rx == 0:
            continue
        a = np.int64(0)
        p = np.int64(0)
        for b in range(4):
            a |= np.int64(buf[o + _APPLY + b]) << (8 * b)
            p |= np.int64(buf[o + _PUB + b]) << (8 * b)
        hist[shm.lat_bucket(now - (rx + a + p))] += 1
        timed += 1
    return timed


class Conn(WSListener):
    """One connection's counts and histogram."""

    def __init__(self, load: Load, stalled: bool):
        self.load, self.stalled = load, stalled
        self.hist = np.zeros(shm.LAT_BUCKETS, np.int64)
        self.events = self.timed = self.frames = self.bytes = 0
        self.breaks = 0  # EVENTS frames that did not start where the last one ended
        self.expected: int | None = None
        self.first_ns = self.last_ns = 0
        self.ended = ""  # "end", "error: <name>: <reason>", "closed"
        self.done = asyncio.get_running_loop().create_future()
        self.t = None

    def on_ws_connected(self, transport) -> None:
        self.t = transport

    def on_ws_frame(self, transport, frame) -> None:
        if frame.msg_type == WSMsgType.CLOSE:
            transport.send_close(frame.get_close_code())
            transport.disconnect()
            return
        if frame.msg_type != WSMsgType.BINARY:
            return
        buf = frame.get_payload_as_memoryview()
        self.frames += 1
        self.bytes += len(buf)
        _, t, _, count, seq, end = fw.HEADER.unpack_from(buf)
        if t == fw.EVENTS:
            if self.expected is not None and seq != self.expected:
                self.breaks += 1
            self.expected = end
            load = self.load
            arr = np.frombuffer(buf, np.uint8)
            self.timed += _account(arr, count, load.hdr, load.clk, load.ts, self.hist)
            now = time.monotonic_ns()
            self.first_ns = self.first_ns or now
            self.last_ns = now
            self.events += count
        elif t == fw.HELLO:
            self.expected = seq
        elif t == fw.END:
            self._end("end")
        elif t == fw.ERROR:
            code = int.from_bytes(bytes(buf[HDR : HDR + 2]), "little")
            why = bytes(buf[HDR + 2 :]).decode(errors="replace")
            self._end(f"error: {fw.ERROR_NAMES.get(code, code)}: {why}")

    def on_ws_disconnected(self, transport) -> None:
        self._end("closed")

    def _end(self, how: str) -> None:
        if not self.ended:
            self.ended = how
        if not self.done.done():
            self.done.set_result(None)

    def report(self) -> dict:
        return {
            "stalled": self.stalled,
            "events": self.events,
            "timed": self.timed,
            "frames": self.frames,
            "bytes": self.bytes,
            "breaks": self.breaks,
            "ended": self.ended or "running",
            "seconds": (self.last_ns - self.first_ns) / 1e9 if self.last_ns else 0.0,
            "first_ns": self.first_ns,
            "last_ns": self.last_ns,
            **{k: v for k, v in shm.percentiles(self.hist).items() if k != "count"},
        }


class Load:
    def __init__(self, channel: str | None):
        self.ts = np.zeros(2, np.int64)
        if channel:
            ring = ev.Ring.attach(channel)
            self.hdr, self.clk = ring.hdr, ring.clk
        else:  # the fan-out: stamps on CLOCK_MONOTONIC
            self.hdr = np.zeros(ev.HDR_LEN, np.int64)
            self.hdr[ev.H_CLOCK] = ev.CLOCK_MONO
            self.clk = np.zeros(1, np.float64)
        hist = np.zeros(shm.LAT_BUCKETS, np.int64)
        # compile now, for the type frames come in (a read-only view of the payload)
        _account(np.frombuffer(bytes(HDR), np.uint8), 0, self.hdr, self.clk, self.ts, hist)

    async def connect(self, url: str, stalled: bool) -> Conn:
        c = Conn(self, stalled)
        t, _ = await ws_connect(lambda: c, url, max_frame_size=1 << 26)
        sock = t.underlying_transport.get_extra_info("socket")
        if stalled:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            t.underlying_transport.pause_reading()
        else:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return c


async def main_async(a: argparse.Namespace) -> dict:
    load = Load(a.channel)
    conns = [await load.connect(a.url, i >= a.clients) for i in range(a.clients + a.stalled)]
    print("ready", file=sys.stderr, flush=True)
    live = [c for c in conns if not c.stalled]
    try:
        await asyncio.wait_for(asyncio.gather(*(c.done for c in live)), a.seconds)
    except TimeoutError:
        pass
    for c in conns:
        if c.stalled and c.t is not None and not c.done.done():
            c.t.underlying_transport.resume_reading()  # learn how it was told
            try:
                await asyncio.wait_for(asyncio.shield(c.done), 10)
            except TimeoutError:
                pass
    for c in conns:
        if c.t is not None:
            c.t.disconnect(False)
    hist = sum((c.hist for c in live), np.zeros(shm.LAT_BUCKETS, np.int64))
    first = min((c.first_ns for c in live if c.first_ns), default=0)
    last = max((c.last_ns for c in live), default=0)
    events = sum(c.events for c in live)
    secs = (last - first) / 1e9 if last > first else 0.0
    return {
        "clients": a.clients,
        "stalled": a.stalled,
        "events": events,
        "frames": sum(c.frames for c in live),
        "bytes": sum(c.bytes for c in live),
        "seconds": secs,
        "events_per_s": events / secs if secs else None,
        "latency_ns": shm.percentiles(hist, (50, 99, 99.9)),
        "breaks": sum(c.breaks for c in conns),
        "ended": sorted({c.ended or "running" for c in live}),
        "stalled_ended": [c.ended or "running" for c in conns if c.stalled],
        "cpu_s": time.process_time(),
        "conns": [c.report() for c in conns],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m host.bench.feedload", description=__doc__)
    p.add_argument("url")
    p.add_argument("--clients", type=int, default=1)
    p.add_argument("--stalled", type=int, default=0)
    p.add_argument("--channel", help="the ring whose clock stamps the events (none: MONOTONIC)")
    p.add_argument("--seconds", type=float, default=300.0, help="give up after (300)")
    a = p.parse_args(argv)
    import uvloop

    print(json.dumps(uvloop.run(main_async(a))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
