"""The forward path: everything that runs inside the engine's ``forward()``.

Library API (stable)::

    from softcpt_dist.model import build_backbone, build_method, PromptClassifier, multitask_cross_entropy

    backbone = build_backbone(ModelConfig(arch="ViT-B-16", pretrained="openai"))
    model = PromptClassifier(backbone, build_method(backbone, group, MethodConfig(variant="NATA")))
    logits = model(images)                      # [B, classes of all tasks]
    loss = multitask_cross_entropy(logits, tasks, group.global_labels(tasks, labels), group.class_task())
    # or fused (Triton cosine cross-entropy where kernels.enabled allows; no logits matrix):
    loss, preds = model(images, targets=TaskTargets(tasks, group.class_task(), group.global_labels(tasks, labels)))
"""

from softcpt_dist.model.backbone import CLIPBackbone, build_backbone
from softcpt_dist.model.classifier import PromptClassifier, encode_images
from softcpt_dist.model.loss import (TaskScores, TaskTargets, cosine_logits, multitask_cross_entropy,
                                     within_task_argmax, within_task_mask)
from softcpt_dist.model.methods import METHODS, Method, build_method, method_class, method_label
from softcpt_dist.model.weights import WeightsError

__all__ = ["CLIPBackbone", "METHODS", "Method", "PromptClassifier", "TaskScores", "TaskTargets", "WeightsError",
           "build_backbone", "build_method", "cosine_logits", "encode_images", "method_class", "method_label",
           "multitask_cross_entropy",
           "within_task_argmax", "within_task_mask"]
