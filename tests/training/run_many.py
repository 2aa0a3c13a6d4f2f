"""Runs several training experiments one after another in one launched job (``torchrun ... run_many.py
<runs.json>``), so that a matrix of multi-rank runs pays the launch and DeepSpeed start-up once.

``runs.json``: ``{"common": [overrides...], "runs": {"<run name>": [overrides...]}}``; each run writes
its run folder as ``softcpt-dist train`` would.
"""

import json
import os
import sys

import softcpt_dist  # noqa: F401  (the torchvision shim first)
from softcpt_dist import training
from softcpt_dist.config import load_config

if __name__ == "__main__":
    spec = json.loads(open(sys.argv[1]).read())
    for name, overrides in spec["runs"].items():
        training.run(load_config([], [*spec["common"], f"train.run_name={name}", *overrides]))
    import torch.distributed as dist
    if dist.is_initialized():
        dist.destroy_process_group()
    # As softcpt_dist.cli.entry: no interpreter teardown, which communication threads can abort.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
