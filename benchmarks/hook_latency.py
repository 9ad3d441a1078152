"""What the qemu hook costs a guest start, as ratios against baselines measured in the same run.

    python benchmarks/hook_latency.py [--runs N] [--json]

1. startup: the installed launcher with an empty custom dir, against a bare
   `python -I -c pass` of the same interpreter (median wall time; target <= 1.2x).
2. per script: what each extra trivial script adds, over running that script
   directly (target <= 2 ms).
3. memory: the hook's peak RSS with a 10 MiB domain XML and a script printing
   1 GiB (target < 32 MiB), beside a bare interpreter's.

Runs are interleaved (A, B, A, B, ...) so that a noisy neighbour slows both
sides alike. Uses the interpreter running this script, which must be able to
import kvmhook.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TEMPLATE = REPO / "kvmhook" / "data" / "qemu-hook"
TRIVIAL = "#!/bin/sh\nexit 0\n"
SCRIPTS = 10
MIB = 1024 * 1024


def launcher(root: Path) -> Path:
    """The launcher as installed, bound to this interpreter instead of /usr/bin/python3."""
    path = root / "etc/libvirt/hooks/qemu"
    path.parent.mkdir(parents=True, exist_ok=True)
    text = TEMPLATE.read_text().replace("#!/usr/bin/python3", f"#!{sys.executable}", 1)
    path.write_text(text)
    path.chmod(0o755)
    return path


def libvirt_env(root: Path) -> dict[str, str]:
    """The environment libvirtd gives a hook, plus the sandbox root."""
    return {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C", "KVMHOOK_ROOT": str(root)}


def wall(argv: list[str], env: dict[str, str], stdin: Path) -> float:
    with stdin.open("rb") as source:
        start = time.perf_counter()
        # stdout discarded: a hook printing rewritten XML must not flood the terminal.
        subprocess.run(argv, stdin=source, stdout=subprocess.DEVNULL, env=env, check=True)
        return time.perf_counter() - start


def medians(commands: dict[str, tuple[list[str], dict[str, str]]], stdin: Path, runs: int) -> dict:
    """Median wall time of each command, run interleaved `runs` times after a warm-up."""
    times: dict[str, list[float]] = {name: [] for name in commands}
    for argv, env in commands.values():
        wall(argv, env, stdin)  # warm caches and .pyc files
    for _ in range(runs):
        for name, (argv, env) in commands.items():
            times[name].append(wall(argv, env, stdin))
    return {name: statistics.median(values) for name, values in times.items()}


def peak_rss_mib(argv: list[str], env: dict[str, str], stdin: Path) -> float:
    """Peak resident memory of `argv` (and its children, but those are measured apart)."""
    probe = (
        "import resource, subprocess, sys\n"
        "with open(sys.argv[1], 'rb') as f:\n"
        "    subprocess.run(sys.argv[2:], stdin=f, check=True)\n"
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe, str(stdin), *argv],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    return int(out.stdout.split()[-1]) / 1024


def measure(runs: int, big_output: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="kvmhook-bench-") as tmp:
        work = Path(tmp)
        xml = work / "domain.xml"
        xml.write_text("<domain type='kvm'><name>bench</name></domain>\n")
        empty, busy = work / "empty", work / "busy"
        for root in (empty, busy):
            (root / "etc/libvirt/hooks/custom").mkdir(parents=True)
        for i in range(SCRIPTS):
            script = busy / f"etc/libvirt/hooks/custom/all_{i:02d}"
            script.write_text(TRIVIAL)
            script.chmod(0o755)
        direct = busy / "etc/libvirt/hooks/custom/all_00"
        args = ["bench", "start", "begin", "-"]
        env = libvirt_env(empty)
        t = medians(
            {
                "python -I -c pass": ([sys.executable, "-I", "-c", "pass"], env),
                "hook, empty custom dir": ([str(launcher(empty)), *args], env),
                f"hook, {SCRIPTS} trivial scripts": (
                    [str(launcher(busy)), *args],
                    libvirt_env(busy),
                ),
                "trivial script run directly": ([str(direct), *args], env),
            },
            xml,
            runs,
        )
        base, hook_empty, hook_busy, script = t.values()
        per_script = (hook_busy - hook_empty) / SCRIPTS - script

        heavy = work / "heavy"
        (heavy / "etc/libvirt/hooks/custom").mkdir(parents=True)
        loud = heavy / "etc/libvirt/hooks/custom/all_loud"
        loud.write_text(f"#!/bin/sh\nhead -c {big_output} /dev/zero | tr '\\0' 'y'\n")
        loud.chmod(0o755)
        big_xml = work / "big.xml"
        big_xml.write_bytes(b"<domain><name>bench</name>" + b"x" * (10 * MIB) + b"</domain>")
        heavy_env = libvirt_env(heavy)
        rss_hook = peak_rss_mib([str(launcher(heavy)), *args], heavy_env, big_xml)
        rss_base = peak_rss_mib([sys.executable, "-I", "-c", "pass"], heavy_env, big_xml)
    return {
        "runs": runs,
        "python": sys.version.split()[0],
        "median_ms": {name: round(value * 1000, 3) for name, value in t.items()},
        "startup_ratio": round(hook_empty / base, 3),
        "per_script_overhead_ms": round(per_script * 1000, 3),
        "peak_rss_mib": {
            f"hook, 10 MiB XML, script printing {big_output // MIB} MiB": round(rss_hook, 1),
            "python -I -c pass": round(rss_base, 1),
        },
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100, help="interleaved runs (default 100)")
    parser.add_argument(
        "--output-mib", type=int, default=1024, help="MiB the loud script prints (default 1024)"
    )
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    options = parser.parse_args()
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    result = measure(options.runs, options.output_mib * MIB)
    if options.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"python {result['python']}, {result['runs']} interleaved runs, median wall time:")
    for name, value in result["median_ms"].items():
        print(f"  {name:<32} {value:8.2f} ms")
    ratio = result["startup_ratio"]
    print(f"startup ratio (hook / python -I -c pass): {ratio:.2f}x  (target <= 1.2x)")
    print(f"added per trivial script: {result['per_script_overhead_ms']:.2f} ms  (target <= 2 ms)")
    for name, value in result["peak_rss_mib"].items():
        print(f"peak RSS, {name}: {value:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
