"""The example of docs/library.md ("Using the library") runs as written."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_library_page_example_runs(tmp_path):
    section = (REPO / "docs" / "library.md").read_text().split("## Example", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    shutil.copytree(REPO / "configs", tmp_path / "configs")
    out = subprocess.run([sys.executable, "-c", code + "\nprint('grad', model.method.meta_net.net.weight.grad.abs().sum() > 0)"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "grad tensor(True)" in out.stdout
    assert (tmp_path / "runs" / "demo" / "results.json").is_file()
