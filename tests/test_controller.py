"""The controller client against the loopback stand-in for a management server.

Every request goes over real HTTP(S) to tests/fakecontroller.py on
127.0.0.1, signed by `cs` and checked by the stand-in's own code.
"""

from __future__ import annotations

import random
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import testca
from fakecontroller import BAD_SIGNATURE, FakeController, signature
from urllib3.exceptions import InsecureRequestWarning

from kvmhook.errors import ControllerError, ControllerUnreachable
from kvmhook.host import controller
from kvmhook.hostname import fqdn

HOST = "kvm1.example.org"
CONF = "etc/kvmhook/controller.conf"


@pytest.fixture
def root(tmp_path: Path, monkeypatch) -> Path:
    """A sandbox root holding /etc/kvmhook."""
    root = tmp_path / "root"
    (root / "etc/kvmhook").mkdir(parents=True)
    monkeypatch.setenv("KVMHOOK_ROOT", str(root))
    return root


@pytest.fixture
def in_order(monkeypatch) -> list[list[str]]:
    """Endpoints are tried in the order written; the lists the client shuffled are recorded."""
    shuffled: list[list[str]] = []
    monkeypatch.setattr(random, "shuffle", lambda items: shuffled.append(list(items)))
    return shuffled


@pytest.fixture
def fake():
    """A running stand-in knowing HOST."""
    with FakeController() as server:
        server.add_host(HOST)
        yield server


def write_conf(root: Path, endpoints: list[str], mode: int = 0o600, **settings: str) -> Path:
    """controller.conf with these endpoints, the stand-in's key and secret, and `settings`."""
    values = {"api_key": "test-api-key", "secret": "test-secret", "host": HOST, **settings}
    lines = ["[controller]", f"endpoints = {', '.join(endpoints)}"]
    lines += [f"{key} = {value}" for key, value in values.items() if value is not None]
    path = root / CONF
    path.write_text("\n".join(lines) + "\n")
    path.chmod(mode)
    return path


def closed_port_url() -> str:
    """An API URL on 127.0.0.1 where nothing listens."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/client/api"


def connect(root: Path, endpoints: list[str], **settings: str) -> controller.Controller:
    write_conf(root, endpoints, **settings)
    client = controller.load()
    assert client is not None
    return client


def test_stand_in_signs_as_the_reference_example():
    """The stand-in's signature check computes the developer guide's worked example."""
    api_key = (
        "plgWJfZK4gyS3mOMTVmjUVg-X-jlWlnfaUJ9GAbBbf9EdM-kAYMmAiLqzzq1ElZLYq_u38zCm0bewzGUdP66mg"
    )
    params = {"apiKey": api_key, "command": "listUsers", "response": "json"}
    secret = (
        "VDaACYb0LV9eNjTetIOElcVQkvJck_J_QljX_FcHRj87ZKiy0z0ty0ZsYBkoXkY9b7eq1EhwJaw7FF3akA3KBQ"
    )
    assert signature(params, secret) == "TTpdDq/7j/J58XCRHomKoQXEQds="


def test_no_config_means_standalone(root):
    """Without controller.conf, load() returns None."""
    assert controller.load() is None


def test_host_by_name(root, fake):
    """host() finds this host by its configured name and returns the controller's record."""
    fake.add_host("kvm2.example.org")
    found = connect(root, [fake.url]).host()
    assert (found["name"], found["resourcestate"], found["clusterid"]) == (
        HOST,
        "Enabled",
        fake.cluster["id"],
    )


def test_host_by_id(root, fake):
    """A UUID in host = is looked up as the host's id."""
    other = fake.add_host("kvm2.example.org")
    assert connect(root, [fake.url], host=other["id"]).host()["name"] == "kvm2.example.org"


def test_host_defaults_to_fqdn(root, fake):
    """Without host =, the client names this host by its FQDN."""
    assert connect(root, [fake.url], host=None).host_name == fqdn()


def test_unknown_host(root, fake):
    """A host the controller does not know is a ControllerError naming it."""
    with pytest.raises(ControllerError, match=r"no KVM host with name 'kvm9\.example\.org'"):
        connect(root, [fake.url], host="kvm9.example.org").host()


