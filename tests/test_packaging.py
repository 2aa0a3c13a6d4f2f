"""pyproject.toml lists every package of the tree, so a wheel (``pip install .``) holds all the code that
an editable install imports."""

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_every_package_in_the_tree_is_listed_in_pyproject():
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = set()
    for name, folder in setuptools["package-dir"].items():  # softcpt_dist/ and kernels/ (as softcpt_dist.kernels)
        for init in (REPO / folder).rglob("__init__.py"):
            found.add(".".join((name, *init.parent.relative_to(REPO / folder).parts)))
    assert sorted(setuptools["packages"]) == sorted(found)


@pytest.mark.parametrize("module", ["softcpt_dist.micro.group", "softcpt_dist.micro.pretrain", "softcpt_dist.micro.world",
                                    "softcpt_dist.data", "softcpt_dist.config", "softcpt_dist.model", "softcpt_dist.cli",
                                    "softcpt_dist.kernels"])
def test_each_entry_module_imports_first_in_a_fresh_interpreter(module):
    """No import cycle depends on which module a script imports first."""
    done = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]


def test_a_wheel_install_holds_every_package_and_its_data(tmp_path):
    target = tmp_path / "site"
    built = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                            "--target", str(target), str(REPO)], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-2000:]
    script = ("import softcpt_dist, softcpt_dist.config, softcpt_dist.micro.group, softcpt_dist.kernels;"
              "from softcpt_dist.model.arch_configs import MODEL_CONFIG_DIR;"
              "assert softcpt_dist.__file__.startswith(%r), softcpt_dist.__file__;"
              "assert (MODEL_CONFIG_DIR / 'softcpt-micro.json').is_file()" % str(target))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(target)})
    assert done.returncode == 0, done.stderr[-2000:]
