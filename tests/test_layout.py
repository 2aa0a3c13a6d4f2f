"""The package keeps the rules of its layout: dependencies one way (kernels take plain tensors and import
nothing of the model; config, data and model import nothing of the micro world on top), DeepSpeed in
one place, no method names in the experiment, every registered method behind the Method interface."""

import ast
from pathlib import Path

import pytest

from softcpt_dist.model.methods import METHODS, Method

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "softcpt_dist"
SOURCES = sorted(PACKAGE.rglob("*.py"))


def _imports(path: Path) -> set:
    """Every module a file imports, at any depth of its code (lazy imports included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def _offending(files, forbidden: str) -> dict:
    found = {str(f.relative_to(REPO)): sorted(n for n in _imports(f) if n == forbidden or n.startswith(forbidden + "."))
             for f in files}
    return {f: names for f, names in found.items() if names}


def test_kernels_import_nothing_of_the_model():
    assert _offending(sorted((REPO / "kernels").rglob("*.py")), "softcpt_dist.model") == {}


@pytest.mark.parametrize("layer", ["config", "data", "model"])
def test_config_data_and_model_import_nothing_of_the_micro_world(layer):
    assert _offending(sorted((PACKAGE / layer).rglob("*.py")), "softcpt_dist.micro") == {}


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
    assert set(METHODS) == {"softcpt", "coop", "cocoop", "kgcoop", "prograd", "plot", "zeroshot", "linear_probe", "protonet"}
    for name, cls in METHODS.items():
        assert issubclass(cls, Method) and cls.name == name
        assert not (cls.fits and cls.trains_prompts)
