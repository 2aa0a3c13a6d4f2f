"""``softcpt-dist interpret``: the nearest vocabulary words of every learned and generated context of a
finished run (the official ``interpret_prompt.py``), written beside the run as ``prompt_words.json/.md``."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional

from softcpt_dist.config import Config, ConfigError
from softcpt_dist.files import atomic_write_text
from softcpt_dist.model import method_class, method_label
from softcpt_dist.model.prompt_words import method_contexts, nearest_words
from softcpt_dist.training.checkpoint import checkpoint_meta, load_learnable, load_prompt_checkpoint
from softcpt_dist.training.trainer import Trainer

WORDS_FILE = "prompt_words"


def interpret_run(cfg: Config, checkpoint: Path, k: int = 5) -> Dict:
    """``{scope: {context name: [[{"token", "distance"}] * k] per context vector}}`` of ``checkpoint``."""
    method = method_class(cfg.method, cfg.prompt)
    if not method.trains_prompts:
        raise ConfigError(f"interpret: {method_label(cfg.method)} has no learned prompts to read")
    trainer = Trainer(cfg)
    states = load_prompt_checkpoint(checkpoint, checkpoint_meta(cfg.model, cfg.method, cfg.prompt,
                                                                trainer.data.group, cfg.data))
    backbone = trainer.backbone
    embedding, decoder = backbone.token_embedding.weight.detach(), backbone.tokenizer.decoder
    out = {}
    for scope in trainer.scopes:
        model = trainer.scope_classifier(scope)
        load_learnable(model.method, states[scope.key], f"{checkpoint} [{scope.key}]")
        out[scope.key] = {name: nearest_words(ctx, embedding, decoder, k)
                          for name, ctx in method_contexts(model.method, scope.group).items()}
    return out


def markdown_of(words: Dict, title: str) -> str:
    """One section per scope and context; a line per context vector: its nearest tokens (distance)."""
    lines = [f"# {title}", "", "Nearest vocabulary tokens of each context vector (Euclidean distance in the "
             "token-embedding space; `</w>` ends a word)."]
    for scope, contexts in words.items():
        for name, rows in contexts.items():
            lines += ["", f"## {name}" if scope == "joint" else f"## {scope}: {name}", ""]
            lines += [f"{m + 1}. " + ", ".join(f"`{w['token']}` ({w['distance']:.3f})" for w in row)
                      for m, row in enumerate(rows)]
    return "\n".join(lines) + "\n"


def write_words(words: Dict, run: Optional[Path], title: str) -> str:
    """``prompt_words.json`` and ``.md`` in ``run`` (when given); returns the Markdown."""
    import json
    text = markdown_of(words, title)
    if run is not None:
        atomic_write_text(Path(run) / f"{WORDS_FILE}.json", json.dumps(words, indent=1) + "\n")
        atomic_write_text(Path(run) / f"{WORDS_FILE}.md", text)
    return text
