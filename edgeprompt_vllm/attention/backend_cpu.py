"""Relay attention on vLLM's CPU platform (vLLM 0.32 CPU wheel; CI and development).

The CPU platform ignores `--attention-backend` and always loads CPU_ATTN, so the plugin points
CPU_ATTN at this subclass (docs/vllm-api.md §2.1). It behaves exactly as stock CPU_ATTN unless
relay is selected with `--attention-backend CUSTOM` (the same flag as on GPU). The CPU kernel
returns no LSE, so grouped batches run the kernels' torch references over the KV read out of the
CPU layout: exact, for correctness, not speed.
"""

import functools
from dataclasses import dataclass

import torch
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadata,
    CPUAttentionMetadataBuilder,
)
from vllm.v1.attention.backends.registry import AttentionBackendEnum

from edgeprompt_vllm.attention.cpu_layout import CpuKVLayout
from edgeprompt_vllm.attention.relay_batch import RelayBatch, build_relay_batch
from edgeprompt_vllm.attention.stats import RELAY_STATS
from edgeprompt_vllm.kernels import relay_attention_ref
from edgeprompt_vllm.log import get_logger

logger = get_logger(__name__)


def relay_selected(vllm_config) -> bool:
    return vllm_config.attention_config.backend == AttentionBackendEnum.CUSTOM


@dataclass
class RelayCPUMetadata(CPUAttentionMetadata):
    relay: RelayBatch | None = None  # None: run the stock CPU kernel


class RelayCPUMetadataBuilder(CPUAttentionMetadataBuilder):
    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.relay_enabled = relay_selected(vllm_config) and not self.is_cross_attention \
            and not self.is_encoder_only_attention and self.kv_cache_dtype == "auto"

    def build(self, common_prefix_len, common_attn_metadata, fast_build=False) -> RelayCPUMetadata:
        stock = super().build(common_prefix_len, common_attn_metadata, fast_build)
        relay = None
        if self.relay_enabled:
            # On CPU every shared group relays: the point is exactness, not speed.
            relay = build_relay_batch(common_attn_metadata, self.block_size,
                                      keep=lambda groups, _: groups, remap_blocks=True)
            RELAY_STATS.record(relay)
        return RelayCPUMetadata(**vars(stock), relay=relay)


@functools.lru_cache(maxsize=8)
def _layout(num_kv_heads: int, block_size: int, head_size: int, dtype: torch.dtype, isa: str) -> CpuKVLayout:
    return CpuKVLayout.probe(num_kv_heads, block_size, head_size, dtype, isa)


class RelayCPUImpl(CPUAttentionBackendImpl):
    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output,
                output_scale=None, output_block_scale=None):
        relay = getattr(attn_metadata, "relay", None)
        if relay is None or not self._plain_decoder_attention():
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output,
                                   output_scale, output_block_scale)
        num_blocks, num_kv_heads, block_size, _ = kv_cache.shape
        layout = _layout(num_kv_heads, block_size, self.head_size, kv_cache.dtype, layer.isa)
        key_cache, value_cache = layout.gather(kv_cache, relay.used_blocks)  # [n, N, H, hs] each
        q = query[: relay.num_tokens]  # [num_tokens, num_heads, head_size]
        if relay.token_order is not None:
            q = q[relay.token_order]
        out = relay_attention_ref(q, key_cache, value_cache, relay.meta, self.scale, validate=False)
        if relay.token_order is not None:
            output[relay.token_order] = out
        else:
            output[: relay.num_tokens] = out
        return output

    def _plain_decoder_attention(self) -> bool:
        return (self.sinks is None and self.alibi_slopes is None and self.sliding_window == -1
                and not self.logits_soft_cap and not self.is_fp8_kv_cache)


class RelayCPUBackend(CPUAttentionBackend):
    @staticmethod
    def get_name() -> str:
        return "CPU_ATTN"  # the enum member this class overrides (docs/vllm-api.md §0.2-3)

    @staticmethod
    def get_impl_cls():
        return RelayCPUImpl

    @staticmethod
    def get_builder_cls():
        return RelayCPUMetadataBuilder
