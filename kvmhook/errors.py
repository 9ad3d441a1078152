"""Exceptions of the project. Each message says what is wrong and where.

They become log records, messages and exit codes only at the edges: the
hook's entry point and the CLI commands.
"""


class KvmhookError(Exception):
    """Base of every error the project reports to an operator."""


class CustomDirError(KvmhookError):
    """The custom scripts directory is missing, unreadable or unsafe: nothing runs."""


class KeystoreError(KvmhookError):
    """A keystore, properties file or argument of the keystore tools is unusable."""


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


class TlsError(KvmhookError):
    """TLS cannot be switched: certificates missing, a file or unit unusable, no restart."""
