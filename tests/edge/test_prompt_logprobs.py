"""A request that asks for prompt logprobs reads no cached KV in vLLM (skip_reading_prefix_cache),
so the connector loads nothing for it either: its prompt is computed on the edge (status
prefix_reuse_off) and its prompt logprobs match stock vLLM's. The blocks it computed serve the
next request from the prefix cache ("cached")."""

import random

import pytest
import torch
from edge.cloud_run import CLOUD_TOKENS, EDGE_TOKENS, run, tokens
from edge.tolerance import logprob_atol

pytestmark = pytest.mark.slow


def test_prompt_logprobs_request_is_computed_on_the_edge(tiny_model, tmp_path):
    rng = random.Random(5)
    A = tokens(rng, 100, CLOUD_TOKENS)
    first, second = A + tokens(rng, 12, EDGE_TOKENS), A + tokens(rng, 30, EDGE_TOKENS)
    rounds = [[{"token_ids": first, "cloud_prompt": "A", "prompt_logprobs": 1}],
              [{"token_ids": second, "cloud_prompt": "A"}]]
    stock = run(tiny_model, "stock", rounds, tmp_path)
    edge = run(tiny_model, "edge", rounds, tmp_path, cloud_prompts={"A": A})
    assert [s["status"] for s in edge["edgeprompt"]] == ["prefix_reuse_off", "cached"]
    assert edge["token_ids"] == stock["token_ids"]
    got, want = edge["prompt_logprobs"][0], stock["prompt_logprobs"][0]
    assert len(got) == len(first) and got[0] is None and None not in got[1:]
    atol = logprob_atol(torch.float32)
    assert all(abs(a - b) <= atol for a, b in zip(got[1:], want[1:]))
    assert edge["prompt_logprobs"][1] is None
