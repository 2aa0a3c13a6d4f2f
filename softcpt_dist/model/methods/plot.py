"""PLOT (Chen et al., ICLR 2023): several prompts per class, matched to the image's local features by optimal
transport.

Per task ``method.plot_prompts`` contexts (N; the official script's argument) of ``prompt.n_ctx`` vectors (16 in
the official script), N(0, ``prompt.init_std``) as its generic context, each task trained on its own. Prompt n
of class c is ``[SOS] ctx_n <class>. [EOS]``; its feature ``t_cn`` is L2-normalised, as are the image's M local
features ``x_m`` (``image_tokens.py``). With ``sim_mn = x_m · t_cn``, the transport plan ``T`` between the
uniform distributions over the M features and the N prompts for the cost ``1 − sim`` comes from Sinkhorn's
iterations on ``K = exp(−(1 − sim) / ε)`` (ε = 0.1; at most 100 iterations, stopping once the mean change of
the row scaling over the batch's (image, class) pairs is below 0.01; no gradient through the plan), and the
logit is ``exp(s) · Σ_mn T_mn sim_mn``: the official ``CustomCLIP.forward`` for every dataset but ImageNet.

In training, ranks agree on Sinkhorn's stopping mean (a scalar all-reduce per iteration), so any world size
trains as one process on the whole batch (with gradient accumulation, each micro-batch stops on its own);
evaluation batches (``train.eval_batch_size``) stop on their own.
The image features are recomputed from images at every step: the feature cache holds pooled features only.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from softcpt_dist import distributed as D
from softcpt_dist.config import Config, ConfigError, MethodConfig, PromptConfig
from softcpt_dist.data.tasks import TaskGroup
from softcpt_dist.model.image_tokens import local_features_refusal
from softcpt_dist.model.meta_net import context_vectors
from softcpt_dist.model.methods.base import Method
from softcpt_dist.model.prompts import ContextPromptBank

SINKHORN_EPS = 0.1  # the official CustomCLIP.eps
SINKHORN_MAX_ITER = 100  # the official max_iter
SINKHORN_THRESH = 1e-2  # the official stopping threshold on the mean change of the row scaling


class PLOT(Method):
    name = "plot"
    uses_local_features = True

    def __init__(self, backbone, group: TaskGroup, prompt: PromptConfig, method: MethodConfig):
        super().__init__(backbone, group, prompt, method)
        self.n_prompts, self.n_ctx = method.plot_prompts, prompt.n_ctx
        self.ctx = context_vectors(len(group) * self.n_prompts, prompt.n_ctx, backbone.ctx_dim, prompt.init_std)
        self.class_prompts = ContextPromptBank(group.classnames, prompt.n_ctx, backbone, prompt.class_token_position)

    @classmethod
    def per_task(cls, cfg: MethodConfig) -> bool:
        return True  # trained one dataset at a time, as the official code runs it

    @classmethod
    def transfers(cls, cfg: MethodConfig, to: str) -> bool:
        return to == "classes"  # contexts per task: any class of a seen task

    @classmethod
    def check_setup(cls, cfg: Config, backbone) -> None:
        if cfg.data.cache.enabled:
            raise ConfigError("method.name=plot matches prompts to every image position's feature; the feature cache "
                              "(data.cache.enabled=true) holds one pooled feature per image: set "
                              "data.cache.enabled=false (the image tower then runs at every step)")
        refusal = local_features_refusal(backbone.image_encoder.visual)
        if refusal is not None:
            raise ConfigError(f"method.name=plot needs per-position image features, which model.arch={cfg.model.arch} "
                              f"does not give: {refusal}")

    def forward(self, class_index: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Raw prompt features of the selected classes (default all), ``[C', N · E]``: class c's N features
        side by side (so that class shards gather whole classes)."""
        classes = torch.arange(self.num_classes, device=self.class_task.device) if class_index is None \
            else class_index.to(self.class_task.device)
        owner, prompts = self._prompts_of(classes)
        features = self.backbone.text_encoder(self.class_prompts(self.ctx, owner, prompts))
        return features.view(self.n_prompts, len(classes), -1).transpose(0, 1).reshape(len(classes), -1)

    def prompt_structures(self, class_index: torch.Tensor):
        owner, prompts = self._prompts_of(class_index)
        source, length, _ = self.class_prompts.structure(self.n_ctx, owner, prompts)
        return [(source, length)]

    def _prompts_of(self, classes: torch.Tensor):
        """The N prompts of each class, prompt-major (row ``n · C' + c``): their contexts (row of ``self.ctx``:
        task · N + n) and their class prompts."""
        n, c = self.n_prompts, len(classes)
        which = torch.arange(n, device=classes.device).repeat_interleave(c)
        return self.class_task[classes].repeat(n) * n + which, classes.repeat(n)

    def scores(self, image_tokens: torch.Tensor, class_features: torch.Tensor, logit_scale: torch.Tensor,
               synchronized: bool) -> torch.Tensor:
        """Logits ``[B, C']`` of images ``[B, 1 + M, E]`` (pooled feature first) against the classes' prompt
        features ``[C', N · E]``; ``synchronized``: ranks agree on Sinkhorn's stopping (all must call)."""
        local = F.normalize(image_tokens[:, 1:].float(), dim=-1)
        n_classes = class_features.shape[0]
        text = F.normalize(class_features.float().view(n_classes, self.n_prompts, -1), dim=-1)
        sim = torch.einsum("bme,cne->bcmn", local, text)
        with torch.no_grad():
            plan = sinkhorn(torch.exp(-(1.0 - sim) / SINKHORN_EPS).flatten(0, 1), synchronized)
        matched = (plan.view_as(sim) * sim).sum(dim=(2, 3))
        return logit_scale.float().exp() * matched


def sinkhorn(kernel: torch.Tensor, synchronized: bool = False) -> torch.Tensor:
    """Transport plans ``[P, M, N]`` between uniform marginals for Gibbs kernels ``[P, M, N]``, with the official
    stopping rule over all P pairs (with ``synchronized``, over every rank's pairs)."""
    pairs, m, n = kernel.shape
    u = kernel.new_full((pairs, m), 1.0 / m)
    v = kernel.new_full((pairs, n), 1.0 / n)
    r, c = torch.ones_like(u), torch.ones_like(v)
    total = D.all_reduce(torch.tensor([float(pairs * m)])) if synchronized else float(pairs * m)
    for _ in range(SINKHORN_MAX_ITER):
        r0 = r
        r = u / torch.matmul(kernel, c.unsqueeze(-1)).squeeze(-1)
        c = v / torch.matmul(kernel.transpose(1, 2), r.unsqueeze(-1)).squeeze(-1)
        change = (r - r0).abs().sum().reshape(1).cpu()
        if synchronized:
            change = D.all_reduce(change)
        if float(change / total) < SINKHORN_THRESH:
            break
    return r.unsqueeze(-1) * c.unsqueeze(-2) * kernel
