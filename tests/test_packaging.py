"""A wheel (``pip install .``) holds every package of the tree, its data and the micro world's entry points,
so it imports what an editable install imports; no import cycle depends on the first module imported."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _tree_packages():
    """Every package of the checkout by its installed name (kernels/ ships as softcpt_dist.kernels)."""
    found = set()
    for name, folder in (("softcpt_dist", "softcpt_dist"), ("softcpt_dist.kernels", "kernels")):
        for init in (REPO / folder).rglob("__init__.py"):
            found.add(".".join((name, *init.parent.relative_to(REPO / folder).parts)))
    return sorted(found)


@pytest.mark.slow
@pytest.mark.parametrize("module", ["softcpt_dist.micro.group", "softcpt_dist.micro.pretrain", "softcpt_dist.micro.world",
                                    "softcpt_dist.data", "softcpt_dist.config", "softcpt_dist.model", "softcpt_dist.cli",
                                    "softcpt_dist.kernels"])
def test_each_entry_module_imports_first_in_a_fresh_interpreter(module):
    """No import cycle depends on which module a script imports first."""
    done = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]


def test_setup_finds_every_package_of_the_tree():
    done = subprocess.run([sys.executable, "-c", "import setuptools, runpy; setuptools.setup = lambda **kw: "
                           "print(sorted(kw['packages'])); runpy.run_path('setup.py')"], capture_output=True,
                          text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    assert eval(done.stdout.strip()) == _tree_packages()


@pytest.mark.slow
def test_a_wheel_install_holds_every_package_and_its_data(tmp_path):
    target = tmp_path / "site"
    built = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                            "--target", str(target), str(REPO)], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-2000:]
    script = ("import importlib, softcpt_dist; from softcpt_dist import plugins;"
              "[importlib.import_module(m) for m in %r];"
              "from softcpt_dist.model.backbone import MODEL_CONFIG_DIR;"
              "assert softcpt_dist.__file__.startswith(%r), softcpt_dist.__file__;"
              "assert (MODEL_CONFIG_DIR / 'softcpt-micro.json').is_file();"
              "assert plugins.lookup(plugins.DATASETS, 'micro') is not None;"
              "assert plugins.lookup(plugins.WEIGHTS, 'micro') is not None" % (_tree_packages(), str(target)))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(target)})
    assert done.returncode == 0, done.stderr[-2000:]
