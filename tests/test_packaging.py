"""pyproject.toml lists every package of the tree, so a wheel (``pip install .``) holds all the code that
an editable install imports."""

import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_every_package_in_the_tree_is_listed_in_pyproject():
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = set()
    for name, folder in setuptools["package-dir"].items():  # softcpt_dist/ and kernels/ (as softcpt_dist.kernels)
        for init in (REPO / folder).rglob("__init__.py"):
            found.add(".".join((name, *init.parent.relative_to(REPO / folder).parts)))
    assert sorted(setuptools["packages"]) == sorted(found)
