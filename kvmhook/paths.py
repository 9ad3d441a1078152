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


def hook_launcher() -> str:
    """The qemu hook libvirtd runs, as installed: its `timeoutSeconds` line is the operator's."""
    return under_root("/etc/libvirt/hooks/qemu")


def libvirtd_conf() -> str:
    """libvirtd's configuration; its presence means this host runs libvirtd."""
    return under_root("/etc/libvirt/libvirtd.conf")


def tls_files() -> dict[str, str]:
    """Where libvirtd and QEMU look for their TLS files, by role.

    Roles: `ca`, `cert`, `key` for libvirtd's server and client side, and
    the same under QEMU's own directory (its migration stream).
    """
    return {
        "libvirt ca": under_root("/etc/pki/CA/cacert.pem"),
        "libvirt server cert": under_root("/etc/pki/libvirt/servercert.pem"),
        "libvirt server key": under_root("/etc/pki/libvirt/private/serverkey.pem"),
        "libvirt client cert": under_root("/etc/pki/libvirt/clientcert.pem"),
        "libvirt client key": under_root("/etc/pki/libvirt/private/clientkey.pem"),
        "qemu ca": under_root("/etc/pki/qemu/ca-cert.pem"),
        "qemu server cert": under_root("/etc/pki/qemu/server-cert.pem"),
        "qemu server key": under_root("/etc/pki/qemu/server-key.pem"),
        "qemu client cert": under_root("/etc/pki/qemu/client-cert.pem"),
        "qemu client key": under_root("/etc/pki/qemu/client-key.pem"),
    }


def vnc_tls_files() -> dict[str, str]:
    """The guests' consoles' TLS files (qemu.conf's vnc_tls_x509_cert_dir, which reads them by
    these names): the host's identity, as for QEMU's own directory."""
    return {
        "vnc ca": under_root("/etc/pki/libvirt-vnc/ca-cert.pem"),
        "vnc server cert": under_root("/etc/pki/libvirt-vnc/server-cert.pem"),
        "vnc server key": under_root("/etc/pki/libvirt-vnc/server-key.pem"),
    }


def agent_dir() -> str:
    """The CloudStack agent's directory: agent.properties, cloud.jks, cloud.crt/key/ca.crt."""
    return under_root("/etc/cloudstack/agent")


class AgentFiles:
    """The files of the agent's directory, by the names the agent and the controller give them."""

    __slots__ = ("ca", "cert", "directory", "key", "keystore", "properties")

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.properties = os.path.join(directory, "agent.properties")  # keystore.passphrase=
        self.keystore = os.path.join(directory, "cloud.jks")  # PKCS#12 whatever its name
        self.cert = os.path.join(directory, "cloud.crt")
        self.key = os.path.join(directory, "cloud.key")
        self.ca = os.path.join(directory, "cloud.ca.crt")


def agent_files(directory: "str | None" = None) -> AgentFiles:
    """The agent's files in `directory` (an --agent-dir), else in agent_dir()."""
    return AgentFiles(directory or agent_dir())


def on_host(path: str) -> str:
    """`path` (under the root prefix) as the host itself names it: the prefix taken off.

    What goes inside a configuration file, where libvirtd reads it on its own host.
    """
    return "/" + os.path.relpath(path, root())


def qemu_conf() -> str:
    """The QEMU driver's configuration (read by libvirtd, or virtqemud with modular daemons)."""
    return under_root("/etc/libvirt/qemu.conf")


def virtproxyd_conf() -> str:
    """virtproxyd's configuration: where its TLS settings live with modular daemons."""
    return under_root("/etc/libvirt/virtproxyd.conf")


def libvirtd_defaults() -> list[str]:
    """Where distributions keep libvirtd's command line (LIBVIRTD_ARGS): Debian's, then RHEL's."""
    return [under_root("/etc/default/libvirtd"), under_root("/etc/sysconfig/libvirtd")]


def systemd_wants(target: str) -> str:
    """The directory whose symlinks make units enabled for `target` (`sockets.target`)."""
    return under_root(f"/etc/systemd/system/{target}.wants")


def systemd_unit_dirs() -> list[str]:
    """Where systemd unit files are installed, in systemd's order of precedence."""
    return [
        under_root(directory)
        for directory in ("/etc/systemd/system", "/usr/lib/systemd/system", "/lib/systemd/system")
    ]


def maintenance_state() -> str:
    """The host's maintenance state, which the hook reads on prepare and migrate."""
    return under_root("/var/lib/kvmhook/maintenance")


def kvmhook_conf() -> str:
    """The agent's own settings (INI); absent on a host that keeps every default."""
    return under_root("/etc/kvmhook/kvmhook.conf")


def controller_conf() -> str:
    """The controller client's settings: its endpoints, API key and secret (so mode 0600)."""
    return under_root("/etc/kvmhook/controller.conf")


def qemu_status_dir() -> str:
    """The QEMU driver's runtime state: `<name>.xml` for each running guest, written by libvirtd
    (or virtqemud); the admission check reads it, since the hook cannot ask libvirt."""
    return under_root("/run/libvirt/qemu")


def qemu_hook_dir() -> str:
    """libvirt's own hook directory (libvirt >= 6.5 runs every executable in it per guest)."""
    return under_root("/etc/libvirt/hooks/qemu.d")


def cert_renew_lock() -> str:
    """The lock that keeps certificate renewals, rollbacks, keystore-setup and
    keystore-cert-import from interleaving (kvmhook.locks.certificates).

    Under /run: a lock needs no history, and a reboot clears it.
    """
    return under_root("/run/kvmhook/cert-renew.lock")


def maintenance_lock() -> str:
    """The lock a `kvmhook maintenance enter` holds for its whole drain."""
    return under_root("/run/kvmhook/maintenance.lock")


def rolling_output_dir() -> str:
    """Where a rolling-maintenance stage run in a systemd unit writes its output, for kvmhook
    to read when the unit ends (a file per run, removed once read; kept if kvmhook died)."""
    return under_root("/run/kvmhook/rolling")


def libvirt_admin_socket(daemon: str) -> str:
    """The admin socket a running `daemon` (libvirtd, virtproxyd) listens on for virt-admin."""
    name = "libvirt" if daemon == "libvirtd" else daemon
    return under_root(f"/run/libvirt/{name}-admin-sock")


def sys_class_net() -> str:
    """The network devices of this host, one entry each (`<dev>/bridge`, `<dev>/brif/` for a
    bridge). Under KVMHOOK_ROOT too, so a test builds the tree it needs."""
    return under_root("/sys/class/net")


def made_bridges_dir() -> str:
    """One directory per guest-network bridge kvmhook made, named after it, holding a file
    per guest that uses it: the bridges kvmhook may remove (kvmhook.net.provision), and
    the `made` column of `kvmhook network list`."""
    return under_root("/run/kvmhook/bridges")


def bridge_lock(name: str) -> str:
    """The lock of one bridge kvmhook may make or remove (kvmhook.net.provision)."""
    return under_root(f"/run/kvmhook/bridge-locks/{name}")


def renewal_record() -> str:
    """When `kvmhook cert renew` last succeeded and failed (kvmhook.certs.renewalrecord)."""
    return under_root("/var/lib/kvmhook/cert-renewal.json")


def metrics_lock() -> str:
    """The lock `kvmhook metrics --textfile` holds while it reads on and saves its position."""
    return under_root("/run/kvmhook/metrics.lock")


def metrics_state() -> str:
    """Where `kvmhook metrics` keeps its position in the hook log and the counts so far."""
    return under_root("/var/lib/kvmhook/metrics-hooklog.json")
