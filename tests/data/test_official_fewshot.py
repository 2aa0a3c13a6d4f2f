"""The official few-shot files (``data.fewshot_source=official``): Dassl ``DatumMT`` pickles read with a
restricted unpickler. The records a file holds become exactly those training / validation images; a file
with any other global inside (a function, another class) is refused and nothing in it runs."""

import os
import pickle
import sys
import types

import pytest

from softcpt_dist.config import ConfigError, DataConfig
from softcpt_dist.data.loading import load_data, read_dataset
from softcpt_dist.data.official_fewshot import read_official_fewshot
from softcpt_dist.data.paper_groups import official_fewshot_file
from softcpt_dist.data.tasks import DataError

from fake_datasets import make_coop_root


class DatumMT:
    """Dassl's record, as the official code pickles it (private fields behind properties)."""

    def __init__(self, impath, label, task):
        self._impath, self._label, self._task, self._domain, self._classname = impath, label, task, 0, ""


def _dump(path, payload):
    """Pickle under Dassl's module name, as the official code does, without Dassl installed here."""
    names = ("dassl", "dassl.data", "dassl.data.datasets", "dassl.data.datasets.base_dataset")
    modules = {n: types.ModuleType(n) for n in names}
    modules[names[-1]].DatumMT = DatumMT
    saved = DatumMT.__module__
    DatumMT.__module__ = names[-1]
    sys.modules.update(modules)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL))
    finally:
        DatumMT.__module__ = saved
        for n in names:
            del sys.modules[n]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return make_coop_root(tmp_path_factory.mktemp("coop"))


def _official_files(root, shots=1, seed=1, elsewhere="/home/someone/data"):
    """One file per dataset: the last image of each class (train) and the first (val), under a foreign root."""
    data = read_dataset(DataConfig(dataset="general10", root=str(root)))
    chosen = {"train": [], "val": []}
    for t, task in enumerate(data.group.tasks):
        payload = {}
        for split, pick in (("train", -1), ("val", 0)):
            records = []
            for c in range(task.num_classes):
                s = [x for x in data.splits[split] if x.task == t and x.label == c][pick]
                records.append(DatumMT(elsewhere + "/" + "/".join(s.path.split("/")[-3:]), [c], [0]))
                chosen[split].append(s.path)
            payload[split] = records
        _dump(official_fewshot_file("general10", root, task.key, shots, seed), payload)
    return chosen


def test_the_official_records_become_the_training_and_validation_images(root):
    chosen = _official_files(root)
    cfg = DataConfig(dataset="general10", root=str(root), shots=1, fewshot_source="official")
    data = load_data(cfg, seed=1)
    assert sorted(s.path for s in data.splits["train"]) == sorted(chosen["train"])
    assert sorted(s.path for s in data.splits["val"]) == sorted(chosen["val"])
    assert data.report["source"] == "official" and len(data.report["files"]) == 10
    seeded = load_data(DataConfig(dataset="general10", root=str(root), shots=1), seed=1)
    assert sorted(s.path for s in seeded.splits["train"]) != sorted(chosen["train"])  # not the project's draw


def test_a_file_with_code_inside_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    bad = tmp_path / "evil.pkl"
    bad.write_bytes(pickle.dumps({"train": [Evil()], "val": []}))
    with pytest.raises(DataError, match=r"refusing global posix.system|refusing global os.system"):
        read_official_fewshot(bad)
    assert not marker.exists()
    other = tmp_path / "other.pkl"
    from collections import OrderedDict
    other.write_bytes(pickle.dumps({"train": OrderedDict(), "val": []}))
    with pytest.raises(DataError, match="refusing global collections.OrderedDict: only Dassl Datum records"):
        read_official_fewshot(other)
    strange = tmp_path / "strange.pkl"
    _dump(strange, {"train": [DatumMT("/x/a/b.jpg", [0], [0])], "val": []})
    text = strange.read_bytes().replace(b"_classname", b"_callback_")
    strange.write_bytes(text)
    with pytest.raises(DataError, match="a record with fields"):
        read_official_fewshot(strange)


def test_missing_images_wrong_labels_and_other_datasets_are_named(root, tmp_path):
    _official_files(root, shots=2, seed=5)
    dtd = official_fewshot_file("general10", root, "dtd", 2, 5)
    records = read_official_fewshot(dtd)
    records["train"][0].fields["_impath"] = "/elsewhere/images/banded/missing.jpg"
    _dump(dtd, {s: [DatumMT(r.impath, [r.label], [0]) for r in records[s]] for s in records})
    cfg = DataConfig(dataset="general10", root=str(root), shots=2, fewshot_source="official", fewshot_seed=5)
    with pytest.raises(DataError, match=r"missing.jpg is not in this split \(matched by 'banded/missing.jpg'\)"):
        load_data(cfg, seed=0)
    records["train"][0].fields["_impath"] = records["train"][1].impath
    _dump(dtd, {s: [DatumMT(r.impath, [(r.label + 1) % 3 if i == 0 else r.label], [0])
                    for i, r in enumerate(records[s])] for s in records})
    with pytest.raises(DataError, match="class order differs"):
        load_data(cfg, seed=0)
    with pytest.raises(DataError, match="official few-shot file not found"):
        load_data(DataConfig(dataset="general10", root=str(root), shots=4, fewshot_source="official"), seed=9)
    with pytest.raises(ConfigError, match="data.dataset=synthetic has none"):
        load_data(DataConfig(fewshot_source="official", root=str(tmp_path / "syn")), seed=0)
