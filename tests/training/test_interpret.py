"""Reading learned prompts (``softcpt-dist interpret``) against the official ``interpret_prompt.py`` math:
``distance = cdist(ctx, token_embedding.weight)``, the ``k`` smallest per context vector (``argsort``),
``tokenizer.decoder[idx]``. A context initialised from words reads back as those words (at distance 0, to cdist's rounding)."""

import json

import pytest
import torch

from softcpt_dist.cli import main
from softcpt_dist.config import MethodConfig, PromptConfig
from softcpt_dist.data.tasks import TaskGroup, TaskSpec
from softcpt_dist.model import build_method
from softcpt_dist.model.prompt_words import method_contexts, nearest_words

GROUP = TaskGroup([TaskSpec("pants", "pants type", ("jeans", "shorts")),
                   TaskSpec("leaf", "plant leaf disease", ("healthy", "rust", "powdery mildew"))])


def _official(ctx, embedding, decoder, k):
    distance = torch.cdist(ctx.float(), embedding.float())
    idxs = torch.argsort(distance, dim=1)[:, :k]
    return [[(decoder[i.item()], distance[m, i].item()) for i in row] for m, row in enumerate(idxs)]


def test_nearest_words_equal_the_official_reading_and_words_read_back(tiny_backbone):
    method = build_method(tiny_backbone, GROUP, MethodConfig(name="coop", coop_mode="MT"),
                          PromptConfig(ctx_init="a photo of a", n_ctx=4))
    embedding, decoder = tiny_backbone.token_embedding.weight.detach(), tiny_backbone.tokenizer.decoder
    torch.manual_seed(0)
    noisy = method.ctx[0].detach() + 0.05 * torch.randn_like(method.ctx[0])
    ours = nearest_words(noisy, embedding, decoder, 5)
    official = _official(noisy, embedding, decoder, 5)
    assert [[w["token"] for w in row] for row in ours] == [[t for t, _ in row] for row in official]
    for row, ref in zip(ours, official):
        assert [w["distance"] for w in row] == pytest.approx([d for _, d in ref], rel=1e-6)
    exact = nearest_words(method.ctx[0].detach(), embedding, decoder, 2)
    assert [row[0]["token"] for row in exact] == ["a</w>", "photo</w>", "of</w>", "a</w>"]
    # 0 up to cdist's matrix-product rounding, far below the next token's distance
    assert all(row[0]["distance"] < 0.01 * row[1]["distance"] for row in exact)


def test_every_learned_and_generated_context_is_named(tiny_backbone):
    cata = method_contexts(build_method(tiny_backbone, GROUP, MethodConfig(variant="CATS"), PromptConfig()), GROUP)
    assert list(cata)[:3] == ["task context (pants type)", "task context (plant leaf disease)",
                              "class context (all classes)"]
    assert [n for n in cata if n.startswith("generated")] == [
        "generated (pants: jeans)", "generated (pants: shorts)", "generated (leaf: healthy)",
        "generated (leaf: rust)", "generated (leaf: powdery mildew)"]
    assert all(c.shape == (16, tiny_backbone.ctx_dim) for n, c in cata.items() if n.startswith("generated"))
    nata = method_contexts(build_method(tiny_backbone, GROUP, MethodConfig(), PromptConfig()), GROUP)
    assert list(nata) == ["task context (all tasks)", "generated (pants)", "generated (leaf)"]
    coop = method_contexts(build_method(tiny_backbone, GROUP, MethodConfig(name="coop", coop_mode="CS"),
                                        PromptConfig()), GROUP)
    assert list(coop) == [f"context ({c})" for c in GROUP.classnames]


@pytest.mark.slow
def test_the_command_reads_a_finished_run(small_data_root, tmp_path, capsys):
    common = [f"data.root={small_data_root}", "data.shots=2", "optim.epochs=1", "optim.batch_size=4",
              f"train.output_dir={tmp_path}", "train.progress=false"]
    assert main(["train", *common, "train.run_name=nata"]) == 0
    capsys.readouterr()
    assert main(["interpret", "--run", str(tmp_path / "nata"), "--topk", "3"]) == 0
    words = json.loads((tmp_path / "nata" / "prompt_words.json").read_text())["joint"]
    assert len(words["task context (all tasks)"]) == 4 and len(words["task context (all tasks)"][0]) == 3
    assert "## generated (colour)" in capsys.readouterr().out
    assert main(["train", *common, "train.run_name=zs", "method.name=zeroshot"]) == 0
    assert main(["interpret", "--run", str(tmp_path / "zs")]) == 2  # nothing learned: a clear error
