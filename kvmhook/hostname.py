"""This host's name, as its peers and the controller know it."""

import socket


def fqdn() -> str:
    """The host's canonical name, as `hostname -f` finds it.

    Not socket.getfqdn(): where /etc/hosts lists the host name after
    `localhost`, that returns "localhost".
    """
    name = socket.gethostname()
    try:
        canonical = socket.getaddrinfo(name, None, flags=socket.AI_CANONNAME)[0][3]
    except OSError:
        return name
    return canonical if canonical and not canonical.startswith("localhost") else name
