"""Relay attention on CUDA: a FlashAttention subclass selected by `--attention-backend CUSTOM`.

Per step the builder finds the groups of requests that share leading physical blocks and asks
the cost model (kernels/cost_model.py) which are worth a prefix pass. Batches with no such
group run vLLM's FlashAttention unchanged; the others run the relay kernels: one prefix pass
per group over the shared blocks (read once), each request's own blocks, LSE merge fused.

CUDA graphs: the builder reports NEVER, so vLLM captures piecewise graphs and runs attention
eagerly (it is a splitting op). Full graphs would need the grouping computed on the device into
fixed-size buffers and grids sized for the capture batch; see the README.
"""

from dataclasses import dataclass

import torch
from vllm.v1.attention.backend import AttentionCGSupport, AttentionType
from vllm.v1.attention.backends.fa_utils import flash_attn_varlen_func
from vllm.v1.attention.backends.flash_attn import (
    FlashAttentionBackend,
    FlashAttentionImpl,
    FlashAttentionMetadata,
    FlashAttentionMetadataBuilder,
)
from vllm.v1.attention.backends.registry import AttentionBackendEnum

from edgeprompt_vllm.attention.relay_batch import RelayBatch, RestBatch, build_relay_batch
from edgeprompt_vllm.attention.stats import RELAY_STATS
from edgeprompt_vllm.kernels import relay_attention
from edgeprompt_vllm.kernels.cost_model import AttentionShape, GroupShape, choose_relay


@dataclass
class RelayFlashMetadata(FlashAttentionMetadata):
    relay: RelayBatch | None = None  # None: this batch runs stock FlashAttention


class RelayFlashMetadataBuilder(FlashAttentionMetadataBuilder):
    _cudagraph_support = AttentionCGSupport.NEVER

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.shape = AttentionShape(num_q_heads=self.num_heads_q, num_kv_heads=self.num_heads_kv,
                                    head_size=self.headdim, dtype_bytes=self.model_config.dtype.itemsize)
        self.relay_enabled = vllm_config.attention_config.backend == AttentionBackendEnum.CUSTOM \
            and self.kv_cache_dtype == self.model_config.dtype

    def build(self, common_prefix_len, common_attn_metadata, fast_build=False) -> RelayFlashMetadata:
        stock = super().build(common_prefix_len, common_attn_metadata, fast_build)
        relay = None
        if self.relay_enabled and not stock.use_cascade:
            relay = build_relay_batch(common_attn_metadata, self.block_size, keep=self._worth_relaying,
                                      split_rest=True)
            RELAY_STATS.record(relay)
        return RelayFlashMetadata(**vars(stock), relay=relay)

    def _worth_relaying(self, groups, query_lens):
        shapes = [GroupShape(num_reqs=len(reqs), num_query_tokens=int(query_lens[reqs].sum()),
                             prefix_len=prefix_len) for reqs, prefix_len in groups]
        decisions = choose_relay(shapes, self.shape)
        return [g for g, d in zip(groups, decisions) if d.relay]


class RelayFlashImpl(FlashAttentionImpl):
    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output,
                output_scale=None, output_block_scale=None):
        relay = getattr(attn_metadata, "relay", None)
        if relay is None or not self._relay_supported() or output_scale is not None:
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output,
                                   output_scale, output_block_scale)
        # (B, H, N, 2*D) -> key, value (B, N, H, D): strided views, as FlashAttention reads them
        key_cache, value_cache = kv_cache.transpose(1, 2).split(self.head_size, dim=-1)
        n = relay.num_tokens
        if relay.token_order is None:
            relay_attention(query[:n], key_cache, value_cache, relay.meta, self.scale,
                            out=output[:n], validate=False)
        else:
            out = relay_attention(query[relay.token_order], key_cache, value_cache, relay.meta,
                                  self.scale, validate=False)
            output[relay.token_order] = out
        if relay.rest is not None:
            self._flash_attention(query, key_cache, value_cache, relay.rest, output)
        return output

    def _flash_attention(self, query, key_cache, value_cache, rest: RestBatch, output) -> None:
        """FlashAttention over the requests no group relays (prefills, unshared requests)."""
        q = query[rest.token_index]  # [num_rest_tokens, num_heads, head_size]
        out = torch.empty_like(q)
        flash_attn_varlen_func(
            q=q, k=key_cache, v=value_cache, out=out, cu_seqlens_q=rest.query_start_loc,
            max_seqlen_q=rest.max_query_len, seqused_k=rest.seq_lens, max_seqlen_k=rest.max_seq_len,
            softmax_scale=self.scale, causal=True, block_table=rest.block_table,
            fa_version=self.vllm_flash_attn_version)
        output[rest.token_index] = out

    def _relay_supported(self) -> bool:
        return (self.attn_type == AttentionType.DECODER and self.alibi_slopes is None
                and self.sliding_window in (None, (-1, -1)) and not self.logits_soft_cap
                and getattr(self, "sinks", None) is None)


class RelayFlashBackend(FlashAttentionBackend):
    @staticmethod
    def get_name() -> str:
        return "CUSTOM"  # vLLM maps the name back to its enum member (docs/vllm-api.md §0.3)

    @staticmethod
    def get_impl_cls():
        return RelayFlashImpl

    @staticmethod
    def get_builder_cls():
        return RelayFlashMetadataBuilder
