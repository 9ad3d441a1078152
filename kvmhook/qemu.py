"""The libvirt qemu hook: `qemu OBJECT OPERATION SUBOP EXTRA`, domain XML on stdin.

libvirtd runs this on every guest lifecycle event and waits for it, so it
exits 0 whatever happens: an unknown operation, a failing or hanging custom
script, an unwritable log, even a bug here must never block a guest. The
exceptions are the operator's: a host in maintenance refuses arriving guests;
with admission control on (kvmhook.conf) so does a full host; with the veto
policy on (`[hooks] on_failure = abort`) a failing script aborts the
operation. Its stdout, where libvirt expects new domain XML for migrate and
restore, stays empty unless the XML changed: at `migrate begin` the guest's
bridges are renamed for this host (see kvmhook.net.bridges), and a script may
rewrite it (see rewrite). Imports
are kept to the few the run needs: every millisecond here is paid on every
guest start.
"""

import os
import sys

from kvmhook import paths
from kvmhook.hook import discovery, hookconf
from kvmhook.hook.hooklog import HookLog, say
from kvmhook.hook.operations import BY_NAME, Event

TYPE_CHECKING = False  # typing costs import time the hook pays on every guest start
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from kvmhook.hook.hookconf import HookConf, Limits
    from kvmhook.hook.process import Stdin


def main(argv: "Sequence[str] | None" = None, timeout: "float | None" = None) -> int:
    """Run the hook for `argv` (default: the command line); returns its exit status.

    0 in every case but three: while the host is in maintenance (see
    hoststate), `prepare` and `migrate` return 1, so libvirt refuses the guest;
    with admission control on, `prepare` returns 1 for a guest that does not fit
    (see admission); with the veto policy on, an operation it covers returns 1
    when a custom script fails (see hook.dispatch.run_hook).

    `timeout` is the launcher's `timeoutSeconds`: seconds each custom script
    may run. KVMHOOK_TIMEOUT overrides it (see hookconf.limits).
    """
    _open_std_fds()
    args = list(sys.argv[1:] if argv is None else argv)
    log = HookLog(paths.log_file(), *_context(args))
    try:
        settings = hookconf.limits(timeout, _complaints(log))
        return _run(args, settings, log)
    except Exception as error:  # a bug here must not block a guest: report it and let it start
        _report_bug(error, log)
        return 0
    finally:
        log.close()


def _open_std_fds() -> None:
    """Put /dev/null on whichever of fds 0, 1 and 2 is closed, as daemons do.

    Otherwise the first file the hook opens (the log, the XML's memory file)
    would get that number, and the domain XML printed on fd 1 for libvirt,
    secrets included, would land in it.
    """
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            try:
                # The lowest free number, so `fd` itself: every lower one is open by now.
                os.open(os.devnull, os.O_RDWR)
            except OSError:
                return  # no /dev/null (a bare chroot): nothing better to put there


def _context(args: list[str]) -> tuple[str, str, str]:
    padded = [*args, "-", "-", "-"]
    return padded[0], padded[1], padded[2]


def _run(args: list[str], settings: "Limits", log: HookLog) -> int:
    if len(args) != 4:
        log.record("-", f"wrong number of arguments ({len(args)}, expected 4): {_shown(args)}")
        return 0
    event = Event(*args)
    operation = BY_NAME.get(event.operation)
    if operation is None:
        log.record("-", f"unknown operation {event.operation!r}, no scripts run: {_shown(args)}")
        return 0
    if operation.arrival and _refused_for_maintenance(log):
        return 1
    stdin_fd = None if os.isatty(0) else 0  # by hand at a terminal: no XML to wait for
    # kvmhook.conf is opt-in: a host without one pays a failed open, and only here.
    conf = _conf(log) if operation.may_abort else None
    abort = conf is not None and _aborts(event.operation, conf, log)
    if conf is not None and event.operation == "prepare":
        return _prepare(event, conf, log, settings, stdin_fd, abort)
    if event.operation == "migrate" and event.subop == "begin" and stdin_fd is not None:
        return _migrate_begin(event, conf, log, settings, stdin_fd, abort)
    if event.operation == "release" and stdin_fd is not None and _remembers_bridges():
        return _release(event, log, settings, stdin_fd)
    return _run_scripts(event, log, settings, stdin_fd, abort)


