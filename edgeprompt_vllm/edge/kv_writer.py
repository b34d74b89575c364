"""Write foreign K, V into vLLM's paged KV cache of one layer (docs/vllm-api.md §2.3).

CPU: the paged interior is kernel-private (K transposed per block/head for isa `vec`), so we
call the CPU backend's own `cpu_attn_reshape_and_cache`, exactly as its do_kv_cache_update does.
GPU (FlashAttention/Triton, NHD): the split views [B, N, H, hs] are real; index them. vLLM 0.26
hands the connector the logical [B, H, N, 2 * hs] (physically [B, N, H, 2 * hs]); the older
FlashAttention layout [B, 2, N, H, hs] is accepted too. Both give the same [B, N, H, hs] views.
The layer loader on CUDA (cuda_loader.py) uses `paged_index` + `scatter_kv` on its side stream.
"""

import torch


def cpu_isa(layer_module, dtype: torch.dtype, block_size: int, head_size: int) -> str:
    isa = getattr(layer_module, "isa", None)  # set by the CPU backend's metadata builder
    if isa is None:
        from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

        isa = _get_attn_isa(dtype, block_size, head_size, "auto")
    return isa


def split_kv_cache(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """GPU layouts -> (key_cache, value_cache), each a [B, N, H, hs] view of kv_cache."""
    if kv_cache.dim() == 5:  # [B, 2, N, H, hs]
        return kv_cache[:, 0], kv_cache[:, 1]
    head_size = kv_cache.shape[-1] // 2  # [B, H, N, 2 * hs]
    return kv_cache.transpose(1, 2).split(head_size, dim=-1)


def paged_index(slot_mapping: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """slots [T] -> (block [T], offset in the block [T]), on slot_mapping's device."""
    return slot_mapping // block_size, slot_mapping % block_size


def cache_heads(kv_cache: torch.Tensor) -> int:
    """The KV heads a cache of any layout above holds (a tensor-parallel rank: its share)."""
    return kv_cache.shape[3] if kv_cache.dim() == 5 else kv_cache.shape[1]


def _check_heads(kv_cache: torch.Tensor, key: torch.Tensor) -> None:
    if key.shape[1] != cache_heads(kv_cache):
        raise ValueError(f"{key.shape[1]} KV heads to write into a cache of "
                         f"{cache_heads(kv_cache)} (a tensor-parallel rank takes its share)")


def scatter_kv(kv_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               block: torch.Tensor, offset: torch.Tensor) -> None:
    """GPU layouts; key, value: [T, H, hs] and block, offset: [T], all on kv_cache's device.
    Queued on the current stream."""
    _check_heads(kv_cache, key)
    key_cache, value_cache = split_kv_cache(kv_cache)  # [B, N, H, hs]
    key_cache[block, offset] = key
    value_cache[block, offset] = value


def write_layer(kv_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                slot_mapping: torch.Tensor, isa: str | None) -> None:
    """kv_cache: [num_blocks, H, block_size, 2 * hs] (logical); key, value: [T, H, hs];
    slot_mapping: [T] int64. `isa` is None on GPU."""
    if kv_cache.device.type == "cpu":  # (GPU: scatter_kv checks the heads)
        _check_heads(kv_cache, key)
        from vllm import _custom_ops as ops

        num_blocks, num_heads, block_size, two_hs = kv_cache.shape
        cache = kv_cache.view(num_blocks, num_heads, block_size * 2, two_hs // 2)
        key_cache, value_cache = cache.chunk(2, dim=2)
        ops.cpu_attn_reshape_and_cache(key.contiguous(), value.contiguous(), key_cache, value_cache,
                                       slot_mapping, isa)
        return
    device = kv_cache.device
    block, offset = paged_index(slot_mapping.to(device, non_blocking=True), kv_cache.shape[2])
    scatter_kv(kv_cache, key.to(device, non_blocking=True), value.to(device, non_blocking=True),
               block, offset)
