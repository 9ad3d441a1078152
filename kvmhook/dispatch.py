"""Which custom scripts run for a hook call, in what order, and their log.

Scripts live in the custom dir, named `<operation>_<name>` or `all_<name>`,
and in its per-guest subdirectory `<domain-name>/`, which runs only for that
guest. They run ordered by `<name>` as bytes, ties broken by the full file
name, then the global script before the guest's, so the order is the same on
every machine and in every locale. Running a child is `process`'s job; the
record format is `hooklog`'s.
"""

import os
import stat

from kvmhook import paths
from kvmhook.hooklog import HookLog, clean, output_lines, quote

TYPE_CHECKING = False  # typing costs import time the hook pays on every guest start
if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from kvmhook import process

# The operations libvirt passes to the qemu hook, in the order of a guest's life.
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
# The operations whose non-zero exit libvirt honours by stopping what it does
# (reconnect's too, but by killing a running guest: it never aborts).
ABORTABLE = ("prepare", "start", "started", "migrate", "restore")
# The operations whose new domain XML libvirt reads from the hook's stdout.
REWRITABLE = ("migrate", "restore")
# The qemu hook found at install, chained by the packages as this custom script
# (a link to /etc/libvirt/hooks/qemu.pre-kvmhook). Written for libvirt, it prints
# the new domain XML on its stdout for migrate and restore: that is its rewrite.
PREVIOUS_HOOK = "all_00-previous-qemu-hook"
ALL = "all"  # prefix of scripts that run for every operation
# Never run, as with run-parts: what editors and package managers leave behind.
LEFTOVER_SUFFIXES = (
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
DEFAULT_TIMEOUT = 10 * 60.0
DEFAULT_GRACE = 5.0
DEFAULT_MAX_OUTPUT = 1024 * 1024


class Event:
    """One call of the hook: the four arguments libvirt passed."""

    __slots__ = ("domain", "extra", "operation", "subop")

    def __init__(self, domain: str, operation: str, subop: str = "-", extra: str = "-") -> None:
        self.domain = domain
        self.operation = operation
        self.subop = subop
        self.extra = extra

    @property
    def argv(self) -> list[str]:
        """The arguments every custom script receives: the hook's own."""
        return [self.domain, self.operation, self.subop, self.extra]


class Script:
    """A custom script that will run."""

    __slots__ = ("name", "path")

    def __init__(self, name: str, path: str) -> None:
        self.name = name
        self.path = path


class Ignored:
    """A file in the custom dir that will not run, and why.

    `notable` files have a name that asks to run for this operation; the
    hook logs why they did not. The others (other operations' scripts,
    leftovers, foreign names) are only shown by `kvmhook hooks list`.
    `broken` ones are notable files that cannot be run (unsafe, a broken
    link, not a file): under the veto policy they fail the chain, while a
    script without the execute bit is switched off, as with run-parts.
    """

    __slots__ = ("broken", "name", "notable", "reason")

    def __init__(self, name: str, reason: str, notable: bool, broken: bool = False) -> None:
        self.name = name
        self.reason = reason
        self.notable = notable
        self.broken = broken


class Limits:
    """Per-script time and output limits."""

    __slots__ = ("grace", "max_output", "timeout")

    def __init__(self, timeout: float, grace: float, max_output: int) -> None:
        self.timeout = timeout
        self.grace = grace
        self.max_output = max_output


class Run:
    """One script's run: its outcome, or the OS error that kept it from starting.

    `bad_rewrite` says why the domain XML it wrote was discarded, if it was.
    """

    __slots__ = ("bad_rewrite", "error", "outcome", "script")

    def __init__(
        self, script: Script, outcome: "process.Outcome | None", error: "OSError | None"
    ) -> None:
        self.script = script
        self.outcome = outcome
        self.error = error
        self.bad_rewrite: str | None = None

    @property
    def failed(self) -> bool:
        """It exited non-zero, died by a signal, timed out or could not be executed."""
        outcome = self.outcome
        return outcome is None or outcome.timed_out or outcome.status != 0

    @property
    def problem(self) -> str:
        """What went wrong, in words, for the veto message ('' when nothing did)."""
        outcome = self.outcome
        if outcome is None:
            error = self.error or OSError("not run")
            return f"cannot be executed: {_exec_problem(error, self.script.path)}"
        if outcome.timed_out:
            return f"timed out ({outcome.ending})"
        if outcome.status != 0:
            return outcome.ending
        if self.bad_rewrite is not None:
            return f"wrote a bad domain XML: {self.bad_rewrite}"
        return ""


class Chain:
    """What one hook call's scripts did.

    `runs` in order; `veto`: the lines for the hook's stderr when a failure
    aborts the operation (None otherwise); `xml`: the rewritten domain XML
    for libvirt, only when it differs from what libvirt passed in and
    nothing vetoed.
    """

    __slots__ = ("runs", "veto", "xml")

    def __init__(self) -> None:
        self.runs: list[Run] = []
        self.veto: list[str] | None = None
        self.xml: bytes | None = None


def discover(
    directory: str, operation: str, domain: "str | None" = None
) -> tuple[list[Script], list[Ignored]]:
    """The scripts that run for `operation`, in order, and every file that does not.

    With `domain`, the scripts of `<directory>/<domain>/` (matched exactly) are
    merged in; their names are `<domain>/<file>`. A per-guest dir that is
    unsafe or unreadable is reported as a notable Ignored entry named `<domain>`
    and only its scripts are skipped. Raises CustomDirError when the custom dir
    itself is missing, unreadable or unsafe.
    """
    try:
        real, reason = _resolve(directory, "custom dir")
        entries = list(os.scandir(real)) if reason is None else []
    except OSError as error:
        raise _custom_dir_error()(f"custom dir {directory}: {error.strerror or error}") from None
    if reason is not None:
        raise _custom_dir_error()(f"refused custom dir {directory}: {reason}")
    # A name that could leave the custom dir matches nothing; scandir never yields one anyway.
    tricky = not domain or domain in (".", "..") or "/" in domain or "\0" in domain
    guest = None if tricky else domain
    scripts: list[tuple[bytes, bytes, int, Script]] = []
    ignored: list[Ignored] = []
    for entry in entries:
        if entry.name == guest and entry.is_dir():
            found = _guest_scripts(entry, operation, scripts, ignored)
        else:
            found = _classify(entry, operation)
        if isinstance(found, Script):
            rest = entry.name.partition("_")[2]
            scripts.append((os.fsencode(rest), os.fsencode(entry.name), 0, found))
        else:
            ignored.append(found)
    scripts.sort(key=lambda item: item[:3])
    ignored.sort(key=lambda item: os.fsencode(item.name))
    return [item[3] for item in scripts], ignored


def _guest_scripts(
    entry: os.DirEntry,
    operation: str,
    scripts: "list[tuple[bytes, bytes, int, Script]]",
    ignored: list[Ignored],
) -> Ignored:
    """Add the per-guest dir `entry`'s scripts (key rank 1: after a global of the same
    name) and ignored files; return the dir's own entry, notable when it is refused."""
    name = entry.name
    try:
        if entry.is_symlink():
            real, reason = _resolve(entry.path, "per-guest dir")
        else:  # the custom dir above it is already checked
            real = entry.path
            reason = _unsafe(entry.stat(follow_symlinks=False), f"per-guest dir {real}", False)
        children = list(os.scandir(real)) if reason is None else []
    except OSError as error:
        reason = f"per-guest dir {entry.path}: {error.strerror or error}"
    if reason is not None:
        return Ignored(name, f"per-guest scripts of guest {name} not run: {reason}", True, True)
    for child in children:
        found = _classify(child, operation, name + "/")
        if isinstance(found, Script):
            rest = child.name.partition("_")[2]
            scripts.append((os.fsencode(rest), os.fsencode(child.name), 1, found))
        else:
            ignored.append(found)
    return Ignored(name, f"per-guest scripts of guest {name}", False)


def _custom_dir_error() -> "type[Exception]":
    """kvmhook.errors.CustomDirError, imported only when needed: that module holds every
    exception of the project, and the hook would pay for all of them on every call."""
    from kvmhook.errors import CustomDirError

    return CustomDirError


def _classify(entry: os.DirEntry, operation: str, guest: str = "") -> "Script | Ignored":
    """`entry` of the custom dir, or of a per-guest dir when `guest` is `<domain>/`."""
    prefix, _, rest = entry.name.partition("_")
    name = guest + entry.name
    if not rest or prefix not in (operation, ALL):
        if not guest and entry.is_dir():  # d_type: no system call for a plain entry
            return Ignored(name, f"per-guest scripts of guest {name}", False)
        if rest and prefix in OPERATIONS:
            return Ignored(name, f"runs for {prefix} only", False)
        return Ignored(name, "name is not <operation>_<name> or all_<name>", False)
    if name.endswith(LEFTOVER_SUFFIXES):
        return Ignored(name, "editor or package-manager leftover", False)
    try:
        st = os.stat(entry.path)
    except FileNotFoundError:
        if entry.is_symlink():
            return Ignored(name, "broken symbolic link", True, True)
        return Ignored(name, "vanished", True)
    except OSError as error:
        return Ignored(name, f"cannot stat: {error.strerror}", True, True)
    if not stat.S_ISREG(st.st_mode):
        if not guest and stat.S_ISDIR(st.st_mode):
            return Ignored(name, f"per-guest scripts of guest {name}", False)
        return Ignored(name, "not a regular file", True, True)
    if not st.st_mode & 0o111:
        return Ignored(name, f"not executable (mode {stat.S_IMODE(st.st_mode):04o})", True)
    reason = _unsafe(st, "script", sticky_ok=False)
    if reason is None and entry.is_symlink():
        try:
            reason = _resolve(entry.path, "link target")[1]
        except OSError as error:
            reason = f"cannot check the link target: {error.strerror}"
    if reason is not None:
        return Ignored(name, f"refused: {reason}", True, True)
    return Script(name, entry.path)


def _resolve(path: str, what: str) -> "tuple[str, str | None]":
    """`path` resolved as realpath does, and why it is unsafe, or None.

    Unsafe: the file, a directory above it, or a directory holding one of
    the links followed on the way could be changed by someone but root or
    us; such a person could then choose what runs.
    """
    pending = [part for part in reversed(path.split("/")) if part not in ("", ".")]
    current = "/" if path.startswith("/") else os.getcwd()
    links = 0
    while pending:
        part = pending.pop()
        candidate = os.path.dirname(current) if part == ".." else os.path.join(current, part)
        if part != ".." and os.path.islink(candidate):
            links += 1
            reason = "too many links" if links > 40 else _unsafe_path(current, "link's directory")
            if reason is not None:
                return candidate, reason
            target = os.readlink(candidate)
            pending.extend(p for p in reversed(target.split("/")) if p not in ("", "."))
            if target.startswith("/"):
                current = "/"
            continue
        current = candidate
    return current, _unsafe_path(current, what)


def _unsafe_path(real: str, what: str) -> "str | None":
    """Why the resolved path `real` could be changed by someone but root or us, or None.

    Checks it and every directory above it: a script is only as safe as the
    directories that hold it. Root-owned sticky directories (such as /tmp)
    above it are fine: others cannot replace what is in them.
    """
    reason = _unsafe(os.stat(real), f"{what} {real}", sticky_ok=False)
    parent = real
    while reason is None and parent != os.path.dirname(parent):
        parent = os.path.dirname(parent)
        reason = _unsafe(os.stat(parent), f"directory {parent}", sticky_ok=True)
    return reason


def _unsafe(st: os.stat_result, what: str, sticky_ok: bool) -> "str | None":
    if st.st_uid not in (0, os.geteuid()):
        return f"{what} is owned by uid {st.st_uid}, not root"
    mode = st.st_mode
    if mode & 0o022 and not (sticky_ok and stat.S_ISDIR(mode) and mode & stat.S_ISVTX):
        return f"{what} is writable by group or others (mode {stat.S_IMODE(mode):04o})"
    return None


def limits(timeout: "float | None", complain: "Callable[[str], None]") -> Limits:
    """The limits in force: the launcher's `timeout`, overridden by KVMHOOK_* variables.

    An invalid value is reported through `complain` and its default applies.
    """
    default = DEFAULT_TIMEOUT
    if timeout is not None:
        if _valid(timeout, positive=True):
            default = float(timeout)
        else:
            complain(f"timeoutSeconds={timeout!r} is not a positive number; using {default:g}")
    return Limits(
        _env_number("KVMHOOK_TIMEOUT", default, float, complain, positive=True),
        _env_number("KVMHOOK_TERM_GRACE", DEFAULT_GRACE, float, complain, positive=False),
        int(_env_number("KVMHOOK_MAX_OUTPUT", DEFAULT_MAX_OUTPUT, int, complain, positive=False)),
    )


def _env_number(
    name: str, default: float, kind: type, complain: "Callable[[str], None]", positive: bool
) -> float:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        value = kind(raw)
    except ValueError:
        value = None
    if value is None or not _valid(value, positive):
        need = "a positive number" if positive else "a number, 0 or more"
        complain(f"{name}={raw!r} is not {need}; using {default:g}")
        return default
    return value


def _valid(value: object, positive: bool) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    # value == value rules out NaN, and the bound infinity: a hook must end.
    return value == value and (value > 0 if positive else value >= 0) and value != float("inf")


def run_hook(
    event: Event,
    log: HookLog,
    timeout: "float | None",
    stdin_fd: "int | None",
    abort: bool = False,
) -> Chain:
    """Run the custom scripts for `event`, logging each; never raises for a script's sake.

    `stdin_fd` is read once, only if a script is going to run, and replayed to
    every script (None: scripts get empty input). With `abort` (the veto
    policy for this operation), the first script that fails, or cannot be
    run, stops the chain and the result carries a veto.
    """
    chain = Chain()
    settings = limits(timeout, lambda message: log.record("-", f"config: {message}"))
    directory = paths.custom_dir()
    try:
        scripts, ignored = discover(directory, event.operation, event.domain)
    except _custom_dir_error() as error:  # evaluated only when something was raised
        log.record("-", f"no scripts run: {error}")
        return chain
    for item in ignored:
        if item.notable:
            log.record(item.name, f"ignored: {item.reason}")
    broken = [item for item in ignored if item.broken]
    if abort and broken:
        _veto(chain, event, log, broken[0].name, broken[0].reason, len(scripts), [])
    elif not scripts:
        log.record("-", f"no scripts for {event.operation} in {directory}")
    else:
        _run_scripts(chain, scripts, event, settings, stdin_fd, log, abort)
    return chain


def _run_scripts(
    chain: Chain,
    scripts: list[Script],
    event: Event,
    settings: Limits,
    stdin_fd: "int | None",
    log: HookLog,
    abort: bool,
) -> None:
    # Imported only now: a hook with nothing to run skips what spawning costs.
    from kvmhook import process

    try:
        stdin = process.Stdin(stdin_fd)
    except OSError as error:
        log.record(
            "-", f"cannot read the domain XML from stdin: {error.strerror}; scripts get none"
        )
        stdin = process.Stdin(None)
    rewrites = _Rewrites(stdin, log) if event.operation in REWRITABLE else None
    try:
        for index, script in enumerate(scripts):
            run = _run_one(script, event, stdin, settings, log, rewrites)
            chain.runs.append(run)
            if rewrites is not None:
                stdin = rewrites.after(run, stdin, log)
            if abort and (run.failed or run.bad_rewrite is not None):
                lines = _stderr_tail(run.outcome) if run.outcome is not None else []
                _veto(chain, event, log, script.name, run.problem, len(scripts) - index - 1, lines)
                return
        if rewrites is not None:
            chain.xml = rewrites.result(stdin, log)
    finally:
        stdin.close()
        if rewrites is not None:
            rewrites.close()


class _Rewrites:
    """The rewrite chain of one call: the outbox, the original XML and its checks.

    Without an outbox (no private directory could be made) the scripts run
    without $KVMHOOK_XML_OUT, and only the previous hook can rewrite.
    """

    def __init__(self, stdin: "process.Stdin", log: HookLog) -> None:
        from kvmhook import rewrite

        self.original = stdin.read()
        self.outbox: rewrite.Outbox | None = None
        self.variables: dict[str, str] = {}
        try:
            self.outbox = rewrite.Outbox()
            self.variables[rewrite.VARIABLE] = self.outbox.path
        except OSError as error:
            log.record(
                "-",
                f"xml: scripts run without ${rewrite.VARIABLE} and cannot rewrite the domain "
                f"XML: {error.strerror}",
            )
        self._reference: rewrite.Reference | None = None

    def after(self, run: Run, stdin: "process.Stdin", log: HookLog) -> "process.Stdin":
        """Take `run`'s rewrite, if any; the Stdin the next script reads."""
        from kvmhook import process, rewrite

        name = run.script.name
        data = self._taken(run)
        if data is not None and run.failed:
            log.record(name, f"xml: rewrite of {len(data)} bytes discarded: the script failed")
            return stdin
        if data is not None:
            if self._reference is None:
                self._reference = rewrite.Reference(self.original)
            run.bad_rewrite = self._reference.check(data)
        if run.bad_rewrite is not None:
            log.record(name, f"xml: rewrite discarded: {run.bad_rewrite}")
            return stdin
        if data is None:
            return stdin
        log.record(name, f"xml: rewritten ({len(data)} bytes); later scripts get it on stdin")
        stdin.close()
        return process.Stdin.holding(data)

    def _taken(self, run: Run) -> "bytes | None":
        """`run`'s rewrite (None: none): the file at $KVMHOOK_XML_OUT, or what the
        previous hook printed. Sets `run.bad_rewrite` when it cannot be taken whole."""
        from kvmhook import rewrite

        data = None
        if self.outbox is not None:
            try:
                data = self.outbox.take()
            except OSError as error:
                run.bad_rewrite = f"cannot read ${rewrite.VARIABLE}: {error.strerror}"
        if run.outcome is not None and _stdout_is_xml(run.script, self):
            printed = _stdout(run.outcome)
            if printed and run.outcome.dropped:
                run.bad_rewrite = "its output went past the cap, so its domain XML may be cut"
            elif printed:
                data = printed
        return data

    def result(self, stdin: "process.Stdin", log: HookLog) -> "bytes | None":
        """The final XML for libvirt, when it differs from the original."""
        final = stdin.read()
        if final == self.original:
            return None
        log.record("-", f"xml: new domain XML ({len(final)} bytes) printed for libvirt")
        return final

    def close(self) -> None:
        if self.outbox is not None:
            self.outbox.remove()


def _stdout_is_xml(script: Script, rewrites: "_Rewrites | None") -> bool:
    """Whether `script`'s stdout is domain XML, taken as its rewrite and never logged:
    the previous hook's, for migrate and restore."""
    return rewrites is not None and script.name == PREVIOUS_HOOK


def _stdout(outcome: "process.Outcome") -> bytes:
    return b"".join(data for stream, data in outcome.segments if stream == "stdout")


def _veto(
    chain: Chain,
    event: Event,
    log: HookLog,
    name: str,
    problem: str,
    skipped: int,
    lines: list[str],
) -> None:
    """Record that `name` vetoes the operation: the log line and the hook's stderr."""
    log.record(
        name,
        f"abort: {problem}; {skipped} later scripts not run; "
        f"the hook exits 1 so libvirt aborts {event.operation}",
    )
    chain.veto = [
        f"kvmhook: {event.operation} of guest {event.domain} aborted: "
        f"custom script {name}: {problem}",
        *(f"kvmhook: {name}: {line}" for line in lines),
    ]


# The most of a failing script's stderr the hook repeats on its own stderr,
# which libvirt puts in the error the operator sees.
_TAIL_LINES = 10
_TAIL_LINE_CHARS = 300


def _stderr_tail(outcome: "process.Outcome") -> list[str]:
    """The last lines of `outcome`'s stderr, cleaned; never a line that looks like XML
    (the domain XML, which for migrate carries secrets, echoed by the script)."""
    data = b"".join(data for stream, data in outcome.segments if stream == "stderr")
    text = data[-_TAIL_LINES * _TAIL_LINE_CHARS * 4 :].decode("utf-8", "replace")
    lines = []
    for line in text.splitlines():
        line = clean(line.strip())
        if line and not (line.startswith("<") and line.endswith(">")):
            lines.append(line[:_TAIL_LINE_CHARS])
    return lines[-_TAIL_LINES:]


def _run_one(
    script: Script,
    event: Event,
    stdin: "process.Stdin",
    settings: Limits,
    log: HookLog,
    rewrites: "_Rewrites | None",
) -> Run:
    from kvmhook import process

    argv = [script.path, *event.argv]
    log.record(
        script.name,
        f"start: {' '.join(quote(arg) for arg in argv)} (timeout {settings.timeout:g}s)",
    )
    xml_out = _stdout_is_xml(script, rewrites)
    cap = settings.max_output
    if xml_out:
        from kvmhook.readfile import DOMAIN_XML_MAX

        cap += DOMAIN_XML_MAX  # room for the XML besides what is logged
    fd = stdin.open()
    try:
        outcome = process.run(
            argv,
            fd,
            settings.timeout,
            settings.grace,
            cap,
            None if rewrites is None else rewrites.variables,
        )
    except OSError as error:
        log.record(script.name, f"end: cannot execute: {_exec_problem(error, script.path)}")
        return Run(script, None, error)
    finally:
        os.close(fd)
    log.block(script.name, _end_records(outcome, settings, xml_out))
    return Run(script, outcome, None)


def _exec_problem(error: OSError, path: str) -> str:
    """The OS error of a failed exec, with the likely cause the bare errno hides."""
    import errno

    problem = error.strerror or str(error)
    if error.errno == errno.ENOEXEC:
        return f"{problem} (does it start with a #! line?)"
    if error.errno == errno.ENOENT and os.path.exists(path):
        return f"{problem} (the interpreter named in its #! line)"
    return problem


def _end_records(outcome: "process.Outcome", settings: Limits, xml_out: bool) -> "Iterator[str]":
    """The records of a script's end; with `xml_out`, its stdout is the domain XML, which
    holds secrets: only its size is logged."""
    if xml_out:
        yield from output_lines(seg for seg in outcome.segments if seg[0] == "stderr")
        printed = sum(len(data) for stream, data in outcome.segments if stream == "stdout")
        if printed:
            yield f"stdout: {printed} bytes of domain XML, not logged: its rewrite"
    else:
        yield from output_lines(outcome.segments)
    if outcome.dropped:
        yield (
            f"output: {outcome.dropped} more bytes dropped "
            f"(KVMHOOK_MAX_OUTPUT={settings.max_output})"
        )
    how = outcome.ending
    if outcome.timed_out:
        how = f"timed out after {settings.timeout:g}s, process group stopped; {how}"
    yield f"end: {how} after {outcome.duration:.3f}s"
