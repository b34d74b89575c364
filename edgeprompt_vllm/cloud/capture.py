"""Capture per-layer K, V of a prefill with forward pre-hooks on vLLM's `Attention` modules.

The hooks see the attention inputs in logical form (key/value: [T, Hkv * hs] or [T, Hkv, hs],
K after RoPE), independent of the kernel-private paged layout of the CPU backend. The engine
runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0) and one prompt at a time, unchunked.
"""

import re
import threading
import time
from typing import Callable

import torch

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")

# on_layer(layer, key [T, Hkv, hs], value [T, Hkv, hs], compute_s)
OnLayer = Callable[[int, torch.Tensor, torch.Tensor, float], None]


class KVCapture:
    def __init__(self, num_kv_heads: int, head_size: int):
        self.num_kv_heads, self.head_size = num_kv_heads, head_size
        self.num_layers = 0
        self._lock = threading.Lock()
        self._target: tuple[int, OnLayer] | None = None
        self._t_last = 0.0

    def install(self, model: torch.nn.Module) -> int:
        """Hooks every Attention module of `model`; returns the layer count."""
        from vllm.model_executor.layers.attention.attention import Attention

        layers = []
        for name, mod in model.named_modules():
            if isinstance(mod, Attention):
                m = _LAYER.search(name)
                if m is None:
                    raise RuntimeError(f"cannot tell the layer index of attention module {name!r}")
                mod.register_forward_pre_hook(self._hook(int(m.group(1))))
                layers.append(int(m.group(1)))
        if sorted(layers) != list(range(len(layers))) or not layers:
            raise RuntimeError(f"unexpected attention layer indices {sorted(layers)}")
        self.num_layers = len(layers)
        return self.num_layers

    def begin(self, num_tokens: int, on_layer: OnLayer) -> None:
        """The next forward is the prefill of a prompt; report its first `num_tokens` per layer."""
        with self._lock:
            self._target = (num_tokens, on_layer)
            self._t_last = time.perf_counter()

    def end(self) -> None:
        with self._lock:
            self._target = None

    def _hook(self, layer: int):
        def hook(module, args):
            target = self._target
            if target is None:
                return None
            num_tokens, on_layer = target
            key, value = args[1], args[2]
            if key.shape[0] < num_tokens:
                raise RuntimeError(f"prefill was split ({key.shape[0]} < {num_tokens} tokens): "
                                   "raise max_num_batched_tokens of the cloud engine")
            shape = (-1, self.num_kv_heads, self.head_size)
            k = key[:num_tokens].reshape(shape).clone()
            v = value[:num_tokens].reshape(shape).clone()
            now = time.perf_counter()
            compute_s, self._t_last = now - self._t_last, now
            on_layer(layer, k, v, compute_s)
            return None

        return hook