def test_ambiguous_host(root, fake):
    """Two hosts of the same name (two zones) are refused: the id must be set."""
    fake.add_host(HOST, cluster=fake.add_cluster("cluster2"))
    with pytest.raises(ControllerError, match="2 KVM hosts named"):
        connect(root, [fake.url]).host()


def test_enter_wait_cancel(root, fake):
    """Prepare gives PrepareForMaintenance, polling sees Maintenance, cancel enables the host."""
    client = connect(root, [fake.url])
    assert client.prepare_maintenance(timeout=10)["resourcestate"] == "PrepareForMaintenance"
    states = [client.resource_state() for _ in range(fake.drain_polls)]
    assert states == ["PrepareForMaintenance"] * (fake.drain_polls - 1) + ["Maintenance"]
    assert client.cancel_maintenance(timeout=10)["resourcestate"] == "Enabled"
    assert client.resource_state() == "Enabled"
    assert fake.commands.count("queryAsyncJobResult") == 2 * fake.job_polls


def test_drain_failure_then_cancel(root, fake):
    """A drain that fails shows ErrorInPrepareForMaintenance, and cancel enables the host again."""
    fake.fail_drain = True
    fake.drain_polls = 1
    client = connect(root, [fake.url])
    client.prepare_maintenance(timeout=10)
    assert client.resource_state() == "ErrorInPrepareForMaintenance"
    assert client.cancel_maintenance(timeout=10)["resourcestate"] == "Enabled"


def test_failed_job_gives_the_servers_reason(root, fake):
    """A job the controller fails (cancel while Enabled) is a ControllerError with its text."""
    refused = r"resource state Enabled: cancelHostMaintenance is not allowed \(error 530\)"
    with pytest.raises(ControllerError, match=refused):
        connect(root, [fake.url]).cancel_maintenance(timeout=10)


def test_async_timeout(root, fake):
    """A job still pending at the deadline is a ControllerError, raised on time."""
    fake.job_polls = 10**6
    client = connect(root, [fake.url])
    started = time.monotonic()
    with pytest.raises(ControllerError, match=r"has not finished after 0\.5 s"):
        client.prepare_maintenance(timeout=0.5)
    assert 0.5 <= time.monotonic() - started < 2


def test_overcommit_ratios(root, fake):
    """The ratios come from this host's cluster in listClusters, strings turned into floats."""
    other = fake.add_cluster("cluster2", cpu="4.0", memory="3.0")
    fake.add_host("kvm2.example.org", cluster=other)
    fake.cluster.update(cpuovercommitratio="2.0", memoryovercommitratio="1.5")
    assert connect(root, [fake.url]).overcommit_ratios() == (2.0, 1.5)


def test_capacity(root, fake):
    """listCapacity is asked for this host's zone, pod and cluster only."""
    mine = fake.add_capacity(fake.cluster, 0, 3 * 1024**3, 4 * 1024**3)
    fake.add_capacity(fake.add_cluster("cluster2"), 0, 1, 2)
    assert connect(root, [fake.url]).capacity() == [mine]


def test_failover_from_a_dead_endpoint(root, fake, in_order):
    """With the first endpoint's port closed, the call is answered by the second."""
    dead = closed_port_url()
    assert connect(root, [dead, fake.url]).host()["name"] == HOST
    assert in_order == [[dead, fake.url]]
    assert fake.commands == ["listHosts"]


def test_failover_past_an_unavailable_endpoint(root, fake, in_order):
    """An endpoint answering 503 without an API answer is passed over for the next."""
    with FakeController() as proxy:
        proxy.unavailable = True
        assert connect(root, [proxy.url, fake.url]).host()["name"] == HOST
        assert proxy.commands == ["listHosts"]


