"""The transfer benchmark's two-actor mode (--device cuda2 on two GPUs, RDT over NCCL) on CPU:
the same code with RDT over gloo between a cloud actor and an edge actor. The edge's paged cache
must hold exactly the cloud's layers, through Ray's own gloo group and through the
torch.distributed group that the benchmark registers under Ray's NCCL name when cupy is
missing, and the CLI must write JSONL rows. The two-actor code is benchmarks/transfer_pair.py,
which benchmark_transfer.py imports."""

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import ray
import torch
from helpers import load_benchmark

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "benchmark_transfer.py"
LAYERS = 2
TOKENS = 16  # 16 x 8 heads x 128 x 2 (K, V) x 2 B = 64 KiB a layer

# transfer_pair registers itself with Ray's cloudpickle: its actor classes go to the workers by
# value (no worker can import it by name)
BT = load_benchmark("transfer_pair")


@pytest.fixture(scope="module")
def bt():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield BT
    finally:
        ray.shutdown()


@pytest.mark.parametrize("group_impl,group_class", [("ray", "TorchGLOOGroup"),
                                                    ("torch", "TorchDistGLOOGroup")])
def test_rdt_moves_the_exact_layers_into_the_edge_cache(bt, group_impl, group_class):
    pair = bt.RdtPair("gloo", "cpu", group_impl)
    try:
        assert pair.group_classes == [group_class, group_class]
        pair.load(TOKENS, LAYERS)
        sent = ray.get([pair.cloud.fetch_cpu.remote(l) for l in range(LAYERS)])
        assert sent[0].shape == (2, TOKENS, 8, 128) and sent[0].dtype == torch.bfloat16
        assert sent[0].numel() * 2 == 64 << 10
        assert pair.sums == [bt.checksum(t) for t in sent]
        for pipelined in (False, True):
            ray.get(pair.edge.clear.remote())
            assert ray.get(pair.edge.checksums.remote()) != pair.sums
            pair.rdt_pass(pipelined)
            got = ray.get([pair.edge.gather_cpu.remote(l) for l in range(LAYERS)])
            assert all(torch.equal(g, s) for g, s in zip(got, sent, strict=True))
            assert ray.get(pair.edge.checksums.remote()) == pair.sums
        # the timed path checks the cache itself, and the object store baseline lands the same
        for name, _, pass_fn in pair.cases():
            assert pair.measure(name, pass_fn, reps=1) > 0
        # a wrong cache is caught
        ray.get(pair.edge.clear.remote())
        with pytest.raises(RuntimeError, match="does not hold the cloud's layers"):
            pair.measure("nothing", lambda: None, reps=1)
    finally:
        pair.close()


def test_checksum_sees_order_and_content():
    t = torch.randn(2, 16, 8, 128).to(torch.bfloat16)
    assert BT.checksum(t) == BT.checksum(t.clone())
    assert BT.checksum(t) != BT.checksum(t.flip(1))
    u = t.clone()
    u.view(-1)[5] = u.view(-1)[5] + 1
    assert BT.checksum(t) != BT.checksum(u)


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout, check=False)


def test_cpu2_cli_writes_rows(tmp_path):
    out = tmp_path / "cpu2.jsonl"
    proc = run_cli("--device", "cpu2", "--sizes-mib", "0.0625", "--layers", str(LAYERS),
                   "--reps", "1", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["transport"] for r in rows] == ["ray-gloo", "ray-gloo-pipelined",
                                              "ray-objstore-2proc", "ray-objstore-2proc-pipelined"]
    for r in rows:
        assert {"transport", "via", "pipelined", "layer_mib", "layer_bytes", "layers", "GBps",
                "best_ms", "reps", "verified", "device", "device_a", "device_b", "gpu_ids",
                "pci_bus_ids", "rdt_group", "rdt_group_class", "ray", "torch", "commit",
                "command", "host", "cpu", "time"} <= set(r)
        assert r["layer_mib"] == 0.0625 and r["layer_bytes"] == 64 << 10 and r["layers"] == LAYERS
        assert r["GBps"] > 0 and r["verified"] is True and r["rdt_group"] == "ray"
        assert r["device_a"].startswith("CPU") and r["ray"] == ray.__version__
        assert r["via"] == ("object store" if "objstore" in r["transport"] else "rdt gloo")
    assert sum(f"{r['transport']} " in proc.stdout for r in rows) == 4  # one line per row


def test_link_cli_moves_the_same_bytes_over_both_connector_transports(tmp_path, tiny_model):
    """--device link on CPU: a real cloud actor, the connector's pair link (gloo) and its object
    store path; the script itself fails unless both delivered identical layers."""
    out = tmp_path / "link.jsonl"
    proc = run_cli("--device", "link", "--model", str(tiny_model), "--sizes-mib", "0.0625",
                   "--reps", "1", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["transport"] for r in rows] == ["edgeprompt-pair", "edgeprompt-objstore"]
    for r in rows:
        assert r["pair_backend"] == "gloo" and r["cloud_device"] == "CPU" and r["layers"] == 4
        assert r["tokens"] == 64 and r["layer_mib"] == 0.062 and r["GBps"] > 0
    assert rows[0]["cold_s"] > 0 and rows[1]["cold_s"] is None
    per_layer = rows[0]["per_layer_ms"]  # the pair stream's medians; none for the object store
    assert set(per_layer) == {"arrival_gap", "receive", "checksum", "ask_to_arrival"}
    assert per_layer["ask_to_arrival"] >= per_layer["receive"] > 0 and per_layer["checksum"] > 0
    assert rows[1]["per_layer_ms"] is None and "per layer, ms (medians)" in proc.stdout


def test_benchmark_transfer_loads_from_its_path_and_runs_the_pair_module():
    module = load_benchmark("benchmark_transfer")
    assert module.run_pair is BT.run_pair and module.cpu_model is BT.cpu_model
    assert module.CUDA_FP[2:4] == (BT.KV_HEADS, BT.HEAD_SIZE)
    assert module.CUDA_FP[4] == "bfloat16" and module.CUDA_FP[6] == BT.BLOCK_SIZE
    assert ray.cloudpickle.cloudpickle._is_registered_pickle_by_value(BT)


def test_pci_bus_id_is_the_full_id():
    props = SimpleNamespace(pci_domain_id=0, pci_bus_id=0, pci_device_id=7)
    assert BT.pci_bus_id(props) == "00000000:00:07.0"
    props = SimpleNamespace(pci_domain_id=1, pci_bus_id=0x1B, pci_device_id=0x10)
    assert BT.pci_bus_id(props) == "00000001:1b:10.0"
    assert BT.pci_bus_id(SimpleNamespace(pci_bus_id=6)) is None  # a torch without the fields


@pytest.mark.skipif(torch.cuda.device_count() >= 2, reason="two GPUs are visible")
def test_cuda2_needs_two_gpus(tmp_path):
    proc = run_cli("--device", "cuda2", "--out", str(tmp_path / "x.jsonl"), timeout=120)
    assert proc.returncode == 2
    assert "--device cuda2 needs 2 CUDA GPUs" in proc.stderr
    assert not (tmp_path / "x.jsonl").exists()
