"""YAML-1.1 boolean words (``on``/``off``/``yes``/``no``...) where the config wants a string.

YAML, and so OmegaConf, reads an unquoted ``off`` as ``false``: ``train.run_name=off`` would name the
run "False" and ``text.shard=off`` would be refused. Overrides of string fields keep the word as
written; a choice field that received a boolean from a YAML file gets the choice it stood for.
"""

from __future__ import annotations

from dataclasses import is_dataclass
from typing import Any, Optional, get_type_hints

_BOOL_WORDS = {"True": ("on", "yes", "true"), "False": ("off", "no", "false")}


def bool_word(value, allowed: tuple):
    """A string field holds a YAML boolean as "False"/"True": the choice that was written, when exactly
    one allowed choice is such a word."""
    words = [c for c in allowed if isinstance(c, str) and c.lower() in _BOOL_WORDS.get(str(value), ())]
    return words[0] if len(words) == 1 else value


_YAML_BOOLS = {"on", "off", "yes", "no", "true", "false", "y", "n"}


def as_written(item: str, root: type) -> str:
    """``key=off`` for a string field means the string: quote the YAML-1.1 boolean words (e.g.
    ``train.run_name=off``, ``text.shard=off``), which YAML would otherwise read as true/false."""
    key, value = item.split("=", 1)
    section: Any = root
    for part in key.split("."):
        hint = get_type_hints(section).get(part) if is_dataclass(section) else None
        if hint is None:
            return item
        section = hint
    if section in (str, Optional[str]) and value.strip().lower() in _YAML_BOOLS:
        return f"{key}='{value.strip()}'"
    return item
