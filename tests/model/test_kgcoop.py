"""KgCoOp against a reference written from the official code's math (htyao89/KgCoOp ``trainers/kgcoop.py``):
the context starts as the embeddings of "a photo of a" (``embedding[0, 1:1+n]``); prompts
``[SOS] ctx <class>. [EOS]`` through the text encoder; ``logits = exp(s) · cos(image, text)``;
``loss = CE(logits, y) + w · (1 − mean_c cos(text_c, text_old_c))`` with ``text_old`` frozen CLIP's features
of the hand-crafted template. Loss, every gradient and two SGD steps equal within 1e-5 relative; the paper's
parameter count for RN50 on General-10 (20,480) is in test_methods.py."""

import pytest
import torch
import torch.nn.functional as F

from softcpt_dist.config import ConfigError, MethodConfig, PromptConfig
from softcpt_dist.data.tasks import TaskGroup, TaskSpec
from softcpt_dist.model import build_method
from softcpt_dist.model.classifier import PromptClassifier
from softcpt_dist.model.loss import TaskTargets
from softcpt_dist.model.text_encoder import TextEncoder
from tiny_clip import tiny_clip

TASK = TaskSpec("pets", "pet breed", ("abyssinian", "beagle", "pug"), template="a photo of a {}, a type of pet.")
GROUP = TaskGroup([TASK])
W = 8.0


def _official_loss(model, tokenizer, ctx, image_features, labels):
    prompts = tokenizer([f"a photo of a {c}." for c in TASK.classnames])
    emb = model.token_embedding(prompts).detach().clone()
    emb = torch.cat([emb[:, :1], ctx.unsqueeze(0).expand(len(TASK.classnames), -1, -1), emb[:, 5:]], dim=1)
    text = TextEncoder(model, "dense")(emb, prompts.argmax(dim=-1))
    with torch.no_grad():
        old = model.encode_text(tokenizer([TASK.template.format(c) for c in TASK.classnames]))
    text_n = text / text.norm(dim=-1, keepdim=True)
    image_n = image_features / image_features.norm(dim=-1, keepdim=True)
    logits = model.logit_scale.exp() * image_n @ text_n.t()
    old = old / old.norm(dim=-1, keepdim=True)
    score = 1.0 - torch.mean(torch.nn.CosineSimilarity(dim=1, eps=1e-07)(text_n, old))
    return F.cross_entropy(logits, labels) + W * score


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


def test_loss_gradients_and_two_steps_equal_the_official_kgcoop():
    model, tokenizer, backbone = tiny_clip()
    method = build_method(backbone, GROUP, MethodConfig(name="kgcoop", kg_weight=W), PromptConfig(n_ctx=4))
    classifier = PromptClassifier(backbone, method)
    with torch.no_grad():
        start = model.token_embedding(tokenizer(["a photo of a"]))[0, 1:5]
    assert torch.equal(method.ctx[0].detach(), start)
    reference_ctx = start.clone().requires_grad_(True)
    image_features = torch.randn(4, backbone.embed_dim)
    labels = torch.tensor([0, 2, 1, 2])
    targets = TaskTargets(torch.zeros(4, dtype=torch.long), GROUP.class_task(), labels)
    ours_opt = torch.optim.SGD([method.ctx], lr=0.01, momentum=0.9)
    ref_opt = torch.optim.SGD([reference_ctx], lr=0.01, momentum=0.9)
    for step in range(2):
        ours = classifier(image_features=image_features, targets=targets).loss
        reference = _official_loss(model, tokenizer, reference_ctx, image_features, labels)
        assert _rel(ours.detach(), reference.detach()) <= 1e-5, step
        ours_opt.zero_grad(), ref_opt.zero_grad()
        ours.backward(), reference.backward()
        assert _rel(method.ctx.grad[0], reference_ctx.grad) <= 1e-5, step
        ours_opt.step(), ref_opt.step()
        assert _rel(method.ctx[0].detach(), reference_ctx.detach()) <= 1e-5, step
    # no penalty in evaluation (no targets): the predictions only
    assert classifier(image_features=image_features, targets=TaskTargets(targets.tasks, targets.class_task)).loss is None


def test_the_context_count_must_fit_the_phrase(tiny_backbone):
    with pytest.raises(ConfigError, match=r"method.name=kgcoop starts its context from 'a photo of a' \(4 tokens\): "
                                          r"set prompt.n_ctx=4 \(it is 16\)"):
        build_method(tiny_backbone, GROUP, MethodConfig(name="kgcoop"), PromptConfig())
