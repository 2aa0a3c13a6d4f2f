"""Class sampling (``method.class_sample_rate``, the official ``TRAINER.MTCOOP.CLS_SAMPLE_RATE``) against a
reference written from the official code's math (``trainers/mtcoop.py``: ``compute_text_features_subsample``
and ``mutitask_loss2``): per task, the positives of the batch plus ``ceil(rate * #negatives)`` random
negatives; the loss sums, over the samples of every task, the cross-entropy over that task's selected
columns only, divided by the batch size. The reference scores every class's feature and masks the
columns; ours encodes only the selected classes. Loss and gradients equal within fp32 rounding (the same
operations on the same rows: bound 1e-5 relative)."""

import math

import pytest
import torch

from softcpt_dist.config import ConfigError, MethodConfig, PromptConfig, load_config
from softcpt_dist.data.tasks import TaskGroup, TaskSpec
from softcpt_dist.model import build_method, method_label
from softcpt_dist.model.classifier import PromptClassifier
from softcpt_dist.model.loss import TaskTargets
from softcpt_dist.training.class_sampling import ClassSampler, sample_classes

GROUP = TaskGroup([TaskSpec("pants", "pants type", ("jeans", "shorts", "chinos", "cargo", "joggers")),
                   TaskSpec("leaf", "plant leaf disease", ("healthy", "rust", "powdery mildew", "blight")),
                   TaskSpec("sky", "sky", ("clear", "cloudy", "overcast"))])


def _official_selection(positive: torch.Tensor, rate: float, generator: torch.Generator):
    """Per task, in the official order (positives, then the drawn negatives), as global indices."""
    selected = []
    for t, task in enumerate(GROUP.tasks):
        start = GROUP.offsets[t]
        mask = positive[start:start + task.num_classes]
        if not mask.any():
            continue
        pos, neg = torch.where(mask)[0], torch.where(~mask)[0]
        neg = neg[torch.randperm(len(neg), generator=generator)[:math.ceil(len(neg) * rate)]]
        selected.append(torch.cat([pos, neg]) + start)
    return torch.cat(selected)


def test_the_selection_keeps_every_positive_and_ceil_rate_negatives_of_each_present_task():
    positive = torch.zeros(GROUP.num_classes, dtype=torch.bool)
    positive[[1, 3, 6]] = True  # pants: 1, 3; leaf: 6 (= rust); sky absent
    chosen = sample_classes(GROUP, positive, 0.5, torch.Generator().manual_seed(3))
    assert chosen.tolist() == sorted(chosen.tolist())
    pants, leaf = chosen[chosen < 5], chosen[(chosen >= 5) & (chosen < 9)]
    assert {1, 3} <= set(pants.tolist()) and len(pants) == 2 + math.ceil(3 * 0.5)
    assert 6 in leaf.tolist() and len(leaf) == 1 + math.ceil(3 * 0.5)
    assert not (chosen >= 9).any()  # a task without samples is neither encoded nor scored
    reference = _official_selection(positive, 0.5, torch.Generator().manual_seed(3))
    assert chosen.tolist() == sorted(reference.tolist())  # the same draw as the official order
    # The smallest rate still draws one negative per present task; rate 1 keeps all its classes.
    assert len(sample_classes(GROUP, positive, 1e-6, torch.Generator())) == 3 + 2
    assert sample_classes(GROUP, positive, 1.0, torch.Generator()).tolist() == list(range(9))


def test_a_step_draws_the_same_classes_every_time_and_other_steps_draw_others():
    sampler = ClassSampler(GROUP, 0.3, seed=7)
    targets = torch.tensor([0, 5, 9])
    draws = [sampler(targets, step).tolist() for step in range(20)]
    assert draws == [ClassSampler(GROUP, 0.3, seed=7)(targets, step).tolist() for step in range(20)]
    assert len({tuple(d) for d in draws}) > 1
    for d in draws:
        assert {0, 5, 9} <= set(d)


def _official_loss(logits, tasks, targets, selected, batch_size):
    """``mutitask_loss2``: per task with samples, CE over the selected columns of that task."""
    select_mask = torch.zeros(GROUP.num_classes, dtype=torch.bool)
    select_mask[selected] = True
    loss = 0.0
    for t, task in enumerate(GROUP.tasks):
        st, ed = GROUP.offsets[t], GROUP.offsets[t] + task.num_classes
        rows = tasks == t
        if not rows.any():
            continue
        cols = select_mask[st:ed]
        one_hot = torch.nn.functional.one_hot(targets[rows] - st, task.num_classes)[:, cols]
        loss = loss + torch.nn.functional.cross_entropy(logits[rows][:, st:ed][:, cols], one_hot.argmax(-1),
                                                        reduction="sum")
    return loss / batch_size


