"""Frozen backbone + prompt method as one module: images -> per-task cosine logits.

One top-level module owns every parameter (frozen and learnable), so a ZeRO-3 engine can wrap it;
all CLIP computation happens inside submodule ``forward()`` calls.
"""

from __future__ import annotations

from typing import Dict, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from softcpt_dist import distributed as D
from softcpt_dist.config import KernelsConfig, TextConfig
from softcpt_dist.model.class_shards import SavedBytes, class_shards
from softcpt_dist.model.loss import (TaskScores, TaskTargets, column_positions, cosine_cross_entropy,
                                     cosine_logits, multitask_cross_entropy, within_task_argmax, within_task_predict)
from softcpt_dist.model.share_loss import class_parallel_scores, share_logits
from softcpt_dist.step_phases import NULL_TIMER


def encode_images(backbone: nn.Module, inputs: torch.Tensor, tokens: bool = False) -> torch.Tensor:
    """Frozen image features of a batch: images ``[B, C, H, W]`` are encoded, cached features
    ``[B, D]`` (from the feature cache) pass through; with ``tokens``, the per-position features
    ``[B, 1 + M, E]`` of the images (pooled first)."""
    if tokens:
        if inputs.dim() != 4:
            raise ValueError(f"per-position image features need images [B, C, H, W], not inputs of shape "
                             f"{tuple(inputs.shape)} (cached features hold pooled features only)")
        with torch.no_grad():
            return backbone.image_tokens(inputs)
    if inputs.dim() == 2:
        return inputs.to(backbone.device)
    with torch.no_grad():
        return backbone.image_encoder(inputs)


def scores_shares(text: TextConfig, method) -> bool:
    """Whether sharded training forwards score on class shares (``text.scoring=shares``), except for a method
    scoring per-position image features (PLOT: gathering a batch's local features costs more than its task's
    class features below B x M / N classes, 3,136 on ViT-B/16 at batch 32; docs/distributed.md)."""
    return text.scoring == "shares" and not getattr(method, "uses_local_features", False)


