"""Two Ray nodes on one machine: the cloud actor on the node with the `cloud` resource, the edge
engine (and its object reads) on the head node; exact output across the node boundary."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from edge.cloud_run import CLOUD_TOKENS, EDGE_TOKENS, run, tokens

from edgeprompt_vllm.serving.server import free_port

pytestmark = pytest.mark.slow
RAY = str(Path(sys.executable).parent / "ray")
# Ray >= 2.5x enables token auth for clusters it starts; say so explicitly everywhere (nodes,
# probes, the edge engine's processes), so all of them read the same ~/.ray/auth_token.
ENV = {**os.environ, "RAY_AUTH_MODE": "token"}


def _ray_node(args, log: Path):
    # --block: the node lives as long as this process group, which we end ourselves (never
    # `ray stop`, which would stop every Ray node on the machine, other users' too).
    return subprocess.Popen([RAY, "start", "--block", "--disable-usage-stats", *args],
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True, env=ENV)


def _wait_nodes(address: str, n: int, timeout: float = 90) -> None:
    code = ("import ray,sys; ray.init(address=sys.argv[1], log_to_driver=False);"
            "print(sum(1 for x in ray.nodes() if x['Alive']))")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        p = subprocess.run([sys.executable, "-c", code, address], capture_output=True, text=True, env=ENV)
        if p.returncode == 0 and p.stdout.strip().splitlines()[-1:] == [str(n)]:
            return
        time.sleep(2)
    raise TimeoutError(f"{n} Ray nodes not up at {address}")


@pytest.fixture
def two_nodes(tmp_path):
    from ray.util import get_node_ip_address

    port = free_port()
    address = f"{get_node_ip_address()}:{port}"
    procs = [_ray_node(["--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=false"],
                       tmp_path / "head.log")]
    try:
        _wait_nodes(address, 1)
        procs.append(_ray_node([f"--address={address}", "--num-cpus=1", '--resources={"cloud": 1}'],
                               tmp_path / "cloud.log"))
        _wait_nodes(address, 2)
        yield address
    finally:
        for p in reversed(procs):
            try:
                os.killpg(p.pid, signal.SIGTERM)
                p.wait(timeout=5)  # a node drains for up to 30 s; nothing of ours is left to drain
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=30)
            except ProcessLookupError:
                pass


def test_cloud_on_its_node_edge_on_the_other(tiny_model, tmp_path, two_nodes):
    """Both transports across the node boundary: the object store, and the pair channel (gloo
    here) with its receiver actor pinned to the edge's node."""
    rng = random.Random(2)
    A = tokens(rng, 200, CLOUD_TOKENS)
    reqs = [{"token_ids": A + tokens(rng, n, EDGE_TOKENS), "cloud_prompt": "A"} for n in (9, 40)]
    stock = run(tiny_model, "stock", [reqs], tmp_path)
    for transport in ("object_store", "pair"):
        audit = tmp_path / f"audit_{transport}.jsonl"
        edge = run(tiny_model, "edge", [reqs], tmp_path, ray_address=two_nodes, env=ENV,
                   cloud_prompts={"A": A}, cloud_resources={"cloud": 1},
                   extra_config={"transport": transport, "audit_path": str(audit)})
        assert edge["cloud"]["node_id"] != edge["edge_node"]
        assert [s["status"] for s in edge["edgeprompt"]] == ["loaded", "cached"], transport
        assert edge["token_ids"] == stock["token_ids"], transport
        calls = [json.loads(x)["method"] for x in audit.read_text().splitlines()]
        assert ("pair_send" in calls) == (transport == "pair"), calls
