"""PLOT against a reference written from the official code's math (CHENGY12/PLOT ``plot-coop/trainers/plot.py``
and its ``clip/model.py``): the image's local features are the attention pool's outputs for every position as
a query; N generic contexts per task, N(0, 0.02); prompts ``[SOS] ctx_n <class>. [EOS]`` (77 positions)
through CLIP's text transformer; ``sim = x̂_m · t̂_cn``; Sinkhorn on ``exp(−(1 − sim)/0.1)`` with uniform
marginals, at most 100 iterations, stopping when the mean change of ``r`` is below 0.01; logits
``exp(s) · Σ T ∘ sim``; ``loss = CE``. Logits, loss, the context's gradient and two SGD steps equal within 1e-5
relative; the paper's parameter count for RN50 on General-10 (163,840) is in test_methods.py."""

import math

import open_clip
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from softcpt_dist.config import Config, ConfigError, MethodConfig, PromptConfig
from softcpt_dist.data.tasks import TaskGroup, TaskSpec
from softcpt_dist.model import build_method
from softcpt_dist.model.backbone import ensure_builtin_configs
from softcpt_dist.model.classifier import PromptClassifier
from softcpt_dist.model.image_tokens import local_features_refusal, local_image_features
from softcpt_dist.model.loss import TaskTargets
from softcpt_dist.model.methods import PLOT
from softcpt_dist.model.methods import plot as plot_module
from tiny_clip import tiny_clip

TASK = TaskSpec("pets", "pet breed", ("abyssinian", "beagle", "pug", "shiba inu"))
GROUP = TaskGroup([TASK])
N, N_CTX = 3, 4


def _official_pool_tokens(visual, images):
    """The PLOT repository's AttentionPool2d: every position (and the mean token first) as a query."""
    x = visual.layer4(visual.layer3(visual.layer2(visual.layer1(visual.stem(images)))))
    pool = visual.attnpool
    x = x.flatten(2).permute(2, 0, 1)
    x = torch.cat([x.mean(dim=0, keepdim=True), x], dim=0) + pool.positional_embedding[:, None, :]
    length, batch, dim = x.shape
    heads, head_dim = pool.num_heads, dim // pool.num_heads

    def split(t):  # [L, B, D] -> [B, heads, L, head_dim]
        return t.reshape(length, batch, heads, head_dim).permute(1, 2, 0, 3)

    q, k, v = split(pool.q_proj(x)), split(pool.k_proj(x)), split(pool.v_proj(x))
    attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(head_dim), dim=-1)
    out = (attn @ v).permute(2, 0, 1, 3).reshape(length, batch, dim)
    return pool.c_proj(out)  # [1 + HW, B, E]


def _official_text(model, prompts, tokenized):
    x = prompts + model.positional_embedding
    x = model.transformer(x, attn_mask=model.attn_mask)
    x = model.ln_final(x)
    return x[torch.arange(x.shape[0]), tokenized.argmax(dim=-1)] @ model.text_projection


def _official_sinkhorn(K, u, v, iterations):
    r, c = torch.ones_like(u), torch.ones_like(v)
    for i in range(100):
        r0 = r
        r = u / torch.matmul(K, c.unsqueeze(-1)).squeeze(-1)
        c = v / torch.matmul(K.permute(0, 2, 1).contiguous(), r.unsqueeze(-1)).squeeze(-1)
        err = (r - r0).abs().mean()
        if err.item() < 1e-2:
            break
    iterations.append(i + 1)
    return torch.matmul(r.unsqueeze(-1), c.unsqueeze(-2)) * K


def _official_logits(model, tokenizer, ctx, images, iterations):
    features = _official_pool_tokens(model.visual, images)
    image_local = features[1:]  # features[0], the pooled feature, only serves ImageNet in the official code
    n_cls = len(TASK.classnames)
    tokenized = tokenizer([" ".join(["X"] * N_CTX) + f" {c}." for c in TASK.classnames]).repeat(N, 1)
    with torch.no_grad():
        embedding = model.token_embedding(tokenized)
    ctx_rows = ctx.unsqueeze(0).expand(n_cls, -1, -1, -1).permute(1, 0, 2, 3).reshape(N * n_cls, N_CTX, -1)
    prompts = torch.cat([embedding[:, :1], ctx_rows, embedding[:, 1 + N_CTX:]], dim=1)
    text = _official_text(model, prompts, tokenized).view(N, n_cls, -1)
    M, b = image_local.shape[0], images.shape[0]
    image_local = F.normalize(image_local, dim=2)
    text = F.normalize(text, dim=2)
    sim = torch.einsum("mbd,ncd->mnbc", image_local, text).contiguous().view(M, N, b * n_cls).permute(2, 0, 1)
    xx = torch.zeros(b * n_cls, M).fill_(1.0 / M)
    yy = torch.zeros(b * n_cls, N).fill_(1.0 / N)
    with torch.no_grad():
        T = _official_sinkhorn(torch.exp(-(1.0 - sim) / 0.1), xx, yy, iterations)
    sim_op = torch.sum(T * sim, dim=(1, 2)).contiguous().view(b, n_cls)
    return model.logit_scale.exp() * sim_op


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


