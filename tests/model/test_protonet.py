"""ProtoNet (``method.name=protonet``): prototypes = class means of L2-normalised training features,
prediction = nearest prototype in squared Euclidean distance, within each task. Checked by hand on
features whose answer is known, and end to end against the same computation on the run's own features."""

import json

import pytest
import torch

from softcpt_dist.data.tasks import DataError
from softcpt_dist.model.methods.protonet import nearest_prototype, prototypes


def test_prototypes_and_nearest_by_hand():
    x = torch.tensor([[2.0, 0.0], [0.0, 3.0], [1.0, 1.0], [0.0, 1.0]])
    y = torch.tensor([0, 1, 0, 1])
    s = 2 ** -0.5
    protos = prototypes(x, y, 2)
    # class 0: mean of (1, 0) and (s, s); class 1: mean of (0, 1) and (0, 1)
    assert torch.allclose(protos, torch.tensor([[(1 + s) / 2, s / 2], [0.0, 1.0]], dtype=torch.float64))
    # normalised (0.9, 0.5) is nearer class 0's mean; (0.2, 0.9) nearer class 1 (not a cosine argmax tie-break)
    assert nearest_prototype(torch.tensor([[0.9, 0.5], [0.2, 0.9]]), protos).tolist() == [0, 1]
    # squared distance to an unnormalised prototype differs from cosine: a point can be nearer a shorter mean
    far = torch.tensor([[1.0, 0.0], [0.0, 0.5]], dtype=torch.float64)
    assert nearest_prototype(torch.tensor([[0.6, 0.8]]), far).tolist() == [1]
    with pytest.raises(DataError, match=r"ProtoNet: class\(es\) \[2\] have no training image"):
        prototypes(x, y, 3)


def test_a_protonet_run_scores_the_nearest_prototype_of_its_own_features(small_data_root, tmp_path):
    from softcpt_dist.config import load_config
    from softcpt_dist.model.methods.linear_probe import extract_features
    from softcpt_dist.training.experiment import run_train
    from softcpt_dist.training.trainer import Trainer

    cfg = load_config([], [f"data.root={small_data_root}", "data.shots=2", f"train.output_dir={tmp_path}",
                           "train.progress=false", "train.run_name=proto", "method.name=protonet"])
    result = run_train(cfg)
    saved = json.loads((result.path / "results.json").read_text())
    assert saved["method"] == "protonet"
    trainer = Trainer(cfg)
    inputs = trainer.inputs(("train", "test"))
    (xt, tt, yt), (xe, te, ye) = (extract_features(trainer.backbone, inputs.loader(s, shard=False))
                                  for s in ("train", "test"))
    for i, task in enumerate(trainer.data.group.tasks):
        pred = nearest_prototype(xe[te == i], prototypes(xt[tt == i], yt[tt == i], task.num_classes))
        accuracy = 100.0 * float((pred == ye[te == i]).double().mean())
        assert saved["tasks"][task.key]["value"] == pytest.approx(accuracy)
