"""What each optional hook feature costs a guest's lifecycle event, and what nothing costs.

    python benchmarks/hook_features.py [--runs N] [--against REF] [--json]

Each figure is a pair measured in the same run, interleaved (A, B, A, B, ...),
with the installed launcher and one trivial custom script:

- kvmhook.conf holding other settings only: `start` with and without the file
  (the hook reads it and skips parsing).
- veto policy: `start` with `[hooks] on_failure = abort` against no file.
- admission control: `prepare` with `[capacity] admission = enforce` against no file.
- bridge provisioning (`[network] provision = vxlan, vlan`), the guest's bridge
  brvx-5000 present in a sysfs tree under the sandbox: `prepare` where kvmhook made
  it (claimed under its lock) or the operator did, against `prepare` with a
  kvmhook.conf that provisions nothing; `release` where another guest still uses a
  made bridge (kept) against `release` on a host where kvmhook made nothing.
- per-guest script: the script in `custom/<domain>/` against the same script global.
- rewrite chain: `migrate` (the private outbox) against `start`, and a script writing
  the XML to $KVMHOOK_XML_OUT against the same script writing it to /dev/null.

With `--against REF` (a git commit), also the hook of this tree against the hook
at REF, no kvmhook.conf, for `start` with no script and with one: the hot path
without any feature configured, before and after. Both run from exported
copies of the package, imported the same way.
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from hook_latency import REPO, TEMPLATE, libvirt_env, medians

UUID = "7f3d2a9e-0000-4000-8000-000000000001"
XML = (
    f"<domain type='qemu'><name>bench</name><uuid>{UUID}</uuid>"
    "<memory unit='MiB'>64</memory><vcpu>1</vcpu>"
    "<os><type arch='x86_64' machine='pc'>hvm</type></os><devices>"
    "<interface type='bridge'><mac address='52:54:00:00:00:01'/><source bridge='brvx-5000'/>"
    "<model type='virtio'/></interface></devices></domain>\n"
)
TRIVIAL = "#!/bin/sh\nexit 0\n"
PROVISION = "[network]\nprovision = vxlan, vlan\n"
NO_PROVISION = "[network]\nrename_bridges = yes\n"


class Sandbox:
    """A KVMHOOK_ROOT with the launcher, a custom dir and, optionally, kvmhook.conf."""

    def __init__(self, base: Path, name: str, conf: str | None = None, package: Path | None = None):
        self.root = base / name
        self.custom = self.root / "etc/libvirt/hooks/custom"
        self.custom.mkdir(parents=True)
        if conf is not None:
            path = self.root / "etc/kvmhook/kvmhook.conf"
            path.parent.mkdir(parents=True)
            path.write_text(conf)
        text = TEMPLATE.read_text().replace("#!/usr/bin/python3", f"#!{sys.executable}", 1)
        if package is not None:  # import kvmhook from an exported copy, not the installed one
            text = text.replace(
                "import sys\n", f"import sys\nsys.path.insert(0, {str(package)!r})\n", 1
            )
        self.launcher = self.root / "etc/libvirt/hooks/qemu"
        self.launcher.write_text(text)
        self.launcher.chmod(0o755)

    def script(self, name: str, body: str = TRIVIAL) -> Sandbox:
        path = self.custom / name
        path.parent.mkdir(exist_ok=True)
        path.write_text(body)
        path.chmod(0o755)
        return self

    def bridge(self, name: str, made_for: str | None = None) -> Sandbox:
        """A bridge in <root>/sys/class/net; made by kvmhook for guest `made_for` when given."""
        (self.root / "sys/class/net" / name / "brif").mkdir(parents=True)
        (self.root / "sys/class/net" / name / "bridge").mkdir()
        if made_for is not None:
            memory = self.root / "run/kvmhook/bridges" / name
            memory.mkdir(parents=True)
            (memory / f"guest.{made_for}").touch()
        return self

    def command(self, operation: str) -> tuple[list[str], dict[str, str]]:
        return [str(self.launcher), "bench", operation, "begin", "-"], libvirt_env(self.root)


def export(ref: str | None, target: Path) -> Path:
    """The kvmhook package at git `ref` (None: this working tree) copied under `target`."""
    if ref is None:
        source = REPO / "kvmhook"
        for path in source.rglob("*.py"):
            copy = target / path.relative_to(REPO)
            copy.parent.mkdir(parents=True, exist_ok=True)
            copy.write_bytes(path.read_bytes())
    else:
        archive = subprocess.run(
            ["git", "-C", str(REPO), "archive", ref, "kvmhook"], capture_output=True, check=True
        ).stdout
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(target)
    return target


def pairs(base: Path, against: str | None) -> dict[str, tuple[tuple, tuple]]:
    """Each figure's (feature, baseline) commands."""
    written = base / "new.xml"
    written.write_text(XML.replace("</uuid>", "</uuid><description>x</description>"))
    plain = Sandbox(base, "plain").script("all_10")
    found = {
        "kvmhook.conf, other settings only (start)": (
            Sandbox(base, "other", "[capacity]\ncpu_factor = 4\n")
            .script("all_10")
            .command("start"),
            plain.command("start"),
        ),
        "veto policy on (start)": (
            Sandbox(base, "veto", "[hooks]\non_failure = abort\n")
            .script("all_10")
            .command("start"),
            plain.command("start"),
        ),
        "admission enforced (prepare)": (
            Sandbox(base, "admit", "[capacity]\nadmission = enforce\n")
            .script("all_10")
            .command("prepare"),
            plain.command("prepare"),
        ),
        "provision on, made bridge present (prepare)": (
            Sandbox(base, "made", PROVISION)
            .bridge("brvx-5000", made_for="other")
            .script("all_10")
            .command("prepare"),
            Sandbox(base, "unprovisioned", NO_PROVISION).script("all_10").command("prepare"),
        ),
        "provision on, operator's bridge present (prepare)": (
            Sandbox(base, "operators", PROVISION)
            .bridge("brvx-5000")
            .script("all_10")
            .command("prepare"),
            Sandbox(base, "unprovisioned2", NO_PROVISION).script("all_10").command("prepare"),
        ),
        "made bridge another guest uses (release)": (
            Sandbox(base, "release", PROVISION)
            .bridge("brvx-5000", made_for="other")
            .script("all_10")
            .command("release"),
            plain.command("release"),
        ),
        "per-guest script (start)": (
            Sandbox(base, "guest").script("bench/all_10").command("start"),
            plain.command("start"),
        ),
        "rewrite outbox (migrate vs start)": (plain.command("migrate"), plain.command("start")),
        "XML rewritten (migrate)": (
            Sandbox(base, "rewrite")
            .script("all_10", f'#!/bin/sh\ncat "{written}" > "$KVMHOOK_XML_OUT"\n')
            .command("migrate"),
            Sandbox(base, "norewrite")
            .script("all_10", f'#!/bin/sh\ncat "{written}" > /dev/null\n')
            .command("migrate"),
        ),
    }
    if against is not None:
        now, then = export(None, base / "now"), export(against, base / "then")
        for scripts, label in ((0, "no script"), (1, "one script")):
            pair = []
            for package in (now, then):
                sandbox = Sandbox(base, f"{package.name}{scripts}", package=package)
                if scripts:
                    sandbox.script("all_10")
                pair.append(sandbox.command("start"))
            found[f"this tree vs {against}, no kvmhook.conf, {label} (start)"] = tuple(pair)
    return found


