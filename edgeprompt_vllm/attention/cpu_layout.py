"""Reading vLLM's CPU paged KV cache in logical form.

The CPU attention kernels keep the inside of each (block, KV head) slab private: for the `vec`
ISA the keys are stored transposed, and other ISAs may pack differently (docs/vllm-api.md §2.3).
Instead of hard-coding one packing, `CpuKVLayout.probe` writes token and dimension indices
through vLLM's own writer (`cpu_attn_reshape_and_cache`) into a scratch cache and reads back
where each (token, dim) landed. `gather` then turns any blocks into the logical
[num_blocks, block_size, num_kv_heads, head_size] layout the relay kernels use.
"""

from dataclasses import dataclass

import torch


def split_cpu_kv_cache(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[num_blocks, H, N, 2*hs] -> key_cache, value_cache views, as vLLM's CPU backend splits it."""
    num_blocks, num_kv_heads, block_size, _ = kv_cache.shape
    return kv_cache.view(num_blocks, num_kv_heads, block_size * 2, -1).chunk(2, dim=2)


@dataclass(frozen=True)
class CpuKVLayout:
    key_index: torch.Tensor  # [block_size * head_size] int64: flat slab offset of (token, dim)
    value_index: torch.Tensor  # [block_size * head_size] int64
    block_size: int
    head_size: int

    @classmethod
    def probe(cls, num_kv_heads: int, block_size: int, head_size: int, dtype: torch.dtype,
              isa: str) -> "CpuKVLayout":
        from vllm import _custom_ops as ops

        if max(block_size, head_size) > 256:
            raise ValueError("layout probe needs block_size and head_size <= 256 (exact in bf16)")
        slots = torch.arange(block_size, dtype=torch.int64)
        coords = {}
        for name, pattern in (("token", slots[:, None].expand(block_size, head_size)),
                              ("dim", torch.arange(head_size)[None, :].expand(block_size, head_size))):
            kv = torch.full((2, num_kv_heads, block_size, 2 * head_size), -1.0, dtype=dtype)
            key_cache, value_cache = split_cpu_kv_cache(kv)
            src = pattern[:, None, :].expand(block_size, num_kv_heads, head_size).to(dtype).contiguous()
            # Block 1 gets the pattern; block 0 must stay untouched.
            ops.cpu_attn_reshape_and_cache(src, src, key_cache, value_cache, slots + block_size, isa)
            if not bool((kv[0] == -1).all()):
                raise RuntimeError("CPU KV layout probe: a write leaked into another block")
            coords[name] = (key_cache[1, 0].reshape(-1).long(), value_cache[1, 0].reshape(-1).long())
        index = []
        for side in (0, 1):
            flat = coords["token"][side] * head_size + coords["dim"][side]  # logical id at each offset
            inverse = torch.empty_like(flat)
            inverse[flat] = torch.arange(flat.numel())
            if not bool((flat[inverse] == torch.arange(flat.numel())).all()):
                raise RuntimeError(f"CPU KV layout probe: ISA {isa!r} does not store a permutation")
            index.append(inverse)
        return cls(key_index=index[0], value_index=index[1], block_size=block_size, head_size=head_size)

    def gather(self, kv_cache: torch.Tensor, block_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """kv_cache [num_blocks, H, N, 2*hs], block_ids [n] -> key, value [n, N, H, hs] (copies)."""
        key_cache, value_cache = split_cpu_kv_cache(kv_cache)
        out = []
        for cache, index in ((key_cache, self.key_index), (value_cache, self.value_index)):
            slabs = cache[block_ids].reshape(len(block_ids), cache.shape[1], -1)  # [n, H, N*hs]
            logical = slabs[:, :, index].view(len(block_ids), cache.shape[1], self.block_size, self.head_size)
            out.append(logical.transpose(1, 2).contiguous())
        return out[0], out[1]
