"""The WebSocket library comparison of ``tickwire bench feed``: the same fan-out written on
picows and on websockets, both on uvloop, so that what differs is the library.

``python -m host.bench.fanout --lib picows|websockets --port P --clients N --rate R
--seconds S`` listens, waits for ``N`` connections, then every millisecond builds one
``tw-v1`` ``EVENTS`` frame of ``R / 1000`` events (their ``rx_ns`` = CLOCK_MONOTONIC now,
so ``host.bench.feedload`` times them from the moment the frame was built) and sends it to
every connection -- picows: ``WSTransport.send`` per connection; websockets: its
``broadcast`` (the library's own fan-out: a synchronous write per connection, no
awaiting). After ``S`` seconds it sends ``END`` and closes. It prints one JSON object: its
CPU seconds while sending (``time.process_time``), frames and events sent, ticks late.

No ring, no pump, no filtering: the feed server's own work is the same whichever library
carries its frames; this isolates the library's cost per frame sent.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

import numpy as np

from dataplane import events as ev
from host.appliance import feedwire as fw

TICK_S = 0.001


def _records(n: int) -> np.ndarray:
    recs = np.zeros(n, ev.EVENT)
    recs["kind"] = 2  # a level event's size; content does not matter here
    recs["seq"] = np.arange(1, n + 1)
    return recs


async def _pace(send, n_events: int, seconds: float) -> dict:
    """Every tick, one frame of ``n_events`` stamped now, through ``send(frame)``."""
    recs = _records(n_events)
    cpu0, t0 = time.process_time(), time.monotonic()
    pos = frames = late = 0
    tick = 0
    while True:
        due = t0 + tick * TICK_S
        now = time.monotonic()
        if now - t0 >= seconds:
            break
        if due > now:
            await asyncio.sleep(due - now)
        elif now - due > TICK_S:
            late += 1
        recs["rx_ns"] = time.monotonic_ns()
        send(fw.events(pos, pos + n_events, recs))
        pos += n_events
        frames += 1
        tick += 1
        await asyncio.sleep(0)
    send(fw.end(pos, pos))
    return {
        "cpu_s": time.process_time() - cpu0,
        "seconds": time.monotonic() - t0,
        "frames": frames,
        "events": pos,
        "late_ticks": late,
    }


async def _picows(a: argparse.Namespace) -> dict:
    from picows import WSListener, WSMsgType, ws_create_server

    conns: list = []
    got = asyncio.Event()

    class L(WSListener):
        def on_ws_connected(self, transport) -> None:
            transport.underlying_transport.get_extra_info("socket").setsockopt(6, 1, 1)
            transport.send(WSMsgType.BINARY, fw.hello(0, 0, 0, 0, 1000, fw.K_ALL, "fanout"))
            conns.append(transport)
            if len(conns) >= a.clients:
                got.set()

    server = await ws_create_server(lambda _r: L(), a.listen, a.port)
    print("listening", file=sys.stderr, flush=True)
    await got.wait()

    def send(frame: bytes) -> None:
        for t in conns:
            t.send(WSMsgType.BINARY, frame)

    r = await _pace(send, a.rate // 1000, a.seconds)
    for t in conns:
        t.send_close()
        t.disconnect()
    server.close()
    return r


async def _websockets(a: argparse.Namespace) -> dict:
    from websockets.asyncio.server import broadcast, serve

    conns: set = set()
    got = asyncio.Event()

    async def handler(ws) -> None:
        ws.transport.get_extra_info("socket").setsockopt(6, 1, 1)
        await ws.send(fw.hello(0, 0, 0, 0, 1000, fw.K_ALL, "fanout"))
        conns.add(ws)
        if len(conns) >= a.clients:
            got.set()
        await ws.wait_closed()

    async with serve(handler, a.listen, a.port, compression=None, max_size=1 << 20):
        print("listening", file=sys.stderr, flush=True)
        await got.wait()
        r = await _pace(lambda frame: broadcast(conns, frame), a.rate // 1000, a.seconds)
        for ws in list(conns):
            await ws.close()
    return r


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m host.bench.fanout", description=__doc__)
    p.add_argument("--lib", choices=["picows", "websockets"], required=True)
    p.add_argument("--listen", default="0.0.0.0")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--clients", type=int, default=1)
    p.add_argument("--rate", type=int, default=100_000, help="events/s to each client")
    p.add_argument("--seconds", type=float, default=3.0)
    a = p.parse_args(argv)
    import uvloop

    r = uvloop.run(_picows(a) if a.lib == "picows" else _websockets(a))
    print(json.dumps({"lib": a.lib, "clients": a.clients, "rate": a.rate, **r}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
