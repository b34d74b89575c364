"""The handoff schedule (kernels/handoff.py) against plain attention over the whole KV.

On the CPU one kernel's programs all run before the next kernel's, so the two orders the GPU can
produce per item are tested one at a time: the finisher first (every suffix program folds the
prefix state in; the side stream's order, relay_attention on the CPU) and the suffix first (every
grouped program defers, the finisher merges).
"""

import pytest
import torch
from edgeprompt_vllm.kernels import _launch, plain_attention_ref, relay_attention
from edgeprompt_vllm.kernels.external_prefix import external_state_buffers, prefix_attention_ref
from edgeprompt_vllm.kernels.handoff import Handoff, handoff_finish
from edgeprompt_vllm.kernels.paged_suffix import paged_suffix, suffix_tiling
from edgeprompt_vllm.kernels.relay_prefix import relay_prefix

WORKLOADS = {
    "decode_gqa4_two_groups": dict(queries_per_kv=4, query_lens=[1] * 5,
                                   own_lens=[37, 17, 70, 3, 9], groups=[(0, 3, 64), (3, 5, 32)]),
    # ungrouped requests take no part in the handoff; query tiles of several tokens (prefill
    # chunks after the cloud prompt): several programs per request
    "ungrouped_and_chunks_bf16": dict(dtype=torch.bfloat16, query_lens=[1, 19, 1, 3, 1],
                                      own_lens=[5, 20, 33, 8, 40], groups=[(1, 3, 48)]),
    "fp32_block32_mha": dict(dtype=torch.float32, block_size=32, query_lens=[1, 1, 1],
                             own_lens=[40, 1, 70], groups=[(0, 3, 64)]),
}  # fmt: skip


def _plain(batch):
    m = batch.meta
    return plain_attention_ref(batch.query, batch.key_cache, batch.value_cache,
                               m.query_start_loc, m.seq_lens, m.block_table, batch.scale,
                               return_lse=True)  # fmt: skip


def _grouped_rows(batch) -> torch.Tensor:
    """[num_tokens] bool: the token's request has a prefix."""
    m = batch.meta
    return torch.repeat_interleave(m.prefix_lens > 0, m.query_start_loc.diff())


@pytest.mark.parametrize("external", [False, True], ids=["our_prefix", "external_prefix"])
@pytest.mark.parametrize("name", list(WORKLOADS))
def test_handoff_schedule_equals_plain_attention(name, external, make_batch, poisoned,
                                                 check_attention, monkeypatch):  # fmt: skip
    """relay_attention(schedule="handoff"): on the CPU the finisher runs before the suffix."""
    batch = make_batch(seed=300 + list(WORKLOADS).index(name), **WORKLOADS[name])
    launched = []
    monkeypatch.setattr(_launch, "RECORDER", lambda kernel, grid, kw, compiled:
                        launched.append(getattr(kernel, "fn", kernel).__name__))  # fmt: skip
    got = relay_attention(
        batch.query, batch.key_cache, batch.value_cache, batch.meta, batch.scale,
        out=poisoned(batch.query), return_lse=True, schedule="handoff",
        prefix_attention=prefix_attention_ref if external else None,
    )  # fmt: skip
    check_attention(got, _plain(batch), batch.query.dtype)
    # the finisher sits between the prefix pass and the suffix; no merge kernel after them
    assert launched[-2:] == ["_handoff_finish_kernel", "_paged_suffix_kernel"]
    kept = _new_handoff(batch)  # the caller's buffers, as a recorded launch keeps them
    for _ in range(2):
        again = relay_attention(
            batch.query, batch.key_cache, batch.value_cache, batch.meta, batch.scale,
            out=poisoned(batch.query), return_lse=True, schedule="handoff", handoff=kept,
            prefix_attention=prefix_attention_ref if external else None,
        )  # fmt: skip
        check_attention(again, _plain(batch), batch.query.dtype)
        assert not kept.counters.any()


def _prefix_state(batch):
    """Our prefix pass's state as paged_suffix's one-part prefix_state."""
    m, q = batch.meta, batch.query
    pre = (torch.empty((1,) + tuple(q.shape)), torch.empty(1, q.shape[1], q.shape[0]))
    relay_prefix(q, batch.key_cache, batch.value_cache, m.query_start_loc, m.group_req_start,
                 m.group_req_end, m.group_block_table, m.group_prefix_len, batch.scale,
                 out=pre[0][0], lse=pre[1][0], max_group_query_len=m.max_group_query_len,
                 max_prefix_len=m.max_prefix_len)  # fmt: skip
    return pre


def _new_handoff(batch, finish_programs=None) -> Handoff:
    m, q = batch.meta, batch.query
    _, n_q_tiles, _ = suffix_tiling(q, batch.key_cache, m.seq_lens.shape[0], m.max_query_len,
                                    m.max_seq_len, 1)  # fmt: skip
    return Handoff.new(q, n_q_tiles * batch.key_cache.shape[2], finish_programs)


