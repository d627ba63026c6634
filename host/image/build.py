"""``tickwire image build`` (``make image``): the appliance's bootable raw disk image.

The steps, each cached on the hash of its inputs:

1. **root**: Debian 12 debootstrapped with ``debian.PACKAGES`` (kernel, bcc with the
   kernel's headers, libxdp, linuxptp, systemd-boot's EFI binary, ...), cached per
   package list and mirror -- the Ansible apply tests start from the same root.
2. **image**: on a private copy of the root, the Tickwire wheel (built from this tree) and
   its dependency wheels are installed by ``provision.yml`` applied over
   ``community.general.chroot`` with ``image/vars.yml`` (nothing host-specific: interfaces,
   cores, groups and PTP come from the ``tickwire.toml`` the operator drops on the ESP, which
   ``tickwire-firstboot.service`` applies at the first boot); ``image/overlay/`` adds the
   image's own files (fstab, first boot, the guest agent, the boot loader's command line);
   the consumer's numba cache is warmed for ``NUMBA_CPU_NAME=generic``; then the ESP
   (``mkfs.vfat`` + ``mcopy``: systemd-boot, kernel, initramfs, loader entry) and the root
   (``mkfs.ext4 -d``) are made as filesystem images and placed in a GPT written by
   ``sfdisk``. ``image.json`` beside the image records every input.

The image step's key hashes the root's key, the tree (``bpf/``, ``dataplane/``, ``host/``,
``ansible/``, ``image/``, ``pyproject.toml``, ``setup.py``) and the dependency list; a second
build with nothing changed finds both in the cache and takes seconds.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import yaml

from host.image import debian

REPO = Path(__file__).resolve().parents[2]
IMAGE_DIR = REPO / "image"
BUILDER_VERSION = "1"  # bump when the steps below change what they make

# fixed identities: the kernel command line and fstab name the partitions by these
DISK_GUID = "6b7a3c1e-4d2f-4b8a-9f21-7457494b4557"
ESP_PARTUUID = "0f3a8a52-5f0c-4f4e-9d41-545745535031"
ROOT_PARTUUID = "3c9e2b14-7c1d-4f3a-8e52-545752544f31"
ESP_TYPE = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
ROOT_TYPE = "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709"  # x86-64 root (discoverable partitions)
ESP_MIB = 256
KERNEL_CMDLINE = f"root=PARTUUID={ROOT_PARTUUID} ro rootwait console=tty0 console=ttyS0,115200n8"
NUMBA_CPU = "generic"  # the build-time cache: loadable by TCG's CPU and by real hosts
TREE = ("bpf", "dataplane", "host", "ansible", "image", "pyproject.toml", "setup.py", "README.md")
IMAGE_NAME = "tickwire.img"


class ImageError(RuntimeError):
    """The image cannot be built; the message names the step and why."""


@dataclass(frozen=True)
class BuildOptions:
    out: Path = REPO / "build" / "image"
    mirror: str | None = None  # None: the machine's own (apt's sources)
    rebuild: bool = False


def _run(argv: list[str], step: str, timeout: float = 900, **kw) -> subprocess.CompletedProcess:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kw)
    except subprocess.TimeoutExpired:
        raise ImageError(
            f"{step}: `{' '.join(argv[:4])} ...` took longer than {timeout:.0f} s"
        ) from None
    except FileNotFoundError:
        raise ImageError(f"{step}: {argv[0]} is not installed (make setup installs it)") from None
    if done.returncode != 0:
        raise ImageError(
            f"{step}: `{' '.join(argv[:6])}` exited {done.returncode}:\n"
            + (done.stdout + done.stderr)[-3000:]
        )
    return done


def tree_hash(paths: tuple[str, ...] = TREE) -> str:
    """sha256 over the tree's files (path and content), caches and build output excluded."""
    h = hashlib.sha256()
    for name in paths:
        top = REPO / name
        files = [top] if top.is_file() else sorted(p for p in top.rglob("*") if p.is_file())
        for p in files:
            rel = p.relative_to(REPO).as_posix()
            if (
                "__pycache__" in rel
                or p.suffix in (".so", ".o", ".nbi", ".nbc", ".pyc")
                or rel.endswith("_xsk.c")
                or rel.endswith("_clock.c")
            ):
                continue
            h.update(rel.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


def _dependencies() -> str:
    text = (REPO / "pyproject.toml").read_text()
    return re.search(r"^dependencies = \[(.*?)\]", text, re.M | re.S).group(1)


# --- the wheel and its dependencies ----------------------------------------------------------
def build_wheel(out: Path) -> Path:
    """The Tickwire wheel, built from a copy of the tree (the working tree stays clean)."""
    src = out / "src"
    shutil.rmtree(src, ignore_errors=True)
    src.mkdir(parents=True)
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(REPO / name, src / name)
    for pkg in ("bpf", "dataplane", "host"):
        shutil.copytree(
            REPO / pkg,
            src / pkg,
            ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.nbi", "*.nbc"),
        )
    dist = out / "dist"
    shutil.rmtree(dist, ignore_errors=True)
    argv = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation"]
    _run([*argv, "--disable-pip-version-check", "-q", "-w", str(dist), str(src)], "wheel")
    shutil.rmtree(src, ignore_errors=True)
    (wheel,) = dist.glob("tickwire-*.whl")
    return wheel


def wheelhouse(wheel: Path, extra: tuple[str, ...] = ()) -> Path:
    """The dependencies' wheels (and ``extra`` requirements), downloaded once per list."""
    key = hashlib.sha256(f"{sys.version_info[:2]} {_dependencies()} {extra}".encode()).hexdigest()[
        :12
    ]
    house = debian.cache_dir() / f"wheelhouse-{key}"
    if not (house / ".complete").exists():
        shutil.rmtree(house, ignore_errors=True)
        argv = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "-q"]
        _run(
            [*argv, "--only-binary=:all:", "-d", str(house), str(wheel), *extra],
            "wheelhouse",
            timeout=600,
        )
        for w in house.glob("tickwire-*.whl"):
            w.unlink()
        (house / ".complete").write_text("")
    return house


