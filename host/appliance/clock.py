"""Clock calibration (``tickwire calibrate``): each feed interface's PTP hardware clock
(PHC) against the system clock, and the TSC's frequency against ``CLOCK_MONOTONIC``.

How Tickwire's latency uses it. The receive-to-book latency (``tickwire_receive_to_book_
seconds``, ``dataplane.shm`` ``latency``) is a difference of two ``CLOCK_MONOTONIC``
readings in nanoseconds: the XDP program's ``bpf_ktime_get_ns`` (or, on the socket path,
the kernel's software receive stamp, ``SO_TIMESTAMPING``, moved from ``CLOCK_REALTIME``)
and the consumer's ``clock_gettime`` after the book applied the packet. The event ring's
apply and publish stamps (``dataplane.events``) read the TSC with this module's
calibration when the TSC is invariant. So:

- **software timestamps** (no PHC on an interface, which is the lab's case: veth has
  none): both stamps are on ``CLOCK_MONOTONIC``, the offset is 0 by construction, and the
  uncertainty of one stamp is the cost of one clock read (measured here, ``clock_read_ns``).
- **hardware timestamps** (the interface has a PHC, ``/dev/ptpN``): a NIC receive stamp is
  PHC time; ``phc - offset_ns`` puts it on ``CLOCK_MONOTONIC`` within ``uncertainty_ns``
  (as of ``measured_at``: the PHC drifts unless phc2sys/ptp4l steer it). Today's XDP program
  still stamps ``bpf_ktime_get_ns``; the offset is what a hardware-stamp path applies.

The PHC offset is measured like linuxptp's ``sysoff``: one ``PTP_SYS_OFFSET_EXTENDED``
ioctl returns ``n`` triples (system before, PHC, system after); ``offset = phc - (before +
after) / 2`` of the triple with the narrowest window, ``uncertainty`` = half that window
(``spread_ns`` is the standard deviation over all triples). The system clock is
``CLOCK_MONOTONIC`` when the kernel takes a clock id in the request (Linux >= 6.12);
older kernels give ``CLOCK_REALTIME``, which is moved onto ``CLOCK_MONOTONIC`` with a
bracketed (MONOTONIC, REALTIME, MONOTONIC) read whose half-window joins the uncertainty.

The TSC: ``(rdtscp, CLOCK_MONOTONIC, rdtscp)`` brackets (the tightest of a few, in C)
every millisecond for ``duration`` seconds; the least-squares slope is the TSC's Hz, its
standard error (from the residuals) the uncertainty in ppm. Reported with the CPU's
``constant_tsc``/``nonstop_tsc`` flags, the kernel's clocksource and the kernel's own
TSC frequency (from its boot log). Not x86: ``tsc`` is None ("no TSC").

Provisioned (Ansible's ptp role): ``tickwire-calibrate.service`` runs ``tickwire calibrate
--wait-ptp SECONDS``, which first waits (``wait_for_ptp``) until the ptp stage of ``tickwire
preflight`` passes -- ptp4l's port SLAVE and its offset within bounds, as pmc reports them --
and ``tickwire-calibrate.timer`` runs it after boot and hourly.

The result is stored, atomically (temp file + rename), as
``/dev/shm/tickwire/<channel>/clock.json``; ``ClockCollector`` (part of
``host.appliance.metrics.ConsumerCollector``) exports it and ``tickwire status`` shows it. Offsets
are ``phc - system``, in nanoseconds; JSON keys are listed in ``calibrate``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from dataplane import ethtool
from host import netns

try:
    from host.appliance._clock import ffi, lib
except ImportError as e:  # pragma: no cover - only when the build step was skipped
    raise ImportError(
        "host.appliance._clock (the cffi binding of the PTP clock ioctls) is not built: run "
        "`make setup` (pip install -e .), or `python host/appliance/_clock_build.py`"
    ) from e

FILE_NAME = "clock.json"
REFERENCE = "CLOCK_MONOTONIC"
PTP_MAX_SAMPLES = int(lib.PTP_MAX_SAMPLES)
CLOCK_NAMES = {
    int(lib.CLOCK_REALTIME): "CLOCK_REALTIME",
    int(lib.CLOCK_MONOTONIC): "CLOCK_MONOTONIC",
}
TSC_FLAGS = ("constant_tsc", "nonstop_tsc", "tsc_known_freq")
CLOCKSOURCE = "/sys/devices/system/clocksource/clocksource0/current_clocksource"


class ClockError(OSError):
    """A clock cannot be read (no interface, no permission on /dev/ptpN, ...)."""


def _check(rc: int, what: str) -> int:
    """``rc`` from a ``tw_*`` helper (0 or a negative errno): raise ``ClockError`` if < 0."""
    if rc < 0:
        raise ClockError(-rc, f"{what}: {os.strerror(-rc)}")
    return rc


# --- the maths: pure functions over sample arrays ----------------------------------------
def sysoff_estimate(samples: np.ndarray) -> dict:
    """Offset ``phc - system`` from ``(n, 3)`` int64 ns triples (system before, PHC, system
    after), linuxptp's way: the triple with the narrowest window wins; its half-window is
    the uncertainty (the PHC was read somewhere inside it). ``spread_ns``: standard
    deviation of every triple's offset."""
    s = np.asarray(samples, dtype=np.int64).reshape(-1, 3)
    if len(s) == 0:
        raise ValueError("no samples")
    window = s[:, 2] - s[:, 0]
    if (window < 0).any():
        raise ValueError("a sample's system clock ran backwards (after < before)")
    # before + window // 2: the midpoint without summing two ~1e18 values
    offsets = s[:, 1] - (s[:, 0] + window // 2)
    best = int(np.argmin(window))
    return {
        "offset_ns": int(offsets[best]),
        "uncertainty_ns": float(window[best]) / 2.0,
        "delay_ns": int(window[best]),
        "spread_ns": float(np.std(offsets.astype(np.float64))),
        "samples": len(s),
    }


def tsc_fit(tsc: np.ndarray, mono_ns: np.ndarray) -> dict:
    """Least-squares ``tsc = a + b * mono``: ``hz = b * 1e9`` and its standard error in
    ppm (from the residuals); ``residual_ns`` is their RMS expressed in nanoseconds."""
    t = np.asarray(tsc, dtype=np.uint64)
    m = np.asarray(mono_ns, dtype=np.int64)
    if len(t) != len(m) or len(t) < 3:
        raise ValueError("need at least 3 (tsc, mono) pairs of equal length")
    # differences from the first pair are exact in float64 for spans below ~100 days
    x = (m - m[0]).astype(np.float64)
    y = (t - t[0]).astype(np.int64).astype(np.float64)
    xc, yc = x - x.mean(), y - y.mean()
    sxx = float(xc @ xc)
    if sxx <= 0:
        raise ValueError("CLOCK_MONOTONIC did not advance across the samples")
    b = float(xc @ yc) / sxx
    res = yc - b * xc
    s = math.sqrt(float(res @ res) / (len(x) - 2))
    se_b = s / math.sqrt(sxx)
    return {
        "hz": b * 1e9,
        "uncertainty_ppm": se_b / b * 1e6 if b > 0 else math.inf,
        "residual_ns": s / b if b > 0 else math.inf,
        "samples": len(x),
        "span_s": float(x[-1] - x[0]) / 1e9,
    }


# --- reading the clocks ------------------------------------------------------------------
def clock_read_cost(n: int = 10_000) -> int:
    """Smallest gap (ns) between two back-to-back CLOCK_MONOTONIC reads."""
    return int(lib.tw_read_cost(lib.CLOCK_MONOTONIC, n))


def realtime_minus_monotonic(tries: int = 64) -> tuple[int, float]:
    """``(CLOCK_REALTIME - CLOCK_MONOTONIC, half-window)`` in ns, from the tightest
    (MONOTONIC, REALTIME, MONOTONIC) bracket of ``tries``."""
    out = ffi.new("long long[3]")
    _check(lib.tw_bracket(lib.CLOCK_MONOTONIC, lib.CLOCK_REALTIME, tries, out), "clock_gettime")
    est = sysoff_estimate(np.array([[out[0], out[1], out[2]]], np.int64))
    return est["offset_ns"], est["uncertainty_ns"]


def phc_index(ifname: str) -> int:
    """The PHC index of ``ifname`` in the calling thread's namespace (-1: none), from
    ETHTOOL_GET_TS_INFO (what ``ethtool -T`` prints as "PTP Hardware Clock")."""
    try:
        return ethtool.ts_info(ifname).phc_index
    except OSError as e:
        if e.errno == errno.EOPNOTSUPP:
            return -1
        if e.errno == errno.ENODEV:
            raise ClockError(errno.ENODEV, f"interface {ifname} not found") from None
        raise ClockError(e.errno, e.strerror) from None


def _ioctl(fd: int, cmd: int, arg) -> int:
    if lib.ioctl(fd, cmd, arg) < 0:
        return -ffi.errno
    return 0


def phc_caps(fd: int) -> dict:
    caps = ffi.new("struct ptp_clock_caps *")
    _check(_ioctl(fd, lib.PTP_CLOCK_GETCAPS, caps), "PTP_CLOCK_GETCAPS")
    return {
        "max_adj_ppb": caps.max_adj,
        "pps": caps.pps,
        "cross_timestamping": caps.cross_timestamping,
    }


def phc_samples(fd: int, n: int = PTP_MAX_SAMPLES) -> tuple[np.ndarray, int, str]:
    """``n`` (system before, PHC, system after) triples from one PTP_SYS_OFFSET_EXTENDED
    ioctl; returns ``(samples, system clock id, request name)``. Asks for CLOCK_MONOTONIC
    (the word after ``n_samples``: ``clockid`` since Linux 6.12, ``rsv[0]`` before) and
    falls back to CLOCK_REALTIME when the kernel refuses it."""
    if not 1 <= n <= PTP_MAX_SAMPLES:
        raise ValueError(f"samples: {n} is outside 1..{PTP_MAX_SAMPLES} (PTP_MAX_SAMPLES)")
    requests = [("PTP_SYS_OFFSET_EXTENDED", int(lib.PTP_SYS_OFFSET_EXTENDED))]
    if lib.TW_PTP_SYS_OFFSET_EXTENDED2:
        requests.insert(0, ("PTP_SYS_OFFSET_EXTENDED2", int(lib.TW_PTP_SYS_OFFSET_EXTENDED2)))
    rc = -errno.ENOTTY
    for clk in (int(lib.CLOCK_MONOTONIC), int(lib.CLOCK_REALTIME)):
        for name, cmd in requests:
            req = ffi.new("struct ptp_sys_offset_extended *")
            req.n_samples = n
            ffi.cast("unsigned int *", req)[1] = clk
            rc = _ioctl(fd, cmd, req)
            if rc == 0:
                ts = req.ts
                out = np.array(
                    [
                        [ts[i][k].sec * 1_000_000_000 + ts[i][k].nsec for k in range(3)]
                        for i in range(n)
                    ],
                    np.int64,
                )
                return out, clk, name
            if rc != -errno.ENOTTY:  # EINVAL: this kernel takes no clock id; try the next
                break
    _check(rc, "PTP_SYS_OFFSET_EXTENDED")
    raise AssertionError("unreachable")


def phc_offset(device: str, n: int = PTP_MAX_SAMPLES) -> dict:
    """Offset of the PHC at ``device`` (``/dev/ptpN``) against CLOCK_MONOTONIC."""
    try:
        fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        hint = " (run as root)" if e.errno in (errno.EACCES, errno.EPERM) else ""
        raise ClockError(e.errno, f"cannot open {device}: {e.strerror}{hint}") from None
    try:
        caps = phc_caps(fd)
        samples, clk, request = phc_samples(fd, n)
    finally:
        os.close(fd)
    est = sysoff_estimate(samples)
    est.update(system_clock=CLOCK_NAMES.get(clk, str(clk)), request=request, caps=caps)
    if clk != int(lib.CLOCK_MONOTONIC):
        # phc - mono = (phc - real) + (real - mono)
        r_m, r_unc = realtime_minus_monotonic()
        est["offset_ns"] += r_m
        est["uncertainty_ns"] += r_unc
    return est


# --- the TSC -----------------------------------------------------------------------------
def tsc_samples(duration: float, tries: int = 8, every: float = 0.001) -> tuple:
    """``(tsc, mono_ns)`` arrays: a bracket every ``every`` s for ``duration`` s."""
    out = ffi.new("unsigned long long[3]")
    tsc, mono = [], []
    end = time.monotonic() + duration
    while True:
        _check(lib.tw_tsc_mono(tries, out), "rdtscp")
        tsc.append(out[0] + (out[2] - out[0]) // 2)
        mono.append(out[1])
        if time.monotonic() >= end and len(tsc) >= 3:
            break
        time.sleep(every)
    return np.array(tsc, np.uint64), np.array(mono, np.int64)


def cpu_tsc_flags(cpuinfo: str | None = None) -> list[str]:
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return []
    m = re.search(r"^flags\s*:(.*)$", cpuinfo, re.M)
    flags = set(m.group(1).split()) if m else set()
    return [f for f in TSC_FLAGS if f in flags]


def kernel_tsc_khz(log: str | None = None) -> int | None:
    """The kernel's TSC frequency from its boot log ("tsc: Refined TSC clocksource
    calibration: X MHz", else "tsc: Detected X MHz processor"); None when unreadable."""
    if log is None:
        try:
            log = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=5).stdout
        except (OSError, subprocess.SubprocessError):
            return None
    for pattern in (
        r"tsc: Refined TSC clocksource calibration: ([0-9.]+) MHz",
        r"tsc: Detected ([0-9.]+) MHz processor",
    ):
        found = re.findall(pattern, log)
        if found:
            return round(float(found[-1]) * 1000)
    return None


def measure_tsc(duration: float) -> dict | None:
    """The TSC's frequency against CLOCK_MONOTONIC, or None without a TSC (not x86)."""
    if not lib.TW_HAVE_TSC:
        return None
    fit = tsc_fit(*tsc_samples(duration))
    try:
        source = Path(CLOCKSOURCE).read_text().strip()
    except OSError:
        source = None
    fit.update(flags=cpu_tsc_flags(), clocksource=source, kernel_tsc_khz=kernel_tsc_khz())
    return fit


# --- calibrate, store, load ----------------------------------------------------------------
def interfaces(cfg) -> list[str]:
    """The feed interfaces: both lines' (``run.line_a/b.interface``), then
    ``host.ptp_interfaces``, each once."""
    names = [cfg.run.line_a.interface, cfg.run.line_b.interface, *cfg.host.ptp_interfaces]
    return list(dict.fromkeys(names))


def calibrate(cfg, duration: float = 0.2, samples: int = PTP_MAX_SAMPLES) -> dict:
    """Measure everything for ``cfg`` (a ``host.config.Config``), in ``run.netns``.

    Returns ``channel``, ``netns``, ``source`` ("phc" when every interface has a PHC,
    "software" when none has, else "mixed"), ``reference_clock``, ``clock_read_ns``,
    ``interfaces`` (name -> ``source``, ``phc`` device or None, ``offset_ns``,
    ``uncertainty_ns``, and for a PHC ``spread_ns``, ``system_clock``, ``request``,
    ``caps``), ``tsc`` (``hz``, ``uncertainty_ppm``, ``residual_ns``, ``samples``,
    ``span_s``, ``flags``, ``clocksource``, ``kernel_tsc_khz``; None without a TSC),
    ``measured_at`` (Unix time) and ``seconds`` (how long it took)."""
    if duration <= 0:
        raise ValueError(f"duration: {duration} must be positive")
    if not 1 <= samples <= PTP_MAX_SAMPLES:
        raise ValueError(f"samples: {samples} is outside 1..{PTP_MAX_SAMPLES} (PTP_MAX_SAMPLES)")
    t0 = time.monotonic()
    names = interfaces(cfg)
    ns = cfg.run.netns
    if ns:
        with netns.entered(ns):
            index = {name: _phc_index_in(name, ns) for name in names}
    else:
        index = {name: _phc_index_in(name, ns) for name in names}
    read_ns = clock_read_cost()
    ifs = {}
    for name in names:
        if index[name] < 0:
            ifs[name] = {
                "source": "software",
                "phc": None,
                "offset_ns": 0,
                "uncertainty_ns": float(read_ns),
            }
            continue
        device = f"/dev/ptp{index[name]}"
        est = phc_offset(device, samples)
        ifs[name] = {"source": "phc", "phc": device, **est}
    kinds = {v["source"] for v in ifs.values()}
    return {
        "channel": cfg.run.channel,
        "netns": ns,
        "source": kinds.pop() if len(kinds) == 1 else "mixed",
        "reference_clock": REFERENCE,
        "clock_read_ns": read_ns,
        "interfaces": ifs,
        "tsc": measure_tsc(duration),
        "measured_at": time.time(),
        "seconds": time.monotonic() - t0,
    }


def wait_for_ptp(cfg, timeout: float, poll: float = 2.0, log=None):
    """Return once PTP is locked: the ptp stage of ``tickwire preflight`` passes (each PTP
    port SLAVE, its offset from the master within ``host.ptp_max_offset_ns``, phc2sys
    following the interface that steers the system clock), or promises nothing (no
    ``host.ptp_interfaces``). Asks every ``poll`` seconds; after ``timeout`` seconds raises
    ``ClockError`` naming what still fails. Returns the stage's result."""
    from host.appliance import preflight

    deadline = time.monotonic() + timeout
    said = False
    with preflight.Host.live(cfg.run.netns) as host:
        while True:
            stage = preflight.check(cfg, host, ["ptp"]).stages[0]
            if stage.status in (preflight.OK, preflight.SKIPPED):
                if said and log:
                    log(f"PTP locked ({'; '.join(c.have for c in stage.checks[:3])})")
                return stage
            left = deadline - time.monotonic()
            if left <= 0:
                failing = "; ".join(f"{c.name}: {c.have}" for c in stage.checks if not c.ok)
                raise ClockError(
                    f"PTP not locked after {timeout:g} s ({failing}); not calibrated "
                    "(tickwire preflight --stage ptp says how to fix it)"
                )
            if not said and log:
                log(f"waiting up to {timeout:g} s for PTP to lock (tickwire preflight --stage ptp)")
                said = True
            time.sleep(min(poll, left))


def _phc_index_in(name: str, ns: str) -> int:
    try:
        return phc_index(name)
    except ClockError as e:
        if e.errno == errno.ENODEV:
            where = f"network namespace {ns}" if ns else "this network namespace"
            hint = " (run: tickwire lab up)" if ns else " (the lab's: --lab)"
            raise ClockError(
                errno.ENODEV, f"feed interface {name} not found in {where}{hint}"
            ) from None
        raise


def path_for(channel: str) -> Path:
    from dataplane import shm

    return shm.channel_dir(channel) / FILE_NAME


def save(result: dict) -> Path:
    """Write ``result`` as the channel's ``clock.json`` (temp file + rename: a reader sees
    the old file or the new one, never half of one)."""
    from dataplane import shm

    path = path_for(result["channel"])
    shm.make_channel_dir(result["channel"], path.parent.parent)
    fd, tmp = tempfile.mkstemp(prefix=".clock.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)  # the exporter may run as another user (the tickwire service)
        with os.fdopen(fd, "w") as f:
            json.dump(result, f, indent=1)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def load(channel: str) -> dict | None:
    """The channel's stored calibration, or None when there is none (or it is unreadable)."""
    try:
        return json.loads(path_for(channel).read_text())
    except (OSError, ValueError):
        return None


# --- text, metrics -----------------------------------------------------------------------
def _ns(v: float) -> str:
    return f"{v:,.0f} ns" if abs(v) >= 100 else f"{v:.3g} ns"


def timestamps_line(r: dict) -> str:
    """The line "timestamps: software (no PTP hardware clock on feed-a, feed-b)", or the
    PHCs' offsets."""
    ifs = r["interfaces"]
    soft = [n for n, v in ifs.items() if v["source"] == "software"]
    hard = [n for n, v in ifs.items() if v["source"] == "phc"]
    parts = []
    for n in hard:
        v = ifs[n]
        parts.append(
            f"{n} {v['phc']} offset {v['offset_ns']:+,} ns ± "
            f"{_ns(v['uncertainty_ns'])} vs {r['reference_clock']}"
        )
    if soft:
        parts.append(f"no PTP hardware clock on {', '.join(soft)}")
    return f"timestamps: {r['source']} ({'; '.join(parts)})"


def tsc_line(t: dict | None) -> str:
    if t is None:
        return "tsc: none (not x86: no TSC)"
    notes = [
        ", ".join(f.removesuffix("_tsc").replace("tsc_", "") for f in t["flags"])
        or "no constant_tsc/nonstop_tsc flags"
    ]
    if t.get("kernel_tsc_khz"):
        notes.append(f"kernel tsc_khz {t['kernel_tsc_khz']}")
    if t.get("clocksource"):
        notes.append(f"clocksource {t['clocksource']}")
    return f"tsc: {t['hz']:,.0f} Hz ± {t['uncertainty_ppm']:.2g} ppm ({'; '.join(notes)})"


def text(r: dict, path: Path | None = None) -> str:
    lines = [timestamps_line(r), tsc_line(r["tsc"])]
    if path is not None:
        lines.append(f"saved {path}")
    return "\n".join(lines)


def status_line(r: dict | None, now: float | None = None) -> str | None:
    """The calibration's line in ``tickwire status`` (None when never calibrated)."""
    if not r:
        return None
    try:
        age = max(0.0, (now or time.time()) - float(r["measured_at"]))
        when = (
            f"{age:.0f} s ago"
            if age < 120
            else f"{age / 60:.0f} min ago"
            if age < 7200
            else f"{age / 3600:.0f} h ago"
        )
        return f"{timestamps_line(r)}, calibrated {when}"
    except (KeyError, TypeError, ValueError):
        return "timestamps: calibration file unreadable (run: tickwire calibrate)"


def metric_families(channel: str, r: dict | None):
    """Prometheus families of a stored calibration (nothing when there is none)."""
    from prometheus_client.core import GaugeMetricFamily

    if not r:
        return
    labels = ["channel", "interface", "source"]
    off = GaugeMetricFamily(
        "tickwire_clock_offset_seconds",
        "Feed interface clock minus CLOCK_MONOTONIC (0 for software timestamps)",
        labels=labels,
    )
    unc = GaugeMetricFamily(
        "tickwire_clock_offset_uncertainty_seconds",
        "Half-width of the offset's measurement window (software: one clock read)",
        labels=labels,
    )
    info = GaugeMetricFamily(
        "tickwire_clock_source_info",
        "1 per feed interface, labelled with its timestamp source (phc or software)",
        labels=labels,
    )
    try:
        for name, v in r["interfaces"].items():
            lv = [channel, name, str(v["source"])]
            off.add_metric(lv, float(v["offset_ns"]) / 1e9)
            unc.add_metric(lv, float(v["uncertainty_ns"]) / 1e9)
            info.add_metric(lv, 1.0)
        when = float(r["measured_at"])
        tsc = r.get("tsc")
    except (KeyError, TypeError, ValueError, AttributeError):
        return  # a scrape must not fail on a damaged file
    yield off
    yield unc
    yield info
    g = GaugeMetricFamily(
        "tickwire_clock_calibrated_timestamp_seconds",
        "Unix time of the last tickwire calibrate",
        labels=["channel"],
    )
    g.add_metric([channel], when)
    yield g
    if tsc:
        g = GaugeMetricFamily(
            "tickwire_tsc_hz", "TSC frequency measured against CLOCK_MONOTONIC", labels=["channel"]
        )
        g.add_metric([channel], float(tsc["hz"]))
        yield g
        g = GaugeMetricFamily(
            "tickwire_tsc_hz_uncertainty_ratio",
            "Standard error of the TSC frequency, relative",
            labels=["channel"],
        )
        g.add_metric([channel], float(tsc["uncertainty_ppm"]) / 1e6)
        yield g


class ClockCollector:
    """Exports the channel's ``clock.json`` at scrape time."""

    def __init__(self, channel: str):
        self.channel = channel

    def collect(self):
        yield from metric_families(self.channel, load(self.channel))
