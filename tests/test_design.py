"""docs/DESIGN.md's package map lists exactly the package's modules (it had listed files that no
longer existed, and missed most that did)."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENTRY = re.compile(r"^( *)([\w.]+(?:\.py|/))(?:\s|$)")  # an indented module or folder name


def package_map(design: str) -> set[str]:
    """The paths the code block under "## The Python package" names, folders by their nesting."""
    block = design.split("## The Python package", 1)[1].split("```", 2)[1]
    folders: list[tuple[int, str]] = []  # (indent, folder path) of the folders the line is inside
    paths = set()
    for line in block.splitlines():
        match = ENTRY.match(line)
        if not match or len(match[1]) > (folders[-1][0] + 2 if folders else 0):
            continue  # a description, continued at its column
        indent, name = len(match[1]), match[2]
        while folders and folders[-1][0] >= indent:
            folders.pop()
        path = (folders[-1][1] if folders else "") + name
        if name.endswith("/"):
            folders.append((indent, path))
        else:
            paths.add(path)
    return paths


def test_the_package_map_lists_every_module_and_no_other() -> None:
    listed = package_map((REPO / "docs" / "DESIGN.md").read_text(encoding="utf-8"))
    modules = {str(p.relative_to(REPO)) for p in (REPO / "testbed").rglob("*.py") if p.name != "__init__.py"}
    assert sorted(listed - modules) == [] and sorted(modules - listed) == []


def test_the_map_reader_nests_folders_and_skips_descriptions() -> None:
    design = ("## The Python package\n```\ntestbed/\n  cli.py        the CLI\n                continued.py text\n"
              "  drivers/      drivers\n    base.py     protocol\n  spec.py       specs\n```\n")
    assert package_map(design) == {"testbed/cli.py", "testbed/drivers/base.py", "testbed/spec.py"}
