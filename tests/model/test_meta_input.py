"""``method.meta_input`` (the official ``PG_TYPE``) against a reference written from the official code's
math (``trainers/mtcoop.py``, ``PromptGen.forward``): with ``x = [class feature, task feature]`` of each
class, ``lin`` is ``x @ W``, ``linmean`` ``((x[:, :d] + x[:, d:]) / 2) @ W`` and ``lincls`` ``x[:, :d] @ W``,
reshaped to ``[classes, N, width]``. Contexts equal the reference within 1e-6 relative (fp32, the same
operations) and every learnable tensor's gradient within the project's fidelity bound, 1e-5 (the task context's
gradient comes back through the text encoder, whose BLAS sums differ by CPU kind: 1.03e-6 on an AMD EPYC for
CSTS); non-class-aware variants refuse the key by name."""

import pytest
import torch

from softcpt_dist.config import ConfigError, MethodConfig, PromptConfig
from softcpt_dist.data.tasks import TaskGroup, TaskSpec
from softcpt_dist.model import build_method

GROUP = TaskGroup([TaskSpec("pants", "pants type", ("jeans", "shorts")),
                   TaskSpec("leaf", "plant leaf disease", ("healthy", "rust", "powdery mildew"))])


def _reference(method, kind: str) -> torch.Tensor:
    """The official prompt generator on the features the method's own prompts give."""
    encoder = method.backbone.text_encoder
    classes = torch.arange(GROUP.num_classes)
    owner = classes if method.class_specific else torch.zeros_like(classes)
    class_feat = encoder(method.class_feature_prompts(method.class_ctx, owner, classes)).float()
    if kind == "lincls":
        x = class_feat
    else:
        tasks = torch.arange(len(GROUP))
        task_owner = tasks if method.task_specific else torch.zeros_like(tasks)
        task_feat = encoder(method.task_prompts(method.task_ctx, task_owner, tasks)).float()
        x = torch.cat([class_feat, task_feat[GROUP.class_task()]], dim=1)
        if kind == "linmean":
            d = x.shape[-1]
            x = (x[..., :d // 2] + x[..., d // 2:]) / 2.0
    proj = method.meta_net.net.weight.t()  # the official proj [in, N * width]
    return (x @ proj).reshape(x.shape[0], method.meta_net.n_ctx, -1)


def _rel(a, b):
    return float((a - b).detach().abs().max() / b.detach().abs().max().clamp(min=1e-12))


@pytest.mark.parametrize("variant", ["CATA", "CSTS"])
@pytest.mark.parametrize("meta_input,official", [("concat", "lin"), ("mean", "linmean"), ("class", "lincls")])
def test_contexts_and_gradients_equal_the_official_prompt_generator(tiny_backbone, variant, meta_input, official):
    torch.manual_seed(0)
    method = build_method(tiny_backbone, GROUP, MethodConfig(variant=variant, meta_input=meta_input), PromptConfig())
    assert method.meta_net.net.weight.shape[1] == tiny_backbone.embed_dim * (2 if meta_input == "concat" else 1)
    assert hasattr(method, "task_ctx") == (meta_input != "class")  # lincls has no task prompt
    ours, reference = method.contexts(), _reference(method, official)
    assert _rel(ours, reference) <= 1e-6
    weights = torch.randn_like(reference)
    grads = []
    for value in (ours, reference):
        method.zero_grad()
        (value * weights).sum().backward(retain_graph=True)
        grads.append({n: p.grad.clone() for n, p in method.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        assert _rel(grads[0][name], grads[1][name]) <= 1e-5, name


def test_a_variant_without_class_features_refuses_the_key_by_name(tiny_backbone):
    with pytest.raises(ConfigError, match="method.meta_input=mean needs a class-aware variant.*method.variant=NATA"):
        build_method(tiny_backbone, GROUP, MethodConfig(variant="NATA", meta_input="mean"), PromptConfig())


def test_the_label_names_the_input_so_checkpoints_do_not_mix():
    from softcpt_dist.model import method_label
    assert method_label(MethodConfig(variant="CATA")) == "softcpt-CATA"
    assert method_label(MethodConfig(variant="CATA", meta_input="class")) == "softcpt-CATA-class"


@pytest.mark.parametrize("zero", [0, pytest.param(3, marks=pytest.mark.slow)])
def test_a_run_with_class_features_only_trains_and_reloads(tmp_path, small_data_root, zero):
    """lincls end to end: no task prompt to train, the run's checkpoint reloads under the same label. A
    ZeRO-3 run leaves torch.nn.functional.linear as it found it for the rest of the process."""
    from softcpt_dist.config import load_config
    from softcpt_dist.training.experiment import run_eval, run_train

    linear = torch.nn.functional.linear

    cfg = load_config([], [f"data.root={small_data_root}", "data.shots=2", "optim.epochs=2", "optim.batch_size=4",
                           f"train.output_dir={tmp_path}", "train.progress=false", "train.run_name=lincls",
                           "method.variant=CSTA", "method.meta_input=class", f"engine.zero_stage={zero}"])
    result = run_train(cfg)
    states = torch.load(result.path / "prompt_checkpoint.pt", weights_only=True)["states"]["joint"]
    assert "task_ctx" not in states and "class_ctx" in states
    assert run_eval(cfg, result.path / "prompt_checkpoint.pt")["tasks"] == result.results["tasks"]
    assert torch.nn.functional.linear is linear


def test_a_frozen_class_context_is_neither_trained_nor_saved_and_eval_rebuilds_it(tmp_path, small_data_root):
    """FREEZE_CLS_PROMPT: the class context keeps its seeded initial value, is not in the checkpoint, and the
    official stepping counts one module less; evaluating the checkpoint gives the run's results."""
    from softcpt_dist.config import load_config
    from softcpt_dist.model import method_class
    from softcpt_dist.training.experiment import run_eval, run_train
    from softcpt_dist.training.trainer import Trainer

    overrides = [f"data.root={small_data_root}", "data.shots=2", "optim.epochs=2", "optim.batch_size=4",
                 f"train.output_dir={tmp_path}", "train.progress=false", "train.run_name=frozen",
                 "method.variant=CSTA", "method.freeze_class_context=true"]
    cfg = load_config([], overrides)
    trainer = Trainer(cfg)
    initial = trainer.scope_classifier(trainer.scopes[0]).method
    assert not initial.class_ctx.requires_grad and "class_ctx" not in initial.learnable_parameters()
    result = run_train(cfg)
    assert "class_ctx" not in torch.load(result.path / "prompt_checkpoint.pt", weights_only=True)["states"]["joint"]
    assert run_eval(cfg, result.path / "prompt_checkpoint.pt")["tasks"] == result.results["tasks"]
    assert method_class(cfg.method).official_modules(cfg.method) == 3
    with pytest.raises(ConfigError, match="method.freeze_class_context=true needs a class-aware variant"):
        load_config([], overrides + ["method.variant=NATS"]) and build_method(
            trainer.backbone, GROUP, MethodConfig(variant="NATS", freeze_class_context=True), PromptConfig())


@pytest.mark.parametrize("position", ["end", "middle", "front"])
def test_task_and_class_feature_prompts_place_the_name_as_the_official_learners_do(tiny_backbone, position):
    """TASK_TOKEN_POSITION / CLASS_TOKEN_POSITION: [SOS] ctx name . (end), [SOS] ctx[:n//2] name ctx[n//2:] .
    (middle), [SOS] name ctx . (front), as the official TaskPromptLearner / ClassPromptLearner concatenate."""
    prompt = PromptConfig(n_task_ctx=4, n_class_ctx=3, task_token_position=position,
                          class_feature_token_position=position)
    method = build_method(tiny_backbone, GROUP, MethodConfig(variant="CSTA"), prompt)
    tokenizer = tiny_backbone.tokenizer
    for bank, names, n in ((method.task_prompts, GROUP.task_names, 4),
                           (method.class_feature_prompts, GROUP.classnames, 3)):
        for row, name in enumerate(names):
            k = len(tokenizer.encode(name))
            ctx = list(range(n))
            expected = {"end": [-1] + ctx + [-1] * k, "middle": [-1] + ctx[:n // 2] + [-1] * k + ctx[n // 2:],
                        "front": [-1] + [-1] * k + ctx}[position] + [-1, -1]  # then "." and EOT
            assert bank.slot_of[row, :len(expected)].tolist() == expected, (position, name)
            assert int(bank.eot[row]) == len(expected) - 1
    method.contexts()  # encodes


def test_checkpoints_older_than_a_prompt_setting_load_with_its_default():
    from softcpt_dist.config import ModelConfig
    from softcpt_dist.training.checkpoint.common import checkpoint_meta, check_meta

    meta = checkpoint_meta(ModelConfig(), MethodConfig(), PromptConfig(), GROUP)
    older = {**meta, "prompt": {k: v for k, v in meta["prompt"].items() if k != "task_token_position"}}
    check_meta(older, meta, "an older checkpoint")
    from softcpt_dist.training.checkpoint import CheckpointError
    with pytest.raises(CheckpointError, match="task_token_position='end', this run has task_token_position='front'"):
        check_meta(older, checkpoint_meta(ModelConfig(), MethodConfig(), PromptConfig(task_token_position="front"),
                                          GROUP), "an older checkpoint")
