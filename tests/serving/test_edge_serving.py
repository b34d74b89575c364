"""End to end, as a user runs it: `edgeprompt cloud` (a real Ray cluster and cloud actor), then
`vllm serve` with the command it prints (plugin, connector, relay attention, middleware), driven
by the `openai` client; every answer compared with a stock `vllm serve` (no plugin) on the
concatenated prompt, greedy, logprobs within the fp32 tolerance.

Order matters (one server per module): equal outputs, bad inputs, concurrency, then the cloud
actor is killed (fallback and 503), then /metrics.
"""

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest
import yaml

from edgeprompt_vllm.cloud.prompt_files import default_registry_dir
from edgeprompt_vllm.serving.prom import scrape, total
from edgeprompt_vllm.serving.server import CPU_ENGINE_ARGS, CPU_SERVE_ARGS, VllmServer
from helpers import interruptible

pytestmark = pytest.mark.slow
ATOL = 1e-4  # tests/edge/tolerance.py, fp32
SPARE_SYSTEM = ("You are the assistant of a bicycle repair shop. Answer briefly, recommend a visit "
                "for anything about brakes, and never quote prices; the shop opens at nine. " * 3)


@dataclass
class Cloud:
    proc: subprocess.Popen
    log: Path
    address: str
    namespace: str
    edge_command: str


