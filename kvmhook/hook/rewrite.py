"""The XML rewrite chain of `migrate` and `restore`: where scripts put new domain XML,
and whether what they put there may go to libvirt.

libvirt takes whatever the hook prints on stdout during `migrate` and
`restore` as the guest's new XML, so stdout cannot carry a script's output
(it goes to the log). A script that wants to change the XML writes it to the
file named by $KVMHOOK_XML_OUT instead: a path in a directory private to
this hook call, which does not exist until the script creates it (a script
may also write a file beside it and rename it there). The hook reads it
after the script ends, checks it and removes it, so each script starts with
no file.

A rewrite is checked before anything else sees it: well-formed, a
`<domain>` root, and the same `<name>` and `<uuid>` as the XML libvirt
passed in. libvirt would reject a rename or a different uuid anyway, but
only after the rest of the chain has run on it, with an error that does not
name the script. Imported only for migrate and restore.
"""

from __future__ import annotations

import os

TYPE_CHECKING = False  # typing costs import time the hook pays on every guest start
if TYPE_CHECKING:
    from xml.etree.ElementTree import Element

VARIABLE = "KVMHOOK_XML_OUT"
_FILE_NAME = "domain.xml"


class Outbox:
    """The private directory whose `domain.xml` is $KVMHOOK_XML_OUT for each script.

    Made under $TMPDIR, else under /tmp, as `tempfile` does. Raises OSError,
    naming every place tried, when none will do.
    """

    def __init__(self) -> None:
        # TMPDIR is one of the few variables libvirt passes to its hooks.
        bases = [base for base in (os.environ.get("TMPDIR"), "/tmp") if base]
        problems = []
        for base in dict.fromkeys(bases):  # each once: TMPDIR may be /tmp
            try:
                self.directory = _private_directory(base)
                break
            except OSError as error:
                problems.append(f"{base}: {error.strerror}")
        else:
            raise OSError(None, f"no private directory ({'; '.join(problems)})")
        self.path = os.path.join(self.directory, _FILE_NAME)

    def take(self) -> bytes | None:
        """What the last script wrote to the file (None: nothing), removing it.

        Raises OSError when what is there cannot be read; readfile.RefusedFile
        when it is not a regular file (a FIFO, a link to /dev/zero) or is larger
        than a domain XML may be (readfile.DOMAIN_XML_MAX).
        """
        from kvmhook.hook import readfile

        try:
            return readfile.read(self.path, readfile.DOMAIN_XML_MAX)
        except FileNotFoundError:
            return None
        finally:
            _remove(self.path)

    def remove(self) -> None:
        """Remove the directory, with whatever a script left in it."""
        try:
            os.rmdir(self.directory)
        except OSError:  # not empty: only then pay for shutil
            import shutil

            shutil.rmtree(self.directory, ignore_errors=True)


class Reference:
    """The `<name>` and `<uuid>` of the XML libvirt passed in, which a rewrite must keep."""

    def __init__(self, original: bytes) -> None:
        from xml.etree import ElementTree

        try:
            root = ElementTree.fromstring(original)
        except ElementTree.ParseError as error:
            self.problem: str | None = f"the domain XML on stdin is not readable ({error})"
            self.name = self.uuid = None
            return
        self.problem = None
        self.name, self.uuid = _identity(root)

    def check(self, data: bytes) -> str | None:
        """Why `data` may not replace the domain XML, or None when it may."""
        from xml.etree import ElementTree

        if self.problem is not None:
            return f"cannot be checked: {self.problem}"
        try:
            root = ElementTree.fromstring(data)
        except ElementTree.ParseError as error:
            return f"not well-formed XML ({error})"
        if root.tag != "domain":
            return f"the root element is <{root.tag}>, not <domain>"
        name, uuid = _identity(root)
        if name != self.name:
            return f"<name> changed from {self.name!r} to {name!r}"
        if uuid != self.uuid:
            return f"<uuid> changed from {self.uuid!r} to {uuid!r}"
        return None


def _private_directory(base: str) -> str:
    """A new directory in `base` that only we can enter."""
    while True:
        directory = os.path.join(base, f"kvmhook-xml-{os.getpid()}-{os.urandom(6).hex()}")
        try:
            os.mkdir(directory, 0o700)  # fails on an existing name: no one else's directory
            return directory
        except FileExistsError:
            continue


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except IsADirectoryError:
        import shutil

        shutil.rmtree(path, ignore_errors=True)
    except FileNotFoundError:
        pass


def _identity(root: Element) -> tuple[str | None, str | None]:
    """The domain's name and its uuid, normalized as libvirt compares them."""
    name = root.findtext("name")
    uuid = root.findtext("uuid")
    if uuid is not None:
        uuid = uuid.strip().replace("-", "").lower()
    return (name.strip() if name is not None else None), uuid
