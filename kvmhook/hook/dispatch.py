"""Running the custom scripts of one hook call: in order, under the veto policy, with the
XML rewrite chain of migrate and restore, each logged.

Which scripts run is `discovery`'s answer; the limits come resolved from
the entry point (`hookconf.limits`); running a child is `process`'s job
and the record format `hooklog`'s.
"""

import os

from kvmhook.hook.discovery import Found, Script
from kvmhook.hook.hooklog import HookLog, clean, end_text, output_lines, start_text
from kvmhook.hook.operations import BY_NAME, Event

TYPE_CHECKING = False  # typing costs import time the hook pays on every guest start
if TYPE_CHECKING:
    from collections.abc import Iterator

    from kvmhook.hook import process
    from kvmhook.hook.hookconf import Limits

# The qemu hook found at install, chained by the packages as this custom script
# (a link to /etc/libvirt/hooks/qemu.pre-kvmhook). Written for libvirt, it prints
# the new domain XML on its stdout for migrate and restore: that is its rewrite.
PREVIOUS_HOOK = "all_00-previous-qemu-hook"


class ScriptRun:
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
        self.runs: list[ScriptRun] = []
        self.veto: list[str] | None = None
        self.xml: bytes | None = None


def run_hook(
    event: Event,
    found: Found,
    log: HookLog,
    settings: "Limits",
    stdin_fd: "int | None",
    abort: bool = False,
    read: "tuple[bytes, bytes] | None" = None,
) -> Chain:
    """Run the scripts `found` for `event` (discovery.find), logging each; never raises for a
    script's sake.

    `stdin_fd` is read once, only if a script is going to run, and replayed to
    every script (None: scripts get empty input). `read`, when the hook has
    read stdin itself (migrate begin, to rename bridges): the XML libvirt passed
    and the one the first script gets; `stdin_fd` is then not read. With `abort`
    (the veto policy for this operation), a broken file, or the first script that
    fails or cannot be run, stops the chain and the result carries a veto.
    """
    chain = Chain()
    broken = found.broken
    if abort and broken is not None:
        _veto(chain, event, log, broken.name, broken.reason, len(found.scripts), [])
    elif found.scripts:
        _run_scripts(chain, found.scripts, event, settings, stdin_fd, log, abort, read)
    return chain


def _run_scripts(
    chain: Chain,
    scripts: list[Script],
    event: Event,
    settings: "Limits",
    stdin_fd: "int | None",
    log: HookLog,
    abort: bool,
    read: "tuple[bytes, bytes] | None",
) -> None:
    # Imported only now: a hook with nothing to run skips what spawning costs.
    from kvmhook.hook import process

    stdin = process.Stdin.holding(read[1]) if read is not None else _stdin(stdin_fd, log)
    original = None if read is None else read[0]
    rewrites = _Rewrites(stdin, log, original) if BY_NAME[event.operation].rewrites else None
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


def _stdin(stdin_fd: "int | None", log: HookLog) -> "process.Stdin":
    from kvmhook.hook import process

    try:
        return process.Stdin(stdin_fd)
    except OSError as error:
        log.record(
            "-", f"cannot read the domain XML from stdin: {error.strerror}; scripts get none"
        )
        return process.Stdin(None)


class _Rewrites:
    """The rewrite chain of one call: the outbox, the original XML and its checks.

    Without an outbox (no private directory could be made) the scripts run
    without $KVMHOOK_XML_OUT, and only the previous hook can rewrite.
    `original`: the XML libvirt passed, when `stdin` holds the hook's own
    change of it (the bridge rename); else what `stdin` holds.
    """

    def __init__(self, stdin: "process.Stdin", log: HookLog, original: "bytes | None") -> None:
        from kvmhook.hook import rewrite

        self.original = stdin.read() if original is None else original
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

    def after(self, run: ScriptRun, stdin: "process.Stdin", log: HookLog) -> "process.Stdin":
        """Take `run`'s rewrite, if any; the Stdin the next script reads."""
        from kvmhook.hook import process, rewrite

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

    def _taken(self, run: ScriptRun) -> "bytes | None":
        """`run`'s rewrite (None: none): the file at $KVMHOOK_XML_OUT, or what the
        previous hook printed. Sets `run.bad_rewrite` when it cannot be taken whole."""
        from kvmhook.hook import rewrite

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
    settings: "Limits",
    log: HookLog,
    rewrites: "_Rewrites | None",
) -> ScriptRun:
    from kvmhook.hook import process

    argv = [script.path, *event.argv]
    log.record(script.name, start_text(argv, settings.timeout))
    xml_out = _stdout_is_xml(script, rewrites)
    cap = settings.max_output
    if xml_out:
        from kvmhook.hook.readfile import DOMAIN_XML_MAX

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
        log.record(script.name, end_text(f"cannot execute: {_exec_problem(error, script.path)}"))
        return ScriptRun(script, None, error)
    finally:
        os.close(fd)
    log.block(script.name, _end_records(outcome, settings, xml_out))
    return ScriptRun(script, outcome, None)


def _exec_problem(error: OSError, path: str) -> str:
    """The OS error of a failed exec, with the likely cause the bare errno hides."""
    import errno

    problem = error.strerror or str(error)
    if error.errno == errno.ENOEXEC:
        return f"{problem} (does it start with a #! line?)"
    if error.errno == errno.ENOENT and os.path.exists(path):
        return f"{problem} (the interpreter named in its #! line)"
    return problem


def _end_records(outcome: "process.Outcome", settings: "Limits", xml_out: bool) -> "Iterator[str]":
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
    timed_out_after = settings.timeout if outcome.timed_out else None
    yield end_text(outcome.ending, outcome.duration, timed_out_after)
