"""Guest-network bridges made where used and removed when unused: `[network] provision`.

The admin guide: networks are "created on only the hosts where they will be
used and then they are destroyed on all hosts when they are not being used".
With `[network] provision = vxlan, vlan` (any subset) in kvmhook.conf, the
hook at `prepare begin` (which libvirt also runs on a migration's
destination) makes each bridge of the guest this host lacks, as CloudStack's
modifyvxlan.sh and modifyvlan.sh do, so that kvmhook hosts and CloudStack
agent hosts share one overlay:

    brvx-<VNI>      vxlan<VNI>: VXLAN id VNI, group 239.<VNI>>16>.<VNI>>8 & 255>.<VNI & 255>,
                    ttl 10, UDP port 8472, through guest.network.device (which must
                    hold an IPv4 address; a /32 route for the group through it is
                    added when the group is not routed there already)
    br<PIF>-<VLAN>  <PIF>.<VLAN>: 802.1q on PIF, which must exist

each bridge with forward delay 0, its device enslaved, both up. At `release
end` a bridge the hook made is removed with its device (and the route it
added) once no guest uses it; `kvmhook network gc` does the same for bridges
whose release was lost. A bridge kvmhook did not make is never touched, nor
a made one named in `[network] keep`.

What the hook made is remembered under /run, which a reboot empties as it
removes the bridges: made_bridges_dir()/<bridge>/ holds one file per guest
that uses the bridge, from its prepare to its release (between the two,
until libvirt plugs its tap, a starting guest has no port on the bridge, and
must not lose it to another guest's release), and `route` when the hook
added the group's route. Each bridge and its memory change only under that
bridge's lock (paths.bridge_lock).

The hook imports this module only at prepare with provisioning on, and at
release when a bridge is remembered. Names are read from the XML's bytes (no
ElementTree), devices from sysfs; `ip` runs only to make or remove: the
prepare of a guest whose bridges exist costs a few stat calls.
"""

from __future__ import annotations

import os
import stat  # loaded by os already

from kvmhook import paths
from kvmhook.errors import KvmhookError
from kvmhook.hook.hookconf import PROVISION_KINDS as KINDS

TYPE_CHECKING = False  # typing costs import time the hook pays
if TYPE_CHECKING:
    from collections.abc import Callable, Collection

    from kvmhook.hook.process import Outcome

VXLAN_PORT = 8472  # the kernel's default, which CloudStack's hosts use: set so it stays
VXLAN_TTL = 10
MAX_NAME = 15  # Linux's IFNAMSIZ less the NUL
LOCK_WAIT = 60.0  # longer than making or removing one bridge takes
IP_TIMEOUT = 10.0
_IP_DIRS = ("/usr/sbin", "/usr/bin", "/sbin", "/bin")  # libvirtd gives the hook no PATH to trust
_ROUTE = "route"
_CLAIM, _HASHED_CLAIM = "guest.", "guest-sha256."


class ProvisionError(KvmhookError):
    """A bridge cannot be made or removed; the message says which and why (the kernel's
    answer, when `ip` gave one)."""


class Spec:
    """A bridge kvmhook can make: its kind, name, device (vxlan<VNI>, <PIF>.<VLAN>) and
    number (VNI, VLAN); `pif` for a VLAN."""

    __slots__ = ("bridge", "device", "kind", "number", "pif")

    def __init__(self, kind: str, bridge: str, device: str, number: int, pif: str = "") -> None:
        self.kind = kind
        self.bridge = bridge
        self.device = device
        self.number = number
        self.pif = pif

    @property
    def group(self) -> str:
        """A VXLAN's multicast group, as CloudStack derives it from the VNI."""
        vni = self.number
        return f"239.{(vni >> 16) % 256}.{(vni >> 8) % 256}.{vni % 256}"


