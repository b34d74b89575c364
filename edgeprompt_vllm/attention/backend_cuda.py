"""Relay attention on CUDA: a FlashAttention subclass selected by `--attention-backend CUSTOM`.

Per step the builder finds the groups of decode requests that share leading physical blocks and
asks the cost model (kernels/cost_model.py) which are worth a prefix pass. Batches with no such
group run vLLM's FlashAttention unchanged; in the others the grouped requests run the relay
kernels (one prefix pass per group over the shared blocks, read once; each request's own
blocks; LSE merge fused into the suffix kernel) and the rest (prefill chunks, unshared requests)
run FlashAttention. The relay launches are planned at the first layer of a step and replayed at
the others (kernels/replay.py), so eager attention costs little host time per layer. Where the
cost model says so, the prefix pass of an eager step runs on FA3 instead (flash_prefix.py), before
the suffix kernel or, for a decode batch of a middling size, beside it ("handoff" schedule).

CUDA graphs: under Model Runner V2 the builder reports UNIFORM_BATCH and vLLM captures FULL
graphs of uniform decode steps beside piecewise ones. By default (MHA models) the FULL graphs
hold the relay kernels themselves, launched from a persistent group table the builder rewrites
for every uniform decode batch (graph_relay.py; a start-up self-check captures and replays them
first).
Otherwise (GQA models, where our plain kernel measured 3-18% slower than FA3, or
EDGEPROMPT_RELAY_IN_FULL_GRAPHS=0) the FULL graphs hold stock FlashAttention and a decode step
runs its FULL graph unless it is forecast to relay; a relaying step then runs piecewise,
attention eager (graph_mode.py). Under the V1 runner the builder reports NEVER (piecewise only).
"""

import os
import time
from dataclasses import dataclass

import numpy as np
import torch
from vllm.v1.attention.backend import AttentionCGSupport, AttentionType
from vllm.v1.attention.backends.fa_utils import flash_attn_varlen_func, get_flash_attn_version
from vllm.v1.attention.backends.flash_attn import (
    FlashAttentionBackend,
    FlashAttentionImpl,
    FlashAttentionMetadata,
    FlashAttentionMetadataBuilder,
)
from vllm.v1.attention.backends.registry import AttentionBackendEnum

from edgeprompt_vllm.attention import graph_mode, host_block_table
from edgeprompt_vllm.attention.flash_prefix import (
    flash_prefix_attention,
    flash_prefix_beside,
    flash_prefix_possible,
    prefix_pass_setting,
    use_flash_prefix,
)
from edgeprompt_vllm.attention.graph_relay import (
    GraphRelay,
    GraphRelayTable,
    launch_kwargs,
    relay_graph_self_check,
    write_step,
)
from edgeprompt_vllm.attention.grouping import group_shapes
from edgeprompt_vllm.attention.relay_batch import RelayBatch, RestBatch, build_relay_batch
from edgeprompt_vllm.attention.stats import RELAY_STATS
from edgeprompt_vllm.attention.warmup import warm_up_relay_kernels
from edgeprompt_vllm.kernels import relay_attention
from edgeprompt_vllm.kernels._launch import num_sms
from edgeprompt_vllm.kernels.cost_model import (
    H100,
    AttentionShape,
    choose_relay,
    worth_leaving_full_graph,
)
from edgeprompt_vllm.kernels.replay import LayerReplay


@dataclass
class RelayFlashMetadata(FlashAttentionMetadata):
    relay: RelayBatch | None = None  # None: this batch runs stock FlashAttention


# Requests with more query tokens than this (prefill chunks) are left to FlashAttention: prefill
# is compute-bound, FA3 runs it 2.5x faster than our prefix kernel (benchmarks/results, prefill
# row), and one long query in the relay batch would size every decode request's tile for it.
# 16 keeps speculative-decoding steps (a few tokens per request) in the groups.
MAX_GROUP_QUERY_LEN = 16

