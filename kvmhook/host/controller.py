"""The controller client: the few CloudStack API calls a host makes about itself.

`cs` signs each request (API key, HMAC-SHA1 of the sorted, lower-cased query,
signature version 3 with an expiry). What it lacks is added here: failover
across the configured management servers, and async jobs polled against a
deadline through that same failover (cs polls one server only, to a deadline
in whole seconds).

Settings live in controller.conf (module `load`); its absence means the host
runs standalone.
"""

from __future__ import annotations

import configparser
import os
import random
import re
import time
from typing import Any
from urllib.parse import urlsplit

import requests
from cs import CloudStack, CloudStackApiException, CloudStackException

from kvmhook import config, hostname, limits, paths
from kvmhook.errors import ControllerError, ControllerUnreachable

SECTION = "controller"
SETTINGS = ("endpoints", "api_key", "secret", "host", "verify", "timeout")
DEFAULT_TIMEOUT = 30
# Days before expiry when the controller's CA framework alerts or renews (cluster scope).
EXPIRY_ALERT_PERIOD = "ca.framework.cert.expiry.alert.period"

# Resource ids in the API are UUIDs; anything else in `host =` is a name.
_UUID = re.compile(r"[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}", re.IGNORECASE)
# queryAsyncJobResult's jobstatus; anything else (2) is a failure.
_PENDING, _SUCCEEDED = 0, 1
# Seconds between job polls, doubling: a quick job answers at once, a long
# drain is not hammered.
_FIRST_PAUSE, _LONGEST_PAUSE = 0.1, 2.0


def load(agent_dir: str | None = None) -> Controller | None:
    """The controller set in controller.conf; None when the file does not exist (standalone).

    `agent_dir` (an --agent-dir) holds the cloud.ca.crt that verifies the
    controller when controller.conf names no `verify =` file.
    """
    path = paths.controller_conf()
    text = _read_private(path)
    if text is None:
        return None
    return Controller(**_settings(path, text, paths.agent_files(agent_dir).ca))


