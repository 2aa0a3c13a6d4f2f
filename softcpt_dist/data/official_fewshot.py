"""The official few-shot subset files (``<dataset>/split_fewshot_mt/shot_K-seed_S.pkl`` of kding1225/softcpt),
so that a run trains on exactly the official images (``data.fewshot_source=official``).

They are pickles of Dassl ``DatumMT`` records. They are read with a restricted unpickler: the only class
it builds is a plain stand-in for those records (whose state must be strings, integers and lists of
integers); any other global -- a function, a module, another class -- is refused before anything runs.
An image is matched to this machine's split by the last two components of its path (class folder and
file name), and its label must agree.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Dict, List

from softcpt_dist.data.dataset import Sample
from softcpt_dist.data.tasks import DataError

# Where Dassl defines its records; pickles name a class by its defining module.
RECORD_CLASSES = {(module, name) for module in ("dassl.data.datasets.base_dataset", "dassl.data.datasets")
                  for name in ("DatumMT", "Datum")}
FIELDS = {"_impath": str, "_label": (int, list), "_task": (int, list), "_domain": int, "_classname": str}


class OfficialRecord:
    """A Dassl record's state, checked to be plain data: image path, label, task."""

    def __setstate__(self, state) -> None:
        if not isinstance(state, dict) or not set(state) <= set(FIELDS) or "_impath" not in state:
            raise pickle.UnpicklingError(f"a record with fields {sorted(state) if isinstance(state, dict) else state!r}"
                                         f" (expected some of {sorted(FIELDS)})")
        for key, value in state.items():
            ok = isinstance(value, FIELDS[key]) and (not isinstance(value, list)
                                                     or all(isinstance(v, int) for v in value))
            if not ok:
                raise pickle.UnpicklingError(f"record field {key} holds {type(value).__name__}")
        self.fields = dict(state)

    @property
    def impath(self) -> str:
        return self.fields["_impath"]

    @property
    def label(self) -> int:
        label = self.fields.get("_label", 0)
        return label[0] if isinstance(label, list) else label


class _RecordsOnly(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in RECORD_CLASSES:
            return OfficialRecord
        raise pickle.UnpicklingError(f"refusing global {module}.{name}: only Dassl Datum records are read")


def read_official_fewshot(path: Path) -> Dict[str, List[OfficialRecord]]:
    """``{"train": [...], "val": [...]}`` of an official few-shot file, read without running any code."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"official few-shot file not found: {path}")
    try:
        data = _RecordsOnly(io.BytesIO(path.read_bytes())).load()
    except Exception as err:  # refused globals, bad fields, truncated streams
        raise DataError(f"cannot read official few-shot file {path}: {err}") from None
    if not isinstance(data, dict) or not all(isinstance(data.get(s), list) for s in ("train", "val")):
        raise DataError(f"official few-shot file {path} holds no 'train' and 'val' lists")
    for split in ("train", "val"):
        if not all(isinstance(r, OfficialRecord) for r in data[split]):
            raise DataError(f"official few-shot file {path}: '{split}' holds something other than records")
    return {s: data[s] for s in ("train", "val")}


def _tail(path: str) -> str:
    return "/".join(path.replace("\\", "/").rstrip("/").split("/")[-2:])


def match_records(records: List[OfficialRecord], samples: List[Sample], task: int, where: str) -> List[Sample]:
    """This machine's samples of ``task`` that ``records`` name (by class folder and file name), in the
    records' order; every record must be found and carry the same label."""
    by_tail: Dict[str, Sample] = {}
    for s in samples:
        if s.task == task:
            key = _tail(s.path)
            if key in by_tail:
                raise DataError(f"{where}: two images end in {key!r} ({by_tail[key].path}, {s.path}); the official "
                                "file's paths cannot be matched")
            by_tail[key] = s
    out = []
    for r in records:
        sample = by_tail.get(_tail(r.impath))
        if sample is None:
            raise DataError(f"{where}: {r.impath} is not in this split (matched by {_tail(r.impath)!r})")
        if sample.label != r.label:
            raise DataError(f"{where}: {r.impath} has label {r.label} there and {sample.label} here (class order "
                            "differs)")
        out.append(sample)
    return out
