"""Shared fixtures: the tiny model, and running vLLM in child processes.

vLLM engines run in child processes (scripts under tests/scripts/ or `vllm serve`), never in
the pytest process: vLLM spawns its own processes and keeps global state.
"""

import os
from pathlib import Path

import pytest
import torch

# NOTE: Triton reads TRITON_INTERPRET when a kernel is decorated (at import), and any test module
# may import edgeprompt_vllm.kernels, so the CPU interpreter is switched on here, before all.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from edgeprompt_vllm.models.make_model import default_model_dir, make_model


def has_cuda() -> bool:
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not has_cuda():
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    """The tiny-llama preset, built once (reused while its manifest checks out)."""
    out = default_model_dir("tiny-llama")
    make_model("tiny-llama", out)
    return out
