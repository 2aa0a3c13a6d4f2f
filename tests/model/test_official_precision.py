"""``model.precision=official_fp16`` and ``official_amp`` (the official code's ``PREC=fp16``, its scripts' default,
and ``PREC=amp``).

fp16: against a
reference written from the official code's math (``trainers/mtcoop.py`` on CLIP as OpenAI's fp16 conversion:
fp16 linear, convolution and attention weights, layer norms computed in fp32): task prompts
``[SOS] u <task name>. [EOS]`` with fp16 contexts ``u``, the prompt generator ``x @ proj.type(x.dtype)`` with its
fp32 ``proj`` applied in fp16, class prompts, ``logits = exp(s) * x̂ t̂ᵀ`` in fp16 and the per-task
cross-entropy summed in fp16 and divided by the batch size; SGD (momentum, weight decay) updates the fp16
contexts in fp16 and the fp32 ``proj`` in fp32.

Bound: the loss and the gradients within 1e-2 relative of the official computation from the same parameters
(fp16 keeps 11 bits: both computations differ from the same computation in fp32 by 3e-3 to 5e-3 on these
gradients, the official one the more, because our encoder sums some products in another order). Trajectories
are compared state by state: in fp16 two such computations drift apart over steps.

amp: the same reference on the fp32 CLIP under fp16 autocast (CPU autocast here, on both sides), within the
same bound; the loss scaling against ``torch.amp.GradScaler`` (scales, skipped steps, unscaled gradients equal)."""

import open_clip
import pytest
import torch
import torch.nn.functional as F

from softcpt_dist.config import ConfigError, MethodConfig, PromptConfig, load_config
from softcpt_dist.data.tasks import TaskGroup, TaskSpec
from softcpt_dist.model import build_method
from softcpt_dist.model.backbone import CLIPBackbone, ensure_builtin_configs
from softcpt_dist.model.classifier import PromptClassifier
from softcpt_dist.model.loss import TaskTargets

GROUP = TaskGroup([TaskSpec("pets", "pet breed", ("abyssinian", "beagle", "pug")),
                   TaskSpec("leaf", "plant leaf disease", ("healthy", "rust"))])
TASKS = torch.tensor([0, 1, 1, 0, 0])
LABELS = torch.tensor([2, 0, 1, 0, 2])  # within each sample's task
N_CTX = 4
BOUND = 1e-2


def _fp16_clip(path):
    ensure_builtin_configs()
    torch.manual_seed(5)
    model = open_clip.create_model("softcpt-tiny", pretrained=None, precision="fp16").eval().requires_grad_(False)
    tokenizer = open_clip.get_tokenizer("softcpt-tiny")
    backbone = CLIPBackbone(model, tokenizer, "softcpt-tiny", None, logit_scale=model.logit_scale.detach().float(),
                            text_path=path)
    backbone.official_fp16 = True
    return model, tokenizer, backbone


def _official_text(model, prompts, tokenized, dtype):
    """The official TextEncoder: positions cast to CLIP's dtype, EOT feature projected."""
    x = prompts + model.positional_embedding.type(dtype)
    x = model.transformer(x, attn_mask=model.attn_mask)
    x = model.ln_final(x).type(dtype)
    return x[torch.arange(x.shape[0]), tokenized.argmax(dim=-1)] @ model.text_projection


def _prompts(model, tokenizer, names, ctx, dtype):
    """``[SOS] ctx <name>. [EOS]`` for each name, the context rows ``ctx [len(names), N, D]``, in CLIP's dtype."""
    tokenized = tokenizer([" ".join(["X"] * N_CTX) + " " + name + "." for name in names])
    with torch.no_grad():
        embedding = model.token_embedding(tokenized).type(dtype)
    return torch.cat([embedding[:, :1], ctx, embedding[:, 1 + N_CTX:]], dim=1), tokenized


