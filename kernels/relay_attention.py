"""Relay attention = prefix pass per group + suffix pass per request + exact LSE merge.

The attention of a query over the concatenation (shared prefix || own suffix) equals the LSE merge
of its attention over each part. Relay attention computes the shared part once per group, reading
the shared KV once per batch instead of once per request (RelayAttention, Zhu et al., ACL 2024;
vLLM's cascade attention is the one-group case). Launches per call:

    relay_prefix_partials  all groups' tokens x shared KV     -> fp32 partial states (split prefix)
    paged_suffix           each request's own KV, causal       -> out (merge fused in its epilogue)
    merge_partial_states   only when the suffix is split       -> out

or ("overlap") the prefix pass on a side stream concurrent with the suffix pass and one
merge_attn_states after the join (see `relay_attention`).

Convention: lse: float32, natural log, [num_heads, num_tokens].

Metadata, per batch (`RelayMetadata`); lengths of request r:

    |<------------------------------ seq_lens[r] ------------------------------->|
    |<---- prefix_lens[r] = group_prefix_len[g] ---->|<------- own blocks ------->|
    |  shared blocks: group_block_table[g]           |               |<- query ->|
    |  (the same ids as block_table[r, :n_prefix])   |                 query_len

Requirement: every query position of a grouped request is >= its prefix length
(seq_len - query_len >= prefix_len), so the prefix pass is not causal. True for decode and for
edge-prompt prefill after a cloud prompt; `RelayMetadata.validate` checks it (and everything else).
"""

import contextlib
import itertools
from dataclasses import dataclass

import torch

from ._launch import Fork, call, cdiv, side_stream
from .external_prefix import PrefixAttention, external_prefix_state, external_state_buffers
from .handoff import Handoff, handoff_finish
from .merge import merge_attn_states, merge_attn_states_ref
from .paged_suffix import paged_suffix, paged_suffix_ref, suffix_tiling
from .relay_prefix import relay_prefix, relay_prefix_partials, relay_prefix_ref


def upload(values, device: torch.device, dtype: torch.dtype = torch.int32) -> torch.Tensor:
    """Host values (list or numpy) -> tensor on `device` without waiting for the device: on CUDA
    through pinned memory and a non-blocking copy (a pageable copy synchronizes with the stream,
    stalling the host until the kernels queued before it finish)."""
    host = torch.as_tensor(values, dtype=dtype)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


# Triton specializes a pointer argument on whether it is 16-byte aligned: an int32 view that
# starts at an odd offset of a packed buffer compiles (and JITs mid-serving) another variant
ALIGN_INT32 = 4  # elements: 16 bytes


