"""SoftCPT: a meta network turns task (and class) features into each task's prompt context.

Variants (paper Sec. 3): the first two letters say how the meta network sees classes --
NA: not class-aware (context per task); CA: class-aware with one class context shared by all
classes; CS: class-aware with a class-specific class context. The last two say whether the task
context is shared by all tasks (TA) or task-specific (TS).
"""

from __future__ import annotations

from typing import Dict, NamedTuple, Optional, Tuple

import torch

from softcpt_dist.config import ConfigError, MethodConfig, PromptConfig
from softcpt_dist.data.tasks import TaskGroup
from softcpt_dist.model.meta_net import MetaNet, initial_context
from softcpt_dist.model.methods.base import Method
from softcpt_dist.model.prompts import ContextPromptBank


class _Selection(NamedTuple):
    """What the features of the selected classes ``index`` need: the task prompts of ``tasks`` (each
    class's task at ``task_of``), class-feature prompts with class contexts ``class_owner`` (CA/CS),
    and the context group of each class prompt, ``context``."""

    index: torch.Tensor
    tasks: torch.Tensor
    task_of: torch.Tensor
    class_owner: Optional[torch.Tensor]
    context: torch.Tensor


class SoftCPT(Method):
    name = "softcpt"
    context_inits = ("task_ctx_init", "class_ctx_init")
    samples_classes = True  # method.class_sample_rate (class-aware variants; check() refuses the others)

    def __init__(self, backbone, group: TaskGroup, prompt: PromptConfig, method: MethodConfig):
        super().__init__(backbone, group, prompt, method)
        variant = method.variant
        self.variant = variant
        self.class_aware = variant[:2] in ("CA", "CS")
        self.class_specific = variant[:2] == "CS"
        self.task_specific = variant[2:] == "TS"
        self.meta_input = method.meta_input
        self.uses_tasks = method.meta_input != "class"  # lincls reads the class feature only
        dim, feat = backbone.ctx_dim, backbone.embed_dim
        n_tasks, n_classes = len(group), group.num_classes

        if self.uses_tasks:
            self.task_prompts = ContextPromptBank(group.task_names, prompt.n_task_ctx, backbone,
                                                  prompt.task_token_position, "task_token_position")
            self.task_ctx = initial_context(backbone, prompt.task_ctx_init, n_tasks if self.task_specific else 1,
                                            prompt.n_task_ctx, prompt.init_std, "prompt.task_ctx_init")
        if self.class_aware:
            self.class_feature_prompts = ContextPromptBank(group.classnames, prompt.n_class_ctx, backbone,
                                                           prompt.class_feature_token_position,
                                                           "class_feature_token_position")
            self.class_ctx = initial_context(backbone, prompt.class_ctx_init, n_classes if self.class_specific else 1,
                                             prompt.n_class_ctx, prompt.init_std, "prompt.class_ctx_init")
            self.class_ctx.requires_grad_(not method.freeze_class_context)  # frozen: neither trained nor saved
        concat = self.class_aware and method.meta_input == "concat"
        # concat rows are [class feature | task feature]: their gradient factors split by part (gradient_factors.py)
        self.meta_net = MetaNet(feat * (2 if concat else 1), prompt.n_ctx, dim, method.meta_net, method.meta_hidden,
                                prompt.init_std, key_count=n_classes if self.class_aware else n_tasks,
                                dense_in=feat if concat else 0, key_group=group.class_task() if concat else None)
        self.class_prompts = ContextPromptBank(group.classnames, prompt.n_ctx, backbone,
                                               prompt.class_token_position)

    @classmethod
    def label(cls, cfg: MethodConfig) -> str:
        return (f"softcpt-{cfg.variant}" + ("" if cfg.meta_input == "concat" else f"-{cfg.meta_input}")
                + ("-frozencls" if cfg.freeze_class_context else "")
                + (f"-sample{cfg.class_sample_rate:g}" if cfg.class_sample_rate > 0 else ""))

    @classmethod
    def transfers(cls, cfg: MethodConfig, to: str) -> bool:
        # The meta network makes a new class's (or task's) context from its name; a class-specific class
        # context (CS) is one per trained class, a task-specific one (TS) one per trained task.
        return cfg.variant[:2] != "CS" and (to == "classes" or cfg.variant[2:] == "TA")

    @classmethod
    def check(cls, method: MethodConfig, prompt: PromptConfig) -> None:
        super().check(method, prompt)
        class_aware = method.variant[:2] in ("CA", "CS")
        if prompt.class_ctx_init and not class_aware:
            raise ConfigError(f"prompt.class_ctx_init needs a class-aware variant (CA/CS): method.variant="
                              f"{method.variant} has no class context")
        if prompt.task_ctx_init and method.meta_input == "class":
            raise ConfigError("prompt.task_ctx_init: method.meta_input=class has no task context")
        if class_aware and prompt.n_class_ctx == 0:
            raise ConfigError(f"method.variant={method.variant} needs prompt.n_class_ctx > 0")
        if not class_aware and method.freeze_class_context:
            raise ConfigError(f"method.freeze_class_context=true needs a class-aware variant (CA/CS): "
                              f"method.variant={method.variant} has no class context")
        if not class_aware and method.class_sample_rate > 0:
            raise ConfigError(f"method.class_sample_rate={method.class_sample_rate} needs a class-aware variant "
                              f"(CA/CS), as in the official code: method.variant={method.variant}")
        if not class_aware and method.meta_input != "concat":
            raise ConfigError(f"method.meta_input={method.meta_input} needs a class-aware variant (CA/CS): "
                              f"method.variant={method.variant} has no class feature to read")

    @classmethod
    def official_modules(cls, cfg: MethodConfig) -> int:
        # + the class prompt learner, unless frozen (the official code then does not register it)
        return 4 if cfg.variant[:2] in ("CA", "CS") and not cfg.freeze_class_context else 3

    def _task_owner(self, tasks: torch.Tensor) -> torch.Tensor:
        """Task-context row of each task prompt: its own (TS) or the shared one (TA)."""
        return tasks if self.task_specific else torch.zeros_like(tasks)

    def class_rows(self) -> Dict[str, torch.Tensor]:
        rows = {}
        if self.uses_tasks:
            rows["task_ctx"] = self._task_owner(self.class_task)
        if self.class_aware and self.class_ctx.requires_grad:
            all_classes = torch.arange(self.num_classes, device=self.class_task.device)
            rows["class_ctx"] = all_classes if self.class_specific else torch.zeros_like(all_classes)
        return rows

    def _selection(self, class_index: Optional[torch.Tensor]) -> _Selection:
        index = torch.arange(self.num_classes, device=self.class_task.device) if class_index is None else class_index
        tasks, task_of = torch.unique(self.class_task[index], return_inverse=True)
        if not self.class_aware:
            return _Selection(index, tasks, task_of, None, task_of)
        class_owner = index if self.class_specific else torch.zeros_like(index)
        return _Selection(index, tasks, task_of, class_owner, torch.arange(len(index), device=index.device))

    def task_features(self, tasks: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Raw text feature of the task prompts of ``tasks`` (default all) ``[T', E]``; recomputed each
        step (u learns)."""
        tasks = torch.arange(len(self.task_prompts), device=self.class_task.device) if tasks is None else tasks
        return self.backbone.text_encoder(self.task_prompts(self.task_ctx, self._task_owner(tasks), tasks))

    def context_groups(self, class_index: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """The distinct context vectors ``[G, N, D]`` and which one each selected global class uses ``[C']``:
        one per task of the selection (NA), one per class (CA/CS). Only the selected classes' tasks'
        prompts are encoded."""
        sel = self._selection(class_index)
        feature_dtype = torch.float16 if self.backbone.official_fp16 else torch.float32  # the meta network's input
        task_feat = self.task_features(sel.tasks).to(feature_dtype) if self.uses_tasks else None
        if not self.class_aware:  # one context per task (the meta network's rows are keyed by task)
            return self.meta_net(task_feat, sel.tasks), sel.context
        class_feat = self.backbone.text_encoder(self.class_feature_prompts(self.class_ctx, sel.class_owner,
                                                                            sel.index)).to(feature_dtype)
        if self.meta_input == "class":
            return self.meta_net(class_feat, sel.index), sel.context
        if self.meta_input == "mean":
            return self.meta_net((class_feat + task_feat[sel.task_of]) / 2, sel.index), sel.context
        # Official order: class feature first, then the feature of the class's task.
        return self.meta_net(torch.cat([class_feat, task_feat[sel.task_of]], dim=1), sel.index), sel.context

    def contexts(self, class_index: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Context vectors of the selected global classes ``[C', N, D]``."""
        ctx, owner = self.context_groups(class_index)
        return ctx[owner]

    def forward(self, class_index: Optional[torch.Tensor] = None) -> torch.Tensor:
        ctx, owner = self.context_groups(class_index)
        return self.backbone.text_encoder(self.class_prompts(ctx, owner, class_index))

    def prompt_structures(self, class_index: torch.Tensor):
        sel = self._selection(class_index)
        banks = [(self.task_prompts, self._task_owner(sel.tasks), sel.tasks)] if self.uses_tasks else []
        if self.class_aware:
            banks.append((self.class_feature_prompts, sel.class_owner, sel.index))
        banks.append((self.class_prompts, sel.context, sel.index))
        return [bank.structure(bank.n_ctx, owner, index)[:2] for bank, owner, index in banks]
