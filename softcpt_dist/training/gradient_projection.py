"""The guide gradient of a gradient-projecting method (ProGrad), kept beside the engine's own.

The engine's gradient (``∇L_ce``) is reduced over ranks and summed over micro-batches by DeepSpeed; the guide
loss's gradient (``∇L_kd``) is taken with ``torch.autograd.grad`` on the same graph before the main backward,
summed over the micro-batches here and averaged over ranks in one all-reduce at the accumulation boundary. The
method's ``project`` then rewrites each learnable tensor's gradient before the optimizer step, so the update is
that of one process seeing the whole global batch, as the official single-GPU code does.
"""

from __future__ import annotations

from typing import List, Optional

import torch

from softcpt_dist import distributed as D


class GuideGradients:
    def __init__(self, model, grad_accum_steps: int):
        self.method = model.method
        self.params: List[torch.nn.Parameter] = list(model.learnable_parameters().values())
        self.grad_accum_steps = grad_accum_steps
        self.summed: Optional[torch.Tensor] = None  # the flat guide gradient of this update so far

    def accumulate(self, guide_loss: torch.Tensor) -> None:
        """Add this micro-batch's guide gradient (scaled as DeepSpeed scales the loss: by 1 / accumulation steps);
        the graph is kept for the main backward."""
        grads = torch.autograd.grad(guide_loss / self.grad_accum_steps, self.params, retain_graph=True,
                                    allow_unused=True)
        flat = torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1).float()
                          for p, g in zip(self.params, grads)])
        self.summed = flat if self.summed is None else self.summed + flat

    def project(self) -> None:
        """Average the guide over ranks and project every learnable tensor's (reduced) gradient against it."""
        if self.summed is None:
            return
        guide = D.all_reduce(self.summed) / D.world_size()
        self.summed = None
        offset = 0
        for p in self.params:
            part = guide[offset:offset + p.numel()].view_as(p).to(p.dtype)
            offset += p.numel()
            if p.grad is not None:
                p.grad.copy_(self.method.project(p.grad, part))
