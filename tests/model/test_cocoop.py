"""CoCoOp against a reference written from the official code's math (KaiyangZhou/CoOp ``trainers/cocoop.py``):
the context starts as the embeddings of "a photo of a"; the image feature is L2-normalised and a meta network
``Linear(D → D/16) → ReLU → Linear(→ D_ctx)`` of it shifts every context vector; for each image separately, its
prompts ``[SOS] (ctx + π) <class>. [EOS]`` (77 positions) go through CLIP's text transformer, and
``logits = exp(s) · x̂ · t̂ᵀ``; ``loss = CE(logits, y)`` averaged over the images. Two tasks, each with its own
context and meta network, train jointly here (each task's official loss summed over its images, divided by the
batch). Loss, every gradient and two SGD steps equal within 1e-5 relative, on both text paths."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from softcpt_dist.config import ConfigError, MethodConfig, PromptConfig
from softcpt_dist.data.tasks import TaskGroup, TaskSpec
from softcpt_dist.model import build_method
from softcpt_dist.model.classifier import PromptClassifier
from softcpt_dist.model.loss import TaskTargets
from tiny_clip import tiny_clip

GROUP = TaskGroup([TaskSpec("pets", "pet breed", ("abyssinian", "beagle", "pug")),
                   TaskSpec("leaf", "plant leaf disease", ("healthy", "rust"))])
TASKS = torch.tensor([0, 1, 1, 0, 0])
LABELS = torch.tensor([2, 0, 1, 0, 2])  # within each sample's task


def _official_text(model, prompts, tokenized):
    """The official TextEncoder: token embeddings + positions through the transformer, EOT feature projected."""
    x = prompts + model.positional_embedding
    x = model.transformer(x, attn_mask=model.attn_mask)
    x = model.ln_final(x)
    return x[torch.arange(x.shape[0]), tokenized.argmax(dim=-1)] @ model.text_projection


def _official_logits(model, tokenizer, classnames, ctx, meta_net, image_features):
    """CustomCLIP.forward of one task: one text pass per image over all its classes."""
    tokenized = tokenizer([f"a photo of a {c}." for c in classnames])
    with torch.no_grad():
        embedding = model.token_embedding(tokenized)
    prefix, suffix = embedding[:, :1], embedding[:, 1 + ctx.shape[0]:]
    image_features = image_features / image_features.norm(dim=-1, keepdim=True)
    shifted = ctx.unsqueeze(0) + meta_net(image_features).unsqueeze(1)
    logits = []
    for ctx_i, imf_i in zip(shifted, image_features):
        prompts = torch.cat([prefix, ctx_i.unsqueeze(0).expand(len(classnames), -1, -1), suffix], dim=1)
        text = _official_text(model, prompts, tokenized)
        text = text / text.norm(dim=-1, keepdim=True)
        logits.append(model.logit_scale.exp() * imf_i @ text.t())
    return torch.stack(logits)


def _official_loss(model, tokenizer, ctxs, meta_nets, image_features):
    total = 0.0
    for t, task in enumerate(GROUP.tasks):
        mine = TASKS == t
        logits = _official_logits(model, tokenizer, task.classnames, ctxs[t], meta_nets[t], image_features[mine])
        total = total + F.cross_entropy(logits, LABELS[mine], reduction="sum")
    return total / len(TASKS)


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


def _setup(path):
    model, tokenizer, backbone = tiny_clip(text_path=path)
    method = build_method(backbone, GROUP, MethodConfig(name="cocoop"), PromptConfig(n_ctx=4))
    return model, tokenizer, backbone, method


@pytest.mark.parametrize("path", ["shared_prefix", "dense"])
def test_loss_gradients_and_two_steps_equal_the_official_cocoop(path):
    model, tokenizer, backbone, method = _setup(path)
    classifier = PromptClassifier(backbone, method)
    with torch.no_grad():
        start = model.token_embedding(tokenizer(["a photo of a"]))[0, 1:5]
    assert all(torch.equal(method.ctx[t].detach(), start) for t in range(2))
    ref_ctx = [method.ctx[t].detach().clone().requires_grad_(True) for t in range(2)]
    ref_nets = [nn.Sequential(nn.Linear(backbone.embed_dim, backbone.embed_dim // 16), nn.ReLU(inplace=True),
                              nn.Linear(backbone.embed_dim // 16, backbone.ctx_dim)) for _ in range(2)]
    for ref, ours in zip(ref_nets, method.meta_nets):
        ref.load_state_dict({k.replace("linear1", "0").replace("linear2", "2"): v for k, v in ours.state_dict().items()})
    ours_params = [method.ctx, *method.meta_nets.parameters()]
    ref_params = [*ref_ctx, *(p for net in ref_nets for p in net.parameters())]
    ours_opt = torch.optim.SGD(ours_params, lr=0.05, momentum=0.9)
    ref_opt = torch.optim.SGD(ref_params, lr=0.05, momentum=0.9)
    image_features = torch.randn(len(TASKS), backbone.embed_dim)
    targets = TaskTargets(TASKS, GROUP.class_task(), LABELS + torch.as_tensor(GROUP.offsets)[TASKS])
    for step in range(2):
        ours = classifier(image_features=image_features, targets=targets).loss
        reference = _official_loss(model, tokenizer, ref_ctx, ref_nets, image_features)
        assert _rel(ours.detach(), reference.detach()) <= 1e-5, step
        ours_opt.zero_grad(), ref_opt.zero_grad()
        ours.backward(), reference.backward()
        for t in range(2):
            assert _rel(method.ctx.grad[t], ref_ctx[t].grad) <= 1e-5, (step, t)
            for (name, p), q in zip(method.meta_nets[t].named_parameters(), ref_nets[t].parameters()):
                assert _rel(p.grad, q.grad) <= 1e-5, (step, t, name)
        ours_opt.step(), ref_opt.step()
        for p, q in zip(ours_params[1:], ref_params[2:]):
            assert _rel(p.detach(), q.detach()) <= 1e-5, step
        assert _rel(method.ctx.detach(), torch.stack(ref_ctx).detach()) <= 1e-5, step


def test_a_class_selection_scores_as_the_same_columns_of_all_classes():
    _, _, backbone, method = _setup("shared_prefix")
    classifier = PromptClassifier(backbone, method)
    image_features = torch.randn(3, backbone.embed_dim)
    with torch.no_grad():
        full = classifier(image_features=image_features)
        part = classifier(image_features=image_features, class_index=torch.tensor([3, 4]))
    assert full.shape == (3, 5)
    torch.testing.assert_close(part, full[:, 3:], rtol=1e-5, atol=1e-5)


def test_the_context_count_must_fit_the_phrase(tiny_backbone):
    with pytest.raises(ConfigError, match=r"method.name=cocoop starts its context from 'a photo of a' \(4 tokens\): "
                                          r"set prompt.n_ctx=4 \(it is 16\)"):
        build_method(tiny_backbone, GROUP, MethodConfig(name="cocoop"), PromptConfig())
