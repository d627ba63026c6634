"""Debian, as the image sees it: the suite, the machine's own mirror, the release date of
the mirror's suite (the image's snapshot date), a debootstrapped root cached on its inputs,
and the installed packages of a root.

The image and the Ansible apply tests start from the same cached root, so a machine
debootstraps it once."""

from __future__ import annotations

import glob
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

SUITE = "bookworm"
VARIANT = "minbase"

# What the appliance image's root holds before the roles run: a bootable Debian (kernel,
# initramfs, udev, systemd-networkd, systemd-boot's EFI binary), bcc with headers for the
# image's own kernel, libxdp, linuxptp, and what the roles and first boot use.
PACKAGES = (
    "systemd-sysv",
    "udev",
    "dbus",
    "kmod",
    "initramfs-tools",
    "linux-image-amd64",
    "linux-headers-amd64",
    "systemd-boot-efi",
    "dosfstools",
    "e2fsprogs",
    "python3",
    "python3-venv",
    "python3-bpfcc",
    "libxdp1",
    "libbpf1",
    "xdp-tools",
    "ethtool",
    "iproute2",
    "linuxptp",
    "chrony",  # steers CLOCK_REALTIME from PTP when the ptp role runs timemaster
    "procps",
    "util-linux",
    "ca-certificates",
    "irqbalance",
)


class DebianError(RuntimeError):
    """Debian cannot be fetched or installed; the message says which step and why."""


def cache_dir() -> Path:
    """Where heavy artefacts are cached (``$XDG_CACHE_HOME/tickwire``)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tickwire"


def apt_mirror(sources: str = "/etc/apt", suite: str = SUITE) -> str | None:
    """The machine's own Debian mirror for ``suite``: the first source apt is configured
    with (deb822 ``*.sources`` or one-line ``*.list``) that serves it, so nothing here
    names a mirror of its own."""
    files = [f"{sources}/sources.list", *sorted(glob.glob(f"{sources}/sources.list.d/*"))]
    for path in files:
        if not path.endswith((".list", ".sources")):
            continue
        try:
            text = open(path).read()
        except OSError:
            continue
        for stanza in re.split(r"\n\s*\n", text):  # deb822
            fields = dict(re.findall(r"^([A-Za-z-]+):\s*(.*)$", stanza, re.M))
            if (
                "deb" in fields.get("Types", "").split()
                and suite in fields.get("Suites", "").split()
            ):
                return fields.get("URIs", "").split()[0].rstrip("/") or None
        for line in text.splitlines():  # one-line style
            words = line.split("#", 1)[0].split()
            words = [w for w in words if not w.startswith("[")]
            if len(words) >= 3 and words[0] == "deb" and words[2] == suite:
                return words[1].rstrip("/")
    return None


def release_date(mirror: str, suite: str = SUITE) -> str:
    """The ``Date:`` of the mirror's ``dists/SUITE/Release`` (the snapshot the image was
    built from), fetched by apt itself so its proxy settings apply."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "Release"
        argv = [
            "/usr/lib/apt/apt-helper",
            "download-file",
            f"{mirror}/dists/{suite}/Release",
            str(out),
        ]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise DebianError(
                f"cannot fetch {suite}'s Release file from {mirror}: {done.stderr.strip()}"
            )
        m = re.search(r"^Date:\s*(.+)$", out.read_text(errors="replace"), re.M)
        return m.group(1).strip() if m else "unknown"


def root_key(mirror: str, packages: tuple[str, ...] = PACKAGES, suite: str = SUITE) -> str:
    return hashlib.sha256(f"{suite} {VARIANT} {mirror} {','.join(packages)}".encode()).hexdigest()


def debootstrap_root(
    mirror: str,
    packages: tuple[str, ...] = PACKAGES,
    suite: str = SUITE,
    say=lambda msg: None,
    timeout: float = 1500,
) -> Path:
    """A cached root debootstrapped with ``packages`` (made once per inputs; the .debs
    are cleaned out). Returns its path; never modify it, copy it (``copy_root``)."""
    key = root_key(mirror, packages, suite)
    root = cache_dir() / f"debootstrap-{suite}-{key[:12]}"
    if (root / "usr" / "bin" / "python3").exists():
        say(f"debootstrapped root: cached ({root})")
        return root
    building = root.with_name(root.name + ".building")
    shutil.rmtree(building, ignore_errors=True)
    building.mkdir(parents=True)
    say(f"debootstrap {suite} ({len(packages)} packages and their dependencies) ...")
    argv = [
        "debootstrap",
        f"--variant={VARIANT}",
        f"--include={','.join(packages)}",
        suite,
        str(building),
        mirror,
    ]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        log = building / "debootstrap" / "debootstrap.log"
        tail = log.read_text(errors="replace")[-2000:] if log.exists() else done.stderr[-2000:]
        shutil.rmtree(building, ignore_errors=True)
        raise DebianError(f"debootstrap failed:\n{done.stdout[-1000:]}{tail}")
    subprocess.run(["chroot", str(building), "apt-get", "clean"], capture_output=True)
    building.rename(root)
    return root


def copy_root(cached: Path, dest: Path) -> None:
    """A private copy of a cached root (reflinked where the filesystem can)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["cp", "-a", "--reflink=auto", str(cached), str(dest)], check=True)


def packages_of(root: Path) -> dict[str, str]:
    """Every package installed in ``root``: name -> version."""
    done = subprocess.run(
        ["chroot", str(root), "dpkg-query", "-W", "-f", "${Package} ${Version}\n"],
        capture_output=True,
        text=True,
        check=True,
    )
    return dict(line.split(" ", 1) for line in done.stdout.splitlines() if " " in line)
