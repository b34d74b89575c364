"""Shared fixtures: the tiny model, and running vLLM in child processes.

vLLM engines run in child processes (scripts under tests/scripts/ or `vllm serve`), never in
the pytest process: vLLM spawns its own processes and keeps global state.
"""

from pathlib import Path

import pytest

from edgeprompt_vllm.models.make_model import default_model_dir, make_model


def has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


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
