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

--device cuda2 (two GPUs; default benchmarks/results/transfer/cuda2.jsonl; the same model-like
layers, --layers of them): a cloud actor (num_gpus=1) holds the layers as CUDA tensors on GPU A,
an edge actor (num_gpus=1) scatters each into a paged cache (random block table) on GPU B:
  ray-nccl            Ray Direct Transport (RDT) over NCCL: the two actors are one collective
                      group (ray.experimental.collective.create_collective_group([cloud, edge],
                      "nccl")), the cloud returns the layer's tensor from a method called with
                      .options(tensor_transport="nccl"), the driver passes that ObjectRef to the
                      edge's receive(), and Ray sends it GPU A -> GPU B out of band; one layer at
                      a time (each receive waited for by the driver, the edge synchronized)
  ray-nccl-pipelined  the same with all --layers fetch + receive calls submitted at once
  ray-objstore-2gpu   the naive baseline for the same pair: the cloud returns `.cpu()` through the
                      object store, the edge ray.get's it and `.cuda()`s it (also -pipelined)
GBps: the layers' bytes over the best (of --reps) wall time of a pass, from the first submit to
the edge's cache written and synchronized; after the passes the edge's cache is checked against
the cloud's layers (a position-weighted checksum of each layer). Rows name both GPUs, their Ray
GPU ids and PCI bus ids, and whether they can access each other's memory (P2P).
NCCL needs Ray's NCCL collective group, which needs cupy; without cupy Ray does not even
register its NCCL backend (create_collective_group fails in the actors with "Backend NCCL not
registered"), so --rdt-group auto (the default) then registers a torch.distributed NCCL process
group under Ray's NCCL backend name (TorchDistGroup): Ray's RDT still does everything else
(@ray.method tensor_transport, the send/recv tasks, the receive buffers); rows say which
(rdt_group: "ray" or "torch.distributed"). A NCCL RDT object cannot be ray.get by the driver
(NCCL is two-sided: both ends must be actors of the group), so the edge is an actor too, and both
actors are declared with enable_tensor_transport=True (the receiver too: without it its
receive task blocks the thread that the transfer needs, and Ray kills both after 60 s).
Ray's CUDA_IPC transport is not measured: it is one-sided but same-GPU only (its receiver must
have been given the sender's GPU by Ray, see ray/experimental/rdt/cuda_ipc_transport.py), so it
cannot move data between two GPUs; NIXL (one-sided, cross-GPU) needs the nixl package.
--device cpu2: the same two-actor path on CPU, RDT over gloo (rows ray-gloo, ray-objstore-2proc;
default benchmarks/results/transfer/cpu2.jsonl): what the tests run.

    python benchmarks/benchmark_transfer.py --device cuda2 [--sizes-mib 1 16 64] [--reps 3]
    python benchmarks/benchmark_transfer.py --device cpu2 --sizes-mib 0.0625 --layers 2
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import ray
import torch
from ray.util.collective.collective_group.torch_gloo_collective_group import TorchGLOOGroup

from edgeprompt_vllm.fingerprint import Fingerprint
from edgeprompt_vllm.transport.client import CloudClient
from edgeprompt_vllm.transport.wire import encode_layer

LAYERS = 8


class SyntheticCloud:
    """CloudPromptService's edge-facing API over random layers (bytes per layer = size)."""

    def __init__(self, fp: dict, size_bytes: int):
        self.fp = Fingerprint.from_dict(fp)
        f = self.fp
        dtype = getattr(torch, f.dtype)
        per_token = 2 * f.num_kv_heads * f.head_size * dtype.itemsize
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
    ap.add_argument("--device", choices=["cpu", "cuda", "cuda2", "cpu2"], default="cpu",
                    help="cuda: the naive GPU path against the edge's layer loader (one GPU); "
                         "cuda2: cloud on GPU A -> edge on GPU B, Ray RDT over NCCL against the "
                         "object store; cpu2: the same two actors on CPU, RDT over gloo")
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
    else:
        args.sizes_mib = args.sizes_mib or [0.0625, 1, 16, 64]
        args.reps = args.reps or 5
        args.out = args.out or str(results / "transfer.jsonl")
    if args.address:
        ray.init(address=args.address, log_to_driver=False)
    else:
        gpus = {"cuda": {"num_gpus": 1}, "cuda2": {"num_gpus": 2}}.get(args.device, {})
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                 object_store_memory=(4 if args.device.startswith("cuda") else 2) << 30, **gpus)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, check=False, cwd=Path(__file__).parent).stdout.strip()
    env = {"host": platform.node(), "cpu": _cpu_model(), "ray": ray.__version__, "commit": commit,
           "command": " ".join(sys.argv)}
    run = {"cuda": run_cuda, "cuda2": run_pair, "cpu2": run_pair}.get(args.device, run_cpu)
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

