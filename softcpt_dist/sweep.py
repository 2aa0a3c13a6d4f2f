"""Sweeps: a grid of config overrides over base config files, one run folder per grid point.

A sweep file (YAML)::

    configs: [configs/paper/plant6/base.yaml]      # base config files, merged in order (optional)
    overrides: [train.output_dir=runs/plant6]       # applied to every run (optional)
    grid:                                           # the product of these (any config keys)
      method.variant: [NATA, CSTA]
      data.shots: [1, 2, 4, 8, 16]
      train.seed: [1, 2, 3]
    name: "{method.variant}-{data.shots}shot-seed{train.seed}"   # run name (default: all grid values)

A grid entry that maps names to sets of overrides is an axis of named settings, for runs that differ in
several keys at once (methods and their options)::

    grid:
      method:
        zeroshot: {method.name: zeroshot}
        coop-CA: {method.name: coop, method.coop_mode: CA}
      data.shots: [1, 2, 4]
    name: "{method}-{data.shots}shot"

``softcpt-dist sweep FILE --list`` shows the runs and their state; ``--index I`` (default
``$SLURM_ARRAY_TASK_ID``) runs the I-th unless it finished (its run folder has ``results.json``);
``slurm/sweep.sbatch`` is the job array. Each run resolves its own config (the grid point's
overrides after the file's), so a bad combination fails that run alone, named in ``--list``.
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

from omegaconf import OmegaConf

from softcpt_dist.config import ConfigError, load_config

STATES = ("finished", "failed", "started", "pending")


@dataclass
class SweepRun:
    index: int
    name: str
    overrides: List[str]  # the file's overrides, the grid point's, then train.run_name
    point: Dict[str, object]


@dataclass
class Sweep:
    path: Path
    configs: List[str]
    runs: List[SweepRun]

    def config(self, run: SweepRun):
        return load_config(self.configs, run.overrides)

    def run_folder(self, run: SweepRun) -> Path:
        cfg = self.config(run)
        return Path(cfg.train.output_dir) / cfg.train.run_name

    def status_file(self, run: SweepRun) -> Path:
        """Where ``sweep --index`` records a run's last exit code (beside the run folders)."""
        folder = self.run_folder(run)
        return folder.parent / ".sweep-status" / f"{folder.name}.json"

    def state(self, run: SweepRun) -> str:
        """finished (results.json), failed (its last attempt exited with an error, or its config is bad),
        started (a run folder, no result yet: running, or stopped to be requeued), or pending."""
        try:
            folder = self.run_folder(run)
        except ConfigError:
            return "failed"
        if (folder / "results.json").is_file():
            return "finished"
        status = self.status_file(run)
        if status.is_file() and json.loads(status.read_text()).get("rc") not in (0, 75):
            return "failed"
        return "started" if folder.is_dir() else "pending"


def _name(template: Optional[str], point: Dict[str, object], index: int) -> str:
    if template is None:
        name = "-".join(f"{k.split('.')[-1]}{v}" for k, v in point.items()) or f"run{index}"
    else:
        try:
            name = re.sub(r"\{([^{}]+)\}", lambda m: str(point[m.group(1)]), template)
        except KeyError as err:
            raise ConfigError(f"sweep name {template!r} uses {err}, which is not a grid key") from None
    return re.sub(r"[^A-Za-z0-9._=+-]", "_", name)


def load_sweep(path: Path) -> Sweep:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep file {path} does not exist")
    raw = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    unknown = set(raw) - {"configs", "overrides", "grid", "name"}
    if unknown:
        raise ConfigError(f"sweep file {path}: unknown keys {sorted(unknown)} (configs, overrides, grid, name)")
    grid = raw.get("grid") or {}
    if not isinstance(grid, dict) or not all(isinstance(v, (list, dict)) and v for v in grid.values()):
        raise ConfigError(f"sweep file {path}: grid must map config keys to non-empty lists of values (or axis "
                          "names to mappings of named override sets)")
    for axis, named in grid.items():
        if isinstance(named, dict) and not all(isinstance(o, dict) for o in named.values()):
            raise ConfigError(f"sweep file {path}: grid axis {axis!r}: each named setting must map config keys "
                              "to values")
    configs = [str((path.parent / c) if not Path(c).is_absolute() and not Path(c).exists() else c)
               for c in raw.get("configs") or []]
    base = [str(o) for o in raw.get("overrides") or []]
    runs, names = [], {}
    for index, values in enumerate(itertools.product(*(list(v) for v in grid.values()))):
        point = dict(zip(grid, values))
        name = _name(raw.get("name"), point, index)
        settings = {k: v for axis, value in point.items()
                    for k, v in (grid[axis][value] if isinstance(grid[axis], dict) else {axis: value}).items()}
        if name in names:
            raise ConfigError(f"sweep file {path}: runs {names[name]} and {index} are both named {name!r}; "
                              "put every grid key into `name`")
        names[name] = index
        overrides = base + [f"{k}={OmegaConf.to_yaml(v).strip() if isinstance(v, (list, dict)) else v}"
                            for k, v in settings.items()] + [f"train.run_name={name}"]
        runs.append(SweepRun(index, name, overrides, point))
    return Sweep(path, configs, runs)


def listing(sweep: Sweep) -> str:
    """One line per run: index, state, name, overrides; then the count per state."""
    states = [sweep.state(r) for r in sweep.runs]
    lines = [f"{r.index:>4}  {s:<8}  {r.name}  {' '.join(r.overrides[:-1])}" for r, s in zip(sweep.runs, states)]
    counts = ", ".join(f"{states.count(s)} {s}" for s in STATES if s in states)
    failed = [r.name for r, s in zip(sweep.runs, states) if s == "failed"]
    lines.append(f"{len(sweep.runs)} runs: {counts}" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return "\n".join(lines)