def _official_loss(model, tokenizer, task_ctx, proj, image_features, dtype=torch.float16):
    """``CustomCLIP.forward`` + ``mutitask_loss`` of NATA, CLIP's dtype ``dtype`` (fp16; fp32 under amp)."""
    names = [task.name for task in GROUP.tasks]
    prompts, tokenized = _prompts(model, tokenizer, names, task_ctx.expand(len(names), -1, -1), dtype)
    task_features = _official_text(model, prompts, tokenized, dtype)
    x = task_features.type(dtype)
    ctx = (x @ proj.type(x.dtype)).reshape(len(names), N_CTX, -1)
    text = []
    for t, task in enumerate(GROUP.tasks):
        prompts, tokenized = _prompts(model, tokenizer, task.classnames, ctx[t].expand(task.num_classes, -1, -1),
                                      dtype)
        text.append(_official_text(model, prompts, tokenized, dtype))
    text = torch.cat(text)
    image = image_features / image_features.norm(dim=-1, keepdim=True)
    text = text / text.norm(dim=-1, keepdim=True)
    logits = model.logit_scale.exp() * image @ text.t()
    loss = 0.0
    for t, task in enumerate(GROUP.tasks):
        start = GROUP.offsets[t]
        rows = TASKS == t
        loss = loss + F.cross_entropy(logits[rows][:, start:start + task.num_classes], LABELS[rows], reduction="sum")
    return logits, loss / len(TASKS)


def _rel(a, b):
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-12))


@pytest.mark.parametrize("path", ["dense", "shared_prefix"])
def test_loss_and_gradients_equal_the_official_fp16_softcpt_and_sgd_updates_in_fp16(path):
    """Two states (the initial one and the one after an SGD step): the loss and the gradients of both learnable
    tensors against the official computation from the same parameters; the step itself in fp16, in place:
    ``p <- p - lr * (g + wd * p)`` rounded to fp16 on the first step (no fp32 copy of ``p`` anywhere)."""
    model, tokenizer, backbone = _fp16_clip(path)
    torch.manual_seed(0)
    method = build_method(backbone, GROUP, MethodConfig(variant="NATA"), PromptConfig(n_ctx=N_CTX, n_task_ctx=N_CTX))
    assert method.task_ctx.dtype == torch.float16 and method.meta_net.net.weight.dtype == torch.float32
    classifier = PromptClassifier(backbone, method)
    image_features = torch.randn(len(TASKS), backbone.embed_dim).half()
    targets = TaskTargets(TASKS, GROUP.class_task(), LABELS + torch.as_tensor(GROUP.offsets)[TASKS])
    lr, wd = 0.05, 5e-4
    optimizer = torch.optim.SGD([method.task_ctx, method.meta_net.net.weight], lr=lr, momentum=0.9, weight_decay=wd)
    for step in range(2):
        ref_ctx = method.task_ctx.detach().clone().requires_grad_(True)
        ref_proj = method.meta_net.net.weight.detach().t().contiguous().requires_grad_(True)  # official [in, N * D]
        scores = classifier(image_features=image_features, targets=targets)
        ref_logits, reference = _official_loss(model, tokenizer, ref_ctx, ref_proj, image_features)
        assert scores.loss.dtype == torch.float16 and reference.dtype == torch.float16
        assert _rel(scores.loss.detach(), reference.detach()) <= BOUND, step
        offsets = torch.as_tensor(GROUP.offsets)[TASKS]
        sizes = torch.tensor([GROUP.tasks[t].num_classes for t in TASKS.tolist()])
        assert torch.equal(scores.predictions, torch.stack([ref_logits[b, o:o + n].argmax() + o for b, (o, n)
                                                            in enumerate(zip(offsets.tolist(), sizes.tolist()))]))
        optimizer.zero_grad()
        scores.loss.backward(), reference.backward()
        assert method.task_ctx.grad.dtype == torch.float16
        assert _rel(method.task_ctx.grad, ref_ctx.grad) <= BOUND, step
        assert _rel(method.meta_net.net.weight.grad.t(), ref_proj.grad) <= BOUND, step
        before, grad = method.task_ctx.detach().clone(), method.task_ctx.grad.clone()
        optimizer.step()
        assert method.task_ctx.dtype == torch.float16
        if step == 0:  # momentum's buffer starts as the first gradient
            assert torch.equal(method.task_ctx.detach(), before.add(grad.add(before, alpha=wd), alpha=-lr))


