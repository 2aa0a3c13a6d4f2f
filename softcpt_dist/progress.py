"""Progress bars that appear on interactive terminals and stay out of logs and CI output."""

from __future__ import annotations

import sys
from typing import Iterable, Optional

from tqdm.auto import tqdm


def progress(iterable: Iterable, desc: str = "", enabled: bool = True, total: Optional[int] = None,
             leave: bool = False):
    show = enabled and sys.stderr.isatty()
    return tqdm(iterable, desc=desc, total=total, leave=leave, disable=not show, dynamic_ncols=True)
