"""bench/profile.py without a server: the head of a real torch profiler table, the serve flags."""

import json

import torch

from edgeprompt_vllm.bench import profile


def test_table_head_keeps_the_header_and_the_first_rows():
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            torch.mm(torch.ones(64, 64), torch.ones(64, 64)).relu().sum()
    text = prof.key_averages().table(sort_by="self_cpu_time_total")
    head = profile.table_head(text, rows=2)
    assert any("Name" in line for line in head[:3])  # the column header
    rows = head[head.index(next(x for x in head if "Name" in x)) + 2:]
    assert len(rows) == 2 and all(not set(r.strip()) <= {"-", " "} for r in rows)
    assert any("aten::" in r for r in rows)  # real ops, the most expensive first
    assert len(profile.table_head(text)) > len(head)


def test_server_flags_configure_vllms_torch_profiler(tmp_path):
    flag, config = profile.server_flags(tmp_path)
    assert flag == "--profiler-config"
    assert json.loads(config) == {"profiler": "torch", "torch_profiler_dir": str(tmp_path),
                                  "torch_profiler_with_stack": False, "ignore_frontend": True}
