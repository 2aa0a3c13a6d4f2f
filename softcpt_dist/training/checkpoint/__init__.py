"""Every checkpoint write, read and resume check: prompt checkpoints and training checkpoints.

A **prompt checkpoint** (``<run>/prompt_checkpoint.pt``) holds the learnable tensors of every scope
plus what they were trained for (``meta``); it loads at any world size. A **training checkpoint**
holds everything needed to resume mid-epoch::

    <run>/checkpoints/<scope>/<tag>/   DeepSpeed's files (learnable module state, optimizer partitions),
                                        train_state.pt (epoch, step, sampler position, schedule, history,
                                        meta) and rng_rank<r>.pt per rank
    <run>/checkpoints/<scope>/latest   the newest complete tag, replaced atomically after every rank
                                        has finished writing; a save killed midway leaves it unchanged.

Loading refuses state made for another backbone, method, prompt setting or task list (and, for
training checkpoints, other engine, data or sampler settings) and names what differs. Every file
is read with ``torch.load(weights_only=True)``; writes are atomic.
"""

from softcpt_dist.training.checkpoint.common import (APPLIED_ON_RESUME, CHECKPOINT_NAME, FORMAT_VERSION, LATEST,
                                                     STATE_KEYS, TRAIN_STATE, CheckpointError, UnsafeCheckpoint,
                                                     check_meta, checkpoint_meta, latest_tag, mark_latest,
                                                     read_state_file, resume_settings)
from softcpt_dist.training.checkpoint.prompt import load_learnable, load_prompt_checkpoint, save_prompt_checkpoint
from softcpt_dist.training.checkpoint.training_checkpoints import TrainingCheckpoints

__all__ = ["APPLIED_ON_RESUME", "CHECKPOINT_NAME", "FORMAT_VERSION", "LATEST", "STATE_KEYS", "TRAIN_STATE",
           "CheckpointError", "TrainingCheckpoints", "UnsafeCheckpoint", "check_meta", "checkpoint_meta",
           "latest_tag", "load_learnable", "load_prompt_checkpoint", "mark_latest", "read_state_file",
           "resume_settings", "save_prompt_checkpoint"]
