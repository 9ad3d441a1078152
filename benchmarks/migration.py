"""What live migration costs, between the two namespace hosts of tests/e2e/twohost.py.

    sudo python benchmarks/migration.py [--runs N] [--memory-mib M] [--json]

A guest that has filled its RAM with non-zero data is migrated back and forth
between host a and host b (libvirtd 9, TCG, a veth pair inside namespaces
the benchmark makes). Each migration is one sample of one variant; variants
take turns (their order rotates every round, after a warm-up round), so a
noisy neighbour slows them alike. Printed: medians, and

1. `kvmhook migrate` against `virsh migrate --live --p2p --tls` with the same
   flags (--persistent --undefinesource --auto-converge), on hosts exactly as
   the TLS set-up leaves them (`kvmhook migrate` refuses unsecured hosts):
   goal <= 1.1x, our tool adds nothing to libvirt's own time. Skipped with a
   message while `kvmhook migrate` does not exist;
2. the price of encryption: full TLS (libvirt's channel and QEMU's stream),
   control-channel-only TLS (qemu+tls without --tls: the stream in clear,
   what the reference agent does) and clear text (qemu+tcp). For this part
   only, both hosts get listen_tcp = 1, auth_tcp = "none" and
   migrate_tls_force = 0, and their libvirtd is restarted (the guest keeps
   running).

Non-zero memory: a diskless guest with no kernel keeps its RAM all zero, and
QEMU sends a zero page as a flag of a few bytes, so the figures would be
meaningless. The guest instead boots a 100-byte multiboot kernel
(tests/e2e/fillguest.py; QEMU's -kernel loads multiboot images itself): it
fills RAM from 2 MiB to 1 MiB below its end with xorshift32 output, writes a
marker, and halts with interrupts off, so nothing dirties pages while it is
migrated. The
destination's `domjobinfo --completed` ("Normal data") shows the bytes that
really crossed.

Root only (namespaces, libvirtd). Uses the interpreter running this script,
which must import kvmhook (the project installed editable).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests" / "e2e"))

import fillguest  # noqa: E402
import twohost  # noqa: E402

MIB = fillguest.MIB
GUEST = twohost.GUEST_PREFIX + "bench"
fill_kernel = fillguest.fill_kernel


def wait_for_fill(host: twohost.Host, timeout: float = 300) -> float:
    """Seconds until the guest on `host` has written its marker (its RAM is full)."""
    try:
        return fillguest.wait_for_fill(host, GUEST, timeout)
    except TimeoutError as error:
        raise SystemExit(str(error)) from None


def normal_bytes(host: twohost.Host) -> int:
    """Bytes of non-zero pages the last incoming migration brought to `host`."""
    said = host.virsh("domjobinfo", "--completed", "--rawstats", GUEST).stdout
    for line in said.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "memory_normal_bytes":
            return int(value.split()[0])
    raise SystemExit(f"no memory_normal_bytes in domjobinfo --rawstats:\n{said}")


KVMHOOK_VS_VIRSH = {
    "kvmhook migrate": lambda dest: twohost.kvmhook_migrate_argv(GUEST, dest),
    "virsh migrate --tls, same flags": lambda dest: twohost.virsh_migrate_argv(GUEST, dest),
}
ENCRYPTION = {
    "full TLS (virsh --tls)": lambda dest: twohost.virsh_migrate_argv(GUEST, dest),
    "qemu+tls, stream in clear": lambda dest: twohost.virsh_migrate_argv(
        GUEST, dest, tls_stream=False
    ),
    "qemu+tcp, all clear": lambda dest: twohost.virsh_migrate_argv(
        GUEST, dest, tls_stream=False, scheme="tcp"
    ),
}


class Guest:
    """Where the benchmark guest runs, and where it goes next."""

    def __init__(self, pair: twohost.TwoHosts) -> None:
        self.source, self.dest = pair.a, pair.b

    def migrate(self, name: str, argv: list[str]) -> tuple[float, int]:
        """Run `argv` inside the source; returns its wall time and the non-zero bytes sent."""
        began = time.perf_counter()
        result = self.source.run(*argv, check=False, timeout=600)
        took = time.perf_counter() - began
        if result.returncode != 0 or self.dest.state(GUEST) != "running":
            raise SystemExit(
                f"{name} from {self.source.short} to {self.dest.short} failed:\n"
                f"{result.stdout}\n{result.stderr}"
            )
        sent = normal_bytes(self.dest)
        self.source, self.dest = self.dest, self.source
        return took, sent


def measure(guest: Guest, table: dict, runs: int) -> dict:
    """Interleaved runs, their order rotating each round, after one warm-up round; returns
    per variant the median seconds, the median non-zero MiB sent and the throughput."""
    seconds: dict[str, list[float]] = {name: [] for name in table}
    sent: dict[str, list[int]] = {name: [] for name in table}
    names = list(table)
    for round_ in range(runs + 1):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            took, sent_bytes = guest.migrate(name, table[name](guest.dest))
            if round_:  # round 0 warms caches up
                seconds[name].append(took)
                sent[name].append(sent_bytes)
    rows = {}
    for name in names:
        median = statistics.median(seconds[name])
        mib = statistics.median(sent[name]) / MIB
        rows[name] = {"median_s": median, "sent_mib": mib, "mib_per_s": mib / median}
    return rows


def print_rows(title: str, rows: dict) -> None:
    print(f"\n{title}")
    print(f"  {'variant':34} {'median s':>9} {'sent MiB':>9} {'MiB/s':>8}")
    for name, row in rows.items():
        print(f"  {name:34} {row['median_s']:9.3f} {row['sent_mib']:9.1f} {row['mib_per_s']:8.0f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="migrations per variant (default 5)")
    parser.add_argument("--memory-mib", type=int, default=256, help="guest RAM (default 256)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    reason = twohost.missing_prerequisites()
    if reason:
        sys.stderr.write(f"migration benchmark: {reason}\n")
        return 2
    figures: dict = {"memory_mib": args.memory_mib, "runs": args.runs}
    with twohost.TwoHosts() as pair:
        kernel = pair.root / "fill.kernel"
        kernel.write_bytes(fill_kernel(args.memory_mib))
        pair.a.define_guest(GUEST, twohost.guest_xml(GUEST, args.memory_mib, kernel))
        pair.a.virsh("start", GUEST)
        fill = wait_for_fill(pair.a)
        guest = Guest(pair)
        print(
            f"{args.memory_mib} MiB guest, {args.memory_mib - 3} MiB of its RAM filled with "
            f"non-zero data in {fill:.1f} s (TCG); medians of {args.runs} migrations per "
            "variant, interleaved, back and forth between the two hosts",
            file=sys.stderr if args.json else sys.stdout,
        )
        # 1. Hosts as TLS set-up leaves them: `kvmhook migrate` refuses unsecured hosts.
        rows = measure(guest, KVMHOOK_VS_VIRSH, args.runs)
        ratio = rows["kvmhook migrate"]["median_s"] / rows[
            "virsh migrate --tls, same flags"]["median_s"]  # fmt: skip
        figures["kvmhook_vs_virsh"] = {"rows": rows, "ratio": ratio}
        if not args.json:
            print_rows("kvmhook migrate vs virsh migrate (after kvmhook tls enable)", rows)
            print(f"  kvmhook migrate / virsh migrate --tls: {ratio:.2f}x (goal <= 1.1x)")
        # 2. The price of encryption: clear text allowed for this part only.
        for host in pair.hosts:
            host.allow_clear_text()
            host.restart_libvirtd()  # the guest keeps running; libvirtd reconnects to it
        assert guest.source.state(GUEST) == "running", "guest lost over the libvirtd restart"
        rows = measure(guest, ENCRYPTION, args.runs)
        clear = rows["qemu+tcp, all clear"]["median_s"]
        figures["encryption"] = {
            "rows": rows,
            "full_tls_vs_clear": rows["full TLS (virsh --tls)"]["median_s"] / clear,
            "control_tls_vs_clear": rows["qemu+tls, stream in clear"]["median_s"] / clear,
        }
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        encryption = figures["encryption"]
        print_rows("price of encryption (listen_tcp = 1, migrate_tls_force = 0 for this part)",
                   encryption["rows"])  # fmt: skip
        print(f"  full TLS / clear text:            {encryption['full_tls_vs_clear']:.2f}x")
        print(f"  control-channel TLS / clear text: {encryption['control_tls_vs_clear']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