def _run(batch, order: str, out, lse, handoff=None):
    """The suffix launch and its finisher in `order` ("suffix_first" / "finisher_first");
    returns the handoff buffers and what `out` held between the two launches."""
    m, q = batch.meta, batch.query
    pre = _prefix_state(batch)
    handoff = handoff or _new_handoff(batch)
    bounds = dict(max_query_len=m.max_query_len, max_seq_len=m.max_seq_len)

    def suffix():
        paged_suffix(q, batch.key_cache, batch.value_cache, m.query_start_loc, m.seq_lens,
                     m.block_table, m.prefix_lens, batch.scale, out=out, lse=lse,
                     prefix_state=pre, handoff=handoff, **bounds)  # fmt: skip

    def finish():
        handoff_finish(q, batch.key_cache, m.query_start_loc, m.seq_lens, m.prefix_lens, pre,
                       handoff, out, lse, **bounds)  # fmt: skip

    first, second = (suffix, finish) if order == "suffix_first" else (finish, suffix)
    first()
    between = out.clone()
    second()
    return handoff, between


@pytest.mark.parametrize("order", ["suffix_first", "finisher_first"])
@pytest.mark.parametrize("name", list(WORKLOADS))
def test_either_arrival_order_gives_plain_attention(name, order, make_batch, poisoned,
                                                    check_attention):  # fmt: skip
    batch = make_batch(seed=310 + list(WORKLOADS).index(name), **WORKLOADS[name])
    out = poisoned(batch.query)
    lse = poisoned(batch.query, (batch.query.shape[1], batch.query.shape[0]), torch.float32)
    handoff, between = _run(batch, order, out, lse)
    check_attention((out, lse), _plain(batch), batch.query.dtype)
    grouped = _grouped_rows(batch)
    unwritten = torch.isnan(between).flatten(1).all(1)  # [num_tokens]
    if order == "suffix_first":  # grouped rows deferred to the finisher, the rest written
        assert torch.equal(unwritten, grouped)
    else:  # the finisher, first, wrote nothing
        assert bool(unwritten.all())
    # both counters of every item back at zero: the buffers serve the next call as they are
    assert not handoff.counters.any()


@pytest.mark.parametrize("finish_programs", [1, 3, 64])  # one walks every item; one per item
def test_kept_buffers_serve_call_after_call_in_any_order(finish_programs, make_batch, poisoned,
                                                         check_attention):  # fmt: skip
    """One Handoff for several layers' calls (as a recorded launch reuses it), the finisher's
    programs walking several items each: the counters end every call at zero."""
    shape = WORKLOADS["ungrouped_and_chunks_bf16"]
    handoff = None
    for layer, order in enumerate(["suffix_first", "finisher_first", "suffix_first"]):
        batch = make_batch(seed=340 + layer, **shape)
        handoff = handoff or _new_handoff(batch, finish_programs)
        out = poisoned(batch.query)
        lse = poisoned(batch.query, (batch.query.shape[1], batch.query.shape[0]), torch.float32)
        _run(batch, order, out, lse, handoff)
        check_attention((out, lse), _plain(batch), batch.query.dtype)
        assert not handoff.counters.any()


def test_handoff_finisher_leaves_an_item_to_a_suffix_program_that_has_not_arrived(make_batch):
    """Arrival counts are per item: an item whose suffix program has not come leaves the finisher
    nothing to merge, whatever other items did."""
    batch = make_batch(seed=320, **WORKLOADS["decode_gqa4_two_groups"])
    m, q = batch.meta, batch.query
    pre = external_state_buffers(q)
    pre[0].zero_()
    pre[1].zero_()
    _, n_q_tiles, _ = suffix_tiling(q, batch.key_cache, m.seq_lens.shape[0], 1, m.max_seq_len, 1)
    handoff = Handoff.new(q, n_q_tiles * batch.key_cache.shape[2])
    out = torch.full_like(q, 7.0)
    handoff_finish(q, batch.key_cache, m.query_start_loc, m.seq_lens, m.prefix_lens, pre,
                   handoff, out, None, max_query_len=1, max_seq_len=m.max_seq_len)  # fmt: skip
    assert bool((out == 7.0).all())
    n_items = handoff.counters.numel() // 2
    assert handoff.counters[:n_items].tolist() == [1] * n_items  # every item: finisher came
    assert not handoff.counters[n_items:].any()


def test_handoff_refuses_a_split_suffix_and_a_missing_prefix_state(make_batch):
    batch = make_batch(seed=330, **WORKLOADS["fp32_block32_mha"])
    m, q = batch.meta, batch.query
    args = (q, batch.key_cache, batch.value_cache, m.query_start_loc, m.seq_lens, m.block_table,
            m.prefix_lens, batch.scale)  # fmt: skip
    handoff = Handoff.new(q, q.shape[0] * batch.key_cache.shape[2])
    with pytest.raises(ValueError, match="unsplit"):
        paged_suffix(*args, prefix_state=_prefix_state(batch), handoff=handoff, num_splits=2)
    with pytest.raises(ValueError, match="needs the prefix_state"):
        paged_suffix(*args, handoff=handoff)
    with pytest.raises(ValueError, match="handoff.counters"):
        paged_suffix(*args, prefix_state=_prefix_state(batch), handoff=Handoff.new(q, 1))
    with pytest.raises(ValueError, match="unsplit"):
        relay_attention(q, batch.key_cache, batch.value_cache, m, batch.scale,
                        schedule="handoff", suffix_splits=2)  # fmt: skip
