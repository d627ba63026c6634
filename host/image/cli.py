"""The appliance image's verbs: ``image build`` (``make image``), ``image boot`` (qemu,
with ``--lab`` and ``--check SESSION``) and ``image config`` (drop a tickwire.toml on an
image's ESP). ``add_parsers`` declares them on ``tickwire``'s verb list."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from host.cli import positive, verb

EPILOG_IMAGE = """examples:
  tickwire image build                      build/image/tickwire.img and image.json
  tickwire image config build/image/tickwire.img my-host.toml
  tickwire image boot build/image/tickwire.img --lab --check session.itch --json

All run as root. image/README.md: the layout, the manifest, first boot, rebuilding.
"""
EPILOG_BUILD = """examples:
  tickwire image build                      (make image) cached on its inputs' hash
  tickwire image build --json               image, manifest, sha256, seconds, cached
  tickwire image build --rebuild            ignore the cached image (not the root)
"""
EPILOG_BOOT = """examples:
  tickwire image boot build/image/tickwire.img --lab
  tickwire image boot build/image/tickwire.img --lab --check session.itch --json
  tickwire image boot IMG --config host.toml --work /tmp/vm   keep console.log and disk

KVM is tried with a deadline and TCG used when it does not boot; the console goes to
WORK/console.log, shown on failure.
"""
EPILOG_CONFIG = """examples:
  tickwire image config build/image/tickwire.img host.toml   checked, then copied to the ESP
"""


def add_parsers(sub) -> None:
    im = verb(sub, "image", "build, configure and boot the appliance image", EPILOG_IMAGE)
    actions = im.add_subparsers(dest="action", metavar="ACTION", required=True)

    b = verb(
        actions, "build", "build the bootable appliance image (cached on its inputs)", EPILOG_BUILD
    )
    b.add_argument("--out", default="build/image", help="directory for tickwire.img and image.json")
    b.add_argument("--mirror", help="Debian mirror URL (default: the one apt uses)")
    b.add_argument(
        "--rebuild", action="store_true", help="build again though the inputs are cached"
    )
    b.add_argument("--json", action="store_true", help="machine-readable result")
    b.set_defaults(func=_build)

    bo = verb(actions, "boot", "boot the image in qemu; --check a session end to end", EPILOG_BOOT)
    bo.add_argument("image", metavar="IMAGE", help="the raw disk image (tickwire.img)")
    bo.add_argument(
        "--lab",
        action="store_true",
        help="NICs on taps in an exchange namespace; a lab tickwire.toml",
    )
    bo.add_argument(
        "--check", metavar="SESSION", help="publish SESSION on A and B; pass on the exact digest"
    )
    bo.add_argument("--config", metavar="FILE", help="tickwire.toml to put on the ESP instead")
    bo.add_argument("--prefix", default="twvm", help="exchange namespace prefix (twvm)")
    bo.add_argument("--memory", type=positive, default=2048, help="guest MiB (2048)")
    bo.add_argument("--cpus", type=positive, default=2, help="guest CPUs (2)")
    bo.add_argument(
        "--accel", choices=["auto", "kvm", "tcg"], default="auto", help="accelerator (auto)"
    )
    bo.add_argument("--work", metavar="DIR", help="keep the disk copy and console.log here")
    bo.add_argument(
        "--timeout", type=positive, default=1800, help="seconds to wait for ready (1800)"
    )
    bo.add_argument("--json", action="store_true", help="machine-readable result")
    bo.set_defaults(func=_boot)

    c = verb(actions, "config", "check a tickwire.toml and put it on an image's ESP", EPILOG_CONFIG)
    c.add_argument("image", metavar="IMAGE")
    c.add_argument("config", metavar="TOML")
    c.set_defaults(func=_config)


def _say(msg: str) -> None:
    print(f"tickwire image: {msg}", file=sys.stderr, flush=True)


def _build(args: argparse.Namespace) -> int:
    from host.image import build

    opts = build.BuildOptions(out=Path(args.out), mirror=args.mirror, rebuild=args.rebuild)
    r = build.build(opts, say=_say)
    if args.json:
        print(json.dumps(r))
    else:
        how = "cached" if r["cached"] else "built"
        print(
            f"{r['image']}: {how} in {r['seconds']:.1f} s, {r['bytes'] / 2**30:.2f} GiB "
            f"(sparse), sha256 {r['sha256'][:16]}…; manifest {r['manifest']}"
        )
    return 0


def _boot(args: argparse.Namespace) -> int:
    from host.image import boot

    opts = boot.BootOptions(
        image=Path(args.image),
        lab=args.lab,
        check=Path(args.check) if args.check else None,
        config=Path(args.config) if args.config else None,
        prefix=args.prefix,
        memory_mib=args.memory,
        cpus=args.cpus,
        accel=args.accel,
        ready_timeout=float(args.timeout),
        work=Path(args.work) if args.work else None,
    )
    r = boot.boot(opts, say=_say)
    if args.json:
        print(json.dumps(r))
    else:
        if r.get("error"):
            print(f"console ({r['console']}), last lines:\n{r.get('console_tail', '')}\n")
            print(f"FAILED: {r['error']}")
        else:
            print(f"ready in {r.get('ready_s')} s ({r['accel']}); preflight {r.get('preflight')}")
            if "digest" in r:
                print(
                    f"digest {r['digest']} "
                    f"({'==' if r['digest'] == r['expected_digest'] else '!='} tickwire book)"
                )
                print(f"XDP {r.get('xdp')}; counters {r.get('counters')}")
            print("OK" if r["ok"] else "FAILED: " + "; ".join(r.get("problems", [])))
    return 0 if r["ok"] else 1


def _config(args: argparse.Namespace) -> int:
    from host.image import boot

    boot.put_config(Path(args.image), Path(args.config))
    print(f"{args.image}: tickwire.toml written to the ESP")
    return 0
