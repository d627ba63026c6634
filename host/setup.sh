#!/usr/bin/env bash
# Idempotent set-up of a Tickwire development / lab machine (Debian 12, run as root).
#
#   1. Debian packages the whole system needs (bcc, libxdp, clang, iproute2, ...).
#   2. Kernel headers for bcc: this kernel ships none, so Debian's cloud headers are
#      installed and /lib/modules/$(uname -r)/{build,source} point at their two trees.
#   3. The BPF filesystem on /sys/fs/bpf (systemd mounts it at boot; a minimal VM init
#      does not): tickwire run's preflight requires it in XDP mode, lab faults pin there.
#   4. A virtualenv (.venv) on the system Python that can import bcc, with the project
#      installed editable plus its test, bench, dev and provision (Ansible) extras.
#
# A second run changes nothing and takes seconds: every step checks before it acts.
# Any failure names the step that failed and why, and exits non-zero.
set -uo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=${TICKWIRE_VENV:-$ROOT/.venv}
SYS_PY=/usr/bin/python3
export DEBIAN_FRONTEND=noninteractive

PACKAGES=(
  python3-bpfcc bpfcc-tools libbpfcc-dev python3-venv python3-dev
  libxdp-dev libbpf-dev xdp-tools clang llvm gcc make pkg-config
  iproute2 ethtool iputils-ping procps kmod linux-headers-cloud-amd64
  debootstrap linuxptp
  qemu-system-x86 ovmf mtools dosfstools fdisk
)

say() { printf 'setup: %s\n' "$*"; }
fail() { printf 'setup: FAILED at step "%s": %s\n' "$1" "$2" >&2; exit 1; }

[ "$(id -u)" = 0 ] || fail "privileges" "must run as root (it installs Debian packages and links kernel headers)"
[ -r /etc/debian_version ] || fail "platform" "needs Debian 12 (apt, dpkg); /etc/debian_version is missing"

# --- 1. Debian packages -------------------------------------------------------------
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  say "installing Debian packages: ${missing[*]}"
  log=$(mktemp)
  if ! apt-get update -q >"$log" 2>&1; then
    tail -5 "$log" >&2; fail "apt-get update" "could not refresh the package lists (network or apt sources)"
  fi
  if ! apt-get install -y -q --no-install-recommends "${missing[@]}" >"$log" 2>&1; then
    tail -15 "$log" >&2; fail "apt-get install" "could not install ${missing[*]}"
  fi
  rm -f "$log"
else
  say "Debian packages: present"
fi

# --- 2. Kernel headers for bcc ------------------------------------------------------
kver=$(uname -r)
moddir=/lib/modules/$kver
if [ -e "$moddir/build/include/linux/kconfig.h" ] || [ -e "$moddir/build/include/generated/autoconf.h" ]; then
  say "kernel headers: $moddir/build present"
else
  build_tree=$(ls -d /usr/src/linux-headers-*-cloud-amd64 2>/dev/null | sort -V | tail -1)
  [ -n "$build_tree" ] || fail "kernel headers" "no /usr/src/linux-headers-*-cloud-amd64 tree after installing linux-headers-cloud-amd64"
  common_tree=${build_tree%-cloud-amd64}-common
  [ -d "$common_tree" ] || fail "kernel headers" "missing $common_tree (the common half of $build_tree)"
  mkdir -p "$moddir" || fail "kernel headers" "cannot create $moddir"
  ln -sfn "$build_tree" "$moddir/build" || fail "kernel headers" "cannot link $moddir/build"
  ln -sfn "$common_tree" "$moddir/source" || fail "kernel headers" "cannot link $moddir/source"
  say "kernel headers: linked $moddir/build -> $build_tree, source -> $common_tree"
fi

# --- 3. The BPF filesystem ----------------------------------------------------------
if awk '$2 == "/sys/fs/bpf" && $3 == "bpf" {found=1} END {exit !found}' /proc/mounts; then
  say "bpffs: present on /sys/fs/bpf"
else
  mkdir -p /sys/fs/bpf 2>/dev/null
  mount -t bpf bpf /sys/fs/bpf || fail "bpffs" "cannot mount the BPF filesystem on /sys/fs/bpf"
  say "bpffs: mounted the BPF filesystem on /sys/fs/bpf"
fi

# --- 4. Virtualenv with bcc visible, project installed editable ---------------------
if [ ! -x "$VENV/bin/python" ]; then
  say "creating virtualenv $VENV (system site-packages, for bcc)"
  "$SYS_PY" -m venv --system-site-packages "$VENV" || fail "virtualenv" "$SYS_PY -m venv failed (is python3-venv installed?)"
fi
"$VENV/bin/python" -c 'import bcc' 2>/dev/null || fail "virtualenv" "the venv cannot import bcc (python3-bpfcc in $SYS_PY's dist-packages)"

stamp="$VENV/.tickwire-installed"
want=$(cat "$ROOT/pyproject.toml" "$ROOT"/dataplane/_*_build.py "$ROOT"/host/*/_*_build.py 2>/dev/null | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$VENV/bin/python" -c 'import dataplane, host' 2>/dev/null; then
  say "python environment: up to date"
else
  say "installing the project (editable, with test, bench, dev and provision extras) into $VENV"
  log=$(mktemp)
  if ! "$VENV/bin/python" -m pip install -q --upgrade pip >"$log" 2>&1; then
    tail -5 "$log" >&2; fail "pip" "could not upgrade pip in $VENV"
  fi
  if ! "$VENV/bin/python" -m pip install -q -e "$ROOT[test,bench,dev,provision]" >"$log" 2>&1; then
    tail -20 "$log" >&2; fail "pip install" "could not install the project and its extras (see above)"
  fi
  rm -f "$log"
  echo "$want" >"$stamp"
fi
say "ready: $VENV/bin/tickwire"
