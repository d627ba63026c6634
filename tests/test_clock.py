"""``tickwire calibrate`` (host.appliance.clock): the sysoff and TSC maths on synthetic samples, the
cffi binding's layout against the kernel header compiled by gcc, a real calibration of the
lab's feed interfaces (veth: no PHC, software timestamps), its file and its metrics, and the
PHC ioctl path where a /dev/ptp* exists."""

import errno
import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from host.appliance import clock
from tests.labnet import built, private_lab

PTP_GLOB = "/dev/ptp*"


# --- the maths --------------------------------------------------------------------------
def _sysoff_samples(rng, n, offset, base, delay_lo=40, delay_hi=900):
    before = base + np.arange(n, dtype=np.int64) * 5_000 + rng.integers(0, 300, n)
    delay = rng.integers(delay_lo, delay_hi, n)
    after = before + delay
    # the PHC was read somewhere inside each window
    phc = before + (rng.random(n) * delay).astype(np.int64) + offset
    return np.stack([before, phc, after], axis=1)


@pytest.mark.parametrize("base", [12_345_678_901, 1_795_000_000_000_000_000])
@pytest.mark.parametrize("offset", [0, 1_234_567, -37_000_000_123])
def test_sysoff_recovers_a_known_offset_within_its_uncertainty(base, offset):
    rng = np.random.default_rng(abs(offset) + base % 1000)
    for _ in range(20):
        s = _sysoff_samples(rng, 25, offset, base)
        est = clock.sysoff_estimate(s)
        assert abs(est["offset_ns"] - offset) <= est["uncertainty_ns"] + 1
        assert est["uncertainty_ns"] == (s[:, 2] - s[:, 0]).min() / 2
        assert est["samples"] == 25 and est["spread_ns"] >= 0


def test_sysoff_takes_the_narrowest_window():
    s = np.array(
        [
            [1000, 6000, 2000],  # window 1000: offset 4500
            [3000, 8010, 3020],  # window 20: offset 4_000 (+0)
            [5000, 9900, 5500],
        ],
        np.int64,
    )
    est = clock.sysoff_estimate(s)
    assert est == {**est, "offset_ns": 8010 - 3010, "uncertainty_ns": 10.0, "delay_ns": 20}


def test_sysoff_rejects_bad_input():
    with pytest.raises(ValueError, match="no samples"):
        clock.sysoff_estimate(np.zeros((0, 3), np.int64))
    with pytest.raises(ValueError, match="backwards"):
        clock.sysoff_estimate(np.array([[10, 5, 9]], np.int64))


@pytest.mark.parametrize("hz", [2_245_780_123.0, 3_000_000_000.0, 1_000_000_000.0])
def test_tsc_fit_recovers_a_known_frequency(hz):
    rng = np.random.default_rng(int(hz) % 9973)
    t = np.sort(rng.uniform(0, 0.2e9, 200)).astype(np.int64) + 5_000_000_000  # mono ns
    noise = rng.normal(0, 8.0, len(t))  # ticks: the bracket's jitter
    tsc = (10**12 + t * (hz / 1e9) + noise).astype(np.uint64)
    fit = clock.tsc_fit(tsc, t)
    err_ppm = abs(fit["hz"] - hz) / hz * 1e6
    assert fit["uncertainty_ppm"] > 0
    assert err_ppm <= 5 * fit["uncertainty_ppm"] + 1e-6
    assert fit["uncertainty_ppm"] < 0.1 and fit["samples"] == 200
    assert abs(fit["span_s"] - (t[-1] - t[0]) / 1e9) < 1e-12


def test_tsc_fit_rejects_too_few_or_frozen_samples():
    with pytest.raises(ValueError, match="at least 3"):
        clock.tsc_fit(np.array([1, 2], np.uint64), np.array([1, 2], np.int64))
    with pytest.raises(ValueError, match="did not advance"):
        clock.tsc_fit(np.array([1, 2, 3], np.uint64), np.array([7, 7, 7], np.int64))


