"""A small VeNCrypt client: the certificate a VNC server (QEMU's console) serves over TLS.

    python vencrypt.py PORT [--address 127.0.0.1] [--ca CA.pem] [--servername NAME]
                            [--cert CERT.pem --key KEY.pem]

Follows shared/notes/console-tls.md: RFB 3.8, security type 19 (VeNCrypt),
VeNCrypt 0.2, one of the X509 sub-types the server offers (X509None first:
no VNC password or user after TLS), then a TLS handshake on the same socket.
With --ca the served certificate must chain to it (and name --servername when
given); --cert/--key present a client certificate, which QEMU demands when
its console verifies peers (vnc_tls_x509_verify, which inherits
default_tls_x509_verify). For X509None the server's SecurityResult, sent
after TLS, is read too: it says whether QEMU accepted this client.

As a script (the tests run it inside a harness host's network namespace,
where the console listens on that namespace's 127.0.0.1) it prints one line,
`serial=<HEX> subtype=<name> result=<ok|failed|none>`, and exits 0; any
failure is one line on stderr and exit status 2. Standard library only.
"""

from __future__ import annotations

import argparse
import socket
import ssl
import struct
import sys
from typing import NamedTuple

RFB_38 = b"RFB 003.008\n"
VENCRYPT = 19
SECURITY_TYPES = {0: "Invalid", 1: "None", 2: "VNC", 16: "Tight", 18: "TLS", 19: "VeNCrypt"}
SUBTYPES = {
    256: "Plain",
    257: "TLSNone",
    258: "TLSVnc",
    259: "TLSPlain",
    260: "X509None",
    261: "X509Vnc",
    262: "X509Plain",
    263: "TLSSASL",
    264: "X509SASL",
}
# The sub-types that put an X509 certificate on the server's side, most wanted first: X509None
# needs nothing after TLS; the others want a password or SASL there, after the certificate.
X509_PREFERRED = (260, 261, 262, 264)
TIMEOUT = 10.0


class VencryptError(Exception):
    """The server did not get as far as serving its certificate; one line saying why."""


class Served(NamedTuple):
    """What one connection got: the server's certificate (DER), the sub-type used, and the
    SecurityResult after TLS (0 accepted, else refused; None when not read)."""

    der: bytes
    subtype: str
    result: int | None

    @property
    def serial(self) -> int:
        return der_serial(self.der)


def _recv(sock: socket.socket, size: int, what: str) -> bytes:
    data = b""
    while len(data) < size:
        try:
            chunk = sock.recv(size - len(data))
        except socket.timeout:
            raise VencryptError(f"no {what} from the server within {TIMEOUT:g} s") from None
        if not chunk:
            got = f" ({len(data)} of {size} bytes)" if data else ""
            raise VencryptError(f"the server closed the connection before its {what}{got}")
        data += chunk
    return data


def _reason(sock: socket.socket) -> str:
    """The reason string RFB sends with a refusal (4-byte length, then text)."""
    try:
        (length,) = struct.unpack(">I", _recv(sock, 4, "reason length"))
        return _recv(sock, min(length, 4096), "reason").decode(errors="replace")
    except VencryptError:
        return "(no reason given)"


def _names(codes, table) -> str:
    return ", ".join(f"{code} {table.get(code, '?')}" for code in codes) or "none"


def negotiate(sock: socket.socket) -> int:
    """RFB 3.8 and VeNCrypt 0.2 up to the point where TLS starts: the sub-type chosen."""
    version = _recv(sock, 12, "RFB version")
    if not version.startswith(b"RFB ") or not version.endswith(b"\n"):
        raise VencryptError(f"not an RFB (VNC) server: it said {version!r}")
    if version < RFB_38:
        raise VencryptError(f"the server speaks {version.decode().strip()}, VeNCrypt needs 3.7+")
    sock.sendall(RFB_38)
    (count,) = _recv(sock, 1, "security type count")
    if count == 0:
        raise VencryptError(f"the server refused the connection: {_reason(sock)}")
    types = list(_recv(sock, count, "security types"))
    if VENCRYPT not in types:
        raise VencryptError(
            f"the server offers no VeNCrypt (security types: {_names(types, SECURITY_TYPES)}):"
            " is TLS on for this console (vnc_tls = 1 when the guest started)?"
        )
    sock.sendall(bytes([VENCRYPT]))
    major, minor = _recv(sock, 2, "VeNCrypt version")
    if (major, minor) < (0, 2):
        raise VencryptError(f"the server speaks VeNCrypt {major}.{minor}, this client 0.2")
    sock.sendall(bytes([0, 2]))
    (status,) = _recv(sock, 1, "VeNCrypt version answer")
    if status != 0:
        raise VencryptError(f"the server refused VeNCrypt 0.2 (status {status})")
    (count,) = _recv(sock, 1, "VeNCrypt sub-type count")
    offered = list(struct.unpack(f">{count}I", _recv(sock, 4 * count, "VeNCrypt sub-types")))
    chosen = next((code for code in X509_PREFERRED if code in offered), None)
    if chosen is None:
        raise VencryptError(
            f"the server offers no X509 sub-type, so no certificate"
            f" (sub-types: {_names(offered, SUBTYPES)})"
        )
    sock.sendall(struct.pack(">I", chosen))
    (accepted,) = _recv(sock, 1, "sub-type answer")
    if accepted != 1:
        raise VencryptError(f"the server refused sub-type {SUBTYPES[chosen]} (answer {accepted})")
    return chosen


