"""graph_relay: relay launches fixed per batch size, the grouping in a persistent table.

The kernels run under the Triton interpreter; a "capture" here records nothing and replays the
same Python call, which is what matters for the table: launches made against an empty table
must compute the groups written into it afterwards (the GPU self-check captures a real CUDA
graph, tests/attention/test_relay_backend.py runs it inside vLLM)."""

import numpy as np
import pytest
import torch
from attention.decode_batch import SHARED, decode_batch
from edgeprompt_vllm.kernels.cost_model import GroupDecision

from edgeprompt_vllm.attention import graph_relay


def _no_capture(fn):
    return fn


def _frozen_launches(fn):
    """A CUDA graph's semantics on the CPU: run `fn` once recording its kernel launches (grid,
    every argument: pointers, ints, scratch buffers), then replay exactly those launches."""
    from edgeprompt_vllm.kernels.replay import LayerReplay

    marker = torch.zeros(1)
    replay = LayerReplay(lambda marker: fn())
    replay(marker=marker)
    assert replay.replaying and len(replay.launches) >= 2  # prefix pass, suffix (+ merge)
    return lambda: replay(marker=marker)


@pytest.mark.parametrize("capture", [_no_capture, _frozen_launches], ids=["eager", "frozen"])
@pytest.mark.parametrize("queries_per_kv,num_reqs", [(1, 8), (4, 8), (1, 3)])
def test_launches_over_an_empty_table_serve_the_groups_written_later(queries_per_kv, num_reqs,
                                                                     capture):
    """Sized as a GPU with 132 SMs sizes them for a 2048-token bound: 4 prefix splits (the
    2-block group's prefix has 1 tile: empty splits); with 3 requests the suffix is split too
    (forced here: the interpreter's launcher sees 4 SMs), then merged."""
    batch = graph_relay.self_check_batch(4 * queries_per_kv, 4, 64, 16, torch.float32, "cpu",
                                         num_reqs)
    launch = graph_relay.launch_kwargs(num_reqs, 4 * queries_per_kv, 4, 64, 2048, 132, pdl=False)
    assert launch["prefix_splits"] == 4
    if num_reqs < 8:
        launch["suffix_splits"] = 2
    assert graph_relay.run_self_check(batch, launch, 16, capture, max_seq_len=2048)


def test_the_check_fails_on_groups_the_blocks_do_not_share():
    """Request 6 shares only 2 of the group's 4 blocks: served the group's 4, it is wrong."""
    batch = graph_relay.self_check_batch(4, 4, 64, 16, torch.float32, "cpu")
    launch = graph_relay.launch_kwargs(8, 4, 4, 64, 2048, 132, pdl=False)
    batch["groups"] = [(list(range(7)), 64)]
    assert not graph_relay.run_self_check(batch, launch, 16, _no_capture, max_seq_len=2048)


def test_fill_rewrites_everything_and_lists_tokens_in_request_order():
    table = graph_relay.GraphRelayTable(max_reqs=6, max_tokens=6, max_blocks=4, device="cpu")
    qsl = np.arange(7)
    blocks = np.array([[7, 8, 1, 0], [9, 2, 0, 0], [7, 8, 3, 0], [9, 4, 0, 0], [5, 0, 0, 0],
                       [7, 8, 6, 0]])
    spans = table.fill(qsl, [([0, 2, 5], 32), ([1, 3], 16)], blocks, 16)
    assert spans == [(0, 3, 32), (3, 5, 16)]
    assert table.token_index[:5].tolist() == [0, 2, 5, 1, 3]
    assert table.prefix_lens.tolist() == [32, 16, 32, 16, 0, 32]
    assert table.group_block_table[:2, :2].tolist() == [[7, 8], [9, 0]]
    assert table.group_start.tolist() == [0, 3, 0, 0] and table.group_end.tolist() == [3, 5, 0, 0]
    table.fill(qsl, [], blocks, 16)  # a step with no groups leaves nothing behind
    assert not table.device_buffer[:int(table.offsets[-1])].any()  # (token list: read per group)


