"""What making and removing a guest-network bridge costs, and why kvmhook runs `ip` for it.

    python benchmarks/bridge_making.py [--runs N] [--json]     (root, iproute2)

Runs in a network namespace of its own (`ip netns add`; nothing outside it is
touched), with cloudbr0 holding 10.9.0.1/24 as the guest network device and
the installed launcher under a sandbox root provisioning VXLAN. Each run, in
this order, median wall times over the runs:

1. the hook, a real process as libvirtd runs it: `prepare` of guest a, which
   makes brvx-5000 with vxlan5000 and the group's route; `prepare` of guest b,
   which finds them present; `release` of b (kept: a uses it); `release` of
   a, which removes them. Making costs prepare(a) - prepare(b); removing,
   release(a) - release(b).
2. the alternative, pyroute2 (Debian's python3-pyroute2, netlink from Python):
   a fresh interpreter, as each hook run is one, making the same devices and
   route, then one removing them, against a bare interpreter; and one that
   only imports it. Run with /usr/bin/python3, which has Debian's packages;
   left out, and said so, when it cannot import pyroute2.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TEMPLATE = REPO / "kvmhook" / "data" / "qemu-hook"
SYSTEM_PYTHON = "/usr/bin/python3"
XML = (
    "<domain type='kvm'><name>{name}</name><devices><interface type='bridge'>"
    "<source bridge='brvx-5000'/></interface></devices></domain>"
)
PYROUTE2_MAKE = """
from pyroute2 import IPRoute
with IPRoute() as ipr:
    dev = ipr.link_lookup(ifname="cloudbr0")[0]
    ipr.link("add", ifname="vxlan5000", kind="vxlan", vxlan_id=5000, vxlan_link=dev,
             vxlan_group="239.0.19.136", vxlan_ttl=10, vxlan_port=8472)
    ipr.link("add", ifname="brvx-5000", kind="bridge", br_forward_delay=0)
    bridge, vxlan = ipr.link_lookup(ifname="brvx-5000")[0], ipr.link_lookup(ifname="vxlan5000")[0]
    ipr.link("set", index=vxlan, master=bridge)
    ipr.link("set", index=vxlan, state="up")
    ipr.link("set", index=bridge, state="up")
    ipr.route("add", dst="239.0.19.136/32", oif=dev)
"""
PYROUTE2_REMOVE = """
from pyroute2 import IPRoute
with IPRoute() as ipr:
    dev = ipr.link_lookup(ifname="cloudbr0")[0]
    ipr.route("del", dst="239.0.19.136/32", oif=dev)
    for name in ("brvx-5000", "vxlan5000"):
        ipr.link("del", index=ipr.link_lookup(ifname=name)[0])
