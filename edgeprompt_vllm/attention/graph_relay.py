"""Relay attention inside FULL CUDA graphs (Model Runner V2, vLLM 0.26): launches that do not
depend on the step's grouping.

A FULL graph replays the launches captured for its batch size: grids, tile and split choices and
every pointer are frozen, and no Python runs in its forward. So the step's grouping lives in
persistent device buffers (`GraphRelayTable`, one per metadata builder) that the builder rewrites
for every uniform decode batch (every FULL step's; an eager one with no group then runs
FlashAttention), and the launches are sized by bounds, not by the step:

- the suffix kernel runs over every request of the batch, on vLLM's own persistent
  query_start_loc / seq_lens / block table; prefix_lens[r] is its group's prefix, or 0 for a
  request no group relays (then it is plain paged attention over the request's whole table) and
  for vLLM's padding rows (sequence length 0: nothing is read);
- the prefix pass has MAX_GRAPH_GROUPS group slots; a group names its tokens in a list
  (RelayMetadata.group_token_index), so the batch keeps vLLM's request order; unused slots are
  empty and their programs exit at once; every slot may hold all the batch's tokens;
- the prefix split count is fixed per graph (as for one group at the longest prefix,
  `one_group_prefix_splits`); each program finds its key range on the device from the group's
  prefix length (a split past a short prefix writes an empty state);
- the suffix split count is the one its launcher picks for the padded batch at the longest
  sequence (max_model_len); split ranges are likewise per request on the device.

Invariant: every FULL step of a relay engine rewrites the whole table (no groups: zeros), so a
graph never sees a previous step's groups. Groups past the capacity are left plain (exact, only
slower), keeping the ones the cost model says save most.
"""

from dataclasses import dataclass, field

import numpy as np
import torch

from edgeprompt_vllm.attention import host_block_table
from edgeprompt_vllm.attention.grouping import find_groups, group_shapes
from edgeprompt_vllm.attention.relay_batch import host_batch
from edgeprompt_vllm.kernels import RelayMetadata
from edgeprompt_vllm.kernels.cost_model import AttentionShape, GroupDecision, choose_relay
from edgeprompt_vllm.kernels.relay_attention import aligned_int32
from edgeprompt_vllm.kernels.relay_prefix import one_group_prefix_splits
from edgeprompt_vllm.log import get_logger

logger = get_logger(__name__)

MAX_GRAPH_GROUPS = 4  # prefix-pass slots per step: distinct cloud prompts decoding at once


@dataclass
class GraphRelay:
    """A uniform decode step's relay (in a FULL graph, or eager): kernel metadata over the
    persistent table, launch choices."""

    meta: RelayMetadata
    launch_kwargs: dict  # relay_attention's prefix_splits / suffix_config, fixed per batch size
    groups: list[tuple[int, int, int]]  # host: (first position, end, prefix_len) of each group
    replays: dict = field(default_factory=dict)  # softmax scale -> kernels' LayerReplay


