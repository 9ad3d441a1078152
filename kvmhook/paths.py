"""Every path the project uses, resolved in one place.

`KVMHOOK_ROOT` prefixes all of them so a sandbox or a test can run the real
code without touching the host. libvirtd clears the environment before it
runs the hook, so production always gets the defaults.
"""

import os


def root() -> str:
    """The prefix every default path lives under (`KVMHOOK_ROOT`, default `/`)."""
    return os.environ.get("KVMHOOK_ROOT") or "/"


def under_root(path: str) -> str:
    """`path` (absolute, as on a real host) placed under the root prefix."""
    return os.path.join(root(), path.lstrip("/"))


def custom_dir() -> str:
    """Directory holding the operator's custom hook scripts."""
    return os.environ.get("KVMHOOK_CUSTOM_DIR") or under_root("/etc/libvirt/hooks/custom")


def log_file() -> str:
    """The hook's log file."""
    return os.environ.get("KVMHOOK_LOG_FILE") or under_root("/var/log/libvirt/qemu-hook.log")
