"""Every command's exit codes: the numbers scripts depend on, in --help, and at the edges.

Each command's own tests exercise its codes in real situations; these pin the
table itself, that every command shows it, and the codes nothing else reaches
cheaply.
"""

from __future__ import annotations

import click
import pytest
from sandbox import cli_runner

from keystore import cli as keystore_cli
from kvmhook import errors, exitcodes
from kvmhook.cli import main
from kvmhook.host import hoststate

# The contract, written out rather than read from the code under test: each command's
# codes, each with the first word of its meaning (a swapped meaning is a broken script).
CONTRACT = {
    "kvmhook hooks list": {0: "shown", 2: "usage"},
    "kvmhook hooks run": {0: "every", 1: "a", 2: "usage"},
    "kvmhook hooks log": {0: "shown", 1: "no", 2: "usage"},
    "kvmhook cert status": {0: "every", 1: "a", 2: "usage"},
    "kvmhook cert renew": {
        0: "renewed",
        1: "failed",
        2: "usage",
        3: "the",
        4: "putting",
        5: "renewed",
    },
    "kvmhook cert rollback": {
        0: "rolled",
        1: "failed",
        2: "usage",
        3: "the",
        4: "restoring",
        5: "rolled",
    },
    "kvmhook tls status": {0: "secured", 1: "not", 2: "usage"},
    "kvmhook tls enable": {0: "TLS", 1: "failed", 2: "usage"},
    "kvmhook tls disable": {0: "TLS", 1: "failed", 2: "usage"},
    "kvmhook migrate": {0: "migrated", 1: "failed", 2: "usage", 3: "refused", 4: "aborted"},
    "kvmhook capacity": {0: "reported", 1: "libvirt", 2: "usage"},
    "kvmhook maintenance enter": {
        0: "in",
        1: "failed",
        2: "usage",
        3: "refused",
        4: "aborted",
    },
    "kvmhook maintenance cancel": {0: "cancelled", 1: "failed", 2: "usage", 3: "refused"},
    "kvmhook maintenance rolling": {
        0: "done",
        1: "failed",
        2: "usage",
        3: "refused",
        4: "aborted",
    },
    "kvmhook maintenance stage": {0: "the", 1: "failed", 2: "usage", 3: "no", 4: "aborted"},
    "kvmhook maintenance status": {0: "shown", 1: "failed", 2: "usage"},
    "kvmhook network list": {0: "shown", 1: "the", 2: "usage"},
    "kvmhook network gc": {0: "every", 1: "a", 2: "usage"},
    "kvmhook metrics": {0: "printed", 1: "the", 2: "usage"},
    "keystore-setup": {0: "key", 1: "failed", 2: "usage"},
    "keystore-cert-import": {0: "imported", 1: "failed", 2: "usage"},
    "qemu hook": {0: "libvirt", 1: "libvirt"},
}
KEYSTORE = {
    "keystore-setup": (keystore_cli.setup_command, keystore_cli.setup_main),
    "keystore-cert-import": (keystore_cli.import_command, keystore_cli.import_main),
}
CLICK_COMMANDS = sorted(set(CONTRACT) - {"qemu hook"})


def leaves(command: click.Command, path: tuple[str, ...]) -> list[str]:
    """Every command line of the tree that runs something (groups only dispatch)."""
    if not isinstance(command, click.Group):
        return [" ".join(path)]
    return [line for name, sub in command.commands.items() for line in leaves(sub, (*path, name))]


def test_the_table_is_the_contract():
    """Each command exits with exactly the codes scripts were promised, meaning the same."""
    first_words = {
        command: {code: meaning.split()[0].rstrip(":,") for code, meaning in codes.items()}
        for command, codes in exitcodes.TABLE.items()
    }
    assert first_words == CONTRACT


