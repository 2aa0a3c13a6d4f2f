"""Reading learned prompts: the vocabulary tokens nearest to each context vector (the official
``interpret_prompt.py``: Euclidean distance to every row of the frozen token-embedding table, the ``k``
smallest). Context vectors are free points in embedding space, so the nearest words are a reading aid,
not what the text encoder sees."""

from __future__ import annotations

from typing import Dict, List

import torch

from softcpt_dist.data.tasks import TaskGroup


def nearest_words(ctx: torch.Tensor, embedding: torch.Tensor, decoder: Dict[int, str], k: int) -> List[List[Dict]]:
    """For each vector of ``ctx [n, D]``: its ``k`` nearest tokens of ``embedding [V, D]`` as
    ``{"token", "distance"}`` (nearest first); ``decoder`` maps a token id to its BPE text ("</w>" ends a word)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    distance = torch.cdist(ctx.float(), embedding.float())
    values, index = torch.topk(distance, min(k, embedding.shape[0]), dim=1, largest=False, sorted=True)
    return [[{"token": decoder[int(i)], "distance": float(d)} for d, i in zip(row_d, row_i)]
            for row_d, row_i in zip(values, index)]


def method_contexts(method, group: TaskGroup) -> Dict[str, torch.Tensor]:
    """Every context of a prompt method, learned or generated, by a readable name -> ``[n_ctx, D]``:
    CoOp's contexts; SoftCPT's task and class contexts and the class-prompt contexts its meta network
    generates (one per task for NA variants, one per class for CA/CS). ``group``: the method's tasks."""
    out: Dict[str, torch.Tensor] = {}
    with torch.no_grad():
        if hasattr(method, "meta_net"):
            if hasattr(method, "task_ctx"):
                names = group.task_names if method.task_specific else ["all tasks"]
                out.update({f"task context ({n})": c for n, c in zip(names, method.task_ctx)})
            if hasattr(method, "class_ctx"):
                names = group.classnames if method.class_specific else ["all classes"]
                out.update({f"class context ({n})": c for n, c in zip(names, method.class_ctx)})
            ctx, owner = method.context_groups()
            if method.class_aware:
                out.update({f"generated ({t.key}: {c})": ctx[i] for i, (t, c) in
                            enumerate((t, c) for t in group.tasks for c in t.classnames)})
            else:
                out.update({f"generated ({t.key})": ctx[i] for i, t in enumerate(group.tasks)})
        elif hasattr(method, "ctx"):
            mode = getattr(method, "mode", "")
            names = {"CA": [t.key for t in group.tasks], "CS": group.classnames}.get(mode, ["all classes"])
            out.update({f"context ({n})": c for n, c in zip(names, method.ctx)})
    return out
