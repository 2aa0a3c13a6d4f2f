"""One Trainer builds every run: ``profile`` and ``train`` on the same config build equal components
(classifier and its initial prompts, loader, sampler, engine settings, loop), and ``eval`` reads the
run the way ``train`` built it."""

import pytest

from softcpt_dist import training
from softcpt_dist.config import load_config
from softcpt_dist.profiling.step_profile import ProfileSettings
from softcpt_dist.step_phases import NULL_TIMER
from softcpt_dist.training.trainer import Trainer


@pytest.mark.parametrize("extra", [[], ["method.variant=CSTA", "data.sampler.tasks_per_batch=1",
                                         "engine.grad_accum_steps=2"]], ids=["default", "grouped"])
def test_profile_and_train_build_equal_components(tmp_path, small_data_root, monkeypatch, extra):
    built = []
    prepare = Trainer.prepare

    def recording(self, job, signals, timer=NULL_TIMER):
        prepared = prepare(self, job, signals, timer)
        built.append(prepared.describe())
        return prepared

    monkeypatch.setattr(Trainer, "prepare", recording)
    cfg = load_config([], [f"data.root={small_data_root}", "data.shots=4", "optim.epochs=1", "optim.batch_size=8",
                           f"train.output_dir={tmp_path}", "train.progress=false", "train.run_name=run", *extra])
    training.profile(cfg, ProfileSettings(warmup=0, steps=1, out=tmp_path / "profile"))
    training.run(cfg)
    assert len(built) == 2
    assert built[0] == built[1]
    assert built[0]["learnable"] and built[0]["steps_per_epoch"] > 0
