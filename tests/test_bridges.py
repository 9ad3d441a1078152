"""The bridge rename at `migrate begin` (issue 14, item 1): the table, P, and the hook around it."""

from __future__ import annotations

import os

import pytest

from kvmhook.net import bridges

UUID = "7f3d2a9e-0000-4000-8000-000000000014"


def domain(*interfaces: str) -> bytes:
    return (
        f"<domain type='kvm'><name>vm1</name><uuid>{UUID}</uuid><devices>"
        + "".join(interfaces)
        + "</devices></domain>\n"
    ).encode()


def bridge(name: str, kind: str = "bridge", quote: str = "'") -> str:
    return (
        f"<interface type={quote}{kind}{quote}><mac address='52:54:00:00:00:01'/>"
        f"<source bridge={quote}{name}{quote}/><model type='virtio'/></interface>"
    )


def net_tree(root, devices: dict[str, list[str] | None]) -> None:
    """<root>/sys/class/net as sysfs has it: a directory per device; a bridge (ports listed)
    has `bridge/` and `brif/<port>`."""
    for name, ports in devices.items():
        device = root / "sys/class/net" / name
        device.mkdir(parents=True)
        if ports is not None:
            (device / "bridge").mkdir()
            (device / "brif").mkdir()
            for port in ports:
                (device / "brif" / port).mkdir()


def agent(root, text: str) -> None:
    path = root / "etc/cloudstack/agent/agent.properties"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.fixture
def here(tmp_path, monkeypatch):
    """A host whose NIC is enp2s0, enslaved in cloudbr0, the guest network device."""
    monkeypatch.setenv("KVMHOOK_ROOT", str(tmp_path))
    net_tree(tmp_path, {"lo": None, "enp2s0": None, "cloudbr0": ["enp2s0", "vnet0", "vif1.0"]})
    agent(tmp_path, "guest.network.device=cloudbr0\n")
    return tmp_path


def present(*names: str):
    return lambda name: name in names


@pytest.mark.parametrize(
    ("name", "vlan"),
    [
        ("cloudVirBr100", "100"),  # old style: always renamed
        ("brenp1s0-100", "100"),  # no device enp1s0 here
        ("brenp2s0-100", None),  # device enp2s0 here: kept
        ("brvx-5000", None),  # VXLAN: never
        ("cloudbr0", None),  # any other name
        ("virbr0", None),
        ("brenp1s0-100x", None),  # the whole name must match
        ("brenp1s0.5-100", None),  # a dot is no \w
        ("brenp1s0-", None),
        ("br-100", None),
    ],
)
def test_every_row_of_the_table(name, vlan):
    """Each row of the issue's table: cloudVirBr<V> renamed, br<D>-<V> renamed only without
    a device D here, brvx- and every other name kept."""
    assert bridges.vlan_to_rename(name, present("enp2s0", "cloudbr0")) == vlan


def test_names_at_the_15_character_limit():
    """A 15-character name (Linux's limit) is matched whole: kept or renamed by its D."""
    assert len("brenp129s0f1-99") == 15
    assert bridges.vlan_to_rename("brenp129s0f1-99", present("enp129s0f1")) is None
    assert bridges.vlan_to_rename("brenp129s0f1-99", present()) == "99"
    assert bridges.vlan_to_rename("cloudVirBr40950", present()) == "40950"


def test_several_interfaces_renamed_in_place_every_other_byte_kept(here):
    """Several interfaces: each renamed bridge gets br<P>-<V>, in both quote styles; the
    others, a type='network' interface and one without source keep every byte."""
    kept = [
        bridge("brenp2s0-7"),
        bridge("brvx-5000"),
        "<interface type='network'><source network='default' bridge='virbr0'/></interface>",
        "<interface type='user'><model type='virtio'/></interface>",
    ]
    xml = domain(
        bridge("brenp1s0-100"), bridge("cloudVirBr200", quote='"'), bridge("brenp1s0-100"), *kept
    )
    said: list[str] = []
    result = bridges.for_destination(xml, said.append)
    assert result == domain(
        bridge("brenp2s0-100"), bridge("brenp2s0-200", quote='"'), bridge("brenp2s0-100"), *kept
    )
    assert said == [
        "network: bridge brenp1s0-100 renamed brenp2s0-100 "
        "(guest.network.device=cloudbr0, its port: enp2s0)",
        "network: bridge cloudVirBr200 renamed brenp2s0-200 "
        "(guest.network.device=cloudbr0, its port: enp2s0)",
    ]