def test_kernel_tsc_khz_and_flags_parsing():
    log = (
        "[    0.000021] tsc: Detected 2245.780 MHz processor\n"
        "[    1.2] tsc: Refined TSC clocksource calibration: 2999.912 MHz\n"
    )
    assert clock.kernel_tsc_khz(log) == 2999912
    assert clock.kernel_tsc_khz(log.splitlines()[0]) == 2245780
    assert clock.kernel_tsc_khz("nothing here") is None
    info = "processor : 0\nflags\t\t: fpu tsc rdtscp constant_tsc nonstop_tsc hypervisor\n"
    assert clock.cpu_tsc_flags(info) == ["constant_tsc", "nonstop_tsc"]
    assert clock.cpu_tsc_flags("no flags line") == []


# --- the binding against the kernel header ------------------------------------------------
LAYOUT_C = r"""
#include <stdio.h>
#include <stddef.h>
#include <linux/ptp_clock.h>
int main(void) {
    printf("%zu %zu %zu %zu %zu %d %lu\n", sizeof(struct ptp_sys_offset_extended),
           offsetof(struct ptp_sys_offset_extended, ts), sizeof(struct ptp_clock_time),
           sizeof(struct ptp_clock_caps), offsetof(struct ptp_clock_caps, cross_timestamping),
           PTP_MAX_SAMPLES, (unsigned long)PTP_SYS_OFFSET_EXTENDED);
    return 0;
}
"""


@pytest.mark.needs("gcc")
def test_binding_layout_matches_the_kernel_header(tmp_path):
    src = tmp_path / "layout.c"
    src.write_text(LAYOUT_C)
    exe = tmp_path / "layout"
    subprocess.run(["gcc", "-o", str(exe), str(src)], check=True, capture_output=True)
    got = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    size, ts_off, ct, caps, cross, max_samples, req = map(int, got.split())
    ffi, lib = clock.ffi, clock.lib
    assert ffi.sizeof("struct ptp_sys_offset_extended") == size
    assert ffi.offsetof("struct ptp_sys_offset_extended", "ts") == ts_off
    assert ffi.sizeof("struct ptp_clock_time") == ct
    assert ffi.sizeof("struct ptp_clock_caps") == caps
    assert ffi.offsetof("struct ptp_clock_caps", "cross_timestamping") == cross
    assert lib.PTP_MAX_SAMPLES == max_samples and lib.PTP_SYS_OFFSET_EXTENDED == req
    # and from the header's definition by hand: n_samples + 3 reserved words (16 bytes),
    # then PTP_MAX_SAMPLES x 3 ptp_clock_time of (s64 sec, u32 nsec, u32 reserved)
    assert ct == 16 and size == 16 + max_samples * 3 * 16
    # _IOWR('=', 9, struct): dir 3 << 30 | size << 16 | '=' << 8 | 9
    assert req == (3 << 30) | (size << 16) | (ord("=") << 8) | 9


# --- reading the clocks here --------------------------------------------------------------
def test_tsc_against_the_kernels_own_estimate():
    if not clock.lib.TW_HAVE_TSC:
        pytest.skip("not x86: no TSC")
    khz = clock.kernel_tsc_khz()
    if khz is None:
        pytest.skip(
            "the kernel's TSC frequency is not in its boot log (dmesg unreadable or rotated)"
        )
    t = clock.measure_tsc(0.2)
    assert abs(t["hz"] - khz * 1000) <= 0.01 * khz * 1000
    assert 0 <= t["uncertainty_ppm"] < 100
    assert t["kernel_tsc_khz"] == khz


