"""The paper's result tables from finished runs: ``softcpt-dist report RUNS...``.

Each run folder's ``results.json`` (what a run scored) and ``config.yaml`` (which benchmark, seed,
shots) is one sample. Per benchmark (with architecture and split), a table of methods x shots gives
the group score (the unweighted mean over tasks) as mean ± std over seeds, and an average column
over the shots; per benchmark and shots, a table of methods x tasks. std is the sample standard
deviation (n - 1); a cell with fewer seeds than its table's others shows its count ("2/3 seeds")
instead of passing for a full average. Runs on the base half of the classes or tasks
(``data.subsample_*``) form their own benchmark ("general10 · base-to-new classes", "· unseen tasks")
with, per shots, a base / new / harmonic-mean table (CoCoOp's Table 1: H of the seed-averaged scores)
and the new half per task. Markdown, CSV (one row per cell: tasks, group mean, and ``new/<task>``,
``new/mean`` for the new half) and optionally LaTeX.
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from omegaconf import OmegaConf

MEAN = "mean"  # the group score's column name in per-task tables and the CSV
NEW = "new/"  # columns of a base run's scores on the new classes / tasks ("new/<task>", "new/mean")
NEW_MEAN = NEW + MEAN
PARAMS, MINUTES = "#params", "time (min)"  # the paper's cost columns: learnable elements, training minutes
# Of a base run (data.subsample_classes / subsample_tasks = base): the protocol and its two halves' names.
PROTOCOLS = {"classes": ("base-to-new classes", "base", "new"), "tasks": ("unseen tasks", "seen tasks", "unseen tasks")}


class ReportError(ValueError):
    """A run folder cannot be reported (missing or bad files, two runs of the same cell and seed)."""


@dataclass
class RunScores:
    path: Path
    benchmark: str
    arch: str
    split: str
    method: str
    shots: int
    seed: int
    tasks: Dict[str, float]  # task key -> score (%)
    mean: float
    new: Dict[str, float]  # a base run's scores on the new half: task key -> score, and MEAN (empty otherwise)
    cost: Dict[str, float]  # PARAMS (learnable elements) and MINUTES (training time), when the run recorded them


SPREADS = {"sample": "sample std over seeds (n − 1)", "population": "population std over seeds (n)",
           "ci95": "95 % confidence half-width over seeds (1.96 · population std / √n)"}


@dataclass(frozen=True)
class CellFormat:
    """How cells print: decimals, and the spread after ± (``SPREADS``)."""

    digits: int = 2
    spread: str = "sample"


@dataclass
class Cell:
    values: List[float]
    seeds: List[int]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def std(self) -> Optional[float]:
        return statistics.stdev(self.values) if len(self.values) > 1 else None

    def spread(self, kind: str = "sample") -> Optional[float]:
        """``sample`` std (n - 1), ``population`` std (n; the official parser's ``np.std``) or ``ci95``, the
        official parser's 95 % interval half-width 1.96 · population std / sqrt(n); None for one seed."""
        if len(self.values) < 2:
            return None
        if kind == "sample":
            return statistics.stdev(self.values)
        population = statistics.pstdev(self.values)
        if kind == "population":
            return population
        if kind == "ci95":
            return 1.96 * population / math.sqrt(len(self.values))
        raise ValueError(f"spread {kind!r} is not one of {list(SPREADS)}")

    def text(self, expected: int, fmt: "CellFormat" = None) -> str:
        fmt = fmt or CellFormat()
        digits, spread = fmt.digits, self.spread(fmt.spread)
        s = f"{self.mean:.{digits}f}" + (f" ± {spread:.{digits}f}" if spread is not None else "")
        return s + (f" ({len(self.values)}/{expected} seeds)" if len(self.values) < expected else "")


def find_runs(paths: Iterable[Path]) -> List[Path]:
    """Run folders: each path that holds a ``results.json``, else every folder below it that does."""
    found = []
    for path in map(Path, paths):
        if not path.exists():
            raise ReportError(f"{path} does not exist")
        if (path / "results.json").is_file():
            found.append(path)
        else:
            found += sorted(p.parent for p in path.rglob("results.json") if "checkpoints" not in p.parts)
    if not found:
        raise ReportError(f"no finished runs (folders with results.json) under {', '.join(map(str, paths))}")
    return found


def benchmark_name(data) -> str:
    """What a run's data config calls its benchmark: the task-group file's name for custom groups."""
    if data.get("group_file"):
        return Path(str(data.group_file)).stem
    return str(data.dataset)


def protocol(data) -> str:
    """The protocol of a run on part of its group: "" (all), e.g. "base-to-new classes", "unseen tasks"."""
    halves = [(what, str(data.get(f"subsample_{what}", "all"))) for what in ("tasks", "classes")]
    return ", ".join((PROTOCOLS[what][0] if half == "base" else f"{half} {what}") for what, half in halves
                     if half != "all")


def read_run(path: Path) -> RunScores:
    try:
        results = json.loads((path / "results.json").read_text())
        cfg = OmegaConf.load(path / "config.yaml")
        bench, proto = benchmark_name(cfg.data), protocol(cfg.data)
        new = results.get("new") or {}
        return RunScores(path, f"{bench} · {proto}" if proto else bench, str(results["arch"]), str(results["split"]),
                         str(results["method"]), int(results["shots"]), int(results["seed"]),
                         {k: float(v["value"]) for k, v in results["tasks"].items()}, float(results["mean"]),
                         {**{k: float(v["value"]) for k, v in new.get("tasks", {}).items()},
                          **({MEAN: float(new["mean"])} if new else {})},
                         {**({PARAMS: float(results["learnable_params"])} if "learnable_params" in results else {}),
                          **({MINUTES: float(results["train_seconds"]) / 60} if "train_seconds" in results else {})})
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ReportError(f"run folder {path}: cannot read its results.json / config.yaml ({err})") from None


Table = Dict[Tuple[str, int], Cell]  # (method, shots) -> cell, or (method, task) -> cell


def collect(runs: Sequence[RunScores]):
    """``{(benchmark, arch, split): {(method, shots): {column: Cell}}}`` with columns the tasks and MEAN."""
    groups: Dict[tuple, Dict[tuple, Dict[str, Cell]]] = defaultdict(dict)
    seen: Dict[tuple, Path] = {}
    for run in sorted(runs, key=lambda r: (r.benchmark, r.arch, r.split, r.method, r.shots, r.seed)):
        key = (run.benchmark, run.arch, run.split, run.method, run.shots, run.seed)
        if key in seen:
            raise ReportError(f"two runs of {run.method} on {run.benchmark} ({run.shots} shots, seed {run.seed}): "
                              f"{seen[key]} and {run.path}; report one of them")
        seen[key] = run.path
        cells = groups[(run.benchmark, run.arch, run.split)].setdefault((run.method, run.shots), {})
        columns = {**run.tasks, MEAN: run.mean, **{NEW + k: v for k, v in run.new.items()}, **run.cost}
        for column, value in columns.items():
            cell = cells.setdefault(column, Cell([], []))
            cell.values.append(value)
            cell.seeds.append(run.seed)
    return groups


def _shots_label(shots: int) -> str:
    return "all" if shots == 0 else str(shots)


def _markdown_table(header: List[str], rows: List[List[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _rows(cells, fmt: CellFormat):
    """Both tables of one benchmark: methods x shots (with the average) and, per shots, methods x tasks."""
    methods = sorted({m for m, _ in cells})
    shots = sorted({s for _, s in cells})
    expected = max(len(c[MEAN].values) for c in cells.values())
    costs = _has_costs(cells)
    main = []
    for m in methods:
        row = [m]
        means = []
        for s in shots:
            cell = cells.get((m, s), {}).get(MEAN)
            row.append(cell.text(expected, fmt) if cell else "—")
            if cell:
                means.append(cell.mean)
        avg = f"{statistics.fmean(means):.{fmt.digits}f}" if means else "—"
        row.append(avg + (f" ({len(means)}/{len(shots)} shots)" if len(means) < len(shots) else ""))
        if costs:
            row += _cost_cells(cells, m)
        main.append(row)
    per_task = {}
    for s in shots:
        tasks = list(dict.fromkeys(t for (m, k), c in cells.items() if k == s for t in c
                                   if t not in (MEAN, PARAMS, MINUTES) and not t.startswith(NEW)))
        rows = []
        for m in methods:
            c = cells.get((m, s))
            if c:
                rows.append([m] + [c[t].text(expected, fmt) if t in c else "—" for t in tasks + [MEAN]])
        per_task[s] = (tasks, rows)
    return shots, main, per_task


def _cost_cells(cells, method: str) -> List[str]:
    """The paper's cost columns of a method: its learnable elements, and its mean training minutes per run
    (over all its runs in the table)."""
    params = sorted({int(v) for (m, _), c in cells.items() if m == method and PARAMS in c for v in c[PARAMS].values})
    minutes = [v for (m, _), c in cells.items() if m == method and MINUTES in c for v in c[MINUTES].values]
    return [("/".join(f"{p:,}" for p in params) if params else "—"),
            f"{statistics.fmean(minutes):.1f}" if minutes else "—"]


def _has_costs(cells) -> bool:
    return any(PARAMS in c or MINUTES in c for c in cells.values())


def markdown(groups, fmt: CellFormat = CellFormat()) -> str:
    out = ["# Results", "", f"Scores in %, mean ± {SPREADS[fmt.spread]}; the group score is the unweighted mean "
           "over tasks; a cell with fewer seeds than the others of its table shows its count."]
    for (bench, arch, split), cells in sorted(groups.items()):
        shots, main, per_task = _rows(cells, fmt)
        out += ["", f"## {bench} · {arch} · {split}", "",
                _markdown_table(["method"] + [f"{_shots_label(s)} shots" for s in shots] + ["average"]
                                + ([PARAMS, MINUTES] if _has_costs(cells) else []), main)]
        for s in shots:
            tasks, rows = per_task[s]
            out += ["", f"### {bench} · {_shots_label(s)} shots, per task", "",
                    _markdown_table(["method"] + tasks + [MEAN], rows)]
        out += _new_half_tables(bench, cells, fmt)
    return "\n".join(out) + "\n"


def harmonic_mean(base: float, new: float) -> float:
    """CoCoOp's H of the averaged base and new scores (0 when either is 0)."""
    return 2 * base * new / (base + new) if base > 0 and new > 0 else 0.0


def _new_half_tables(bench: str, cells, fmt: CellFormat) -> List[str]:
    """Base runs scored on the new half: per shots, methods x (base, new, H) -- H is the harmonic mean of the
    seed-averaged base and new scores, as CoCoOp's Table 1 -- and the new half per task."""
    if not any(NEW_MEAN in c for c in cells.values()):
        return []
    proto = next((p for p in PROTOCOLS.values() if bench.endswith(p[0])), ("", "base", "new"))
    expected = max(len(c[MEAN].values) for c in cells.values())
    out = []
    for s in sorted({k for _, k in cells}):
        rows, new_tasks = [], []
        for m in sorted({m for m, k in cells if k == s}):
            c = cells[(m, s)]
            base, new = c[MEAN], c.get(NEW_MEAN)
            h = f"{harmonic_mean(base.mean, new.mean):.{fmt.digits}f}" if new else "—"
            rows.append([m, base.text(expected, fmt), new.text(expected, fmt) if new else "—", h])
            new_tasks += [t for t in c if t.startswith(NEW) and t != NEW_MEAN and t not in new_tasks]
        out += ["", f"### {bench} · {_shots_label(s)} shots: {proto[1]} / {proto[2]} / harmonic mean", "",
                _markdown_table(["method", proto[1], proto[2], "H"], rows)]
        task_rows = [[m] + [cells[(m, s)][t].text(expected, fmt) if t in cells[(m, s)] else "—"
                            for t in new_tasks + [NEW_MEAN]]
                     for m in sorted({m for m, k in cells if k == s}) if NEW_MEAN in cells[(m, s)]]
        out += ["", f"### {bench} · {_shots_label(s)} shots, {proto[2]} per task", "",
                _markdown_table(["method"] + [t[len(NEW):] for t in new_tasks] + [MEAN], task_rows)]
    return out


def csv_text(groups) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["benchmark", "arch", "split", "method", "shots", "task", "mean", "std", "n_seeds", "seeds",
                "population_std", "ci95"])
    for (bench, arch, split), cells in sorted(groups.items()):
        for (method, shots), columns in sorted(cells.items()):
            for task, cell in columns.items():
                w.writerow([bench, arch, split, method, shots, task, f"{cell.mean:.6f}",
                            "" if cell.std is None else f"{cell.std:.6f}", len(cell.values),
                            " ".join(map(str, cell.seeds)),
                            *("" if cell.spread(k) is None else f"{cell.spread(k):.6f}" for k in ("population", "ci95"))])
    return buf.getvalue()


def latex(groups, fmt: CellFormat = CellFormat()) -> str:
    out = []
    for (bench, arch, split), cells in sorted(groups.items()):
        shots, main, _ = _rows(cells, fmt)
        out += [f"% {bench}, {arch}, {split}", "\\begin{tabular}{l" + "r" * (len(shots) + 1 + 2 * _has_costs(cells)) + "}", "\\hline",
                "Method & " + " & ".join(f"{_shots_label(s)} shots" for s in shots) + " & Average"
                + (" & \\#params & Time (min)" if _has_costs(cells) else "") + " \\\\", "\\hline"]
        out += [" & ".join(c.replace("±", "$\\pm$").replace("_", "\\_") for c in row) + " \\\\" for row in main]
        out += ["\\hline", "\\end{tabular}", ""]
    return "\n".join(out)


def write_report(paths: Iterable[Path], out: Optional[Path] = None, with_latex: bool = False,
                 digits: int = 2, spread: str = "sample") -> str:
    """Read the runs under ``paths``; write report.md / report.csv (/ report.tex) into ``out``; return the
    Markdown. ``spread``: what follows ± in the tables (``SPREADS``; the CSV has all three)."""
    if spread not in SPREADS:
        raise ReportError(f"--spread {spread!r} is not one of {list(SPREADS)}")
    fmt = CellFormat(digits, spread)
    groups = collect([read_run(p) for p in find_runs(paths)])
    text = markdown(groups, fmt)
    if out is not None:
        from softcpt_dist.files import atomic_write_text
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "report.md", text)
        atomic_write_text(out / "report.csv", csv_text(groups))
        if with_latex:
            atomic_write_text(out / "report.tex", latex(groups, fmt))
    return text
