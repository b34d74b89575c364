"""The edge's API middleware without vLLM: validation (400), cloud unreachable (503 or fallback),
and how the cloud prompt is prepended. The app behind it echoes the body it receives."""

import hashlib
import json

import pytest
from fastapi import FastAPI, Request
from starlette.testclient import TestClient

from edgeprompt_vllm.config import EdgePromptConfig
from edgeprompt_vllm.serving.catalog import CatalogEntry, CloudCatalog
from edgeprompt_vllm.serving.middleware import EdgePromptMiddleware, rewrite
from edgeprompt_vllm.transport.client import CloudUnavailable

SYSTEM = "You are a travel agent."
CATALOG = [
    {"prompt_id": "agent", "token_ids": [1, 10, 11, 12], "kind": "system", "content": SYSTEM, "pinned": True},
    {"prompt_id": "guide", "token_ids": [1, 20, 21], "kind": "text", "content": "Guide text. "},
    {"prompt_id": "ids", "token_ids": [1, 30, 31], "kind": "tokens", "content": None},
]


class FakeCloud:
    """A catalog client: answers with `entries`, or raises while `down`."""

    def __init__(self):
        self.entries, self.down, self.calls = list(CATALOG), False, 0

    def catalog(self, timeout_s):
        self.calls += 1
        if self.down:
            raise CloudUnavailable("cloud actor died")
        return self.entries


def make_client(policy="recompute"):
    cloud = FakeCloud()
    config = EdgePromptConfig(on_cloud_unavailable=policy, health_timeout_s=1)
    catalog = CloudCatalog(config, connect=lambda: cloud)
    app = FastAPI()

    @app.post("/v1/completions")
    @app.post("/v1/chat/completions")
    @app.post("/v1/other")
    async def echo(request: Request):
        raw = await request.body()
        try:
            received = json.loads(raw)
        except ValueError:
            received = {"raw": raw.decode()}
        return {"received": received, "content_length": request.headers.get("content-length")}

    app.add_middleware(EdgePromptMiddleware, catalog=catalog, config=config)
    return TestClient(app), cloud, catalog


@pytest.fixture
def api():
    return make_client()


def post(client, path, body):
    r = client.post(path, json=body)
    return r.status_code, r.json()


def test_chat_gets_the_system_message_and_the_client_never_sends_it(api):
    client, _, _ = api
    code, out = post(client, "/v1/chat/completions", {
        "model": "m", "messages": [{"role": "user", "content": "Hi"}],
        "kv_transfer_params": {"cloud_prompt": "agent"}})
    assert code == 200
    assert out["received"]["messages"] == [{"role": "system", "content": SYSTEM},
                                           {"role": "user", "content": "Hi"}]
    assert out["received"]["kv_transfer_params"] == {"cloud_prompt": "agent"}
    assert int(out["content_length"]) == len(json.dumps(out["received"]).encode())


def test_completion_text_ids_and_batches(api):
    client, _, _ = api
    kv = {"kv_transfer_params": {"cloud_prompt": "guide"}}
    assert post(client, "/v1/completions", {"prompt": "Q?", **kv})[1]["received"]["prompt"] == "Guide text. Q?"
    assert post(client, "/v1/completions", {"prompt": [5, 6], **kv})[1]["received"]["prompt"] == [1, 20, 21, 5, 6]
    assert post(client, "/v1/completions", {"prompt": ["a", [7]], **kv})[1]["received"]["prompt"] == [
        "Guide text. a", [1, 20, 21, 7]]
    ids = {"kv_transfer_params": {"cloud_prompt": "ids"}}
    assert post(client, "/v1/completions", {"prompt": [9], **ids})[1]["received"]["prompt"] == [1, 30, 31, 9]