def context(
    ca: str | None = None,
    servername: str | None = None,
    cert: str | None = None,
    key: str | None = None,
) -> ssl.SSLContext:
    """A client context: verifying against `ca` (and `servername`) when given, else taking
    whatever is served; presenting `cert`/`key` when the server asks for a client certificate."""
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if ca is not None:
        tls.load_verify_locations(cafile=ca)
        tls.check_hostname = servername is not None
    else:
        tls.check_hostname = False
        tls.verify_mode = ssl.CERT_NONE
    if cert is not None:
        tls.load_cert_chain(cert, key)
    return tls


def served(
    port: int,
    address: str = "127.0.0.1",
    ca: str | None = None,
    servername: str | None = None,
    cert: str | None = None,
    key: str | None = None,
) -> Served:
    """Connect to the VNC server at `address`:`port` and return what it serves over TLS."""
    tls = context(ca, servername, cert, key)
    try:
        raw = socket.create_connection((address, port), timeout=TIMEOUT)
    except OSError as error:
        raise VencryptError(
            f"cannot connect to {address}:{port}: {error.strerror or error}"
        ) from None
    with raw:
        chosen = negotiate(raw)
        try:
            with tls.wrap_socket(raw, server_hostname=servername) as connection:
                der = connection.getpeercert(binary_form=True)
                result = None
                if chosen == 260:  # X509None: SecurityResult follows the TLS handshake
                    try:
                        (result,) = struct.unpack(">I", _recv(connection, 4, "SecurityResult"))
                    except (VencryptError, ssl.SSLError, OSError):
                        result = 1  # it closed on us: it did not accept this client
        except ssl.SSLCertVerificationError as error:
            raise VencryptError(
                f"the served certificate does not verify: {error.verify_message}"
            ) from None
        except ssl.SSLError as error:
            raise VencryptError(f"TLS handshake failed: {error.reason or error}") from None
        except OSError as error:
            raise VencryptError(f"TLS handshake failed: {error}") from None
    if not der:
        raise VencryptError("the TLS handshake gave no server certificate")
    return Served(der, SUBTYPES[chosen], result)


def der_serial(der: bytes) -> int:
    """The serialNumber of a DER X.509 certificate (Certificate -> TBSCertificate -> [0]
    version, when present -> INTEGER serial), read without a crypto library."""

    def header(data: bytes, at: int) -> tuple[int, int, int]:
        tag, first = data[at], data[at + 1]
        at += 2
        if first < 0x80:
            return tag, first, at
        size = int.from_bytes(data[at : at + (first & 0x7F)], "big")
        return tag, size, at + (first & 0x7F)

    _, _, at = header(der, 0)  # Certificate SEQUENCE
    _, _, at = header(der, at)  # TBSCertificate SEQUENCE
    tag, size, body = header(der, at)
    if tag == 0xA0:  # [0] EXPLICIT version
        tag, size, body = header(der, body + size)
    if tag != 0x02:
        raise VencryptError("the served certificate has no serial number where X.509 puts it")
    return int.from_bytes(der[body : body + size], "big", signed=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("port", type=int)
    parser.add_argument("--address", default="127.0.0.1")
    parser.add_argument("--ca", help="verify the served certificate against this CA file")
    parser.add_argument("--servername", help="the name it must carry (with --ca) and SNI")
    parser.add_argument("--cert", help="a client certificate, when the server asks for one")
    parser.add_argument("--key", help="its key")
    args = parser.parse_args(argv)
    try:
        got = served(args.port, args.address, args.ca, args.servername, args.cert, args.key)
    except (VencryptError, ssl.SSLError, OSError) as error:
        print(f"vencrypt {args.address}:{args.port}: {error}", file=sys.stderr)
        return 2
    result = {None: "none", 0: "ok"}.get(got.result, "failed")
    print(f"serial={got.serial:X} subtype={got.subtype} result={result}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