def spec(name: str, kinds: Collection[str] = KINDS) -> Spec | None:
    """The bridge `name` as kvmhook would make it, when its name is CloudStack's for one of
    `kinds` (`brvx-<VNI>`, `br<PIF>-<VLAN>`); None for any other name."""
    if name.startswith("brvx-"):
        vni = name[len("brvx-") :]
        if "vxlan" in kinds and _number(vni, 0, 2**24 - 1):
            return Spec("vxlan", name, f"vxlan{vni}", int(vni))
        return None
    head, _, vlan = name.rpartition("-")
    pif = head[len("br") :]
    if "vlan" in kinds and head.startswith("br") and _word(pif) and _number(vlan, 1, 4094):
        return Spec("vlan", name, f"{pif}.{vlan}", int(vlan), pif)
    return None


def _number(text: str, low: int, high: int) -> bool:
    """`text` is a number written as CloudStack writes it (no sign, no leading 0) in range."""
    canonical = text.isascii() and text.isdigit() and str(int(text)) == text
    return canonical and low <= int(text) <= high


def _word(text: str) -> bool:
    return text.isascii() and text.replace("_", "a").isalnum()


def bridge_names(xml: bytes) -> list[str]:
    """The `<source bridge=...>` names of domain `xml`, each once, in order; read from the
    bytes, as the hook must not pay for ElementTree (libvirt writes the XML: a name is
    plain ASCII between quotes)."""
    names: list[str] = []
    for chunk in xml.split(b"<source")[1:]:
        if chunk[:1] not in (b" ", b"\t", b"\n", b"\r"):
            continue  # <source/>, <sourcefoo ...>: no attribute, or another element
        value = _attribute(chunk.split(b">", 1)[0], b"bridge")
        name = None if value is None else value.decode("ascii", "replace")
        if name and name not in names:
            names.append(name)
    return names


def _attribute(tag: bytes, name: bytes) -> bytes | None:
    """The value of the attribute `name` in the text `tag` of one start tag."""
    start = 0
    while True:
        at = tag.find(name, start)
        if at < 0:
            return None
        start = at + len(name)
        if not tag[at - 1 : at].isspace():
            continue  # the end of a longer name
        rest = tag[start:].lstrip()
        if rest[:1] != b"=":
            continue
        rest = rest[1:].lstrip()
        quote = rest[:1]
        end = rest.find(quote, 1) if quote in (b"'", b'"') else -1
        if end > 0:
            return rest[1:end]


# -- the hook's two moments -----------------------------------------------------------------


def at_prepare(
    domain: str, xml: bytes, kinds: Collection[str], say: Callable[[str], None]
) -> str | None:
    """Make the bridges of `xml` of the `kinds` this host lacks, and claim the made ones for
    `domain`. None when the guest has every bridge it needs; else the one line refusing
    it: without its bridge it could not start anyway. Each bridge made goes to `say`."""
    for name in bridge_names(xml):
        wanted = spec(name, kinds)
        if wanted is None or (_exists(name) and not _remembered(name)):
            continue  # not kvmhook's to make, or a bridge the operator made: never touched
        try:
            with _Lock(name):
                _provide(wanted, domain, say)
        except ProvisionError as error:
            return f"cannot make bridge {name}: {error}"
    return None


def at_release(domain: str, xml: bytes, keep: Collection[str], say: Callable[[str], None]) -> None:
    """Drop `domain`'s claim on each made bridge of `xml`, and remove each one no guest uses
    any more (no claim, no port) unless `keep` names it. Never raises: what cannot be
    removed is said to `say`, and stays for `kvmhook network gc`."""
    for name in bridge_names(xml):
        if not _remembered(name):
            continue
        try:
            with _Lock(name):
                _forget_claim(name, domain)
                claims = _claims(name)
                if not _exists(name) and not claims:
                    _forget(name)  # removed by someone else: nothing left to remove
                    continue
                why = _kept(name, keep, claims)
                if why is None:
                    _remove(name, say)
                else:
                    say(f"bridge {name} kept: {why}")
        except ProvisionError as error:
            say(f"bridge {name} not removed: {error}")