@pytest.mark.parametrize("variant", ["CATA", "CSTS"])
def test_loss_and_gradients_equal_the_official_subsampled_loss(tiny_backbone, variant):
    torch.manual_seed(0)
    method = build_method(tiny_backbone, GROUP, MethodConfig(variant=variant, class_sample_rate=0.4), PromptConfig())
    classifier = PromptClassifier(tiny_backbone, method)
    tasks = torch.tensor([0, 0, 1, 1, 1, 0])
    labels = torch.tensor([1, 4, 0, 2, 2, 1])
    targets = GROUP.global_labels(tasks, labels)
    image_features = torch.randn(len(tasks), tiny_backbone.embed_dim)
    class_index = ClassSampler(GROUP, 0.4, seed=0)(targets, step=5)
    assert len(class_index) < GROUP.num_classes

    position = torch.full((GROUP.num_classes,), -1, dtype=torch.long)
    position[class_index] = torch.arange(len(class_index))
    ours = classifier(image_features=image_features, class_index=class_index,
                      targets=TaskTargets(tasks, GROUP.class_task()[class_index], position[targets])).loss
    logits = classifier(image_features=image_features)  # every class's feature, then the columns masked
    reference = _official_loss(logits, tasks, targets, class_index, len(tasks))
    assert abs(float(ours.detach() - reference.detach())) <= 1e-5 * abs(float(reference.detach()))
    every = _official_loss(logits, tasks, targets, torch.arange(GROUP.num_classes), len(tasks))
    assert abs(float(every.detach() - reference.detach())) > 1e-3  # sampling changes the loss
    grads = []
    for value in (ours, reference):
        method.zero_grad()
        value.backward()
        grads.append({n: p.grad.clone() for n, p in method.learnable_parameters().items()})
    for name in grads[0]:
        scale = grads[1][name].abs().max().clamp(min=1e-12)
        assert float((grads[0][name] - grads[1][name]).abs().max() / scale) <= 1e-5, name


def test_only_class_aware_softcpt_samples_classes_and_the_label_says_it():
    with pytest.raises(ConfigError, match=r"method.class_sample_rate=0.1 needs a class-aware variant.*NATA"):
        build_method(None, GROUP, MethodConfig(variant="NATA", class_sample_rate=0.1), PromptConfig())
    with pytest.raises(ConfigError, match=r"method.class_sample_rate=0.1 needs a class-aware SoftCPT.*coop"):
        build_method(None, GROUP, MethodConfig(name="coop", class_sample_rate=0.1), PromptConfig())
    with pytest.raises(ConfigError, match=r"method.class_sample_rate must be in \[0, 1\], got 1.5"):
        load_config([], ["method.class_sample_rate=1.5"])
    assert method_label(MethodConfig(variant="CATA", class_sample_rate=0.1)) == "softcpt-CATA-sample0.1"
    assert method_label(MethodConfig(variant="CATA")) == "softcpt-CATA"


@pytest.mark.slow
def test_a_sampled_run_trains_and_its_checkpoint_evaluates_on_all_classes(tmp_path, small_data_root):
    from softcpt_dist.training.experiment import run_eval, run_train

    cfg = load_config([], [f"data.root={small_data_root}", "data.shots=2", "optim.epochs=2", "optim.batch_size=4",
                           f"train.output_dir={tmp_path}", "train.progress=false", "train.run_name=sampled",
                           "method.variant=CATA", "method.class_sample_rate=0.1"])
    result = run_train(cfg)
    assert run_eval(cfg, result.path / "prompt_checkpoint.pt")["tasks"] == result.results["tasks"]


def test_the_fused_loss_kernel_gives_the_sampled_loss_and_gradients(tiny_backbone, monkeypatch):
    """The sampled columns stay grouped by task (sorted), so the fused cosine cross-entropy applies; under
    Triton's interpreter it equals the torch path (loss and gradients, bound 1e-5 relative)."""
    from softcpt_dist.config import KernelsConfig
    from softcpt_dist.kernels import _triton

    if not _triton.interpreter_ready():
        pytest.skip("Triton was not imported under TRITON_INTERPRET=1 (a GPU machine)")
    torch.manual_seed(1)
    method = build_method(tiny_backbone, GROUP, MethodConfig(variant="CATA", class_sample_rate=0.5), PromptConfig())
    tasks, labels = torch.tensor([0, 2, 1, 0]), torch.tensor([3, 1, 2, 0])
    targets = GROUP.global_labels(tasks, labels)
    image_features = torch.randn(len(tasks), tiny_backbone.embed_dim)
    class_index = ClassSampler(GROUP, 0.5, seed=2)(targets, step=0)
    position = torch.full((GROUP.num_classes,), -1, dtype=torch.long)
    position[class_index] = torch.arange(len(class_index))
    batch = TaskTargets(tasks, GROUP.class_task()[class_index], position[targets])
    results = []
    for enabled in ("off", "auto"):
        if enabled == "auto":
            monkeypatch.setenv("TRITON_INTERPRET", "1")
            from softcpt_dist.kernels.cosine_ce import fused_applies
            features = method(class_index).detach()
            assert fused_applies("auto", image_features, features, tiny_backbone.logit_scale, tasks, batch.class_task,
                                 batch.targets)
        classifier = PromptClassifier(tiny_backbone, method, kernels=KernelsConfig(enabled=enabled))
        method.zero_grad()
        loss = classifier(image_features=image_features, class_index=class_index, targets=batch).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in method.learnable_parameters().items()}))
    (loss0, grads0), (loss1, grads1) = results
    assert abs(float(loss1 - loss0)) <= 1e-5 * abs(float(loss0))
    for name in grads0:
        assert float((grads1[name] - grads0[name]).abs().max() / grads0[name].abs().max()) <= 1e-5, name