def aligned_int32(n: int) -> int:
    """n int32 elements rounded up to a whole number of 16-byte units."""
    return -(-n // ALIGN_INT32) * ALIGN_INT32


def upload_segments(segments: list[list[int]], device: torch.device) -> list[torch.Tensor]:
    """Several host int lists in one upload, each returned as a 16-byte aligned int32 view (each
    segment padded to ALIGN_INT32 elements), so the kernels' variant never depends on lengths."""
    padded = [aligned_int32(len(seg)) for seg in segments]
    host = [x for seg, width in zip(segments, padded) for x in (*seg, *[0] * (width - len(seg)))]
    views = upload(host, device).split(padded)
    return [v[: len(seg)] for v, seg in zip(views, segments)]


@dataclass
class RelayMetadata:
    """What the relay kernels need to know about one batch (int32 tensors on the query's device)."""

    query_start_loc: torch.Tensor  # [num_reqs + 1] query token offsets of each request
    seq_lens: torch.Tensor  # [num_reqs] total tokens of each sequence, queries included
    block_table: torch.Tensor  # [num_reqs, max_blocks] each request's full block table
    prefix_lens: torch.Tensor  # [num_reqs] tokens served by the prefix pass (0: not grouped)
    group_req_start: torch.Tensor  # [num_groups] first request of each group
    group_req_end: torch.Tensor  # [num_groups] one past the last request of each group
    group_block_table: torch.Tensor  # [num_groups, max_prefix_blocks] the shared blocks
    group_prefix_len: torch.Tensor  # [num_groups] shared tokens of each group
    max_query_len: int  # host-side bounds that size the grids without a device sync
    max_seq_len: int
    max_group_query_len: int  # most query tokens in one group
    max_prefix_len: int
    # Token lists (CUDA graphs, attention/graph_relay.py): when set, group g's tokens are
    # group_token_index[group_req_start[g]:group_req_end[g]], in any order, and the two arrays
    # hold positions in it, not requests: the batch keeps its request order.
    group_token_index: torch.Tensor | None = None  # [num_positions] int32
    # Varlen sequences for an external prefix kernel (external_prefix.py), set by `build` when the
    # groups are request ranges in order: group g's sequence is tokens [loc[g], loc[g + 1]), its
    # own and any ungrouped ones up to the next group's (loc[0] = 0, loc[-1] = all tokens).
    prefix_seq_start_loc: torch.Tensor | None = None  # [num_groups + 1] int32
    max_prefix_seq_len: int = 0  # longest such sequence (host)

    @property
    def num_groups(self) -> int:
        return self.group_req_start.shape[0]

    @classmethod
    def build(
        cls,
        query_lens: list[int],
        seq_lens: list[int],
        block_table: torch.Tensor,
        groups: list[tuple[int, int, int]],
        block_size: int,
    ) -> "RelayMetadata":
        """From host lists. `groups` holds (req_start, req_end, prefix_len); a group's shared blocks
        are read from block_table[req_start] (prefix caching makes them the same ids in every
        row)."""
        dev = block_table.device
        num_reqs, num_groups = len(seq_lens), len(groups)
        qsl = [0]
        for n in query_lens:
            qsl.append(qsl[-1] + n)
        prefix = [0] * num_reqs
        for r0, r1, plen in groups:
            prefix[r0:r1] = [plen] * (r1 - r0)
        seq_loc = _prefix_seq_start_loc(qsl, groups)
        # every small host array in one upload: [qsl | seq_lens | prefix | starts | ends | plens
        # | prefix sequences]
        qsl_t, seq_t, prefix_t, start_t, end_t, plen_t, seq_loc_t = upload_segments(
            [qsl, list(seq_lens), prefix, *([g[i] for g in groups] for i in range(3)),
             seq_loc or []], dev)  # fmt: skip
        width = max([cdiv(p, block_size) for _, _, p in groups] + [1])
        gbt = torch.zeros(num_groups, width, dtype=torch.int32, device=dev)
        for g, (r0, _, plen) in enumerate(groups):
            gbt[g, : cdiv(plen, block_size)] = block_table[r0, : cdiv(plen, block_size)]
        return cls(
            query_start_loc=qsl_t,
            seq_lens=seq_t,
            block_table=block_table.to(torch.int32),
            prefix_lens=prefix_t,
            group_req_start=start_t,
            group_req_end=end_t,
            group_block_table=gbt,
            group_prefix_len=plen_t,
            max_query_len=max(query_lens, default=0),
            max_seq_len=max(seq_lens, default=0),
            max_group_query_len=max([qsl[r1] - qsl[r0] for r0, r1, _ in groups], default=0),
            max_prefix_len=max([g[2] for g in groups], default=0),
            prefix_seq_start_loc=seq_loc_t if seq_loc else None,
            max_prefix_seq_len=max([b - a for a, b in itertools.pairwise(seq_loc or [0])],
                                   default=0),
        )  # fmt: skip

    def validate(self, num_tokens: int, block_size: int) -> None:
        """Check every consistency rule (syncs with the device); raises ValueError."""
        qsl, sl, pl = (
            self.query_start_loc.tolist(),
            self.seq_lens.tolist(),
            self.prefix_lens.tolist(),
        )
        bt = self.block_table.cpu()
        num_reqs = len(sl)
        _require(
            len(qsl) == num_reqs + 1 and qsl[0] == 0,
            "query_start_loc must be [0, ...] of num_reqs + 1",
        )
        _require(
            all(a <= b for a, b in itertools.pairwise(qsl)),
            "query_start_loc must be non-decreasing",
        )
        _require(
            qsl[-1] <= num_tokens, f"query_start_loc[-1]={qsl[-1]} exceeds num_tokens={num_tokens}"
        )
        q_lens = [b - a for a, b in itertools.pairwise(qsl)]
        for r in range(num_reqs):
            _require(
                sl[r] - q_lens[r] >= pl[r] >= 0,
                f"request {r}: query positions must be >= prefix_lens ({pl[r]}); seq_len={sl[r]}, "
                f"query_len={q_lens[r]}",
            )
            _require(
                cdiv(sl[r], block_size) <= bt.shape[1],
                f"block_table row {r} too short for seq_len {sl[r]}",
            )
        self._validate_groups(pl, bt, block_size)
        _require(
            self.max_query_len >= max(q_lens, default=0), "max_query_len is below the real maximum"
        )
        _require(self.max_seq_len >= max(sl, default=0), "max_seq_len is below the real maximum")

    def _group_requests(self, qsl: list[int], num_reqs: int) -> list[list[int]]:
        """Each group's requests (token lists: those whose tokens the list names, all of them)."""
        starts, ends = self.group_req_start.tolist(), self.group_req_end.tolist()
        if self.group_token_index is None:
            for g, (r0, r1) in enumerate(zip(starts, ends)):
                _require(0 <= r0 < r1 <= num_reqs, f"group {g}: bad request range [{r0}, {r1})")
            return [list(range(r0, r1)) for r0, r1 in zip(starts, ends)]
        index = self.group_token_index.tolist()
        owner = {t: r for r in range(num_reqs) for t in range(qsl[r], qsl[r + 1])}
        groups = []
        for g, (p0, p1) in enumerate(zip(starts, ends)):
            if p0 == p1:  # an unused slot of a fixed-capacity table
                groups.append([])
                continue
            _require(0 <= p0 < p1 <= len(index), f"group {g}: bad position range [{p0}, {p1})")
            tokens = index[p0:p1]
            _require(all(t in owner for t in tokens), f"group {g}: a token of no request")
            reqs = sorted({owner[t] for t in tokens})
            _require(
                sorted(tokens) == [t for r in reqs for t in range(qsl[r], qsl[r + 1])],
                f"group {g}: must list every token of its requests once",
            )
            groups.append(reqs)
        return groups

    def _validate_groups(self, pl: list[int], bt: torch.Tensor, block_size: int) -> None:
        qsl = self.query_start_loc.tolist()
        plens, gbt = self.group_prefix_len.tolist(), self.group_block_table.cpu()
        covered = [False] * len(pl)
        for g, (reqs, plen) in enumerate(zip(self._group_requests(qsl, len(pl)), plens)):
            n_blk = cdiv(plen, block_size)
            _require(
                n_blk <= gbt.shape[1], f"group_block_table row {g} too short for prefix {plen}"
            )
            for r in reqs:
                _require(not covered[r], f"request {r} is in two groups")
                covered[r] = True
                _require(
                    pl[r] == plen,
                    f"request {r}: prefix_lens={pl[r]} != group_prefix_len[{g}]={plen}",
                )
                _require(
                    bool((bt[r, :n_blk] == gbt[g, :n_blk]).all()),
                    f"request {r}: block_table does not hold group {g}'s shared blocks",
                )
            _require(
                self.max_group_query_len >= sum(qsl[r + 1] - qsl[r] for r in reqs),
                "max_group_query_len is below the real maximum",
            )
            _require(self.max_prefix_len >= plen, "max_prefix_len is below the real maximum")
        for r, c in enumerate(covered):
            _require(c or pl[r] == 0, f"request {r} has prefix_lens={pl[r]} but is in no group")
        if self.prefix_seq_start_loc is not None:
            loc = self.prefix_seq_start_loc.tolist()
            groups = self._group_requests(qsl, len(pl))
            _require(
                len(loc) == len(groups) + 1 and loc[0] == 0 and loc[-1] == qsl[-1]
                and all(loc[g] <= qsl[reqs[0]] and qsl[reqs[-1] + 1] <= loc[g + 1]
                        for g, reqs in enumerate(groups)),
                "prefix_seq_start_loc must be [0, ..., num_tokens] with group g's tokens in "
                "sequence g",
            )  # fmt: skip
            _require(
                self.max_prefix_seq_len >= max(b - a for a, b in itertools.pairwise(loc)),
                "max_prefix_seq_len is below the real maximum",
            )


def _prefix_seq_start_loc(qsl: list[int], groups: list[tuple[int, int, int]]) -> list[int] | None:
    """RelayMetadata.prefix_seq_start_loc on the host, or None unless the groups are disjoint
    request ranges in order."""
    if not groups or any(g[1] > h[0] for g, h in itertools.pairwise(groups)):
        return None
    return [0] + [qsl[r0] for r0, _, _ in groups[1:]] + [qsl[-1]]


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(f"RelayMetadata: {msg}")


SCHEDULES = ("auto", "fused", "overlap", "serial", "handoff")


def relay_attention(
    query: torch.Tensor,  # [num_tokens, num_q_heads, head_size]
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_size]
    value_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_size]
    meta: RelayMetadata,
    softmax_scale: float,
    out: torch.Tensor | None = None,  # [num_tokens, num_q_heads, head_size]
    *,
    return_lse: bool = False,
    schedule: str = "auto",
    validate: bool | None = None,
    prefix_splits: int | None = None,
    suffix_splits: int | None = None,
    prefix_config: dict | None = None,
    suffix_config: dict | None = None,
    prefix_attention: PrefixAttention | None = None,
    side_priority: int = -1,
    handoff: Handoff | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of every query over (its group's shared prefix || its own KV); `out` (and lse).

    schedule:
      "fused"   prefix partials, then the suffix kernel folds them in (2 launches, one stream)
      "overlap" prefix pass on a side CUDA stream, concurrent with the suffix pass, then
                merge_attn_states: the prefix pass's latency hides under the suffix's, and its
                splits are not capped by the suffix epilogue. On an H100 (CUDA graphs), before
                session 13's kernel changes, it beat "fused" by 8-10 us at batch 32-64, by 27 us
                at 8 GQA requests / prefix 4096, and was within 1.3% either way at batch 128-256
                (measured). The side stream has high priority (`side_priority`, -1): the GPU
                places the prefix programs first and the suffix's beside them; at priority 0 an
                H200 ran GQA 256 / 4096 in 0.2596 ms instead of 0.2229, and was 2-18% slower on 6
                of 9 decode shapes and at most 3% faster on the rest (sweep_relay_decode.py
                variant overlap_lo, session 15)
      "serial"  prefix, suffix, merge_attn_states on one stream (vLLM's cascade shape)
      "handoff" as "overlap", without the merge launch after the join: each suffix program folds
                the prefix state in if the prefix pass is done when its own keys are, else a
                finisher queued behind the prefix pass merges its rows (handoff.py). The suffix
                runs unsplit. With FA3's unsplit pass (the CUDA backend's choice for GQA decode
                batches of 12-24 suffix programs per SM: cost_model.prefix_pass_beside_suffix)
                an H200 ran GQA 256 / 2048 and 384 / 4096 in 0.1815 and 0.2852 ms against
                0.1941 and 0.3081 with FA3's pass before the suffix (benchmark_kernels.py,
                benchmarks/results/kernels/h200_session18.md)
      "auto"    "fused", what the CUDA backend runs (kernels/replay.py records its launches once
                per step). With the block ids prefetched (_paged_attend.py) it was 0.3-15% faster
                than "overlap" on every decode shape of benchmark_kernels.py on an H100 but one:
                8 GQA requests over a 4096-token prefix (14% slower; its 4 prefix splits walk 16
                tiles each), where the cost model sends the group to FlashAttention instead
                (benchmarks/results/kernels/h100.md)
    Fork/join on the side stream is CUDA-graph safe. `validate` (default: only when the tensors
    are on the CPU, where it is cheap) runs `meta.validate`. The *_splits / *_config arguments
    override the launchers' choices (for tests and tuning). `prefix_attention`: another kernel
    runs the prefix pass (FA3 on the CUDA backend where the cost model prefers it,
    external_prefix.py); "fused": the suffix kernel folds its state in as ours; "overlap" /
    "serial": it is merged like ours. `handoff`: the "handoff" schedule's buffers, kept by the
    caller from call to call (None: new ones, zeroed, each call).
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if validate if validate is not None else query.device.type == "cpu":
        meta.validate(query.shape[0], key_cache.shape[1])
    if schedule == "auto":
        schedule = "fused"
    out = torch.empty_like(query) if out is None else out
    lse = (
        torch.empty(query.shape[1], query.shape[0], dtype=torch.float32, device=query.device)
        if return_lse
        else None
    )
    suffix_args = (
        query,
        key_cache,
        value_cache,
        meta.query_start_loc,
        meta.seq_lens,
        meta.block_table,
        meta.prefix_lens,
        softmax_scale,
    )
    suffix_kw = dict(
        max_query_len=meta.max_query_len,
        max_seq_len=meta.max_seq_len,
        num_splits=suffix_splits,
        config=suffix_config,
    )
    prefix_args = (
        query,
        key_cache,
        value_cache,
        meta.query_start_loc,
        meta.group_req_start,
        meta.group_req_end,
        meta.group_block_table,
        meta.group_prefix_len,
        softmax_scale,
    )
    prefix_kw = dict(
        max_group_query_len=meta.max_group_query_len,
        max_prefix_len=meta.max_prefix_len,
        num_splits=prefix_splits,
        config=prefix_config,
        group_token_index=meta.group_token_index,
    )
    if meta.num_groups == 0 or meta.max_prefix_len == 0:  # no sharing: plain paged attention
        paged_suffix(*suffix_args, out=out, lse=lse, return_lse=return_lse, **suffix_kw)
    elif schedule == "fused":
        if prefix_attention is not None:
            parts = external_prefix_state(
                prefix_attention, query, key_cache, value_cache, meta, softmax_scale
            )
            # the suffix kernel runs alone after it: a request's KV-head programs side by side
            # read its pages together (EXTERNAL_PREFIX_SUFFIX_CONFIG)
            suffix_kw["config"] = {**EXTERNAL_PREFIX_SUFFIX_CONFIG, **(suffix_config or {})}
        else:
            parts = relay_prefix_partials(*prefix_args, **prefix_kw)
        paged_suffix(
            *suffix_args, out=out, lse=lse, return_lse=return_lse, prefix_state=parts, **suffix_kw
        )
    elif schedule == "handoff":
        _handoff(query, key_cache, value_cache, meta, softmax_scale, out, lse, prefix_args,
                 prefix_kw, suffix_args, suffix_kw, prefix_attention, side_priority,
                 handoff)  # fmt: skip
    else:
        f32 = dict(dtype=torch.float32, device=query.device)
        side = None
        if schedule == "overlap" and query.is_cuda:
            side = side_stream(query.device, side_priority)
        if prefix_attention is not None:  # [1, ...] in the query dtype (external_prefix.py)
            pre_state = external_state_buffers(query)
            pre_out, pre_lse = pre_state[0][0], pre_state[1][0]
        else:
            pre_out, pre_lse = (
                torch.empty(query.shape, **f32),
                torch.empty(query.shape[1], query.shape[0], **f32),
            )
        with _forked(side) as fork:  # prefix pass, on the side stream when overlapping
            if prefix_attention is not None:
                external_prefix_state(prefix_attention, query, key_cache, value_cache, meta,
                                      softmax_scale, state=pre_state)  # fmt: skip
                # an ungrouped token's sequence is its neighbour group's: no prefix for it
                pre_lse.masked_fill_(~_grouped_tokens(meta, query.shape[0]), float("-inf"))
            else:
                relay_prefix(*prefix_args, out=pre_out, lse=pre_lse, **prefix_kw)
        suf_out, suf_lse = paged_suffix(
            *suffix_args, out=torch.empty(query.shape, **f32), **suffix_kw
        )
        _join(fork)  # before the merge reads the prefix state
        merge_attn_states(out, pre_out, pre_lse, suf_out, suf_lse, lse)
    return (out, lse) if return_lse else out


