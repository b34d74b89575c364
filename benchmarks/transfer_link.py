"""The transfer benchmark's --device link (benchmark_transfer.py runs it): the connector's two
transports side by side, from a real cloud actor into the edge's paged cache.

A real CloudPromptService (a vLLM engine; on two GPUs it runs on the second, picked by
CUDA_VISIBLE_DEVICES) prefills one cloud prompt per --sizes-mib (its token count chosen so one
layer holds that many MiB). This process plays the edge's worker: the real CloudClient and
  edgeprompt-pair      PairLink (transport/pair_link.py): NCCL from the cloud's GPU into a slot on
                       this GPU (gloo on CPU), device checksum checked by the receiver actor
  edgeprompt-objstore  LayerStream through the object store (blake3 checked), pinned copy + H2D
and on CUDA the edge's LayerLoader (edge/cuda_loader.py) scattering every layer into a paged cache
[blocks, block size, H, 2 * hs] (random block table) on a side stream, as the connector does. On
CPU the layers are only delivered (the CPU backend writes them with its own kernel).

GBps: a prompt's bytes (all layers) over the wall time of a warm pass, from the fetch to every
layer written and synchronized (best of --reps); cold_s: the first pass of the pair transport,
while the cloud prefills that prompt (cloud compute and transfer overlap). After the passes the
two transports' caches must be identical.

    python benchmarks/benchmark_transfer.py --device link --model DIR [--sizes-mib 4 16 64]
"""

import functools
import statistics
import time
import uuid

import ray
import torch

from edgeprompt_vllm.bench.env import cpu_name
from edgeprompt_vllm.cloud.deploy import start_cloud_service, visible_gpu
from edgeprompt_vllm.fingerprint import model_fingerprint
from edgeprompt_vllm.transport.client import CloudClient
from edgeprompt_vllm.transport.pair_group import device_checksum
from edgeprompt_vllm.transport.pair_link import PairLink


def block_size(device: torch.device) -> int:
    return 16 if device.type == "cuda" else 32  # vLLM's CPU attention takes multiples of 32


