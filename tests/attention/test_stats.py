"""relay_stats: the counters, and which Triton specializations of our kernels were compiled."""

import sys
import types

import pytest

from edgeprompt_vllm.attention import stats


def test_compiled_kernel_keys_name_each_specialization(monkeypatch):
    jit = pytest.importorskip("triton.runtime.jit")

    class FakeKernel(jit.JITFunction):  # a compiled kernel's caches, without compiling one
        def __init__(self, name, keys):
            self.__name__ = name
            self.device_caches = {0: ({k: object() for k in keys}, None)}

    module = types.ModuleType("edgeprompt_vllm.kernels.fake_for_test")
    module.suffix = FakeKernel("suffix", ["[('*fp16', 'D')]{'BLOCK_N': 64}", "[('*fp16', 'D')]{'BLOCK_N': 32}"])
    monkeypatch.setitem(sys.modules, module.__name__, module)
    keys = stats.compiled_kernel_keys()
    assert "suffix: [('*fp16', 'D')]{'BLOCK_N': 64}" in keys
    assert "suffix: [('*fp16', 'D')]{'BLOCK_N': 32}" in keys
    out = stats.relay_stats()
    assert out["compiled_kernel_variants"] == len(out["compiled_kernel_keys"]) >= 2
    assert {"relay_batches", "full_steps", "piecewise_for_relay", "host_rows_copied"} <= set(out)
