"""A vLLM-shaped decode batch for the graph-relay tests, padded as vLLM pads a FULL graph's."""

import torch

SHARED = list(range(100, 164))  # 64 blocks of 16: a 1024-token cloud prompt


class Common:
    """The CommonAttentionMetadata fields the graph-relay code reads, as vLLM builds them for a
    FULL graph: `num_reqs` padded, padding rows with no query token and sequence length 0."""

    def __init__(self, seq_lens: list[int], block_rows: list[list[int]], padded_reqs: int):
        real = len(seq_lens)
        self.num_reqs = padded_reqs
        qsl = list(range(real + 1)) + [real] * (padded_reqs - real)  # vLLM's padding
        self.query_start_loc_cpu = torch.tensor(qsl, dtype=torch.int32)
        self.query_start_loc = self.query_start_loc_cpu.clone()
        self.seq_lens = torch.tensor(seq_lens + [0] * (padded_reqs - real), dtype=torch.int32)
        width = max(len(r) for r in block_rows)
        rows = [r + [0] * (width - len(r)) for r in block_rows] + [[0] * width] * (padded_reqs - real)
        self.block_table_tensor = torch.tensor(rows, dtype=torch.int32)
        self.max_query_len = 1
        self.num_actual_tokens = real


def decode_batch() -> Common:
    """8 decode requests padded to 12: requests 0 and 2-7 share SHARED (1024 tokens), 1 and 3
    share 1 block (16 tokens: not worth a prefix pass)."""
    short = [7]
    rows = [SHARED + [1, 2], short + [3], SHARED + [4], short + [5, 6]] + \
        [SHARED + [10 + r] for r in range(4)]
    seq_lens = [1024 + 20, 16 + 10, 1024 + 5, 16 + 30] + [1024 + 1 + r for r in range(4)]
    return Common(seq_lens, rows, padded_reqs=12)
