"""The dispatchers' decision (kernels.enabled, devices, dtypes) and each kernel module importable first."""

import subprocess
import sys

import pytest
import torch

from softcpt_dist.config import ConfigError, load_config
from softcpt_dist.kernels import _triton


@pytest.mark.slow
@pytest.mark.parametrize("module", ["prompt_assembly", "shared_prefix_attention", "cosine_ce"])
def test_each_kernel_module_imports_on_its_own(module):
    """A script may import a dispatcher before anything else of the package (they import its torch path)."""
    done = subprocess.run([sys.executable, "-c", f"import softcpt_dist.kernels.{module}"], capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr[-2000:]


def test_when_triton_runs(monkeypatch):
    cpu32, cpu16 = torch.zeros(2), torch.zeros(2, dtype=torch.bfloat16)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not _triton.use_triton("auto", cpu32)  # CPU without the interpreter: torch
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _triton.use_triton("auto", cpu32) == _triton.interpreter_ready()
    assert not _triton.use_triton("auto", cpu16)  # the interpreter is fp32 only
    assert not _triton.use_triton("off", cpu32)
    with pytest.raises(ValueError, match="kernels.enabled='on' is not one of"):
        _triton.use_triton("on", cpu32)
    assert _triton.describe("off", "cpu") == "torch (kernels.enabled=off)"


def test_config_switch():
    assert load_config([], []).kernels.enabled == "auto"
    assert load_config([], ["kernels.enabled=off"]).kernels.enabled == "off"
    with pytest.raises(ConfigError, match="kernels.enabled='on' is not one of"):
        load_config([], ["kernels.enabled=on"])
