"""The scaling study's PNGs (matplotlib, the ``plots`` extra), one panel per mode (strong | weak):

* ``throughput.png``: samples/s against ranks (log 2), each series solid, its ideal (linear from its
  smallest world size) dotted, the cost model's prediction dashed;
* ``efficiency.png``: throughput / ideal, with 100 % marked;
* ``memory.png``: peak memory per rank (the largest rank's);
* ``step_split.png``: each point's median step split into its phases, stacked.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, List

from softcpt_dist.profiling.summary import SPLIT

logger = logging.getLogger(__name__)


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _by(rows: List[Dict], key: str) -> Dict[str, List[Dict]]:
    out: Dict[str, List[Dict]] = {}
    for row in rows:
        out.setdefault(row[key], []).append(row)
    return out


def _panels(plt, modes, title: str):
    fig, axes = plt.subplots(1, len(modes), figsize=(6.4 * len(modes), 4.6), squeeze=False)
    fig.suptitle(title)
    return fig, dict(zip(modes, axes[0]))


def _rank_axis(ax, worlds) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(worlds))
    ax.set_xticklabels([str(w) for w in sorted(worlds)])
    ax.set_xlabel("ranks")
    ax.grid(True, alpha=0.3)


def draw(rows: List[Dict], out: Path) -> List[Path]:
    """Write the PNGs for ``rows`` (``scaling_study.collect``'s) into ``out``; returns their paths."""
    plt = _pyplot()
    if plt is None:
        logger.warning("matplotlib is not installed: scaling.csv only, no plots (pip install 'softcpt_dist[plots]')")
        return []
    modes = sorted({r["mode"] for r in rows})
    worlds = {r["world_size"] for r in rows}
    device = ", ".join(sorted({r["device"] for r in rows}))
    written = []
    plots = {"throughput": ("samples/s", "samples_per_s"), "efficiency": ("scaling efficiency (%)", "efficiency"),
             "memory": ("peak memory per rank (MiB)", "peak_memory_mib")}
    for name, (label, key) in plots.items():
        fig, axes = _panels(plt, modes, f"{label} vs ranks on {device}")
        for mode, ax in axes.items():
            for i, (series, members) in enumerate(_by([r for r in rows if r["mode"] == mode], "series").items()):
                color, x = f"C{i % 10}", [r["world_size"] for r in members]
                scale = 100.0 if key == "efficiency" else 1.0
                ax.plot(x, [scale * r[key] for r in members], "o-", color=color, label=series)
                if name == "throughput":
                    ax.plot(x, [r["ideal_samples_per_s"] for r in members], ":", color=color, label=f"{series}: ideal")
                    predicted = [(r["world_size"], r["predicted_samples_per_s"]) for r in members
                                 if r["predicted_samples_per_s"] is not None]
                    if predicted:
                        ax.plot(*zip(*predicted), "--", color=color, label=f"{series}: cost model")
            if name == "efficiency":
                ax.axhline(100.0, color="grey", lw=0.8)
                ax.set_ylim(bottom=0)
            if name == "memory":
                ax.set_ylim(0, 1.15 * max([r[key] for r in rows if r["mode"] == mode] + [1.0]))
            _rank_axis(ax, worlds)
            ax.set_ylabel(label)
            ax.set_title(f"{mode} scaling")
            ax.legend(fontsize=7)
        written.append(_save(fig, plt, out / f"{name}.png"))
    written.append(_step_split(plt, rows, out / "step_split.png", device))
    return written


def _step_split(plt, rows: List[Dict], path: Path, device: str) -> Path:
    fig, ax = plt.subplots(figsize=(max(6.4, 0.9 * len(rows) + 2), 4.6))
    labels = [f"{r['series']}\n{r['world_size']} rank(s)" for r in rows]
    bottom = [0.0] * len(rows)
    for i, phase in enumerate(SPLIT):
        heights = [r[f"{phase}_ms"] for r in rows]
        ax.bar(range(len(rows)), heights, bottom=bottom, color=f"C{i}", label=phase)
        bottom = [b + h for b, h in zip(bottom, heights)]
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(labels, fontsize=6, rotation=30, ha="right")
    ax.set_ylabel("median step (ms)")
    ax.set_title(f"where a step's time goes, rank 0, on {device}")
    ax.legend(fontsize=7)
    return _save(fig, plt, path)


def _save(fig, plt, path: Path) -> Path:
    tmp = path.with_name(f".{path.name}.tmp")
    fig.tight_layout()
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    tmp.replace(path)  # never a half-written PNG under the final name
    return path