def test_the_shared_numbers():
    """The names the commands use stand for the numbers the table documents."""
    assert (exitcodes.OK, exitcodes.FAILED, exitcodes.USAGE) == (0, 1, 2)
    assert (exitcodes.REFUSED, exitcodes.ABORTED) == (3, 4)
    assert (exitcodes.ROLLED_BACK, exitcodes.ROLLBACK_FAILED) == (3, 4)
    assert exitcodes.CONSOLES_STALE == 5
    assert exitcodes.NO_MAINTENANCE_NEEDED == 3


def test_every_command_is_in_the_table():
    """A new command cannot ship without its exit codes documented."""
    commands = set(leaves(main, ("kvmhook",))) | set(KEYSTORE)
    assert commands == set(CLICK_COMMANDS)


def help_of(command: str) -> str:
    if command in KEYSTORE:
        result = cli_runner().invoke(KEYSTORE[command][0], ["--help"])
    else:
        result = cli_runner().invoke(main, [*command.split()[1:], "--help"])
    assert result.exit_code == 0, result.output
    return " ".join(result.stdout.split())


@pytest.mark.parametrize("command", CLICK_COMMANDS)
def test_help_lists_every_exit_code_with_its_meaning(command):
    """--help (and so the man page) ends with the command's rows of the table."""
    shown = help_of(command)
    assert "Exit codes:" in shown
    for code, meaning in exitcodes.TABLE[command].items():
        assert f"{code} {' '.join(meaning.split())}" in shown


@pytest.mark.parametrize("command", CLICK_COMMANDS)
def test_an_unknown_option_exits_2(command):
    """Every command's usage error is 2, the keystore tools' as click's."""
    if command in KEYSTORE:
        assert KEYSTORE[command][1](["--no-such-option"]) == 2
    else:
        args = [*command.split()[1:], "--no-such-option"]
        assert cli_runner().invoke(main, args).exit_code == 2


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (errors.NotSecuredError("x"), 3),
        (errors.MigrationAbortedError("x"), 4),
        (errors.MigrationError("x"), 1),
        (errors.IllegalTransitionError("x"), 3),
        (errors.MaintenanceBusyError("x"), 3),
        (errors.MaintenanceAbortedError("x"), 4),
        (errors.MaintenanceFailedError("x"), 1),
        (errors.RollingError("x"), 1),
        (errors.StageTimedOutError("x"), 4),
        (errors.RolledBackError("x"), 3),
        (errors.RollbackFailedError("x"), 4),
        (errors.RotationError("x"), 1),
        (errors.RenewalBusyError("x"), 1),
        (errors.VirtError("x"), 1),
        (errors.KvmhookError("x"), 1),
    ],
)
def test_each_error_exits_with_its_code(error, code):
    """The commands turn an error into its code in one place, exitcodes.of."""
    assert exitcodes.of(error) == code


@pytest.mark.parametrize("command", ["renew", "rollback"])
@pytest.mark.parametrize(
    ("error", "code"),
    [
        (errors.RotationError("refused"), 1),
        (errors.RolledBackError("not served; rolled back"), 3),
        (errors.RollbackFailedError("putting it back failed too"), 4),
    ],
)
def test_cert_renew_and_rollback_exit_3_and_4(monkeypatch, tmp_path, command, error, code):
    """A renewal or rollback rolled back exits 3, one whose rollback failed 4, on one line."""
    from kvmhook.certs import rotation

    def fail(*_args: object, **_kwargs: object) -> str:
        raise error

    monkeypatch.setattr(rotation, command, fail)
    args = ["cert", command, "--agent-dir", str(tmp_path)]
    result = cli_runner().invoke(main, [*args, "--signer", "true"] if command == "renew" else args)
    assert result.exit_code == code
    assert result.stderr == f"Error: {error}\n"


def test_the_hook_exits_1_only_to_refuse(host, monkeypatch):
    """The qemu hook: 0 lets libvirt go on, 1 refuses (here: prepare during maintenance)."""
    monkeypatch.setenv("KVMHOOK_ROOT", str(host.root))
    hoststate.write(hoststate.MAINTENANCE)
    assert host.hook("vm1", "start", "begin", "-").returncode == 0
    assert host.hook("vm1", "prepare", "begin", "-").returncode == 1
