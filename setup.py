"""Package discovery (the rest of the metadata is in pyproject.toml): every package under softcpt_dist/,
and the top-level kernels/ folder shipped as softcpt_dist.kernels (a top-level package named ``kernels``
would clash with an unrelated PyPI package)."""

from setuptools import find_packages, setup

setup(packages=[*find_packages(include=["softcpt_dist", "softcpt_dist.*"]), "softcpt_dist.kernels"],
      package_dir={"softcpt_dist.kernels": "kernels"})