def test_requests_without_a_cloud_prompt_pass_untouched(api):
    client, cloud, _ = api
    for body in ({"prompt": "x"}, {"prompt": "x", "kv_transfer_params": None},
                 {"prompt": "x", "kv_transfer_params": {"cloud_prompt": None}}):
        assert post(client, "/v1/completions", body) == (200, {"received": body, "content_length": str(
            len(json.dumps(body, separators=(",", ":")).encode()))})
    body = {"prompt": "x", "kv_transfer_params": {"cloud_prompt": "agent"}}
    assert post(client, "/v1/other", body)[1]["received"] == body  # other routes: not ours
    r = client.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.json()["received"] == {"raw": "{not json"}  # passed on: vLLM's own validation answers it
    assert cloud.calls == 0  # nothing asked the cloud


@pytest.mark.parametrize("path, body, param, msg", [
    ("/v1/completions", {"prompt": "x", "kv_transfer_params": {"cloud_prompt": "nope"}},
     "kv_transfer_params.cloud_prompt", "unknown cloud prompt 'nope'; registered: agent, guide, ids"),
    ("/v1/completions", {"prompt": "x", "kv_transfer_params": {"cloud_prompt": 5}},
     "kv_transfer_params.cloud_prompt", "kv_transfer_params.cloud_prompt must be a string"),
    ("/v1/completions", {"prompt": "x", "kv_transfer_params": {"cloud_prompt": "bad name"}},
     "kv_transfer_params.cloud_prompt", "is not a valid cloud prompt name"),
    ("/v1/completions", {"prompt": "x", "kv_transfer_params": "agent"},
     "kv_transfer_params", "kv_transfer_params must be a JSON object"),
    ("/v1/completions", {"prompt": "x", "kv_transfer_params": {"cloud_promt": "agent"}},
     "kv_transfer_params", "unknown key(s) ['cloud_promt']"),
    ("/v1/completions", {"prompt": "x", "kv_transfer_params": {"cloud_prompt": "guide", "strategy": 3}},
     "kv_transfer_params.strategy", "kv_transfer_params.strategy must be one of"),
    ("/v1/completions", {"prompt": "x", "kv_transfer_params": {"cloud_prompt": "agent"}},
     "kv_transfer_params.cloud_prompt", "is a chat system prompt: use it with /v1/chat/completions"),
    ("/v1/completions", {"prompt": "x", "kv_transfer_params": {"cloud_prompt": "ids"}},
     "prompt", "registered as token ids"),
    ("/v1/completions", {"prompt": {"a": 1}, "kv_transfer_params": {"cloud_prompt": "guide"}},
     "prompt", "`prompt` must be a string"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "kv_transfer_params": {"cloud_prompt": "guide"}},
     "kv_transfer_params.cloud_prompt", "is not a chat system prompt: use it with /v1/completions"),
    ("/v1/chat/completions", {"messages": [{"role": "system", "content": "Mine."},
                                           {"role": "user", "content": "x"}],
                              "kv_transfer_params": {"cloud_prompt": "agent"}},
     "messages", "already has a system message"),
    ("/v1/chat/completions", {"messages": [], "kv_transfer_params": {"cloud_prompt": "agent"}},
     "messages", "`messages` must be a non-empty list"),
])
def test_bad_input_is_a_400_with_a_message(api, path, body, param, msg):
    client, _, _ = api
    code, out = post(client, path, body)
    assert code == 400, out
    assert out["error"]["code"] == 400 and out["error"]["type"] == "BadRequestError"
    assert out["error"]["param"] == param and msg in out["error"]["message"]
    # and the next good request still works
    ok = post(client, "/v1/completions", {"prompt": "x", "kv_transfer_params": {"cloud_prompt": "guide"}})
    assert ok[0] == 200


def test_the_cloud_prompt_itself_as_system_message_is_accepted(api):
    client, _, _ = api
    msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "x"}]
    out = post(client, "/v1/chat/completions", {"messages": msgs, "kv_transfer_params": {"cloud_prompt": "agent"}})
    assert out[1]["received"]["messages"] == msgs


