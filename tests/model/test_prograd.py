"""ProGrad against a reference written from the official code's math (BeierZhu/Prompt-align
``ProGrad.public/trainers/prograd.py`` and its Dassl trainer's ``prograd_backward_and_update``): the context is
zeros followed by the embeddings of the template's words before the class name; prompts
``[SOS] ctx <class>. [EOS]``; ``logits = exp(s) · cos(image, text)``; the teacher is zero-shot CLIP with the
template; ``L_ce = CE(logits, y)`` and ``L_kd = T² · mean_b Σ_c −softmax(z_zs/T) log softmax(z/T)``; the update
takes ``g_ce`` of the context and, where ``cos(g_ce, g_kd) < 0``, replaces it by ``g_ce − λ (g_ce·ĝ_kd) ĝ_kd``.
Loss, guide loss, every gradient and two SGD steps equal within 1e-5 relative, with the projection taken and
not taken; the paper's parameter count for RN50 on General-10 (81,920) is in test_methods.py."""

import pytest
import torch
import torch.nn.functional as F

from softcpt_dist.config import ConfigError, EngineConfig, MethodConfig, PromptConfig, load_config
from softcpt_dist.data.tasks import TaskGroup, TaskSpec
from softcpt_dist.model import build_method
from softcpt_dist.model.classifier import PromptClassifier
from softcpt_dist.model.loss import TaskTargets, cosine_logits
from softcpt_dist.model.share_loss import share_logits
from softcpt_dist.model.methods import ProGrad
from softcpt_dist.model.text_encoder import TextEncoder
from softcpt_dist.training.gradient_projection import GuideGradients
from tiny_clip import tiny_clip

TASK = TaskSpec("sat", "land use", ("forest", "river", "highway"), template="a centered satellite photo of {}.")
GROUP = TaskGroup([TASK])
N_CTX, LAMBDA, T = 8, 0.8, 2.0
PHRASE = "a centered satellite photo of"  # 5 tokens


def _official_start(model, tokenizer):
    ctx = torch.zeros(N_CTX, model.token_embedding.weight.shape[1])
    with torch.no_grad():
        ctx[N_CTX - 5:] = model.token_embedding(tokenizer([PHRASE]))[0, 1:6]
    return ctx


def _official_losses(model, tokenizer, ctx, image_features, labels):
    prefix = " ".join(["X"] * (N_CTX - 5)) + " " + PHRASE
    prompts = tokenizer([f"{prefix} {c}." for c in TASK.classnames])
    emb = model.token_embedding(prompts).detach().clone()
    emb = torch.cat([emb[:, :1], ctx.unsqueeze(0).expand(len(TASK.classnames), -1, -1), emb[:, 1 + N_CTX:]], dim=1)
    text = TextEncoder(model, "dense")(emb, prompts.argmax(dim=-1))
    text = text / text.norm(dim=-1, keepdim=True)
    image = image_features / image_features.norm(dim=-1, keepdim=True)
    logits = model.logit_scale.exp() * image @ text.t()
    with torch.no_grad():  # zero-shot CLIP with the dataset's template
        zs_text = model.encode_text(tokenizer([TASK.template.format(c) for c in TASK.classnames]))
        zs_logits = model.logit_scale.exp() * image @ (zs_text / zs_text.norm(dim=-1, keepdim=True)).t()
    xe = F.cross_entropy(logits, labels)
    kl = (-F.softmax(zs_logits / T, dim=-1) * F.log_softmax(logits / T, -1) * T * T).sum(1).mean()
    return xe, kl, zs_logits


def _official_update(ctx, xe, kl):
    """prograd_backward_and_update: the guide gradient first, then the main one, projected where they conflict."""
    kl.backward(retain_graph=True)
    b_grad = ctx.grad.clone()
    ctx.grad = None
    xe.backward()
    b_unit = b_grad / torch.linalg.norm(b_grad)
    a_grad = ctx.grad.clone()
    conflict = bool(torch.dot((a_grad / torch.linalg.norm(a_grad)).flatten(), b_unit.flatten()) < 0)
    if conflict:
        ctx.grad = a_grad - LAMBDA * torch.dot(a_grad.flatten(), b_unit.flatten()) * b_unit
    return conflict


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