def _wait_for(log: Path, proc, pattern: str, timeout: float) -> re.Match:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = re.search(pattern, log.read_text(errors="replace"), re.M)
        if m:
            return m
        if proc.poll() is not None:
            raise RuntimeError(f"edgeprompt cloud exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        time.sleep(0.3)
    raise TimeoutError(f"no {pattern!r} in {log}:\n{log.read_text()[-3000:]}")


def pin_layerwise(args: list[str]) -> list[str]:
    """Where the planner exists (edge/planner.py), fix its strategy to layer-wise fetching: on
    this CPU it may rightly find the tiny model's own prefill faster than any transfer, and these
    tests are about the transfer path."""
    from dataclasses import fields

    from edgeprompt_vllm.config import EdgePromptConfig

    if "strategy" not in {f.name for f in fields(EdgePromptConfig)}:
        return args
    i = args.index("--kv-transfer-config") + 1
    kvt = json.loads(args[i])
    kvt["kv_connector_extra_config"]["strategy"] = "layerwise"
    return [*args[:i], json.dumps(kvt), *args[i + 1:]]


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    reg = tmp_path_factory.mktemp("registry")
    for p in default_registry_dir().glob("*.yaml"):
        shutil.copy(p, reg)
    (reg / "spare.yaml").write_text(yaml.safe_dump({"name": "spare", "system": SPARE_SYSTEM}))
    return {s["name"]: s for s in (yaml.safe_load(p.read_text()) for p in reg.glob("*.yaml"))} | {"_dir": reg}


@pytest.fixture(scope="module")
def servers(tiny_model, registry, tmp_path_factory):
    """-> (cloud, edge, stock); the stock server starts while the cloud prefills."""
    tmp = tmp_path_factory.mktemp("serving")
    ns = f"ep-serve-{uuid.uuid4().hex[:8]}"
    log = tmp / "cloud.log"
    exe = str(Path(sys.executable).parent / "edgeprompt")
    proc = subprocess.Popen(
        [exe, "cloud", "--model", str(tiny_model), "--prompts", str(registry["_dir"]),
         "--ray-address", "local", "--namespace", ns, "--actor-name", "cloud", "--no-progress"],
        **interruptible(stdout=open(log, "wb"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                        start_new_session=True))
    stock = edge = None
    try:
        stock = VllmServer(tiny_model, extra_args=(*CPU_SERVE_ARGS, "--block-size", "32"),
                           env={"VLLM_PLUGINS": ""}, log_path=tmp / "stock.log")
        stock.start()
        address = _wait_for(log, proc, r"Ray cluster (\S+) \(started here\)", 120).group(1)
        command = _wait_for(log, proc, r"^  ((?:\w+=\S+ )*vllm serve .*)$", 240).group(1)
        _wait_for(log, proc, r"serving; Ctrl-C stops it", 30)
        cloud = Cloud(proc, log, address, ns, command)
        words = shlex.split(command)  # [VAR=value ...] vllm serve MODEL FLAGS...
        env = dict(w.split("=", 1) for w in words[:words.index("vllm")])
        edge_args = pin_layerwise(words[words.index("vllm") + 3:])
        edge = VllmServer(tiny_model, extra_args=(*edge_args, *CPU_ENGINE_ARGS), env=env,
                          log_path=tmp / "edge.log")
        edge.start()
        yield cloud, edge, stock
    finally:
        for srv in (edge, stock):
            if srv is not None:
                srv.stop()
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # Ctrl-C: the command stops its actor and cluster
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


_DRIVER = """
import json, sys, ray
from edgeprompt_vllm.fingerprint import Fingerprint
address, namespace, action = sys.argv[1:4]
ray.init(address=address, namespace=namespace, log_to_driver=False, logging_level="WARNING")
actor = ray.get_actor("cloud", namespace=namespace)
if action == "catalog":
    digest = Fingerprint.from_dict(ray.get(actor.stats.remote())["fingerprint"]).digest()
    print(json.dumps(ray.get(actor.catalog.remote(digest))))
elif action == "kill":
    ray.kill(actor)
    print("[]")
"""


def cloud_driver(cloud: Cloud, action: str):
    """A short-lived Ray driver on the cloud's cluster (not this process: Ray keeps global state).
    Joining by address needs RAY_AUTH_MODE=token (serving/edge_args.ray_env)."""
    out = subprocess.run([sys.executable, "-c", _DRIVER, cloud.address, cloud.namespace, action],
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, "RAY_AUTH_MODE": "token"})
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def clients(servers):
    _, edge, stock = servers
    mk = lambda s: openai.OpenAI(base_url=s.base_url + "/v1", api_key="EMPTY", timeout=300, max_retries=0)
    return mk(edge), mk(stock), edge.model


def cloud_kv(name):
    return {"kv_transfer_params": {"cloud_prompt": name}}


def edgeprompt_status(resp):
    return ((resp.model_extra or {}).get("kv_transfer_params") or {}).get("edgeprompt")


def chat_tokens(resp):
    lp = resp.choices[0].logprobs.content
    return [x.token for x in lp], [x.logprob for x in lp]


def completion_tokens(resp):
    lp = resp.choices[0].logprobs
    return lp.tokens, lp.token_logprobs


def assert_same(edge, stock, tokens):
    (te, le), (ts, ls) = tokens(edge), tokens(stock)
    assert te == ts, f"greedy tokens differ:\n{te}\n{ts}"
    assert max(abs(a - b) for a, b in zip(le, ls)) <= ATOL


def chat(client, model, user, system=None, stream=False, **kw):
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    r = client.chat.completions.create(model=model, messages=msgs, max_tokens=16, temperature=0,
                                       stream=stream, **({} if stream else {"logprobs": True, "top_logprobs": 1}), **kw)
    if stream:
        return "".join(c.choices[0].delta.content or "" for c in r if c.choices)
    return r


def complete(client, model, prompt, stream=False, **kw):
    r = client.completions.create(model=model, prompt=prompt, max_tokens=16, temperature=0, stream=stream,
                                  **({} if stream else {"logprobs": 1}), **kw)
    if stream:
        return "".join(c.choices[0].text for c in r if c.choices)
    return r


def test_the_cloud_command_prints_the_documented_edge_command(servers, registry):
    cloud = servers[0]
    text = cloud.log.read_text()
    assert cloud.edge_command.startswith("RAY_AUTH_MODE=token vllm serve ")
    assert "[cloud] ready: 3 cloud prompt(s): lisbon-guide (text), spare (system), travel-agent (system, pinned)" in text
    for flag in ("--attention-backend CUSTOM", "--middleware edgeprompt_vllm.serving.middleware.EdgePromptMiddleware",
                 "--dtype float32", "--block-size 32", '"kv_connector":"EdgePromptConnector"',
                 f'"ray_address":"{cloud.address}"', f'"namespace":"{cloud.namespace}"'):
        assert flag in cloud.edge_command


def test_chat_with_a_cloud_prompt_equals_stock_on_the_full_prompt(clients, registry):
    edge, stock, model = clients
    system = registry["travel-agent"]["system"]
    q = "Which three things should I pack for Lisbon?"
    e = chat(edge, model, q, extra_body=cloud_kv("travel-agent"))
    s = chat(stock, model, q, system=system)
    assert_same(e, s, chat_tokens)
    assert edgeprompt_status(e)["status"] in ("loaded", "cached") and edgeprompt_status(e)["cloud_tokens"] >= 256
    q2 = "Can I surf in July?"
    assert chat(edge, model, q2, stream=True, extra_body=cloud_kv("travel-agent")) == \
        chat(stock, model, q2, system=system, stream=True)
    # the client may also send the cloud prompt itself: recognised by its tokens, no parameter
    e = chat(edge, model, q2, system=system)
    assert edgeprompt_status(e) == {"cloud_prompt": "travel-agent", "cloud_tokens": 320, "status": "cached",
                                    "loaded_tokens": 0}
    assert_same(e, chat(stock, model, q2, system=system), chat_tokens)


def test_completions_with_a_cloud_prompt_equal_stock(servers, clients, registry):
    edge, stock, model = clients
    text = registry["lisbon-guide"]["text"]
    q = "Which shoes should I wear on the hills?\nAnswer:"
    e = complete(edge, model, q, extra_body=cloud_kv("lisbon-guide"))
    assert_same(e, complete(stock, model, text + q), completion_tokens)
    assert edgeprompt_status(e)["status"] in ("loaded", "cached")
    assert complete(edge, model, q, stream=True, extra_body=cloud_kv("lisbon-guide")) == \
        complete(stock, model, text + q, stream=True)
    # token ids: the cloud prompt's ids + the client's ids
    cloud_ids = {d["prompt_id"]: d["token_ids"] for d in cloud_driver(servers[0], "catalog")}["lisbon-guide"]
    ids = [3333, 1234, 777, 42, 2048]
    e = complete(edge, model, ids, extra_body=cloud_kv("lisbon-guide"))
    assert_same(e, complete(stock, model, cloud_ids + ids), completion_tokens)
    assert edgeprompt_status(e)["status"] == "cached"
    # no cloud prompt at all: plain vLLM
    e = complete(edge, model, "The capital of Portugal is")
    assert edgeprompt_status(e) is None
    assert_same(e, complete(stock, model, "The capital of Portugal is"), completion_tokens)


def test_bad_input_is_a_400_with_a_message_and_the_server_keeps_serving(clients):
    edge, _, model = clients
    cases = [
        (lambda: complete(edge, model, "x", extra_body=cloud_kv("nope")), "unknown cloud prompt 'nope'"),
        (lambda: chat(edge, model, "x", extra_body=cloud_kv("nope")), "unknown cloud prompt 'nope'"),
        (lambda: complete(edge, model, "x", extra_body={"kv_transfer_params": {"cloud_prompt": 7}}),
         "cloud_prompt must be a string"),
        (lambda: complete(edge, model, "x", extra_body={"kv_transfer_params": ["travel-agent"]}),
         "kv_transfer_params must be a JSON object"),
        (lambda: complete(edge, model, "x", extra_body={"kv_transfer_params": {"prompt": "travel-agent"}}),
         "unknown key(s) ['prompt']"),
        (lambda: chat(edge, model, "x", extra_body=cloud_kv("lisbon-guide")), "not a chat system prompt"),
        (lambda: complete(edge, model, "x", extra_body=cloud_kv("travel-agent")), "is a chat system prompt"),
        # over-long only with the cloud prompt: 1800 tokens fit alone, not after its 328
        (lambda: complete(edge, model, " hello" * 900, extra_body=cloud_kv("lisbon-guide")), "2048"),
    ]
    for call, msg in cases:
        with pytest.raises(openai.BadRequestError) as err:
            call()
        assert err.value.status_code == 400 and msg in str(err.value), str(err.value)
    assert complete(edge, model, " hello" * 900).usage.prompt_tokens == 1801
    ok = chat(edge, model, "Hello!", extra_body=cloud_kv("travel-agent"))
    assert ok.usage.completion_tokens == 16


def test_concurrent_users_share_the_cloud_blocks(clients, registry):
    edge, stock, model = clients
    system = registry["travel-agent"]["system"]
    qs = ["Is Sintra worth a day?", "Best month for the Azores?", "Trains from Porto?", "Wine in the Douro?"]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda q: chat(edge, model, q, extra_body=cloud_kv("travel-agent")), qs))
    for q, e in zip(qs, got):
        assert_same(e, chat(stock, model, q, system=system), chat_tokens)
        assert edgeprompt_status(e)["status"] == "cached"