def test_failover_from_a_silent_endpoint(root, fake, in_order):
    """An endpoint that accepts but never answers is passed over after timeout seconds."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/client/api"
        started = time.monotonic()
        assert connect(root, [url, fake.url], timeout="1").host()["name"] == HOST
    assert 1 <= time.monotonic() - started < 3


def test_answering_endpoint_is_asked_first_next_time(root, fake, in_order):
    """After a failover, the next call goes straight to the endpoint that answered."""
    with FakeController() as proxy:
        proxy.unavailable = True
        client = connect(root, [proxy.url, fake.url])
        client.host()
        client.host()
        assert (proxy.commands, fake.commands) == (["listHosts"], ["listHosts", "listHosts"])


def test_all_endpoints_dead(root, in_order):
    """With no endpoint answering, ControllerUnreachable names each and why, without the API key."""
    dead = [closed_port_url(), closed_port_url()]
    with pytest.raises(ControllerUnreachable) as caught:
        connect(root, dead).host()
    message = str(caught.value)
    for url in dead:
        assert f"{url}: [Errno 111] Connection refused" in message
    assert "test-api-key" not in message


def test_bad_secret_is_refused_without_failover(root, fake, in_order):
    """A wrong secret gets the server's 401 message as ControllerError; no other server is tried."""
    with FakeController() as second:
        with pytest.raises(ControllerError) as caught:
            connect(root, [fake.url, second.url], secret="wrong-secret").host()
        assert second.commands == []
    assert not isinstance(caught.value, ControllerUnreachable)
    assert f"{BAD_SIGNATURE} (error 401)" in str(caught.value)


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620])
def test_secret_file_with_loose_mode_is_refused(root, fake, mode):
    """controller.conf holds the secret: any group or other access is refused, naming the file."""
    path = write_conf(root, [fake.url], mode=mode)
    loose = f"{re.escape(str(path))} has mode {mode:04o}.*chmod 600"
    with pytest.raises(ControllerError, match=loose):
        controller.load()


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("[other]\n", "no \\[controller\\] section"),
        ("[controller]\napi_key = k\nsecret = s\n", "endpoints = is missing"),
        ("[controller]\nendpoints = ftp://cs1/api\napi_key = k\nsecret = s\n", "not an http"),
        ("[controller]\nendpoints = http://cs1/api\nsecret = s\n", "api_key = is missing"),
        ("[controller]\nendpoints = http://cs1/api\napi_key = k\n", "secret = is missing"),
        (
            "[controller]\nendpoints = http://cs1/api\napi_key = k\nsecret = s\nverfy = x\n",
            "has 1 setting\\(s\\) other than endpoints, api_key, secret, host, verify, timeout",
        ),
        ("[controller]\nendpoints = http://cs1/api\napi_key=k\nsecret=s\ntimeout = 0\n", "timeout"),
        ("[controller]\nendpoints = https://cs1/api\napi_key = k\nsecret = s\n", "no CA file"),
        ("endpoints = http://cs1/api\n", "line 1: a setting before any \\[section\\]"),
    ],
)
def test_broken_config(root, text, problem):
    """A broken controller.conf is a ControllerError saying what is wrong."""
    path = root / CONF
    path.write_text(text)
    path.chmod(0o600)
    with pytest.raises(ControllerError, match=problem):
        controller.load()


def https_files(directory: Path) -> tuple[str, str]:
    """A certificate for 127.0.0.1 from the test root CA, and its key, written in `directory`."""
    ca = testca.shared().root
    key = testca.new_key()
    cert = ca.issue(key.public_key(), "127.0.0.1", sans=[testca.ip("127.0.0.1")])
    (directory / "server.crt").write_bytes(testca.pem(cert))
    (directory / "server.key").write_bytes(testca.key_pem(key))
    return str(directory / "server.crt"), str(directory / "server.key")


@pytest.fixture
def tls_files(tmp_path: Path) -> tuple[str, str]:
    """A certificate for 127.0.0.1 from the test root CA, and its key."""
    return https_files(tmp_path)


def install_agent_ca(root: Path, authority: testca.Authority) -> None:
    agent = root / "etc/cloudstack/agent"
    agent.mkdir(parents=True)
    (agent / "cloud.ca.crt").write_bytes(testca.pem(authority.cert))


def test_tls_verified_with_the_agents_ca_by_default(root, tls_files):
    """Over HTTPS, the controller's certificate is verified against the agent's cloud.ca.crt."""
    install_agent_ca(root, testca.shared().root)
    with FakeController(tls=tls_files) as server:
        server.add_host(HOST)
        assert connect(root, [server.url]).host()["name"] == HOST


