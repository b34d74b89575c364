"""A request with a LoRA adapter is computed on the edge: the cloud runs the base model, and an
adapter changes every layer's K and V. Before this, such a request loaded the base model's KV
and answered other tokens than stock vLLM with the adapter, with status "loaded"."""

import random

import pytest
from edge.cloud_run import CLOUD_TOKENS, EDGE_TOKENS, run, tokens
from edge.lora_adapter import make_lora_adapter

pytestmark = pytest.mark.slow


def test_adapter_requests_are_computed_on_the_edge_and_match_stock(tiny_model, tmp_path):
    """Base and adapter requests in separate rounds: vLLM 0.32's CPU build answers a base request
    decoded in one batch with an adapter request wrongly (stock alone, seen here)."""
    rng = random.Random(3)
    A = tokens(rng, 100, CLOUD_TOKENS)
    base, other = A + tokens(rng, 9, EDGE_TOKENS), A + tokens(rng, 40, EDGE_TOKENS)
    rounds = [[{"token_ids": base, "cloud_prompt": "A"}],  # loads the cloud prompt
              [{"token_ids": base, "cloud_prompt": "A", "lora": True},  # same prompt, adapter
               {"token_ids": other, "cloud_prompt": "A", "lora": True}]]
    lora = str(make_lora_adapter(tiny_model, tmp_path / "adapter"))
    stock = run(tiny_model, "stock", rounds, tmp_path, lora=lora)
    assert stock["token_ids"][0] != stock["token_ids"][1]  # the adapter changes the answer
    edge = run(tiny_model, "edge", rounds, tmp_path, lora=lora, cloud_prompts={"A": A})
    statuses = [s["status"] for s in edge["edgeprompt"]]
    # the third may find the second's adapter blocks in the prefix cache, or compute them too
    assert statuses[:2] == ["loaded", "lora_adapter"] and statuses[2] in ("lora_adapter", "cached")
    assert edge["token_ids"] == stock["token_ids"]