def gc(
    keep: Collection[str],
    active: Collection[str] | None,
    dry_run: bool,
    say: Callable[[str], None],
) -> tuple[list[str], list[str]]:
    """Remove the made bridges no guest uses: no port left and no claim of a guest in
    `active` (the guests libvirt runs; None when it does not answer: then every claim
    counts). Returns (removed or, with `dry_run`, to remove; not removed: the reasons)."""
    removed, failed = [], []
    if not remembered():
        say("kvmhook remembers no bridge it made: nothing to remove")
    for name in remembered():
        try:
            with _Lock(name):
                if not _exists(name):
                    _forget(name)
                    say(f"bridge {name} is gone already: forgotten")
                    continue
                claims = _claims(name)
                if active is not None:
                    running = {_claim_file(guest) for guest in active}
                    claims = {file: guest for file, guest in claims.items() if file in running}
                why = _kept(name, keep, claims)
                if why is not None:
                    say(f"bridge {name} kept: {why}")
                elif dry_run:
                    removed.append(name)
                else:
                    _remove(name, say)
                    removed.append(name)
        except ProvisionError as error:
            failed.append(f"bridge {name} not removed: {error}")
    return removed, failed


def remembered() -> list[str]:
    """The bridges kvmhook made and has not removed, sorted."""
    try:
        entries = os.listdir(paths.made_bridges_dir())
    except FileNotFoundError:
        return []
    except OSError as error:
        raise ProvisionError(f"cannot list {paths.made_bridges_dir()}: {error.strerror}") from None
    return sorted(entry for entry in entries if _remembered(entry))


# -- making and removing ---------------------------------------------------------------------


def _provide(wanted: Spec, domain: str, say: Callable[[str], None]) -> None:
    """Holding the bridge's lock: make it unless it exists, and claim it for `domain`.

    Remembered before it is made and forgotten after it is removed: a bridge kvmhook made
    is never seen without its memory, which would make it the operator's (at_prepare).
    """
    if not _exists(wanted.bridge):
        new = not _remembered(wanted.bridge)
        _remember(wanted.bridge, None)
        try:
            route = _make(wanted, say)
        except ProvisionError:
            if new:
                _forget(wanted.bridge)
            raise
        _remember(wanted.bridge, route)
    _claim(wanted.bridge, domain)


def _make(wanted: Spec, say: Callable[[str], None]) -> str | None:
    """Make the bridge and its device; all or nothing. Returns the route added, if any."""
    import time

    began = time.monotonic()
    for name in (wanted.bridge, wanted.device):
        if len(name) > MAX_NAME:
            raise ProvisionError(f"{name!r} is longer than {MAX_NAME} characters")
    underlay = _vxlan_underlay() if wanted.kind == "vxlan" else wanted.pif
    if wanted.kind == "vxlan":
        device = (
            f"link add {wanted.device} type vxlan id {wanted.number} group {wanted.group} "
            f"ttl {VXLAN_TTL} dstport {VXLAN_PORT} dev {underlay}"
        )
        how = f"VNI {wanted.number}, group {wanted.group}, UDP {VXLAN_PORT} via {underlay}"
    else:
        if not _exists(underlay):
            raise ProvisionError(f"no device {underlay} on this host for VLAN {wanted.number}")
        device = f"link add link {wanted.pif} name {wanted.device} type vlan id {wanted.number}"
        how = f"VLAN {wanted.number} on {wanted.pif}"
    made_device = not _exists(wanted.device)
    commands = [device] if made_device else []
    commands += [
        f"link add {wanted.bridge} type bridge forward_delay 0",
        f"link set {wanted.device} master {wanted.bridge}",
        f"link set {wanted.device} up",
        f"link set {wanted.bridge} up",
    ]
    try:
        _ip("-batch", "-", stdin="\n".join(commands) + "\n")
        route = _route_group(wanted.group, underlay) if wanted.kind == "vxlan" else None
    except ProvisionError:
        _delete(wanted.bridge, wanted.device if made_device else None, None)
        raise
    took = (time.monotonic() - began) * 1000
    say(f"made bridge {wanted.bridge} with {wanted.device} ({how}) in {took:.0f} ms")
    return route


def _vxlan_underlay() -> str:
    """guest.network.device, which must exist and hold an IPv4 address (the multicast source)."""
    from kvmhook.net import bridges

    try:
        underlay = bridges.guest_network_device()
    except bridges.NoPhysicalDevice as error:
        raise ProvisionError(f"no underlay for the VXLAN: {error}") from None
    plain = underlay.replace("-", "_").replace(".", "_")
    if not (len(underlay) <= MAX_NAME and _word(plain)):
        # It goes into `ip`'s command lines as it is.
        raise ProvisionError(f"guest.network.device={underlay!r} is not a plain interface name")
    if not _ip("-4", "-o", "address", "show", "dev", underlay).strip():
        raise ProvisionError(f"no IPv4 address on {underlay} (guest.network.device), the underlay")
    return underlay