@pytest.mark.parametrize("against_teacher", [True, False], ids=["conflicting", "agreeing"])
def test_losses_projected_gradients_and_two_steps_equal_the_official_prograd(against_teacher):
    model, tokenizer, backbone = tiny_clip()
    cfg = MethodConfig(name="prograd", prograd_lambda=LAMBDA, prograd_temperature=T)
    method = build_method(backbone, GROUP, cfg, PromptConfig(n_ctx=N_CTX))
    classifier = PromptClassifier(backbone, method)
    reference_ctx = _official_start(model, tokenizer).requires_grad_(True)
    assert torch.equal(method.ctx[0].detach(), reference_ctx.detach())
    image_features = torch.randn(6, backbone.embed_dim)
    with torch.no_grad():
        _, _, zs = _official_losses(model, tokenizer, reference_ctx, image_features, torch.zeros(6, dtype=torch.long))
    # labels the teacher finds least likely pull against its knowledge; its own choices agree with it
    labels = zs.argmin(dim=1) if against_teacher else zs.argmax(dim=1)
    targets = TaskTargets(torch.zeros(6, dtype=torch.long), GROUP.class_task(), labels)
    guide = GuideGradients(classifier, grad_accum_steps=1)
    ours_opt = torch.optim.SGD([method.ctx], lr=0.01, momentum=0.9)
    ref_opt = torch.optim.SGD([reference_ctx], lr=0.01, momentum=0.9)
    conflicts = []
    for step in range(2):
        ours = classifier(image_features=image_features, targets=targets).loss
        xe, kl, _ = _official_losses(model, tokenizer, reference_ctx, image_features, labels)
        assert _rel(ours.detach(), xe.detach()) <= 1e-5, step
        assert _rel(classifier.guide_loss.detach(), kl.detach()) <= 1e-5, step
        ours_opt.zero_grad(), ref_opt.zero_grad()
        guide.accumulate(classifier.guide_loss)
        ours.backward()
        guide.project()
        conflicts.append(_official_update(reference_ctx, xe, kl))
        assert _rel(method.ctx.grad[0], reference_ctx.grad) <= 1e-5, step
        ours_opt.step(), ref_opt.step()
        assert _rel(method.ctx[0].detach(), reference_ctx.detach()) <= 1e-5, step
    assert any(conflicts) if against_teacher else not any(conflicts), conflicts


def test_accumulated_guide_is_the_full_batch_guide():
    """Two micro-batches' guide gradients, each scaled by 1/2 as the engine scales their losses, sum to the
    guide gradient of the whole batch of equal halves."""
    _, _, backbone = tiny_clip()
    method = build_method(backbone, GROUP, MethodConfig(name="prograd"), PromptConfig(n_ctx=N_CTX))
    classifier = PromptClassifier(backbone, method)
    image_features, labels = torch.randn(8, backbone.embed_dim), torch.tensor([0, 1, 2, 0, 1, 2, 2, 1])
    tasks = torch.zeros(8, dtype=torch.long)
    whole, halves = GuideGradients(classifier, 1), GuideGradients(classifier, 2)
    classifier(image_features=image_features, targets=TaskTargets(tasks, GROUP.class_task(), labels))
    whole.accumulate(classifier.guide_loss)
    for part in (slice(0, 4), slice(4, 8)):
        classifier(image_features=image_features[part], targets=TaskTargets(tasks[part], GROUP.class_task(), labels[part]))
        halves.accumulate(classifier.guide_loss)
    assert _rel(halves.summed, whole.summed) <= 1e-5


