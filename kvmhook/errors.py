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
