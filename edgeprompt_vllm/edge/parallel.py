"""This worker's place in vLLM's parallelism: which KV heads it holds under tensor parallelism
(pipeline parallelism is refused: the connector writes every layer in each worker).

The cloud ships every KV head of a layer ([2, T, H, hs]); a tensor-parallel rank's cache holds
only its share, split as vLLM's QKVParallelLinear splits the KV projection: with H >= tp_size
heads, rank r holds the contiguous H / tp_size heads from r * H / tp_size; with fewer heads than
ranks, each head is replicated over tp_size / H ranks and rank r holds head r // (tp_size / H).
"""


def kv_head_slice(total_heads: int, tp_size: int, tp_rank: int) -> slice:
    """The KV heads [start, stop) that rank `tp_rank` of `tp_size` holds out of `total_heads`."""
    if not 0 <= tp_rank < tp_size:
        raise ValueError(f"tensor-parallel rank {tp_rank} is not in [0, {tp_size})")
    if total_heads >= tp_size:
        if total_heads % tp_size:
            raise ValueError(f"{total_heads} KV heads do not split over {tp_size} ranks")
        n = total_heads // tp_size
        return slice(tp_rank * n, (tp_rank + 1) * n)
    if tp_size % total_heads:
        raise ValueError(f"{tp_size} ranks do not share {total_heads} KV heads evenly")
    head = tp_rank // (tp_size // total_heads)
    return slice(head, head + 1)


def this_worker_kv_heads(total_heads: int) -> slice:
    """kv_head_slice for this vLLM worker's tensor-parallel rank (all heads outside a worker)."""
    from vllm.distributed import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return slice(0, total_heads)
    return kv_head_slice(total_heads, ps.get_tensor_model_parallel_world_size(),
                         ps.get_tensor_model_parallel_rank())


def check_no_pipeline_parallelism() -> None:
    from vllm.distributed import parallel_state as ps

    if ps.model_parallel_is_initialized() and ps.get_pp_group().world_size > 1:
        raise RuntimeError("EdgePrompt's connector writes every layer in each worker: pipeline "
                           "parallelism is not supported (tensor parallelism is)")
