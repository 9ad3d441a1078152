"""A guest whose RAM is full of non-zero data, and one that keeps rewriting it.

A diskless guest with no kernel keeps its RAM all zero, and QEMU sends a zero
page as a flag of a few bytes, so a migration of it says nothing about real
guests. These guests boot a multiboot kernel of about 100 bytes made here
(QEMU's -kernel loads multiboot images itself): it fills RAM from 2 MiB to
1 MiB below its end with xorshift32 output and writes a marker; then it halts
with interrupts off (nothing dirties pages while it is migrated), or, with
`keep_writing`, starts over and rewrites that memory for ever, faster than a
slow link sends it, so that a pre-copy migration never converges.

Used by benchmarks/migration.py, benchmarks/drain.py and the drain and
post-copy e2e tests (tests/e2e/test_maintenance_mode.py).
"""

from __future__ import annotations

import struct
import time

MIB = 1024 * 1024
FILL_START = 0x200000  # 2 MiB: above the kernel (loaded at 1 MiB)
MARKER_ADDRESS = 0x1FF000  # below FILL_START, written when a fill is done
MARKER = 0x600DF00D


def fill_kernel(memory_mib: int, keep_writing: bool = False) -> bytes:
    """A multiboot (v1, a.out kludge) flat image: fill RAM with xorshift32, mark, then halt
    (or, `keep_writing`, fill it again and again)."""
    load = 0x100000
    end = memory_mib * MIB - MIB  # leave the top MiB (ACPI tables) alone
    entry = load + 32
    code = b"".join(
        [
            b"\xfc",  # cld
            b"\xbf" + struct.pack("<I", FILL_START),  # mov edi, FILL_START
            b"\xb9" + struct.pack("<I", end),  # mov ecx, end
            b"\xb8" + struct.pack("<I", 0x2545F491),  # mov eax, seed (non-zero)
        ]
    )
    loop = b"".join(
        [
            b"\x89\xc2\xc1\xe2\x0d\x31\xd0",  # mov edx, eax; shl edx, 13; xor eax, edx
            b"\x89\xc2\xc1\xea\x11\x31\xd0",  # mov edx, eax; shr edx, 17; xor eax, edx
            b"\x89\xc2\xc1\xe2\x05\x31\xd0",  # mov edx, eax; shl edx, 5;  xor eax, edx
            b"\xab",  # stosd
            b"\x39\xcf",  # cmp edi, ecx
        ]
    )
    loop += b"\x72" + struct.pack("<b", -(len(loop) + 2))  # jb loop
    done = b"\xc7\x05" + struct.pack("<II", MARKER_ADDRESS, MARKER)  # mov [marker], MARKER
    if keep_writing:
        again = b"\xbf" + struct.pack("<I", FILL_START)  # mov edi, FILL_START
        # jmp loop: the xorshift state goes on, so every pass writes new values.
        after = again + b"\xeb" + struct.pack("<b", -(len(loop) + len(done) + len(again) + 2))
    else:
        after = b"\xfa\xf4\xeb\xfd"  # cli; hlt; jmp hlt
    magic, flags = 0x1BADB002, 0x00010000  # a.out kludge: the addresses below are used
    header = struct.pack(
        "<8I", magic, flags, (-(magic + flags)) & 0xFFFFFFFF, load, load, 0, 0, entry
    )
    image = header + code + loop + done + after
    return image + bytes(4096 - len(image))  # padded: QEMU reads a 4 KiB header block


def filled(host, guest: str) -> bool:
    """Whether the guest on `host` (a twohost.Host) has written its marker."""
    said = host.virsh(
        "qemu-monitor-command", guest, "--hmp", f"xp /1wx {MARKER_ADDRESS:#x}", check=False
    ).stdout
    return f"{MARKER:#010x}" in said.lower()


def wait_for_fill(host, guest: str, timeout: float = 300) -> float:
    """Seconds until the guest on `host` has written its marker (its RAM is full)."""
    began = time.monotonic()
    while not filled(host, guest):
        if time.monotonic() - began > timeout:
            raise TimeoutError(f"{guest} did not fill its memory within {timeout} s")
        time.sleep(0.2)
    return time.monotonic() - began