def test_logits_loss_gradient_and_two_steps_equal_the_official_plot():
    model, tokenizer, backbone = tiny_clip("softcpt-tiny-rn", seed=7)
    method = build_method(backbone, GROUP, MethodConfig(name="plot", plot_prompts=N), PromptConfig(n_ctx=N_CTX))
    classifier = PromptClassifier(backbone, method)
    assert method.ctx.shape == (N, N_CTX, backbone.ctx_dim)  # one task: the official [N, n_ctx, dim]
    ctx = method.ctx.detach()
    assert abs(float(ctx.std()) - 0.02) < 0.002 and abs(float(ctx.mean())) < 0.002  # N(0, 0.02)
    reference_ctx = method.ctx.detach().clone().requires_grad_(True)
    size = model.visual.image_size if isinstance(model.visual.image_size, int) else model.visual.image_size[0]
    images = torch.randn(5, 3, size, size, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 3, 1, 2, 3])
    targets = TaskTargets(torch.zeros(5, dtype=torch.long), GROUP.class_task(), labels)
    ours_opt = torch.optim.SGD([method.ctx], lr=0.01, momentum=0.9)
    ref_opt = torch.optim.SGD([reference_ctx], lr=0.01, momentum=0.9)
    iterations = []
    for step in range(2):
        with torch.no_grad():
            ours_logits = classifier(images)  # evaluation path: logits
        ours = classifier(images, targets=targets).loss
        reference_logits = _official_logits(model, tokenizer, reference_ctx, images, iterations)
        reference = F.cross_entropy(reference_logits, labels)
        assert _rel(ours_logits, reference_logits.detach()) <= 1e-5, step
        assert _rel(ours.detach(), reference.detach()) <= 1e-5, step
        ours_opt.zero_grad(), ref_opt.zero_grad()
        ours.backward(), reference.backward()
        assert _rel(method.ctx.grad, reference_ctx.grad) <= 1e-5, step
        ours_opt.step(), ref_opt.step()
        assert _rel(method.ctx.detach(), reference_ctx.detach()) <= 1e-5, step
    assert all(1 < i < 100 for i in iterations), iterations  # the stopping rule, not the cap, ended Sinkhorn


def test_sinkhorn_plans_have_the_uniform_marginals():
    sim = torch.rand(6, 7, 3) * 2 - 1
    plan = plot_module.sinkhorn(torch.exp(-(1.0 - sim) / 0.1))
    torch.testing.assert_close(plan.sum(dim=2), torch.full((6, 7), 1 / 7), rtol=0.1, atol=0)  # rows: stopped at 1e-2
    torch.testing.assert_close(plan.sum(dim=1), torch.full((6, 3), 1 / 3), rtol=1e-5, atol=0)  # columns: exact


@pytest.mark.parametrize("arch", ["softcpt-tiny", "softcpt-tiny-rn"])
def test_the_first_token_is_clips_pooled_feature(arch):
    ensure_builtin_configs()
    model = open_clip.create_model(arch, pretrained=None).eval()
    size = model.visual.image_size if isinstance(model.visual.image_size, int) else model.visual.image_size[0]
    images = torch.randn(2, 3, size, size)
    with torch.no_grad():
        tokens, pooled = local_image_features(model.visual)(images), model.visual(images)
    assert tokens.shape[1] > 1 and tokens.shape[2] == pooled.shape[1]
    torch.testing.assert_close(tokens[:, 0], pooled, rtol=1e-5, atol=1e-6)


def test_settings_plot_cannot_honour_are_refused_by_name(tiny_backbone):
    cfg = Config()
    cfg.method = MethodConfig(name="plot")
    cfg.data.cache.enabled = True
    with pytest.raises(ConfigError, match=r"method.name=plot .* set data.cache.enabled=false"):
        PLOT.check_setup(cfg, tiny_backbone)
    cfg.data.cache.enabled = False
    PLOT.check_setup(cfg, tiny_backbone)
    assert local_features_refusal(nn.Identity()) == "Identity (only CLIP's ResNet and ViT towers)"
    with pytest.raises(ConfigError, match=r"prompt.ctx_init does not apply to method.name=plot"):
        build_method(tiny_backbone, GROUP, MethodConfig(name="plot"), PromptConfig(ctx_init="a photo of a"))
    with pytest.raises(ValueError, match=r"per-position image features need images \[B, C, H, W\]"):
        method = build_method(tiny_backbone, GROUP, MethodConfig(name="plot"), PromptConfig(n_ctx=4))
        PromptClassifier(tiny_backbone, method)(torch.randn(2, tiny_backbone.embed_dim))
