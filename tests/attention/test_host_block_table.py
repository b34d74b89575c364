"""The host mirror of the runners' block tables (the relay builder's sync-free grouping input).

vLLM's Model Runner V2 BlockTables needs CUDA (pinned buffers), so these tests drive the mirror
with a neighbour that stages writes the way vLLM 0.26's does; the GPU end-to-end test
(test_relay_backend.py) checks every lookup against the real device table.
"""

import types

import numpy as np
import pytest
import torch

from edgeprompt_vllm.attention import host_block_table as hbt


class StagedBlockTables:
    """vLLM 0.26 MRV2 BlockTables' append_block_ids semantics, on a CPU tensor."""

    def __init__(self, max_reqs: int, max_blocks: int, blocks_per_kv_block: int = 1):
        self.num_kv_cache_groups = 1
        self.blocks_per_kv_block = [blocks_per_kv_block]
        self.block_tables = [types.SimpleNamespace(gpu=torch.full((max_reqs, max_blocks), -1, dtype=torch.int32))]
        self.num_blocks = types.SimpleNamespace(np=np.zeros((1, max_reqs), np.int32))

    def append_block_ids(self, req_index, new_block_ids, overwrite):
        start = 0 if overwrite else int(self.num_blocks.np[0, req_index])
        ids = [b * self.blocks_per_kv_block[0] + k for b in new_block_ids[0]
               for k in range(self.blocks_per_kv_block[0])]
        self.block_tables[0].gpu[req_index, start:start + len(ids)] = torch.tensor(ids, dtype=torch.int32)
        self.num_blocks.np[0, req_index] = start + len(ids)
        hbt.mirror_writes(self, req_index, new_block_ids, overwrite)


@pytest.mark.parametrize("blocks_per_kv_block", [1, 2])
def test_mirror_follows_appends_overwrites_and_reused_rows(blocks_per_kv_block):
    rng = np.random.default_rng(0)
    tables = StagedBlockTables(max_reqs=6, max_blocks=40, blocks_per_kv_block=blocks_per_kv_block)
    for _ in range(200):  # new requests (overwrite, often of a freed row) and decode growth
        req = int(rng.integers(6))
        overwrite = bool(rng.random() < 0.3) or tables.num_blocks.np[0, req] == 0
        room = (40 - (0 if overwrite else tables.num_blocks.np[0, req])) // blocks_per_kv_block
        n = int(rng.integers(0, min(4, room) + 1))
        tables.append_block_ids(req, (rng.integers(1, 1000, n).tolist(),), overwrite)
    device = tables.block_tables[0].gpu.numpy()
    for req in range(6):
        n = tables.num_blocks.np[0, req]
        np.testing.assert_array_equal(tables._edgeprompt_host[req, :n], device[req, :n])


def test_a_cpu_table_is_read_directly():  # the CPU runner's block table lives on the host
    table = torch.arange(5 * 8, dtype=torch.int32).reshape(5, 8)
    np.testing.assert_array_equal(hbt.host_rows(table, np.array([3, 1])), table[:2, :3].numpy())


class DeviceLikeTensor:
    """A stand-in for a CUDA tensor: a data pointer, a device type and a slow host copy."""

    def __init__(self, values: np.ndarray):
        self.values, self.device = values, types.SimpleNamespace(type="cuda")
        self.copies = 0

    def data_ptr(self):
        return id(self)

    def __getitem__(self, index):
        outer = self

        class Copy:
            def cpu(self):
                outer.copies += 1
                return torch.from_numpy(outer.values[index])
        return Copy()


def test_lookups_use_the_note_fall_back_to_a_copy_and_check_when_asked(monkeypatch):
    monkeypatch.setattr(hbt, "_NOTES", {})
    host = np.arange(4 * 6, dtype=np.int32).reshape(4, 6)
    rows = np.array([2, 1, 3])
    device = DeviceLikeTensor(host[rows])  # what gather_block_tables would produce
    unnoted = DeviceLikeTensor(host[rows])

    hbt.note(device, host, rows)
    np.testing.assert_array_equal(hbt.host_rows(device, np.array([4, 2, 3])), host[rows, :4])
    assert device.copies == 0
    np.testing.assert_array_equal(hbt.host_rows(unnoted, np.array([4, 2, 3])), host[rows, :4])
    assert unnoted.copies == 1
    hbt.note(unnoted, host, rows[:2])  # a note for fewer rows than asked is not used
    hbt.host_rows(unnoted, np.array([4, 2, 3]))
    assert unnoted.copies == 2

    monkeypatch.setenv("EDGEPROMPT_CHECK_HOST_BLOCK_TABLE", "1")
    hbt.host_rows(device, np.array([4, 2, 3]))  # equal: passes, after one checking copy
    assert device.copies == 1
    host[1, 3] += 1  # past request 1's blocks (row 1 of the batch is state 1: 2 blocks): unchecked
    hbt.host_rows(device, np.array([4, 2, 3]))
    host[1, 0] += 1  # the mirror went wrong
    with pytest.raises(AssertionError, match="differs from the device"):
        hbt.host_rows(device, np.array([4, 2, 3]))


def test_v1_note_without_rows_means_the_first_rows(monkeypatch):
    monkeypatch.setattr(hbt, "_NOTES", {})
    host = np.arange(4 * 6, dtype=np.int32).reshape(4, 6)
    device = DeviceLikeTensor(host)
    hbt.note(device, host, None)
    np.testing.assert_array_equal(hbt.host_rows(device, np.array([5, 1])), host[:2, :5])
    assert device.copies == 0
