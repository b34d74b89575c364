"""Cloud -> edge layer transfer: GB/s per transport and per layer size.

    python benchmarks/benchmark_transfer.py [--address HOST:PORT] [--sizes-mib 0.0625 1 16 64]

Transports (all through the real CloudClient/LayerStream, checksum verified, against a
synthetic cloud actor that serves the same API as CloudPromptService without a model):
  ray-shm       actor and edge on one node: ray.get of the actor-owned object is zero-copy
                from shared memory; cost = round trips + blake3 verify
  ray-shm+copy  the same, plus a copy into a fresh tensor (what writing into the KV cache costs)
  ray-xnode     (with --address of a cluster that has a node with the `cloud` resource) the actor
                on that node: Ray's object transfer between nodes
  raw-ray-get   plain ray.get of a numpy array in the object store, no client (the floor)
Prints one line per (transport, size) and appends JSON rows to benchmarks/results/transfer.jsonl.
GPU tensor transports (Ray direct transport over NCCL) are not measured here (see README).
"""

import argparse
import json
import sys
import subprocess
import os
import platform
import time
from pathlib import Path

import numpy as np
import ray
import torch

from edgeprompt_vllm.fingerprint import Fingerprint
from edgeprompt_vllm.transport.client import CloudClient
from edgeprompt_vllm.transport.wire import encode_layer

LAYERS = 8


class SyntheticCloud:
    """CloudPromptService's edge-facing API over random layers (bytes per layer = size)."""

    def __init__(self, fp: dict, size_bytes: int):
        self.fp = Fingerprint.from_dict(fp)
        t = max(1, size_bytes // (2 * 2 * 64 * 4))  # [2, T, 2 heads, 64] fp32
        self.slots = []
        for l in range(LAYERS):
            k, v = torch.randn(2, t, 2, 64).unbind(0)
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
    ap.add_argument("--sizes-mib", type=float, nargs="+", default=[0.0625, 1, 16, 64])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "transfer.jsonl"))
    args = ap.parse_args()
    if args.address:
        ray.init(address=args.address, log_to_driver=False)
    else:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                 object_store_memory=2 << 30)
    fp = fingerprint()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
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
                   "host": platform.node(), "cpu": _cpu_model(), "ray": ray.__version__,
                   "commit": commit, "command": " ".join(sys.argv), "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
            rows.append(row)
            print(f"{name:14s} layer {mib:8.4f} MiB  {gbps:8.3f} GB/s", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    return platform.processor() or platform.machine()


if __name__ == "__main__":
    main()
