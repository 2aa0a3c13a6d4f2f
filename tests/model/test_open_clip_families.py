"""Every open_clip architecture either works or is declined by name (issue #25 item 4).

The families are derived from the live ``open_clip.list_models()`` (with the project's own configs): a model
that no family below matches fails as an "unclassified family", so a new family in an open_clip upgrade is
looked at, not silently skipped. Per family:

* works: its smallest model (by parameters; random init, nothing shrunk) builds through ``build_backbone``
  and zero-shot CLIP's class features equal open_clip's own ``encode_text`` on the same tokenization
  (bound 1e-5, as the other open_clip comparisons); every other member passes the same config check;
* declined: every member makes ``build_backbone`` raise the project's ``ConfigError`` naming the architecture
  and what is missing, before any model or tokenizer is built (so ``transformers`` is never imported) —
  never another exception.

No model is too large for CI: the largest example (150M parameters) builds and compares in under 2 s on 2
cores, the whole file in about 10 s, so nothing here is ``slow``.
"""

import re
from dataclasses import dataclass
from typing import Optional

import open_clip
import pytest
import torch

from softcpt_dist.config import ConfigError, MethodConfig, ModelConfig, PromptConfig
from softcpt_dist.data.tasks import TaskGroup, TaskSpec
from softcpt_dist.model import build_method
from softcpt_dist.model.backbone import (CLIPBackbone, build_backbone, ensure_builtin_configs,
                                         unsupported_reasons)

HF_TOWER = r"Hugging Face text tower \(.+\), which needs the `transformers` package and the model's config and " \
           r"tokenizer files"
HF_TOKENIZER = r"non-CLIP tokenizer \(.+\), which needs the `transformers` package and the model's tokenizer files"


@dataclass(frozen=True)
class Family:
    name: str
    pattern: str  # full match over open_clip model names
    example: str  # the smallest member by parameters (open_clip 3.3.0); built when the family works
    declined: Optional[str] = None  # a regex the refusal must match (None: the family works)


FAMILIES = (
    # works: open_clip's CLIP text transformer, the CLIP BPE tokenizer, features at the EOT token
    Family("softcpt (the project's test models)", r"softcpt-[\w-]+", "softcpt-tiny"),  # 7M
    Family("OpenAI ResNet", r"RN\d+(x\d+)?", "RN50"),  # 102M
    Family("ViT (open_clip VisionTransformer)", r"ViT-\w+-\d+(-plus)?(-alt|-\d+)?", "ViT-S-16-alt"),  # 42M
    Family("QuickGELU variants", r"(RN\d+(x\d+)?|ViT-\w+-\d+(-\d+)?)-quickgelu", "RN50-quickgelu"),  # 102M
    Family("ConvNeXt (timm)", r"convnext_\w+", "convnext_tiny"),  # 92M
    Family("timm ViT / Swin image towers", r"(vit|swin)_\w+", "vit_relpos_medium_patch16_cls_224"),  # 102M
    Family("EVA01 / EVA02 (timm)", r"EVA0[12]-\w+-\d+(-plus|-\d+)?", "EVA02-B-16"),  # 150M
    Family("MobileCLIP / MobileCLIP2, causal text", r"MobileCLIP2?-B", "MobileCLIP-B"),  # 150M
    Family("MobileCLIP / MobileCLIP2, bidirectional text", r"MobileCLIP2?-(S\d|L-14)", "MobileCLIP2-S0"),  # 75M
    Family("ViTamin", r"ViTamin-[A-Z]+\d?(-LTT|-\d+)?", "ViTamin-S"),  # 62M
    Family("PE-Core (Perception Encoder)", r"PE-Core-\w+-\d+(-\d+)?", "PE-Core-T-16-384"),  # 70M
    # declined
    Family("CoCa", r"coca_[\w-]+", "coca_ViT-B-32", declined=r"a CoCa model"),
    Family("SigLIP", r"ViT-\w+-\d+-SigLIP(-i18n)?(-\d+)?", "ViT-B-16-SigLIP",
           declined=HF_TOKENIZER + r".*pool_type='last'"),
    Family("SigLIP2", r"ViT-\w+-\d+-SigLIP2(-\d+)?", "ViT-B-16-SigLIP2", declined=HF_TOKENIZER + r".*pool_type='last'"),
    Family("CLIPA", r"ViT-\w+-\d+-CLIPA(-\d+)?", "ViT-L-14-CLIPA", declined=HF_TOKENIZER + r".*pool_type='last'"),
    Family("MetaCLIP 2 worldwide", r"ViT-\w+-\d+-worldwide(-\d+)?(-quickgelu)?", "ViT-L-14-worldwide",
           declined=HF_TOKENIZER + r".*pool_type='eos'"),
    Family("NLLB-CLIP", r"nllb-clip-[\w-]+", "nllb-clip-base", declined=HF_TOWER),
    Family("XLM-RoBERTa", r"xlm-roberta-[\w-]+", "xlm-roberta-base-ViT-B-32", declined=HF_TOWER),
    Family("RoBERTa", r"roberta-[\w-]+", "roberta-ViT-B-32", declined=HF_TOWER),
    Family("mT5", r"mt5-[\w-]+", "mt5-base-ViT-B-32", declined=HF_TOWER),
)

