"""Counters of what the relay builders decided, per worker process (read with collective_rpc)."""

from dataclasses import asdict, dataclass


@dataclass
class RelayStats:
    batches: int = 0  # metadata builds (steps x KV-cache groups) with relay selected
    relay_batches: int = 0  # of which at least one group relayed
    full_graph_relay_batches: int = 0  # ... of which inside a FULL CUDA graph (graph_relay.py)
    flash_prefix_batches: int = 0  # ... of which the prefix pass ran on FA3 (flash_prefix.py)
    prefix_beside_batches: int = 0  # ... of which beside the suffix kernel ("handoff")
    groups: int = 0  # relayed groups, summed over batches
    grouped_requests: int = 0  # requests served by a prefix pass, summed over batches
    shared_tokens: int = 0  # prefix tokens read once per group instead of once per request
    build_s: float = 0.0  # host seconds spent building relay batches (incl. any device sync)

    def record(self, relay, build_s: float = 0.0) -> None:
        self.batches += 1
        self.build_s += build_s
        if relay is None:
            return
        self.relay_batches += 1  # host-side numbers only: no device sync per step
        self.flash_prefix_batches += bool(getattr(relay, "flash_prefix", False))
        self.prefix_beside_batches += bool(getattr(relay, "prefix_beside", False))
        self.groups += len(relay.groups)
        self.grouped_requests += sum(end - start for start, end, _ in relay.groups)
        self.shared_tokens += sum(prefix_len for _, _, prefix_len in relay.groups)


RELAY_STATS = RelayStats()


def compiled_kernel_keys() -> list[str]:
    """'kernel: cache key' of every specialization of our Triton kernels this process compiled
    (the key holds the argument types, divisibility and constexpr values that caused it). Keys
    that appear during a timed pass are compiles the start-up warm-up did not cover."""
    import sys

    from triton.runtime.jit import JITFunction

    keys = []
    for name, module in list(sys.modules.items()):
        if not name.startswith("edgeprompt_vllm.kernels"):
            continue
        for fn in vars(module).values():
            if isinstance(fn, JITFunction):
                caches = getattr(fn, "device_caches", {})  # device -> (kernel cache, ...)
                keys += [f"{fn.__name__}: {key}" for per_device in caches.values() for key in per_device[0]]
    return keys


def relay_stats(_worker=None) -> dict:
    """For `LLM.collective_rpc(relay_stats)`: this worker's counters."""
    from edgeprompt_vllm.attention.graph_mode import graph_mode_stats
    from edgeprompt_vllm.attention.host_block_table import LOOKUPS

    keys = compiled_kernel_keys()
    return (asdict(RELAY_STATS) | LOOKUPS | graph_mode_stats()
            | {"compiled_kernel_variants": len(keys), "compiled_kernel_keys": keys})
