"""Bad input at every boundary of the running edge (tests/serving covers the basic 400s:
unknown name, non-object params, unknown keys, wrong endpoint, too long with the cloud prompt).
Here: raw bodies the client library would not send, empty edge prompts, more over-long shapes,
and a cloud prompt registry with errors. Each is a 4xx with a message (no traceback, never a
500), and the edge answers correctly right after."""

import json
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest
from reliability.calls import assert_same_as_stock, client, cloud_text, complete, status
from reliability.stack import RAY_ENV

pytestmark = pytest.mark.slow


def post(stack, path: str, body: bytes | dict) -> tuple[int, str]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(stack.edge.base_url + path, data=data,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def body(stack, **kw) -> dict:
    return {"model": stack.edge.model, "prompt": "Hi", "max_tokens": 4, **kw}


BAD = [  # (path, body or a function of the stack, expected words in the message)
    ("/v1/completions", lambda s: body(s, kv_transfer_params={"cloud_prompt": ""}), "not a valid cloud prompt name"),
    ("/v1/completions", lambda s: body(s, kv_transfer_params={"cloud_prompt": "x" * 500}), "not a valid cloud prompt name"),
    ("/v1/completions", lambda s: body(s, kv_transfer_params={"cloud_prompt": "../../etc/passwd"}), "not a valid cloud prompt name"),
    ("/v1/completions", lambda s: body(s, kv_transfer_params={"cloud_prompt": {"$ne": 1}}), "must be a string"),
    ("/v1/completions", lambda s: body(s, kv_transfer_params={"cloud_prompt": None, "strategy": "warp"}), "strategy must be one of"),
    ("/v1/completions", lambda s: body(s, kv_transfer_params={"cloud_prompt": "lisbon-guide", "strategy": 3}), "strategy must be one of"),
    ("/v1/completions", lambda s: body(s, kv_transfer_params={"cloud_prompt": "lisbon-guide", "cloud_prompt_id": "travel-agent"}), "they differ"),
    ("/v1/completions", lambda s: body(s, kv_transfer_params="lisbon-guide"), "must be a JSON object"),
    ("/v1/completions", lambda s: body(s, kv_transfer_params={"do_remote_prefill": True, "remote_block_ids": [1, 2]}), "unknown key(s)"),
    ("/v1/completions", lambda s: body(s, prompt=[], kv_transfer_params={"cloud_prompt": "lisbon-guide"}), "prompt"),
    ("/v1/completions", lambda s: body(s, prompt=[1, "a"], kv_transfer_params={"cloud_prompt": "lisbon-guide"}), "prompt"),
    ("/v1/completions", lambda s: body(s, prompt=None, kv_transfer_params={"cloud_prompt": "lisbon-guide"}), "prompt"),
    ("/v1/chat/completions", lambda s: {"model": s.edge.model, "messages": [], "kv_transfer_params": {"cloud_prompt": "travel-agent"}}, "non-empty list"),
    ("/v1/chat/completions", lambda s: {"model": s.edge.model, "messages": "hi", "kv_transfer_params": {"cloud_prompt": "travel-agent"}}, "non-empty list"),
    ("/v1/chat/completions", lambda s: {"model": s.edge.model, "messages": [{"role": "system", "content": "evil"}, {"role": "user", "content": "x"}], "kv_transfer_params": {"cloud_prompt": "travel-agent"}}, "already has a system message"),
    ("/v1/completions", lambda s: b'{"model": "m", "prompt": "x", "kv_transfer_params": {"cloud_prompt": ', ""),
    ("/v1/completions", lambda s: b"\xff\xfe not json", ""),
    ("/v1/completions", lambda s: b'["a", "list"]', ""),
    ("/v1/completions", lambda s: body(s, prompt=[5] * 2100, kv_transfer_params={"cloud_prompt": "lisbon-guide"}), "2048"),
    ("/v1/completions", lambda s: body(s, prompt="x", max_tokens=4000, kv_transfer_params={"cloud_prompt": "lisbon-guide"}), "2048"),
    ("/v1/chat/completions", lambda s: {"model": s.edge.model, "messages": [{"role": "user", "content": " hello" * 1900}], "kv_transfer_params": {"cloud_prompt": "travel-agent"}}, "2048"),
]


@pytest.mark.parametrize("path, make, words", BAD,
                         ids=[f"{i}-{w or 'not-json'}"[:40] for i, (_, _, w) in enumerate(BAD)])
def test_bad_request_is_a_4xx_with_a_message(stack, path, make, words):
    code, text = post(stack, path, make(stack))
    assert 400 <= code < 500, (code, text[:500])
    assert "Traceback" not in text and words in text, text[:500]
    assert json.loads(text).get("error", {}).get("message") or json.loads(text).get("detail")


def test_the_edge_answers_right_after_bad_input(stack):
    prompt = "\nAfter the bad input:"
    e = complete(client(stack.edge), stack.edge.model, prompt, cloud="lisbon-guide")
    s = complete(client(stack.stock), stack.stock.model, cloud_text(stack, "lisbon-guide") + prompt)
    assert_same_as_stock(e, s)


def test_empty_edge_prompts_are_the_cloud_prompt_alone(stack):
    """An empty completion prompt with a cloud prompt is stock vLLM on the cloud text alone; an
    empty chat message likewise."""
    e = complete(client(stack.edge), stack.edge.model, "", cloud="lisbon-guide")
    s = complete(client(stack.stock), stack.stock.model, cloud_text(stack, "lisbon-guide"))
    assert_same_as_stock(e, s)
    assert status(e)["status"] in ("loaded", "cached")
    import yaml

    system = yaml.safe_load((stack.registry_dir / "travel-agent.yaml").read_text())["system"]
    kw = {"max_tokens": 8, "temperature": 0, "logprobs": True}
    ec = client(stack.edge).chat.completions.create(
        model=stack.edge.model, messages=[{"role": "user", "content": ""}],
        extra_body={"kv_transfer_params": {"cloud_prompt": "travel-agent"}}, **kw)
    sc = client(stack.stock).chat.completions.create(
        model=stack.stock.model, messages=[{"role": "system", "content": system},
                                           {"role": "user", "content": ""}], **kw)
    assert [t.token for t in ec.choices[0].logprobs.content] == \
        [t.token for t in sc.choices[0].logprobs.content]
    with pytest.raises(openai.BadRequestError):  # nothing at all, no cloud prompt: vLLM's 400
        complete(client(stack.edge), stack.edge.model, "")


def edgeprompt_cloud(*args, timeout=240) -> subprocess.CompletedProcess:
    exe = str(Path(sys.executable).parent / "edgeprompt")
    return subprocess.run([exe, "cloud", *args], capture_output=True, text=True, check=False, timeout=timeout,
                          env=RAY_ENV, stdin=subprocess.DEVNULL)


def test_a_registry_with_errors_is_refused_before_anything_starts(stack, tmp_path):
    (tmp_path / "a.yaml").write_text("name: ok\ntext: fine\n")
    (tmp_path / "b.yaml").write_text("name: ok\nsystem: duplicate name\n")
    (tmp_path / "c.yaml").write_text("name: 'no spaces'\ntext: x\ncolour: red\n")
    (tmp_path / "d.yaml").write_text("name: d\ntext: [unclosed\n")
    (tmp_path / "e.yaml").write_text("- a list\n")
    out = edgeprompt_cloud("--model", str(stack.model), "--prompts", str(tmp_path),
                           "--ray-address", "127.0.0.1:1", timeout=60)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    for words in ("b.yaml: name 'ok' is already used", "c.yaml: unknown field 'colour'",
                  "c.yaml: field 'name'", "d.yaml: not valid YAML", "e.yaml: expected a mapping"):
        assert words in out.stderr, out.stderr


def test_a_prompt_the_cloud_cannot_take_is_a_clear_error(stack, tmp_path):
    """Valid YAML, but longer than the cloud's max_model_len: the actor refuses it; the command
    says which file and why, and exits 2 (it used to end in a traceback)."""
    (tmp_path / "long.yaml").write_text("name: long\ntext: '" + "word " * 400 + "'\n")
    out = edgeprompt_cloud("--model", str(stack.model), "--prompts", str(tmp_path),
                           "--ray-address", stack.address, "--namespace", "ep-refused",
                           "--max-model-len", "256", "--no-progress")
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    assert "long.yaml: cloud prompt 'long' was refused by the cloud: ValueError" in out.stderr
    assert "max_model_len is 256" in out.stderr and "Traceback" not in out.stderr
