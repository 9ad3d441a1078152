"""A sandbox host for tests: KVMHOOK_ROOT with the custom dir and log under it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

REPO = Path(__file__).resolve().parent.parent
LAUNCHER_TEMPLATE = REPO / "kvmhook" / "data" / "qemu-hook"
# Issue 2's lists, written out here rather than imported, so a change in
# kvmhook.hook.operations or kvmhook.hook.discovery is caught by the tests.
OPERATIONS = (
    "prepare",
    "start",
    "started",
    "stopped",
    "release",
    "migrate",
    "restore",
    "reconnect",
    "attach",
)
LEFTOVERS = (
    "~",
    ".swp",
    ".dpkg-old",
    ".dpkg-dist",
    ".dpkg-new",
    ".dpkg-tmp",
    ".rpmsave",
    ".rpmnew",
    ".rpmorig",
)


class Host:
    """A sandbox host: KVMHOOK_ROOT with the custom dir and log under it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.custom = root / "etc/libvirt/hooks/custom"
        self.log = root / "var/log/libvirt/qemu-hook.log"
        self.custom.mkdir(parents=True)
        os.chmod(self.custom, 0o755)

    def env(self, **extra: str) -> dict[str, str]:
        """The hook's environment: libvirt's minimal set plus KVMHOOK_ROOT and `extra`."""
        env = {
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
            "LC_ALL": "C",
            "HOME": "/root",
            "KVMHOOK_ROOT": str(self.root),
        }
        env.update(extra)
        return env

    def script(
        self, name: str, body: str, mode: int = 0o755, directory: Path | None = None
    ) -> Path:
        """Write a custom script (`body` gets a /bin/sh shebang unless it has one)."""
        path = (directory or self.custom) / name
        if not body.startswith("#!"):
            body = "#!/bin/sh\n" + body
        path.write_text(body)
        os.chmod(path, mode)
        return path

    def hook(
        self,
        *args: str,
        xml: bytes = b"<domain><name>vm1</name></domain>",
        env: dict[str, str] | None = None,
        timeout: float = 60,
        launcher: Path | None = None,
    ) -> subprocess.CompletedProcess:
        """Run the hook as libvirtd does: a real process, XML on stdin, output captured."""
        command = [str(launcher)] if launcher else [sys.executable, "-m", "kvmhook.qemu"]
        return subprocess.run(
            [*command, *args],
            input=xml,
            capture_output=True,
            env=env or self.env(),
            timeout=timeout,
            check=False,
        )

    def records(self) -> list[str]:
        """The log's records (lines), empty when there is no log yet."""
        return self.log.read_text().splitlines() if self.log.exists() else []

    def launcher(self, timeout_expr: str = "10 * 60") -> Path:
        """The installed launcher, bound to this interpreter, with `timeoutSeconds` edited."""
        text = LAUNCHER_TEMPLATE.read_text()
        text = text.replace("#!/usr/bin/python3 -I", f"#!{sys.executable} -I", 1)
        text = text.replace("timeoutSeconds = 10 * 60", f"timeoutSeconds = {timeout_expr}", 1)
        path = self.root / "etc/libvirt/hooks/qemu"
        path.write_text(text)
        os.chmod(path, 0o755)
        return path


def field(record: str, name: str) -> str:
    """The value of `name=` in a log record (bare values only)."""
    for part in record.split(" "):
        if part.startswith(name + "="):
            return part[len(name) + 1 :]
    raise KeyError(name)


def cli_runner() -> CliRunner:
    """A CliRunner keeping stderr apart (click < 8.2 mixes it in unless told; 8.2 has no option)."""
    try:
        return CliRunner(mix_stderr=False)
    except TypeError:
        return CliRunner()
