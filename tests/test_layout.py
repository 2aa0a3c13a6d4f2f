"""The package keeps the rules of its layout: small files, DeepSpeed in one place, no method names in
the experiment, every registered method behind the Method interface."""

import ast
from pathlib import Path

import pytest

from softcpt_dist.model.methods import METHODS, Method

PACKAGE = Path(__file__).resolve().parents[1] / "softcpt_dist"
SOURCES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_file_over_300_lines(path):
    assert len(path.read_text().splitlines()) <= 300


def test_deepspeed_is_imported_and_inspected_only_in_the_engine():
    engine = PACKAGE / "training" / "engine.py"
    for path in SOURCES:
        text = path.read_text()
        if path != engine:
            assert "import deepspeed" not in text and "ds_" not in text.replace("split_dk", ""), path


def test_experiment_does_not_branch_on_method_names():
    tree = ast.parse((PACKAGE / "training" / "experiment.py").read_text())
    strings = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    assert not strings & set(METHODS)


def test_registered_methods_implement_the_interface():
    assert set(METHODS) == {"softcpt", "coop", "zeroshot", "linear_probe"}
    for name, cls in METHODS.items():
        assert issubclass(cls, Method) and cls.name == name
        assert not (cls.fits and cls.trains_prompts)
