"""Contexts initialised from words (``prompt.ctx_init`` / ``task_ctx_init`` / ``class_ctx_init``, the official
``CTX_INIT`` / ``TASK_CTX_INIT`` / ``CLASS_CTX_INIT``) against the official code's math
(``trainers/mtcoop.py``, ``TaskPromptLearner``; CoOp's ``PromptLearner``): ``prompt = tokenize(words)``,
``ctx = token_embedding(prompt)[0, 1 : 1 + n]``, "_" read as a space. Equal exactly (the same embedding
rows); the contexts stay learnable; wrong counts and keys of other methods are refused by name."""

import pytest
import torch

from softcpt_dist.config import ConfigError, MethodConfig, PromptConfig
from softcpt_dist.data.tasks import TaskGroup, TaskSpec
from softcpt_dist.model import build_method

GROUP = TaskGroup([TaskSpec("pants", "pants type", ("jeans", "shorts")),
                   TaskSpec("leaf", "plant leaf disease", ("healthy", "rust", "powdery mildew"))])


def _official(backbone, words: str) -> torch.Tensor:
    words = words.replace("_", " ")
    n = len(words.split(" "))
    prompt = backbone.tokenizer([words])
    with torch.no_grad():
        return backbone.token_embedding(prompt)[0, 1:1 + n].float()


@pytest.mark.parametrize("variant", ["NATS", "CSTA"])
def test_softcpt_contexts_start_as_the_words_embeddings(tiny_backbone, variant):
    prompt = PromptConfig(task_ctx_init="a_photo_of_a", class_ctx_init="a kind of",
                          n_task_ctx=4, n_class_ctx=3) if variant == "CSTA" else PromptConfig(task_ctx_init="a_photo_of_a")
    method = build_method(tiny_backbone, GROUP, MethodConfig(variant=variant), prompt)
    task = _official(tiny_backbone, "a_photo_of_a")
    assert method.task_ctx.shape[0] == (len(GROUP) if variant == "NATS" else 1)
    for row in method.task_ctx:  # every task's own context (TS) starts as the phrase
        assert torch.equal(row.detach(), task)
    if variant == "CSTA":
        assert method.class_ctx.shape[0] == GROUP.num_classes
        for row in method.class_ctx:
            assert torch.equal(row.detach(), _official(tiny_backbone, "a kind of"))
    assert "task_ctx" in method.learnable_parameters()
    method.contexts().sum().backward()
    assert method.task_ctx.grad is not None and method.task_ctx.grad.abs().sum() > 0


@pytest.mark.parametrize("mode", ["CA", "MT"])
def test_coop_context_starts_as_the_words_embeddings(tiny_backbone, mode):
    method = build_method(tiny_backbone, GROUP, MethodConfig(name="coop", coop_mode=mode),
                          PromptConfig(ctx_init="a photo of a", n_ctx=4))
    for row in method.ctx:
        assert torch.equal(row.detach(), _official(tiny_backbone, "a photo of a"))


def test_wrong_counts_and_other_methods_keys_are_refused_by_name(tiny_backbone):
    with pytest.raises(ConfigError, match=r"prompt.ctx_init='a photo of a' is 4 token\(s\), the context has "
                                          r"prompt.n_ctx=16: set prompt.n_ctx=4"):
        build_method(tiny_backbone, GROUP, MethodConfig(name="coop"), PromptConfig(ctx_init="a photo of a"))
    with pytest.raises(ConfigError, match="prompt.ctx_init does not apply to method.name=softcpt"):
        build_method(tiny_backbone, GROUP, MethodConfig(), PromptConfig(ctx_init="a photo of a", n_ctx=4))
    with pytest.raises(ConfigError, match="prompt.task_ctx_init does not apply to method.name=coop"):
        build_method(tiny_backbone, GROUP, MethodConfig(name="coop"), PromptConfig(task_ctx_init="a photo of a"))
    with pytest.raises(ConfigError, match="prompt.class_ctx_init needs a class-aware variant.*NATA"):
        build_method(tiny_backbone, GROUP, MethodConfig(), PromptConfig(class_ctx_init="a kind of", n_class_ctx=3))
    with pytest.raises(ConfigError, match="prompt.task_ctx_init: method.meta_input=class has no task context"):
        build_method(tiny_backbone, GROUP, MethodConfig(variant="CATA", meta_input="class"),
                     PromptConfig(task_ctx_init="a photo of a"))