def _run_scripts(
    event: Event,
    log: HookLog,
    settings: "Limits",
    stdin_fd: "int | None",
    abort: bool,
    read: "tuple[bytes, bytes] | None" = None,
) -> int:
    """The custom scripts for `event`, run by dispatch only when there is something to run:
    most calls have none, and need not pay for importing the chain runner.

    `read`: the XML libvirt passed and the hook's change of it, when the hook read
    stdin itself (see _migrate_begin); the change reaches libvirt even when no
    script runs.
    """
    found = discovery.find(paths.custom_dir(), event, log, abort)
    if not found.runs_anything(abort):
        if read is not None and read[1] != read[0]:
            _print_xml(read[1], log)
        return 0
    from kvmhook.hook import dispatch

    chain = dispatch.run_hook(event, found, log, settings, stdin_fd, abort, read)
    if chain.veto is not None:
        say("\n".join(chain.veto))
        return 1
    if chain.xml is not None:
        from kvmhook.hook.process import write_all  # loaded already: a rewrite means scripts ran

        write_all(1, chain.xml)
    return 0


def _migrate_begin(
    event: Event,
    conf: "HookConf | None",
    log: HookLog,
    settings: "Limits",
    stdin_fd: int,
    abort: bool,
) -> int:
    """`migrate begin` on the destination: the guest's bridges named for this host
    (kvmhook.net.bridges.at_migrate_begin, unless kvmhook.conf turns it off) before any
    script reads the XML, as CloudStack's own hook does."""
    from kvmhook.net import bridges

    xml = _read_stdin(stdin_fd, log)
    if xml is None:
        return _run_scripts(event, log, settings, None, abort)
    renamed = bridges.at_migrate_begin(xml, conf, lambda line: log.record("-", line))
    return _run_scripts(event, log, settings, None, abort, (xml, renamed))


def _print_xml(xml: bytes, log: HookLog) -> None:
    """`xml` on stdout, where libvirt takes it as the guest's new definition."""
    from kvmhook.hook.process import write_all

    log.record("-", f"xml: new domain XML ({len(xml)} bytes) printed for libvirt")
    write_all(1, xml)


def _complaints(log: HookLog) -> "Callable[[str], None]":
    """What a problem with a setting becomes: a `config:` record."""
    return lambda problem: log.record("-", f"config: {problem}")


def _conf(log: HookLog) -> "HookConf | None":
    try:
        return hookconf.read()
    except OSError as error:
        log.record(
            "-", f"config: cannot read {paths.kvmhook_conf()}: {error.strerror}; defaults apply"
        )
        return None


def _aborts(operation: str, conf: "HookConf", log: HookLog) -> bool:
    """Whether a failing script aborts `operation` (`[hooks] on_failure = abort`).

    A broken file never blocks a guest: the error is logged and the default
    (ignore) applies.
    """
    if not conf.may_set("on_failure", "ignore"):
        return False  # the default, known without importing configparser
    try:
        from kvmhook import config

        return operation in config.abort_on(conf.parsed())
    except Exception as error:  # whatever is wrong with the file, guests still start
        log.record("-", f"config: {error}; [hooks] on_failure = ignore applies")
        return False