def handoff_buffers(query: torch.Tensor, key_cache: torch.Tensor, meta: RelayMetadata,
                    suffix_config: dict | None = None, **knobs) -> Handoff:
    """The "handoff" schedule's buffers for this batch (`knobs`: Handoff.new's). Pass them as
    relay_attention(..., handoff=) to later calls of the same shapes and suffix_config: a kept
    Handoff needs no zeroing launch per call."""
    _, n_q_tiles, _ = suffix_tiling(query, key_cache, meta.seq_lens.shape[0], meta.max_query_len,
                                    meta.max_seq_len, 1, suffix_config)  # fmt: skip
    return Handoff.new(query, n_q_tiles * key_cache.shape[2], **knobs)


def _handoff(query, key_cache, value_cache, meta, softmax_scale, out, lse, prefix_args, prefix_kw,
             suffix_args, suffix_kw, prefix_attention, side_priority, handoff) -> None:
    """The "handoff" schedule (see relay_attention and handoff.py)."""
    side = side_stream(query.device, side_priority) if query.is_cuda else None
    if prefix_attention is not None:  # [1, ...] in the query dtype
        pre_state = external_state_buffers(query)
        suffix_kw["config"] = {**EXTERNAL_PREFIX_SUFFIX_CONFIG, **(suffix_kw["config"] or {})}
    else:
        f32 = dict(dtype=torch.float32, device=query.device)
        pre_state = (torch.empty((1,) + tuple(query.shape), **f32),
                     torch.empty(1, query.shape[1], query.shape[0], **f32))  # fmt: skip
    if suffix_kw["num_splits"] not in (None, 1):
        raise ValueError("the handoff schedule runs the suffix unsplit (suffix_splits 1)")
    suffix_kw["num_splits"] = 1
    handoff = handoff or handoff_buffers(query, key_cache, meta, suffix_kw["config"])
    with _forked(side) as fork:  # the prefix pass, then the finisher, on the side stream
        if prefix_attention is not None:
            external_prefix_state(prefix_attention, query, key_cache, value_cache, meta,
                                  softmax_scale, state=pre_state)  # fmt: skip
        else:
            relay_prefix(*prefix_args, out=pre_state[0][0], lse=pre_state[1][0], **prefix_kw)
        handoff_finish(query, key_cache, meta.query_start_loc, meta.seq_lens, meta.prefix_lens,
                       pre_state, handoff, out, lse, max_query_len=meta.max_query_len,
                       max_seq_len=meta.max_seq_len, config=suffix_kw["config"])  # fmt: skip
    paged_suffix(*suffix_args, out=out, lse=lse, return_lse=lse is not None,
                 prefix_state=pre_state, handoff=handoff, **suffix_kw)  # fmt: skip
    _join(fork)  # the finisher is done long before the suffix ends: nothing to wait for


