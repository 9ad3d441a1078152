"""Every command's exit codes and what each means: the one table.

The numbers are a contract: scripts, timers and monitoring test them, so a
command's number never changes its meaning. The same number may mean other
things to other commands: 3 and 4 are a refusal and an abort for `kvmhook
migrate` and `kvmhook maintenance`, a renewal rolled back and a failed
rollback for `kvmhook cert`. Each command's --help shows its own rows
(kvmhook.cli.options.with_exit_codes). The qemu hook returns its 0 and 1
without importing this module: libvirtd waits for every import it makes.
"""

from __future__ import annotations

from kvmhook import errors

OK = 0
FAILED = 1  # failed, or (status commands) found what they check wrong
USAGE = 2  # click's own number for a usage error; the keystore tools use it too
# kvmhook migrate and kvmhook maintenance
REFUSED = 3
ABORTED = 4
# kvmhook maintenance stage: the stage's script exited 70, CloudStack's "no maintenance needed"
NO_MAINTENANCE_NEEDED = 3
# kvmhook cert renew and rollback
ROLLED_BACK = 3
ROLLBACK_FAILED = 4
CONSOLES_STALE = 5
_CONSOLES = (
    "{done} and served by libvirtd; some consoles still serve the {old} certificate until their"
    " guest restarts (each listed, with why: QEMU older than 6.0, a guest gone)"
)

_USAGE = "usage error: a bad or missing option or argument"