def _prepare(
    event: Event,
    conf: "HookConf",
    log: HookLog,
    settings: "Limits",
    stdin_fd: "int | None",
    abort: bool,
) -> int:
    """`prepare` with kvmhook.conf: a guest that does not fit is refused (exit 1, the
    numbers on stderr) before any script runs; with `[network] provision`, the bridges it
    lacks are then made (kvmhook.net.provision), and one that cannot be made refuses it
    the same way; then the scripts run on the XML read once."""
    from kvmhook.host import admission

    kinds = hookconf.provisions(conf, _complaints(log))
    xml = replay_fd = None
    if kinds and stdin_fd is not None:
        xml = _read_stdin(stdin_fd, log)
        if xml is not None:
            from kvmhook.hook import process  # loaded already by _read_stdin

            replay_fd = _replay(process.Stdin.holding(xml))
        stdin_fd = replay_fd  # None when it could not be read: the scripts get none
    outcome = admission.check(event.domain, conf, stdin_fd, log)
    try:
        refusal = outcome.refusal
        if refusal is None and xml is not None:
            from kvmhook.net import provision

            failure = provision.at_prepare(
                event.domain, xml, kinds, lambda line: log.record("-", f"network: {line}")
            )
            refusal = None if failure is None else f"kvmhook: {failure}"
        if refusal is not None:
            log.record("-", f"refused: {refusal}; no scripts run")
            say(refusal)
            return 1
        return _run_scripts(event, log, settings, outcome.stdin_fd, abort)
    finally:
        outcome.close()  # its own descriptor, when admission read the XML
        if replay_fd is not None:
            os.close(replay_fd)


def _release(event: Event, log: HookLog, settings: "Limits", stdin_fd: int) -> int:
    """`release` on a host where kvmhook made bridges: the scripts run, then each made
    bridge of the guest that no guest uses any more goes (kvmhook.net.provision), unless
    `[network] keep` in kvmhook.conf names it."""
    xml = _read_stdin(stdin_fd, log)
    if xml is None:
        return _run_scripts(event, log, settings, None, False)
    _run_scripts(event, log, settings, None, False, (xml, xml))
    from kvmhook.net import provision

    keep = hookconf.words(_conf(log), "network", "keep", _complaints(log))
    provision.at_release(event.domain, xml, keep, lambda line: log.record("-", f"network: {line}"))
    return 0


def _read_stdin(stdin_fd: int, log: HookLog) -> "bytes | None":
    """The domain XML on `stdin_fd`; None, logged, when it cannot be read (the scripts
    then get none)."""
    from kvmhook.hook import process

    try:
        stdin = process.Stdin(stdin_fd)
    except OSError as error:
        # dispatch's words: nothing here or there can use a domain XML it could not read
        log.record(
            "-", f"cannot read the domain XML from stdin: {error.strerror}; scripts get none"
        )
        return None
    try:
        return stdin.read()
    finally:
        stdin.close()


def _replay(stdin: "Stdin") -> int:
    """A descriptor replaying `stdin`'s bytes from the start; `stdin` itself closed."""
    try:
        return stdin.open()
    finally:
        stdin.close()


def _remembers_bridges() -> bool:
    """Whether kvmhook made bridges on this host that it has not removed: one listdir, so a
    host without provisioning pays nothing more at release."""
    try:
        return bool(os.listdir(paths.made_bridges_dir()))
    except OSError:
        return False


def _refused_for_maintenance(log: HookLog) -> bool:
    """In maintenance, a guest arriving (start, incoming migration) is refused, with the reason
    on stderr for libvirt to show; nothing else (reconnect above all) is ever blocked."""
    from kvmhook.host import hoststate

    state, _ = hoststate.read(lambda problem: log.record("-", f"maintenance: {problem}"))
    if state not in hoststate.REFUSING:
        return False
    log.record("-", f"refused: {hoststate.REFUSAL} (state {state}); no scripts run")
    say(hoststate.REFUSAL)
    return True


def _shown(args: list[str]) -> str:
    return " ".join(repr(arg) for arg in args) or "(none)"


def _report_bug(error: Exception, log: HookLog) -> None:
    import traceback

    text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    log.block("-", [f"internal error, scripts may not have run: {error!r}", *text.splitlines()])
    say(f"kvmhook: internal error: {error!r}")


if __name__ == "__main__":
    sys.exit(main())