_WARMED_UP: list[tuple[int, float]] = []  # once per process: the kernels are compiled for every layer alike
_GRAPH_CHECK: dict = {}  # once per process: relay_graph_self_check's answer ({"pdl": bool} or None)


def relay_in_full_graphs(shape: AttentionShape) -> bool:
    """EDGEPROMPT_RELAY_IN_FULL_GRAPHS: 1 on, 0 off, auto (default): MHA only, where our plain
    paged kernel (a FULL graph runs it for every request no group relays) is within 2% of FA3
    on an H100; for GQA it was 3-18% slower (`ours_plain` against `fa3_full`,
    benchmarks/results/kernels/h100.md), so FA3 stays in the FULL graphs there."""
    setting = os.environ.get("EDGEPROMPT_RELAY_IN_FULL_GRAPHS", "auto")
    if setting not in ("0", "1", "auto"):
        raise ValueError(f"EDGEPROMPT_RELAY_IN_FULL_GRAPHS must be 0, 1 or auto, got {setting!r}")
    return setting == "1" or (setting == "auto" and shape.num_q_heads == shape.num_kv_heads)


def _relay_enabled(vllm_config, kv_cache_dtype: torch.dtype) -> bool:
    """The relay path runs when CUSTOM is selected and the KV cache is in the model's dtype."""
    return (vllm_config.attention_config.backend == AttentionBackendEnum.CUSTOM
            and kv_cache_dtype == vllm_config.model_config.dtype)