# --- the root, prepared and provisioned --------------------------------------------------------
@contextlib.contextmanager
def mounted(root: Path):
    """/proc, /sys and /dev of the build host under ``root`` for the duration; always
    unmounted, innermost first."""
    points = []
    try:
        for fs, args in (
            ("proc", ["-t", "proc", "proc"]),
            ("sys", ["-t", "sysfs", "sysfs"]),
            ("dev", ["--bind", "/dev"]),
        ):
            target = root / fs
            target.mkdir(exist_ok=True)
            _run(["mount", *args, str(target)], f"mount {fs}")
            points.append(target)
        yield root
    finally:
        for target in reversed(points):
            if subprocess.run(["umount", str(target)], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", str(target)], capture_output=True)


def role_vars() -> dict:
    return yaml.safe_load((IMAGE_DIR / "vars.yml").read_text()) or {}


def chroot_target(root: Path, extra: Path, **variables) -> Path:
    """Make ``root`` a target Ansible applies the roles to over community.general.chroot:
    the build host's resolver (apt inside), a policy-rc.d that starts no daemons, and
    ``extra`` (the connection's variables plus ``variables``) to pass with ``-e @extra``."""
    (root / "etc" / "resolv.conf").unlink(missing_ok=True)
    shutil.copy("/etc/resolv.conf", root / "etc" / "resolv.conf")
    policy = root / "usr" / "sbin" / "policy-rc.d"  # invoke-rc.d asks it; 101: never start
    policy.write_text("#!/bin/sh\nexit 101\n")
    policy.chmod(0o755)
    connection = {
        "ansible_connection": "community.general.chroot",
        "ansible_host": str(root),
        "ansible_python_interpreter": "/usr/bin/python3",
        "ansible_become": False,
    }
    extra.write_text(yaml.safe_dump({**connection, **variables}))
    return extra


def _provision(root: Path, work: Path, wheel: Path, house: Path) -> dict:
    """provision.yml over community.general.chroot with image/vars.yml; returns the stats."""
    extra = chroot_target(
        root, work / "chroot.yml", tickwire_package=str(wheel), tickwire_wheelhouse=str(house)
    )
    policy = root / "usr" / "sbin" / "policy-rc.d"
    inventory = work / "inventory.yml"
    inventory.write_text(yaml.safe_dump({"tickwire": {"hosts": {"image": role_vars()}}}))
    env = dict(os.environ, ANSIBLE_STDOUT_CALLBACK="json", ANSIBLE_NOCOLOR="1")
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '/usr/bin:/bin')}"
    argv = [
        str(Path(sys.executable).parent / "ansible-playbook"),
        "-i",
        str(inventory),
        "provision.yml",
    ]
    done = subprocess.run(
        [*argv, "-e", f"@{extra}", "--skip-tags", "network"],
        capture_output=True,
        text=True,
        cwd=REPO / "ansible",
        env=env,
        timeout=900,
    )
    try:
        run = json.loads(done.stdout)
    except ValueError:
        raise ImageError(
            f"provision: ansible-playbook printed no JSON (rc {done.returncode}):\n"
            + done.stdout[-2000:]
            + done.stderr[-2000:]
        ) from None
    stats = run["stats"]["image"]
    if done.returncode != 0 or stats.get("failures") or stats.get("unreachable"):
        failed = [
            f"{t['task']['name']}: {h.get('msg', '')}"
            for play in run["plays"]
            for t in play["tasks"]
            for h in t["hosts"].values()
            if h.get("failed")
        ]
        raise ImageError("provision: the roles failed on the image root:\n" + "\n".join(failed))
    policy.unlink()
    (root / "etc" / "resolv.conf").unlink()
    return stats