def test_type_network_with_a_new_style_bridge_follows_the_table(here):
    """The table is about `<source bridge=B>` whatever the interface type."""
    xml = domain(bridge("brenp1s0-100", kind="network"))
    assert bridges.for_destination(xml, print) == domain(bridge("brenp2s0-100", kind="network"))


def test_no_candidate_name_means_no_parse(here):
    """XML without cloudVirBr or bridge='br… comes back as the same object, not even parsed
    (it is not XML here, and nothing is said)."""
    xml = b"<not xml at all: virbr0 cloudbr0"
    said: list[str] = []
    assert bridges.for_destination(xml, said.append) is xml
    assert said == []


@pytest.mark.parametrize(
    ("xml", "parsed"),
    [
        (b"<x><source bridge='brvx-5000'/><source bridge=\"brvx-6000\"/>", False),
        (b"<x><source bridge='brvx-5000'/><source bridge='brenp1s0-100'/>", True),
        (b"<x><source bridge='brvx-5000'/>cloudVirBr", True),
        (b"<x><source bridge='brv'/>", True),
    ],
)
def test_vxlan_bridges_alone_need_no_parse(xml, parsed):
    """brvx- bridges are never renamed: a VXLAN guest's migration pays no parse either."""
    assert bridges.may_rename(xml) is parsed


def test_the_bridges_vlan_suffix_is_cut(here):
    """P is the bridge's non-tap port with its .<vlan> suffix cut (cloudbr1 over bond0.20)."""
    net_tree(here, {"bond0.20": None, "cloudbr1": ["vnet3", "bond0.20"]})
    agent(here, "# agent\nguest.network.device = cloudbr1\n")
    assert bridges.physical_device() == ("bond0", "guest.network.device=cloudbr1, its port")


def test_a_device_that_is_no_bridge_is_p_itself(here):
    """guest.network.device naming a NIC: P is that NIC."""
    agent(here, "guest.network.device=enp2s0\n")
    assert bridges.physical_device() == ("enp2s0", "guest.network.device=enp2s0")


@pytest.mark.parametrize(
    ("properties", "words"),
    [
        (None, "agent.properties does not exist"),
        ("keystore.passphrase=x\n", "agent.properties sets no guest.network.device"),
        ("guest.network.device=\n", "agent.properties sets no guest.network.device"),
        ("guest.network.device=cloudbr9\n", "guest.network.device=cloudbr9: no such device in "),
        ("guest.network.device=tapsonly\n", "bridge guest.network.device=tapsonly has no port"),
    ],
)
def test_p_not_found_is_said_and_the_xml_kept(here, properties, words):
    """Without P: one line saying why, naming the bridges, never the XML; the XML unchanged."""
    net_tree(here, {"tapsonly": ["vnet0", "vif2.0"]})
    path = here / "etc/cloudstack/agent/agent.properties"
    path.unlink()
    if properties is not None:
        agent(here, properties)
    xml = domain(bridge("brenp1s0-100"))
    said: list[str] = []
    assert bridges.for_destination(xml, said.append) is xml
    assert len(said) == 1 and said[0].startswith("network: bridges brenp1s0-100 not renamed: ")
    assert words in said[0] and UUID not in said[0]


def test_nothing_to_rename_needs_no_p(tmp_path, monkeypatch):
    """Every bridge kept (its D exists): P is never looked for, so no properties file is fine."""
    monkeypatch.setenv("KVMHOOK_ROOT", str(tmp_path))
    net_tree(tmp_path, {"enp1s0": None})
    xml = domain(bridge("brenp1s0-100"))
    said: list[str] = []
    assert bridges.for_destination(xml, said.append) is xml
    assert said == []


def test_xml_that_does_not_parse_is_kept_and_said(here):
    """A candidate name in XML that does not parse: kept, with the parser's reason."""
    xml = b"<domain><source bridge='brenp1s0-100'>"
    said: list[str] = []
    assert bridges.for_destination(xml, said.append) is xml
    assert said[0].startswith("network: bridges not renamed: the domain XML does not parse")


# The hook itself, as libvirtd runs it on the destination at `migrate begin`.


