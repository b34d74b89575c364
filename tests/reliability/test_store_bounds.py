"""The cloud's KV store (cloud/store.py) under thousands of distinct prompts, without Ray or
vLLM: its bytes never exceed the budget once a prompt completes, pinned and incomplete prompts
are never evicted, the least recently used go first, and concurrent use keeps the accounting."""

import random
import threading

from edgeprompt_vllm.cloud.store import PromptStore
from edgeprompt_vllm.transport.wire import LayerHeader

LAYERS = 4


def header(pid: str, layer: int, tokens: int) -> LayerHeader:
    return LayerHeader(pid, layer, tokens, 2, 64, "float32", "x")


def fill(store: PromptStore, pid: str, tokens: int, pinned: bool = False):
    kv, created = store.start(pid, LAYERS, pinned)
    if created:
        for layer in range(LAYERS):
            store.fill(kv, layer, header(pid, layer, tokens), object())
    return kv


def test_thousands_of_prompts_stay_within_the_budget():
    per_prompt = LAYERS * header("p", 0, 64).nbytes
    store = PromptStore(max_bytes=50 * per_prompt)
    fill(store, "pinned", 64, pinned=True)
    rng = random.Random(0)
    for i in range(5000):
        pid = f"p{rng.randrange(3000)}"  # repeats: LRU hits among thousands of distinct ids
        fill(store, pid, 64)
        assert store.summary()["bytes"] <= store.max_bytes
    s = store.summary()
    assert "pinned" in s["prompts"] and len(s["prompts"]) == 50
    assert s["evictions"] >= 2000


def test_lru_order_and_incomplete_prompts_are_kept():
    per_prompt = LAYERS * header("p", 0, 32).nbytes
    store = PromptStore(max_bytes=3 * per_prompt)
    for pid in ("a", "b", "c"):
        fill(store, pid, 32)
    store.get("a")  # a is now the most recently used
    computing, _ = store.start("computing", LAYERS, False)  # no layer yet
    store.fill(computing, 0, header("computing", 0, 32), object())
    fill(store, "d", 32)
    prompts = store.summary()["prompts"]
    assert "b" not in prompts and {"a", "d", "computing"} <= set(prompts)


def test_concurrent_fills_keep_the_accounting():
    per_prompt = LAYERS * header("p", 0, 32).nbytes
    store = PromptStore(max_bytes=20 * per_prompt)

    def worker(k):
        for i in range(300):
            fill(store, f"t{k}-{i % 100}", 32)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    s = store.summary()
    assert s["bytes"] == sum(p["bytes"] for p in s["prompts"].values()) <= store.max_bytes