def test_guide_loss_from_class_shares_is_the_whole_guide_loss():
    """Class-parallel scoring: ``L_kd`` put together from per-share statistics equals ``guide_loss`` on every
    class's logits, value and context gradient (fp32 rounding: sums in another order),
    with shares that split a task, a share without a sample's task, a stand-in share and per-task weights."""
    _, _, backbone = tiny_clip()
    group = TaskGroup([TASK, TaskSpec("pets", "pet breed", ("pug", "beagle", "husky"), template="a photo of a {}.")])
    method = build_method(backbone, group, MethodConfig(name="prograd", prograd_temperature=T),
                          PromptConfig(n_ctx=N_CTX))
    torch.manual_seed(0)
    with torch.no_grad():
        method.ctx.add_(0.1 * torch.randn_like(method.ctx))  # student and teacher apart
    image_features = torch.randn(6, backbone.embed_dim)
    tasks, labels = torch.tensor([0, 1, 1, 0, 1, 0]), torch.tensor([0, 3, 5, 2, 4, 1])
    task_weights = torch.tensor([0.5, 2.0])
    scale = backbone.logit_scale
    features = method(None)
    logits = cosine_logits(image_features, features, scale)
    whole = method.guide_loss(image_features, logits, None, TaskTargets(tasks, group.class_task(), labels, task_weights))
    (whole_grad,) = torch.autograd.grad(whole, method.ctx, retain_graph=True)
    # task 0 split over the first two shares; the third holds only task 1's; the fourth is a stand-in
    shares = [([0, 1], True), ([2, 3], True), ([4, 5], True), ([0], False)]
    stats = [method.share_guide_statistics(image_features, share_logits(image_features, features[ids], scale),
                                           torch.tensor(ids), tasks, contributes) for ids, contributes in shares]
    assert stats[0].shape == (ProGrad.share_statistics, len(tasks))
    assert torch.isinf(stats[3][0]).all() and not stats[3][1:3].any()  # the stand-in: no column of any task
    weights = task_weights[tasks] / len(tasks)
    parts = method.guide_from_shares(torch.stack(stats), weights)
    (parts_grad,) = torch.autograd.grad(parts, method.ctx)
    assert _rel(parts.detach(), whole.detach()) <= 2e-6
    assert _rel(parts_grad, whole_grad) <= 3e-5  # measured 6e-6: share logits' padded matmuls (batch_invariance)
    assert whole_grad.abs().max() > 0


def test_contexts_start_from_each_tasks_template():
    _, tokenizer, backbone = tiny_clip()
    group = TaskGroup([TASK, TaskSpec("pets", "pet breed", ("pug", "beagle"), template="a photo of a {}, a pet.")])
    method = build_method(backbone, group, MethodConfig(name="prograd"), PromptConfig(n_ctx=N_CTX))
    with torch.no_grad():
        generic = backbone.token_embedding(torch.tensor(tokenizer.encode("a photo of a")))
    assert torch.equal(method.ctx[1, N_CTX - 4:].detach(), generic)  # no " {}." ending: the generic phrase
    assert not method.ctx[1, :N_CTX - 4].any() and not method.ctx[0, :N_CTX - 5].any()
    with torch.no_grad():
        satellite = backbone.token_embedding(torch.tensor(tokenizer.encode(PHRASE)))
    assert torch.equal(method.ctx[0, N_CTX - 5:].detach(), satellite)


def test_refusals_name_the_method_and_the_key(tiny_backbone):
    with pytest.raises(ConfigError, match=r"method.name=prograd starts a context from 'a centered satellite photo "
                                          r"of' \(5 tokens\): more than prompt.n_ctx=4"):
        build_method(tiny_backbone, GROUP, MethodConfig(name="prograd"), PromptConfig(n_ctx=4))
    for stage in (1, 2, 3):
        with pytest.raises(ConfigError, match=rf"method.name=prograd .* needs engine.zero_stage=0 \(it is {stage}"):
            ProGrad.check_engine(MethodConfig(name="prograd"), EngineConfig(zero_stage=stage))
    ProGrad.check_engine(MethodConfig(name="prograd"), EngineConfig(zero_stage=0))
    with pytest.raises(ConfigError, match=r"engine.deepspeed.zero_optimization.stage=2: set the ZeRO stage with "
                                          r"engine.zero_stage"):  # for every method, when the config is read
        load_config([], ["method.name=prograd", "engine.deepspeed={zero_optimization: {stage: 2}}"])
    with pytest.raises(ConfigError, match=r"engine.deepspeed.bf16 accumulates them"):
        ProGrad.check_engine(MethodConfig(name="prograd"), EngineConfig(deepspeed={"bf16": {"enabled": True}}))
