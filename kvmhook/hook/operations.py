"""What libvirt passes the qemu hook: its operations, in one table, and one call (Event).

As libvirt's own src/util/virhook.c keeps them in one enum table, each
operation is written down once here, with what the hook may do in it; every
other module reads this one. It imports nothing: the hook loads it on every
guest start.
"""


class Operation:
    """One operation and what the hook may do in it.

    `never_aborts`: why a failing script can never abort it (None: it can, as
    libvirt honours its exit status by stopping what it does). `rewrites`:
    libvirt reads new domain XML from the hook's stdout. `arrival`: a guest
    arrives on this host by it, so a host in maintenance refuses it.
    """

    __slots__ = ("arrival", "name", "never_aborts", "rewrites")

    def __init__(
        self,
        name: str,
        never_aborts: "str | None" = None,
        rewrites: bool = False,
        arrival: bool = False,
    ) -> None:
        self.name = name
        self.never_aborts = never_aborts
        self.rewrites = rewrites
        self.arrival = arrival

    @property
    def may_abort(self) -> bool:
        return self.never_aborts is None


_IGNORED_STATUS = "libvirt ignores its exit status"

# In the order of a guest's life.
TABLE = (
    Operation("prepare", arrival=True),
    Operation("start"),
    Operation("started"),
    Operation("stopped", never_aborts=_IGNORED_STATUS),
    Operation("release", never_aborts=_IGNORED_STATUS),
    Operation("migrate", rewrites=True, arrival=True),
    Operation("restore", rewrites=True),
    # libvirt honours a failing reconnect too, but by killing the guest that is running.
    Operation("reconnect", never_aborts="a failing reconnect makes libvirt kill the running guest"),
    Operation("attach", never_aborts="libvirt never runs it for current QEMU guests"),
)
BY_NAME = {operation.name: operation for operation in TABLE}
OPERATIONS = tuple(BY_NAME)
ABORTABLE = tuple(operation.name for operation in TABLE if operation.may_abort)


class Event:
    """One call of the hook: the four arguments libvirt passed. It never changes once made."""

    __slots__ = ("domain", "extra", "operation", "subop")

    def __init__(self, domain: str, operation: str, subop: str = "-", extra: str = "-") -> None:
        for name, value in (
            ("domain", domain),
            ("operation", operation),
            ("subop", subop),
            ("extra", extra),
        ):
            object.__setattr__(self, name, value)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"an Event does not change: cannot set {name}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"an Event does not change: cannot delete {name}")

    @property
    def argv(self) -> list[str]:
        """The arguments every custom script receives: the hook's own."""
        return [self.domain, self.operation, self.subop, self.extra]
