"""Zero-shot CLIP with a prompt ensemble (``method.zeroshot_templates=ensemble``, the official
``ZeroshotCLIP2``) against the official math on open_clip's own ``encode_text``: per template (CLIP's seven
selected ImageNet templates, then the task's own), ``f = encode_text(tokenize(template.format(c)))``,
``f /= |f|``; the mean over templates, normalised. Equal to fp32 rounding (bound 1e-5 on unit vectors)."""

import open_clip
import torch
import torch.nn.functional as F

from softcpt_dist.config import MethodConfig, PromptConfig
from softcpt_dist.data.tasks import TaskGroup, TaskSpec
from softcpt_dist.model import build_method, method_label
from softcpt_dist.model.backbone import CLIPBackbone, ensure_builtin_configs
from softcpt_dist.model.methods.zeroshot import ENSEMBLE_TEMPLATES

GROUP = TaskGroup([TaskSpec("pants", "pants type", ("jeans", "shorts"), template="a photo of {}, a type of pants."),
                   TaskSpec("leaf", "leaf disease", ("healthy", "rust", "powdery mildew"),
                            template="a photo of a plant leaf with {} disease.")])


def _official(model, tokenizer) -> torch.Tensor:
    rows = []
    for task in GROUP.tasks:
        templates = list(ENSEMBLE_TEMPLATES) + [task.template]
        mean = 0
        for tmpl in templates:
            with torch.no_grad():
                f = model.encode_text(tokenizer([tmpl.format(c) for c in task.classnames]))
            mean = mean + f / f.norm(dim=-1, keepdim=True)
        mean = mean / len(templates)
        rows.append(mean / mean.norm(dim=-1, keepdim=True))
    return torch.cat(rows)


def test_ensemble_features_equal_the_official_prompt_ensemble():
    ensure_builtin_configs()
    torch.manual_seed(3)
    model = open_clip.create_model("softcpt-tiny", pretrained=None).eval()
    tokenizer = open_clip.get_tokenizer("softcpt-tiny")
    backbone = CLIPBackbone(model, tokenizer, "softcpt-tiny", None)
    method = build_method(backbone, GROUP, MethodConfig(name="zeroshot", zeroshot_templates="ensemble"), PromptConfig())
    assert len(ENSEMBLE_TEMPLATES) == 7 and len(method.banks) == 8
    ours = F.normalize(method().float(), dim=-1)
    assert float((ours - _official(model, tokenizer)).abs().max()) <= 1e-5
    subset = torch.tensor([1, 4])  # a class share (class-parallel text) gives the same rows
    assert float((F.normalize(method(subset).float(), dim=-1) - ours[subset]).abs().max()) <= 1e-6
    single = build_method(backbone, GROUP, MethodConfig(name="zeroshot"), PromptConfig())
    with torch.no_grad():
        own = model.encode_text(tokenizer([t.template.format(c) for t in GROUP.tasks for c in t.classnames]))
    assert float((F.normalize(single().float(), dim=-1) - F.normalize(own, dim=-1)).abs().max()) <= 1e-5
    assert method_label(MethodConfig(name="zeroshot", zeroshot_templates="ensemble")) == "zeroshot-ensemble"
    assert method_label(MethodConfig(name="zeroshot")) == "zeroshot"