def test_coop_contexts_are_fp16_and_class_aware_softcpt_feeds_fp16_features():
    _, _, backbone = _fp16_clip("shared_prefix")
    coop = build_method(backbone, GROUP, MethodConfig(name="coop"), PromptConfig(n_ctx=N_CTX))
    assert coop.ctx.dtype == torch.float16 and coop().dtype == torch.float16
    softcpt = build_method(backbone, GROUP, MethodConfig(variant="CSTS"), PromptConfig(n_ctx=N_CTX, n_task_ctx=2,
                                                                                        n_class_ctx=2))
    assert softcpt.class_ctx.dtype == softcpt.task_ctx.dtype == torch.float16
    assert softcpt.contexts().dtype == torch.float16
    loss = PromptClassifier(backbone, softcpt)(image_features=torch.randn(5, backbone.embed_dim).half(),
                                               targets=TaskTargets(TASKS, GROUP.class_task(),
                                                                   LABELS + torch.as_tensor(GROUP.offsets)[TASKS])).loss
    loss.backward()
    assert loss.dtype == torch.float16 and softcpt.class_ctx.grad.dtype == torch.float16


@pytest.mark.parametrize("overrides, match", [
    (["method.name=kgcoop"], "defined for method.name=softcpt and coop.*not method.name=kgcoop"),
    (["method.name=plot", "model.precision=official_amp"], "official_amp.*not method.name=plot"),
    (["engine.zero_stage=1", "model.precision=official_amp"], "PREC=amp.*engine.zero_stage=1"),
    (["method.meta_net=mlp"], "needs method.meta_net=lin"),
    (["engine.zero_stage=2"], "on ZeRO-0: engine.zero_stage=2 would wrap it"),
    (["engine.deepspeed={fp16: {enabled: true}}"], "remove engine.deepspeed.fp16"),
])
def test_what_the_official_mode_does_not_cover_is_refused_by_name(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config([], ["model.precision=official_fp16", *overrides])


def test_a_run_trains_in_official_fp16_and_reloads(tmp_path, small_data_root):
    """Through the engine (DeepSpeed, ZeRO-0) and the checkpoint: the saved contexts are fp16 and evaluating the
    checkpoint gives the run's results."""
    from softcpt_dist.training.experiment import run_eval, run_train

    cfg = load_config([], [f"data.root={small_data_root}", "data.shots=2", "optim.epochs=2", "optim.batch_size=4",
                           f"train.output_dir={tmp_path}", "train.progress=false", "train.run_name=fp16",
                           "model.precision=official_fp16"])
    result = run_train(cfg)
    states = torch.load(result.path / "prompt_checkpoint.pt", weights_only=True)["states"]["joint"]
    assert states["task_ctx"].dtype == torch.float16 and states["meta_net.net.weight"].dtype == torch.float32
    assert run_eval(cfg, result.path / "prompt_checkpoint.pt")["tasks"] == result.results["tasks"]


def test_the_library_refuses_other_methods_on_an_official_fp16_backbone():
    _, _, backbone = _fp16_clip("shared_prefix")
    with pytest.raises(ConfigError, match="official_fp16.*defined for method.name=softcpt and coop and zeroshot, "
                                          "not kgcoop"):
        build_method(backbone, GROUP, MethodConfig(name="kgcoop"), PromptConfig(n_ctx=4))


def _fp32_clip(path):
    ensure_builtin_configs()
    torch.manual_seed(5)
    model = open_clip.create_model("softcpt-tiny", pretrained=None).eval().requires_grad_(False)
    backbone = CLIPBackbone(model, open_clip.get_tokenizer("softcpt-tiny"), "softcpt-tiny", None,
                            logit_scale=model.logit_scale.detach().float(), text_path=path)
    return model, open_clip.get_tokenizer("softcpt-tiny"), backbone


@pytest.mark.parametrize("path", ["dense", "shared_prefix"])
def test_amp_loss_and_gradients_equal_the_official_amp_softcpt(path):
    """Under fp16 autocast (the engine's, for official_amp) our loss and gradients against the official forward
    under the same autocast, from the same fp32 parameters; the gradients are fp32, as the parameters."""
    model, tokenizer, backbone = _fp32_clip(path)
    torch.manual_seed(0)
    method = build_method(backbone, GROUP, MethodConfig(variant="NATA"), PromptConfig(n_ctx=N_CTX, n_task_ctx=N_CTX))
    assert method.task_ctx.dtype == torch.float32
    classifier = PromptClassifier(backbone, method)
    image_features = torch.randn(len(TASKS), backbone.embed_dim)
    targets = TaskTargets(TASKS, GROUP.class_task(), LABELS + torch.as_tensor(GROUP.offsets)[TASKS])
    ref_ctx = method.task_ctx.detach().clone().requires_grad_(True)
    ref_proj = method.meta_net.net.weight.detach().t().contiguous().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.float16):
        ours = classifier(image_features=image_features, targets=targets).loss
        _, reference = _official_loss(model, tokenizer, ref_ctx, ref_proj, image_features, torch.float32)
    assert _rel(ours.detach(), reference.detach()) <= BOUND
    ours.backward(), reference.backward()
    assert method.task_ctx.grad.dtype == torch.float32
    assert _rel(method.task_ctx.grad, ref_ctx.grad) <= BOUND
    assert _rel(method.meta_net.net.weight.grad.t(), ref_proj.grad) <= BOUND


