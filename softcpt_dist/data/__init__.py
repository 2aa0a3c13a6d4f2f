"""Datasets: task groups, samples, readers, few-shot subsets, transforms, sampler and the feature cache.

``loading`` reads the dataset a config names; ``loaders`` turns samples into training and
evaluation loaders; the readers live in ``task_folders``, ``paper_groups``, ``custom`` and
``split_files``; ``synthetic`` generates the built-in dataset; a package on top registers a
``GeneratedDataset`` (``softcpt_dist.plugins``) for its own, as the micro world does.
"""

from softcpt_dist.data.dataset import MultiTaskData, MultiTaskImageDataset, Sample
from softcpt_dist.data.fewshot import fewshot_subset
from softcpt_dist.data.loading import (DATASETS, GeneratedDataset, check_files_exist, ensure_builtin_data,
                                       find_unreadable, known_datasets, load_data, read_dataset)
from softcpt_dist.data.synthetic import generate_synthetic
from softcpt_dist.data.task_folders import read_task_folders
from softcpt_dist.data.tasks import DataError, TaskGroup, TaskSpec

__all__ = ["DATASETS", "DataError", "GeneratedDataset", "MultiTaskData", "MultiTaskImageDataset", "Sample", "TaskGroup", "TaskSpec",
           "check_files_exist", "ensure_builtin_data", "find_unreadable", "fewshot_subset", "generate_synthetic",
           "known_datasets", "load_data", "read_dataset", "read_task_folders"]
