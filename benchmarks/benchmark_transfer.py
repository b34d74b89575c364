"""Cloud -> edge layer transfer: GB/s per transport and per layer size.

    python benchmarks/benchmark_transfer.py [--address HOST:PORT] [--sizes-mib 0.0625 1 16 64]
    python benchmarks/benchmark_transfer.py --device cuda [--sizes-mib 1 16 64]   # on a GPU

Transports (all through the real CloudClient/LayerStream, checksum verified, against a
synthetic cloud actor that serves the same API as CloudPromptService without a model):
  ray-shm       actor and edge on one node: ray.get of the actor-owned object is zero-copy
                from shared memory; cost = round trips + blake3 verify
  ray-shm+copy  the same, plus a copy into a fresh tensor (what writing into the KV cache costs)
  ray-xnode     (with --address of a cluster that has a node with the `cloud` resource) the actor
                on that node: Ray's object transfer between nodes
  raw-ray-get   plain ray.get of a numpy array in the object store, no client (the floor)
Prints one line per (transport, size) and appends JSON rows to benchmarks/results/transfer.jsonl.
GPU tensor transports (Ray direct transport over NCCL) are measured by --device cuda2 (below).

--device cuda (one GPU; rows with the device name, default benchmarks/results/transfer/cuda.jsonl;
model-like layers: 8 KV heads x 128, bf16, block size 16):
  naive-cuda       the cloud holds each layer as a CUDA tensor and returns `.cpu()` through Ray
                   (all L calls submitted at once); the edge ray.get's each in order, then
                   `.cuda()` (pageable memory, on the compute stream)
  edgeprompt-cuda  the real CloudClient/LayerStream from the object store (checksum verified)
                   and the edge's LayerLoader (edge/cuda_loader.py): pinned copy, H2D and scatter
                   into a paged CUDA cache (random block table) on the side stream; the compute
                   stream waits on each layer's event
GBps: the layers' bytes over the wall time of a pass with nothing else on the GPU (best of
--reps). Then one pass emulates --layer-compute-ms of work per layer on the compute stream
(torch.cuda._sleep) after each layer's wait: compute_blocked_ms is the GPU time the compute
stream spent stalled in the waits (CUDA events around each), host_blocked_ms the host time in
them (ray.get + .cuda() for the naive path; until the layer is issued for ours).

--device cuda2 (two GPUs: a cloud actor -> an edge actor, Ray Direct Transport over NCCL against
the object store) and --device cpu2 (the same on CPU, RDT over gloo): see transfer_pair.py.

--device link (default benchmarks/results/transfer/link.jsonl; needs --model): the connector's
own transports from a real cloud actor into the edge's paged cache, the GPU-pair link (NCCL
between two GPUs, gloo on CPU) against the object store: see transfer_link.py.
"""

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import ray
import torch

from edgeprompt_vllm.bench.env import source_commit
from edgeprompt_vllm.fingerprint import Fingerprint
from edgeprompt_vllm.transport.client import CloudClient
from edgeprompt_vllm.transport.wire import encode_layer

# transfer_pair.py (--device cuda2 / cpu2) lies next to this script: on sys.path when the script
# runs, not when it is loaded from its path (as the tests do)
HERE = str(Path(__file__).resolve().parent)
if HERE not in sys.path:
    sys.path.insert(0, HERE)
from transfer_link import EdgeCache, run_link
from transfer_pair import BLOCK_SIZE, HEAD_SIZE, KV_DTYPE, KV_HEADS, cpu_model, run_pair

LAYERS = 8


