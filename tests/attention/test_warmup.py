"""The start-up warm-up of the relay kernels: its ladders, and a small run on the CPU."""

import torch

from edgeprompt_vllm.attention.warmup import _decode_batch, _ladder, warm_up_relay_kernels


def test_ladder_covers_powers_of_two_and_midpoints_up_to_the_limit():
    assert _ladder(1) == [1]
    assert _ladder(12) == [1, 2, 3, 4, 6, 8, 12]
    assert _ladder(1024)[-3:] == [512, 768, 1024]


def test_decode_batch_is_one_group_over_shared_then_own_blocks():
    meta = _decode_batch(num_reqs=3, prefix_blocks=2, own=40, own_start=5, block_size=16,
                         device="cpu")
    assert meta.block_table.tolist() == [[0, 1, 5, 6, 7]] * 3
    assert meta.seq_lens.tolist() == [72] * 3 and meta.prefix_lens.tolist() == [32] * 3
    assert (meta.num_groups, meta.max_prefix_len, meta.max_query_len) == (1, 32, 1)


def test_warm_up_runs_every_ladder_shape():
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # CPU: TRITON_INTERPRET
    calls, seconds = warm_up_relay_kernels(
        num_q_heads=4, num_kv_heads=2, head_size=64, block_size=16, dtype=torch.float16,
        device=device, max_num_seqs=2, max_model_len=96)
    # requests {1, 2} x prefix blocks {1, 2, 4; 3 = half the length} x own lengths {1, 48}
    assert calls == 2 * 4 * 2 and seconds > 0


def test_warm_up_with_an_external_prefix_runs_each_shape_three_times(monkeypatch):
    """Once with our prefix pass, then folding in a prefix state in the query dtype (FA3's),
    before the suffix kernel and beside it ("handoff"): the suffix kernel's variants for those and
    the handoff's finisher are compiled too."""
    from edgeprompt_vllm.kernels import _launch

    launched = set()
    monkeypatch.setattr(_launch, "RECORDER", lambda kernel, grid, kw, compiled: launched.add(
        (getattr(kernel, "fn", kernel).__name__, kw.get("HANDOFF"))))  # fmt: skip
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    calls, _ = warm_up_relay_kernels(
        num_q_heads=4, num_kv_heads=2, head_size=64, block_size=16, dtype=torch.float16,
        device=device, max_num_seqs=2, max_model_len=96, external_prefix=True)
    assert calls == 3 * (2 * 4 * 2)
    assert {("_handoff_finish_kernel", None), ("_paged_suffix_kernel", True),
            ("_paged_suffix_kernel", False)} <= launched
