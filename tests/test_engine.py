"""A real vLLM engine on the tiny model: the plugin loads in every process; greedy is repeatable."""

import json

import pytest

from helpers import plugin_processes, run_script

PROMPTS = ["The capital of France is", "Write a short poem about the sea.", "1, 2, 3, 4,"]


@pytest.mark.slow
def test_plugin_loads_in_every_process_and_greedy_repeats(tiny_model, tmp_path):
    runs = []
    for i in range(2):
        trace = tmp_path / f"trace{i}"
        runs.append(run_script("greedy_generate.py", str(tiny_model), json.dumps(PROMPTS),
                               env={"EDGEPROMPT_PLUGIN_TRACE_DIR": str(trace)}))
        procs = plugin_processes(trace)
        # The `LLM` process, the engine core and the (one) worker each ran register() once.
        assert procs == ["EngineCore", "MainProcess", "VllmWorker-0"], procs
    first, second = runs
    assert all(len(t) == 24 for t in first["token_ids"])
    assert first["token_ids"] == second["token_ids"]
    assert first["logprobs"] == second["logprobs"]
    # Random weights still give varied text, not one repeated token.
    assert all(len(set(t)) > 8 for t in first["token_ids"])