class Controller:
    """This host as the controller sees it, asked of the first management server that answers.

    The endpoints are shuffled once, so hosts spread over the management
    servers; a server that fails passes the turn to the next, round-robin,
    and the one that answered is asked first next time.
    """

    def __init__(
        self,
        endpoints: list[str],
        api_key: str,
        secret: str,
        host: str,
        verify: str | bool,
        timeout: int,
    ) -> None:
        self.host_name = host
        endpoints = list(endpoints)
        random.shuffle(endpoints)
        self._apis = [_api(endpoint, api_key, secret, verify, timeout) for endpoint in endpoints]
        self._turn = 0

    def host(self) -> dict[str, Any]:
        """This host in listHosts (id, name, resourcestate, state, clusterid, cpunumber, ...)."""
        by = "id" if _UUID.fullmatch(self.host_name) else "name"
        hosts = self._call("listHosts", type="Routing", **{by: self.host_name}).get("host", [])
        if not hosts:
            raise ControllerError(
                f"the controller has no KVM host with {by} {self.host_name!r}"
                f" (set host = in {paths.controller_conf()})"
            )
        if len(hosts) > 1:
            raise ControllerError(
                f"the controller has {len(hosts)} KVM hosts named {self.host_name!r}:"
                f" set host = this host's id in {paths.controller_conf()}"
            )
        return hosts[0]

    def resource_state(self) -> str:
        """Enabled, PrepareForMaintenance, ErrorInPrepareForMaintenance, Maintenance, ..."""
        return self.host()["resourcestate"]

    def prepare_maintenance(self, timeout: float = 600) -> dict[str, Any]:
        """Ask for maintenance; the host as the finished job reports it.

        That is PrepareForMaintenance while guests are still moving away:
        resource_state() tells when it reaches Maintenance.
        """
        return self._host_job("prepareHostForMaintenance", timeout)

    def cancel_maintenance(self, timeout: float = 600) -> dict[str, Any]:
        """Cancel maintenance; the host as the finished job reports it."""
        return self._host_job("cancelHostMaintenance", timeout)

    def overcommit_ratios(self) -> tuple[float, float]:
        """(cpu, memory) over-commit ratios of this host's cluster."""
        cluster_id = self.host()["clusterid"]
        clusters = self._call("listClusters", id=cluster_id).get("cluster", [])
        if len(clusters) != 1:
            raise ControllerError(f"the controller lists no cluster {cluster_id}")
        cluster = clusters[0]
        return _ratio(cluster, "cpuovercommitratio"), _ratio(cluster, "memoryovercommitratio")

    def capacity(self) -> list[dict[str, Any]]:
        """listCapacity for this host's zone, pod and cluster, as the controller returns it."""
        host = self.host()
        answer = self._call(
            "listCapacity", zoneid=host["zoneid"], podid=host["podid"], clusterid=host["clusterid"]
        )
        return answer.get("capacity", [])

    def issue_certificate(self, csr: str, timeout: float = 600) -> tuple[str, str]:
        """(certificate, CA certificates), PEM, that the controller's CA issues for `csr` (PEM).

        issueCertificate takes the names from the CSR; its async job answers
        with CertificateResponse (`certificate`, `cacertificates`).
        """
        issued = self._job("issueCertificate", timeout, csr=csr).get("certificates") or {}
        certificate = issued.get("certificate")
        if not certificate:
            raise ControllerError("issueCertificate answered without a certificate")
        return certificate, issued.get("cacertificates") or ""

    def expiry_alert_period(self) -> int:
        """ca.framework.cert.expiry.alert.period for this host's cluster, in days."""
        cluster_id = self.host()["clusterid"]
        found = self._call("listConfigurations", name=EXPIRY_ALERT_PERIOD, clusterid=cluster_id)
        # The name is matched as a substring: pick the setting itself.
        values = [
            setting.get("value")
            for setting in found.get("configuration", [])
            if setting.get("name") == EXPIRY_ALERT_PERIOD
        ]
        if not values:
            raise ControllerError(f"the controller has no setting {EXPIRY_ALERT_PERIOD}")
        value = str(values[0])
        days = limits.whole_number(value, 0, limits.MAX_DAYS)
        if days is None:
            raise ControllerError(
                f"{EXPIRY_ALERT_PERIOD} is {value!r}, not a number of days"
                f" from 0 to {limits.MAX_DAYS}"
            )
        return days

    def _host_job(self, command: str, timeout: float) -> dict[str, Any]:
        """Run the async `command` on this host; the host from its result, within `timeout`."""
        return self._job(command, timeout, id=self.host()["id"])["host"]

    def _job(self, command: str, timeout: float, **params: str) -> dict[str, Any]:
        """Run the async `command`; its job's result, within `timeout`."""
        deadline = time.monotonic() + timeout
        jobid = self._call(command, **params)["jobid"]
        pause = _FIRST_PAUSE
        while True:
            # A job id is good on every management server: they share one database.
            job = self._call("queryAsyncJobResult", jobid=jobid)
            if job["jobstatus"] == _SUCCEEDED:
                return job["jobresult"]
            if job["jobstatus"] != _PENDING:
                raise ControllerError(f"{command} failed: {_job_error(job)}")
            left = deadline - time.monotonic()
            if left <= 0:
                raise ControllerError(
                    f"{command} (job {jobid}) has not finished after {timeout:g} s;"
                    " the controller carries on with it"
                )
            time.sleep(min(pause, left))
            pause = min(2 * pause, _LONGEST_PAUSE)

    def _call(self, command: str, **params: str) -> dict[str, Any]:
        """The answer to `command` from the first management server that gives one."""
        failures = []
        for _ in self._apis:
            api = self._apis[self._turn]
            try:
                return getattr(api, command)(**params)
            except CloudStackApiException as error:
                # The API's own answer (bad signature, bad state): every other
                # server would give the same, and a command must not run twice.
                raise ControllerError(_refusal(api.endpoint, command, error)) from None
            except (requests.RequestException, CloudStackException) as error:
                failures.append(f"{api.endpoint}: {_reason(error)}")
                self._turn = (self._turn + 1) % len(self._apis)
        raise ControllerUnreachable(
            f"no management server answered {command}: {'; '.join(failures)}"
        )


def _api(endpoint: str, key: str, secret: str, verify: str | bool, timeout: int) -> CloudStack:
    # cs reads verify=False as "verify with the system CAs": off is its dangerous_no_tls_verify.
    return CloudStack(
        endpoint=endpoint,
        key=key,
        secret=secret,
        timeout=timeout,
        verify=verify or None,
        dangerous_no_tls_verify=verify is False,
    )


def _refusal(endpoint: str, command: str, error: CloudStackApiException) -> str:
    answer = error.error if isinstance(error.error, dict) else {}
    text = answer.get("errortext", str(error))
    code = answer.get("errorcode", error.response.status_code)
    return f"{endpoint} refused {command}: {text} (error {code})"


def _reason(error: Exception) -> str:
    """Why a server gave no answer, from the innermost cause.

    Not the outer message: it holds the request URL, with the API key and a
    signature still valid for minutes.
    """
    if isinstance(error, CloudStackException):
        return ": ".join(str(arg) for arg in error.args)
    cause: BaseException = error
    while cause.__cause__ or cause.__context__:
        cause = cause.__cause__ or cause.__context__
    return str(cause) or type(cause).__name__


