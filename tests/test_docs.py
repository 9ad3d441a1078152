"""The README and the operator's guide in docs/: every cross-link lands on a file and a heading."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def prose_lines(page: Path) -> list[str]:
    """The page's lines outside fenced code blocks."""
    lines, fenced = [], False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return lines


def anchors(page: Path) -> set[str]:
    """The anchors GitHub gives the headings: lower case, punctuation dropped, spaces as -."""
    slugs: set[str] = set()
    for line in prose_lines(page):
        heading = re.match(r"#+\s+(.*)", line)
        if heading:
            base = re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower()).replace(" ", "-")
            slug, repeat = base, 0
            while slug in slugs:  # a repeated heading gets -1, -2, ... as on GitHub
                repeat += 1
                slug = f"{base}-{repeat}"
            slugs.add(slug)
    return slugs


def links(page: Path) -> list[str]:
    """The page's relative links (web addresses left out)."""
    found = []
    for line in prose_lines(page):
        found += [t for t in LINK.findall(line) if not re.match(r"[a-z]+:", t)]
    return found


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_every_relative_link_lands_on_a_file_and_a_heading(page):
    """Each relative link names an existing file and, after #, one of its headings' anchors."""
    for target in links(page):
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        assert linked.is_file(), f"{page.name}: {target}: no such file"
        if anchor:
            assert anchor in anchors(linked), f"{page.name}: {target}: no such heading"


def test_every_guide_page_is_listed_in_the_readme():
    """The README's "Where to read on" links each docs/ page, so none is left unfound."""
    listed = {target.partition("#")[0] for target in links(REPO / "README.md")}
    for page in PAGES[1:]:
        assert f"docs/{page.name}" in listed, page.name


def test_the_readme_opens_with_the_two_commands():
    """The README's first code block is the demo and the test command, as CI runs them."""
    text = (REPO / "README.md").read_text()
    first_block = text.split("```", 2)[1]
    commands = [line.split("#")[0].strip() for line in first_block.splitlines()[1:]]
    assert commands == ["bash scripts/demo.sh", "bash scripts/test.sh"]


def module_map() -> dict[str, str]:
    """The README's module map: each path it names (folder lines open a folder) and its text."""
    text = (REPO / "README.md").read_text().split("## Development", 1)[1]
    block = text.split("```", 2)[1]
    named: dict[str, str] = {}
    folder = ""
    for line in block.splitlines():
        match = re.match(r"^(\s*)(\S+)\s+(.*)$", line)
        if not match:
            continue
        indent, name, what = match.groups()
        if not indent:
            folder = name if name.endswith("/") else ""
            path = name
        else:
            path = folder + name
        named[path] = what
    return named


def test_the_module_map_names_every_module_and_nothing_else():
    """Every module of kvmhook/ and keystore/ has a line in the README map; every line exists."""
    named = module_map()
    modules = {
        str(path.relative_to(REPO))
        for package in ("kvmhook", "keystore")
        for path in (REPO / package).rglob("*.py")
        if path.name != "__init__.py" or path.parent.name == "cli"  # the cli group lives there
    }
    missing = sorted(modules - set(named))
    assert not missing, f"modules without a line in the README's module map: {missing}"
    for path in named:
        assert (REPO / path.split(",")[0]).exists(), f"the module map names {path}, which is gone"
