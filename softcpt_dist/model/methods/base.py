"""The interface every method implements, so that training and evaluation never ask for a method by name.

A method says how it is trained and evaluated:

- ``trains_prompts``: its learnable tensors are trained by the training loop (SoftCPT, CoOp);
  otherwise it is evaluated as built (zero-shot) or ``fits`` its own classifier (linear probe);
- ``per_task(cfg)``: with ``train.mode=auto``, whether each task trains on its own (CoOp CA/CS);
- ``official_module_count``: modules the official code registers with one optimizer (see optim.py).

A prompt method is an ``nn.Module`` whose ``forward(class_index=None)`` returns the raw text
feature of every class of its task group (or of the selected global classes), encoding only what
those classes need (an ``image_conditional`` one's ``forward(class_index, image_features)``: per image); the classifier turns them into cosine logits. ``prompt_structures`` says which
prompts that encodes, so that the class-shard planner can cost a share without encoding it.
"""

from __future__ import annotations

from typing import ClassVar, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from softcpt_dist.config import Config, ConfigError, EngineConfig, MethodConfig, PromptConfig
from softcpt_dist.data.tasks import TaskGroup


# prompt.*_ctx_init keys: the context each initialises (the methods honouring them list them in context_inits)
CONTEXT_INITS = {"ctx_init": "CoOp's context (method.name=coop)",
                 "task_ctx_init": "SoftCPT's task context (method.name=softcpt)",
                 "class_ctx_init": "SoftCPT's class context (method.name=softcpt, CA/CS variants)"}


class Method(nn.Module):
    name: ClassVar[str]
    trains_prompts: ClassVar[bool] = True
    fits: ClassVar[bool] = False  # fits a classifier on frozen image features instead of using prompts
    context_inits: ClassVar[Tuple[str, ...]] = ()  # the prompt.*_ctx_init keys it honours
    samples_classes: ClassVar[bool] = False  # honours method.class_sample_rate
    # Its class features depend on the image (CoCoOp): forward(class_index, image_features) -> [B, C', E]
    image_conditional: ClassVar[bool] = False
    # Its update is its loss's gradient projected against a guide loss's (ProGrad): guide_loss() and project()
    projects_gradient: ClassVar[bool] = False
    # Per-sample numbers its loss adds to class-parallel scoring's statistics gather (ProGrad's guide loss: 5)
    share_statistics: ClassVar[int] = 0
    # It scores classes against the image's per-position features (PLOT): scores(image_tokens, ...) -> logits
    uses_local_features: ClassVar[bool] = False

    def __init__(self, backbone, group: TaskGroup, prompt: PromptConfig, method: MethodConfig):
        super().__init__()
        # The backbone is shared, not owned: keep it out of this module's parameters and state dict.
        self.__dict__["backbone"] = backbone
        self.method_cfg = method
        self.num_classes = group.num_classes
        self.register_buffer("class_task", group.class_task().to(backbone.device), persistent=False)

    @classmethod
    def official_modules(cls, cfg: MethodConfig) -> int:
        """Modules the official code registers with one shared optimizer (see optim.py)."""
        return 1

    @property
    def official_module_count(self) -> int:
        return self.official_modules(self.method_cfg)

    @classmethod
    def label(cls, cfg: MethodConfig) -> str:
        """Short name for run names and reports, e.g. softcpt-NATA, coop-CS."""
        return cls.name.replace("_", "-")

    @classmethod
    def per_task(cls, cfg: MethodConfig) -> bool:
        return False

    @classmethod
    def transfers(cls, cfg: MethodConfig, to: str) -> bool:
        """Whether trained prompts can score ``to`` = "classes" or "tasks" they were not trained on: no
        learnable tensor is one per class (for classes) or one per task (for tasks)."""
        return False

    @classmethod
    def check(cls, method: MethodConfig, prompt: PromptConfig) -> None:
        """Refuse settings this method cannot run with (``ConfigError``), before a run touches anything."""
        if method.class_sample_rate > 0 and not cls.samples_classes:
            raise ConfigError(f"method.class_sample_rate={method.class_sample_rate} needs a class-aware SoftCPT "
                              f"variant (CA/CS); method.name={method.name} encodes every class each step")
        for key in CONTEXT_INITS:
            if getattr(prompt, key) and key not in cls.context_inits:
                raise ConfigError(f"prompt.{key} does not apply to method.name={method.name}: it initialises "
                                  + CONTEXT_INITS[key])

    @classmethod
    def check_engine(cls, method: MethodConfig, engine: EngineConfig) -> None:
        """Refuse engine settings this method cannot train with (``ConfigError``), before a run touches anything."""

    @classmethod
    def check_setup(cls, cfg: Config, backbone) -> None:
        """Refuse a run's data or backbone this method cannot work with (``ConfigError``), before the run touches
        anything (train, eval and profile)."""

    def forward(self, class_index: Optional[torch.Tensor] = None) -> torch.Tensor:
        raise NotImplementedError

    def class_loss_terms(self, class_features: torch.Tensor, class_index: Optional[torch.Tensor]
                         ) -> Optional[torch.Tensor]:
        """Per-class terms ``[C']`` whose mean the method adds to the training loss, from the raw features of
        the encoded classes (``class_index``, default all); None (the default) adds nothing. Per class, so
        that class-parallel scoring adds each share's own (``share_loss.py``)."""
        return None

    def loss_term(self, class_features: torch.Tensor, class_index: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """What the method adds to the training loss: the mean of its ``class_loss_terms``, or None."""
        terms = self.class_loss_terms(class_features, class_index)
        return None if terms is None else terms.mean()

    def prompt_structures(self, class_index: torch.Tensor) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """``(source, length)`` of every prompt batch ``forward(class_index)`` encodes (see ``PromptBatch``)."""
        raise NotImplementedError

    def text_positions(self, class_index: torch.Tensor) -> int:
        """Token positions per layer that ``forward(class_index)`` encodes: the cost of a class share.
        Reads buffers only (no parameters), so it runs outside ``forward()`` also under ZeRO-3."""
        encoder = self.backbone.text_encoder
        return sum(encoder.positions(source, length) for source, length in self.prompt_structures(class_index))

    def learnable_parameters(self) -> Dict[str, nn.Parameter]:
        return {n: p for n, p in self.named_parameters() if p.requires_grad}

    def class_rows(self) -> Dict[str, torch.Tensor]:
        """Learnable tensors whose rows are read only by the encoding of certain classes: name (as in
        ``learnable_parameters``) -> the row each class's encoding reads ``[C]``. A row whose classes are all
        in one rank's class share gets its whole gradient on that rank (``training/gradient_exchange.py``);
        none by default."""
        return {}
