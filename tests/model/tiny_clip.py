"""The random-init tiny CLIP the official-math reference tests share: the open_clip model itself (what a
reference built from the official code runs), its tokenizer, and our backbone on the same weights."""

import open_clip
import torch

from softcpt_dist.model.backbone import CLIPBackbone, ensure_builtin_configs


def tiny_clip(arch: str = "softcpt-tiny", seed: int = 5, text_path: str = "shared_prefix"):
    ensure_builtin_configs()
    torch.manual_seed(seed)
    model = open_clip.create_model(arch, pretrained=None).eval().requires_grad_(False)
    tokenizer = open_clip.get_tokenizer(arch)
    backbone = CLIPBackbone(model, tokenizer, arch, None, logit_scale=model.logit_scale.detach().clone(),
                            text_path=text_path)
    return model, tokenizer, backbone
