"""Unit tests of discovery: naming, ordering and safety checks.

Discovery runs on a pyfakefs file system where that is enough, and on a real
temporary directory where byte-level names or many examples need one.
"""

from __future__ import annotations

import os
import stat
import tempfile

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sandbox import LEFTOVERS

from kvmhook.errors import CustomDirError
from kvmhook.hook import discovery

CUSTOM = "/custom"


@pytest.fixture
def custom(fs):
    """A safe, empty custom dir on a fake file system (root-owned, mode 0755 all the way up)."""
    os.chmod("/", 0o755)
    fs.create_dir(CUSTOM, perm_bits=0o755)
    return fs


def put(fs, name: str, mode: int = 0o755, kind: int = stat.S_IFREG) -> str:
    """Create a file in the fake custom dir with exactly `mode`."""
    path = f"{CUSTOM}/{name}"
    fs.create_file(path, st_mode=kind | mode)
    os.chmod(path, mode)
    return path


def names(found: list) -> list[str]:
    return [item.name for item in found]


def reasons(ignored: list) -> dict[str, tuple[str, bool]]:
    return {item.name: (item.reason, item.notable) for item in ignored}


# --- naming (rule 2) ---------------------------------------------------------


def test_discover_keeps_operation_and_all_prefixes_with_a_nonempty_rest(custom):
    """Only `start_<rest>` and `all_<rest>` with a non-empty rest qualify for start."""
    for name in (
        "start_a",
        "all_b",
        "start_",
        "all_",
        "startx",
        "foo_bar",
        "started_x",
        "stopped_y",
        "_x",
        "x",
        "Start_x",
        "ALL_x",
    ):
        put(custom, name)
    scripts, ignored = discovery.discover(CUSTOM, "start")
    assert names(scripts) == ["start_a", "all_b"]
    assert set(names(ignored)) == {
        "start_",
        "all_",
        "startx",
        "foo_bar",
        "started_x",
        "stopped_y",
        "_x",
        "x",
        "Start_x",
        "ALL_x",
    }


def test_discover_says_why_a_name_does_not_qualify(custom):
    """Other operations' scripts and foreign names are ignored, not notable, with a reason."""
    put(custom, "started_x")
    put(custom, "foo_bar")
    put(custom, "start_")
    _, ignored = discovery.discover(CUSTOM, "start")
    found = reasons(ignored)
    assert found["started_x"] == ("runs for started only", False)
    assert "name is not" in found["foo_bar"][0] and not found["foo_bar"][1]
    assert "name is not" in found["start_"][0] and not found["start_"][1]


@pytest.mark.parametrize("suffix", LEFTOVERS)
def test_discover_never_runs_leftovers(custom, suffix):
    """An editor or package-manager leftover never runs, even with a qualifying name."""
    put(custom, "all_a" + suffix)
    put(custom, "start_b" + suffix)
    put(custom, "all_keep")
    scripts, ignored = discovery.discover(CUSTOM, "start")
    assert names(scripts) == ["all_keep"]
    assert reasons(ignored)["all_a" + suffix] == ("editor or package-manager leftover", False)
    assert "start_b" + suffix in names(ignored)


def test_discover_runs_regular_files_and_symlinks_to_them_only(custom):
    """A link to a regular file runs; fifo, socket, broken link are notable; a dir is a guest's."""
    put(custom, "all_file")
    custom.create_file("/elsewhere/target", st_mode=stat.S_IFREG | 0o755)
    os.chmod("/elsewhere", 0o755)
    custom.create_symlink(f"{CUSTOM}/all_link", "/elsewhere/target")
    custom.create_dir(f"{CUSTOM}/all_dir", perm_bits=0o755)
    put(custom, "all_fifo", kind=stat.S_IFIFO)
    put(custom, "all_sock", kind=stat.S_IFSOCK)
    custom.create_symlink(f"{CUSTOM}/all_broken", "/nowhere")
    scripts, ignored = discovery.discover(CUSTOM, "start")
    assert names(scripts) == ["all_file", "all_link"]
    assert reasons(ignored) == {
        "all_dir": ("per-guest scripts of guest all_dir", False),
        "all_fifo": ("not a regular file", True),
        "all_sock": ("not a regular file", True),
        "all_broken": ("broken symbolic link", True),
    }


# --- executability and safety (rules 4 and 5) --------------------------------


@pytest.mark.parametrize("mode", [0o644, 0o600, 0o444])
def test_discover_ignores_non_executable_with_reason(custom, mode):
    """A qualifying file with no execute bit is notable and says `not executable (mode ...)`."""
    put(custom, "all_x", mode=mode)
    scripts, ignored = discovery.discover(CUSTOM, "start")
    assert scripts == []
    assert reasons(ignored)["all_x"] == (f"not executable (mode {mode:04o})", True)


@pytest.mark.parametrize("mode", [0o775, 0o757, 0o777, 0o2775])
def test_discover_refuses_script_writable_by_group_or_others(custom, mode):
    """A script others could change is refused, with the mode in the reason."""
    put(custom, "all_x", mode=mode)
    put(custom, "all_y", mode=0o755)
    scripts, ignored = discovery.discover(CUSTOM, "start")
    assert names(scripts) == ["all_y"]
    reason, notable = reasons(ignored)["all_x"]
    assert notable
    assert reason.startswith("refused: ")
    assert f"writable by group or others (mode {mode:04o})" in reason


def test_discover_refuses_script_owned_by_another_user(custom):
    """A script owned by a user other than root or us is refused, naming the uid."""
    path = put(custom, "all_x")
    os.chown(path, 65534, 65534)
    scripts, ignored = discovery.discover(CUSTOM, "start")
    assert scripts == []
    assert "owned by uid 65534" in reasons(ignored)["all_x"][0]