class RelayFlashMetadataBuilder(FlashAttentionMetadataBuilder):
    @classmethod
    def get_cudagraph_support(cls, vllm_config, kv_cache_spec) -> AttentionCGSupport:
        if not _relay_enabled(vllm_config, kv_cache_spec.dtype):
            return super().get_cudagraph_support(vllm_config, kv_cache_spec)  # stock FlashAttention
        if graph_mode.full_graphs_possible(vllm_config) and graph_mode.install():
            return AttentionCGSupport.UNIFORM_BATCH  # FULL graphs for steps that relay nothing
        return AttentionCGSupport.NEVER

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.shape = AttentionShape(num_q_heads=self.num_heads_q, num_kv_heads=self.num_heads_kv,
                                    head_size=self.headdim, dtype_bytes=self.model_config.dtype.itemsize)
        self.relay_enabled = _relay_enabled(vllm_config, kv_cache_spec.dtype)
        self.num_layers = len(layer_names)  # the attention layers this builder's metadata serves
        self._relay_pays_for_piecewise = False
        self._flash_prefix = False  # set by _worth_relaying: this batch's prefix pass on FA3
        self._prefix_beside = False  # ... and beside the suffix kernel
        self.fa_version = get_flash_attn_version()
        self.prefix_pass = prefix_pass_setting()
        if self.relay_enabled:
            host_block_table.install()
        # EDGEPROMPT_PIECEWISE_STEP_S=0: every step worth a prefix pass relays (exactness tests)
        self.piecewise_step_s = float(os.environ.get("EDGEPROMPT_PIECEWISE_STEP_S",
                                                     H100.piecewise_step_s))
        if self.relay_enabled and not _WARMED_UP:
            _WARMED_UP.append(warm_up_relay_kernels(
                self.num_heads_q, self.num_heads_kv, self.headdim, self.block_size,
                self.model_config.dtype, device, vllm_config.scheduler_config.max_num_seqs,
                self.model_config.max_model_len,
                external_prefix=flash_prefix_possible(self.prefix_pass, self.fa_version)))
        self.graph_table: GraphRelayTable | None = None  # relay inside FULL graphs (graph_relay.py)
        self.graph_pdl = True
        if self.relay_enabled and graph_mode.full_graphs_possible(vllm_config):
            if relay_in_full_graphs(self.shape) and self._graph_check(device):
                max_reqs = vllm_config.scheduler_config.max_num_seqs
                self.graph_table = GraphRelayTable(
                    max_reqs, max_reqs, -(-self.model_config.max_model_len // self.block_size), device)
            graph_mode.enable_for(vllm_config, forecast=self.graph_table is None)

    def _num_sms(self) -> int:
        device = torch.device(self.device)
        if device.type != "cuda":
            return num_sms(None)
        return num_sms(torch.cuda.current_device() if device.index is None else device.index)

    def _graph_check(self, device) -> bool:
        if "answer" not in _GRAPH_CHECK:
            _GRAPH_CHECK["answer"] = relay_graph_self_check(
                self.num_heads_q, self.num_heads_kv, self.headdim, self.block_size,
                self.model_config.dtype, device, self.model_config.max_model_len)
        answer = _GRAPH_CHECK["answer"]
        self.graph_pdl = bool(answer and answer["pdl"])
        return answer is not None

    def build(self, common_prefix_len, common_attn_metadata, fast_build=False) -> RelayFlashMetadata:
        stock = super().build(common_prefix_len, common_attn_metadata, fast_build)
        relay = None
        if self.graph_table is not None and self._uniform_decode(common_attn_metadata):
            # every decode batch that fits the table (every FULL step's) rewrites it, whatever
            # mode the step runs in: a FULL graph never sees an older step's groups. A step
            # that runs eagerly with no group keeps FlashAttention.
            relay = self._graph_step(common_attn_metadata)
            if not relay.groups and not graph_mode.step_is_full_graph():
                relay = None
        elif self.relay_enabled and self.graph_table is None and graph_mode.step_is_full_graph():
            # a FULL graph step replays FlashAttention: nothing to group (graph_mode.py); a
            # request joining here (a 1-token prefill) makes the next decode step decide
            if graph_mode.has_prefill(common_attn_metadata, MAX_GROUP_QUERY_LEN):
                graph_mode.note_build(True)
        elif self.relay_enabled and not stock.use_cascade:
            start = time.perf_counter()
            self._relay_pays_for_piecewise = False  # set by _worth_relaying when there are groups
            relay = build_relay_batch(common_attn_metadata, self.block_size, keep=self._worth_relaying,
                                      split_rest=True, max_group_query_len=MAX_GROUP_QUERY_LEN)
            if relay is not None:
                relay.flash_prefix = self._flash_prefix
                relay.prefix_beside = self._prefix_beside
            RELAY_STATS.record(relay, time.perf_counter() - start)
            # the next decode steps leave their FULL graph if a request here is still
            # prefilling (it decodes next: that step decides, eagerly) or relaying pays for it
            graph_mode.note_build(self._relay_pays_for_piecewise
                                  or graph_mode.has_prefill(common_attn_metadata, MAX_GROUP_QUERY_LEN))
        return RelayFlashMetadata(**vars(stock), relay=relay)

    def build_for_cudagraph_capture(self, common_attn_metadata) -> RelayFlashMetadata:
        """FULL graphs hold the relay launches over an empty group table (graph_relay.py), or
        stock FlashAttention (relay off: dummy block tables share their leading blocks)."""
        stock = super().build(0, common_attn_metadata)
        relay = None
        if self.graph_table is not None and self._uniform_decode(common_attn_metadata):
            # (vLLM builds capture metadata for mixed batches too with breakable piecewise
            # graphs, VLLM_USE_BREAKABLE_CUDAGRAPH: those keep FlashAttention)
            qsl = common_attn_metadata.query_start_loc_cpu[: common_attn_metadata.num_reqs + 1].numpy()
            self.graph_table.fill(qsl, [], np.zeros((0, 0), np.int32), self.block_size)
            relay = self._graph_relay(common_attn_metadata, [])
        return RelayFlashMetadata(**vars(stock), relay=relay)

    def _uniform_decode(self, common) -> bool:
        """A batch of one query token per request (vLLM captures FULL graphs of these only) that
        fits the graph table."""
        return common.max_query_len == 1 and self.graph_table.fits(common)

    def _graph_step(self, common) -> GraphRelay:
        """Group a decode batch's requests and write them into the graph's table."""
        start = time.perf_counter()
        spans = write_step(self.graph_table, common, self.block_size, self.shape,
                           MAX_GROUP_QUERY_LEN)
        relay = self._graph_relay(common, spans)
        RELAY_STATS.record(relay if relay.groups else None, time.perf_counter() - start)
        RELAY_STATS.full_graph_relay_batches += bool(relay.groups) and graph_mode.step_is_full_graph()
        return relay

    def _graph_relay(self, common, spans) -> GraphRelay:
        num_reqs = common.num_reqs
        num_tokens = int(common.query_start_loc_cpu[num_reqs])  # capture: the graph's size
        max_seq_len = self.model_config.max_model_len
        meta = self.graph_table.metadata(
            common.query_start_loc[: num_reqs + 1], common.seq_lens[:num_reqs],
            common.block_table_tensor[:num_reqs], num_tokens, common.max_query_len, max_seq_len)
        kwargs = launch_kwargs(num_tokens, self.num_heads_q, self.num_heads_kv, self.headdim,
                               max_seq_len, self._num_sms(), self.graph_pdl)
        return GraphRelay(meta=meta, launch_kwargs=kwargs, groups=spans)

    def _worth_relaying(self, groups, query_lens):
        shapes = group_shapes(groups, query_lens)
        decisions = choose_relay(shapes, self.shape)
        self._relay_pays_for_piecewise = worth_leaving_full_graph(decisions, self.num_layers,
                                                                  self.piecewise_step_s)
        self._flash_prefix = use_flash_prefix(self.prefix_pass, self.fa_version, shapes,
                                              decisions, self.shape)
        self._prefix_beside = self._flash_prefix and flash_prefix_beside(
            self.prefix_pass, shapes, decisions, self.shape, self._num_sms())
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
        if isinstance(relay, GraphRelay):  # every request, vLLM's order (FULL graphs)
            n = query.shape[0]
            self._layer_replay(relay)(query=query, key_cache=key_cache, value_cache=value_cache,
                                      out=output[:n])
            return output
        n = relay.num_tokens
        if relay.token_order is None:
            q, out = query[:n], output[:n]
        else:
            q = query[relay.token_order]
            out = torch.empty_like(q)
        self._layer_replay(relay)(query=q, key_cache=key_cache, value_cache=value_cache, out=out)
        if relay.token_order is not None:
            output[relay.token_order] = out
        if relay.rest is not None:
            self._flash_attention(query, key_cache, value_cache, relay.rest, output)
        return output

    def _layer_replay(self, relay: RelayBatch | GraphRelay) -> LayerReplay:
        """The batch's relay pipeline, planned at its first layer and replayed at the others
        (kernels/replay.py). The "fused" schedule (prefix partials folded into the suffix
        kernel's epilogue), two launches per layer when the suffix is not split; the prefix pass
        by FA3 where the builder chose it, and then, where it chose so, unsplit on a side stream
        beside the suffix kernel ("handoff": the replay repeats the stream switches)."""
        replay = relay.replays.get(self.scale)
        if replay is None:
            meta, scale = relay.meta, self.scale
            kwargs = dict(getattr(relay, "launch_kwargs", {}), schedule="fused")
            if getattr(relay, "flash_prefix", False):  # the prefix pass on FA3 (flash_prefix.py)
                beside = getattr(relay, "prefix_beside", False)
                kwargs["prefix_attention"] = flash_prefix_attention(
                    self.vllm_flash_attn_version, num_splits=1 if beside else 0)
                kwargs["schedule"] = "handoff" if beside else "fused"
            replay = relay.replays[scale] = LayerReplay(
                lambda query, key_cache, value_cache, out: relay_attention(
                    query, key_cache, value_cache, meta, scale, out=out, validate=False, **kwargs))
        return replay

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
