"""Tiny generators for the generator tests, built once per session in a tmp dir and loaded by path."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

TOY = "toy:n=12,n_val=4,size=32"


@pytest.fixture(scope="session")
def builtin_dir(tmp_path_factory):
    from segsynth.generators.testing import save_tiny_builtin

    return save_tiny_builtin(tmp_path_factory.mktemp("builtin") / "generator", data=TOY)


@pytest.fixture(scope="session")
def controlnet_dirs(tmp_path_factory):
    from segsynth.generators.testing import save_tiny_controlnet_models

    return save_tiny_controlnet_models(tmp_path_factory.mktemp("sd"))