@pytest.mark.parametrize(
    ("where", "change", "words"),
    [
        (CUSTOM, lambda path: os.chmod(path, 0o777), "writable by group or others"),
        (CUSTOM, lambda path: os.chmod(path, 0o775), "writable by group or others"),
        (CUSTOM, lambda path: os.chmod(path, 0o1777), "writable by group or others"),
        (CUSTOM, lambda path: os.chown(path, 65534, 0), "owned by uid 65534"),
        ("/", lambda path: os.chmod(path, 0o757), "directory / is writable"),
    ],
)
def test_discover_refuses_unsafe_custom_dir(custom, where, change, words):
    """A custom dir (or a directory above it) others could change refuses everything."""
    put(custom, "all_x")
    change(where)
    with pytest.raises(CustomDirError, match="refused custom dir") as raised:
        discovery.discover(CUSTOM, "start")
    assert words in str(raised.value)


def test_discover_allows_root_sticky_directory_above(custom):
    """A root-owned sticky world-writable directory above the custom dir (like /tmp) is fine."""
    custom.create_dir("/tmp/hooks", perm_bits=0o755)
    os.chmod("/tmp", 0o1777)
    custom.create_file("/tmp/hooks/all_x", st_mode=stat.S_IFREG | 0o755)
    os.chmod("/tmp/hooks/all_x", 0o755)
    scripts, _ = discovery.discover("/tmp/hooks", "start")
    assert names(scripts) == ["all_x"]


def test_discover_missing_dir_raises_and_does_not_create_it(custom):
    """A missing custom dir raises CustomDirError and is not created."""
    with pytest.raises(CustomDirError, match="No such file or directory"):
        discovery.discover("/nope/custom", "start")
    assert not os.path.exists("/nope")


# --- order (rule 3) ----------------------------------------------------------


@pytest.mark.parametrize(
    ("files", "operation", "order"),
    [
        (["all_cde.sh", "migrate_abc.py"], "migrate", ["migrate_abc.py", "all_cde.sh"]),
        (["start_x", "all_x"], "start", ["all_x", "start_x"]),
        (["all_a", "all__x", "all_B"], "start", ["all_B", "all__x", "all_a"]),
        (["all_10", "all_9", "all_1"], "start", ["all_1", "all_10", "all_9"]),
        (["all_é", "all_z", "all_Z", "all_e"], "start", ["all_Z", "all_e", "all_z", "all_é"]),
        (["start_a_b", "all_a", "all_a_a"], "start", ["all_a", "all_a_a", "start_a_b"]),
    ],
)
def test_discover_orders_by_rest_bytes_then_full_name(custom, files, operation, order):
    """Scripts run ordered by the name after the prefix, as bytes, ties by the full name."""
    for name in reversed(files):
        put(custom, name)
    scripts, _ = discovery.discover(CUSTOM, operation)
    assert names(scripts) == order


def make_dir(names_: list[str]) -> tempfile.TemporaryDirectory:
    """A real temporary directory (mode 0700, under root-owned sticky /tmp) with executables."""
    directory = tempfile.TemporaryDirectory()
    for name in names_:
        path = os.path.join(directory.name, name)
        with open(path, "wb") as handle:
            handle.write(b"#!/bin/sh\n")
        os.chmod(path, 0o755)
    return directory


def test_discover_orders_by_bytes_not_by_code_points():
    """Order follows the names' bytes, not Python's code-point order of decoded names."""
    undecodable = os.fsdecode(b"all_\xff")  # U+DCFF after surrogateescape
    private = "all_\ue000"  # bytes EE 80 80: before FF, but code point E000 > DCFF
    assert sorted([undecodable, private]) == [undecodable, private]
    with make_dir([undecodable, private, "all_é"]) as directory:
        scripts, _ = discovery.discover(directory, "start")
    assert [os.fsencode(name) for name in names(scripts)] == [
        "all_é".encode(),
        "all_\ue000".encode(),
        b"all_\xff",
    ]


_prefixes = st.sampled_from(["all", "start", "started", "stopped", "", "x", "ALL"])
_texts = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="/\x00"),
    max_size=6,
)
_raw = st.binary(max_size=6).filter(lambda data: b"/" not in data and b"\x00" not in data)
_suffixes = st.sampled_from(["", "", "", "", *LEFTOVERS])
_text_names = st.builds(
    lambda prefix, sep, rest, suffix: prefix + sep + rest + suffix,
    _prefixes,
    st.sampled_from(["_", "_", ""]),
    _texts,
    _suffixes,
)
_byte_names = st.builds(
    lambda prefix, rest: os.fsdecode(prefix.encode() + b"_" + rest), _prefixes, _raw
)
_names = (_text_names | _byte_names).filter(
    lambda name: name not in ("", ".", "..") and len(os.fsencode(name)) <= 255
)


@settings(max_examples=60, deadline=None)
@given(st.lists(_names, max_size=12, unique=True))
def test_discover_order_property(listing):
    """For any directory, exactly the qualifying names run, sorted by (rest, name) bytes."""
    with make_dir(listing) as directory:
        scripts, ignored = discovery.discover(directory, "start")
    qualifying = [
        name
        for name in listing
        if name.partition("_")[0] in ("start", "all")
        and name.partition("_")[2]
        and not name.endswith(LEFTOVERS)
    ]
    expected = sorted(
        qualifying, key=lambda name: (os.fsencode(name.partition("_")[2]), os.fsencode(name))
    )
    assert names(scripts) == expected
    assert sorted(names(ignored)) == sorted(set(listing) - set(qualifying))
