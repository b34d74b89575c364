"""The batch's block table on the host without a device sync, for the relay builder's grouping.

Grouping needs each request's leading block ids on the host. Copying `block_table_tensor` to
the host waits for every kernel queued before it: vLLM runs the host one step ahead of the GPU
(async scheduling), and the copy stalls the host until the previous step ends (12-13 s of a
throughput pass's host time on the H100; 1.4-1.9 s without it, though the pass itself barely
changed: the GPU was the bottleneck). vLLM already has the ids on the host, where the
scheduler's output is applied:

- Model Runner V2 (vllm/v1/worker/gpu/block_table.py) stages block-id writes per request state
  and applies them on the device; it keeps no host table. We wrap `BlockTables.append_block_ids`
  to apply the same writes to a host mirror [max_num_reqs, max_blocks], and the runner's
  `prepare_attn` to note which request states the step's rows are (`idx_mapping_np`).
- The V1 runner (vllm/v1/worker/block_table.py) keeps a host copy whose rows are the batch's;
  we wrap `commit_block_table` to note it.

Each note is keyed by the device tensor the attention metadata will carry, so a builder only
ever uses the host rows of the very tensor it was given; anything else falls back to the copy.
EDGEPROMPT_CHECK_HOST_BLOCK_TABLE=1 compares every lookup with the device copy (syncs; tests).
"""

import os

import numpy as np
import torch

# device tensor's data_ptr -> (host table [N, W], rows of the batch [num_reqs] or None: the first rows)
_NOTES: dict[int, tuple[np.ndarray, np.ndarray | None]] = {}
_INSTALLED: list[str] = []
LOOKUPS = {"host_rows_noted": 0, "host_rows_copied": 0}  # device block tables: from a note / copied


def note(device_table: torch.Tensor, host_table: np.ndarray, rows: np.ndarray | None) -> None:
    _NOTES[device_table.data_ptr()] = (host_table, rows)


def is_noted(block_table_tensor: torch.Tensor, num_reqs: int) -> bool:
    """Whether `host_rows` can answer for the first `num_reqs` rows without a device copy."""
    if block_table_tensor.device.type == "cpu":
        return True
    found = _NOTES.get(block_table_tensor.data_ptr())
    return found is not None and (found[1] is None or len(found[1]) >= num_reqs)


def host_rows(block_table_tensor: torch.Tensor, num_blocks: np.ndarray) -> np.ndarray:
    """block_table_tensor [>= R, W] (device), num_blocks [R] blocks in use per request -> the
    first R rows on the host [R, max(num_blocks)], from a note if there is one. Entries past a
    row's own blocks are unspecified (vLLM leaves stale ids there too)."""
    num_reqs, width = len(num_blocks), int(num_blocks.max(initial=0))
    if block_table_tensor.device.type == "cpu":
        return block_table_tensor[:num_reqs, :width].numpy()
    if not is_noted(block_table_tensor, num_reqs):
        LOOKUPS["host_rows_copied"] += 1
        return block_table_tensor[:num_reqs, :width].cpu().numpy()
    LOOKUPS["host_rows_noted"] += 1
    host, rows = _NOTES[block_table_tensor.data_ptr()]
    table = host[:num_reqs, :width] if rows is None else host[rows[:num_reqs], :width]
    if os.environ.get("EDGEPROMPT_CHECK_HOST_BLOCK_TABLE") == "1":
        _check(table, block_table_tensor[:num_reqs, :width].cpu().numpy(), num_blocks)
    return table


def _check(host: np.ndarray, device: np.ndarray, num_blocks: np.ndarray) -> None:
    in_use = np.arange(host.shape[1])[None, :] < num_blocks[:, None]  # [R, W]
    bad = np.argwhere((host != device) & in_use)
    if len(bad):
        raise AssertionError(f"host block table differs from the device's at (row, col) {bad[:5].tolist()}")


def mirror_writes(block_tables, req_index: int, new_block_ids, overwrite: bool) -> None:
    """Apply MRV2's `append_block_ids` writes of KV-cache group 0 to the host mirror."""
    device_table = block_tables.block_tables[0].gpu  # [max_num_reqs, max_blocks]
    host = getattr(block_tables, "_edgeprompt_host", None)
    if host is None:
        host = block_tables._edgeprompt_host = np.zeros(tuple(device_table.shape), np.int32)
    ids = list(new_block_ids[0])
    per_kernel_block = getattr(block_tables, "blocks_per_kv_block", [1])[0]  # 0.26: kernel blocks
    if per_kernel_block > 1:
        ids = [b * per_kernel_block + k for b in ids for k in range(per_kernel_block)]
    if getattr(block_tables, "redirect_writes_to_null_block", False):  # 0.32
        ids = [0] * len(ids)
    end = int(block_tables.num_blocks.np[0, req_index])  # set by the wrapped call
    host[req_index, end - len(ids):end] = ids


def install() -> None:
    """Wrap the runners' methods (once per process). Harmless where a runner is absent."""
    if _INSTALLED:
        return
    _INSTALLED.append("done")
    _install_mrv2()
    _install_v1()


def _install_mrv2() -> None:
    try:
        from vllm.v1.worker.gpu.block_table import BlockTables
        from vllm.v1.worker.gpu.model_runner import GPUModelRunner
    except ImportError:
        return
    append, prepare = BlockTables.append_block_ids, GPUModelRunner.prepare_attn
    prepare_dummy = GPUModelRunner.prepare_dummy_attn

    def append_block_ids(self, req_index, new_block_ids, overwrite):
        append(self, req_index, new_block_ids, overwrite)
        if self.num_kv_cache_groups == 1:
            mirror_writes(self, req_index, new_block_ids, overwrite)

    def prepare_attn(self, input_batch):
        block_tables, slot_mappings = prepare(self, input_batch)
        host = getattr(self.block_tables, "_edgeprompt_host", None)
        if host is not None and self.pcp_manager is None and len(block_tables) == 1:
            note(block_tables[0], host, np.asarray(input_batch.idx_mapping_np))
        return block_tables, slot_mappings

    def prepare_dummy_attn(self, input_batch):  # dummy rows are not the mirror's: forget the note
        block_tables, slot_mappings = prepare_dummy(self, input_batch)
        for table in block_tables:
            _NOTES.pop(table.data_ptr(), None)
        return block_tables, slot_mappings

    BlockTables.append_block_ids = append_block_ids
    GPUModelRunner.prepare_attn, GPUModelRunner.prepare_dummy_attn = prepare_attn, prepare_dummy_attn


def _install_v1() -> None:
    try:
        from vllm.v1.worker.block_table import BlockTable
    except ImportError:
        return
    commit = BlockTable.commit_block_table

    def commit_block_table(self, num_reqs):
        commit(self, num_reqs)
        note(self.block_table.gpu, self.block_table.np, None)

    BlockTable.commit_block_table = commit_block_table
