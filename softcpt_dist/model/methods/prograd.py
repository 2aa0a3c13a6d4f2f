"""ProGrad (Zhu et al., ICCV 2023): CoOp whose gradient never works against zero-shot CLIP's knowledge.

The context (``prompt.n_ctx`` vectors, 16 in the official runs; one per task, each task trained on its own, as
CoOp CA) starts as zeros followed by the token embeddings of its task's template before the class name (the
official ``CTX_INIT=True``: "a centered satellite photo of" for "a centered satellite photo of {}."); a template
that does not end in " {}." starts from "a photo of a", and ``prompt.ctx_init`` names one phrase for every task.
(The official code counts the phrase's words and takes that many tokens: with punctuation, "a type of pet, a
photo of a" is 8 words and 9 tokens, its last token stays a fixed word between the context and the class name;
here every token of the phrase is a context vector.)

Two losses per batch: the cross-entropy ``L_ce`` and the distillation loss to zero-shot CLIP (each task's
template), ``L_kd = T² · mean_b Σ_c −p_zs(c|b) log softmax(z_b / T)_c`` with both softmaxes at temperature ``T``
over the sample's own task's classes; the teacher reads the student's image features, in ``model.precision``
(fp32 by default, as the official teacher). The update uses ``∇L_ce`` of each learnable tensor, projected where
it conflicts with ``∇L_kd``: if ``cos(g_ce, g_kd) < 0``, ``g = g_ce − λ (g_ce · ĝ_kd) ĝ_kd``
(``method.prograd_lambda`` λ, ``method.prograd_temperature`` T; 1.0 and 1.0 in the official commands).

With class-parallel scoring (``text.scoring=shares``) each rank holds a share of the classes, and ``L_kd``
is put together from per-sample statistics of every share, as the cross-entropy is: with ``p`` the teacher's
softmax and ``z`` the student's logits over the sample's task, ``L_kd = T² (logsumexp(z/T) − Σ_c p_c z_c/T)``
(``Σ p = 1``), so each share sends the teacher's largest logit and sum of exponentials relative to it, the
student's ``z/T`` summed with those exponentials as weights, and the student's largest ``z/T`` and sum of
exponentials (``share_guide_statistics``, ``guide_from_shares``): five numbers per sample, in the loss's gather.

The training engine applies the projection to the full gradients, reduced over ranks and accumulated over
micro-batches (``TrainEngine``); ZeRO stages that partition the gradients, and DeepSpeed's bf16 optimizer (which
copies them during backward), are refused.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from softcpt_dist.config import ConfigError, EngineConfig, MethodConfig, PromptConfig
from softcpt_dist.data.tasks import TaskGroup, TaskSpec
from softcpt_dist.model.loss import TaskTargets, cosine_logits, within_task_mask
from softcpt_dist.model.methods.coop import CoOp
from softcpt_dist.model.methods.zeroshot import template_features
from softcpt_dist.model.share_loss import NEG_INF, merged_log_sum_exp, relative_exp, rescale, share_logits

PROGRAD_INIT = "a photo of a"  # the generic template "a photo of a {}." before its class name


class ProGrad(CoOp):
    name = "prograd"
    mode_in_label = False
    projects_gradient = True
    share_statistics = 5  # guide_statistics' rows

    def __init__(self, backbone, group: TaskGroup, prompt: PromptConfig, method: MethodConfig):
        super().__init__(backbone, group, replace(prompt, ctx_init=None), method)
        tasks = {"CA": group.tasks, "CS": [group.tasks[t] for t in group.class_task().tolist()],
                 "MT": [None]}[self.mode]
        phrases = [prompt.ctx_init or template_phrase(task) for task in tasks]
        self.ctx = nn.Parameter(torch.stack([padded_word_context(backbone, phrase, prompt.n_ctx)
                                             for phrase in phrases]))
        self.lam, self.temperature = method.prograd_lambda, method.prograd_temperature
        self.register_buffer("hand_features", template_features(backbone, group), persistent=False)

    @classmethod
    def check_engine(cls, method: MethodConfig, engine: EngineConfig) -> None:
        if engine.zero_stage > 0:
            raise ConfigError(f"method.name=prograd projects each learnable tensor's whole reduced gradient: it needs "
                              f"engine.zero_stage=0 (it is {engine.zero_stage}; ZeRO 1-3 partition the gradients)")
        if ((engine.deepspeed or {}).get("bf16") or {}).get("enabled", False):
            raise ConfigError("method.name=prograd projects the gradients the optimizer reads at its step: "
                              "engine.deepspeed.bf16 accumulates them into its own fp32 copies during backward; remove it")

    def guide_loss(self, image_features: torch.Tensor, logits: torch.Tensor, class_index: Optional[torch.Tensor],
                   targets: TaskTargets) -> torch.Tensor:
        """``L_kd``: the student's logits against zero-shot CLIP's, per sample over its own task's classes."""
        hand = self.hand_features if class_index is None else self.hand_features[class_index]
        with torch.no_grad():
            teacher = cosine_logits(image_features, hand, self.backbone.logit_scale)
        own = within_task_mask(targets.tasks, targets.class_task)
        t = self.temperature
        p_teacher = F.softmax(teacher.masked_fill(~own, float("-inf")) / t, dim=1)
        log_student = F.log_softmax(logits.float().masked_fill(~own, float("-inf")) / t, dim=1)
        per_sample = -(p_teacher * log_student.masked_fill(~own, 0.0)).sum(dim=1) * t * t
        if targets.task_weights is not None:
            per_sample = per_sample * targets.task_weights.to(per_sample.device)[targets.tasks]
        return per_sample.sum() / logits.shape[0]

    def share_guide_statistics(self, image_features: torch.Tensor, logits: torch.Tensor, class_ids: torch.Tensor,
                               tasks: torch.Tensor, contributes: bool = True) -> torch.Tensor:
        """``[5, B]``: ``L_kd``'s statistics of one share (``logits [B, C_s]``, the student's, of the global classes
        ``class_ids``) for the global batch's samples of ``tasks``; a stand-in share (``contributes=False``)
        has no column of any task."""
        own = (self.class_task[class_ids].unsqueeze(0) == tasks.unsqueeze(1)) & contributes
        with torch.no_grad():
            teacher = share_logits(image_features, self.hand_features[class_ids], self.backbone.logit_scale)
        return guide_statistics(logits.float(), teacher, own, self.temperature)

    def guide_from_shares(self, gathered: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """``L_kd`` of the global batch from every share's statistics ``[W, 5, B]``; ``weights [B]``: each
        sample's weight in the loss (``ShareBatch.weights``)."""
        return (combine_guide(gathered, self.temperature) * weights).sum()

    def project(self, grad: torch.Tensor, guide: torch.Tensor) -> torch.Tensor:
        """The official rule on one tensor: ``grad`` minus λ times its component along ``guide`` where the two
        point apart; unchanged otherwise."""
        guide_unit = guide / torch.linalg.norm(guide)
        if torch.dot((grad / torch.linalg.norm(grad)).flatten(), guide_unit.flatten()) < 0:
            return grad - self.lam * torch.dot(grad.flatten(), guide_unit.flatten()) * guide_unit
        return grad


def guide_statistics(student: torch.Tensor, teacher: torch.Tensor, own: torch.Tensor, temperature: float
                     ) -> torch.Tensor:
    """``[5, B]`` per sample over the columns ``own`` (``[B, C_s]``) of one share: the teacher's largest ``t/T``
    (-inf without a column) and its sum of exponentials relative to it, the student's ``z/T`` summed with those
    weights, and the student's largest ``z/T`` and sum of exponentials; only the weighted sum and the student's
    sum carry gradient."""
    s = (student / temperature).masked_fill(~own, NEG_INF)
    with torch.no_grad():
        t = (teacher / temperature).masked_fill(~own, NEG_INF)
        t_top, s_top = t.max(dim=1).values, s.max(dim=1).values
        weight = relative_exp(t, t_top)
    weighted = (weight * s.masked_fill(~own, 0.0)).sum(dim=1)
    return torch.stack([t_top, weight.sum(dim=1), weighted, s_top, relative_exp(s, s_top).sum(dim=1)])


def combine_guide(gathered: torch.Tensor, temperature: float) -> torch.Tensor:
    """Each sample's ``L_kd`` ``[B]`` from every share's ``guide_statistics`` ``[W, 5, B]``: ``T² (logsumexp(z/T) −
    Σ_c p_c z_c/T)``, the teacher's expectation and the student's log-sum-exp each merged over shares."""
    t_top, t_sum, weighted, s_top, s_sum = gathered.unbind(1)
    t_scale = rescale(t_top, t_top.max(dim=0).values)
    expected = (weighted * t_scale).sum(dim=0) / (t_sum * t_scale).sum(dim=0)
    return (merged_log_sum_exp(s_top, s_sum) - expected) * temperature * temperature


def template_phrase(task: Optional[TaskSpec]) -> str:
    """The words of ``task``'s template before its class name, where the template ends in " {}."; else the
    generic phrase (and for a context shared by all tasks, ``task=None``)."""
    if task is not None and task.template.endswith(" {}."):
        return task.template[:-len(" {}.")]
    return PROGRAD_INIT


def padded_word_context(backbone, words: str, n_ctx: int) -> torch.Tensor:
    """``[n_ctx, dim]``: zeros, then the token embeddings of ``words`` in the last positions."""
    ids = backbone.tokenizer.encode(words.replace("_", " "))
    if len(ids) > n_ctx:
        raise ConfigError(f"method.name=prograd starts a context from {words!r} ({len(ids)} tokens): more than "
                          f"prompt.n_ctx={n_ctx}; raise prompt.n_ctx or set prompt.ctx_init to a shorter phrase")
    ctx = torch.zeros(n_ctx, backbone.ctx_dim)
    with torch.no_grad():
        ctx[n_ctx - len(ids):] = backbone.token_embedding(torch.tensor(ids, device=backbone.device)).float().cpu()
    return ctx
