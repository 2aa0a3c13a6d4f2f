"""Learnable tensors per method: gradients reach exactly them, parameter counts equal the paper's."""

import pytest
import torch

from softcpt_dist.model.backbone import build_backbone
from softcpt_dist.config import Config, MethodConfig, ModelConfig, PromptConfig
from softcpt_dist.data.tasks import TaskGroup, TaskSpec
from softcpt_dist.model import build_method
from softcpt_dist.model import PromptClassifier

VARIANTS = ["NATA", "NATS", "CATA", "CSTA", "CATS", "CSTS"]
EXPECTED_PARAMS = {
    "NATA": {"task_ctx"}, "NATS": {"task_ctx"},
    "CATA": {"task_ctx", "class_ctx"}, "CSTA": {"task_ctx", "class_ctx"},
    "CATS": {"task_ctx", "class_ctx"}, "CSTS": {"task_ctx", "class_ctx"},
}


def _build(cfg, backbone, group):
    return build_method(backbone, group, cfg.method, cfg.prompt)


def _cfg(name="softcpt", **method):
    cfg = Config()
    cfg.method = MethodConfig(name=name, **method)
    return cfg


def _group():
    return TaskGroup([TaskSpec("pants", "pants type", ("jeans", "shorts")),
                      TaskSpec("leaf", "plant leaf disease", ("healthy", "rust", "powdery mildew")),
                      TaskSpec("one", "single class task", ("thing",))])


def _grad_names(cfg, backbone):
    torch.manual_seed(0)
    group = _group()
    model = PromptClassifier(backbone, build_method(backbone, group, cfg.method, cfg.prompt))
    images = torch.randn(4, 3, 32, 32)
    tasks = torch.tensor([0, 1, 1, 2])
    logits = model(images)
    own = group.class_task()[None] == tasks[:, None]
    logits.masked_fill(~own, -1e4).logsumexp(1).sum().backward()
    got = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    frozen_with_grad = {n for n, p in model.backbone.named_parameters() if p.grad is not None}
    return got, frozen_with_grad, {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("variant", VARIANTS)
def test_softcpt_gradients_reach_exactly_the_learnable_tensors(tiny_backbone, variant):
    got, frozen_with_grad, learnable = _grad_names(_cfg(variant=variant), tiny_backbone)
    expected = {f"method.{n}" for n in EXPECTED_PARAMS[variant]} | {"method.meta_net.net.weight"}
    assert learnable == expected
    assert got == expected
    assert not frozen_with_grad


def test_softcpt_mlp_meta_net_gradients(tiny_backbone):
    got, frozen, learnable = _grad_names(_cfg(variant="NATA", meta_net="mlp", meta_hidden=32), tiny_backbone)
    assert got == learnable and len(learnable) == 5 and not frozen


@pytest.mark.parametrize("mode", ["CA", "CS", "MT"])
def test_coop_gradients_reach_exactly_the_context(tiny_backbone, mode):
    got, frozen_with_grad, learnable = _grad_names(_cfg("coop", coop_mode=mode), tiny_backbone)
    assert learnable == got == {"method.ctx"}
    assert not frozen_with_grad


def test_cocoop_gradients_reach_exactly_its_contexts_and_meta_networks(tiny_backbone):
    cfg = _cfg("cocoop")
    cfg.prompt = PromptConfig(n_ctx=4)
    got, frozen_with_grad, learnable = _grad_names(cfg, tiny_backbone)
    nets = {f"method.meta_nets.{t}.linear{i}.{w}" for t in range(3) for i in (1, 2) for w in ("weight", "bias")}
    assert learnable == got == {"method.ctx"} | nets
    assert not frozen_with_grad


def test_zeroshot_has_no_learnable_tensors(tiny_backbone):
    method = _build(_cfg("zeroshot"), tiny_backbone, _group())
    assert not any(p.requires_grad for p in method.parameters())
    assert method().shape == (6, tiny_backbone.embed_dim)


def test_class_aware_contexts_differ_per_class_and_na_per_task(tiny_backbone):
    torch.manual_seed(0)
    group = _group()
    na = _build(_cfg(variant="NATA"), tiny_backbone, group)
    ctx = na.contexts()
    assert torch.equal(ctx[0], ctx[1]) and not torch.equal(ctx[1], ctx[2])  # same task / other task
    ca = _build(_cfg(variant="CATA"), tiny_backbone, group)
    ctx = ca.contexts()
    assert not torch.equal(ctx[0], ctx[1])


GENERAL10_SIZES = [100, 47, 10, 100, 101, 102, 37, 196, 397, 101]  # 1191 classes


@pytest.fixture(scope="module")
def rn50():
    torch.manual_seed(0)
    return build_backbone(ModelConfig(arch="RN50"))


@pytest.fixture(scope="module")
def general10_like():
    return TaskGroup([TaskSpec(f"t{i}", f"task number {i}", tuple(f"class {j}" for j in range(n)))
                      for i, n in enumerate(GENERAL10_SIZES)])


def _count(method):
    return {n: p.numel() for n, p in method.named_parameters() if p.requires_grad}


def test_paper_parameter_counts_rn50(rn50, general10_like):
    assert rn50.ctx_dim == 512 and rn50.embed_dim == 1024
    assert general10_like.num_classes == 1191
    m = 4
    cfg = _cfg(variant="NATA")
    cfg.prompt = PromptConfig(n_task_ctx=m)
    counts = _count(_build(cfg, rn50, general10_like))
    assert counts["meta_net.net.weight"] == 8_388_608
    assert counts["task_ctx"] == m * 512
    cfg.method.variant = "NATS"
    assert _count(_build(cfg, rn50, general10_like))["task_ctx"] == 10 * m * 512
    for mode, expected in {"CA": 81_920, "CS": 9_756_672, "MT": 8_192}.items():
        assert sum(_count(_build(_cfg("coop", coop_mode=mode), rn50, general10_like)).values()) == expected
    kgcoop = _cfg("kgcoop")
    kgcoop.prompt = PromptConfig(n_ctx=4)
    assert sum(_count(_build(kgcoop, rn50, general10_like)).values()) == 20_480  # 10 tasks x 4 x 512
    assert sum(_count(_build(_cfg("prograd"), rn50, general10_like)).values()) == 81_920  # 10 tasks x 16 x 512
    assert sum(_count(_build(_cfg("plot"), rn50, general10_like)).values()) == 163_840  # 10 tasks x 2 x 16 x 512
    cocoop = _cfg("cocoop")
    cocoop.prompt = PromptConfig(n_ctx=4)
    # per task: 4 x 512 context + (1024 x 64 + 64) + (64 x 512 + 512) meta network
    assert sum(_count(_build(cocoop, rn50, general10_like)).values()) == 1_009_280
