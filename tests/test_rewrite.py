"""The XML rewrite chain of migrate and restore ($KVMHOOK_XML_OUT), in the real hook process."""

from __future__ import annotations

import pytest

UUID = "7f3d2a9e-0000-4000-8000-000000000001"
ORIGINAL = (
    f"<domain type='qemu'><name>vm1</name><uuid>{UUID}</uuid>"
    "<description>old</description></domain>\n"
).encode()


def rewritten(description: str, name: str = "vm1", uuid: str = UUID) -> bytes:
    return (
        f"<domain type='qemu'><name>{name}</name><uuid>{uuid}</uuid>"
        f"<description>{description}</description></domain>\n"
    ).encode()


def writer(host, name: str, data: bytes, then: str = "exit 0\n") -> None:
    """A script that saves the XML it got to <root>/<name>.in and writes `data` as the new XML."""
    source = host.root / f"{name}.data"
    source.write_bytes(data)
    host.script(name, f'cat > "{host.root}/{name}.in"\ncat "{source}" > "$KVMHOOK_XML_OUT"\n{then}')


def reader(host, name: str) -> None:
    host.script(name, f'cat > "{host.root}/{name}.in"\n')


def got(host, name: str) -> bytes:
    return (host.root / f"{name}.in").read_bytes()


def hook(host, operation: str = "migrate", xml: bytes = ORIGINAL, **env: str):
    env.setdefault("TMPDIR", str(host.root))
    return host.hook("vm1", operation, "begin", "-", xml=xml, env=host.env(**env))


def xml_records(host) -> list[str]:
    return [r.split(" script=", 1)[1] for r in host.records() if " xml: " in r or "abort:" in r]


@pytest.mark.parametrize("operation", ["migrate", "restore"])
def test_each_script_gets_the_previous_rewrite_and_libvirt_the_last(host, operation):
    """all_10 rewrites, all_20 reads the rewrite and rewrites again, all_30 reads that; the hook
    prints the last rewrite on stdout, exactly, and exits 0."""
    writer(host, "all_10a", rewritten("first"))
    writer(host, "all_20b", rewritten("second"))
    reader(host, "all_30c")
    result = hook(host, operation)
    assert (result.returncode, result.stdout, result.stderr) == (0, rewritten("second"), b"")
    assert (got(host, "all_10a"), got(host, "all_20b"), got(host, "all_30c")) == (
        ORIGINAL,
        rewritten("first"),
        rewritten("second"),
    )
    assert xml_records(host) == [
        f"all_10a xml: rewritten ({len(rewritten('first'))} bytes); later scripts get it on stdin",
        f"all_20b xml: rewritten ({len(rewritten('second'))} bytes); later scripts get it on stdin",
        f"- xml: new domain XML ({len(rewritten('second'))} bytes) printed for libvirt",
    ]


def test_no_rewrite_or_the_same_xml_prints_nothing(host):
    """Scripts that only read, print on their stdout or write back the same bytes: stdout stays
    empty (libvirt keeps its XML)."""
    host.script("all_10talk", "echo '<domain>not for libvirt</domain>'\n")
    writer(host, "all_20same", ORIGINAL)
    result = hook(host)
    assert (result.returncode, result.stdout) == (0, b"")


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"<domain><name>vm1</name>", "not well-formed XML (no element found: line 1, column 24)"),
        (b"", "not well-formed XML (no element found: line 1, column 0)"),
        (
            f"<network><name>vm1</name><uuid>{UUID}</uuid></network>".encode(),
            "the root element is <network>, not <domain>",
        ),
        (rewritten("x", name="vm2"), "<name> changed from 'vm1' to 'vm2'"),
        (
            rewritten("x", uuid="7f3d2a9e-0000-4000-8000-000000000002"),
            "<uuid> changed from '7f3d2a9e000040008000000000000001'"
            " to '7f3d2a9e000040008000000000000002'",
        ),
    ],
    ids=["truncated", "empty", "not a domain", "renamed", "new uuid"],
)
def test_a_bad_rewrite_is_logged_and_discarded(host, data, reason):
    """A bad rewrite never reaches the next script or libvirt; an earlier good one stands."""
    writer(host, "all_10good", rewritten("good"))
    writer(host, "all_20bad", data)
    reader(host, "all_30c")
    result = hook(host)
    assert (result.returncode, result.stdout) == (0, rewritten("good"))
    assert got(host, "all_30c") == rewritten("good")
    assert f"all_20bad xml: rewrite discarded: {reason}" in xml_records(host)


