"""Local weight files load through the user path (build_backbone); wrong files give clear errors."""

import open_clip
import pytest
import torch

from softcpt_dist.model.backbone import build_backbone, ensure_builtin_configs
from softcpt_dist.model.weights import WeightsError
from softcpt_dist.config import ConfigError, ModelConfig


@pytest.fixture(scope="module")
def source_model():
    ensure_builtin_configs()
    torch.manual_seed(123)
    model = open_clip.create_model("softcpt-tiny", pretrained=None).eval()
    with torch.no_grad():
        model.logit_scale.fill_(4.6052)  # a trained-looking value, to see it arrive
    return model


def _same_text_and_image(backbone, model):
    ids = open_clip.get_tokenizer("softcpt-tiny")(["a photo of a red object."])
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        text = backbone.text_encoder(backbone.token_embedding(ids), ids.argmax(-1))
        assert torch.allclose(text, model.encode_text(ids), atol=1e-5)
        assert torch.allclose(backbone.image_encoder(images), model.encode_image(images), atol=1e-5)
    assert backbone.logit_scale.item() == pytest.approx(4.6052, abs=1e-4)


def test_open_clip_state_dict_file_loads(tmp_path, source_model):
    path = tmp_path / "tiny_open_clip.pt"
    torch.save(source_model.state_dict(), path)
    backbone = build_backbone(ModelConfig(arch="softcpt-tiny", pretrained=str(path)))
    assert backbone.weights == str(path)
    _same_text_and_image(backbone, source_model)


def test_training_checkpoint_with_module_prefix_loads(tmp_path, source_model):
    path = tmp_path / "epoch_1.pt"
    torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in source_model.state_dict().items()}}, path)
    _same_text_and_image(build_backbone(ModelConfig(arch="softcpt-tiny", pretrained=str(path))), source_model)


def test_openai_torchscript_archive_loads(tmp_path, source_model):
    """OpenAI's original checkpoints are TorchScript archives with a 0-dim logit_scale and extra keys."""
    images, text = torch.ones(1, 3, 32, 32), torch.zeros(1, 77, dtype=torch.long)
    traced = torch.jit.trace_module(source_model, {"forward": (images, text), "encode_text": (text,),
                                                   "encode_image": (images,)}, check_trace=False)
    path = tmp_path / "RN-tiny-openai.pt"
    torch.jit.save(traced, str(path))
    backbone = build_backbone(ModelConfig(arch="softcpt-tiny", pretrained=str(path)))
    _same_text_and_image(backbone, source_model)


def test_weights_for_another_architecture_are_rejected(tmp_path):
    ensure_builtin_configs()
    other = open_clip.create_model("softcpt-tiny-rn", pretrained=None)
    path = tmp_path / "rn.pt"
    torch.save(other.state_dict(), path)
    with pytest.raises(WeightsError, match=r"rn\.pt does not fit model\.arch=softcpt-tiny"):
        build_backbone(ModelConfig(arch="softcpt-tiny", pretrained=str(path)))


def test_corrupt_and_missing_weight_files(tmp_path):
    bad = tmp_path / "garbage.pt"
    bad.write_bytes(b"definitely not a checkpoint")
    with pytest.raises(WeightsError, match="cannot read weights file .*garbage.pt"):
        build_backbone(ModelConfig(arch="softcpt-tiny", pretrained=str(bad)))
    with pytest.raises(WeightsError, match="does not exist"):
        build_backbone(ModelConfig(arch="softcpt-tiny", pretrained=str(tmp_path / "nope.pt")))


def test_unknown_tag_and_arch(tmp_path):
    with pytest.raises(WeightsError, match="neither a local file nor a pretrained tag"):
        build_backbone(ModelConfig(arch="softcpt-tiny", pretrained="laion-imaginary"))
    with pytest.raises(ConfigError, match="not an open_clip architecture"):
        build_backbone(ModelConfig(arch="ViT-Imaginary-99"))


def test_openai_tags_switch_on_quick_gelu(monkeypatch):
    """RN50/openai weights were trained with QuickGELU; the tag's config must switch it on."""
    seen = {}

    def fake_create_model(arch, pretrained=None, **kwargs):
        seen.update(kwargs, arch=arch, pretrained=pretrained)
        raise RuntimeError("offline")

    monkeypatch.setattr(open_clip, "create_model", fake_create_model)
    with pytest.raises(WeightsError, match="offline"):
        build_backbone(ModelConfig(arch="RN50", pretrained="openai"))
    assert seen["force_quick_gelu"] is True and seen["pretrained"] == "openai"
    with pytest.raises(WeightsError):
        build_backbone(ModelConfig(arch="ViT-B-32", pretrained="laion2b_s34b_b79k"))
    assert seen["force_quick_gelu"] is False


def test_backbone_is_frozen_and_stays_in_eval(tiny_backbone):
    assert not any(p.requires_grad for p in tiny_backbone.parameters())
    tiny_backbone.train()
    assert not any(m.training for m in tiny_backbone.modules())


@pytest.mark.parametrize("precision,dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_low_precision_backbone(tmp_path, source_model, precision, dtype):
    path = tmp_path / "tiny.pt"
    torch.save(source_model.state_dict(), path)
    backbone = build_backbone(ModelConfig(arch="softcpt-tiny", precision=precision, pretrained=str(path)))
    assert backbone.dtype == dtype
    # the logit scale is read before the cast: exp(4.6052) stays 100.0, not bf16's 98.9
    assert backbone.logit_scale.dtype == torch.float32
    assert backbone.logit_scale.exp().item() == pytest.approx(torch.tensor(4.6052).exp().item(), rel=1e-6)
    ids = open_clip.get_tokenizer("softcpt-tiny")(["a photo of a dog."])
    out = backbone.text_encoder(backbone.token_embedding(ids)[:, :8], ids.argmax(-1))
    assert out.dtype == dtype and torch.isfinite(out.float()).all()