class SyntheticCloud:
    """CloudPromptService's edge-facing API over random layers (bytes per layer = size)."""

    def __init__(self, fp: dict, size_bytes: int):
        self.fp = Fingerprint.from_dict(fp)
        f = self.fp
        dtype = getattr(torch, f.dtype)
        per_token = f.kv_bytes_per_token()
        t = max(1, size_bytes // per_token)  # [2, T, H, hs]
        self.slots = []
        for l in range(LAYERS):
            k, v = torch.randn(2, t, f.num_kv_heads, f.head_size).to(dtype).unbind(0)
            h, raw = encode_layer("bench", l, k, v)
            self.slots.append((h.to_dict(), ray.put(raw)))

    def handshake(self, fp):
        return {"ok": True, "fingerprint": self.fp.to_dict(), "error": None}

    def registry(self, digest):
        return [{"prompt_id": "bench", "token_ids": [1], "pinned": True}]

    def fetch_layer(self, prompt_id, digest, layer):
        h, ref = self.slots[layer]
        return h, [ref]

    def node(self):
        return ray.get_runtime_context().get_node_id()


def fingerprint() -> Fingerprint:
    return Fingerprint("Bench", LAYERS, 2, 64, "float32", "{}", 32, "dummy")


def bench_client(actor, fp, copy: bool, reps: int) -> float:
    c = CloudClient(actor, fp, timeout_s=120)
    c.handshake()
    c.registry()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        s = c.fetch_layers("bench", range(LAYERS))
        nbytes = 0
        for l in range(LAYERS):
            h, kv = s.result(l, 120)
            nbytes += h.nbytes
            if copy:
                kv.clone()
        best = min(best, time.perf_counter() - t0)
    return nbytes / best / 1e9


def bench_raw(size: int, reps: int) -> float:
    refs = [ray.put(np.random.bytes(size)) for _ in range(LAYERS)]
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        for r in refs:
            ray.get(r)
        best = min(best, time.perf_counter() - t0)
    return size * LAYERS / best / 1e9


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--address", help="a Ray cluster with a `cloud` node (for ray-xnode)")
    ap.add_argument("--device", choices=["cpu", "cuda", "cuda2", "cpu2", "link"], default="cpu",
                    help="cuda: the naive GPU path against the edge's layer loader (one GPU); "
                         "cuda2: cloud on GPU A -> edge on GPU B, Ray RDT over NCCL against the "
                         "object store; cpu2: the same two actors on CPU, RDT over gloo; link: "
                         "the connector's GPU-pair link against its object store path, from a "
                         "real cloud actor (two GPUs: NCCL; else CPU: gloo)")
    ap.add_argument("--model", help="--device link: the model directory of the cloud engine")
    ap.add_argument("--load-format", default="auto", help="--device link: e.g. dummy")
    ap.add_argument("--sizes-mib", type=float, nargs="+",
                    help="layer sizes (default: 0.0625 1 16 64; with --device cuda/cuda2 "
                         "1 16 64; cpu2 0.0625 1)")
    ap.add_argument("--reps", type=int, default=None, help="default: 5 (cpu), 3 (the others)")
    ap.add_argument("--layer-compute-ms", type=float, default=1.0,
                    help="--device cuda: emulated compute per layer for compute_blocked_ms")
    ap.add_argument("--layers", type=int, default=LAYERS,
                    help=f"--device cuda2/cpu2: layers per pass (default {LAYERS})")
    ap.add_argument("--rdt-group", choices=["auto", "ray", "torch"], default="auto",
                    help="--device cuda2/cpu2: the collective group under RDT: Ray's own (NCCL "
                         "needs cupy), or a torch.distributed one registered under Ray's backend "
                         "name; auto: Ray's if available, else torch")
    ap.add_argument("--out", help="JSONL to append to (default: benchmarks/results/"
                                  "transfer.jsonl; with --device cuda transfer/cuda.jsonl, "
                                  "cuda2 transfer/cuda2.jsonl, cpu2 transfer/cpu2.jsonl)")
    args = ap.parse_args()
    results = Path(__file__).parent / "results"
    if args.device == "cuda":
        if not torch.cuda.is_available():
            ap.error("--device cuda needs a CUDA GPU")
        args.sizes_mib = args.sizes_mib or [1, 16, 64]
        args.reps = args.reps or 3
        args.out = args.out or str(results / "transfer" / "cuda.jsonl")
    elif args.device in ("cuda2", "cpu2"):
        if args.device == "cuda2" and torch.cuda.device_count() < 2:
            ap.error(f"--device cuda2 needs 2 CUDA GPUs (one per actor); "
                     f"{torch.cuda.device_count()} visible"
                     f" (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})")
        args.sizes_mib = args.sizes_mib or ([1, 16, 64] if args.device == "cuda2" else [0.0625, 1])
        args.reps = args.reps or 3
        args.out = args.out or str(results / "transfer" / f"{args.device}.jsonl")
    elif args.device == "link":
        if not args.model:
            ap.error("--device link needs --model (the cloud engine's model directory)")
        gpus = torch.cuda.device_count() >= 2
        args.sizes_mib = args.sizes_mib or ([4, 16, 32] if gpus else [0.0625, 0.25])
        args.reps = args.reps or 3
        args.out = args.out or str(results / "transfer" / "link.jsonl")
    else:
        args.sizes_mib = args.sizes_mib or [0.0625, 1, 16, 64]
        args.reps = args.reps or 5
        args.out = args.out or str(results / "transfer.jsonl")
    if args.address:
        ray.init(address=args.address, log_to_driver=False)
    else:
        gpus = {"cuda": {"num_gpus": 1}, "cuda2": {"num_gpus": 2}}.get(args.device, {})
        if args.device == "link":  # the cloud engine's own GPU is picked by CUDA_VISIBLE_DEVICES
            gpus = {"num_gpus": torch.cuda.device_count()}
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                 object_store_memory=(4 if args.device.startswith("cuda") else 2) << 30, **gpus)
    env = {"host": platform.node(), "cpu": cpu_model(), "ray": ray.__version__,
           "commit": source_commit(),
           "command": " ".join(sys.argv)}
    run = {"cuda": run_cuda, "cuda2": run_pair, "cpu2": run_pair,
           "link": run_link}.get(args.device, run_cpu)
    rows = run(args, env)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def run_cpu(args, env: dict) -> list[dict]:
    fp = fingerprint()
    rows = []
    for mib in args.sizes_mib:
        size = int(mib * (1 << 20))
        cases = [("raw-ray-get", None), ("ray-shm", {}), ("ray-shm+copy", {})]
        if args.address:
            cases.append(("ray-xnode", {"resources": {"cloud": 1}}))
        for name, opts in cases:
            if opts is None:
                gbps = bench_raw(size, args.reps)
            else:
                actor = ray.remote(SyntheticCloud).options(num_cpus=0, **opts).remote(fp.to_dict(), size)
                ray.get(actor.node.remote())
                gbps = bench_client(actor, fp, copy=name.endswith("copy"), reps=args.reps)
                ray.kill(actor)
            row = {"transport": name, "layer_mib": mib, "layers": LAYERS, "GBps": round(gbps, 3),
                   **env, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
            rows.append(row)
            print(f"{name:14s} layer {mib:8.4f} MiB  {gbps:8.3f} GB/s", flush=True)
    return rows


# ---------------- --device cuda ----------------

CUDA_FP = ("BenchCuda", LAYERS, KV_HEADS, HEAD_SIZE, str(KV_DTYPE).removeprefix("torch."), "{}",
           BLOCK_SIZE, "dummy")


class GpuTensorCloud:
    """The naive path's cloud: each layer a CUDA tensor, served as `.cpu()` through Ray."""

    def load(self, size_bytes: int) -> None:
        self.layers = None
        torch.cuda.empty_cache()
        self.layers = [torch.randn(size_bytes // 2, device="cuda").to(torch.bfloat16)
                       for _ in range(LAYERS)]
        torch.cuda.synchronize()

    def fetch(self, layer: int) -> torch.Tensor:
        return self.layers[layer].cpu()


class ComputeStream:
    """The compute stream's side of a pass: CUDA events around each layer's wait, and the
    emulated per-layer compute (torch.cuda._sleep, calibrated once)."""

    cycles_per_ms: float | None = None

    def __init__(self, compute_ms: float):
        if ComputeStream.cycles_per_ms is None:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda._sleep(1_000_000)
            a.record()
            torch.cuda._sleep(20_000_000)
            b.record()
            b.synchronize()
            ComputeStream.cycles_per_ms = 20_000_000 / a.elapsed_time(b)
        self.cycles = int(compute_ms * ComputeStream.cycles_per_ms)
        self.stalls, self.host_s = [], 0.0

    def layer(self, wait) -> None:
        """Runs wait() (the host part of a layer's wait), timed on the host and the GPU, then
        the emulated compute."""
        before, after = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        before.record()
        t0 = time.perf_counter()
        wait()
        self.host_s += time.perf_counter() - t0
        after.record()
        self.stalls.append((before, after))
        if self.cycles:
            torch.cuda._sleep(self.cycles)

    def blocked_ms(self) -> float:
        return sum(a.elapsed_time(b) for a, b in self.stalls)


def naive_pass(actor, compute: ComputeStream) -> None:
    refs = [actor.fetch.remote(l) for l in range(LAYERS)]
    for l in range(LAYERS):
        compute.layer(lambda l=l: ray.get(refs[l]).cuda())


class EdgePass:
    """The edge's path into a paged cache [B, H, N, 2 * hs] (vLLM 0.26's logical view of NHD
    memory), through a real CloudClient, for one layer size."""

    def __init__(self, actor, fp: Fingerprint):
        self.client = CloudClient(actor, fp, timeout_s=120)
        self.client.handshake()
        self.client.registry()
        header, _ = ray.get(actor.fetch_layer.remote("bench", fp.digest(), 0))
        self.cache = EdgeCache(fp, header["num_tokens"], torch.device("cuda"))

    def run(self, compute: ComputeStream) -> None:
        stream = self.client.fetch_layers("bench", range(LAYERS))
        self.cache.fill(stream, each=compute.layer, timeout_s=120)
        self.stream = stream

    def check(self) -> None:
        """The last pass's last layer really is in the cache (first block of the table)."""
        _, kv = self.stream.result(LAYERS - 1, 1)
        n = min(self.cache.tokens, 16)
        cache = self.cache.caches[LAYERS - 1][0]  # [B, H, N, 2 * hs]
        key = cache[int(self.cache.block_ids[0]), :, :n, :kv.shape[-1]].transpose(0, 1).cpu()
        assert torch.equal(key, kv[0, :n]), "edgeprompt-cuda: the cache does not hold the layer"


def timed(pass_fn, compute_ms: float) -> tuple[float, ComputeStream]:
    compute = ComputeStream(compute_ms)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    pass_fn(compute)
    torch.cuda.synchronize()
    return time.perf_counter() - t0, compute


def run_cuda(args, env: dict) -> list[dict]:
    fp = Fingerprint(*CUDA_FP)
    per_token = fp.kv_bytes_per_token()
    env = {**env, "device": torch.cuda.get_device_name(), "torch": torch.__version__}
    gpu_cloud = ray.remote(GpuTensorCloud).options(num_gpus=1, num_cpus=0).remote()
    rows = []
    for mib in args.sizes_mib:
        size = max(1, int(mib * (1 << 20)) // per_token) * per_token
        cloud = ray.remote(SyntheticCloud).options(num_cpus=0).remote(fp.to_dict(), size)
        ray.get([gpu_cloud.load.remote(size), cloud.node.remote()])
        edge = EdgePass(cloud, fp)
        passes = {"naive-cuda": lambda c: naive_pass(gpu_cloud, c), "edgeprompt-cuda": edge.run}
        for name, pass_fn in passes.items():
            timed(pass_fn, 0.0)  # warm-up: pinned and device allocations, Ray's first gets
            best = min(timed(pass_fn, 0.0)[0] for _ in range(args.reps))
            wall, compute = timed(pass_fn, args.layer_compute_ms)
            if name == "edgeprompt-cuda":
                edge.check()
            gbps = size * LAYERS / best / 1e9
            row = {"transport": name, "layer_mib": mib, "layers": LAYERS, "GBps": round(gbps, 3),
                   "layer_compute_ms": args.layer_compute_ms,
                   "compute_blocked_ms": round(compute.blocked_ms(), 3),
                   "host_blocked_ms": round(1e3 * compute.host_s, 3),
                   "wall_with_compute_ms": round(1e3 * wall, 3),
                   **env, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
            rows.append(row)
            print(f"{name:16s} layer {mib:7.3f} MiB  {gbps:8.3f} GB/s   with {args.layer_compute_ms}"
                  f" ms compute/layer: compute stream blocked {row['compute_blocked_ms']:8.2f} ms, "
                  f"host {row['host_blocked_ms']:8.2f} ms, wall {row['wall_with_compute_ms']:8.2f} ms",
                  flush=True)
        del edge, passes
        ray.kill(cloud)
    ray.kill(gpu_cloud)
    return rows


if __name__ == "__main__":
    main()
