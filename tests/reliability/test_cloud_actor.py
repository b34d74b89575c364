"""The cloud actor against a rogue or careless cluster member (a second CloudPromptService on
the suite's Ray cluster, with a small KV budget): only registered prompt ids and validated
parameters are accepted; thousands of distinct cloud prompts stay within the budget (LRU
eviction, pinned kept, evicted ones recomputed identically); concurrent registrations of one
prompt prefill it once."""

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import ray

from edgeprompt_vllm.fingerprint import Fingerprint

pytestmark = pytest.mark.slow
PROMPT_BYTES = 4 * 64 * 1024  # 64 shipped tokens x 4 layers x [2, 2 heads, 64] fp32
BUDGET = 8 * PROMPT_BYTES


@pytest.fixture(scope="module")
def cloud(stack):
    from edgeprompt_vllm.cloud.deploy import start_cloud_service

    actor = start_cloud_service(str(stack.model), name="limits", namespace=stack.namespace,
                                detached=False, num_cpus=0, block_size=32, max_kv_bytes=BUDGET)
    digest = Fingerprint.from_dict(ray.get(actor.stats.remote())["fingerprint"]).digest()
    ray.get(actor.register_prompt.remote("known", token_ids=list(range(100, 180)), prefill=True))
    yield actor, digest
    ray.kill(actor)


def refused(ref) -> str:
    with pytest.raises(ray.exceptions.RayTaskError) as err:
        ray.get(ref, timeout=30)
    return f"{type(err.value.cause).__name__}: {err.value.cause}"


def test_only_registered_ids_and_valid_parameters(cloud):
    actor, digest = cloud
    cases = [
        (actor.fetch_layer.remote("never-registered", digest, 0), "KeyError: \"unknown cloud prompt 'never-registered'"),
        (actor.fetch_layer.remote([3001, 3002, 3003], digest, 0), "TypeError: prompt_id must be a string"),
        (actor.fetch_layer.remote("known", "f" * 32, 0), "PermissionError: fingerprint digest does not match"),
        (actor.fetch_layer.remote("known", digest, "1"), "TypeError: layer must be an int"),
        (actor.fetch_layer.remote("known", digest, True), "TypeError: layer must be an int"),
        (actor.fetch_layer.remote("known", digest, 1.0), "TypeError: layer must be an int"),
        (actor.fetch_layer.remote("known", digest, -1), "IndexError: layer -1 outside 0..3"),
        (actor.fetch_layer.remote("known", digest, 10**12), "IndexError"),
        (actor.fetch_layer.remote("known", digest, 0, -5), "ValueError: timeout_s must be a positive"),
        (actor.fetch_layer.remote("known", digest, 0, "soon"), "ValueError: timeout_s must be a positive"),
        (actor.fetch_layers.remote("known", digest, list(range(1000))), "ValueError: layers must be a list of 1 to 4"),
        (actor.fetch_layers.remote("known", digest, [0, "1"]), "TypeError: layer must be an int"),
        (actor.fetch_layers.remote("known", digest, [0], "pickle"), "codec"),
        (actor.describe.remote("never-registered", digest), "KeyError"),
        (actor.describe.remote("known", None), "PermissionError"),
        (actor.registry.remote("0" * 32), "PermissionError"),
        (actor.catalog.remote(None), "PermissionError"),
    ]
    for ref, words in cases:
        assert words in refused(ref)
    reply = ray.get(actor.handshake.remote({"architecture": "x"}))
    assert not reply["ok"] and "malformed fingerprint" in reply["error"]
    reply = ray.get(actor.handshake.remote(["not", "a", "dict"]))
    assert not reply["ok"]
    # the actor is unharmed and serves a well-formed request
    header, (ref,) = ray.get(actor.fetch_layer.remote("known", digest, 3))
    assert header["layer"] == 3 and header["num_tokens"] == 64
    assert "known" in ray.get(actor.stats.remote())["store"]["prompts"]


def test_thousands_of_prompts_stay_within_the_budget(cloud):
    actor, digest = cloud
    n = 3000
    refs = [actor.register_prompt.remote(f"bulk-{i}", token_ids=[5 + i % 3000, *range(200, 263)])
            for i in range(n)]  # 64 tokens each, distinct first token
    ray.get(refs)
    ray.get(actor.register_prompt.remote("pinned", token_ids=list(range(900, 964)), pinned=True,
                                         prefill=True))
    rss0 = ray.get(actor.stats.remote())["rss_bytes"]
    peak = 0
    for i in range(0, n, n // 40):  # 40 prefills, each through an edge-style fetch
        ray.get(actor.fetch_layers.remote(f"bulk-{i}", digest, [0, 1, 2, 3]))
        if i == 0:
            first = ray.get(actor.describe.remote("bulk-0", digest))["checksums"]
        peak = max(peak, ray.get(actor.stats.remote())["store"]["bytes"])
    stats = ray.get(actor.stats.remote())
    assert stats["registered"] >= n + 2
    assert peak <= BUDGET and stats["store"]["bytes"] <= BUDGET
    assert stats["store"]["evictions"] >= 40 + 2 - BUDGET // PROMPT_BYTES
    assert stats["store"]["prompts"]["pinned"]["pinned"]
    assert "bulk-0" not in stats["store"]["prompts"]  # evicted long ago
    assert stats["rss_bytes"] - rss0 < 200 * 2**20, (rss0, stats["rss_bytes"])
    # an evicted prompt is recomputed on demand, bit for bit the same KV
    ray.get(actor.fetch_layers.remote("bulk-0", digest, [0, 1, 2, 3]))
    again = ray.get(actor.describe.remote("bulk-0", digest))
    assert again["state"] == "warm" and all(first) and again["checksums"] == first


def test_concurrent_registration_of_one_prompt(cloud):
    actor, digest = cloud
    prefills = ray.get(actor.stats.remote())["prefills"]
    same = list(range(1000, 1090))
    refs = [actor.register_prompt.remote("same", token_ids=same, prefill=True) for _ in range(16)]
    infos = ray.get(refs)
    assert all(i["num_tokens"] == 90 and i["shipped_tokens"] == 64 for i in infos)
    assert ray.get(actor.stats.remote())["prefills"] == prefills + 1  # computed once
    # two different token lists racing for one name: one wins, the others are told why
    a, b = list(range(1100, 1170)), list(range(1200, 1270))
    with ThreadPoolExecutor(16) as pool:
        outcomes = list(pool.map(lambda toks: _try(actor.register_prompt.remote("race", token_ids=toks)),
                                 [a, b] * 8))
    winner = ray.get(actor.describe.remote("race", digest))["token_ids"]
    assert winner in (a, b)
    for toks, outcome in zip([a, b] * 8, outcomes):
        if toks == winner:
            assert outcome == "ok"
        else:
            assert "already registered with other tokens" in outcome


def _try(ref) -> str:
    try:
        ray.get(ref, timeout=60)
        return "ok"
    except ray.exceptions.RayTaskError as e:
        return str(e.cause)


def test_the_actor_still_answers_quickly(cloud):
    actor, digest = cloud
    t0 = time.monotonic()
    ray.get(actor.fetch_layer.remote("known", digest, 0))
    assert time.monotonic() - t0 < 5
