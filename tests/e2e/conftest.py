"""The installed .deb driven by a real libvirtd running real (TCG) guests.

These fixtures change the machine: they install and purge the kvmhook
package, write /etc/libvirt/qemu.conf (the container settings of
shared/notes/libvirt-facts.md) and run their own libvirtd. Meant for a
throwaway Debian machine as root, as CI is; without root or the tools they
skip (and under CI=true a skip fails).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from harness import (
    CONTAINER_QEMU_CONF,
    CUSTOM,
    QEMU_CONF,
    REPO,
    SCRATCH,
    TOOLS,
    Libvirtd,
    apt,
    apt_install,
    guests,
    package_state,
    run,
    running_libvirtd,
    version,
)
from twohost import TwoHosts, missing_prerequisites

KVMHOOK_CONF = Path("/etc/kvmhook/kvmhook.conf")


@pytest.fixture(scope="session")
def prerequisites() -> None:
    """Root and the tools these tests drive."""
    if os.geteuid() != 0:
        pytest.skip("the e2e tests install packages and run libvirtd: they need root")
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)} (bash scripts/test.sh installs them)")


@pytest.fixture(scope="session")
def debs(prerequisites) -> dict[int, Path]:
    """The .deb built twice from this tree: revisions 1 and 2 (for upgrades)."""
    built = {}
    for revision in (2, 1):  # dist/ keeps both builds
        run("make", "-C", str(REPO), "deb", f"DEB_REVISION={revision}", timeout=300)
        built[revision] = REPO / "dist" / f"kvmhook_{version()}-{revision}_all.deb"
        assert built[revision].is_file()
    return built


@pytest.fixture(scope="session")
def libvirtd(prerequisites, tmp_path_factory):
    """Our own libvirtd with the container qemu.conf; torn down with every test guest."""
    if running_libvirtd():
        pytest.fail(
            f"libvirtd/virtqemud already running (pid {' '.join(running_libvirtd())}): "
            "the e2e tests start and stop their own; stop it first"
        )
    for group in ("kvm", "libvirt-qemu"):
        run("groupadd", "-r", "-f", group)
    if run("id", "libvirt-qemu", check=False).returncode != 0:
        run("useradd", "-r", "-g", "libvirt-qemu", "-G", "kvm", "libvirt-qemu")
    saved = QEMU_CONF.read_bytes() if QEMU_CONF.exists() else None
    QEMU_CONF.write_text(CONTAINER_QEMU_CONF)
    for directory in ("/var/log/libvirt", "/var/run/libvirt"):
        Path(directory).mkdir(parents=True, exist_ok=True)
    daemon = Libvirtd(tmp_path_factory.mktemp("libvirtd") / "libvirtd.log")
    daemon.start()
    try:
        yield daemon
    finally:
        for name in guests():
            run("virsh", "destroy", name, check=False)
            run("virsh", "undefine", name, check=False)
        daemon.stop()
        if saved is None:
            QEMU_CONF.unlink()
        else:
            QEMU_CONF.write_bytes(saved)


@pytest.fixture
def scratch():
    """An empty /run/kvmhook-e2e for what the test's scripts record."""
    shutil.rmtree(SCRATCH, ignore_errors=True)
    SCRATCH.mkdir(mode=0o755)
    yield SCRATCH
    shutil.rmtree(SCRATCH, ignore_errors=True)


@pytest.fixture
def custom():
    """Write custom scripts into the real custom dir; removed after the test."""
    written: list[Path] = []

    def write(name: str, body: str) -> Path:
        path = CUSTOM / name
        path.write_text("#!/bin/sh\n" + body)
        path.chmod(0o755)
        written.append(path)
        return path

    yield write
    for path in written:
        path.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def installed(libvirtd, debs):
    """kvmhook installed from its .deb while our libvirtd runs; purged after unless it was
    installed before."""
    before = package_state()
    if before != "not-installed":
        apt("purge", "kvmhook")
    apt_install(debs[1])
    yield libvirtd
    if before == "not-installed":
        apt("purge", "kvmhook")


@pytest.fixture
def real_conf():
    """The real /etc/kvmhook/kvmhook.conf (the hook run by libvirtd reads no other), put back as
    it was afterwards: removed, with /etc/kvmhook when the test made it, if there was none."""
    made_dir = not KVMHOOK_CONF.parent.exists()
    saved = KVMHOOK_CONF.read_bytes() if KVMHOOK_CONF.exists() else None
    KVMHOOK_CONF.parent.mkdir(exist_ok=True)
    yield KVMHOOK_CONF
    if saved is None:
        KVMHOOK_CONF.unlink(missing_ok=True)
        if made_dir and not any(KVMHOOK_CONF.parent.iterdir()):
            KVMHOOK_CONF.parent.rmdir()
    else:
        KVMHOOK_CONF.write_bytes(saved)


@pytest.fixture(scope="module")
def pair():
    """Hosts a and b (twohost.py), secured with one test CA, libvirtd listening on TLS; all
    stopped after."""
    reason = missing_prerequisites()
    if reason:
        pytest.skip(reason)
    with TwoHosts() as hosts:
        yield hosts