def _route_group(group: str, underlay: str) -> str | None:
    """Route the group through `underlay` unless it goes there already; the route added."""
    try:
        goes = f" dev {underlay} " in f" {_ip('route', 'get', group)} "
    except ProvisionError:
        goes = False  # no route at all: "Network is unreachable"
    if goes:
        return None
    route = f"{group}/32 dev {underlay}"
    _ip("route", "add", *route.split())
    return route


def _remove(name: str, say: Callable[[str], None]) -> None:
    """Remove the made bridge `name`, its device and its route, then forget it."""
    made = spec(name)
    device = None if made is None else made.device
    route = _read_route(name)
    _delete(name, device, route)
    _forget(name)
    also = "" if device is None else f" and {device}"
    say(f"removed bridge {name}{also}: no guest uses it")


def _delete(bridge: str, device: str | None, route: str | None) -> None:
    """Delete what of these exists; raises ProvisionError for the first that would not go."""
    commands = [f"link del {name}" for name in (bridge, device) if name and _exists(name)]
    if route is not None:
        commands.append(f"route del {route}")
    if commands:
        # -force: go on past a failure (a route someone removed already), report it at the end.
        _ip("-force", "-batch", "-", stdin="\n".join(commands) + "\n")


def _ip(*args: str, stdin: str = "") -> str:
    """Run `ip ARGS`; its stdout. Raises ProvisionError with its stderr (the kernel's answer)."""
    from kvmhook.hook import process

    ip = next((f"{d}/ip" for d in _IP_DIRS if os.access(f"{d}/ip", os.X_OK)), None)
    if ip is None:
        raise ProvisionError(f"no `ip` (iproute2) in {', '.join(_IP_DIRS)}")
    data = process.Stdin.holding(stdin.encode())
    try:
        fd = data.open()
    finally:
        data.close()
    try:
        outcome = process.run([ip, *args], fd, IP_TIMEOUT, 1.0, 64 * 1024)
    except OSError as error:
        raise ProvisionError(f"cannot run {ip}: {error.strerror}") from None
    finally:
        os.close(fd)
    if outcome.status != 0:
        raise ProvisionError(_answer(outcome))
    return outcome.said("stdout")


def _answer(outcome: Outcome) -> str:
    """The first line `ip` wrote on stderr (`Error: Unknown device type.`), the rest of a
    usage text or `ip -batch`'s "Command failed -:N" left out; how it ended if it said none."""
    stderr = b"".join(data for stream, data in outcome.segments if stream == "stderr")
    for line in stderr.decode(errors="replace").splitlines():
        if line.strip() and not line.startswith("Command failed"):
            return " ".join(line.split())
    return f"ip: {outcome.ending}"


# -- sysfs and memory -----------------------------------------------------------------------


def _exists(device: str) -> bool:
    return os.path.lexists(os.path.join(paths.sys_class_net(), device))


def _ports(name: str) -> list[str]:
    """The ports of bridge `name` but its own VXLAN or VLAN device."""
    made = spec(name)
    try:
        ports = os.listdir(os.path.join(paths.sys_class_net(), name, "brif"))
    except OSError as error:
        raise ProvisionError(f"cannot list its ports: {error.strerror}") from None
    return sorted(port for port in ports if made is None or port != made.device)


def _kept(name: str, keep: Collection[str], claims: dict[str, str]) -> str | None:
    """Why the made bridge `name` must stay, or None when it may go."""
    if name in keep:
        return "[network] keep names it"
    if claims:
        return f"used by {', '.join(sorted(claims.values()))}"
    ports = _ports(name)
    return f"ports {', '.join(ports)}" if ports else None


def _memory(name: str) -> str:
    return os.path.join(paths.made_bridges_dir(), name)