# The suffix launch after an external prefix pass. HEAD_FASTEST (paged_suffix._suffix_config):
# on two H200s behind FA3's pass 0.3-1.7% faster on 5 GQA decode shapes and 0-1.9% on 2 MHA
# ones (benchmarks/results/kernels/prefix_overlap_h200_session15.md, runs 7-8); beside our own
# prefix kernel (PDL) it measured no faster on an H100.
EXTERNAL_PREFIX_SUFFIX_CONFIG = {"HEAD_FASTEST": True}


def _grouped_tokens(meta: RelayMetadata, num_tokens: int) -> torch.Tensor:
    """[num_tokens] bool: the token's request is in a group (no device sync)."""
    return torch.repeat_interleave(
        meta.prefix_lens > 0, meta.query_start_loc.diff(), output_size=num_tokens
    )


@contextlib.contextmanager
def _forked(side):
    """Run the block on `side` after everything queued so far on the current stream (None: no-op);
    yields the Fork (None without a side stream), whose join the caller calls. Buffers are
    allocated on the current stream beforehand and read there only after the join. The switches
    go through _launch.call: a recorded pipeline (replay.py) replays them."""
    if side is None:
        yield None
        return
    fork = Fork(side)
    call(fork.enter)
    try:
        yield fork
    finally:
        call(fork.leave)


