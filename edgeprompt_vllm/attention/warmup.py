"""Compile the relay kernels' decode variants when the engine starts, not during the first requests.

Triton compiles a kernel the first time it meets a new set of compile-time choices (tile sizes,
split counts, fused prefix parts). On an H100 the first 1000-request pass of the paper's workload
ran 21% slower than the second one, the difference being those compiles (benchmarks/results).
vLLM compiles its own kernels at start-up; this does the same for ours: it runs the decode path
(the "fused" schedule the CUDA backend uses) over small dummy caches for a ladder of batch sizes
and sequence lengths that reaches every split and tile choice the launchers can make for decode.
"""

import time

import torch

from edgeprompt_vllm.attention.flash_prefix import empty_prefix_attention
from edgeprompt_vllm.kernels import RelayMetadata, relay_attention
from edgeprompt_vllm.log import get_logger

logger = get_logger(__name__)


def _ladder(limit: int) -> list[int]:
    """1, 2, 3, 4, 6, 8, 12, 16, ... up to and including `limit`."""
    values, v = {limit}, 1
    while v < limit:
        values.add(v)
        if v >= 2 and v + v // 2 < limit:
            values.add(v + v // 2)
        v *= 2
    return sorted(values)


def warm_up_relay_kernels(num_q_heads: int, num_kv_heads: int, head_size: int, block_size: int,
                          dtype: torch.dtype, device: torch.device, max_num_seqs: int,
                          max_model_len: int, external_prefix: bool = False) -> tuple[int, float]:
    """Run decode batches over the ladder; returns (batches run, seconds). Every request of a dummy
    batch reads the same blocks, so the caches stay small (at most ~4k tokens of KV).
    `external_prefix`: also the suffix kernel's variants that fold in a prefix state another
    kernel wrote in the query dtype (FA3's, flash_prefix.py), from an empty stand-in state, in
    the "fused" and "handoff" schedules."""
    start = time.perf_counter()
    max_len = min(max_model_len, 4096)
    # Prefix splits stop growing at 8 tiles of 64 keys; own lengths step the suffix split count
    # (one split per 256 keys, rounded to a power of two).
    prefix_blocks = sorted({b for b in (1, 2, 4, 8, 16, 32) if b * block_size < max_len}
                           | {max(1, (max_len // 2) // block_size)})
    own_lens = sorted({n for n in (1, 256, 512, 1024, 2048, 4096) if n < max_len} | {max_len // 2})
    n_prefix = max(prefix_blocks)
    num_blocks = n_prefix + -(-max(own_lens) // block_size)
    shape = (num_blocks, block_size, num_kv_heads, head_size)
    key_cache = torch.zeros(shape, dtype=dtype, device=device)
    value_cache = torch.zeros(shape, dtype=dtype, device=device)
    calls = 0
    for num_reqs in _ladder(max_num_seqs):
        query = torch.zeros(num_reqs, num_q_heads, head_size, dtype=dtype, device=device)
        for blocks in prefix_blocks:
            for own in own_lens:
                meta = _decode_batch(num_reqs, blocks, own, n_prefix, block_size, device)
                runs = [("fused", None)]
                if external_prefix:  # FA3's pass, before the suffix or beside it
                    runs += [("fused", empty_prefix_attention), ("handoff", empty_prefix_attention)]
                for schedule, prefix_attention in runs:
                    relay_attention(query, key_cache, value_cache, meta, 1.0, validate=False,
                                    schedule=schedule, prefix_attention=prefix_attention)
                    calls += 1
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    logger.info("relay kernels warmed up: %d decode shapes in %.1f s", calls, seconds)
    return calls, seconds


def _decode_batch(num_reqs: int, prefix_blocks: int, own: int, own_start: int, block_size: int,
                  device) -> RelayMetadata:
    """One group of `num_reqs` decode requests: shared blocks 0.., own blocks own_start.. (the
    same ones in every row: the values are never looked at)."""
    own_blocks = -(-own // block_size)
    row = list(range(prefix_blocks)) + list(range(own_start, own_start + own_blocks))
    table = torch.tensor([row] * num_reqs, dtype=torch.int32, device=device)
    prefix = prefix_blocks * block_size
    return RelayMetadata.build([1] * num_reqs, [prefix + own] * num_reqs, table,
                               [(0, num_reqs, prefix)], block_size)