# command: {code: meaning}, each command with every code it exits with.
TABLE: dict[str, dict[int, str]] = {
    "kvmhook hooks list": {
        OK: "shown, also when nothing would run (the output says why)",
        USAGE: _USAGE,
    },
    "kvmhook hooks run": {
        OK: "every script succeeded, or none was to run",
        FAILED: "a script failed, timed out or could not start (under [hooks] on_failure ="
        " abort: the veto, with the scripts' reasons)",
        USAGE: _USAGE,
    },
    "kvmhook hooks log": {
        OK: "shown (a file or line that cannot be read is a warning on stderr)",
        FAILED: "no standard output to show the runs on",
        USAGE: _USAGE,
    },
    "kvmhook cert status": {
        OK: "every certificate is fine",
        FAILED: "a problem, or a certificate expiring within --warn-days",
        USAGE: _USAGE,
    },
    "kvmhook cert renew": {
        OK: "renewed, not due, or dry run",
        FAILED: "failed, nothing changed",
        USAGE: _USAGE,
        ROLLED_BACK: "the new set was installed but not served, and the previous set is"
        " back in place and served",
        ROLLBACK_FAILED: "putting the previous set back failed too (the message says what"
        " the host holds now)",
        CONSOLES_STALE: _CONSOLES.format(done="renewed", old="old"),
    },
    "kvmhook cert rollback": {
        OK: "rolled back: the previous set is in place and served",
        FAILED: "failed, nothing changed (no previous set, or not a valid one)",
        USAGE: _USAGE,
        ROLLED_BACK: "the previous set was installed but not served, and the set rolled"
        " back from is back in place and served",
        ROLLBACK_FAILED: "restoring the set rolled back from failed too (the message says"
        " what the host holds now)",
        CONSOLES_STALE: _CONSOLES.format(done="rolled back", old="rolled-back-from"),
    },
    "kvmhook tls status": {
        OK: "secured",
        FAILED: "not secured (the items marked NOT OK say why)",
        USAGE: _USAGE,
    },
    "kvmhook tls enable": {
        OK: "TLS on (already on: nothing changed)",
        FAILED: "failed: the certificate files are not installed (nothing changed), or a"
        " file, unit or restart failed",
        USAGE: _USAGE,
    },
    "kvmhook tls disable": {
        OK: "TLS off (already off: nothing changed)",
        FAILED: "failed: a file, unit or restart",
        USAGE: _USAGE,
    },
    "kvmhook migrate": {
        OK: "migrated (with --on-timeout postcopy, also after switching to post-copy)",
        FAILED: "failed: a libvirt error, no such guest, or a guest not in a state to migrate"
        " (after a switch to post-copy the message says so: the guest may be paused or lost)",
        USAGE: _USAGE + "; also --on-timeout postcopy without --timeout, or with --offline",
        REFUSED: "refused: this host or the destination is not secured (see kvmhook tls status)",
        ABORTED: "aborted (--timeout reached with --on-timeout abort, or Ctrl-C before any"
        " switch to post-copy): the guest stays on this host",
    },
    "kvmhook capacity": {
        OK: "reported",
        FAILED: "libvirt, kvmhook.conf's factors or the controller's ratios failed",
        USAGE: _USAGE + "; also a factor flag out of range",
    },
    "kvmhook maintenance enter": {
        OK: "in Maintenance (with a controller and no --wait: asked, the host is preparing)",
        FAILED: "failed: a guest could not move (its migration failed or reached"
        " --guest-timeout with --on-timeout abort, or it fits on no peer; the others moved"
        " all the same, the host is left in ErrorInPrepareForMaintenance, the reason in"
        " kvmhook maintenance status), the controller reports an error state, or libvirt,"
        " the controller, kvmhook.conf or the state file failed",
        USAGE: "usage error; standalone, also: guests are running and no --to was given, or"
        " --on-timeout postcopy without --guest-timeout; with a controller, any drain option",
        REFUSED: "refused: not a legal transition from the current state, or another enter"
        " is running; nothing changed",
        ABORTED: "aborted: --timeout reached or Ctrl-C (standalone: the migrations under way"
        " are aborted unless in post-copy, the rest not attempted;"
        " ErrorInPrepareForMaintenance)",
    },
    "kvmhook maintenance cancel": {
        OK: "cancelled: the host accepts guests again",
        FAILED: "failed: the controller or the state file",
        USAGE: _USAGE,
        REFUSED: "refused: not a legal transition from the current state (e.g. already Enabled)",
    },
    "kvmhook maintenance rolling": {
        OK: "done: the host was updated (drained, the Maintenance stage, back to Enabled,"
        " PostMaintenance), or skipped with nothing changed: PreFlight or PreMaintenance"
        " exited 70 (no maintenance needed), or there is no Maintenance script",
        FAILED: "failed: a stage failed or was refused (PreFlight, PreMaintenance: nothing was"
        " done; Maintenance: maintenance is cancelled), rolling.maintenance.hooks.dir is not"
        " set, or the drain failed (ErrorInPrepareForMaintenance); the message says where the"
        " host is",
        USAGE: "usage error; standalone, also: guests are running and no --to was given",
        REFUSED: "refused: the host is not Enabled, or another enter or rolling is running;"
        " nothing was run",
        ABORTED: "aborted: a stage ran past --stage-timeout and was killed, the drain past"
        " --drain-timeout, or Ctrl-C",
    },
    "kvmhook maintenance stage": {
        OK: "the stage's script exited 0, or the stage has no script (skipped)",
        FAILED: "failed: the script exited non-zero (not 70), was killed, could not start or"
        " was refused (not executable, unsafe), or rolling.maintenance.hooks.dir is not set",
        USAGE: _USAGE + " (a stage other than PreFlight, PreMaintenance, Maintenance,"
        " PostMaintenance)",
        NO_MAINTENANCE_NEEDED: "no maintenance needed: the script exited 70",
        ABORTED: "aborted: the script ran past --timeout and was killed, or Ctrl-C",
    },
    "kvmhook maintenance status": {
        OK: 'shown (removable or not: see the "removable" line or key)',
        FAILED: "failed: the controller could not be asked, or the state file not written",
        USAGE: _USAGE,
    },
    "kvmhook network list": {
        OK: "shown (libvirt not answering is a warning: ports show tap names)",
        FAILED: "the network devices in /sys/class/net cannot be read",
        USAGE: _USAGE,
    },
    "kvmhook network gc": {
        OK: "every bridge no guest uses removed (or, with --dry-run, listed), or none to remove",
        FAILED: "a bridge could not be removed (`ip`'s answer), or kvmhook.conf or"
        " /run/kvmhook/bridges could not be read",
        USAGE: _USAGE,
    },
    "kvmhook metrics": {
        OK: "printed, or written (a source that cannot be read is said on stderr and left out)",
        FAILED: "the textfile could not be written, or another run held the lock for 30 s",
        USAGE: _USAGE,
    },
    "keystore-setup": {
        OK: "key and placeholder in the keystore, passphrase kept, CSR written",
        FAILED: "failed: one line on stderr says why",
        USAGE: _USAGE + " (a passphrase Java cannot take, days out of range)",
    },
    "keystore-cert-import": {
        OK: "imported",
        FAILED: "failed: one line on stderr says why (the files are installed all or none;"
        " with --restart, the reload may fail after the import)",
        USAGE: _USAGE,
    },
    # Not a click command: documented here, returned by kvmhook.qemu itself.
    "qemu hook": {
        OK: "libvirt goes on, whatever the custom scripts did, except:",
        FAILED: "libvirt refuses the guest or the operation: prepare or migrate while the"
        " host is in maintenance, prepare of a guest that does not fit (admission ="
        " enforce), a failing script under [hooks] on_failure = abort",
    },
}

# The errors that exit with another code than FAILED, wherever a command meets them.
_BY_ERROR: tuple[tuple[type[errors.KvmhookError], int], ...] = (
    (errors.NotSecuredError, REFUSED),
    (errors.MigrationAbortedError, ABORTED),
    (errors.IllegalTransitionError, REFUSED),
    (errors.MaintenanceBusyError, REFUSED),
    (errors.MaintenanceAbortedError, ABORTED),
    (errors.StageTimedOutError, ABORTED),
    (errors.RolledBackError, ROLLED_BACK),
    (errors.RollbackFailedError, ROLLBACK_FAILED),
)


def of(error: errors.KvmhookError) -> int:
    """The exit code a command gives for `error`: FAILED unless the table above says else."""
    for kind, code in _BY_ERROR:
        if isinstance(error, kind):
            return code
    return FAILED
