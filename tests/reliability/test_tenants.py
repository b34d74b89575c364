"""Tenant isolation of the edge's prefix cache with vLLM's `cache_salt`, with EdgePrompt on:
two tenants sending the same cloud prompt and the same edge prompt share no cached block, while
each tenant's own later requests do, and every answer is still stock vLLM's."""

import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
from reliability.calls import (
    assert_same_as_stock,
    client,
    complete,
    edge_text,
    status,
    stock_reference,
)

from edgeprompt_vllm.serving.prom import scrape, total

pytestmark = pytest.mark.slow
CLOUD = "f-tenant"


def cached_tokens(resp) -> int:
    details = resp.usage.prompt_tokens_details
    return details.cached_tokens if details else 0


def test_cache_salt_isolates_tenants_and_keeps_relay_exact(stack):
    edge = client(stack.edge)
    prompt = edge_text("shared question")  # the same private text for both tenants
    ref = stock_reference(stack, CLOUD, prompt)
    a, b = (f"tenant-{t}-{uuid.uuid4().hex[:8]}" for t in "ab")

    def ask(salt, text=prompt, reference=ref, max_tokens=12):
        r = complete(edge, stack.edge.model, text, cloud=CLOUD, max_tokens=max_tokens,
                     extra_body={"cache_salt": salt})
        assert_same_as_stock(r, reference)
        return r

    a1, a2, b1, b2 = ask(a), ask(a), ask(b), ask(b)
    assert status(a1)["status"] == "loaded"
    assert status(a2)["status"] == "cached"
    assert status(b1)["status"] == "loaded"  # tenant a's blocks were not offered to tenant b
    assert status(b2)["status"] == "cached"
    cloud_tokens = status(a1)["cloud_tokens"]
    # the first request of each tenant reuses only what it loaded from the cloud, nothing of the
    # other tenant's edge prompt; a tenant's second request reuses its own edge blocks too
    assert cached_tokens(a1) == cached_tokens(b1) == cloud_tokens
    assert cached_tokens(a2) > cloud_tokens and cached_tokens(b2) == cached_tokens(a2)
    # both tenants at once, three users each: relay attention groups each tenant's requests on
    # that tenant's own cloud blocks, and every answer is still stock vLLM's. Long answers, so
    # that the decodes overlap even when the 2 CPUs are busy with other work.
    groups_before = relay_groups(stack)
    tokens = 48
    texts = [edge_text(f"user {i}") for i in range(6)]
    refs = [stock_reference(stack, CLOUD, t, max_tokens=tokens) for t in texts]
    with ThreadPoolExecutor(6) as pool:
        got = list(pool.map(ask, [a, a, a, b, b, b], texts, refs, [tokens] * 6))
    assert all(status(r)["status"] == "cached" for r in got)
    deadline = time.monotonic() + 15  # the engine publishes its counters every few steps
    while relay_groups(stack) <= groups_before and time.monotonic() < deadline:
        time.sleep(0.5)
    assert relay_groups(stack) > groups_before


def relay_groups(stack) -> float:
    return total(scrape(stack.edge.base_url), "edgeprompt_relay_groups_total")