"""


def run(argv: list[str], stdin: bytes = b"", env: dict[str, str] | None = None) -> float:
    """Seconds `argv` took; raises when it fails (a figure of a failing run means nothing)."""
    began = time.perf_counter()
    result = subprocess.run(argv, input=stdin, capture_output=True, env=env, check=False)
    took = time.perf_counter() - began
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed: {result.stderr.decode(errors='replace')}")
    return took


class Namespace:
    """The network namespace and the sandbox root the hook runs in."""

    def __init__(self, base: Path) -> None:
        self.name = f"kvmhook-bench-{uuid.uuid4().hex[:8]}"
        self.root = base / "root"
        (self.root / "etc/libvirt/hooks/custom").mkdir(parents=True)
        (self.root / "etc/kvmhook").mkdir(parents=True)
        (self.root / "etc/kvmhook/kvmhook.conf").write_text("[network]\nprovision = vxlan\n")
        (self.root / "etc/cloudstack/agent").mkdir(parents=True)
        agent = self.root / "etc/cloudstack/agent/agent.properties"
        agent.write_text("guest.network.device=cloudbr0\n")
        (self.root / "sys").symlink_to("/sys")  # in `ip netns exec`, the namespace's sysfs
        self.launcher = self.root / "etc/libvirt/hooks/qemu"
        text = TEMPLATE.read_text().replace("#!/usr/bin/python3", f"#!{sys.executable}", 1)
        self.launcher.write_text(text)
        self.launcher.chmod(0o755)
        subprocess.run(["ip", "netns", "add", self.name], check=True)
        for command in (
            "link set lo up",
            "link add cloudbr0 type bridge",
            "address add 10.9.0.1/24 dev cloudbr0",
            "link set cloudbr0 up",
        ):
            subprocess.run(["ip", "-n", self.name, *command.split()], check=True)

    def inside(self, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]

    def hook(self, guest: str, operation: str, subop: str) -> float:
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "KVMHOOK_ROOT": str(self.root)}
        argv = self.inside(str(self.launcher), guest, operation, subop, "-")
        return run(argv, XML.format(name=guest).encode(), env)

    def python(self, code: str) -> float:
        return run(self.inside(SYSTEM_PYTHON, "-I", "-c", code))

    def close(self) -> None:
        subprocess.run(["ip", "netns", "del", self.name], check=False)


def has_pyroute2() -> bool:
    probe = [SYSTEM_PYTHON, "-I", "-c", "import pyroute2"]
    return subprocess.run(probe, capture_output=True, check=False).returncode == 0


def measure(runs: int) -> dict:
    samples: dict[str, list[float]] = {}
    pyroute2 = has_pyroute2()
    with tempfile.TemporaryDirectory(prefix="kvmhook-bridges-") as tmp:
        space = Namespace(Path(tmp))
        try:
            for _ in range(runs):
                for label, took in (
                    ("hook prepare, makes the bridge", space.hook("a", "prepare", "begin")),
                    ("hook prepare, bridge present", space.hook("b", "prepare", "begin")),
                    ("hook release, bridge kept", space.hook("b", "release", "end")),
                    ("hook release, removes the bridge", space.hook("a", "release", "end")),
                ):
                    samples.setdefault(label, []).append(took)
                if pyroute2:
                    samples.setdefault("python, pass", []).append(space.python("pass"))
                    for label, code in (
                        ("python, import pyroute2", "import pyroute2.iproute"),
                        ("python, pyroute2 makes", PYROUTE2_MAKE),
                        ("python, pyroute2 removes", PYROUTE2_REMOVE),
                    ):
                        samples.setdefault(label, []).append(space.python(code))
        finally:
            space.close()
    median = {label: statistics.median(values) * 1000 for label, values in samples.items()}
    figures = {
        "making, by the hook (ip)": median["hook prepare, makes the bridge"]
        - median["hook prepare, bridge present"],
        "removing, by the hook (ip)": median["hook release, removes the bridge"]
        - median["hook release, bridge kept"],
    }
    if pyroute2:
        bare = median["python, pass"]
        figures["importing pyroute2"] = median["python, import pyroute2"] - bare
        figures["making, pyroute2 (import included)"] = median["python, pyroute2 makes"] - bare
        figures["removing, pyroute2 (import included)"] = median["python, pyroute2 removes"] - bare
    return {
        "runs": runs,
        "pyroute2": pyroute2,
        "median_ms": {label: round(value, 3) for label, value in median.items()},
        "added_ms": {label: round(value, 3) for label, value in figures.items()},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30, help="runs (default 30)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    options = parser.parse_args()
    if os.geteuid() != 0 or shutil.which("ip") is None:
        print("needs root and iproute2 (ip) for a network namespace", file=sys.stderr)
        return 1
    result = measure(options.runs)
    if options.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{result['runs']} runs, median wall time of each process:")
    for label, value in result["median_ms"].items():
        print(f"  {label:<40} {value:8.2f} ms")
    print("what each costs, against its baseline above:")
    for label, value in result["added_ms"].items():
        print(f"  {label:<40} {value:+8.2f} ms")
    if not result["pyroute2"]:
        print(f"  pyroute2: {SYSTEM_PYTHON} cannot import it (apt install python3-pyroute2)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