@pytest.fixture
def dest(host):
    """A sandbox host whose NIC is enp2s0 in cloudbr0, guest.network.device=cloudbr0."""
    net_tree(host.root, {"enp2s0": None, "cloudbr0": ["vnet0", "enp2s0"]})
    agent(host.root, "guest.network.device=cloudbr0\n")
    return host


ARRIVING = domain(bridge("brenp1s0-100"), bridge("brvx-5000"))
RENAMED = domain(bridge("brenp2s0-100"), bridge("brvx-5000"))


def migrate_begin(host, xml: bytes = ARRIVING):
    return host.hook("vm1", "migrate", "begin", "-", xml=xml, env=host.env(TMPDIR=str(host.root)))


def logged(host) -> str:
    text = "\n".join(host.records())
    assert UUID not in text and "<domain" not in text  # never the XML
    return text


def test_the_hook_prints_the_renamed_xml_without_any_script(dest):
    """No custom script at all: libvirt still gets the renamed XML, and the log says why."""
    result = migrate_begin(dest)
    assert (result.returncode, result.stdout, result.stderr) == (0, RENAMED, b"")
    text = logged(dest)
    assert "network: bridge brenp1s0-100 renamed brenp2s0-100" in text
    assert f"xml: new domain XML ({len(RENAMED)} bytes) printed for libvirt" in text


def test_scripts_get_the_renamed_xml_and_may_rewrite_further(dest):
    """migrate_ scripts read the renamed XML on stdin; a rewrite of theirs is what libvirt gets."""
    further = RENAMED.replace(b"</devices>", b"<memballoon model='none'/></devices>")
    (dest.root / "further.xml").write_bytes(further)
    dest.script(
        "migrate_10",
        f'cat > "{dest.root}/got.xml"\ncat "{dest.root}/further.xml" > "$KVMHOOK_XML_OUT"\n',
    )
    result = migrate_begin(dest)
    assert (result.returncode, result.stdout) == (0, further)
    assert (dest.root / "got.xml").read_bytes() == RENAMED
    logged(dest)


def test_a_script_that_puts_the_original_back_leaves_stdout_empty(dest):
    """Stdout carries XML only when the final XML differs from what libvirt passed."""
    (dest.root / "original.xml").write_bytes(ARRIVING)
    dest.script("migrate_10", f'cat "{dest.root}/original.xml" > "$KVMHOOK_XML_OUT"\n')
    result = migrate_begin(dest)
    assert (result.returncode, result.stdout) == (0, b"")


def test_nothing_to_rename_leaves_stdout_empty(dest):
    """A bridge whose device exists here, and XML without candidate names: stdout empty."""
    for xml in (domain(bridge("brenp2s0-100")), domain(bridge("cloudbr0"))):
        result = migrate_begin(dest, xml)
        assert (result.returncode, result.stdout) == (0, b"")
    assert "network:" not in logged(dest)


def test_p_not_found_logged_xml_unchanged_exit_0(host):
    """No agent.properties: the reason is logged, libvirt gets nothing new, the hook exits 0."""
    result = migrate_begin(host)
    assert (result.returncode, result.stdout, result.stderr) == (0, b"", b"")
    assert "network: bridges brenp1s0-100 not renamed: " in logged(host)


@pytest.mark.parametrize("value", ["no", "false", "off", "0"])
def test_rename_bridges_no_turns_it_off(dest, value):
    """`[network] rename_bridges = no` (any of configparser's false words): no rename."""
    conf = dest.root / "etc/kvmhook/kvmhook.conf"
    conf.parent.mkdir(parents=True)
    conf.write_text(f"[network]\nrename_bridges = {value}\n")
    result = migrate_begin(dest)
    assert (result.returncode, result.stdout) == (0, b"")
    assert "network:" not in logged(dest)


def test_a_bad_rename_bridges_value_is_said_and_the_rename_runs(dest):
    """A value that is no boolean never breaks a migration: said in the log, the default on."""
    conf = dest.root / "etc/kvmhook/kvmhook.conf"
    conf.parent.mkdir(parents=True)
    conf.write_text("[network]\nrename_bridges = maybe\n")
    result = migrate_begin(dest)
    assert (result.returncode, result.stdout) == (0, RENAMED)
    assert "[network] rename_bridges = yes applies" in logged(dest)