def test_unknown_name_refreshes_the_catalog_first(api):
    client, cloud, _ = api
    assert post(client, "/v1/completions", {"prompt": "x", "kv_transfer_params": {"cloud_prompt": "guide"}})[0] == 200
    cloud.entries = cloud.entries + [{"prompt_id": "new", "token_ids": [1, 40], "kind": "text", "content": "N "}]
    out = post(client, "/v1/completions", {"prompt": "x", "kv_transfer_params": {"cloud_prompt": "new"}})
    assert out[0] == 200 and out[1]["received"]["prompt"] == "N x"


def test_unreachable_cloud_error_policy_is_a_503():
    client, cloud, catalog = make_client("error")
    body = {"prompt": "x", "kv_transfer_params": {"cloud_prompt": "guide"}}
    assert post(client, "/v1/completions", body)[0] == 200
    cloud.down = True
    catalog._ok_at -= 10  # the catalog is stale: the "error" policy asks the cloud again
    code, out = post(client, "/v1/completions", body)
    assert code == 503 and out["error"]["code"] == 503
    assert "cloud is unreachable" in out["error"]["message"] and "'guide'" in out["error"]["message"]
    assert post(client, "/v1/completions", {"prompt": "x"})[0] == 200  # no cloud prompt: served
    cloud.down = False
    catalog._failed_at -= 10
    assert post(client, "/v1/completions", body)[0] == 200  # back


def test_unreachable_cloud_recompute_policy_uses_the_last_catalog():
    client, cloud, catalog = make_client("recompute")
    body = {"prompt": "x", "kv_transfer_params": {"cloud_prompt": "guide"}}
    assert post(client, "/v1/completions", body)[0] == 200
    cloud.down = True
    catalog._ok_at -= 10
    code, out = post(client, "/v1/completions", body)
    assert code == 200 and out["received"]["prompt"] == "Guide text. x"  # the engine recomputes
    # a name it never saw cannot be checked: 503
    code, out = post(client, "/v1/completions", {"prompt": "x", "kv_transfer_params": {"cloud_prompt": "zzz"}})
    assert code == 503 and "cloud is unreachable" in out["error"]["message"]


def test_cloud_never_reached_is_a_503():
    client, cloud, _ = make_client("recompute")
    cloud.down = True
    code, out = post(client, "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                                      "kv_transfer_params": {"cloud_prompt": "agent"}})
    assert code == 503


def test_the_planner_strategy_passes_through(api):
    client, _, _ = api
    code, out = post(client, "/v1/completions", {
        "prompt": "x", "kv_transfer_params": {"cloud_prompt": "guide", "strategy": "bulk"}})
    assert code == 200 and out["received"]["kv_transfer_params"] == {"cloud_prompt": "guide", "strategy": "bulk"}


def test_with_an_api_key_unauthenticated_requests_are_left_to_vllm(api):
    """vLLM's --api-key check runs inside our middleware: without the key we touch nothing (and
    so answer nothing about cloud prompts); vLLM then answers 401."""
    client, _, _ = api
    client.post("/v1/other", json={})  # builds the middleware stack
    ours = client.app.middleware_stack
    while not isinstance(ours, EdgePromptMiddleware):
        ours = ours.app
    ours._api_keys = [hashlib.sha256(b"sk-1").digest()]
    body = {"prompt": "x", "kv_transfer_params": {"cloud_prompt": "nope"}}
    assert post(client, "/v1/completions", body)[1]["received"] == body
    r = client.post("/v1/completions", json=body, headers={"Authorization": "Bearer sk-1"})
    assert r.status_code == 400 and "unknown cloud prompt" in r.json()["error"]["message"]


def test_rewrite_is_pure():
    entry = CatalogEntry.from_dict(CATALOG[1])
    req = {"prompt": "q", "kv_transfer_params": {"cloud_prompt_id": "guide"}}
    out = rewrite("completions", req, entry)
    assert out == {"prompt": "Guide text. q", "kv_transfer_params": {"cloud_prompt": "guide"}}
    assert req["prompt"] == "q"
