"""The CUDA backend's module imported on the CPU, its FlashAttention replaced by a stand-in."""

import pytest

from edgeprompt_vllm.attention import graph_mode
from edgeprompt_vllm.attention.stats import RelayStats


def cuda_backend_with(monkeypatch, flash_attn_varlen_func, step_mode: str):
    """edgeprompt_vllm.attention.backend_cuda with `flash_attn_varlen_func` in place of vLLM's
    (where the backend and flash_prefix.py look it up), fresh relay stats, and vLLM's current
    step in `step_mode` (graph_mode)."""
    pytest.importorskip("vllm")
    import vllm  # noqa: F401  (vllm first: its attention modules alone import circularly)
    import vllm.v1.attention.backends.fa_utils as fa_utils

    monkeypatch.setattr(fa_utils, "flash_attn_varlen_func", flash_attn_varlen_func, raising=False)
    from edgeprompt_vllm.attention import backend_cuda

    monkeypatch.setattr(backend_cuda, "flash_attn_varlen_func", flash_attn_varlen_func)
    monkeypatch.setattr(backend_cuda, "RELAY_STATS", RelayStats())
    monkeypatch.setattr(graph_mode, "STEP", graph_mode._Step(mode=step_mode))
    return backend_cuda
