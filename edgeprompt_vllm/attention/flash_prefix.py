"""The prefix pass by FlashAttention-3 where the cost model prefers it (kernels/external_prefix.py).

A relaying batch's groups take their prefix pass from vLLM's FA3 (one varlen call for all groups,
each group one sequence over its shared blocks, not causal) instead of our Triton prefix kernel
when kernels/cost_model.prefix_pass_by_flash says it is cheaper: large groups over long prefixes,
where FA3's higher FLOP rate beats its fixed cost. Our suffix kernel folds FA3's (out, lse) in.
Only the eager relay path uses it (relaying steps of GQA models, piecewise steps); the relay
kernels inside FULL CUDA graphs keep the Triton prefix pass (their groups are token lists).

Where the cost model says so (prefix_pass_beside_suffix: a decode batch whose suffix launch has a
middling number of programs per SM), FA3's pass runs unsplit on a side stream beside our suffix
kernel instead of before it: relay_attention's "handoff" schedule (kernels/handoff.py).

EDGEPROMPT_PREFIX_PASS: auto (default: the cost model decides, FA3 only), triton (never FA3),
flash (always where FA3 runs, before the suffix), flash-beside (always, beside it): the last two
for tests.
"""

import os

from edgeprompt_vllm.kernels.cost_model import (
    AttentionShape,
    GroupDecision,
    GroupShape,
    prefix_pass_beside_suffix,
    prefix_pass_by_flash,
)

SETTINGS = ("auto", "triton", "flash", "flash-beside")


def prefix_pass_setting() -> str:
    setting = os.environ.get("EDGEPROMPT_PREFIX_PASS", "auto")
    if setting not in SETTINGS:
        raise ValueError(f"EDGEPROMPT_PREFIX_PASS must be one of {SETTINGS}, got {setting!r}")
    return setting


def flash_prefix_possible(setting: str, fa_version: int | None) -> bool:
    """Whether any batch may take the prefix pass from FA3 (then warm-up covers it too)."""
    return fa_version == 3 and setting != "triton"


def use_flash_prefix(setting: str, fa_version: int | None, groups: list[GroupShape],
                     decisions: list[GroupDecision], shape: AttentionShape) -> bool:
    """Whether this batch's relaying groups take the prefix pass from FA3."""
    if not flash_prefix_possible(setting, fa_version) or not any(d.relay for d in decisions):
        return False
    return setting.startswith("flash") or prefix_pass_by_flash(groups, decisions, shape)


def flash_prefix_beside(setting: str, groups: list[GroupShape], decisions: list[GroupDecision],
                        shape: AttentionShape, num_sms: int) -> bool:
    """Whether a batch whose prefix pass is FA3's (use_flash_prefix) runs it beside the suffix
    kernel ("handoff"): decode batches only (what was measured), by the cost model."""
    relaying = [g for g, d in zip(groups, decisions) if d.relay]
    if setting in ("triton", "flash") or not relaying:
        return False
    if setting == "flash-beside":
        return True
    if any(g.num_query_tokens != g.num_reqs for g in relaying):
        return False
    programs = sum(g.num_reqs for g in relaying) * shape.num_kv_heads
    return prefix_pass_beside_suffix(programs, num_sms)


def flash_prefix_attention(fa_version: int, num_splits: int = 0):
    """kernels.external_prefix.PrefixAttention over vLLM's flash_attn_varlen_func (`num_splits`:
    FA3's key split; 0 lets FA3 choose, 1 keeps the pass to one program per query tile)."""
    from vllm.v1.attention.backends.fa_utils import flash_attn_varlen_func

    def prefix_attention(query, key_cache, value_cache, cu_seqlens_q, max_seqlen_q, block_table,
                         seqused_k, max_seqlen_k, softmax_scale, out, lse) -> None:
        _, softmax_lse = flash_attn_varlen_func(
            q=query, k=key_cache, v=value_cache, out=out, cu_seqlens_q=cu_seqlens_q,
            max_seqlen_q=max_seqlen_q, seqused_k=seqused_k, max_seqlen_k=max_seqlen_k,
            softmax_scale=softmax_scale, causal=False, block_table=block_table,
            return_softmax_lse=True, num_splits=num_splits, fa_version=fa_version)
        lse.copy_(softmax_lse)  # [num_q_heads, num_tokens]: FA3 allocates its own each call

    return prefix_attention


def empty_prefix_attention(query, key_cache, value_cache, cu_seqlens_q, max_seqlen_q, block_table,
                           seqused_k, max_seqlen_k, softmax_scale, out, lse) -> None:
    """An empty prefix state: at warm-up, compiles the suffix kernel's variants that fold an
    external (query-dtype) prefix state in, without running FA3."""
    out.zero_()
    lse.fill_(float("-inf"))