class GraphRelayTable:
    """Persistent int32 device buffers, one H2D copy per step:

        [prefix_lens: max_reqs | group_start: G | group_end: G | group_prefix_len: G |
         group_block_table: G x max_blocks | token_index: max_tokens]
    """

    def __init__(self, max_reqs: int, max_tokens: int, max_blocks: int, device: torch.device):
        g = MAX_GRAPH_GROUPS
        self.sizes = [max_reqs, g, g, g, g * max_blocks, max_tokens]
        self.max_blocks = max_blocks
        # every segment starts 16-byte aligned, as the kernels' variants warmed up at start
        padded = [aligned_int32(n) for n in self.sizes]
        self.offsets = np.cumsum([0] + padded[:-1])  # where each segment starts
        self.device_buffer = torch.zeros(sum(padded), dtype=torch.int32, device=device)
        (self.prefix_lens, self.group_start, self.group_end, self.group_prefix_len, table,
         self.token_index) = (v[:n] for v, n in zip(self.device_buffer.split(padded), self.sizes))
        self.group_block_table = table.view(g, max_blocks)

    def fits(self, common) -> bool:
        """Whether a batch (vLLM's CommonAttentionMetadata) fits the table: every FULL graph's
        does (its capture filled it); a step run eagerly that vLLM did not dispatch may not."""
        return common.num_reqs <= self.sizes[0] and common.num_actual_tokens <= self.sizes[-1]

    def fill(self, qsl: np.ndarray, groups: list[tuple[list[int], int]],
             block_table: np.ndarray, block_size: int) -> list[tuple[int, int, int]]:
        """Write the step's groups (host: query_start_loc [R+1], [(requests, prefix_len)] at most
        MAX_GRAPH_GROUPS, block table rows [R, >= prefix blocks]); returns their spans
        (first position, end, prefix_len). Everything else is zeroed."""
        if len(groups) > MAX_GRAPH_GROUPS:
            raise ValueError(f"at most {MAX_GRAPH_GROUPS} groups per step, got {len(groups)}")
        num_tokens = int(qsl[-1])
        if len(qsl) - 1 > self.sizes[0] or num_tokens > self.sizes[-1]:
            raise ValueError(f"batch of {len(qsl) - 1} requests / {num_tokens} tokens exceeds the "
                             f"table ({self.sizes[0]} / {self.sizes[-1]})")
        used = int(self.offsets[-1]) + num_tokens  # the token list's tail is never read
        host = np.zeros(used, dtype=np.int32)
        prefix_lens, starts, ends, plens, table, index = (
            host[o:o + n] for o, n in zip(self.offsets, self.sizes))
        table = table.reshape(MAX_GRAPH_GROUPS, self.max_blocks)
        spans, pos = [], 0
        for g, (reqs, prefix_len) in enumerate(groups):
            tokens = np.concatenate([np.arange(qsl[r], qsl[r + 1]) for r in reqs])
            index[pos:pos + len(tokens)] = tokens
            starts[g], ends[g], plens[g] = pos, pos + len(tokens), prefix_len
            prefix_lens[reqs] = prefix_len
            n = -(-prefix_len // block_size)
            table[g, :n] = block_table[reqs[0], :n]  # the same ids in every row of the group
            spans.append((pos, pos + len(tokens), prefix_len))
            pos += len(tokens)
        source = torch.from_numpy(host)
        if self.device_buffer.is_cuda:
            source = source.pin_memory()  # non-blocking: ordered on the stream before the replay
        self.device_buffer[:used].copy_(source, non_blocking=True)
        return spans

    def metadata(self, query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                 block_table: torch.Tensor, num_tokens: int, max_query_len: int,
                 max_seq_len: int) -> RelayMetadata:
        """Kernel metadata for a batch of `num_tokens` (padded) tokens; vLLM's tensors are its
        persistent input buffers (query_start_loc [R+1], seq_lens [R], block_table [R, W]);
        the bounds size the grids for any grouping of the batch."""
        num_reqs = seq_lens.shape[0]
        return RelayMetadata(
            query_start_loc=query_start_loc, seq_lens=seq_lens, block_table=block_table,
            prefix_lens=self.prefix_lens[:num_reqs],
            group_req_start=self.group_start, group_req_end=self.group_end,
            group_block_table=self.group_block_table, group_prefix_len=self.group_prefix_len,
            max_query_len=max_query_len, max_seq_len=max_seq_len,
            max_group_query_len=num_tokens,  # one group may hold the whole batch
            max_prefix_len=max_seq_len,
            group_token_index=self.token_index[:num_tokens])


def launch_kwargs(num_tokens: int, num_q_heads: int, num_kv_heads: int, head_size: int,
                  max_seq_len: int, num_sms: int, pdl: bool) -> dict:
    """relay_attention's fixed choices for a graph of `num_tokens` decode tokens."""
    splits = one_group_prefix_splits(num_q_heads, num_kv_heads, head_size, num_tokens,
                                     max_seq_len, num_sms)
    return dict(prefix_splits=splits, suffix_config=None if pdl else dict(PDL=False))


def write_step(table: GraphRelayTable, common, block_size: int, shape: AttentionShape,
               max_group_query_len: int) -> list[tuple[int, int, int]]:
    """Group a uniform decode batch (vLLM's CommonAttentionMetadata, padded for a FULL graph or
    not) and write it into the table; returns the groups' spans. No groups where the runner
    keeps no host copy of the block ids (reading them from the device would sync)."""
    padded_qsl = common.query_start_loc_cpu[: common.num_reqs + 1].numpy()
    real = int(np.searchsorted(padded_qsl, padded_qsl[-1]))  # padding rows have no tokens
    qsl, groups, block_table = padded_qsl[: real + 1], [], np.zeros((0, 0), np.int32)
    if host_block_table.is_noted(common.block_table_tensor, real):
        qsl, seq_lens, block_table = host_batch(common, block_size, real)
        query_lens = np.diff(qsl)
        found = find_groups(block_table, seq_lens, query_lens, block_size,
                            max_query_len=max_group_query_len)
        groups = strongest_groups(found, choose_relay(group_shapes(found, query_lens), shape))
    return table.fill(qsl, groups, block_table, block_size)


def strongest_groups(groups: list, decisions: list[GroupDecision]) -> list:
    """The relaying groups, at most MAX_GRAPH_GROUPS, those that save most first."""
    kept = [(d.saving_s, i) for i, d in enumerate(decisions) if d.relay]
    kept.sort(reverse=True)
    return [groups[i] for _, i in sorted(kept[:MAX_GRAPH_GROUPS], key=lambda x: x[1])]


def self_check_batch(num_q_heads: int, num_kv_heads: int, head_size: int, block_size: int,
                     dtype: torch.dtype, device, num_reqs: int = 8) -> dict:
    """A small decode batch for the self-check (num_reqs >= 3): one group of the first
    num_reqs - 2 requests over 4 shared blocks, one of the next request alone over 2 (fewer
    tiles than the graph's prefix splits), the last request ungrouped; random caches; every
    request has 1.5 blocks of its own."""
    gen = torch.Generator().manual_seed(0)
    own = [[4 + 2 * r, 5 + 2 * r] for r in range(num_reqs)]
    rows = [[0, 1, 2, 3] + o for o in own]
    rows[-2] = [0, 1] + own[-2] + [0, 0]  # its own prefix of 2 shared blocks
    seq_lens = [4 * block_size + block_size + block_size // 2] * num_reqs
    seq_lens[-2] = 2 * block_size + block_size + block_size // 2
    shape = (4 + 2 * num_reqs, block_size, num_kv_heads, head_size)
    return dict(
        query=torch.randn(num_reqs, num_q_heads, head_size, generator=gen).to(device, dtype),
        key_cache=torch.randn(shape, generator=gen).to(device, dtype),
        value_cache=torch.randn(shape, generator=gen).to(device, dtype),
        qsl=np.arange(num_reqs + 1, dtype=np.int32),
        seq_lens=np.asarray(seq_lens, dtype=np.int32),
        block_table=np.asarray(rows, dtype=np.int32),
        groups=[(list(range(num_reqs - 2)), 4 * block_size), ([num_reqs - 2], 2 * block_size)],
    )


def run_self_check(batch: dict, launch: dict, block_size: int, capture,
                   max_seq_len: int) -> bool:
    """Record the relay launches over an empty table (`capture(fn)` -> a replay function), fill
    the table with the batch's groups, replay, compare with plain attention (fp32 reference).
    `launch` and `max_seq_len` (the bound) as serving sizes them (launch_kwargs)."""
    from edgeprompt_vllm.kernels import plain_attention_ref, relay_attention

    query, device = batch["query"], batch["query"].device
    qsl, seq_lens, table = (torch.from_numpy(batch[k]).to(device)
                            for k in ("qsl", "seq_lens", "block_table"))
    num_reqs, scale = len(batch["seq_lens"]), query.shape[-1] ** -0.5
    graph_table = GraphRelayTable(num_reqs, num_reqs, table.shape[1], device)
    meta = graph_table.metadata(qsl, seq_lens, table, num_reqs, 1, max_seq_len)
    out = torch.zeros_like(query)
    graph_table.fill(batch["qsl"], [], batch["block_table"], block_size)
    replay = capture(lambda: relay_attention(query, batch["key_cache"], batch["value_cache"], meta,
                                             scale, out=out, validate=False,
                                             schedule="fused", **launch))
    graph_table.fill(batch["qsl"], batch["groups"], batch["block_table"], block_size)
    replay()
    want = plain_attention_ref(query, batch["key_cache"], batch["value_cache"], qsl, seq_lens,
                               table, scale)
    # loose on purpose: this catches a broken capture (a missing or stale prefix moves outputs
    # by ~0.1 here), not rounding; the kernels' tolerance tests are tests/kernels
    return bool(torch.allclose(out.float(), want.float(), atol=2e-2, rtol=2e-2))


def _cuda_graph_capture(fn):
    fn()  # compile and warm up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def relay_graph_self_check(num_q_heads: int, num_kv_heads: int, head_size: int, block_size: int,
                           dtype: torch.dtype, device, max_model_len: int) -> dict | None:
    """Capture the relay launches in CUDA graphs and replay them over two small batches (8
    requests; 3, where the suffix splits and merges), sized as serving sizes them, first with
    programmatic dependent launch (PDL), then without: {"pdl": bool} for the first that matches
    plain attention, None if neither does (the FULL graphs then keep FlashAttention)."""
    batches = [self_check_batch(num_q_heads, num_kv_heads, head_size, block_size, dtype, device, n)
               for n in (8, 3)]
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    for pdl in (True, False):
        try:
            ok = all(run_self_check(
                batch, launch_kwargs(len(batch["seq_lens"]), num_q_heads, num_kv_heads, head_size,
                                     max_model_len, sms, pdl),
                block_size, _cuda_graph_capture, max_model_len) for batch in batches)
        except Exception as e:  # noqa: BLE001  any failure means: not in FULL graphs
            logger.warning("relay in CUDA graphs (pdl=%s) failed its self-check: %r", pdl, e)
            continue
        if ok:
            logger.info("relay kernels run inside FULL CUDA graphs (pdl=%s)", pdl)
            return {"pdl": pdl}
        logger.warning("relay in CUDA graphs (pdl=%s) differs from plain attention", pdl)
    return None