def test_every_table_segment_starts_16_byte_aligned():
    """Triton compiles a variant per pointer alignment: one at an odd offset would JIT a kernel
    mid-serving that the start-up warm-up never built."""
    table = graph_relay.GraphRelayTable(max_reqs=5, max_tokens=7, max_blocks=3, device="cpu")
    views = [table.prefix_lens, table.group_start, table.group_end, table.group_prefix_len,
             table.group_block_table, table.token_index]
    assert [v.numel() for v in views] == [5, 4, 4, 4, 12, 7]
    assert all(v.data_ptr() % 16 == 0 for v in views)
    spans = table.fill(np.array([0, 1, 2, 3, 4, 5]), [([1, 3], 16)], np.full((5, 3), 9), 16)
    assert spans == [(0, 2, 16)] and table.token_index[:2].tolist() == [1, 3]
    assert table.prefix_lens.tolist() == [0, 16, 0, 16, 0] and table.group_block_table[0, 0] == 9


def test_fill_refuses_more_groups_or_tokens_than_its_capacity():
    table = graph_relay.GraphRelayTable(max_reqs=4, max_tokens=4, max_blocks=2, device="cpu")
    with pytest.raises(ValueError, match="at most 4 groups"):
        table.fill(np.arange(5), [([r], 16) for r in range(5)], np.zeros((4, 2), np.int32), 16)
    with pytest.raises(ValueError, match="exceeds the table"):
        table.fill(np.arange(6), [], np.zeros((5, 2), np.int32), 16)


def test_strongest_groups_keeps_the_biggest_savings_in_batch_order():
    groups = [f"g{i}" for i in range(6)]
    saving = [1, 5, 0, 3, 4, 2]
    decisions = [GroupDecision(relay=i != 2, plain_s=s + 1.0, relay_s=1.0) for i, s in enumerate(saving)]
    assert graph_relay.strongest_groups(groups, decisions) == ["g1", "g3", "g4", "g5"]


def test_prefix_split_count_is_fixed_by_the_bounds():
    # one 64-row tile per KV head, 32 KV heads, 132 SMs: 5 programs per head would fill the GPU;
    # the fused epilogue caps the count at 4
    assert graph_relay.launch_kwargs(64, 32, 32, 128, 2048, 132, pdl=True) == dict(
        prefix_splits=4, suffix_config=None)
    assert graph_relay.launch_kwargs(256, 32, 32, 128, 2048, 132, pdl=False) == dict(
        prefix_splits=2, suffix_config=dict(PDL=False))


def test_write_step_groups_the_real_requests_of_a_padded_batch():
    from edgeprompt_vllm.kernels.cost_model import AttentionShape

    common, shared = decode_batch(), SHARED
    table = graph_relay.GraphRelayTable(max_reqs=12, max_tokens=12, max_blocks=70, device="cpu")
    shape = AttentionShape(num_q_heads=32, num_kv_heads=32, head_size=128, dtype_bytes=2)
    spans = graph_relay.write_step(table, common, 16, shape, max_group_query_len=16)
    assert spans == [(0, 6, 1024)]  # the short prefix is left plain by the cost model
    assert table.token_index[:6].tolist() == [0, 2, 4, 5, 6, 7]
    assert table.prefix_lens.tolist() == [1024, 0, 1024, 0] + [1024] * 4 + [0] * 4  # padding: 0
    assert table.group_block_table[0, :64].tolist() == shared


def test_write_step_groups_nothing_without_host_block_ids(monkeypatch):
    """Where the runner keeps no host copy of the block ids, the table is cleared, not synced."""
    from edgeprompt_vllm.kernels.cost_model import AttentionShape

    from edgeprompt_vllm.attention import host_block_table

    common = decode_batch()
    table = graph_relay.GraphRelayTable(max_reqs=12, max_tokens=12, max_blocks=70, device="cpu")
    shape = AttentionShape(num_q_heads=32, num_kv_heads=32, head_size=128, dtype_bytes=2)
    assert graph_relay.write_step(table, common, 16, shape, 16) == [(0, 6, 1024)]
    monkeypatch.setattr(host_block_table, "is_noted", lambda *_: False)
    assert graph_relay.write_step(table, common, 16, shape, 16) == []
    assert not table.prefix_lens.any() and not table.group_end.any()