def test_unreachable_cloud_falls_back_or_503(servers, clients, registry):
    """The default policy ("recompute"): a cloud prompt the edge knows is computed on the edge;
    a name it cannot check without the cloud is a 503."""
    edge, stock, model = clients
    cloud_driver(servers[0], "kill")
    time.sleep(1.5)  # past the middleware's catalog freshness
    q = "My brakes squeak, what now?"
    e = chat(edge, model, q, extra_body=cloud_kv("spare"))  # never loaded on this edge
    assert_same(e, chat(stock, model, q, system=SPARE_SYSTEM), chat_tokens)
    assert edgeprompt_status(e)["status"] == "load_failed_recomputed"
    with pytest.raises(openai.APIStatusError) as err:
        complete(edge, model, "x", extra_body=cloud_kv("registered-later"))
    assert err.value.status_code == 503 and "cloud is unreachable" in str(err.value)
    assert complete(edge, model, "Still serving").usage.completion_tokens == 16


def test_metrics_endpoint_has_the_edgeprompt_counters(servers):
    _, edge, _ = servers
    samples = scrape(edge.base_url)
    deadline = time.monotonic() + 10
    while total(samples, "edgeprompt_cloud_prompt_misses_total") < 1 and time.monotonic() < deadline:
        time.sleep(0.3)
        samples = scrape(edge.base_url)
    t = lambda name, **kw: total(samples, name, **kw)
    assert t("edgeprompt_cloud_kv_bytes_total") >= 2 * 4 * 2 * 320 * 2 * 64 * 4  # 2 prompts x 4 layers
    assert t("edgeprompt_cloud_layers_received_total") >= 8
    assert t("edgeprompt_cloud_loaded_tokens_total") >= 640
    assert t("edgeprompt_cloud_prompt_hits_total", kind="loaded") >= 2
    assert t("edgeprompt_cloud_prompt_hits_total", kind="cached") >= 6
    assert t("edgeprompt_cloud_prompt_misses_total", reason="load_failed") >= 1
    assert t("edgeprompt_cloud_layer_failures_total") >= 4
    assert t("edgeprompt_layer_wait_seconds_count") >= 8 and t("edgeprompt_layer_wait_seconds_sum") > 0
    assert t("edgeprompt_cloud_load_seconds_count") >= 2
    assert t("edgeprompt_relay_groups_total") >= 1
    assert t("edgeprompt_relay_groups_per_step_count") > t("edgeprompt_relay_groups_per_step_bucket", le="0.0")


def test_the_cloud_command_stops_cleanly_on_ctrl_c(servers):
    cloud = servers[0]
    cloud.proc.send_signal(signal.SIGINT)
    assert cloud.proc.wait(timeout=60) == 0
    assert "[cloud] stopping" in cloud.log.read_text()
