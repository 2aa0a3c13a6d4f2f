"""What a measurement ran on: the device's name and the versions of everything that shapes its speed."""

from __future__ import annotations

import platform
import sys
from importlib import metadata
from typing import Dict

import torch

PACKAGES = ("softcpt_dist", "torch", "open_clip_torch", "deepspeed", "triton")


def device_name(device: str) -> str:
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe(device: str) -> Dict:
    versions = {"python": sys.version.split()[0]}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    versions["cuda"] = torch.version.cuda
    dev = torch.device(device)
    return {"device": device_name(device), "device_type": dev.type, "threads": torch.get_num_threads(),
            "versions": versions}
