"""Linear probe on frozen image features, one multinomial logistic regression per task.

Follows CoOp's ``lpclip``: raw (unnormalized) image features, L2-regularised logistic regression
(sklearn's objective ``C * sum(CE) + ||W||^2 / 2``, solved here with L-BFGS in torch), the
inverse strength ``C`` chosen on the validation split by a coarse grid followed by a log-scale
bisection, and the test score of the classifier fit on the training split with that ``C``.
Scores use each task's own metric (the official SoftCPT script swaps its two metric names; we
do not reproduce that).
"""

from __future__ import annotations

import logging
import math
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from softcpt_dist.config import MethodConfig
from softcpt_dist.data.tasks import TaskGroup
from softcpt_dist.metrics import group_metrics, task_metric
from softcpt_dist.model.classifier import encode_images
from softcpt_dist.model.methods.base import Method

logger = logging.getLogger(__name__)


@torch.no_grad()
def extract_features(backbone, loader: DataLoader) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    feats, tasks, labels = [], [], []
    for inputs, t, y, _ in loader:
        feats.append(encode_images(backbone, inputs).float().cpu())
        tasks.append(t)
        labels.append(y)
    return torch.cat(feats), torch.cat(tasks), torch.cat(labels)


def fit_logistic_regression(x: torch.Tensor, y: torch.Tensor, num_classes: int, c: float,
                            max_iter: int = 1000) -> Tuple[torch.Tensor, torch.Tensor]:
    """Minimize ``C * sum_i CE(W x_i + b, y_i) + ||W||^2 / 2`` (bias unpenalized), as sklearn does."""
    x = x.double()
    w = torch.zeros(x.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, tolerance_grad=1e-7, tolerance_change=1e-10,
                            history_size=20, line_search_fn="strong_wolfe")
    # Divide the objective by C * n so its scale stays moderate for every C.
    scale = 1.0 / (c * x.shape[0])

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ w + b, y, reduction="sum") / x.shape[0] + 0.5 * scale * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def _score(wb, x, y, num_classes, metric) -> float:
    w, b = wb
    return task_metric((x.double() @ w + b).argmax(1), y, num_classes, metric)


def search_c(train: Tuple[torch.Tensor, torch.Tensor], val: Tuple[torch.Tensor, torch.Tensor], num_classes: int,
             metric: str, grid: Sequence[float], steps: int, max_iter: int) -> Tuple[float, Tuple]:
    """CoOp's search: best grid value, then ``steps`` bisections in log10 space on [C/10, 10 C]."""
    fit = lambda c: fit_logistic_regression(*train, num_classes, c, max_iter)  # noqa: E731
    scores = [(_score(fit(c), *val, num_classes, metric), c) for c in grid]
    best_score, c_peak = max(scores, key=lambda s: s[0])  # ties: the first grid value, as CoOp's argmax
    lo, hi = math.log10(c_peak) - 1, math.log10(c_peak) + 1
    c_final, clf_final = c_peak, fit(c_peak)
    for _ in range(steps):
        clf_lo, clf_hi = fit(10 ** lo), fit(10 ** hi)
        s_lo, s_hi = _score(clf_lo, *val, num_classes, metric), _score(clf_hi, *val, num_classes, metric)
        if s_lo < s_hi:
            c_final, clf_final, lo = 10 ** hi, clf_hi, (lo + hi) / 2
        else:
            c_final, clf_final, hi = 10 ** lo, clf_lo, (lo + hi) / 2
    return c_final, clf_final


class LinearProbe(Method):
    """No prompts: ``fit`` fits and scores one logistic regression per task on image features."""

    name = "linear_probe"
    trains_prompts = False
    fits = True
    splits = ("train", "val")  # what ``fit`` reads besides the evaluation split

    @classmethod
    def fit(cls, backbone, group: TaskGroup, loaders: Dict[str, DataLoader], cfg: MethodConfig,
            eval_split: str) -> Tuple[Dict, Dict]:
        """Group metrics on ``eval_split`` and, for results.json, the C chosen per task and the fitted weights'
        element count (``learnable_params``: a (D + 1) x C_t classifier per task)."""
        results, chosen = run_linear_probe(backbone, group, loaders, cfg.lp_c_grid, cfg.lp_search_steps,
                                           cfg.lp_max_iter, eval_split)
        dim = backbone.embed_dim
        return results, {"chosen_C": chosen, "learnable_params": sum((dim + 1) * t.num_classes for t in group.tasks)}


def run_linear_probe(backbone, group: TaskGroup, loaders: Dict[str, DataLoader], grid: Sequence[float],
                     steps: int, max_iter: int, eval_split: str = "test") -> Tuple[Dict, List[Dict]]:
    """Fit one probe per task; returns group metrics on ``eval_split`` and the chosen C per task."""
    feats = {split: extract_features(backbone, loader) for split, loader in loaders.items()}
    all_tasks, all_labels, all_preds, chosen = [], [], [], []
    for i, task in enumerate(group.tasks):
        part = {s: (f[0][f[1] == i], f[2][f[1] == i]) for s, f in feats.items()}
        c, clf = search_c(part["train"], part["val"], task.num_classes, task.metric, grid, steps, max_iter)
        x, y = part[eval_split]
        preds = (x.double() @ clf[0] + clf[1]).argmax(1)
        all_tasks.append(torch.full_like(y, i))
        all_labels.append(y)
        all_preds.append(preds)
        chosen.append({"task": task.key, "C": c})
        logger.info("linear probe %s: C=%.3g", task.key, c)
    results = group_metrics(group, torch.cat(all_tasks), torch.cat(all_labels), torch.cat(all_preds))
    return results, chosen