def test_same_uuid_written_differently_is_the_same_guest(host):
    """libvirt compares uuids as numbers: upper case or without dashes is still vm1."""
    writer(host, "all_10a", rewritten("new", uuid=UUID.upper().replace("-", "")))
    assert hook(host).stdout == rewritten("new", uuid=UUID.upper().replace("-", ""))


def test_a_rewrite_from_a_failed_script_is_discarded(host):
    writer(host, "all_10a", rewritten("from a failure"), then="exit 1\n")
    reader(host, "all_20b")
    result = hook(host)
    assert (result.returncode, result.stdout) == (0, b"")
    assert got(host, "all_20b") == ORIGINAL
    size = len(rewritten("from a failure"))
    assert xml_records(host) == [
        f"all_10a xml: rewrite of {size} bytes discarded: the script failed"
    ]


def test_under_abort_a_bad_rewrite_vetoes_and_nothing_is_printed(host):
    """With on_failure = abort a bad rewrite fails its script: exit 1, reason on stderr, and the
    good rewrite before it is not printed either."""
    conf = host.root / "etc/kvmhook/kvmhook.conf"
    conf.parent.mkdir(parents=True)
    conf.write_text("[hooks]\non_failure = abort\n")
    writer(host, "all_10good", rewritten("good"))
    writer(host, "all_20bad", rewritten("x", name="other"))
    reader(host, "all_30c")
    result = hook(host, "restore")
    assert (result.returncode, result.stdout) == (1, b"")
    assert result.stderr.decode().splitlines() == [
        "kvmhook: restore of guest vm1 aborted: custom script all_20bad: wrote a bad domain XML: "
        "<name> changed from 'vm1' to 'other'"
    ]
    assert not (host.root / "all_30c.in").exists()


def test_the_variable_is_set_only_for_migrate_and_restore(host):
    host.script("all_env", f'echo "$2=${{KVMHOOK_XML_OUT-unset}}" >> "{host.root}/env"\n')
    for operation in ("prepare", "start", "migrate", "restore", "stopped"):
        assert hook(host, operation).stdout == b""
    lines = dict(line.split("=", 1) for line in (host.root / "env").read_text().splitlines())
    assert {op: value != "unset" for op, value in lines.items()} == {
        "prepare": False,
        "start": False,
        "migrate": True,
        "restore": True,
        "stopped": False,
    }
    assert lines["migrate"].startswith(f"{host.root}/kvmhook-xml-")


def test_write_beside_and_rename_works_and_nothing_is_left_behind(host):
    """The file is in a private directory (mode 0700) the hook removes, with whatever a script
    left in it; each script starts without the file."""
    source = host.root / "new.xml"
    source.write_bytes(rewritten("renamed in"))
    host.script(
        "all_10mv",
        f'd=$(dirname "$KVMHOOK_XML_OUT"); stat -c %a "$d" > "{host.root}/mode"\n'
        f'cp "{source}" "$d/tmp.xml"; mv "$d/tmp.xml" "$KVMHOOK_XML_OUT"; touch "$d/litter"\n',
    )
    host.script("all_20check", f'test -e "$KVMHOOK_XML_OUT" && echo present > "{host.root}/seen"\n')
    result = hook(host)
    assert result.stdout == rewritten("renamed in")
    assert (host.root / "mode").read_text().strip() == "700"
    assert not (host.root / "seen").exists()
    assert not list(host.root.glob("kvmhook-xml-*"))