def _remembered(name: str) -> bool:
    # A name of sysfs's, never "." or "..", and lstat: a symlink planted there is not memory.
    if name in ("", ".", "..") or "/" in name:
        return False
    try:
        return stat.S_ISDIR(os.lstat(_memory(name)).st_mode)
    except OSError:
        return False


def _remember(name: str, route: str | None) -> None:
    """Remember the bridge `name`, and the route kvmhook added for it (None: none)."""
    memory = _memory(name)
    try:
        os.makedirs(memory, mode=0o755, exist_ok=True)
        if route is not None:
            _write(os.path.join(memory, _ROUTE), f"{route}\n")
        elif os.path.lexists(os.path.join(memory, _ROUTE)):
            os.unlink(os.path.join(memory, _ROUTE))  # of a bridge removed by hand: not ours
    except OSError as error:
        raise ProvisionError(f"cannot remember it in {memory}: {error.strerror}") from None


def _forget(name: str) -> None:
    memory = _memory(name)
    try:
        for entry in os.listdir(memory):
            os.unlink(os.path.join(memory, entry))
        os.rmdir(memory)
    except FileNotFoundError:
        pass
    except OSError as error:
        raise ProvisionError(f"cannot forget it in {memory}: {error.strerror}") from None


def _read_route(name: str) -> str | None:
    try:
        with open(os.path.join(_memory(name), _ROUTE), encoding="ascii") as file:
            route = file.read(256).strip()
    except (OSError, ValueError):
        return None  # none added, or unreadable: the route stays, the bridge goes
    return route or None


def _claim_file(domain: str) -> str:
    """The file naming `domain`'s claim: its name, or a hash where a name could not be one
    (libvirt allows names of any length)."""
    raw = os.fsencode(domain)  # argv's bytes: a name need not be UTF-8
    if b"/" in raw or raw in (b"", b".", b"..") or len(raw) > 200:
        import hashlib

        return _HASHED_CLAIM + hashlib.sha256(raw).hexdigest()
    return _CLAIM + domain


def _claims(name: str) -> dict[str, str]:
    """{claim file: the guest, for messages} of the bridge `name`."""
    try:
        entries = os.listdir(_memory(name))
    except OSError:
        return {}
    found = {}
    for entry in entries:
        if entry.startswith(_HASHED_CLAIM):
            found[entry] = f"the guest of sha256 {entry[len(_HASHED_CLAIM) :][:12]}"
        elif entry.startswith(_CLAIM):
            found[entry] = entry[len(_CLAIM) :]
    return found


def _claim(name: str, domain: str) -> None:
    path = os.path.join(_memory(name), _claim_file(domain))
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644))
    except OSError as error:
        raise ProvisionError(f"cannot claim it for {domain} in {path}: {error.strerror}") from None


def _forget_claim(name: str, domain: str) -> None:
    try:
        os.unlink(os.path.join(_memory(name), _claim_file(domain)))
    except FileNotFoundError:
        pass
    except OSError as error:
        raise ProvisionError(f"cannot drop the claim of {domain}: {error.strerror}") from None


def _write(path: str, text: str) -> None:
    """`text` into `path`, written beside and renamed over it."""
    beside = f"{path}.tmp{os.getpid()}"
    fd = os.open(beside, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
    try:
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(beside, path)


class _Lock:
    """The lock of one bridge (flock: the kernel drops it when its holder dies).

    Not kvmhook.locks.held: its contextlib and typing imports would cost the hook about
    10 ms at every prepare with provisioning on; this needs only fcntl and time.
    """

    def __init__(self, name: str) -> None:
        self.path = paths.bridge_lock(name)
        self.fd = -1

    def __enter__(self) -> _Lock:
        import fcntl
        import time

        try:
            os.makedirs(os.path.dirname(self.path), mode=0o755, exist_ok=True)
            self.fd = os.open(
                self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
            )
        except OSError as error:
            raise ProvisionError(f"cannot open its lock {self.path}: {error.strerror}") from None
        deadline = time.monotonic() + LOCK_WAIT
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return self
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(self.fd)
                    raise ProvisionError(
                        f"its lock {self.path} stayed held for {LOCK_WAIT:g} s"
                    ) from None
                time.sleep(0.01)

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)
