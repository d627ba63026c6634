"""The appliance image (``image/``, ``host/image/``): built for real, booted in qemu.

The module builds the image once (``host.image.build``: debootstrap, the roles over
``community.general.chroot``, mkfs + sfdisk), cached on its inputs like ``make image``, then
checks what was built (GPT, ESP contents, ``image.json`` against the image and the root),
that a second build is a cache hit, and boots it with ``tickwire image boot --lab --check``:
under qemu (TCG here: KVM is tried first), two multi-queue virtio-net NICs on taps in an
exchange namespace, the simulator publishing a generated session on lines A and B, and the
booted appliance -- configured by first boot from the ``tickwire.toml`` dropped on its ESP
-- must end with the offline digest, XDP in driver mode, nothing lost. A second boot of the
same disk must change nothing; a bad config must stop first boot with a clear message and
keep ``tickwire.service`` from starting.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import tomllib
from pathlib import Path

import pytest

from host import config
from host.appliance import firstboot
from host.image import boot, build, debian
from tests.capabilities import MIRROR

IMAGE = pytest.mark.needs("root", "chroot", "debootstrap", "mirror", "qemu")
# a first boot under TCG takes minutes (the roles run in the guest); the module-scoped
# fixtures count against their first test's time
pytestmark = [pytest.mark.image, pytest.mark.timeout(2400)]


# --- unprivileged -----------------------------------------------------------------------------
def test_guest_config_is_a_valid_appliance_config():
    cfg = boot.lab_config("twvm")
    text = boot.guest_config(cfg)
    loaded = config.from_dict(tomllib.loads(text))
    config.require_lines(loaded.run)
    assert loaded.run.xdp_mode == "native" and loaded.run.rx_mode == "xdp"
    assert {v["match"] for v in loaded.image.interfaces.values()} == set(boot.MACS.values())
    assert loaded.run.line_a.interface in loaded.image.interfaces


def test_image_config_rejects_what_first_boot_cannot_apply():
    for bad, key in (
        ({"numba_cpu": "fast"}, "image.numba_cpu"),
        ({"interfaces": {"feed-a": {"match": "zz:00"}}}, "image.interfaces.feed-a.match"),
        ({"interfaces": {"feed-a": {"match": "eth0", "address": "10.0.0.1"}}}, "address"),
        ({"interfaces": {"feed-a": {"match": "eth0", "mtu": 9000}}}, "image.interfaces.feed-a"),
        ({"ansible": {"Bad-Name": 1}}, "image.ansible.Bad-Name"),
    ):
        with pytest.raises(config.ConfigError, match=key):
            config.from_dict({"image": bad})


def test_role_variables_carry_the_lines_and_the_host_promises():
    cfg = config.load(Path(build.IMAGE_DIR / "tickwire.toml.example"))
    raw = tomllib.loads((build.IMAGE_DIR / "tickwire.toml.example").read_text())
    v = firstboot.role_variables(cfg, raw, "/opt/tickwire/dist/t.whl", "native")
    assert v["tickwire_line_a"]["interface"] == "feed-a" and v["tickwire_line_b"]["queue"] == 2
    assert v["nic_flows"] and {f["queue"] for f in v["nic_flows"]} == {2}
    assert v["irq_affinity_queues"][0]["cpu"] == 2
    assert v["cpu_isolation_isolated_cpus"] == "2-7" and not v["cpu_isolation_reboot_allowed"]
    assert v["hugepages_nodes"] == [0] and v["hugepages_2m_per_node"] == 1024
    assert v["tickwire_numba_cpu"] == "" and v["tickwire_service_started"] is False
    generic = firstboot.role_variables(cfg, raw, "w", "generic")
    assert generic["tickwire_numba_cpu"] == "generic"


def test_tree_hash_changes_with_the_tree(tmp_path, monkeypatch):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "f.py").write_text("x = 1\n")
    monkeypatch.setattr(build, "REPO", tmp_path)
    first = build.tree_hash(("a",))
    (tmp_path / "a" / "__pycache__").mkdir()
    (tmp_path / "a" / "__pycache__" / "f.pyc").write_bytes(b"junk")
    assert build.tree_hash(("a",)) == first  # caches do not count
    (tmp_path / "a" / "f.py").write_text("x = 2\n")
    assert build.tree_hash(("a",)) != first


# --- the built image -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def image(tmp_path_factory):
    out = tmp_path_factory.mktemp("image")
    try:
        return build.build(build.BuildOptions(out=out, mirror=MIRROR), say=print)
    except (build.ImageError, debian.DebianError) as e:
        pytest.fail(str(e))


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


@IMAGE
def test_manifest_records_every_input(image):
    m = json.loads(Path(image["manifest"]).read_text())
    assert m["image"]["sha256"] == image["sha256"] == _sha256(image["image"])
    assert m["debian"]["suite"] == "bookworm" and m["debian"]["snapshot_date"] != "unknown"
    for pkg in ("python3-bpfcc", "libxdp1", "linuxptp", "systemd-boot-efi"):
        assert m["packages"].get(pkg), pkg
    kernels = [p for p in m["packages"] if p.startswith("linux-image-6")]
    headers = [p for p in m["packages"] if p.startswith("linux-headers-6") and p.endswith("-amd64")]
    assert (
        kernels
        and headers
        and kernels[0].removeprefix("linux-image-") == headers[0].removeprefix("linux-headers-")
    ), "bcc's headers must match the image's kernel"
    assert m["wheel"]["sha256"] and m["wheel"]["version"]
    assert any(
        line.startswith("tickwire @ ") or line.startswith("tickwire==") for line in m["python"]
    )
    assert m["role_variables"] == build.role_vars()
    assert m["kernel_cmdline"] == build.KERNEL_CMDLINE
    assert m["numba_cache"]["cpu_name"] == "generic"
    assert m["provision_stats"]["failures"] == 0


@IMAGE
def test_partitions_and_boot_files(image):
    table = json.loads(
        subprocess.run(["sfdisk", "--json", image["image"]], capture_output=True, check=True).stdout
    )
    table = table["partitiontable"]
    assert table["label"] == "gpt" and table["id"].lower() == build.DISK_GUID
    types = [(p["type"].upper(), p["uuid"].lower(), p["name"]) for p in table["partitions"]]
    assert types == [
        (build.ESP_TYPE, build.ESP_PARTUUID, "esp"),
        (build.ROOT_TYPE, build.ROOT_PARTUUID, "root"),
    ]
    off = build.esp_offset(Path(image["image"]))
    listing = subprocess.run(
        ["mdir", "-/", "-b", "-i", f"{image['image']}@@{off}", "::/"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for path in (
        "EFI/BOOT/BOOTX64.EFI",
        "loader/entries/tickwire.conf",
        "tickwire/vmlinuz",
        "tickwire/initrd.img",
    ):
        assert f"::/{path}" in listing, listing
    assert (
        "::/tickwire.toml.example" in listing and "::/tickwire.toml\n" not in listing
    )  # nothing host-specific


@IMAGE
def test_second_build_is_a_cache_hit(image, tmp_path):
    again = build.build(build.BuildOptions(out=tmp_path, mirror=MIRROR))
    assert again["cached"] is True and again["sha256"] == image["sha256"]


# --- booted --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def session(tmp_path_factory):
    path = tmp_path_factory.mktemp("session") / "s.itch"
    from host.exchange import itchgen

    itchgen.write_session(str(path), 20_000, 20, 3)
    return path


@pytest.fixture(scope="module")
def booted(image, session, tmp_path_factory):
    work = tmp_path_factory.mktemp("vm")
    r = boot.boot(
        boot.BootOptions(image=Path(image["image"]), lab=True, check=session, work=work), say=print
    )
    if not r.get("ok"):
        print(boot.console_tail(work / "console.log", 80))
    return r, work


@IMAGE
def test_booted_appliance_ends_with_the_offline_digest(booted):
    r, _ = booted
    assert not r.get("error"), r.get("error")
    assert r["digest"] == r["expected_digest"]
    assert r["counters"]["taken"] == r["messages"] and r["counters"]["unrecoverable_messages"] == 0
    assert not r["problems"] and r["ok"]


@IMAGE
def test_booted_appliance_attached_xdp_in_driver_mode(booted):
    r, _ = booted
    assert r["xdp"] == {"feed-a": "native", "feed-b": "native"}  # driver mode, not generic


@IMAGE
def test_first_boot_configured_the_host_from_the_esp(booted):
    r, _ = booted
    fb = r["firstboot"]
    assert fb["result"] == "configured" and fb["preflight_ok"]
    assert "renamed" in " ".join(fb["interfaces"])  # by MAC, to the config's names
    assert fb["roles"]["failed"] == 0 and fb["roles"]["changed"] > 0
    assert fb["numba_cpu"] == "generic"  # TCG: the build-time cache
    assert r["preflight"]["ready"] and r["preflight"]["stages"]["hugepages"] == "OK"
    assert r["preflight"]["stages"]["nic"] == "OK" and r["preflight"]["stages"]["sysctl"] == "OK"


@IMAGE
def test_second_boot_changes_nothing(booted):
    r, work = booted
    again = boot.boot(
        boot.BootOptions(image=work / "disk.img", lab=True, reuse_disk=True, work=work / "again"),
        say=print,
    )
    assert again["ok"], again.get("error")
    fb = again["firstboot"]
    assert fb["boots"] == 2 and fb["second_boot"] == {
        "interfaces_changed": [],
        "preflight_ok": True,
    }
    assert fb["config_sha256"] == r["firstboot"]["config_sha256"]


@IMAGE
def test_bad_config_stops_first_boot_and_the_service(image, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[run]\nrx_mode = "fast"\n')
    r = boot.boot(
        boot.BootOptions(
            image=Path(image["image"]), raw_config=bad, work=tmp_path / "vm", ready_timeout=900
        ),
        say=print,
    )
    assert not r["ok"] and "first boot failed" in r["error"]
    console = (tmp_path / "vm" / "console.log").read_bytes().decode(errors="replace")
    assert "run.rx_mode: 'fast' is not one of" in console  # the reason, on the console
    assert r["units"]["tickwire.service"]["ActiveState"] != "active"