def _ansible_for_firstboot(root: Path, house: Path) -> None:
    """ansible-core in /opt/tickwire/ansible (first boot applies the roles locally) with the
    two collections the roles use, copied from the builder's ansible."""
    venv = root / "opt" / "tickwire" / "ansible"
    _run(
        ["chroot", str(root), "/usr/bin/python3", "-m", "venv", "/opt/tickwire/ansible"],
        "ansible venv",
    )
    dest_house = root / "opt" / "tickwire" / "ansible-wheels"
    shutil.copytree(house, dest_house, dirs_exist_ok=True)
    pip = ["chroot", str(root), "/opt/tickwire/ansible/bin/python", "-m", "pip", "install", "-q"]
    _run(
        [*pip, "--no-index", "--find-links", "/opt/tickwire/ansible-wheels", "ansible-core"],
        "ansible-core",
    )
    shutil.rmtree(dest_house)
    import ansible_collections

    src = Path(ansible_collections.__path__[0])
    dest = venv / "share" / "ansible_collections"
    for coll in ("ansible/posix", "community/general"):
        shutil.copytree(
            src / coll,
            dest / coll,
            dirs_exist_ok=True,
            ignore=shutil.ignore_patterns("tests", "__pycache__"),
        )
    shutil.copytree(REPO / "ansible", root / "opt" / "tickwire" / "provision", dirs_exist_ok=True)


