"""The transfer benchmark's --device cuda2 / cpu2 (benchmark_transfer.py runs it): two actors,
Ray Direct Transport.

--device cuda2 (two GPUs; default benchmarks/results/transfer/cuda2.jsonl; --device cuda's
model-like layers, --layers of them): a cloud actor (num_gpus=1) holds the layers as CUDA
tensors on GPU A, an edge actor (num_gpus=1) scatters each into a paged cache (random block
table) on GPU B:
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
GPU ids and PCI ids (domain:bus:device.function), and whether they can access each other's
memory (P2P).
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

import os
import sys
import time

import ray
import torch
from ray.util.collective.collective_group.torch_gloo_collective_group import TorchGLOOGroup

from edgeprompt_vllm.bench.env import cpu_name
from edgeprompt_vllm.transport.pair_group import device_checksum as checksum  # both ends

# the model-like layers (also --device cuda's): KV heads x head size, bf16, block size
KV_HEADS, HEAD_SIZE, BLOCK_SIZE = 8, 128, 16
KV_DTYPE = torch.bfloat16

# the actor classes go to the workers by value, as when they were defined in the script's
# __main__ (a worker, e.g. on another node of --address's cluster, may not import this file)
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def cpu_model() -> str:
    """The CPU's model name and core count (rows' "cpu"; the CPU actors' "device")."""
    return f"{cpu_name()} ({os.cpu_count()} cores)"


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


def pci_bus_id(props) -> str | None:
    """A CUDA device's full PCI id, domain:bus:device.function as nvidia-smi prints it (torch's
    props.pci_bus_id alone is only the bus number); None where torch lacks the fields."""
    ids = [getattr(props, f"pci_{k}_id", None) for k in ("domain", "bus", "device")]
    if not all(isinstance(i, int) for i in ids):
        return None
    domain, bus, device = ids
    return f"{domain:08x}:{bus:02x}:{device:02x}.0"


class RdtEnd:
    """What both actors share: their device, the collective group implementation, info()."""

    def __init__(self, device: str, backend: str, group_impl: str):
        if group_impl == "torch":
            use_torch_group(backend)
        self.device = torch.device(device)

    def info(self) -> dict:
        if self.device.type != "cuda":
            return {"device": f"CPU: {cpu_model()}", "gpu_ids": [], "pci_bus_id": None}
        props = torch.cuda.get_device_properties(self.device)
        return {"device": props.name, "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
                "pci_bus_id": pci_bus_id(props)}

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