def _join(fork: Fork | None) -> None:
    if fork is not None:
        call(fork.join)


def relay_attention_ref(
    query: torch.Tensor,  # [num_tokens, num_q_heads, head_size]
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_size]
    value_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_size]
    meta: RelayMetadata,
    softmax_scale: float,
    out: torch.Tensor | None = None,  # [num_tokens, num_q_heads, head_size]
    *,
    return_lse: bool = False,
    schedule: str = "auto",
    validate: bool | None = None,
    prefix_splits: int | None = None,
    suffix_splits: int | None = None,
    prefix_config: dict | None = None,
    suffix_config: dict | None = None,
    prefix_attention: PrefixAttention | None = None,
    side_priority: int = -1,
    handoff: Handoff | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """fp32 torch version of `relay_attention`: prefix, suffix and merge refs. Validates `meta`
    unless validate=False; the schedule and tuning arguments are accepted and ignored."""
    if validate is not False:
        meta.validate(query.shape[0], key_cache.shape[1])
    out = torch.empty_like(query) if out is None else out
    lse = torch.empty(query.shape[1], query.shape[0], dtype=torch.float32, device=query.device)
    f32 = torch.empty(query.shape, dtype=torch.float32, device=query.device)
    pre_out, pre_lse = relay_prefix_ref(
        query,
        key_cache,
        value_cache,
        meta.query_start_loc,
        meta.group_req_start,
        meta.group_req_end,
        meta.group_block_table,
        meta.group_prefix_len,
        softmax_scale,
        out=f32.clone(),
        group_token_index=meta.group_token_index,
    )
    suf_out, suf_lse = paged_suffix_ref(
        query,
        key_cache,
        value_cache,
        meta.query_start_loc,
        meta.seq_lens,
        meta.block_table,
        meta.prefix_lens,
        softmax_scale,
        out=f32.clone(),
    )
    merge_attn_states_ref(out, pre_out, pre_lse, suf_out, suf_lse, lse)
    return (out, lse) if return_lse else out


def plain_attention_ref(
    query: torch.Tensor,  # [num_tokens, num_q_heads, head_size]
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_size]
    value_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_size]
    query_start_loc: torch.Tensor,  # [num_reqs + 1] int32
    seq_lens: torch.Tensor,  # [num_reqs] int32
    block_table: torch.Tensor,  # [num_reqs, max_blocks] int32, full tables (prefix blocks included)
    softmax_scale: float,
    out: torch.Tensor | None = None,  # [num_tokens, num_q_heads, head_size]
    *,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Plain causal paged attention over each request's whole sequence (the concatenated KV): what
    relay attention must equal. fp32 math."""
    zeros = torch.zeros_like(seq_lens)
    out, lse = paged_suffix_ref(
        query,
        key_cache,
        value_cache,
        query_start_loc,
        seq_lens,
        block_table,
        zeros,
        softmax_scale,
        out=out,
        return_lse=return_lse,
    )
    return (out, lse) if return_lse else out