def _overlay(root: Path) -> None:
    """image/overlay/ into the root (modes kept), then the units it brings enabled."""
    src = IMAGE_DIR / "overlay"
    for p in sorted(src.rglob("*")):
        dest = root / p.relative_to(src)
        if p.is_dir():
            dest.mkdir(exist_ok=True)
        else:
            shutil.copy2(p, dest)
    (root / "etc" / "kernel").mkdir(exist_ok=True)
    (root / "etc" / "kernel" / "cmdline").write_text(KERNEL_CMDLINE + "\n")
    (root / "etc" / "fstab").write_text(
        "# the appliance image's partitions, by PARTUUID (image/README.md)\n"
        f"PARTUUID={ROOT_PARTUUID} / ext4 defaults,errors=remount-ro 0 1\n"
        f"PARTUUID={ESP_PARTUUID} /boot/efi vfat umask=0077,nofail 0 2\n"
    )
    (root / "boot" / "efi").mkdir(parents=True, exist_ok=True)
    (root / "etc" / "hostname").write_text("tickwire\n")
    for unit in (
        "systemd-networkd.service",
        "tickwire-firstboot.service",
        "tickwire-agent.service",
    ):
        _run(["chroot", str(root), "systemctl", "enable", unit], f"enable {unit}")
    # no password, no SSH keys: the console has no login; the agent answers read-only queries
    _run(["chroot", str(root), "passwd", "-l", "root"], "lock root")


def _warm(root: Path) -> None:
    """The consumer compiled into the service's numba cache for a generic x86-64 CPU."""
    argv = [
        "chroot",
        str(root),
        "runuser",
        "-u",
        "tickwire",
        "--",
        "env",
        "NUMBA_CACHE_DIR=/var/cache/tickwire/numba",
        f"NUMBA_CPU_NAME={NUMBA_CPU}",
        "/opt/tickwire/venv/bin/tickwire",
        "warm",
        "--lab",
        "--json",
    ]
    (root / "var" / "cache" / "tickwire" / "numba").mkdir(parents=True, exist_ok=True)
    _run(["chroot", str(root), "chown", "-R", "tickwire:tickwire", "/var/cache/tickwire"], "warm")
    _run(argv, "warm numba cache", timeout=1200)


def _esp_tree(root: Path, staging: Path) -> str:
    """systemd-boot, the kernel and initramfs and one loader entry; returns the kernel version."""
    kernels = sorted((root / "boot").glob("vmlinuz-*"))
    if not kernels:
        raise ImageError("esp: the root has no /boot/vmlinuz-* (linux-image-amd64 missing?)")
    kver = kernels[-1].name.removeprefix("vmlinuz-")
    (staging / "EFI" / "BOOT").mkdir(parents=True)
    shutil.copy(
        root / "usr/lib/systemd/boot/efi/systemd-bootx64.efi", staging / "EFI/BOOT/BOOTX64.EFI"
    )
    (staging / "EFI" / "systemd").mkdir()
    shutil.copy(
        root / "usr/lib/systemd/boot/efi/systemd-bootx64.efi",
        staging / "EFI/systemd/systemd-bootx64.efi",
    )
    (staging / "tickwire").mkdir()
    shutil.copy(root / "boot" / f"vmlinuz-{kver}", staging / "tickwire" / "vmlinuz")
    shutil.copy(root / "boot" / f"initrd.img-{kver}", staging / "tickwire" / "initrd.img")
    (staging / "loader" / "entries").mkdir(parents=True)
    (staging / "loader" / "loader.conf").write_text("default tickwire.conf\ntimeout 0\neditor no\n")
    (staging / "loader" / "entries" / "tickwire.conf").write_text(
        f"title Tickwire appliance (Debian 12, Linux {kver})\n"
        "linux /tickwire/vmlinuz\ninitrd /tickwire/initrd.img\n"
        f"options {KERNEL_CMDLINE}\n"
    )
    (staging / "tickwire.toml.example").write_text(
        (IMAGE_DIR / "tickwire.toml.example").read_text()
    )
    return kver


