"""Write foreign K, V into vLLM's paged KV cache of one layer (docs/vllm-api.md §2.3).

CPU: the paged interior is kernel-private (K transposed per block/head for isa `vec`), so we
call the CPU backend's own `cpu_attn_reshape_and_cache`, exactly as its do_kv_cache_update does.
GPU (FlashAttention/Triton, NHD): the logical split views [B, N, H, hs] are real; index them.
"""

import torch


def cpu_isa(layer_module, dtype: torch.dtype, block_size: int, head_size: int) -> str:
    isa = getattr(layer_module, "isa", None)  # set by the CPU backend's metadata builder
    if isa is None:
        from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

        isa = _get_attn_isa(dtype, block_size, head_size, "auto")
    return isa


def write_layer(kv_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                slot_mapping: torch.Tensor, isa: str | None) -> None:
    """kv_cache: [num_blocks, H, block_size, 2 * hs] (logical); key, value: [T, H, hs];
    slot_mapping: [T] int64. `isa` is None on GPU."""
    num_blocks, num_heads, block_size, two_hs = kv_cache.shape
    if kv_cache.device.type == "cpu":
        from vllm import _custom_ops as ops

        cache = kv_cache.view(num_blocks, num_heads, block_size * 2, two_hs // 2)
        key_cache, value_cache = cache.chunk(2, dim=2)
        ops.cpu_attn_reshape_and_cache(key.contiguous(), value.contiguous(), key_cache, value_cache,
                                       slot_mapping, isa)
        return
    key_cache, value_cache = kv_cache.transpose(1, 2).split(two_hs // 2, dim=-1)  # [B, N, H, hs]
    slots = slot_mapping.to(kv_cache.device, non_blocking=True)
    blk, off = slots // block_size, slots % block_size
    key_cache[blk, off] = key.to(kv_cache.device, non_blocking=True)
    value_cache[blk, off] = value.to(kv_cache.device, non_blocking=True)
