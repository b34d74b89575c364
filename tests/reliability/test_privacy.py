"""Privacy audit over everything the suite did (it runs last: tests/reliability/conftest.py):
normal requests, bad input, tenants, the soak and every fault, including the error paths.

Every call the edge sent toward the cloud (the audit log of transport/audit.py, written by the
engine's scheduler and worker and by the API server) must be one of the public calls with only
public arguments, and no edge text may appear in it, nor in any log at INFO: the edge's, the
cloud's, or any Ray log of the cluster. The edge prompts all carry MARKER (calls.edge_text)."""

import json
import pickle
from pathlib import Path

import pytest
from reliability.stack import MARKER

from edgeprompt_vllm.fingerprint import model_fingerprint
from edgeprompt_vllm.transport.codecs import CODECS

pytestmark = pytest.mark.slow
NUM_LAYERS = 4


def call_problems(record: dict, names: set[str], digest: str, fp: dict) -> list[str]:
    """Why an audited call is not a public one ([] if it is)."""
    method, args = pickle.loads(bytes.fromhex(record["pickled_hex"]))
    raw = bytes.fromhex(record["pickled_hex"])
    problems = [f"{method}: edge text in the bytes"] if MARKER.encode() in raw else []
    layer = lambda x: isinstance(x, int) and not isinstance(x, bool) and 0 <= x < NUM_LAYERS
    shapes = {
        "handshake": lambda a: a == (fp,),
        "registry": lambda a: a == (digest,),
        "catalog": lambda a: a == (digest,),
        "describe": lambda a: len(a) == 2 and a[0] in names and a[1] == digest,
        "fetch_layer": lambda a: len(a) == 3 and a[0] in names and a[1] == digest and layer(a[2]),
        "fetch_layers": lambda a: len(a) == 4 and a[0] in names and a[1] == digest
        and all(map(layer, a[2])) and a[3] in CODECS,
    }
    if method not in shapes:
        problems.append(f"unexpected call {method}")
    elif not shapes[method](tuple(args)):
        problems.append(f"{method}: arguments {args!r:.200} are not public ones")
    return problems


def test_the_edge_sent_only_public_calls(stack):
    fp = model_fingerprint(stack.model, "float32", 32)
    names = {p.stem for p in stack.registry_dir.glob("*.yaml")}
    records = [json.loads(x) for x in stack.audit_path.read_text().splitlines()]
    methods = [r["method"] for r in records]
    # the audit covers the error paths: reconnect handshakes after the faults, failed fetches
    assert methods.count("handshake") >= 4 and "fetch_layer" in methods and "catalog" in methods
    fetched = {pickle.loads(bytes.fromhex(r["pickled_hex"]))[1][0] for r in records
               if r["method"] == "fetch_layer"}
    assert {"f-corrupt", "f-stall", "f-kill", "f-tenant"} <= fetched  # f-node: only if caught mid-transfer
    problems = [p for r in records for p in call_problems(r, names, fp.digest(), fp.to_dict())]
    assert problems == []
    # the check can fail: an edge token id, a layer out of range, edge text are each caught
    bad = [("fetch_layer", ("f-kill", fp.digest(), 3001)), ("describe", (f"{MARKER} hi", fp.digest())),
           ("fetch_layers", ("f-kill", fp.digest(), [0, 1], "none", [3001, 3002]))]
    for method, args in bad:
        rec = {"pickled_hex": pickle.dumps((method, args)).hex()}
        assert call_problems(rec, names, fp.digest(), fp.to_dict())


def log_files(stack) -> list[Path]:
    files = [stack.tmp / "edge.log", *stack.cloud_logs, *stack.tmp.glob("*edge*.log"),
             *stack.tmp.glob("ray-*.log")]
    files += [p for p in Path(stack.ray_tmp).rglob("*") if p.is_file() and p.suffix in
              (".log", ".out", ".err", ".txt")]
    return sorted(set(files))


def test_no_edge_text_in_any_log(stack):
    files = log_files(stack)
    assert len(files) > 10
    text = {p: p.read_bytes() for p in files}
    assert sum(len(t) for t in text.values()) > 100_000
    assert any(b"f-kill" in t for t in text.values())  # the logs do name public cloud prompts
    leaks = [str(p) for p, t in text.items() if MARKER.encode() in t]
    assert leaks == []
