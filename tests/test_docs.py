"""The documentation stays true to the code: every ``softcpt-dist`` command shown in README.md and docs/
names an existing subcommand, every config file it names exists, and every relative link resolves
(file and heading anchor)."""

import argparse
import re
from pathlib import Path

import pytest

from softcpt_dist.cli import _parser

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
CONFIG_PATH = re.compile(r"(?<![\w/.-])configs/[\w./-]+\.yaml")


def _subcommands(parser: argparse.ArgumentParser) -> dict:
    """{name: {sub-name: ...}} of every subparser level."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return {name: _subcommands(sub) for name, sub in action.choices.items()}
    return {}


def _code(text: str) -> list:
    """The lines of fenced code blocks and the inline code spans."""
    blocks = re.findall(r"```[^\n]*\n(.*?)```", text, flags=re.S)
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    return [line for block in blocks for line in block.splitlines()] + re.findall(r"`([^`\n]+)`", prose)


def _commands(page: Path) -> list:
    found = []
    for line in _code(page.read_text()):
        for match in re.finditer(r"softcpt-dist\s+([\w-]+)(?:\s+([\w-]+))?", line.split("#")[0]):
            found.append((match.group(1), match.group(2)))
    return found


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_command_names_an_existing_subcommand(page):
    tree = _subcommands(_parser())
    for command, second in _commands(page):
        assert command in tree, (page.name, command, sorted(tree))
        if tree[command] and second is not None and not second.startswith("-"):
            assert second in tree[command] or second.upper() == second, (page.name, command, second)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_config_file_named_in_code_exists(page):
    missing = sorted({m for line in _code(page.read_text()) for m in CONFIG_PATH.findall(line)
                      if not (REPO / m).is_file()})
    assert missing == [], page.name


def _anchors(page: Path) -> set:
    """GitHub's heading anchors of a page (lower case, punctuation dropped, spaces to dashes, numbered repeats)."""
    found, text = set(), re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    for heading in re.findall(r"^#{1,6}\s+(.*)$", text, flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        anchor, n = slug, 1
        while anchor in found:
            anchor, n = f"{slug}-{n}", n + 1
        found.add(anchor)
    return found


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(page):
    prose = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    broken = []
    for link in re.findall(r"\]\(([^)\s]+)\)", prose):
        if re.match(r"[a-z]+:", link):
            continue
        path, _, anchor = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        if not target.exists():
            broken.append(link)
        elif anchor and target.suffix == ".md" and anchor not in _anchors(target):
            broken.append(link)
    assert broken == [], page.name
