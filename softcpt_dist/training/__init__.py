"""Training and evaluation: experiments, the loop, the DeepSpeed engine, checkpoints, run folders.

Library API (stable)::

    from softcpt_dist.config import load_config
    from softcpt_dist import training

    result = training.run(load_config(["configs/synthetic.yaml"], ["optim.epochs=5"]))
    result.path, result.results["mean"], result.history[-1]["loss"]
    training.run_eval(cfg, result.path / "prompt_checkpoint.pt")
    record = training.profile(cfg)  # softcpt-dist profile: time split, FLOPs, MFU (profile.json's content)

The heavy modules load on first use, so importing this package (or the CLI) stays cheap.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Dict, Optional

if TYPE_CHECKING:
    from softcpt_dist.config import Config
    from softcpt_dist.training.experiment import RunResult


def run(cfg: "Config", run_path: Optional[Path] = None) -> "RunResult":
    """Train (or fit) and evaluate one experiment; writes its run folder (see the README)."""
    from softcpt_dist.training.experiment import run_train
    return run_train(cfg, run_path)


def run_eval(cfg: "Config", checkpoint: Optional[Path], out_dir: Optional[Path] = None) -> Dict:
    """Evaluate a prompt checkpoint (or zero-shot CLIP) on ``cfg.train.eval_split``."""
    from softcpt_dist.training.experiment import run_eval as _run_eval
    return _run_eval(cfg, checkpoint, out_dir)


def profile(cfg: "Config", settings=None) -> Dict:
    """Time ``cfg``'s training steps (``softcpt_dist.profiling.step_profile.ProfileSettings``: warm-up, steps,
    peak, trace, folder); returns the profile record, also written as ``profile.json``/``profile.md``."""
    from softcpt_dist.profiling.step_profile import ProfileSettings, run_profile
    return run_profile(cfg, settings or ProfileSettings())


__all__ = ["run", "run_eval", "profile"]
