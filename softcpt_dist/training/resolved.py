"""What a run derives from its config and its environment, computed once and passed down.

The config stays exactly as the user gave it; the device a rank uses, the absolute data paths and
the run folder (named by rank 0) live here instead.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

from softcpt_dist import distributed as D
from softcpt_dist.config import Config, DataConfig
from softcpt_dist.distributed import WorldInfo, world_info_from_env
from softcpt_dist.model.methods import method_label


@dataclass(frozen=True)
class ResolvedRun:
    world: WorldInfo
    device: str  # model.device; with several ranks on CUDA, cuda:<local rank>
    data: DataConfig  # cfg.data with absolute root, group file and cache folder
    path: Optional[Path] = None  # the run folder

    def saved_config(self, cfg: Config) -> Config:
        """The config as a run folder records it: absolute paths, so ``eval --run`` works from anywhere."""
        return replace(cfg, data=self.data)


def _absolute(path: str) -> str:
    return str(Path(path).expanduser().resolve())


def default_run_name(cfg: Config) -> str:
    shots = f"{cfg.data.shots}shot" if cfg.data.shots else "full"
    return f"{method_label(cfg.method)}-{cfg.data.dataset}-{shots}-seed{cfg.train.seed}-{time.strftime('%Y%m%d-%H%M%S')}"


def start_run(cfg: Config, path: Optional[Path] = None, name_folder: bool = False) -> ResolvedRun:
    """Join the job's process group (a private one for a single process) and resolve the run.

    Non-main ranks log warnings only. ``name_folder``: the run folder is ``path`` or
    ``<train.output_dir>/<train.run_name>``, with the default name (it has a timestamp) chosen by
    rank 0 for every rank."""
    world = world_info_from_env()
    device = cfg.model.device
    if device.startswith("cuda") and world.world_size > 1:
        device = f"cuda:{world.local_rank}"
    D.quiet_non_main_ranks(world)
    D.init_distributed(world, device, cfg.engine.timeout_s, cfg.engine.backend)
    dcfg = cfg.data
    data = replace(dcfg, root=_absolute(dcfg.root), cache=replace(dcfg.cache, dir=_absolute(dcfg.cache.dir)),
                   group_file=_absolute(dcfg.group_file) if dcfg.group_file else None)
    if name_folder:
        name = D.broadcast_object(cfg.train.run_name or default_run_name(cfg))
        path = Path(path) if path is not None else Path(cfg.train.output_dir) / name
    return ResolvedRun(world, device, data, path)
