"""softcpt_dist: multi-task prompt tuning of frozen CLIP models with SoftCPT."""

from softcpt_dist._compat import import_torchvision as _import_torchvision

_import_torchvision()

__version__ = "0.1.0"