def test_missing_interface_is_one_line_and_non_zero(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[run.line_a]\ninterface = "twnone0a"\n[run.line_b]\ninterface = "twnone0b"\n')
    done = subprocess.run(
        [sys.executable, "-m", "host.cli", "calibrate", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "TICKWIRE_SHM": str(tmp_path / "shm")},
    )
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.count("\n") == 1
    assert "feed interface twnone0a not found" in done.stderr


def test_unopenable_phc_is_a_clock_error():
    with pytest.raises(clock.ClockError, match="cannot open /dev/ptp-none") as e:
        clock.phc_offset("/dev/ptp-none")
    assert e.value.errno == errno.ENOENT


def test_ptp_ioctls_on_a_non_ptp_device_raise_enotty():
    # drives the real binding (both requests, both clock ids) where no PHC exists
    fd = os.open("/dev/null", os.O_RDONLY)
    try:
        for call in (clock.phc_caps, clock.phc_samples):
            with pytest.raises(clock.ClockError, match="PTP_") as e:
                call(fd)
            assert e.value.errno == errno.ENOTTY
    finally:
        os.close(fd)
    with pytest.raises(ValueError, match="outside 1..25"):
        clock.phc_samples(-1, 26)


def test_phc_path_where_a_ptp_hardware_clock_exists():
    devices = sorted(glob.glob(PTP_GLOB))
    if not devices:
        pytest.skip("no PTP hardware clock (/dev/ptp*) on this machine")
    if not os.access(devices[0], os.R_OK):
        pytest.skip(f"no read permission on {devices[0]}")
    est = clock.phc_offset(devices[0], 10)
    assert est["samples"] == 10
    assert est["system_clock"] in ("CLOCK_MONOTONIC", "CLOCK_REALTIME")
    assert 0 <= est["uncertainty_ns"] < 1e9 and est["spread_ns"] >= 0
    assert est["request"].startswith("PTP_SYS_OFFSET_EXTENDED")


# --- storage, metrics, status -------------------------------------------------------------
PHC_RECORD = {
    "channel": "tcalunit",
    "netns": "",
    "source": "mixed",
    "reference_clock": "CLOCK_MONOTONIC",
    "clock_read_ns": 20,
    "measured_at": 1_700_000_000.5,
    "seconds": 0.3,
    "interfaces": {
        "ens1f0": {
            "source": "phc",
            "phc": "/dev/ptp3",
            "offset_ns": -1_500,
            "uncertainty_ns": 12.5,
            "spread_ns": 3.0,
        },
        "ens1f1": {"source": "software", "phc": None, "offset_ns": 0, "uncertainty_ns": 20.0},
    },
    "tsc": {
        "hz": 3e9,
        "uncertainty_ppm": 0.5,
        "flags": ["constant_tsc", "nonstop_tsc"],
        "kernel_tsc_khz": 3_000_000,
        "clocksource": "tsc",
    },
}


def _scrape(collector) -> dict:
    from prometheus_client.registry import CollectorRegistry

    reg = CollectorRegistry(auto_describe=False)
    reg.register(collector)
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in reg.collect()
        for s in fam.samples
    }


def test_stored_phc_calibration_as_metrics_text_and_status(tmp_path, monkeypatch):
    from dataplane import shm

    monkeypatch.setattr(shm, "SHM_ROOT", tmp_path)
    path = clock.save(PHC_RECORD)
    assert path == tmp_path / "tcalunit" / "clock.json"
    assert [p.name for p in path.parent.iterdir()] == ["clock.json"]  # no temp file left
    assert path.stat().st_mode & 0o777 == 0o644  # the exporter may run as the service user
    assert clock.load("tcalunit") == PHC_RECORD
    got = _scrape(clock.ClockCollector("tcalunit"))
    a = (("channel", "tcalunit"), ("interface", "ens1f0"), ("source", "phc"))
    b = (("channel", "tcalunit"), ("interface", "ens1f1"), ("source", "software"))
    assert got[("tickwire_clock_offset_seconds", a)] == pytest.approx(-1.5e-6)
    assert got[("tickwire_clock_offset_uncertainty_seconds", a)] == pytest.approx(12.5e-9)
    assert got[("tickwire_clock_source_info", b)] == 1.0
    assert got[("tickwire_tsc_hz", (("channel", "tcalunit"),))] == 3e9
    assert (
        got[("tickwire_clock_calibrated_timestamp_seconds", (("channel", "tcalunit"),))]
        == 1_700_000_000.5
    )
    line = clock.timestamps_line(PHC_RECORD)
    assert line == (
        "timestamps: mixed (ens1f0 /dev/ptp3 offset -1,500 ns ± 12.5 ns vs "
        "CLOCK_MONOTONIC; no PTP hardware clock on ens1f1)"
    )
    assert clock.status_line(PHC_RECORD, now=1_700_000_030.5).endswith("calibrated 30 s ago")
    # a damaged file: no clock metrics, and no failed scrape
    path.write_text('{"interfaces": 5}')
    assert _scrape(clock.ClockCollector("tcalunit")) == {}
    path.write_text("not json")
    assert clock.load("tcalunit") is None


