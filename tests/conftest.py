import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if "TRITON_INTERPRET" not in os.environ and not any(Path("/dev").glob("nvidia[0-9]*")):
    # Without a GPU, Triton's library is imported under its interpreter, so that the kernel
    # tests can run the kernels on CPU tensors (tests/kernels switch it on per test); it is then off
    # again, so every other test takes the torch path as CPU runs do. See softcpt_dist/kernels/_triton.py.
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton.language  # noqa: F401
    except ImportError:
        pass
    del os.environ["TRITON_INTERPRET"]

import softcpt_dist  # noqa: E402,F401  (the torchvision shim must run before open_clip/torchvision)
import pytest  # noqa: E402
import torch  # noqa: E402

from softcpt_dist.model.backbone import build_backbone  # noqa: E402
from softcpt_dist.config import ModelConfig, SyntheticDataConfig  # noqa: E402
from softcpt_dist.data import generate_synthetic, read_task_folders  # noqa: E402

# Two threads unless OMP_NUM_THREADS says otherwise (the micro world's claims are checked with 1 and 2).
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))

SMALL_SYNTHETIC = SyntheticDataConfig(train_per_class=6, val_per_class=2, test_per_class=3, image_size=32, seed=3)


@pytest.fixture(scope="session")
def tiny_backbone():
    torch.manual_seed(0)
    return build_backbone(ModelConfig(arch="softcpt-tiny"))


@pytest.fixture(scope="session")
def small_data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic-small")
    generate_synthetic(root, SMALL_SYNTHETIC)
    return root


@pytest.fixture(scope="session")
def small_data(small_data_root):
    return read_task_folders(small_data_root)


@pytest.fixture(scope="session")
def micro_world(tmp_path_factory):
    """The built-in default's folders for one test session: the first test that trains on them pre-trains
    the micro CLIP (about 2 min on 2 cores) and writes the group; every later one loads both. Returns the
    folder and the overrides that point a run there."""
    tmp = tmp_path_factory.mktemp("micro")
    return tmp, [f"model.micro.dir={tmp / 'clip'}", f"data.root={tmp / 'group'}", f"data.cache.dir={tmp / 'features'}",
                 f"train.output_dir={tmp / 'runs'}", "train.progress=false"]