class EdgeCache:
    """One prompt's paged cache per layer on the edge's device, a random block table, and the
    pass that fills it through a stream."""

    def __init__(self, fp, tokens: int, device: torch.device):
        self.fp, self.tokens, self.device = fp, tokens, device
        bs = fp.block_size
        num_blocks = 2 * (-(-tokens // bs))
        self.block_ids = torch.randperm(num_blocks)[:num_blocks // 2]
        t = torch.arange(tokens)
        self.slots = self.block_ids[t // bs] * bs + t % bs
        dtype = getattr(torch, fp.dtype)
        self.caches = {l: [torch.zeros(num_blocks, bs, fp.num_kv_heads, 2 * fp.head_size,
                                       dtype=dtype, device=device).permute(0, 2, 1, 3)]
                       for l in range(fp.num_layers)}  # [B, H, N, 2 * hs] views of NHD memory
        self.side = None
        if device.type == "cuda":
            from edgeprompt_vllm.edge.cuda_loader import SideStream

            self.side = SideStream(device)

    def clear(self) -> None:
        for cs in self.caches.values():
            cs[0].zero_()

    def fill(self, stream, each=None, timeout_s: float = 300) -> None:
        """Every layer of `stream` into the cache (CUDA: the LayerLoader; CPU: delivered).
        each(wait): runs one layer's wait (benchmark_transfer's compute emulation); default:
        just waits."""
        layers = range(self.fp.num_layers)
        if self.side is None:
            self.delivered = [stream.result(l, timeout_s)[1] for l in layers]
            return
        from edgeprompt_vllm.edge.cuda_loader import LayerLoader

        loader = LayerLoader(self.side, [(stream, [(0, self.tokens, self.slots)])], self.caches)
        for l in layers:
            wait = functools.partial(loader.wait, stream, l, timeout_s)
            if each is None:
                wait()
            else:
                each(wait)
        loader.close()
        torch.cuda.synchronize(self.device)

    def snapshot(self) -> list[int]:
        """Per layer the device checksum of what landed (CUDA: the cache; CPU: the layer)."""
        if self.side is None:
            return [device_checksum(kv) for kv in self.delivered]
        return [device_checksum(self.caches[l][0]) for l in range(self.fp.num_layers)]


def layer_breakdown(stream) -> dict:
    """A pair stream's per-layer times, ms (medians over its layers): the gap between two
    arrivals, the receiver's receive (waiting for the sender included) and checksum, and the
    time from asking for a layer (a slot wait included) to its arrival."""
    t = [stream.timings[l] for l in stream.layers]
    ready = sorted(x["ready_s"] for x in t)
    ms = {"arrival_gap": [b - a for a, b in zip(ready, ready[1:])] or [0.0],
          "receive": [x["recv_ms"] / 1e3 for x in t], "checksum": [x["checksum_ms"] / 1e3 for x in t],
          "ask_to_arrival": [x["ready_s"] - x["submit_s"] for x in t]}
    return {k: round(1e3 * statistics.median(v), 3) for k, v in ms.items()}


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run_link(args, env: dict) -> list[dict]:
    two_gpus = torch.cuda.device_count() >= 2
    device = torch.device("cuda", 0) if two_gpus else torch.device("cpu")
    dtype = "float16" if two_gpus else "float32"
    bs = block_size(device)
    fp = model_fingerprint(args.model, dtype, bs, args.load_format)
    per_token = fp.kv_bytes_per_token()
    lens = [max(1, int(mib * (1 << 20)) // per_token // bs) * bs for mib in args.sizes_mib]
    name = f"link-bench-{uuid.uuid4().hex[:6]}"
    max_len = max(lens) + bs
    # its own KV cache must hold one prompt of max_len (the service's default is 256 MiB)
    kv_bytes = max(256 << 20, 2 * max_len * per_token * fp.num_layers)
    actor = start_cloud_service(
        args.model, name=name, namespace=ray.get_runtime_context().namespace, detached=False,
        num_cpus=0, env_vars={"CUDA_VISIBLE_DEVICES": visible_gpu(1)} if two_gpus else None,
        dtype=dtype, block_size=bs, max_model_len=max_len, load_format=args.load_format,
        max_kv_bytes=32 << 30,
        engine_kwargs={"kv_cache_memory_bytes": kv_bytes,
                       **({"gpu_memory_utilization": 0.3} if two_gpus else {})})
    client = CloudClient(actor, fp, timeout_s=300)
    client.handshake()
    ids = {}
    for mib, n in zip(args.sizes_mib, lens):
        ids[mib] = f"bench-{n}"
        ray.get(actor.register_prompt.remote(ids[mib], token_ids=[(7 * i) % 900 + 10 for i in
                                                                   range(n + 1)]))
    client.registry()
    link = PairLink(client, device, timeout_s=300)
    env = {**env, "device": torch.cuda.get_device_name(device) if two_gpus else cpu_name(),
           "cloud_device": "GPU 1" if two_gpus else "CPU", "pair_backend": link.backend,
           "model": str(args.model), "dtype": dtype, "torch": torch.__version__}
    rows = []
    try:
        for mib, n in zip(args.sizes_mib, lens):
            pid = ids[mib]
            cache = EdgeCache(fp, n, device)
            shape = (2, n, fp.num_kv_heads, fp.head_size)
            last = {}  # the pair pass's last stream, for its per-layer times

            def pair_pass():
                last["stream"] = link.fetch_layers(pid, range(fp.num_layers), shape, dtype)
                cache.fill(last["stream"])

            passes = {
                "edgeprompt-pair": pair_pass,
                "edgeprompt-objstore": lambda: cache.fill(client.fetch_layers(pid,
                                                                              range(fp.num_layers))),
            }
            cold_s = timed(passes["edgeprompt-pair"])  # the cloud prefills it meanwhile
            landed = {}
            for transport, fill in passes.items():
                fill()  # warm-up: pinned and slot memory, Ray's first gets
                best = float("inf")
                for _ in range(args.reps):
                    cache.clear()
                    best = min(best, timed(fill))
                landed[transport] = cache.snapshot()
                nbytes = n * per_token * fp.num_layers
                row = {"transport": transport, "tokens": n, "layer_mib": round(n * per_token / (1 << 20), 3),
                       "layers": fp.num_layers, "GBps": round(nbytes / best / 1e9, 3),
                       "best_ms": round(1e3 * best, 3), "reps": args.reps,
                       "cold_s": round(cold_s, 4) if transport == "edgeprompt-pair" else None,
                       "per_layer_ms": layer_breakdown(last["stream"])
                       if transport == "edgeprompt-pair" else None,
                       **env, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
                rows.append(row)
                print(f"{transport:20s} {n:6d} tokens ({row['layer_mib']:8.3f} MiB a layer x "
                      f"{fp.num_layers})  {row['GBps']:8.3f} GB/s  best {row['best_ms']:9.2f} ms"
                      + (f"  cold (prefill overlapped) {cold_s:7.3f} s" if row["cold_s"] else "")
                      + (f"\n    per layer, ms (medians): {row['per_layer_ms']}"
                         if row["per_layer_ms"] else ""), flush=True)
            if landed["edgeprompt-pair"] != landed["edgeprompt-objstore"]:
                raise RuntimeError(f"{pid}: the two transports landed different bytes")
            if device.type == "cuda" and not any(bool(c[0].any()) for c in cache.caches.values()):
                raise RuntimeError(f"{pid}: nothing was written")
    finally:
        link.close()
        ray.kill(actor)
    return rows