def measure(runs: int, against: str | None) -> dict:
    with tempfile.TemporaryDirectory(prefix="kvmhook-features-") as tmp:
        base = Path(tmp)
        xml = base / "domain.xml"
        xml.write_text(XML)
        figures = {}
        for name, (feature, baseline) in pairs(base, against).items():
            t = medians({"feature": feature, "baseline": baseline}, xml, runs)
            figures[name] = {
                "feature_ms": round(t["feature"] * 1000, 3),
                "baseline_ms": round(t["baseline"] * 1000, 3),
                "added_ms": round((t["feature"] - t["baseline"]) * 1000, 3),
                "ratio": round(t["feature"] / t["baseline"], 3),
            }
    return {"runs": runs, "python": sys.version.split()[0], "figures": figures}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=50, help="interleaved runs (default 50)")
    parser.add_argument("--against", metavar="REF", help="also compare with the hook at git REF")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    options = parser.parse_args()
    result = measure(options.runs, options.against)
    if options.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"python {result['python']}, {result['runs']} interleaved runs, median wall time:")
    print(f"  {'':<62} {'feature':>8} {'baseline':>9} {'added':>8} {'ratio':>6}")
    for name, f in result["figures"].items():
        print(
            f"  {name:<62} {f['feature_ms']:6.2f}ms {f['baseline_ms']:7.2f}ms"
            f" {f['added_ms']:+6.2f}ms {f['ratio']:5.2f}x"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
