"""How long a drain takes with --parallel 1, 2 and 4, between the two namespace hosts of
tests/e2e/twohost.py.

    sudo python benchmarks/drain.py [--runs N] [--guests G] [--memory-mib M] [--json]

G guests (default 4) that have filled their RAM with non-zero data
(tests/e2e/fillguest.py: as benchmarks/migration.py's guest, halted once
full, so nothing dirties pages while they move) run on one host; `kvmhook
maintenance enter --to OTHER --parallel P` drains them to the other (live,
over TLS on both channels, as secured hosts migrate), then `cancel`, and the
next drain goes back the other way. Each drain is one sample of one
--parallel value; the values take turns (their order rotates every round,
after a warm-up round), so a noisy neighbour slows them alike. Printed: the
median drain time per value and its ratio to --parallel 1 (the goal: 2 at
most 0.7x of 1).

Each host has a /var/lib/kvmhook of its own (the maintenance state): the
harness makes it private. Root only (namespaces, libvirtd). Uses the interpreter running this
script, which must import kvmhook (the project installed editable).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests" / "e2e"))

import fillguest  # noqa: E402
import twohost  # noqa: E402

PARALLEL = (1, 2, 4)


def kvmhook(host: twohost.Host, *args: str, timeout: float = 900):
    return host.run(str(twohost.KVMHOOK), *args, check=False, timeout=timeout)


class Drains:
    """Where the guests run, and drains of them to the other host and back."""

    def __init__(self, pair: twohost.TwoHosts, guests: list[str]) -> None:
        self.source, self.dest = pair.a, pair.b
        self.guests = guests

    def drain(self, parallel: int) -> float:
        """Wall seconds of `maintenance enter --to DEST --parallel P` on the source."""
        began = time.perf_counter()
        result = kvmhook(
            self.source,
            "maintenance", "enter", "--to", self.dest.hostname, "--parallel", str(parallel),
        )  # fmt: skip
        took = time.perf_counter() - began
        running = [name for name in self.guests if self.dest.state(name) == "running"]
        if result.returncode != 0 or len(running) != len(self.guests):
            raise SystemExit(
                f"drain --parallel {parallel} from {self.source.short} failed:\n"
                f"{result.stdout}\n{result.stderr}"
            )
        cancelled = kvmhook(self.source, "maintenance", "cancel")
        if cancelled.returncode != 0:
            raise SystemExit(f"cancel on {self.source.short} failed: {cancelled.stderr}")
        self.source, self.dest = self.dest, self.source
        return took


def measure(drains: Drains, runs: int) -> dict[int, list[float]]:
    seconds: dict[int, list[float]] = {parallel: [] for parallel in PARALLEL}
    for round_ in range(runs + 1):
        shift = round_ % len(PARALLEL)
        for parallel in PARALLEL[shift:] + PARALLEL[:shift]:
            took = drains.drain(parallel)
            if round_:  # round 0 warms caches up
                seconds[parallel].append(took)
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="drains per value (default 3)")
    parser.add_argument("--guests", type=int, default=4, help="guests drained (default 4)")
    parser.add_argument("--memory-mib", type=int, default=192, help="each guest's RAM (192)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    reason = twohost.missing_prerequisites()
    if reason:
        sys.stderr.write(f"drain benchmark: {reason}\n")
        return 2
    with twohost.TwoHosts() as pair:  # each host has a /var/lib/kvmhook of its own
        kernel = pair.root / "fill.kernel"
        kernel.write_bytes(fillguest.fill_kernel(args.memory_mib))
        guests = [f"{twohost.GUEST_PREFIX}drain{index}" for index in range(args.guests)]
        for name in guests:
            pair.a.define_guest(name, twohost.guest_xml(name, args.memory_mib, kernel))
            pair.a.virsh("start", name)
        for name in guests:
            fillguest.wait_for_fill(pair.a, name)
        seconds = measure(Drains(pair, guests), args.runs)
    medians = {parallel: statistics.median(seconds[parallel]) for parallel in PARALLEL}
    ratios = {parallel: medians[parallel] / medians[1] for parallel in PARALLEL}
    figures = {
        "guests": args.guests,
        "memory_mib": args.memory_mib,
        "runs": args.runs,
        "cores": os.cpu_count(),
        "seconds": {str(p): seconds[p] for p in PARALLEL},
        "median_s": {str(p): medians[p] for p in PARALLEL},
        "ratio_to_parallel_1": {str(p): ratios[p] for p in PARALLEL},
    }
    if args.json:
        print(json.dumps(figures, indent=2))
        return 0
    print(
        f"{args.guests} guests of {args.memory_mib} MiB, RAM filled with non-zero data, drained"
        f" over TLS between the two namespace hosts ({os.cpu_count()} cores, TCG); medians of"
        f" {args.runs} drains per value, interleaved, back and forth"
    )
    print(f"  {'--parallel':>10} {'median s':>9} {'vs 1':>6}   samples")
    for parallel in PARALLEL:
        samples = " ".join(f"{value:.2f}" for value in seconds[parallel])
        print(f"  {parallel:>10} {medians[parallel]:9.2f} {ratios[parallel]:5.2f}x   {samples}")
    print(f"  --parallel 2 / --parallel 1: {ratios[2]:.2f}x (goal <= 0.7x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
