"""CloudPromptService on a local Ray cluster (its vLLM engine runs in the actor's process):
handshake, describe, cold streaming, warm fetches, LRU with pinning, clear errors."""

import dataclasses
import uuid

import pytest
import ray

from edgeprompt_vllm.config import EdgePromptConfig
from edgeprompt_vllm.fingerprint import FingerprintMismatch, model_fingerprint
from edgeprompt_vllm.transport.client import CloudClient, UnknownCloudPrompt

pytestmark = pytest.mark.slow
BS = 32


@pytest.fixture(scope="module")
def cloud(tiny_model):
    from edgeprompt_vllm.cloud.deploy import start_cloud_service

    ns = f"ep-cloud-test-{uuid.uuid4().hex[:8]}"
    ray.init(address="local", namespace=ns, include_dashboard=False, num_cpus=2, log_to_driver=False)
    try:
        # Room for two 96-token prompts: 4 layers x [2, 96, 2, 64] fp32 = 393216 B each
        actor = start_cloud_service(str(tiny_model), name="cloud", namespace=ns, detached=False,
                                    num_cpus=0, block_size=BS, max_kv_bytes=2 * 393216)
        yield actor, ns
    finally:
        ray.shutdown()


def client(tiny_model, ns, **fp_changes):
    fp = dataclasses.replace(model_fingerprint(tiny_model, "float32", BS), **fp_changes)
    return CloudClient.connect(EdgePromptConfig(namespace=ns, actor_name="cloud",
                                                connect_timeout_s=30, fetch_timeout_s=30), fp)


def test_handshake_refuses_another_model(cloud, tiny_model):
    _, ns = cloud
    with pytest.raises(FingerprintMismatch, match="block_size: 32 != 64"):
        client(tiny_model, ns, block_size=64)
    with pytest.raises(FingerprintMismatch, match="weights"):
        client(tiny_model, ns, weights="f" * 64)


def test_cold_prompt_streams_then_serves_warm(cloud, tiny_model):
    actor, ns = cloud
    ray.get(actor.register_prompt.remote("cold", token_ids=list(range(10, 110))))
    c = client(tiny_model, ns)
    assert "cold" in {p.prompt_id for p in c.registry()}
    assert c.describe("cold")["state"] == "cold"
    stream = c.fetch_layers("cold", range(4))
    kvs = [stream.result(l, 60)[1] for l in range(4)]
    assert all(kv.shape == (2, 96, 2, 64) for kv in kvs)
    # Layers arrived in order while the prefill ran, each with its cloud compute time.
    assert all(stream.timings[l]["cloud_compute_s"] > 0 for l in range(4))
    d = c.describe("cold")
    assert d["state"] == "warm" and d["shipped_tokens"] == 96 and d["num_layers"] == 4
    assert d["bytes_per_layer"] == kvs[0].numel() * 4 and all(d["checksums"])
    warm = c.fetch_layers("cold", [3]).result(3, 30)
    assert warm[1].equal(kvs[3]) and ray.get(actor.stats.remote())["prefills"] == 1


def test_unknown_prompt_and_bad_layers_are_refused_on_the_edge(cloud, tiny_model):
    _, ns = cloud
    c = client(tiny_model, ns)
    c.registry()
    with pytest.raises(UnknownCloudPrompt):
        c.fetch_layers("never-registered", [0])
    with pytest.raises(ValueError, match="outside"):
        c.fetch_layers("cold", [4])


def test_lru_evicts_unpinned_and_keeps_pinned(cloud):
    actor, _ = cloud
    ray.get(actor.register_prompt.remote("pinned", token_ids=list(range(200, 300)), pinned=True,
                                         prefill=True))
    for i in range(3):
        ray.get(actor.register_prompt.remote(f"u{i}", token_ids=list(range(300 + i, 400 + i)),
                                             prefill=True))
    store = ray.get(actor.stats.remote())["store"]
    assert store["bytes"] <= store["max_bytes"] and store["evictions"] >= 2
    assert "pinned" in store["prompts"] and "u2" in store["prompts"]
    assert "u0" not in store["prompts"]  # least recently used; recomputed if fetched again


def test_chat_system_prompt_is_a_template_prefix(cloud):
    actor, _ = cloud
    r = ray.get(actor.register_chat_system.remote("chat", "You are a terse assistant. " * 20))
    assert r["num_tokens"] > 32 and r["shipped_tokens"] == r["num_tokens"] // BS * BS
