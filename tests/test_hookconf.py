"""The hook's settings: each script's limits, from the launcher's timeout and KVMHOOK_*."""

from __future__ import annotations

import os

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from kvmhook.hook import hookconf

# --- limits from the launcher's value and the environment ----------------------


@pytest.fixture
def clean_env(monkeypatch):
    for name in ("KVMHOOK_TIMEOUT", "KVMHOOK_TERM_GRACE", "KVMHOOK_MAX_OUTPUT"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def resolve(timeout=None):
    complaints: list[str] = []
    return hookconf.limits(timeout, complaints.append), complaints


def test_limits_defaults(clean_env):
    """With no launcher value and no variables: 600 s timeout, 5 s grace, 1 MiB output."""
    found, complaints = resolve()
    assert (found.timeout, found.grace, found.max_output) == (600.0, 5.0, 1024 * 1024)
    assert complaints == []


def test_limits_launcher_timeout_then_variable_override(clean_env):
    """The launcher's timeoutSeconds applies, and KVMHOOK_TIMEOUT overrides it."""
    assert resolve(30)[0].timeout == 30.0
    clean_env.setenv("KVMHOOK_TIMEOUT", "2.5")
    found, complaints = resolve(30)
    assert found.timeout == 2.5
    assert complaints == []


@pytest.mark.parametrize("value", [0, -1, "600", True, float("nan"), float("inf")])
def test_limits_invalid_launcher_timeout_complains_and_uses_default(clean_env, value):
    """An invalid timeoutSeconds is reported and 600 s applies."""
    found, complaints = resolve(value)
    assert found.timeout == 600.0
    assert len(complaints) == 1 and "timeoutSeconds" in complaints[0]


@pytest.mark.parametrize("raw", ["abc", "0", "-5", "nan", "inf", "-inf"])
def test_limits_invalid_timeout_variable_keeps_launcher_value(clean_env, raw):
    """An invalid KVMHOOK_TIMEOUT is reported and the launcher's value stays in force."""
    clean_env.setenv("KVMHOOK_TIMEOUT", raw)
    found, complaints = resolve(30)
    assert found.timeout == 30.0
    assert len(complaints) == 1
    assert "KVMHOOK_TIMEOUT" in complaints[0] and repr(raw) in complaints[0]


@pytest.mark.parametrize("raw", ["abc", "-1", "-0.5", "nan", "inf", "5s"])
def test_limits_invalid_term_grace_complains_and_uses_default(clean_env, raw):
    """An invalid KVMHOOK_TERM_GRACE is reported and 5 s applies."""
    clean_env.setenv("KVMHOOK_TERM_GRACE", raw)
    found, complaints = resolve()
    assert found.grace == 5.0
    assert len(complaints) == 1
    assert "KVMHOOK_TERM_GRACE" in complaints[0] and repr(raw) in complaints[0]


@pytest.mark.parametrize(("raw", "value"), [("0", 0.0), ("0.25", 0.25), ("30", 30.0)])
def test_limits_valid_term_grace_applies(clean_env, raw, value):
    """KVMHOOK_TERM_GRACE of 0 or more is used as is."""
    clean_env.setenv("KVMHOOK_TERM_GRACE", raw)
    found, complaints = resolve()
    assert found.grace == value
    assert complaints == []


@pytest.mark.parametrize("raw", ["abc", "-1", "1.5", "1e3", "1MiB"])
def test_limits_invalid_max_output_complains_and_uses_default(clean_env, raw):
    """An invalid KVMHOOK_MAX_OUTPUT is reported and 1 MiB applies."""
    clean_env.setenv("KVMHOOK_MAX_OUTPUT", raw)
    found, complaints = resolve()
    assert found.max_output == 1024 * 1024
    assert len(complaints) == 1
    assert "KVMHOOK_MAX_OUTPUT" in complaints[0] and repr(raw) in complaints[0]


@pytest.mark.parametrize(("raw", "value"), [("0", 0), ("4096", 4096), ("10485760", 10485760)])
def test_limits_valid_max_output_applies(clean_env, raw, value):
    """KVMHOOK_MAX_OUTPUT of 0 or more bytes is used as an int."""
    clean_env.setenv("KVMHOOK_MAX_OUTPUT", raw)
    found, complaints = resolve()
    assert found.max_output == value and isinstance(found.max_output, int)
    assert complaints == []


def test_limits_max_output_of_one_gib_is_accepted(clean_env):
    """A KVMHOOK_MAX_OUTPUT of 1 GiB is a valid byte count and applies without complaint."""
    clean_env.setenv("KVMHOOK_MAX_OUTPUT", str(1024**3))
    found, complaints = resolve()
    assert complaints == []
    assert found.max_output == 1024**3


def test_limits_say_which_setting_chose_the_timeout(clean_env):
    """timeout_from names the default, the launcher's timeoutSeconds or KVMHOOK_TIMEOUT."""
    assert resolve()[0].timeout_from == "default"
    assert resolve(30)[0].timeout_from == "timeoutSeconds"
    assert resolve(0)[0].timeout_from == "default"
    clean_env.setenv("KVMHOOK_TIMEOUT", "abc")
    assert resolve(30)[0].timeout_from == "timeoutSeconds"
    clean_env.setenv("KVMHOOK_TIMEOUT", "30")
    assert resolve(30)[0].timeout_from == "KVMHOOK_TIMEOUT"


# --- the installed launcher's timeoutSeconds, read as text -------------------------


def launcher(tmp_path, text: str):
    """What launcher_timeout() finds in a launcher holding `text`, and its complaints."""
    path = tmp_path / "qemu"
    path.write_text(text)
    complaints: list[str] = []
    return hookconf.launcher_timeout(str(path), complaints.append), complaints


@pytest.mark.parametrize(
    ("line", "value"),
    [
        ("timeoutSeconds = 600", 600.0),
        ("timeoutSeconds = 10 * 60", 600.0),
        ("timeoutSeconds = 1.5", 1.5),
        ("timeoutSeconds=2*3*.5", 3.0),
        ("timeoutSeconds = 10 * 60  # ten minutes", 600.0),
        ("timeoutSeconds = 600 # not x = 5", 600.0),
        ("timeoutSeconds = 0", 0.0),  # the hook's own check then refuses it, as for the hook
    ],
)
def test_launcher_timeout_reads_a_number_or_a_product(tmp_path, line, value):
    """A number or a product of numbers is read as the hook's Python would compute it."""
    text = f"#!/usr/bin/python3 -I\n# Seconds each script may run:\n{line}\nimport sys\n"
    assert launcher(tmp_path, text) == (value, [])


@pytest.mark.parametrize(
    "value",
    ["", "ten", "10 ** 2", "1e3", "int('600')", "-5", "\u0665\u0660\u0660"],
)
def test_launcher_timeout_anything_else_warns_and_gives_none(tmp_path, value):
    """Anything but decimal numbers multiplied is not evaluated: a warning, and the default."""
    found, complaints = launcher(tmp_path, f"timeoutSeconds = {value}\n")
    assert found is None
    assert len(complaints) == 1
    assert "is not a number or a product of numbers; using 600" in complaints[0]
    assert str(tmp_path / "qemu") in complaints[0]


def test_launcher_timeout_is_never_executed(tmp_path):
    """The launcher is read, not run: code around the line has no effect."""
    marker = tmp_path / "ran"
    text = f"open({str(marker)!r}, 'w').close()\ntimeoutSeconds = 7\nraise SystemExit(3)\n"
    assert launcher(tmp_path, text) == (7.0, [])
    assert not marker.exists()


def test_launcher_timeout_takes_the_last_top_level_assignment(tmp_path):
    """As Python would: a later `timeoutSeconds =` line wins; indented ones are not top level."""
    text = "timeoutSeconds = 5\ntimeoutSeconds = 6\nif False:\n    timeoutSeconds = 7\n"
    assert launcher(tmp_path, text) == (6.0, [])


def test_launcher_timeout_without_the_line_warns(tmp_path):
    """A launcher that sets no timeoutSeconds (someone else's hook) gives the default, said."""
    found, complaints = launcher(tmp_path, "#!/bin/sh\nexit 0\n")
    assert found is None
    assert complaints == [f"{tmp_path / 'qemu'} sets no timeoutSeconds; using 600"]


def test_launcher_timeout_without_a_launcher_is_silent(tmp_path):
    """No installed hook: the default applies, with nothing to warn about."""
    complaints: list[str] = []
    assert hookconf.launcher_timeout(str(tmp_path / "qemu"), complaints.append) is None
    assert complaints == []


@pytest.mark.parametrize("kind", ["fifo", "huge", "directory", "binary"])
def test_launcher_timeout_refuses_what_is_not_a_small_text_file(tmp_path, kind):
    """A FIFO (never waited on), a huge file, a directory or bytes that are not UTF-8 give the
    default and a warning saying why."""
    path = tmp_path / "qemu"
    if kind == "fifo":
        os.mkfifo(path)  # no writer: a blocking open would hang here
    elif kind == "huge":
        path.write_bytes(b"timeoutSeconds = 1\n" + b"#" * (1024 * 1024))
    elif kind == "directory":
        path.mkdir()
    else:
        path.write_bytes(b"timeoutSeconds = 1\n\xff\xfe\n")
    complaints: list[str] = []
    assert hookconf.launcher_timeout(str(path), complaints.append) is None
    assert len(complaints) == 1
    assert complaints[0].startswith(f"cannot read {path}: ")
    assert complaints[0].endswith("; using 600")


# -- one option read from the raw lines, as configparser would read it -------------------

_LINES = st.sampled_from(
    [
        "[network]", "[hooks]", "[DEFAULT]", "[ network ]", "[network] junk", "[]", "[a]b]",
        "provision = vxlan, vlan", "PROVISION: vlan", "provision=", "provision = a = b",
        "provision : x = y", "keep = brvx-1", "rename_bridges = no", " provision = vxlan",
        "\tcontinued", "# provision = vlan", "; provision = vlan", "  # indented comment",
        "", "   ", "no delimiter", "= empty name", "provision\t=\tvxlan\r", "é = ü",
        "provision = vxlan\x0cvlan", "provision = vxlan\x1cvlan",
    ]
)  # fmt: skip


@settings(max_examples=600, deadline=None)
@given(st.lists(_LINES, max_size=8))
@example(["[DEFAULT]", "provision = vlan", "[network]"])
@example(["[network]", "provision = vxlan", "[hooks]", "[network]"])
@example(["[network]", "provision = vxlan", "[hooks]", "x = 1", "X = 2"])
@example(["[network]", "provision = vxlan,", "  vlan"])
def test_raw_reads_what_configparser_reads_or_says_it_cannot(lines):
    """Whatever the file, HookConf.raw either agrees with configparser or hands over to it."""
    from kvmhook import config
    from kvmhook.errors import ConfigError

    data = "\n".join(lines).encode()
    conf = hookconf.HookConf("kvmhook.conf", data)
    try:
        raw = conf.raw("network", "provision")
    except hookconf.RawReadError:
        return
    try:
        parsed = config.parse(data, "kvmhook.conf").get("network", "provision", fallback=None)
    except ConfigError as error:
        pytest.fail(f"raw read {raw!r} where configparser fails: {error}")
    assert raw == parsed


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("", []),
        ("[network]\nprovision = vxlan, vlan\n", ["vxlan", "vlan"]),
        ("[network]\nprovision = VLAN\n", ["vlan"]),
        ("[network]\nprovision = none\n", []),
        ("[network]\nprovision =\n", []),
        ("[network]\nprovision = vxlan,\n  vlan\n", ["vxlan", "vlan"]),  # parsed: continued
        ("[hooks]\nprovision = vxlan\n", []),
    ],
)
def test_provisions(text, words):
    conf = hookconf.HookConf("kvmhook.conf", text.encode())
    assert hookconf.provisions(conf, pytest.fail) == words


def test_provisions_says_an_unknown_kind_and_a_broken_file():
    said: list[str] = []
    conf = hookconf.HookConf("k.conf", b"[network]\nprovision = vxlan, gre\n")
    assert hookconf.provisions(conf, said.append) == ["vxlan"]
    broken = hookconf.HookConf("k.conf", b"[network]\nprovision = vxlan\nprovision = vlan\n")
    assert hookconf.provisions(broken, said.append) == []
    assert said[0] == "[network] provision: 'gre' is neither vxlan nor vlan; left out"
    assert said[1].startswith("k.conf") and said[1].endswith("[network] provision unset")
