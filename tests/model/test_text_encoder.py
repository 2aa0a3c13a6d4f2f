"""The text module on token embeddings equals open_clip; truncation and prompt assembly are exact."""

import open_clip
import pytest
import torch

from softcpt_dist.model.backbone import ensure_builtin_configs
from softcpt_dist.model.text_encoder import TextEncoder
from softcpt_dist.model.prompts import ContextPromptBank, tokenize

TEXTS = ["a photo of a dog.", "X X X X pants type.", "a much longer prompt about a striped background pattern."]


@pytest.fixture(scope="module")
def raw_model():
    ensure_builtin_configs()
    torch.manual_seed(1)
    return open_clip.create_model("softcpt-tiny", pretrained=None).eval()


def test_text_encoder_matches_open_clip_encode_text(raw_model):
    tokenizer = open_clip.get_tokenizer("softcpt-tiny")
    ids = tokenizer(TEXTS)
    eot = ids.argmax(dim=-1)
    enc = TextEncoder(raw_model)
    with torch.no_grad():
        ours = enc(raw_model.token_embedding(ids), eot)
        ref = raw_model.encode_text(ids)
    assert (ours - ref).abs().max().item() <= 1e-5


def test_truncated_encoding_equals_full_length(raw_model):
    tokenizer = open_clip.get_tokenizer("softcpt-tiny")
    ids = tokenizer(TEXTS)
    eot = ids.argmax(dim=-1)
    enc = TextEncoder(raw_model)
    emb = raw_model.token_embedding(ids)
    with torch.no_grad():
        full = enc(emb, eot)
        cut = enc(emb[:, : int(eot.max()) + 1], eot)
    assert emb.shape[1] == 77 and int(eot.max()) + 1 < 77
    assert (full - cut).abs().max().item() <= 1e-5


@pytest.mark.parametrize("position,literal", [
    ("end", "X X X X {}."),
    ("middle", "X X {} X X."),
    ("front", "{} X X X X."),
])
def test_prompt_bank_assembly_matches_literal_prompt(tiny_backbone, position, literal):
    """Filling the slots with the embedding of the token 'X' must give the literal text's features."""
    names = ["red", "light blue", "a very long class name with many words"]
    bank = ContextPromptBank(names, 4, tiny_backbone, position)
    x_id = tiny_backbone.tokenizer.encode("X")[0]
    x_emb = tiny_backbone.token_embedding(torch.tensor([x_id]))[0]
    ctx = x_emb.expand(len(names), 4, -1)
    emb, eot = bank(ctx).dense()
    ids, ref_eot = tokenize(tiny_backbone.tokenizer, [literal.format(n) for n in names], 77)
    assert torch.equal(eot, ref_eot)
    assert emb.shape[1] == int(eot.max()) + 1  # truncated, never the padded 77
    with torch.no_grad():
        ours = tiny_backbone.text_encoder(emb, eot)
        ref = tiny_backbone.text_encoder(tiny_backbone.token_embedding(ids), ref_eot)
    assert (ours - ref).abs().max().item() <= 1e-5


def test_prompt_bank_subset_truncates_to_selected(tiny_backbone):
    names = ["a", "a very long class name with many many words indeed"]
    bank = ContextPromptBank(names, 2, tiny_backbone)
    ctx = torch.zeros(1, 2, tiny_backbone.ctx_dim)
    emb, eot = bank(ctx, index=torch.tensor([0])).dense()
    assert emb.shape[1] == int(eot.max()) + 1 < bank.token_of.shape[1]


def test_overlong_prompt_is_a_clear_error(tiny_backbone):
    from softcpt_dist.config import ConfigError
    with pytest.raises(ConfigError, match="more than the context length"):
        ContextPromptBank(["word " * 80], 16, tiny_backbone)
