"""``softcpt-dist data check``: validate a data root against a group config before a long job.

Reads the group (every structural problem is an error naming the file), then reports per task the
classes and image counts per split, the few-shot subset sizes, classes with fewer than K training
images, and every listed image that is missing or cannot be decoded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

from softcpt_dist.config import DataConfig
from softcpt_dist.data.loading import (VAL_SHOTS_MAX, check_files_exist, empty_classes, fewshot_seed, find_unreadable,
                                       read_dataset)
from softcpt_dist.data.fewshot import fewshot_subset
from softcpt_dist.data.tasks import DataError


@dataclass
class CheckReport:
    lines: List[str] = field(default_factory=list)
    problems: List[str] = field(default_factory=list)  # reasons the data is not fit to run as configured
    notes: List[str] = field(default_factory=list)  # worth knowing, not blocking

    def text(self) -> str:
        out = list(self.lines)
        for title, items in (("notes", self.notes), ("problems", self.problems)):
            if items:
                out += ["", f"{title} ({len(items)}):"] + [f"  - {x}" for x in items]
        out += ["", "OK" if not self.problems else f"{len(self.problems)} problem(s) found"]
        return "\n".join(out)


def check_data(dcfg: DataConfig, seed: int, decode: bool = True, eval_split: str = "test") -> CheckReport:
    """The data check of ``data`` for a run seeded ``seed`` (few-shot subsets depend on it) that evaluates
    on ``eval_split``: classes without images there, as in ``train`` and ``test``, are problems."""
    data = read_dataset(dcfg)
    report = CheckReport(notes=list(data.problems))
    group, shots = data.group, dcfg.shots
    counts = {s: data.counts(s) for s in ("train", "val", "test")}
    fs_seed = fewshot_seed(dcfg, seed)
    _, short = fewshot_subset(data.splits["train"], shots, fs_seed, group) if shots else ([], {})
    report.lines.append(f"dataset {dcfg.dataset} at {dcfg.root}: {len(group)} tasks, {group.num_classes} classes"
                        + (f", {shots}-shot (val {min(shots, VAL_SHOTS_MAX)}), few-shot seed {fs_seed}" if shots else ""))
    header = f"{'task':<22} {'classes':>7} {'train':>7} {'val':>6} {'test':>7} {'fs train':>8} {'fs val':>6}  name"
    report.lines += ["", header, "-" * len(header)]
    for t, task in enumerate(group.tasks):
        tr, va, te = (counts[s][t] for s in ("train", "val", "test"))
        fs_tr = sum(min(n, shots) for n in tr) if shots else sum(tr)
        fs_va = sum(min(n, min(shots, VAL_SHOTS_MAX)) for n in va) if shots else sum(va)
        report.lines.append(f"{task.key:<22} {task.num_classes:>7} {sum(tr):>7} {sum(va):>6} {sum(te):>7} "
                            f"{fs_tr:>8} {fs_va:>6}  {task.name}")
        if not sum(va):
            report.notes.append(f"task {task.key}: no validation images (linear-probe C search needs them)")
    report.problems += [p for split in dict.fromkeys(("train", "test", eval_split)) for p in empty_classes(data, split)]
    for (t, c), n in sorted(short.items()):
        report.notes.append(f"task {group.tasks[t].key}: class {group.tasks[t].classnames[c]!r} has {n} training "
                            f"images (< {shots} shots)")
    n_images = len({s.path for v in data.splits.values() for s in v})
    if decode:
        bad = find_unreadable(data.splits, dcfg.num_workers)
        report.problems += [f"unreadable image {p}: {r}" for p, r in bad]
        report.lines.append(f"\n{n_images} distinct image files listed and decoded, {len(bad)} unreadable")
    else:
        try:
            check_files_exist(data.splits)
        except DataError as err:
            report.problems.append(str(err))
        report.lines.append(f"\n{n_images} distinct image files listed (existence checked, not decoded)")
    return report