def _job_error(job: dict[str, Any]) -> str:
    result = job.get("jobresult") or {}
    return f"{result.get('errortext', 'no reason given')} (error {job.get('jobresultcode')})"


def _ratio(cluster: dict[str, Any], key: str) -> float:
    # The API gives the ratios as strings ("1.0").
    value = cluster.get(key)
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ControllerError(
            f"cluster {cluster.get('name')}: {key} is {value!r}, not a number"
        ) from None


def _read_private(path: str) -> str | None:
    """The file's text, refused when group or others have any access: it holds the secret."""
    try:
        with open(path, encoding="utf-8") as file:
            mode = os.fstat(file.fileno()).st_mode & 0o7777
            if mode & 0o077:
                raise ControllerError(
                    f"{path} has mode {mode:04o}: it holds the API secret, so group and others"
                    f" must have no access (chmod 600 {path})"
                )
            return file.read()
    except FileNotFoundError:
        return None
    except OSError as error:
        raise ControllerError(f"cannot read {path}: {error.strerror}") from None
    except UnicodeDecodeError:
        raise ControllerError(f"cannot read {path}: not UTF-8 text") from None


def _settings(path: str, text: str, agent_ca: str) -> dict[str, Any]:
    """Controller's arguments from controller.conf's text; ControllerError naming what is wrong.

    No message holds a word of the file (a line, a name, a value): any of them
    may be the secret, misplaced. They name the file, the line or the setting.
    """
    # No interpolation: a secret may hold "%".
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read_string(text, source=path)
    except config.SYNTAX_ERRORS as error:
        raise ControllerError(f"{path}, {config.syntax_problem(error)}") from None
    if not parser.has_section(SECTION):
        raise ControllerError(f"{path} has no [{SECTION}] section")
    section = parser[SECTION]
    unknown = set(section) - set(SETTINGS)
    if unknown:
        raise ControllerError(
            f"{path}: [{SECTION}] has {len(unknown)} setting(s) other than"
            f" {', '.join(SETTINGS)} (misspelt?)"
        )
    endpoints = _endpoints(path, section.get("endpoints", ""))
    verify = _verify(section.get("verify"), agent_ca)
    _check_ca(path, verify, bool(section.get("verify")), endpoints)
    return {
        "endpoints": endpoints,
        "api_key": _required(path, section, "api_key"),
        "secret": _required(path, section, "secret"),
        "host": section.get("host") or hostname.fqdn(),
        "verify": verify,
        "timeout": _timeout(path, section.get("timeout")),
    }


def _endpoints(path: str, value: str) -> list[str]:
    endpoints = [endpoint.strip() for endpoint in value.split(",") if endpoint.strip()]
    if not endpoints:
        raise ControllerError(f"{path}: endpoints = is missing or empty")
    for number, endpoint in enumerate(endpoints, 1):
        url = urlsplit(endpoint)
        if url.scheme not in ("http", "https") or not url.netloc:
            raise ControllerError(f"{path}: endpoints = item {number} is not an http(s) URL")
    return endpoints


def _verify(value: str | None, agent_ca: str) -> str | bool:
    """False, or the CA file (host path) that signed the controller's certificate."""
    if not value:
        return agent_ca
    if value.lower() == "false":
        return False
    return paths.under_root(value)


def _check_ca(path: str, verify: str | bool, named: bool, endpoints: list[str]) -> None:
    # Checked now: requests would stop on a missing CA file mid-call, with a bare OSError.
    https = any(urlsplit(endpoint).scheme == "https" for endpoint in endpoints)
    if https and isinstance(verify, str) and not os.path.isfile(verify):
        # The default path is ours to show; one the file names is not.
        which = "named by verify =" if named else verify
        raise ControllerError(
            f"{path}: no CA file {which} to verify the controller with"
            " (set verify = a CA file, or false)"
        )


def _required(path: str, section: configparser.SectionProxy, key: str) -> str:
    value = section.get(key)
    if not value:
        raise ControllerError(f"{path}: {key} = is missing or empty")
    return value


def _timeout(path: str, value: str | None) -> int:
    if value is None:
        return DEFAULT_TIMEOUT
    # Whole seconds: cs truncates to int.
    seconds = limits.whole_number(value, 1, limits.MAX_SECONDS)
    if seconds is None:
        raise ControllerError(
            f"{path}: timeout = is not a whole number of seconds from 1 to {limits.MAX_SECONDS}"
        )
    return seconds
