"""End to end over one kernel-shaped link: cloud (Ray head + actor) in one network namespace,
the edge engine in another, joined by a veth pair shaped by tc (edgeprompt_vllm/netlab.py).

The cloud KV crosses the veth (its byte counter says so), the layer-wise transfer is measurably
hidden behind the edge's compute, the planner's decision and prediction come back with each
request, and the output equals stock vLLM's token for token."""

import json
import random
import sys
import uuid
from pathlib import Path

import pytest
from edge.cloud_run import CLOUD_TOKENS, EDGE_TOKENS, run, tokens

from edgeprompt_vllm import netlab

pytestmark = pytest.mark.slow
_OK, _WHY = netlab.available()
SCRIPT = Path(__file__).parents[1] / "scripts" / "netlab_generate.py"
RATE_MBIT = 200  # 512 cloud tokens: 512 KiB per layer, ~21 ms on this link; edge ~40 ms per layer


@pytest.fixture
def lab(tmp_path):
    if not _OK:
        pytest.skip(f"network namespaces unavailable here: {_WHY}")
    with netlab.NetLab(rate_mbit=RATE_MBIT, workdir=str(tmp_path / "lab")) as lab:
        lab.start_ray(cloud_cpus=1, edge_cpus=2, object_store_bytes=512 << 20)
        yield lab


def overlap(tl: dict) -> tuple[float, float, float]:
    """(transfer seconds on the link, seconds the edge waited, share of the transfer hidden)."""
    transfer = sum(m["ready_s"] - m["pull_s"] for m in tl["messages"])
    waited = tl["total_wait_s"]
    return transfer, waited, max(0.0, 1 - waited / transfer)


def test_shaped_link_overlaps_and_stays_exact(tiny_model, tmp_path, lab):
    rng = random.Random(8)
    A, B = tokens(rng, 512, CLOUD_TOKENS), tokens(rng, 512, CLOUD_TOKENS)
    req_a = {"token_ids": A + tokens(rng, 1400, EDGE_TOKENS), "cloud_prompt": "A",
             "params": {"strategy": "layerwise"}}
    req_b = {"token_ids": B + tokens(rng, 600, EDGE_TOKENS), "cloud_prompt": "B"}  # planner: auto
    stock = run(tiny_model, "stock", [[req_a], [req_b]], tmp_path, max_tokens=4)

    tag = uuid.uuid4().hex[:8]
    spec = {"mode": "edge", "model": str(tiny_model), "requests": [[req_a], [req_b]], "max_tokens": 4,
            "namespace": f"ep-netlab-{tag}", "actor_name": f"cloud-{tag}", "ray_address": lab.ray_address,
            "cloud_prompts": {"A": A, "B": B}, "prefill": True, "cloud_resources": {"cloud": 1},
            "extra_config": {"ray_node_ip": netlab.EDGE_IP, "timeline_path": str(tmp_path / "tl.jsonl")}}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    rx0 = lab.rx_bytes("edge")
    p = lab.run_in("edge", [sys.executable, str(SCRIPT), str(tmp_path / "spec.json"), str(tmp_path / "out.json")],
                   log=tmp_path / "edge.log", timeout=600)
    if p.returncode != 0:
        raise AssertionError(f"edge run failed:\n{(tmp_path / 'edge.log').read_text()[-4000:]}")
    edge = json.loads((tmp_path / "out.json").read_text())
    rx = lab.rx_bytes("edge") - rx0

    print(lab.qdiscs())
    a, b = edge["edgeprompt"]
    print("request A:", a, "\nrequest B:", b)
    assert a["status"] == "loaded" and a["strategy"] == "layerwise" and a["predicted_ttft_s"] > 0
    assert b["strategy"] in ("layerwise", "grouped", "bulk", "recompute") and b["predicted_ttft_s"] > 0
    assert b["status"] == ("recompute" if b["strategy"] == "recompute" else "loaded")
    # exact: EdgePrompt over the shaped link == stock vLLM on the concatenated prompts
    assert edge["token_ids"] == stock["token_ids"]

    tl = edge["timeline"][0]
    layer_bytes = tl["layers"][0]["nbytes"]
    assert layer_bytes == 2 * 512 * 2 * 64 * 4
    assert rx >= len(tl["layers"]) * layer_bytes  # the KV crossed the veth, not shared memory
    transfer, waited, hidden = overlap(tl)
    L = len(tl["layers"])
    print(f"link {RATE_MBIT} Mbit/s: transfer {1e3 * transfer:.1f} ms on the link, edge waited "
          f"{1e3 * waited:.1f} ms, hidden {100 * hidden:.0f}% (layer-wise bound (L-1)/L = "
          f"{100 * (L - 1) / L:.0f}% + the compute before layer 0)")
    assert transfer >= L * layer_bytes / (RATE_MBIT * 1e6 / 8) * 0.8  # the shaping was in force
    assert hidden >= 0.5, f"only {hidden:.0%} of the transfer was hidden"


def test_cpus_are_split_between_cloud_and_edge():
    assert netlab.split_cpus(1) is None  # nothing to split: both sides share the CPU
    assert netlab.split_cpus(2) == {"cloud": "0", "edge": "1"}
    assert netlab.split_cpus(7) == {"cloud": "0-2", "edge": "3-6"}
    assert [netlab._count(c) for c in ("0", "3-6", "0,2-3")] == [1, 4, 3]