def test_tls_refuses_a_certificate_from_another_ca(root, tls_files):
    """A certificate the agent's CA did not sign is refused; verify = false accepts it."""
    install_agent_ca(root, testca.shared().other)
    with FakeController(tls=tls_files) as server:
        server.add_host(HOST)
        with pytest.raises(ControllerUnreachable, match="CERTIFICATE_VERIFY_FAILED"):
            connect(root, [server.url]).host()
        with pytest.warns(InsecureRequestWarning):
            assert connect(root, [server.url], verify="false").host()["name"] == HOST


# controller.conf's errors never show its content: any line, name or value may be the secret.

SECRET = "SUPERSECRET-4f9a"
GOOD = "[controller]\nendpoints = http://cs1/api\napi_key = k\nsecret = s\n"


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (f"secret = {SECRET}\n{GOOD}", "line 1: a setting before any [section]"),
        (f"{GOOD}[controller]\nsecret = {SECRET}\n", "line 5: a section that appears twice"),
        (f"{GOOD}secret = {SECRET}\n", "line 5: a setting that appears twice in its section"),
        (
            f"{GOOD}{SECRET}\nhost = h\n{SECRET} too\n",
            "lines 5, 7: neither a [section] nor name = value",
        ),
        (f"{GOOD}timeout = {SECRET}\n", "timeout = is not a whole number of seconds"),
        (f"{GOOD}timeout = 99999999999999999999\n", "from 1 to 604800"),
        (f"{GOOD}timeout = ²\n", "from 1 to 604800"),  # isdigit() says yes, int() says no
        (f"{GOOD}{SECRET} = x\n", "has 1 setting(s) other than endpoints, api_key"),
        (
            "[controller]\napi_key = k\nsecret = s\nendpoints = http://cs1/api, " + SECRET + "\n",
            "endpoints = item 2 is not an http(s) URL",
        ),
        (
            "[controller]\nendpoints = https://cs1/api\napi_key = k\nsecret = s\n"
            f"verify = /{SECRET}\n",
            "no CA file named by verify = to verify the controller with",
        ),
    ],
    ids=[
        "no-section-header",
        "duplicate-section",
        "duplicate-option",
        "several-bad-lines",
        "bad-timeout",
        "huge-timeout",
        "unicode-digit-timeout",
        "unknown-setting",
        "bad-endpoint",
        "missing-ca",
    ],
)
def test_config_errors_name_file_and_line_never_content(root, text, problem):
    """Every kind of broken controller.conf: one line naming the file and where, no word of it."""
    path = root / CONF
    path.write_text(text)
    path.chmod(0o600)
    with pytest.raises(ControllerError) as caught:
        controller.load()
    message = str(caught.value)
    assert message.startswith(str(path)) and problem in message, message
    assert SECRET not in message and "\n" not in message


def test_config_not_utf8_shows_no_byte_of_it(root):
    """A controller.conf that is not UTF-8: named, without the codec's excerpt of the bytes."""
    path = root / CONF
    path.write_bytes(GOOD.encode() + b"secret = caf\xe9\n")
    path.chmod(0o600)
    with pytest.raises(ControllerError, match=f"^cannot read {re.escape(str(path))}: not UTF-8"):
        controller.load()


@pytest.mark.parametrize(
    ("args", "exit_code"),
    [(["maintenance", "status"], 1), (["capacity"], 0)],
    ids=["maintenance-status", "capacity"],
)
def test_commands_never_print_the_secret(root, args, exit_code):
    """The issue's file (secret = before [controller]): both commands name file and line only."""
    path = root / CONF
    path.write_text(f"secret = {SECRET}\n[controller]\nendpoints = http://cs1/api\n")
    path.chmod(0o600)
    result = subprocess.run(
        [str(Path(sys.executable).parent / "kvmhook"), *args, "--connect", "test:///default"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == exit_code, result.stderr
    assert SECRET not in result.stdout + result.stderr
    assert f"{path}, line 1: a setting before any [section]" in result.stderr