CUDA_FP = ("BenchCuda", LAYERS, 8, 128, "bfloat16", "{}", 16, "dummy")  # heads, hs, dtype, block


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
        from edgeprompt_vllm.edge.cuda_loader import SideStream

        self.client = CloudClient(actor, fp, timeout_s=120)
        self.client.handshake()
        self.client.registry()
        header, _ = ray.get(actor.fetch_layer.remote("bench", fp.digest(), 0))
        self.tokens, bs = header["num_tokens"], fp.block_size
        num_blocks = 2 * (-(-self.tokens // bs))
        self.block_ids = torch.randperm(num_blocks)[:num_blocks // 2]
        t = torch.arange(self.tokens)
        self.slots = self.block_ids[t // bs] * bs + t % bs
        dtype = getattr(torch, fp.dtype)
        self.caches = {l: [torch.zeros(num_blocks, bs, fp.num_kv_heads, 2 * fp.head_size,
                                       dtype=dtype, device="cuda").permute(0, 2, 1, 3)]
                       for l in range(LAYERS)}
        self.side = SideStream("cuda")

    def run(self, compute: ComputeStream) -> None:
        from edgeprompt_vllm.edge.cuda_loader import LayerLoader

        stream = self.client.fetch_layers("bench", range(LAYERS))
        loader = LayerLoader(self.side, [(stream, [(0, self.tokens, self.slots)])], self.caches)
        for l in range(LAYERS):
            compute.layer(lambda l=l: loader.wait(stream, l, 120))
        loader.close()
        self.stream = stream

    def check(self) -> None:
        """The last pass's last layer really is in the cache (first block of the table)."""
        _, kv = self.stream.result(LAYERS - 1, 1)
        n = min(self.tokens, 16)
        cache = self.caches[LAYERS - 1][0]  # [B, H, N, 2 * hs]
        key = cache[int(self.block_ids[0]), :, :n, :kv.shape[-1]].transpose(0, 1).cpu()
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
    per_token = 2 * fp.num_kv_heads * fp.head_size * 2
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


# ---------------- --device cuda2 / cpu2: two actors, Ray Direct Transport ----------------

KV_HEADS, HEAD_SIZE, BLOCK_SIZE = CUDA_FP[2], CUDA_FP[3], CUDA_FP[6]
KV_DTYPE = torch.bfloat16


def checksum(t: torch.Tensor) -> int:
    """Position-weighted sum of a 16-bit tensor's words: a partial, shifted or permuted copy
    changes it."""
    w = t.contiguous().view(torch.int16).flatten().to(torch.int64)
    return int((w * (torch.arange(w.numel(), device=w.device) % 65521 + 1)).sum())


class TorchDistGroup(TorchGLOOGroup):
    """A Ray collective group over a torch.distributed process group of `torch_backend` (one
    group per process; Ray's GLOO group does the same with gloo). What --rdt-group torch
    registers under Ray's NCCL backend name where Ray's own NCCL group (cupy's NCCL) is missing:
    RDT's NCCL transport then sends and receives through it (ray.util.collective.send/recv)."""

    torch_backend = "nccl"

    def __init__(self, world_size: int, rank: int, group_name: str, gloo_timeout=None):
        import datetime

        import torch.distributed as dist
        from ray.experimental import internal_kv
        from ray.util.collective.collective_group.base_collective_group import BaseGroup
        from ray.util.collective.collective_group.torch_gloo_collective_group import (
            get_master_address_metadata_key,
        )

        timeout_ms = gloo_timeout or 60_000
        self._rendezvous(group_name, rank, timeout_ms)  # rank 0 publishes a free port
        key = get_master_address_metadata_key(group_name)
        addr, port = internal_kv._internal_kv_get(key).decode().rsplit(":", 1)
        os.environ.update(MASTER_ADDR=addr, MASTER_PORT=port)
        device = ({"device_id": torch.device("cuda", torch.cuda.current_device())}
                  if self.torch_backend == "nccl" else {})
        dist.init_process_group(self.torch_backend, init_method="env://", world_size=world_size,
                                rank=rank, timeout=datetime.timedelta(milliseconds=timeout_ms),
                                **device)
        if rank == 0:
            internal_kv._internal_kv_del(key)
        BaseGroup.__init__(self, world_size, rank, group_name)
        self._is_default_group, self._pg = True, dist.group.WORLD  # destroy_group: the process's

    @classmethod
    def backend(cls):
        from ray.util.collective.types import Backend

        return Backend(cls.torch_backend)


def use_torch_group(backend: str) -> None:
    """In this process: Ray's collective backend `backend` ("nccl", "gloo") creates a
    TorchDistGroup of that torch backend (registered if Ray has none; else it replaces Ray's)."""
    import ray.util.collective.collective  # noqa: F401  (registers Ray's own backends first)
    from ray.util.collective.backend_registry import _global_registry, register_collective_backend

    name = backend.upper()
    group = type(f"TorchDist{name}Group", (TorchDistGroup,), {"torch_backend": backend.lower()})
    if _global_registry.is_registered(name):
        _global_registry._map[name] = group
    else:
        register_collective_backend(name, group)


def rdt_group_impl(backend: str, choice: str = "auto") -> str:
    """ "ray" (Ray's own collective group for `backend`) or "torch" (TorchDistGroup)."""
    if choice != "auto":
        return choice
    from ray.util.collective.collective import is_backend_available

    return "ray" if is_backend_available(backend.upper()) else "torch"


class RdtEnd:
    """What both actors share: their device, the collective group implementation, info()."""

    def __init__(self, device: str, backend: str, group_impl: str):
        if group_impl == "torch":
            use_torch_group(backend)
        self.device = torch.device(device)

    def info(self) -> dict:
        if self.device.type != "cuda":
            return {"device": f"CPU: {_cpu_model()}", "gpu_ids": [], "pci_bus_id": None}
        props = torch.cuda.get_device_properties(self.device)
        return {"device": props.name, "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
                "pci_bus_id": getattr(props, "pci_bus_id", None)}

    def group_class(self, name: str) -> str:
        """The class of this process's collective group `name` (what RDT sends through)."""
        from ray.util.collective.collective import get_group_handle

        return type(get_group_handle(name)).__name__

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


class RdtCloud(RdtEnd):
    """The cloud end: L layers of KV [2, T, H, hs] as tensors on its device."""

    def load(self, tokens: int, layers: int, seed: int = 0) -> list[int]:
        self.layers = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        g = torch.Generator(self.device).manual_seed(seed)
        self.layers = [torch.randn(2, tokens, KV_HEADS, HEAD_SIZE, generator=g,
                                   device=self.device).to(KV_DTYPE) for _ in range(layers)]
        self.sync()
        return [checksum(t) for t in self.layers]

    def fetch(self, layer: int) -> torch.Tensor:
        """Called with .options(tensor_transport=...): Ray keeps the tensor here and sends it
        out of band to the actor the ObjectRef is passed to."""
        return self.layers[layer]

    def fetch_cpu(self, layer: int) -> torch.Tensor:
        """The naive path: a host copy through the object store."""
        return self.layers[layer].cpu()


class RdtEdge(RdtEnd):
    """The edge end: per layer a paged cache [blocks, block size, H, 2 * hs] (K | V, NHD memory
    as in --device cuda) on its device and a random block table for the prompt's T tokens."""

    def load(self, tokens: int, layers: int) -> None:
        self.caches = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        num_blocks = 2 * (-(-tokens // BLOCK_SIZE))
        block_ids = torch.randperm(num_blocks)[:num_blocks // 2]
        t = torch.arange(tokens)
        self.slots = (block_ids[t // BLOCK_SIZE] * BLOCK_SIZE + t % BLOCK_SIZE).to(self.device)
        self.caches = [torch.zeros(num_blocks * BLOCK_SIZE, KV_HEADS, 2 * HEAD_SIZE,
                                   dtype=KV_DTYPE, device=self.device) for _ in range(layers)]
        self.sync()

    def clear(self) -> None:
        for c in self.caches:
            c.zero_()
        self.sync()

    def receive(self, kv: torch.Tensor, layer: int, sync: bool) -> None:
        """kv arrived through RDT (Ray received it into a fresh tensor on this device before this
        task ran): scatter it into the layer's paged cache."""
        cache = self.caches[layer]
        cache[self.slots, :, :HEAD_SIZE] = kv[0]
        cache[self.slots, :, HEAD_SIZE:] = kv[1]
        if sync:
            self.sync()

    def receive_cpu(self, refs: list, layer: int, sync: bool) -> None:
        """The naive path: ray.get the host copy from the object store, then `.cuda()`."""
        self.receive(ray.get(refs[0]).to(self.device), layer, sync)

    def gather(self, layer: int) -> torch.Tensor:
        """The layer back out of the paged cache, [2, T, H, hs] on this device."""
        rows = self.caches[layer][self.slots]
        return torch.stack([rows[..., :HEAD_SIZE], rows[..., HEAD_SIZE:]])

    def gather_cpu(self, layer: int) -> torch.Tensor:
        return self.gather(layer).cpu()

    def checksums(self) -> list[int]:
        return [checksum(self.gather(l)) for l in range(len(self.caches))]


class RdtPair:
    """A cloud actor and an edge actor (one GPU each on cuda), one collective group of
    `backend` ("nccl" on GPUs, "gloo" on CPU); the passes that move `layers` layers."""

    def __init__(self, backend: str, device: str, group_impl: str = "auto"):
        from ray.experimental.collective import create_collective_group

        self.backend, self.device = backend, device
        self.group_impl = rdt_group_impl(backend, group_impl)
        opts = {"num_cpus": 0, "num_gpus": 1 if device == "cuda" else 0}

        def make(cls):  # enable_tensor_transport on both: the receiver needs its thread too
            return (ray.remote(enable_tensor_transport=True)(cls).options(**opts)
                    .remote(device, backend, self.group_impl))

        self.cloud, self.edge = make(RdtCloud), make(RdtEdge)
        self.info = ray.get([self.cloud.info.remote(), self.edge.info.remote()])
        if device == "cuda" and self.info[0]["gpu_ids"] == self.info[1]["gpu_ids"]:
            raise RuntimeError(f"cloud and edge got the same GPU: {self.info}")
        self.group = create_collective_group([self.cloud, self.edge], backend=backend)
        self.group_classes = ray.get([a.group_class.remote(self.group.name)
                                      for a in (self.cloud, self.edge)])
        self.layers = 0

    def load(self, tokens: int, layers: int) -> None:
        self.layers = layers
        self.sums, _ = ray.get([self.cloud.load.remote(tokens, layers),
                                self.edge.load.remote(tokens, layers)])

    def rdt_pass(self, pipelined: bool) -> None:
        fetch = self.cloud.fetch.options(tensor_transport=self.backend)
        last = self.layers - 1
        if pipelined:
            ray.get([self.edge.receive.remote(fetch.remote(l), l, l == last)
                     for l in range(self.layers)])
        else:
            for l in range(self.layers):
                ray.get(self.edge.receive.remote(fetch.remote(l), l, True))

    def objstore_pass(self, pipelined: bool) -> None:
        last = self.layers - 1
        if pipelined:
            ray.get([self.edge.receive_cpu.remote([self.cloud.fetch_cpu.remote(l)], l, l == last)
                     for l in range(self.layers)])
        else:
            for l in range(self.layers):
                ray.get(self.edge.receive_cpu.remote([self.cloud.fetch_cpu.remote(l)], l, True))

    def measure(self, name: str, pass_fn, reps: int) -> float:
        """Best wall time of `reps` passes (after a warm-up: communicators, allocations), the
        edge's caches cleared before each; then the caches are checked against the cloud's."""
        walls = []
        for _ in range(reps + 1):
            ray.get(self.edge.clear.remote())
            t0 = time.perf_counter()
            pass_fn()
            walls.append(time.perf_counter() - t0)
        got = ray.get(self.edge.checksums.remote())
        if got != self.sums:
            raise RuntimeError(f"{name}: the edge's cache does not hold the cloud's layers "
                               f"(checksums {got} != {self.sums})")
        return min(walls[1:])

    def cases(self) -> list[tuple[str, bool, object]]:
        ostore = "ray-objstore-2gpu" if self.device == "cuda" else "ray-objstore-2proc"
        return [(f"ray-{self.backend}", False, lambda: self.rdt_pass(False)),
                (f"ray-{self.backend}-pipelined", True, lambda: self.rdt_pass(True)),
                (ostore, False, lambda: self.objstore_pass(False)),
                (f"{ostore}-pipelined", True, lambda: self.objstore_pass(True))]

    def close(self) -> None:
        """Kills both actors (their processes take the communicators with them), then forgets
        the group (Ray's destroy tasks then find the actors dead, which it accepts)."""
        from ray.experimental.collective import destroy_collective_group

        ray.kill(self.cloud)
        ray.kill(self.edge)
        try:
            destroy_collective_group(self.group)
        except ray.exceptions.RayActorError:
            pass


def pair_env(pair: RdtPair) -> dict:
    a, b = pair.info
    env = {"device": f"{a['device']} -> {b['device']}", "device_a": a["device"],
           "device_b": b["device"], "gpu_ids": [a["gpu_ids"], b["gpu_ids"]],
           "pci_bus_ids": [a["pci_bus_id"], b["pci_bus_id"]], "torch": torch.__version__,
           "rdt_group": "ray" if pair.group_impl == "ray" else "torch.distributed",
           "rdt_group_class": pair.group_classes[0]}
    if pair.device == "cuda":
        env["p2p"] = torch.cuda.can_device_access_peer(0, 1)  # the driver sees both GPUs
        v = torch.cuda.nccl.version()
        env["nccl"] = ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
        try:
            import cupy

            env["cupy"] = cupy.__version__
        except ImportError:
            env["cupy"] = None
    return env


def run_pair(args, env: dict) -> list[dict]:
    """--device cuda2 (nccl) and cpu2 (gloo): rows per (transport, size)."""
    device, backend = ("cuda", "nccl") if args.device == "cuda2" else ("cpu", "gloo")
    pair = RdtPair(backend, device, args.rdt_group)
    try:
        return pair_rows(pair, args, {**env, **pair_env(pair)})
    finally:
        pair.close()


def pair_rows(pair: RdtPair, args, env: dict) -> list[dict]:
    backend = pair.backend
    print(f"cloud {pair.info[0]['device']} (Ray GPU {pair.info[0]['gpu_ids']}) -> edge "
          f"{pair.info[1]['device']} (Ray GPU {pair.info[1]['gpu_ids']}); RDT over {backend}, "
          f"group: {env['rdt_group']} ({env['rdt_group_class']})", flush=True)
    per_token = 2 * KV_HEADS * HEAD_SIZE * KV_DTYPE.itemsize
    rows = []
    for mib in args.sizes_mib:
        tokens = max(1, int(mib * (1 << 20)) // per_token)
        pair.load(tokens, args.layers)
        for name, pipelined, pass_fn in pair.cases():
            best = pair.measure(name, pass_fn, args.reps)
            gbps = tokens * per_token * args.layers / best / 1e9
            via = "object store" if name.startswith("ray-objstore") else f"rdt {backend}"
            row = {"transport": name, "via": via, "pipelined": pipelined, "layer_mib": mib,
                   "layer_bytes": tokens * per_token, "layers": args.layers,
                   "GBps": round(gbps, 3), "best_ms": round(1e3 * best, 3), "reps": args.reps,
                   "verified": True, **env, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
            rows.append(row)
            print(f"{name:28s} layer {mib:7.3f} MiB  {gbps:8.3f} GB/s   "
                  f"{row['best_ms']:9.2f} ms for {args.layers} layers", flush=True)
    return rows


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    return platform.processor() or platform.machine()


if __name__ == "__main__":
    main()