class PromptClassifier(nn.Module):
    """``forward(images)`` -> cosine logits over the method's classes; the backbone never trains.

    ``text``: with ``text.shard`` on (``auto``: more than one rank in the process group), each
    rank encodes a share of the classes and the features are all-gathered (``class_shards.py``);
    all ranks must then call ``forward``/``class_features`` together. ``kernels``: whether the loss
    and predictions use the fused cosine cross-entropy kernel (``kernels/cosine_ce.py``).
    """

    def __init__(self, backbone: nn.Module, method: nn.Module, text: Optional[TextConfig] = None,
                 kernels: Optional[KernelsConfig] = None):
        super().__init__()
        self.backbone = backbone
        self.method = method
        self.kernels = (kernels or KernelsConfig()).enabled
        # An image-conditional method (CoCoOp) encodes each image's own prompts: every rank its own images'.
        self.image_conditional = bool(getattr(method, "image_conditional", False))  # a Method ClassVar
        # A method scoring per-position image features (PLOT): image_features are then [B, 1 + M, E].
        self.local_features = bool(getattr(method, "uses_local_features", False))
        # A gradient-projecting method (ProGrad) needs the logits for its guide loss: the PyTorch loss path.
        self.projects_gradient = bool(getattr(method, "projects_gradient", False))
        text = text or TextConfig()
        self.shards = None if self.image_conditional else class_shards(text)
        self.shares_scoring = scores_shares(text, method)
        # Autograd-saved bytes of the latest measured class-feature forward (its backward's memory): measured
        # only while measure_activations is set (a saved-tensor hook; the training loop sets it for the last
        # step of each epoch, whose record reports it).
        self.measure_activations = False
        self.activation_bytes = 0
        self.timer = NULL_TIMER  # the profiler's PhaseTimer (softcpt-dist profile): image / text_forward / loss
        # The latest training forward's guide loss of a gradient-projecting method (ProGrad), for the engine.
        self.guide_loss: Optional[torch.Tensor] = None

    def class_features(self, class_index: Optional[torch.Tensor] = None,
                       image_features: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Raw text features of the selected global classes (default all) ``[C', E]``, sharded over ranks
        when text sharding is on; of an image-conditional method, ``[B, C', E]`` for ``image_features``."""
        return self._measured(lambda: self._class_features(class_index, image_features))

    def _measured(self, encode):
        """``encode()``, its autograd-saved bytes measured while ``measure_activations`` is set."""
        if not (self.measure_activations and torch.is_grad_enabled()):
            return encode()
        with SavedBytes() as saved:
            out = encode()
        self.activation_bytes = saved.bytes
        return out

    def _class_features(self, class_index: Optional[torch.Tensor], image_features: Optional[torch.Tensor]):
        if self.image_conditional:
            return self.method(class_index, image_features)
        if self.shards is None:
            return self.method(class_index)
        return self.shards.features(self.method, class_index)

    def text_counters(self) -> Dict[str, int]:
        """Running totals of this rank's text-side work: token positions encoded, bytes all-gathered
        (forward) and gradient bytes reduced (backward)."""
        shards = self.shards
        return {"positions": self.backbone.text_encoder.positions_encoded,
                "gathered_bytes": shards.gathered_bytes if shards else 0,
                "reduced_bytes": shards.reduced_bytes if shards else 0,
                "image_bytes": shards.image_bytes if shards else 0,
                "stats_bytes": shards.stats_bytes if shards else 0}

    def scores_on_shares(self, class_features: Optional[torch.Tensor], targets: Optional[TaskTargets]) -> bool:
        """Whether a forward scores the global batch on this rank's class share (``share_loss.py``) instead of
        gathering the class features: training forwards with text sharding on, where ``scores_shares``."""
        return (self.shards is not None and self.shares_scoring and class_features is None and targets is not None
                and targets.targets is not None)

    def forward(self, images: Optional[torch.Tensor] = None, *, image_features: Optional[torch.Tensor] = None,
                class_features: Optional[torch.Tensor] = None,
                class_index: Optional[torch.Tensor] = None,
                targets: Optional[TaskTargets] = None) -> Union[torch.Tensor, TaskScores]:
        """Logits ``[B, C']``, or with ``targets`` the ``TaskScores`` (loss when ``targets.targets`` is given,
        within-task predictions) without the logits matrix where the fused kernel runs. ``images`` may
        already be cached features ``[B, D]`` (2-D inputs skip the image encoder); pass
        ``image_features``/``class_features`` to skip an encoder explicitly."""
        if image_features is None:
            with self.timer("image"):
                image_features = encode_images(self.backbone, images, self.local_features)
        if self.scores_on_shares(class_features, targets):
            return self._class_parallel_scores(image_features, class_index, targets)
        if class_features is None or self.image_conditional:
            with self.timer("text_forward"):
                class_features = self.class_features(class_index, image_features if self.image_conditional else None)
        scale = self.backbone.logit_scale
        if self.image_conditional:
            return self._per_image_scores(image_features, class_features, scale, class_index, targets)
        if self.local_features:
            with self.timer("loss"):
                training = targets is not None and targets.targets is not None
                logits = self.method.scores(image_features, class_features, scale, synchronized=training)
                return self._from_logits(logits, class_features, class_index, targets)
        dtype = self.logits_dtype
        if targets is None:
            return cosine_logits(image_features, class_features, scale, dtype)
        if targets.targets is None:
            return TaskScores(None, within_task_predict(image_features, class_features, scale, targets.tasks,
                                                        targets.class_task, self.kernels, dtype))
        with self.timer("loss"):
            if self.projects_gradient:
                logits = cosine_logits(image_features, class_features, scale)
                self.guide_loss = self.method.guide_loss(image_features, logits, class_index, targets)
                return self._from_logits(logits, class_features, class_index, targets)
            loss, predictions = cosine_cross_entropy(image_features, class_features, scale, targets.tasks,
                                                     targets.targets, targets.class_task, targets.task_weights,
                                                     self.kernels, dtype)
            extra = self.method.loss_term(class_features, class_index)
            return TaskScores(loss if extra is None else loss + extra, predictions)

    def _class_parallel_scores(self, image_features: torch.Tensor, class_index: Optional[torch.Tensor],
                               targets: TaskTargets) -> TaskScores:
        """The loss of the global batch and this rank's predictions, scored on this rank's class share: the
        image features are gathered, the class features never (``share_loss.py``)."""
        shards, method = self.shards, self.method
        global_targets = targets.targets if class_index is None else class_index[targets.targets]
        with self.timer("text_forward"):
            step = shards.select(method, class_index, len(image_features))
            # the images travel while the share encodes: nothing of the gather depends on the text side
            pending = shards.start_batch(image_features, targets.tasks, global_targets, step.sizes,
                                         targets.task_weights)
            share = self._measured(lambda: shards.share(method, step))
        with self.timer("loss"):
            batch = pending.wait()
            terms = method.class_loss_terms(share.features, share.class_ids)
            logits = extra = None
            if self.projects_gradient:  # fp32 logits, as on the gathered path; the guide's statistics travel along
                logits = share_logits(batch.image_features, share.features, self.backbone.logit_scale)
                extra = method.share_guide_statistics(batch.image_features, logits, share.class_ids, batch.tasks,
                                                      share.contributes)
            elif self.logits_dtype != torch.float32:  # fp16: the official code's logits
                logits = share_logits(batch.image_features, share.features, self.backbone.logit_scale,
                                      self.logits_dtype)
            scores = class_parallel_scores(share.features, share.class_ids, method.class_task, batch,
                                           self.backbone.logit_scale, share.contributes,
                                           None if terms is None else terms * share.class_weight, self.kernels,
                                           logits, extra)
            if self.projects_gradient:
                self.guide_loss = method.guide_from_shares(scores.extra, batch.weights)
            per_sample = 4 + (0 if extra is None else len(extra))
            shards.stats_bytes += D.all_reduce_traffic(shards.world_size * (per_sample * len(batch.tasks) + 1) * 4,
                                                       shards.world_size)
            loss, predicted = scores.loss.to(self.logits_dtype), scores.predicted  # fp16: the official loss's rounding
            if class_index is not None:  # this rank's columns
                predicted = column_positions(class_index, method.num_classes)[predicted]
        return TaskScores(loss, predicted)

    def _per_image_scores(self, image_features: torch.Tensor, class_features: torch.Tensor, scale: torch.Tensor,
                          class_index: Optional[torch.Tensor], targets: Optional[TaskTargets]):
        """Logits, or ``TaskScores``, of an image-conditional method: image ``b`` against its own class
        features ``class_features[b]``; the same multi-task loss on the PyTorch path (no fused kernel: the
        class features differ per image)."""
        with self.timer("loss"):
            img = F.normalize(image_features.float(), dim=-1)
            txt = F.normalize(class_features.float(), dim=-1)
            logits = scale.float().exp() * torch.einsum("bd,bcd->bc", img, txt)
            return self._from_logits(logits, class_features, class_index, targets)

    def _from_logits(self, logits: torch.Tensor, class_features: torch.Tensor, class_index: Optional[torch.Tensor],
                     targets: Optional[TaskTargets]):
        """The logits, or with ``targets`` the ``TaskScores`` from them on the PyTorch path: within-task
        predictions, and the multi-task loss (plus the method's term) when ``targets.targets`` is given."""
        if targets is None:
            return logits
        with torch.no_grad():
            predictions = within_task_argmax(logits, targets.tasks, targets.class_task)
        if targets.targets is None:
            return TaskScores(None, predictions)
        loss = multitask_cross_entropy(logits, targets.tasks, targets.targets, targets.class_task,
                                       targets.task_weights)
        extra = self.method.loss_term(class_features, class_index)
        return TaskScores(loss if extra is None else loss + extra, predictions)

    @property
    def logits_dtype(self) -> torch.dtype:
        """fp16 in ``model.precision=official_fp16`` (the official code's logits and loss), else fp32."""
        return torch.float16 if self.backbone.official_fp16 else torch.float32

    def learnable_parameters(self) -> Dict[str, nn.Parameter]:
        return self.method.learnable_parameters()

    def learnable_state_dict(self) -> Dict[str, torch.Tensor]:
        return {n: p.detach().cpu().clone() for n, p in self.learnable_parameters().items()}

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.train(False)
        return self
