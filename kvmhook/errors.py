"""Exceptions of the project. Each message says what is wrong and where.

They become log records, messages and exit codes only at the edges: the
hook's entry point and the CLI commands.
"""


class KvmhookError(Exception):
    """Base of every error the project reports to an operator."""


class LockError(KvmhookError):
    """A lock file under /run/kvmhook cannot be opened: the command cannot run safely."""


class CustomDirError(KvmhookError):
    """The custom scripts directory is missing, unreadable or unsafe: nothing runs."""


class KeystoreError(KvmhookError):
    """A keystore, properties file or argument of the keystore tools is unusable."""


class KeystoreBusyError(KeystoreError):
    """Another certificate change held the lock for longer than a keystore tool waits."""


class VirtError(KvmhookError):
    """A libvirt call failed; the message carries libvirt's own."""


class DomainNotFoundError(VirtError):
    """No guest of that name on the libvirt connection."""


class MigrationError(KvmhookError):
    """A migration cannot start as asked: a bad destination, a guest in the wrong state."""


class NotSecuredError(MigrationError):
    """This host or the destination is not secured: a TLS migration is refused."""


class MigrationAbortedError(MigrationError):
    """The migration job was aborted (timeout, Ctrl-C); the guest stays on the source."""


class MigrationTimedOutError(MigrationAbortedError):
    """Aborted at the migration's own timeout (`kvmhook migrate --timeout`, the drain's
    --guest-timeout) with --on-timeout abort: a drain moves the other guests on."""


class TlsError(KvmhookError):
    """TLS cannot be switched: certificates missing, a file or unit unusable, no restart."""


class ConfigError(KvmhookError):
    """kvmhook.conf cannot be read or holds a bad value; the message names the file and where."""


class ControllerError(KvmhookError):
    """The controller (management server): its configuration is broken, or it refused or failed."""


class FactorError(KvmhookError):
    """An over-provisioning factor is not a number above 0."""


class ControllerUnreachable(ControllerError):
    """No configured management server answered; the message names each one and why."""


class MaintenanceError(KvmhookError):
    """The host did not get to the maintenance state asked for; the message says why."""


class IllegalTransitionError(MaintenanceError):
    """The maintenance state machine forbids the move from the current state: nothing changed."""


class PeersRequiredError(MaintenanceError):
    """Guests are running and no peer was named to take them (standalone `enter --to`)."""


class MaintenanceFailedError(MaintenanceError):
    """The host ended in ErrorInPrepareForMaintenance or ErrorInMaintenance; the reason says why."""


class MaintenanceAbortedError(MaintenanceError):
    """Maintenance was given up: --timeout reached or interrupted; the message says where it is."""


class DrainCancelledError(MaintenanceError):
    """Maintenance was cancelled (here or at the controller) while the host was being drained."""


class MaintenanceBusyError(MaintenanceError):
    """Another `kvmhook maintenance enter` is running: this one changed nothing."""


class StateFileError(MaintenanceError):
    """The maintenance state file cannot be written (it lives under /var/lib/kvmhook)."""


class RollingError(MaintenanceError):
    """A rolling-maintenance stage failed or could not run, or no stage can run here
    (rolling.maintenance.hooks.dir unset or unusable); the message says where the host is."""


class StageTimedOutError(RollingError):
    """A rolling-maintenance stage ran past its timeout: its processes were killed."""


class RotationError(KvmhookError):
    """A renewal or rollback stopped before it changed anything; the message says why."""


class RenewalBusyError(RotationError):
    """Another renewal or rollback held the lock for longer than this one would wait."""


class ReloadError(RotationError):
    """The daemon did not load the new TLS files, or a fresh handshake shows another certificate."""


class CannotReloadOnlineError(ReloadError):
    """This libvirt cannot load new TLS files without a restart (no virt-admin, libvirt < 6.2)."""


class RolledBackError(RotationError):
    """The new set was installed but not served: the previous set is back in place and served."""


class RollbackFailedError(RotationError):
    """Putting the previous set back failed too: the message says what the host holds now."""