@pytest.mark.lab
def test_calibrate_the_lab_software_timestamps_file_and_metrics(tmp_path, monkeypatch):
    from dataplane import shm
    from host.appliance import metrics, status

    cfg = private_lab("cal")
    conf = tmp_path / "lab.toml"
    conf.write_text(f'[lab]\nprefix = "{cfg.lab.prefix}"\n[run]\nchannel = "tcal"\n')
    env = {**os.environ, "TICKWIRE_SHM": str(tmp_path)}
    cmd = [sys.executable, "-m", "host.cli", "calibrate", "--config", str(conf), "--lab"]
    with built(cfg):
        human = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
        done = subprocess.run(
            [*cmd, "--json", "--samples", "5"], capture_output=True, text=True, timeout=120, env=env
        )
    assert human.returncode == 0, human.stderr
    out = human.stdout.splitlines()
    assert out[0] == "timestamps: software (no PTP hardware clock on feed-a, feed-b)"
    assert out[1].startswith("tsc: ") or not clock.lib.TW_HAVE_TSC
    assert out[2] == f"saved {tmp_path / 'tcal' / 'clock.json'}"
    assert done.returncode == 0, done.stderr
    r = json.loads(done.stdout)
    assert r["source"] == "software" and r["netns"] == cfg.lab.appliance_ns
    assert set(r["interfaces"]) == {"feed-a", "feed-b"}
    for v in r["interfaces"].values():
        assert v["phc"] is None and v["offset_ns"] == 0
        assert v["uncertainty_ns"] == r["clock_read_ns"] > 0
    if clock.lib.TW_HAVE_TSC:
        assert r["tsc"]["hz"] > 1e8 and r["tsc"]["uncertainty_ppm"] >= 0
    stored = json.loads((tmp_path / "tcal" / "clock.json").read_text())
    assert stored["measured_at"] == r["measured_at"]
    # what the exporter and tickwire status show, from the consumer's shm directory
    monkeypatch.setattr(shm, "SHM_ROOT", tmp_path)
    maps = shm.create("tcal")
    got = _scrape(metrics.ConsumerCollector("tcal", maps))
    for name in ("feed-a", "feed-b"):
        lv = (("channel", "tcal"), ("interface", name), ("source", "software"))
        assert got[("tickwire_clock_source_info", lv)] == 1.0
        assert got[("tickwire_clock_offset_seconds", lv)] == 0.0
        unc = got[("tickwire_clock_offset_uncertainty_seconds", lv)]
        assert unc == pytest.approx(r["clock_read_ns"] / 1e9)
    if clock.lib.TW_HAVE_TSC:
        assert got[("tickwire_tsc_hz", (("channel", "tcal"),))] == pytest.approx(r["tsc"]["hz"])
    assert ("tickwire_consumer_up", (("channel", "tcal"),)) in got  # the rest still scrapes
    text = status.text(status.collect("tcal"))
    assert "timestamps: software (no PTP hardware clock on feed-a, feed-b), calibrated" in text


def test_calibrate_help_has_examples():
    done = subprocess.run(
        [sys.executable, "-m", "host.cli", "calibrate", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0 and "tickwire calibrate --lab" in done.stdout


@pytest.mark.needs("root")  # chown
def test_a_channel_root_creates_is_handed_to_the_service_user(tmp_path, monkeypatch):
    """An operator's `tickwire calibrate` (root) must not leave a channel directory the
    service (the owner of the shared-memory root) cannot create its regions in."""
    from dataplane import shm

    monkeypatch.setattr(shm, "SHM_ROOT", tmp_path)
    os.chown(tmp_path, 65534, 65534)
    path = clock.save({**PHC_RECORD, "channel": "tcalown"})
    assert (path.parent.stat().st_uid, path.parent.stat().st_gid) == (65534, 65534)
    os.chown(tmp_path, 0, 0)  # a root-owned root: nothing to hand over
    assert shm.make_channel_dir("tcalroot").stat().st_uid == 0