GROUP = TaskGroup([TaskSpec("pants", "pants type", ("jeans", "shorts"), template="a photo of {}, a type of pants."),
                   TaskSpec("leaf", "leaf disease", ("healthy", "rust", "powdery mildew"),
                            template="a photo of a plant leaf with {} disease.")])


def _models() -> list:
    ensure_builtin_configs()
    return open_clip.list_models()


def _members(family: Family) -> list:
    return [name for name in _models() if re.fullmatch(family.pattern, name)]


def test_every_architecture_is_in_exactly_one_family():
    families = {name: [f.name for f in FAMILIES if re.fullmatch(f.pattern, name)] for name in _models()}
    unclassified = sorted(name for name, found in families.items() if not found)
    assert not unclassified, (f"unclassified family: {unclassified} (add a Family to FAMILIES, and a row to "
                              "docs/real_clip.md, saying whether it works or is declined and why)")
    ambiguous = {name: found for name, found in families.items() if len(found) > 1}
    assert not ambiguous, ambiguous
    for family in FAMILIES:
        assert family.example in _members(family), f"{family.name}: {family.example} is not a live member"


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_every_member_agrees_with_its_family(family):
    """Config-level (nothing built): a working family's members are all accepted, a declined one's all refused."""
    for name in _members(family):
        reasons = unsupported_reasons(name)
        if family.declined is None:
            assert reasons == [], (name, reasons)
        else:
            assert re.search(family.declined, "; ".join(reasons)), (name, reasons)


@pytest.mark.parametrize("family", [f for f in FAMILIES if f.declined], ids=lambda f: f.name)
def test_declined_family_is_refused_by_name_before_anything_is_built(family, monkeypatch):
    def must_not_run(*args, **kwargs):
        raise AssertionError("a declined architecture got as far as building a model or tokenizer")

    monkeypatch.setattr(open_clip, "create_model", must_not_run)
    monkeypatch.setattr(open_clip, "get_tokenizer", must_not_run)
    for name in _members(family):
        for pretrained in (None, "some-tag"):
            with pytest.raises(ConfigError) as err:
                build_backbone(ModelConfig(arch=name, pretrained=pretrained))
            message = str(err.value)
            assert f"model.arch={name!r} is not supported" in message
            assert re.search(family.declined, message), message


@pytest.mark.parametrize("family", [f for f in FAMILIES if not f.declined], ids=lambda f: f.name)
def test_working_family_gives_encode_text_zero_shot_features(family, monkeypatch):
    built = []
    create_model = open_clip.create_model

    def keep(*args, **kwargs):
        built.append(create_model(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(open_clip, "create_model", keep)
    torch.manual_seed(0)
    backbone = build_backbone(ModelConfig(arch=family.example))  # random init, fp32, CPU
    (model,) = built
    method = build_method(backbone, GROUP, MethodConfig(name="zeroshot"), PromptConfig())
    tokenizer = open_clip.get_tokenizer(family.example)
    with torch.no_grad():
        ours = method()
        ref = model.encode_text(tokenizer([t.template.format(c) for t in GROUP.tasks for c in t.classnames]))
    assert ours.shape == ref.shape == (5, backbone.embed_dim)
    assert float((ours - ref).abs().max()) <= 1e-5, (family.example, float((ours - ref).abs().max()))


def test_backbone_refuses_a_tower_pooled_elsewhere_than_the_eot():
    """A model built by hand (not through build_backbone) with another text pooling is refused, not misread."""
    ensure_builtin_configs()
    model = open_clip.create_model("softcpt-tiny", pretrained=None)
    model.text_pool_type = "last"
    with pytest.raises(ConfigError, match="pool_type='last'"):
        CLIPBackbone(model, open_clip.get_tokenizer("softcpt-tiny"), "softcpt-tiny", None)