def interface(mac: str, name: str) -> str:
    return f"<interface type='bridge'><mac address='{mac}'/><source bridge='{name}'/></interface>"


def test_the_persistent_definition_takes_the_live_bridges_by_mac():
    """After PERSIST_DEST, each persistent interface gets the bridge of the live interface with
    its MAC; one without a live twin, or already on the live bridge, is kept."""
    a, b, c = "52:54:00:00:00:0a", "52:54:00:00:00:0b", "52:54:00:00:00:0c"
    live = domain(interface(a, "brenp2s0-100"), interface(b.upper(), "cloudbr0"))
    persistent = domain(
        interface(a, "brenp1s0-100"), interface(b, "cloudbr0"), interface(c, "brenp1s0-7")
    )
    assert bridges.with_live_bridges(persistent, live) == domain(
        interface(a, "brenp2s0-100"), interface(b, "cloudbr0"), interface(c, "brenp1s0-7")
    )
    assert bridges.with_live_bridges(live, live) is None


# `kvmhook hooks run` runs the chain "as the hook would": the same rename, by the same function.


def hooks_run(host, xml: bytes = ARRIVING):
    from sandbox import cli_runner

    from kvmhook.cli import main

    (host.root / "arriving.xml").write_bytes(xml)
    env = {"KVMHOOK_ROOT": str(host.root), "KVMHOOK_CUSTOM_DIR": None, "TMPDIR": str(host.root)}
    env.update({"KVMHOOK_LOG_FILE": None, "KVMHOOK_TIMEOUT": None})
    args = [
        "hooks",
        "run",
        "vm1",
        "migrate",
        "begin",
        "-",
        "--xml",
        str(host.root / "arriving.xml"),
    ]
    return cli_runner().invoke(main, args, env=env, catch_exceptions=False)


def test_hooks_run_prints_the_renamed_xml_without_any_script(dest):
    """No script: stdout holds the renamed XML, as the hook's does, and the log says why."""
    result = hooks_run(dest)
    assert (result.exit_code, result.stdout_bytes) == (0, RENAMED)
    assert "network: bridge brenp1s0-100 renamed brenp2s0-100" in logged(dest)


def test_hooks_run_gives_migrate_scripts_the_renamed_xml(dest):
    """migrate_ scripts read the renamed XML; unchanged by them, it is still what is printed."""
    dest.script("migrate_10", f'cat > "{dest.root}/got.xml"\n')
    result = hooks_run(dest)
    assert (result.exit_code, result.stdout_bytes) == (0, RENAMED)
    assert (dest.root / "got.xml").read_bytes() == RENAMED


def test_hooks_run_renames_nothing_when_kvmhook_conf_says_no(dest):
    """`[network] rename_bridges = no` holds for `hooks run` too: scripts get what was given."""
    conf = dest.root / "etc/kvmhook/kvmhook.conf"
    conf.parent.mkdir(parents=True)
    conf.write_text("[network]\nrename_bridges = no\n")
    dest.script("migrate_10", f'cat > "{dest.root}/got.xml"\n')
    result = hooks_run(dest)
    assert (result.exit_code, result.stdout_bytes) == (0, b"")
    assert (dest.root / "got.xml").read_bytes() == ARRIVING
    assert "network:" not in logged(dest)


def test_a_fifo_as_agent_properties_never_holds_the_migration(dest):
    """agent.properties replaced by a FIFO: the hook refuses it at once, logs why, XML unchanged."""
    properties = dest.root / "etc/cloudstack/agent/agent.properties"
    properties.unlink()
    os.mkfifo(properties)
    result = migrate_begin(dest)  # sandbox.Host.hook's timeout fails the test if it blocks
    assert (result.returncode, result.stdout) == (0, b"")
    assert "not a regular file" in logged(dest)


def test_a_port_name_that_is_no_plain_interface_name_is_never_put_in_the_xml(tmp_path, monkeypatch):
    """P from sysfs goes into the XML unescaped: a name with a quote in it is refused, not used."""
    monkeypatch.setenv("KVMHOOK_ROOT", str(tmp_path))
    net_tree(tmp_path, {"cloudbr0": ["e'x"]})
    agent(tmp_path, "guest.network.device=cloudbr0\n")
    with pytest.raises(bridges.NoPhysicalDevice, match="not a plain interface name"):
        bridges.physical_device()