def _assemble(root: Path, work: Path, image: Path) -> dict:
    """ESP and root filesystem images, placed in a GPT disk image by sfdisk."""
    staging = work / "esp"
    kver = _esp_tree(root, staging)
    esp = work / "esp.img"
    esp.unlink(missing_ok=True)
    _run(
        [
            "mkfs.vfat",
            "-F",
            "32",
            "-n",
            "TW-ESP",
            "-i",
            "54574553",
            "-C",
            str(esp),
            str(ESP_MIB * 1024),
        ],
        "mkfs.vfat",
    )
    _run(
        ["mcopy", "-s", "-i", str(esp), *[str(p) for p in sorted(staging.iterdir())], "::/"],
        "mcopy",
    )
    used = int(_run(["du", "-sxB1M", str(root)], "du").stdout.split()[0])
    root_mib = int(used * 1.25) + 512
    rootfs = work / "root.img"
    rootfs.unlink(missing_ok=True)
    _run(
        [
            "mkfs.ext4",
            "-q",
            "-L",
            "tw-root",
            "-U",
            str(uuid.uuid5(uuid.NAMESPACE_URL, ROOT_PARTUUID)),
            "-d",
            str(root),
            str(rootfs),
            f"{root_mib}M",
        ],
        "mkfs.ext4",
        timeout=1200,
    )
    start = 1  # MiB
    total = start + ESP_MIB + root_mib + 1
    image.unlink(missing_ok=True)
    with open(image, "wb") as f:
        f.truncate(total * 2**20)
    layout = (
        "label: gpt\n"
        f"label-id: {DISK_GUID}\n"
        f"start={start}MiB, size={ESP_MIB}MiB, type={ESP_TYPE}, uuid={ESP_PARTUUID}, name=esp\n"
        f"start={start + ESP_MIB}MiB, size={root_mib}MiB, type={ROOT_TYPE}, "
        f"uuid={ROOT_PARTUUID}, name=root\n"
    )
    _run(["sfdisk", "-q", str(image)], "sfdisk", input=layout)
    for part, offset in ((esp, start), (rootfs, start + ESP_MIB)):
        _run(
            [
                "dd",
                f"if={part}",
                f"of={image}",
                "bs=1M",
                f"seek={offset}",
                "conv=notrunc,sparse",
                "status=none",
            ],
            "dd",
        )
        part.unlink()
    return {"kernel": kver, "esp_mib": ESP_MIB, "root_mib": root_mib, "disk_mib": total}


def esp_offset(image: Path) -> int:
    """Byte offset of the ESP in ``image`` (from its partition table)."""
    table = json.loads(_run(["sfdisk", "--json", str(image)], "sfdisk").stdout)["partitiontable"]
    for p in table["partitions"]:
        if p["type"].upper() == ESP_TYPE:
            return int(p["start"]) * int(table.get("sectorsize", 512))
    raise ImageError(f"{image}: no EFI system partition in its partition table")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


# --- the build ---------------------------------------------------------------------------------
def _require_root() -> None:
    if os.geteuid() != 0:
        raise ImageError(
            "image build needs root: debootstrap, chroot and mount do (run it with sudo, or "
            "`sudo make image`)"
        )


