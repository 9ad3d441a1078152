"""A stand-in for a CloudStack management server's API, served on 127.0.0.1 for the tests.

It is not a management server: it knows one API key, a few hosts, clusters
and capacity records set up by the test, and only what the controller
client (kvmhook.host.controller) asks. What it covers, after the API reference
and the management server's own code (ApiServer):

- commands: listHosts (by id, name, type), listClusters (by id), listCapacity
  (by zoneid, podid, clusterid), listConfigurations (by name, as a substring,
  and clusterid: the cluster's own value first), prepareHostForMaintenance,
  cancelHostMaintenance and issueCertificate with a CSR (async: a job id,
  then queryAsyncJobResult; the certificate from `ca`, a testca.Authority,
  with the CSR's subject and names, answered as CertificateResponse,
  `{"certificates": {"certificate": ..., "cacertificates": ...}}`). JSON
  shapes as the reference gives them: `{"listhostsresponse": {"count": 1,
  "host": [...]}}`, an empty list as `{}`, over-commit ratios as strings,
  `{"jobstatus": 0|1|2, "jobresultcode": ..., "jobresult": {"host": {...}}}`;
- request signing, checked as ApiServer.verifyRequest does, written here
  from scratch rather than with `cs` (the client's library): the parameters
  but `signature` sorted by name, each value URL-encoded as Java's
  URLEncoder does (space as %20), joined, the whole lower-cased, HMAC-SHA1
  with the secret, base64; with signatureVersion=3, `expires` must lie
  ahead. A bad signature, an unknown API key or a lapsed expiry is answered
  HTTP 401 with CloudStack's error, named after the command as the server
  names it: `{"listhostsresponse": {"uuidList": [], "errorcode": 401,
  "errortext": "unable to verify user credentials and/or request signature"}}`;
- maintenance: prepare moves an Enabled or Disabled host to
  PrepareForMaintenance when its job finishes (after `job_polls` queries);
  the `drain_polls`-th listHosts after that finds it in Maintenance, or in
  ErrorInPrepareForMaintenance with `fail_drain` (a guest that would not
  move). Cancel returns a host in any maintenance state to Enabled. A
  command from a state that does not allow it fails its job (jobstatus 2,
  error 530), as the server's do;
- `unavailable`: every request answered 503 with an HTML page, as a proxy
  in front of a stopped management server.

Not covered: XML, POST, login and sessions, paging, accounts and roles,
guests (the drain is a count of polls), and every other command (432).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import ssl
import threading
import uuid
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable
from urllib.parse import parse_qs, urlsplit

import testca

API_PATH = "/client/api"
EXPIRY_ALERT_PERIOD = "ca.framework.cert.expiry.alert.period"
BAD_SIGNATURE = "unable to verify user credentials and/or request signature"
MAINTENANCE_STATES = (
    "PrepareForMaintenance",
    "ErrorInPrepareForMaintenance",
    "Maintenance",
    "ErrorInMaintenance",
)
# Java's URLEncoder leaves these bytes as they are; ApiServer then turns "+" (space) into %20.
_JAVA_UNRESERVED = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-*_")
# ApiServer's DateFormatToUse, "yyyy-MM-dd'T'HH:mm:ssZ".
_EXPIRES_FORMAT = "%Y-%m-%dT%H:%M:%S%z"


def java_url_encode(value: str) -> str:
    """`value` as java.net.URLEncoder.encode(value, "UTF-8"), "+" replaced by %20."""
    return "".join(
        chr(byte) if byte in _JAVA_UNRESERVED else "%20" if byte == 0x20 else f"%{byte:02X}"
        for byte in value.encode("utf-8")
    )


def signature(params: dict[str, str], secret: str) -> str:
    """The signature the management server expects for these parameters (without `signature`)."""
    unsigned = "&".join(f"{name}={java_url_encode(params[name])}" for name in sorted(params))
    digest = hmac.new(secret.encode(), unsigned.lower().encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode()


class ApiError(Exception):
    """An error answer: HTTP status = CloudStack error code, and its text."""

    def __init__(self, code: int, text: str) -> None:
        super().__init__(text)
        self.code = code
        self.text = text


class Job:
    """An async job: done after `polls` queries (`finish` gives its answer), then the same
    answer every time."""

    def __init__(self, command: str, polls: int, finish: Callable[[], dict]) -> None:
        self.id = str(uuid.uuid4())
        self.command = command
        self.polls = polls
        self.finish = finish
        self.answer: dict | None = None


class FakeController:
    """The stand-in server; `with FakeController() as fake:` serves on fake.url."""

    def __init__(
        self,
        api_key: str = "test-api-key",
        secret: str = "test-secret",
        tls: tuple[str, str] | None = None,
    ) -> None:
        self.api_key = api_key
        self.secret = secret
        self.job_polls = 2
        self.drain_polls = 2
        self.fail_drain = False
        self.unavailable = False
        self.commands: list[str] = []  # every request's command, refused ones too
        self.hosts: list[dict] = []
        self.clusters: list[dict] = []
        self.capacities: list[dict] = []
        self.jobs: dict[str, Job] = {}
        # issueCertificate's CA (a testca.Authority); None: the job fails, as with no provider.
        self.ca = None
        self.certificate_days = 365
        self.csrs: list[str] = []  # every CSR issueCertificate received
        # listConfigurations: global values, and per (cluster id, name) values.
        self.configurations: dict[str, str] = {EXPIRY_ALERT_PERIOD: "15"}
        self.cluster_configurations: dict[tuple[str, str], str] = {}
        self._drains: dict[str, int] = {}  # host id → listHosts left before the drain ends
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.daemon_threads = True
        self._server.fake = self
        scheme = "http"
        if tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls)
            self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
            scheme = "https"
        self.url = f"{scheme}://127.0.0.1:{self._server.server_address[1]}{API_PATH}"
        # A short poll interval: shutdown() waits for it, once per test.
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self.cluster = self.add_cluster("cluster1")

    def __enter__(self) -> FakeController:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def add_cluster(self, name: str, cpu: str = "1.0", memory: str = "1.0") -> dict:
        """A KVM cluster, in a zone and pod of its own, with these over-commit ratios."""
        cluster = {
            "id": str(uuid.uuid4()),
            "name": name,
            "zoneid": str(uuid.uuid4()),
            "zonename": f"{name}-zone",
            "podid": str(uuid.uuid4()),
            "podname": f"{name}-pod",
            "hypervisortype": "KVM",
            "clustertype": "CloudManaged",
            "allocationstate": "Enabled",
            "managedstate": "Managed",
            "cpuovercommitratio": cpu,
            "memoryovercommitratio": memory,
        }
        self.clusters.append(cluster)
        return cluster

    def add_host(self, name: str, cluster: dict | None = None, **fields: object) -> dict:
        """A KVM host (type Routing, Up, Enabled) in `cluster` (default the first)."""
        cluster = cluster or self.cluster
        host = {
            "id": str(uuid.uuid4()),
            "name": name,
            "type": "Routing",
            "hypervisor": "KVM",
            "state": "Up",
            "resourcestate": "Enabled",
            "ipaddress": "192.0.2.10",
            "zoneid": cluster["zoneid"],
            "zonename": cluster["zonename"],
            "podid": cluster["podid"],
            "podname": cluster["podname"],
            "clusterid": cluster["id"],
            "clustername": cluster["name"],
            "clustertype": "CloudManaged",
            "cpunumber": 8,
            "cpuspeed": 2400,
            "memorytotal": 16 * 1024**3,
            **fields,
        }
        self.hosts.append(host)
        return host

    def add_capacity(self, cluster: dict, kind: int, used: int, total: int) -> dict:
        """A listCapacity record of `cluster` (kind 0: memory, 1: CPU, as in the reference)."""
        record = {
            "type": kind,
            "name": {0: "MEMORY", 1: "CPU"}.get(kind, "OTHER"),
            "zoneid": cluster["zoneid"],
            "zonename": cluster["zonename"],
            "podid": cluster["podid"],
            "podname": cluster["podname"],
            "clusterid": cluster["id"],
            "clustername": cluster["name"],
            "capacityused": used,
            "capacitytotal": total,
            "percentused": f"{100 * used / total:.2f}",
        }
        self.capacities.append(record)
        return record

    def answer(self, params: dict[str, str]) -> dict:
        """The answer to a verified request; ApiError for an error answer."""
        command = params.get("command", "")
        handler = _COMMANDS.get(command)
        if handler is None:
            raise ApiError(432, f"The given command:{command} does not exist")
        with self._lock:
            return handler(self, params)

    def verify(self, params: dict[str, str]) -> bool:
        """Whether the request is signed with the secret of our API key and not expired."""
        given = params.get("signature")
        if given is None or params.get("apiKey") != self.api_key:
            return False
        if params.get("signatureVersion") == "3":
            try:
                expires = datetime.strptime(params.get("expires", ""), _EXPIRES_FORMAT)
            except ValueError:
                return False
            if expires < datetime.now(timezone.utc):
                return False
        signed = {name: value for name, value in params.items() if name != "signature"}
        return hmac.compare_digest(given, signature(signed, self.secret))

    def _list_hosts(self, params: dict[str, str]) -> dict:
        for host in self.hosts:
            self._advance_drain(host)
        return _listing("host", _matching(self.hosts, params, ("id", "name", "type")))

    def _advance_drain(self, host: dict) -> None:
        left = self._drains.get(host["id"])
        if left is None:
            return
        if left > 1:
            self._drains[host["id"]] = left - 1
            return
        del self._drains[host["id"]]
        host["resourcestate"] = "ErrorInPrepareForMaintenance" if self.fail_drain else "Maintenance"

    def _list_clusters(self, params: dict[str, str]) -> dict:
        return _listing("cluster", _matching(self.clusters, params, ("id",)))

    def _list_capacity(self, params: dict[str, str]) -> dict:
        keys = ("zoneid", "podid", "clusterid")
        return _listing("capacity", _matching(self.capacities, params, keys))

    def _start_job(self, params: dict[str, str]) -> dict:
        hosts = _matching(self.hosts, params, ("id",)) if "id" in params else []
        if not hosts:
            command, value = params["command"].lower(), params.get("id")
            raise ApiError(431, f"Unable to execute API command {command}: no host with id {value}")
        host, command = hosts[0], params["command"]
        job = Job(command, self.job_polls, lambda: self._finish(command, host))
        self.jobs[job.id] = job
        return {"jobid": job.id}

    def _issue_certificate(self, params: dict[str, str]) -> dict:
        csr = params.get("csr", "")
        if not csr:
            raise ApiError(431, "Please provide the domains or the CSR, none of them are provided")
        self.csrs.append(csr)
        job = Job("issueCertificate", self.job_polls, lambda: self._sign(csr))
        self.jobs[job.id] = job
        return {"jobid": job.id}

    def _sign(self, csr: str) -> dict:
        """The finished issueCertificate job: CertificateResponse, object name `certificates`."""
        if self.ca is None:
            text = "Failed to issue client certificate with given provider"
            return _failed_job(530, text)
        try:
            cert = self.ca.sign_csr(
                csr.encode(), not_after=testca.now() + self.certificate_days * testca.DAY
            )
        except ValueError as error:
            return _failed_job(530, f"Failed to parse the CSR: {error}")
        issued = {
            "certificate": testca.pem(cert).decode(),
            "cacertificates": self.ca.bundle().decode(),
        }
        return {
            "jobstatus": 1,
            "jobresultcode": 0,
            "jobresulttype": "object",
            "jobresult": {"certificates": issued},
        }

    def _list_configurations(self, params: dict[str, str]) -> dict:
        # The server matches the name as a substring; a cluster's own value comes first.
        wanted, cluster = params.get("name", ""), params.get("clusterid")
        found = []
        for name, value in self.configurations.items():
            if wanted not in name:
                continue
            scoped = self.cluster_configurations.get((cluster, name)) if cluster else None
            found.append(
                {
                    "category": "Advanced",
                    "name": name,
                    "value": value if scoped is None else scoped,
                    "scope": "cluster" if cluster else None,
                    "isdynamic": True,
                }
            )
        return _listing("configuration", found)

    def _query_job(self, params: dict[str, str]) -> dict:
        job = self.jobs.get(params.get("jobid", ""))
        if job is None:
            raise ApiError(431, f"Unable to find a job with id {params.get('jobid')}")
        job.polls -= 1
        if job.answer is None and job.polls <= 0:
            job.answer = job.finish()
        common = {"jobid": job.id, "cmd": job.command, "jobprocstatus": 0}
        if job.answer is None:
            return {**common, "jobstatus": 0, "jobresultcode": 0}
        return {**common, **job.answer}

    def _finish(self, command: str, host: dict) -> dict:
        state = host["resourcestate"]
        if command == "prepareHostForMaintenance" and state in ("Enabled", "Disabled"):
            host["resourcestate"] = "PrepareForMaintenance"
            self._drains[host["id"]] = self.drain_polls
        elif command == "cancelHostMaintenance" and state in MAINTENANCE_STATES:
            host["resourcestate"] = "Enabled"
            self._drains.pop(host["id"], None)
        else:
            text = f"Host {host['id']} is in resource state {state}: {command} is not allowed"
            return _failed_job(530, text)
        return {
            "jobstatus": 1,
            "jobresultcode": 0,
            "jobresulttype": "object",
            "jobresult": {"host": dict(host)},
        }


_COMMANDS = {
    "listHosts": FakeController._list_hosts,
    "listClusters": FakeController._list_clusters,
    "listCapacity": FakeController._list_capacity,
    "prepareHostForMaintenance": FakeController._start_job,
    "cancelHostMaintenance": FakeController._start_job,
    "queryAsyncJobResult": FakeController._query_job,
    "issueCertificate": FakeController._issue_certificate,
    "listConfigurations": FakeController._list_configurations,
}


def _failed_job(code: int, text: str) -> dict:
    return {
        "jobstatus": 2,
        "jobresultcode": code,
        "jobresulttype": "object",
        "jobresult": {"errorcode": code, "errortext": text},
    }


def _matching(items: list[dict], params: dict[str, str], keys: tuple[str, ...]) -> list[dict]:
    """The items equal to every one of `keys` given in the request."""
    return [
        item
        for item in items
        if all(str(item.get(key)) == params[key] for key in keys if key in params)
    ]


def _listing(kind: str, items: list[dict]) -> dict:
    # Copies: the answer is serialized after the lock is released.
    # The server leaves out count and the list when nothing matches.
    return {"count": len(items), kind: [dict(item) for item in items]} if items else {}


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        fake: FakeController = self.server.fake
        url = urlsplit(self.path)
        params = {
            name: values[0] for name, values in parse_qs(url.query, keep_blank_values=True).items()
        }
        fake.commands.append(params.get("command", ""))
        if fake.unavailable:
            self._send(503, "text/html", b"<html><body>503 Service Unavailable</body></html>")
            return
        if url.path != API_PATH:
            self._send(404, "text/html", b"<html><body>404 Not Found</body></html>")
            return
        command = params.get("command", "")
        name = f"{command.lower()}response" if command in _COMMANDS else "errorresponse"
        try:
            if not fake.verify(params):
                raise ApiError(401, BAD_SIGNATURE)
            status, body = 200, {name: fake.answer(params)}
        except ApiError as error:
            error_body = {"uuidList": [], "errorcode": error.code, "errortext": error.text}
            status, body = error.code, {name: error_body}
        self._send(status, "application/json; charset=UTF-8", json.dumps(body).encode())

    def _send(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: the tests read `commands`, not a log."""
