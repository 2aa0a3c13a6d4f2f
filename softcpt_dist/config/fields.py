"""Field helpers of the typed config sections: allowed choices and ranges, declared at the field.

``softcpt_dist.config.validate_section`` checks them.
"""

from __future__ import annotations

from dataclasses import field, fields


class ConfigError(ValueError):
    """A configuration value or key is wrong; the message names it."""


def one_of(default, *choices):
    """A field whose value must be one of ``choices`` (checked by ``validate``; the one place they are listed)."""
    return field(default=default, metadata={"choices": (default, *choices)})


def positive(default):
    """A field that must be > 0."""
    return field(default=default, metadata={"positive": True})


def positive_list(default: list):
    """A list field of ``len(default)`` numbers, each > 0 (e.g. per-channel gains)."""
    return field(default_factory=lambda: list(default), metadata={"positive": True, "length": len(default)})


def non_negative(default):
    """A field that must be >= 0."""
    return field(default=default, metadata={"non_negative": True})


def fraction(default):
    """A field in [0, 1] (a rate or a share)."""
    return field(default=default, metadata={"fraction": True})


def choices(section: type, name: str) -> tuple:
    """The allowed values of a ``one_of`` field, e.g. ``choices(SamplerConfig, "mode")``."""
    return next(f.metadata["choices"] for f in fields(section) if f.name == name)