def build(opts: BuildOptions, say=lambda msg: None) -> dict:
    """Build (or take from the cache) the image; returns ``{"image", "manifest", "sha256",
    "seconds", "cached", ...}`` with the image and ``image.json`` in ``opts.out``."""
    _require_root()
    t0 = time.monotonic()
    mirror = opts.mirror or debian.apt_mirror()
    if not mirror:
        raise ImageError(
            f"no Debian mirror for {debian.SUITE} in apt's sources (/etc/apt): pass --mirror URL"
        )
    rkey = debian.root_key(mirror)
    key = hashlib.sha256(
        f"{BUILDER_VERSION} {rkey} {tree_hash()} {_dependencies()} {NUMBA_CPU} "
        f"{KERNEL_CMDLINE}".encode()
    ).hexdigest()
    entry = debian.cache_dir() / f"image-{key[:16]}"
    cached = not opts.rebuild and (entry / "image.json").exists() and (entry / IMAGE_NAME).exists()
    if not cached:
        say(f"building the image (inputs {key[:16]})")
        shutil.rmtree(entry, ignore_errors=True)
        _build_entry(entry, key, mirror, say)
    manifest = json.loads((entry / "image.json").read_text())
    opts.out.mkdir(parents=True, exist_ok=True)
    for name in (IMAGE_NAME, "image.json"):
        dest = opts.out / name
        dest.unlink(missing_ok=True)
        try:
            os.link(entry / name, dest)
        except OSError:
            _run(["cp", "--sparse=always", str(entry / name), str(dest)], "copy out")
    seconds = round(time.monotonic() - t0, 1)
    return {
        "image": str(opts.out / IMAGE_NAME),
        "manifest": str(opts.out / "image.json"),
        "sha256": manifest["image"]["sha256"],
        "seconds": seconds,
        "cached": cached,
        "bytes": manifest["image"]["bytes"],
    }


def _build_entry(entry: Path, key: str, mirror: str, say) -> None:
    t0 = time.monotonic()
    work = entry.with_name(entry.name + ".work")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        say("debian: release date of the mirror's suite")
        snapshot = debian.release_date(mirror)
        cached_root = debian.debootstrap_root(mirror, say=say)
        say("wheel: building Tickwire's wheel from this tree")
        wheel = build_wheel(work)
        house = wheelhouse(wheel, extra=("ansible-core>=2.18,<2.19",))
        root = work / "root"
        say("root: copying the debootstrapped root")
        debian.copy_root(cached_root, root)
        with mounted(root):
            say("provision: provision.yml over community.general.chroot (image/vars.yml)")
            stats = _provision(root, work, wheel, house)
            say("first boot: ansible-core, the roles and the image's units")
            _ansible_for_firstboot(root, house)
            _overlay(root)
            say(f"numba: warming the consumer's cache for NUMBA_CPU_NAME={NUMBA_CPU}")
            _warm(root)
            packages = debian.packages_of(root)
            freeze = _run(
                [
                    "chroot",
                    str(root),
                    "/opt/tickwire/venv/bin/python",
                    "-m",
                    "pip",
                    "freeze",
                    "--all",
                ],
                "pip freeze",
            ).stdout.splitlines()
        say("disk: ESP (systemd-boot, kernel, initramfs) and root filesystems, GPT by sfdisk")
        entry.mkdir(parents=True)
        image = entry / IMAGE_NAME
        layout = _assemble(root, work, image)
        say("sha256 of the image")
        manifest = {
            "inputs": key,
            "builder": BUILDER_VERSION,
            "debian": {
                "suite": debian.SUITE,
                "variant": debian.VARIANT,
                "mirror": mirror,
                "snapshot_date": snapshot,
                "included": list(debian.PACKAGES),
            },
            "packages": packages,
            "wheel": {
                "file": wheel.name,
                "version": wheel.name.split("-")[1],
                "sha256": _sha256(wheel),
            },
            "python": freeze,
            "role_variables": role_vars(),
            "provision_stats": stats,
            "kernel_cmdline": KERNEL_CMDLINE,
            "numba_cache": {
                "cpu_name": NUMBA_CPU,
                "dir": "/var/cache/tickwire/numba",
                "note": "build-time cache for a generic x86-64 CPU (loads under TCG and on "
                "real hosts); first boot warms the native one on hardware",
            },
            "layout": {
                **layout,
                "disk_guid": DISK_GUID,
                "esp_partuuid": ESP_PARTUUID,
                "root_partuuid": ROOT_PARTUUID,
            },
            "image": {"file": IMAGE_NAME, "bytes": image.stat().st_size, "sha256": _sha256(image)},
            "build_seconds": round(time.monotonic() - t0, 1),
        }
        (entry / "image.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    except BaseException:
        shutil.rmtree(entry, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