def test_loss_scale_follows_grad_scaler():
    """Scale, skipped steps and unscaled gradients as torch.amp.GradScaler's, over steps with and without
    non-finite gradients (growth after 3 good steps here, to see it)."""
    from softcpt_dist.training.loss_scale import LossScale, skipped_step

    torch.manual_seed(0)
    ours_p, ref_p = torch.nn.Parameter(torch.randn(6)), torch.nn.Parameter(torch.randn(6))
    ref_p.data.copy_(ours_p.data)
    ours_opt, ref_opt = torch.optim.SGD([ours_p], lr=0.1, momentum=0.9), torch.optim.SGD([ref_p], lr=0.1, momentum=0.9)
    scale, scaler = LossScale(growth_interval=3), torch.amp.GradScaler("cpu", growth_interval=3)
    for step in range(9):
        x = torch.randn(6) * (float("inf") if step in (2, 6) else 1.0)
        for p, loss_scale in ((ours_p, scale.scaled), (ref_p, scaler.scale)):
            loss_scale((p * x).sum()).backward()
        finite = scale.unscale([ours_p])
        if finite:
            ours_opt.step()
        else:
            with skipped_step(ours_opt):
                ours_opt.step()
        scale.update(finite)
        scaler.step(ref_opt)
        scaler.update()
        assert finite == (step not in (2, 6))
        assert scale.scale == scaler.get_scale(), step
        assert torch.equal(ours_p.detach(), ref_p.detach()), step
        ours_opt.zero_grad(), ref_opt.zero_grad()
    assert "step" not in ours_opt.__dict__ and scale.skipped == 2


def test_a_run_trains_in_official_amp_and_reloads(tmp_path, small_data_root):
    from softcpt_dist.training.experiment import run_eval, run_train

    cfg = load_config([], [f"data.root={small_data_root}", "data.shots=2", "optim.epochs=2", "optim.batch_size=4",
                           f"train.output_dir={tmp_path}", "train.progress=false", "train.run_name=amp",
                           "model.precision=official_amp"])
    result = run_train(cfg)
    states = torch.load(result.path / "prompt_checkpoint.pt", weights_only=True)["states"]["joint"]
    assert states["task_ctx"].dtype == torch.float32
    assert run_eval(cfg, result.path / "prompt_checkpoint.pt")["tasks"] == result.results["tasks"]
